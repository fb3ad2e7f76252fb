"""Dictionary wrappers of the sequence transforms, keyed like :class:`~monai_twin.data.LongitudinalDataset` items."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor

from .array import LoadSequence, PadSequence

__all__ = [
    "DEFAULT_SEQUENCE_KEYS",
    "LoadSequenceD",
    "LoadSequenceDict",
    "LoadSequenced",
    "PadSequenceD",
    "PadSequenceDict",
    "PadSequenced",
    "RandFlipSequenceD",
    "RandFlipSequenceDict",
    "RandFlipSequenced",
]

#: Per-visit keys of a forecasting sample (visit axis first).
DEFAULT_SEQUENCE_KEYS = ("history", "times", "history_times", "ehr_intervals", "ehr_intervals_mask")


class LoadSequenced(MapTransform):
    """Dictionary version of :class:`LoadSequence`: ``data["history"]`` (list of paths) -> ``(T, C, *spatial)``.

    Args:
        keys: keys holding lists of paths (default ``"history"``; add ``"history_label"`` for masks).
        reader, ensure_channel_first, dtype: see :class:`LoadSequence`.
        allow_missing_keys: skip absent keys.
    """

    backend = LoadSequence.backend

    def __init__(
        self,
        keys: KeysCollection = "history",
        reader: Any = None,
        ensure_channel_first: bool = True,
        dtype: DtypeLike = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadSequence(reader=reader, ensure_channel_first=ensure_channel_first, dtype=dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.loader(d[key])
            except (TypeError, ValueError) as err:
                raise type(err)(f"key {key!r}: {err}") from err
        return d


class PadSequenced(MapTransform):
    """Pad/trim every per-visit key of a sample to ``length`` slots and write the matching mask.

    All keys must have the same number of visits ``T`` (the error names the key that differs).
    ``mask_key`` receives ``(length,)`` float32 ones on real visits and zeros on padding (an
    existing mask is padded/trimmed like the other keys instead). Longer histories keep their last
    ``length`` visits.

    Args:
        length: number of visit slots (the network's ``max_history``).
        keys: per-visit keys (default: history, times, history_times, ehr_intervals,
            ehr_intervals_mask; absent ones are skipped).
        mask_key: where the slot mask goes (default ``"history_mask"``).
        side: ``"right"`` (default) or ``"left"`` padding.

    Example::

        PadSequenced(length=6)(sample)  # history (6, C, ...), times (6,), history_mask (6,)
    """

    backend = PadSequence.backend

    def __init__(
        self,
        length: int,
        keys: KeysCollection = DEFAULT_SEQUENCE_KEYS,
        mask_key: str = "history_mask",
        side: str = "right",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.pad = PadSequence(length, side=side)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        present = list(self.key_iterator(d))
        if not present:
            raise KeyError(f"PadSequenced: none of the keys {list(self.keys)} is in the sample.")
        lengths = {key: int(np.shape(d[key])[0]) if np.ndim(d[key]) > 0 else -1 for key in present}
        t = lengths[present[0]]
        for key, n in lengths.items():
            if n != t:
                raise ValueError(
                    f"PadSequenced: key {key!r} has {n} visits but {present[0]!r} has {t}; every per-visit key needs "
                    "the same T (visit axis first)."
                )
        mask = d.get(self.mask_key)
        if mask is None:
            mask = torch.ones(t, dtype=torch.float32)
        elif int(np.shape(mask)[0]) != t:
            raise ValueError(f"PadSequenced: {self.mask_key!r} has {np.shape(mask)[0]} slots, expected {t}.")
        for key in present:
            d[key] = self.pad(d[key])
        d[self.mask_key] = self.pad(convert_to_tensor(mask, dtype=torch.float32))
        return d


class RandFlipSequenced(RandomizableTransform, MapTransform):
    """Flip a history stack and single images of one sample along the same spatial axes, at random.

    MONAI's ``RandFlipd`` expects ``(C, *spatial)``; a history is ``(T, C, *spatial)``. This
    transform flips the last ``spatial_dims`` axes of every key with one random draw per sample,
    so the history, the target and any label stay aligned. Each image goes through MONAI's
    :class:`~monai.transforms.Flip` (a history as ``(T * C, *spatial)``), so MetaTensor affines are
    updated as MONAI does. Use it for training augmentation when a flip keeps the anatomy plausible
    (e.g. left/right breasts: the lateral axis of a CC view).

    Args:
        keys: image keys, each ``(T, C, *spatial)`` or ``(C, *spatial)``.
        spatial_dims: 2 or 3.
        spatial_axis: spatial axes to flip (0-based, over the spatial dims only).
        prob: probability of flipping a sample.

    Example::

        RandFlipSequenced(("history", "target"), spatial_dims=2, spatial_axis=1, prob=0.5)
    """

    def __init__(
        self,
        keys: KeysCollection = ("history", "target"),
        spatial_dims: int = 2,
        spatial_axis: int | tuple[int, ...] = 0,
        prob: float = 0.5,
        allow_missing_keys: bool = True,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        axes = (spatial_axis,) if isinstance(spatial_axis, int) else tuple(spatial_axis)
        if not axes or any(a < 0 or a >= spatial_dims for a in axes):
            raise ValueError(f"spatial_axis must be in [0, {spatial_dims - 1}], got {spatial_axis}.")
        self.spatial_dims = spatial_dims
        self.flip = Flip(spatial_axis=axes)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            shape = tuple(np.shape(image))
            if len(shape) not in (self.spatial_dims + 1, self.spatial_dims + 2):
                raise ValueError(
                    f"RandFlipSequenced: key {key!r} has shape {list(shape)}; expected (C, *spatial) or (T, C, *spatial) "
                    f"with {self.spatial_dims} spatial dims."
                )
            lead = shape[: len(shape) - self.spatial_dims]
            flat = image.reshape((-1,) + shape[len(lead) :])
            out = self.flip(flat).reshape(shape)
            # keep the input's type (plain tensors stay plain, so a batch mixing flipped and unflipped
            # samples still collates)
            d[key] = out if isinstance(image, MetaTensor) else convert_to_dst_type(out, image)[0]
        return d


LoadSequenceD = LoadSequenceDict = LoadSequenced
PadSequenceD = PadSequenceDict = PadSequenced
RandFlipSequenceD = RandFlipSequenceDict = RandFlipSequenced
