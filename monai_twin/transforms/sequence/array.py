"""Array transforms for visit sequences: load a history of scans into one ``(T, C, *spatial)``
MetaTensor, and pad/trim per-visit arrays to a fixed number of slots.

Loading builds on MONAI's :class:`~monai.transforms.LoadImage` and
:class:`~monai.transforms.EnsureChannelFirst`; nothing here resamples -- registering the visits
into one frame is the job of ``monai_twin.transforms.registration``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirst, LoadImage, Transform
from monai.utils import TransformBackends, convert_to_tensor

__all__ = ["LoadSequence", "PadSequence"]


class LoadSequence(Transform):
    """Load a list of image paths (one per visit, oldest first) into a ``(T, C, *spatial)`` MetaTensor.

    Every visit must have the same shape after adding the channel axis (register or resample
    first otherwise); the error names the files that differ. The result's metadata is that of the
    **last** visit (the one nearest the target, and the frame a forecast is produced in), with the
    list of files in ``"sequence_filenames"`` and every visit's affine in ``"sequence_affines"``
    ``(T, 4, 4)``.

    Args:
        reader: reader name or instance passed to :class:`~monai.transforms.LoadImage`.
        ensure_channel_first: add/move the channel axis of each visit (2D and 3D images without a
            channel get one).
        dtype: data type of the stacked array.

    Example::

        history = LoadSequence()(["v0.nii.gz", "v1.nii.gz", "v2.nii.gz"])  # (3, 1, H, W, D)
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, reader: Any = None, ensure_channel_first: bool = True, dtype: DtypeLike = np.float32) -> None:
        self.loader = LoadImage(reader=reader, image_only=True, dtype=dtype)
        self.channel_first = EnsureChannelFirst() if ensure_channel_first else None

    def __call__(self, paths: Sequence[str]) -> MetaTensor:
        if isinstance(paths, (str, bytes)) or not isinstance(paths, Sequence):
            raise TypeError(f"LoadSequence expects a list of image paths (one per visit), got {type(paths).__name__}.")
        if len(paths) == 0:
            raise ValueError("LoadSequence got an empty list of paths: a history needs at least one visit.")
        images = []
        for path in paths:
            image = self.loader(path)
            if self.channel_first is not None:
                image = self.channel_first(image)
            images.append(image)
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) > 1:
            listing = "; ".join(f"{p}: {tuple(img.shape)}" for p, img in zip(paths, images))
            raise ValueError(f"the visits of a sequence must share one shape (register/resample first); got {listing}.")
        stacked = torch.stack([img.as_tensor() for img in images], dim=0)
        last = images[-1]
        meta = dict(last.meta)
        meta.pop("affine", None)
        meta["sequence_filenames"] = [str(p) for p in paths]
        meta["sequence_affines"] = torch.stack([torch.as_tensor(img.affine, dtype=torch.float64) for img in images])
        return MetaTensor(stacked, affine=last.affine, meta=meta)


class PadSequence(Transform):
    """Pad or trim an array along its first (visit) axis to ``length`` slots.

    Longer sequences keep their **last** ``length`` visits (the most recent ones); shorter ones
    get ``value`` appended (``side="right"``) or prepended (``side="left"``). Use the same setting
    for every per-visit key of a sample (see :class:`~monai_twin.transforms.sequence.PadSequenced`,
    which also writes the matching ``history_mask``).

    Args:
        length: number of visit slots.
        side: ``"right"`` (default) or ``"left"``.
        value: fill value.

    Example::

        PadSequence(4)(np.array([300.0, 120.0]))  # -> [300, 120, 0, 0]
    """

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]

    def __init__(self, length: int, side: str = "right", value: float = 0.0) -> None:
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}.")
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right', got {side!r}.")
        self.length = length
        self.side = side
        self.value = value

    def __call__(self, data: Any) -> torch.Tensor:
        arr = convert_to_tensor(data, track_meta=isinstance(data, MetaTensor))
        if arr.dim() == 0:
            raise ValueError("PadSequence needs an array with a visit axis first, got a scalar.")
        t = arr.shape[0]
        if t >= self.length:
            if isinstance(arr, MetaTensor):
                return MetaTensor(
                    arr.as_tensor()[t - self.length :], meta=self._pad_meta(arr.meta, t), affine=arr.affine
                )
            return arr[t - self.length :]
        fill = torch.full((self.length - t, *arr.shape[1:]), self.value, dtype=arr.dtype, device=arr.device)
        parts = [arr, fill] if self.side == "right" else [fill, arr]
        out = torch.cat([p.as_tensor() if isinstance(p, MetaTensor) else p for p in parts], dim=0)
        if isinstance(arr, MetaTensor):
            return MetaTensor(out, meta=self._pad_meta(arr.meta, t), affine=arr.affine)
        return out

    def _pad_meta(self, meta: dict, t: int) -> dict:
        """Per-visit metadata written by :class:`LoadSequence` follows the slots (so batches collate)."""
        meta = dict(meta)
        meta.pop("affine", None)
        n_fill = max(self.length - t, 0)
        keep = slice(max(t - self.length, 0), t)
        if "sequence_filenames" in meta:
            names = list(meta["sequence_filenames"])[keep]
            meta["sequence_filenames"] = names + [""] * n_fill if self.side == "right" else [""] * n_fill + names
        if "sequence_affines" in meta:
            affines = torch.as_tensor(meta["sequence_affines"])[keep]
            fill = torch.zeros((n_fill, *affines.shape[1:]), dtype=affines.dtype)
            meta["sequence_affines"] = torch.cat([affines, fill] if self.side == "right" else [fill, affines])
        return meta
