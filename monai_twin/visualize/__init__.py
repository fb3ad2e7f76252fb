from __future__ import annotations

from .timeline import plot_subject_timeline

__all__ = ["plot_subject_timeline"]
