"""Visit-sequence transforms: load a history of scans as ``(T, C, *spatial)`` (or a list of visits), check each
scan against what a model was trained on, pick one visit, pad per-visit keys, and flip or shorten them for
augmentation."""

from __future__ import annotations

from .array import ConformScan, LoadSequence, PadSequence, SelectVisit
from .dictionary import (
    DEFAULT_SEQUENCE_KEYS,
    ConformScansD,
    ConformScansd,
    ConformScansDict,
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
    SelectVisitD,
    SelectVisitd,
    SelectVisitDict,
)

__all__ = [
    "DEFAULT_SEQUENCE_KEYS",
    "ConformScan",
    "ConformScansD",
    "ConformScansDict",
    "ConformScansd",
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
    "SelectVisit",
    "SelectVisitD",
    "SelectVisitDict",
    "SelectVisitd",
]
