"""Safe output writing: every file monai_twin produces is written to a temporary name beside its
destination and renamed into place, so a crash never leaves a half-written file under the final
name and an existing file is replaced atomically (``os.replace``)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_output_path", "atomic_write_text"]


@contextlib.contextmanager
def atomic_output_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path in the destination's folder; rename it to ``path`` on success.

    The temporary file keeps the destination's suffix(es) (``.nii.gz``, ``.parquet``) unless
    ``suffix`` is given, so writers that infer the format from the name behave as for ``path``.
    On an exception the temporary file is removed and ``path`` is left untouched.

    Example::

        with atomic_output_path("out/visits.parquet") as tmp:
            frame.to_parquet(tmp)
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = "".join(final.suffixes) or ""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{suffix}", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        if tmp.exists():
            # mkstemp makes the file owner-only (0600); give it the mode a plain open() would
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_output_path(path) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
