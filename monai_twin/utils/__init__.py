from __future__ import annotations

from .io import atomic_output_path, atomic_write_text

__all__ = ["atomic_output_path", "atomic_write_text"]
