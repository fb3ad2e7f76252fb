"""Visit-sequence transforms: load a history of scans as ``(T, C, *spatial)`` pad per-visit keys, and flip
or shorten them for augmentation."""

from __future__ import annotations

from .array import LoadSequence, PadSequence
from .dictionary import (
    DEFAULT_SEQUENCE_KEYS,
    LoadSequenceD,
    LoadSequenced,
    LoadSequenceDict,
    PadSequenceD,
    PadSequenced,
    PadSequenceDict,
    RandFlipSequenceD,
    RandFlipSequenced,
    RandFlipSequenceDict,
    RandHistoryTruncateD,
    RandHistoryTruncated,
    RandHistoryTruncateDict,
)

__all__ = [
    "DEFAULT_SEQUENCE_KEYS",
    "LoadSequence",
    "LoadSequenceD",
    "LoadSequenceDict",
    "LoadSequenced",
    "PadSequence",
    "PadSequenceD",
    "PadSequenceDict",
    "PadSequenced",
    "RandFlipSequenceD",
    "RandFlipSequenceDict",
    "RandFlipSequenced",
    "RandHistoryTruncateD",
    "RandHistoryTruncateDict",
    "RandHistoryTruncated",
]
