"""Dictionary wrappers of the sequence transforms, keyed like :class:`~monai_twin.data.LongitudinalDataset` items."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.transforms import Flip, InvertibleTransform, MapTransform, RandomizableTransform
from monai.utils import convert_to_dst_type, convert_to_tensor, ensure_tuple, ensure_tuple_rep

from .array import ConformScan, LoadSequence, PadSequence, SelectVisit

__all__ = [
    "DEFAULT_SEQUENCE_KEYS",
    "ConformScansD",
    "ConformScansDict",
    "ConformScansd",
    "LoadSequenceD",
    "LoadSequenceDict",
    "LoadSequenced",
    "PadSequenceD",
    "PadSequenceDict",
    "PadSequenced",
    "RandFlipSequenceD",
    "RandFlipSequenceDict",
    "RandFlipSequenced",
    "RandHistoryTruncateD",
    "RandHistoryTruncateDict",
    "RandHistoryTruncated",
    "SelectVisitD",
    "SelectVisitDict",
    "SelectVisitd",
]

#: Per-visit keys of a forecasting sample (visit axis first).
DEFAULT_SEQUENCE_KEYS = ("history", "times", "history_times", "ehr_intervals", "ehr_intervals_mask")


class LoadSequenced(MapTransform):
    """Dictionary version of :class:`LoadSequence`: ``data["history"]`` (list of paths) -> ``(T, C, *spatial)``.

    Args:
        keys: keys holding lists of paths (default ``"history"``; add ``"history_label"`` for masks).
        reader, ensure_channel_first, dtype: see :class:`LoadSequence`.
        stack: ``False`` loads each key as a list of ``(C, *spatial)`` MetaTensors, one per visit with
            its own affine and metadata, which may differ in shape (see :class:`LoadSequence`).
        allow_missing_keys: skip absent keys.
    """

    backend = LoadSequence.backend

    def __init__(
        self,
        keys: KeysCollection = "history",
        reader: Any = None,
        ensure_channel_first: bool = True,
        dtype: DtypeLike = np.float32,
        stack: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadSequence(reader=reader, ensure_channel_first=ensure_channel_first, dtype=dtype, stack=stack)

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


class RandHistoryTruncated(RandomizableTransform, MapTransform):
    """Keep only the most recent visits of a sample's history, at random (training augmentation).

    Forecasting cohorts hold few samples whose history is one scan (each subject's second visit)
    and many with longer histories, so a twin sees little of the situation it meets at a patient's
    first follow-up. This transform drops the oldest real visits of a history: with probability
    ``prob`` it keeps ``m`` most recent visits, ``m`` drawn uniformly from ``min_length`` to one less
    than the sample's real visits. The events are not touched: what the record says before the
    target stays known, only the older scans are withheld.

    It works before or after :class:`PadSequenced`:

    - on a raw item (a history still a list of paths, as
      :func:`~monai_twin.data.build_longitudinal_items` makes it) or a sample without ``mask_key``,
      every visit is real and each per-visit key (visit axis first) is cut to its last ``m`` entries;
    - on a loaded sample with ``mask_key`` (e.g. after :class:`PadSequenced`; real slots contiguous),
      the kept visits are padded back to the same number of slots on the side the real visits were
      on and the mask is updated, so the shapes do not change and batches still collate.

    Args:
        keys: per-visit keys (default: history, times, history_times, ehr_intervals,
            ehr_intervals_mask; add ``"history_label"`` etc.; absent ones are skipped).
        prob: probability of truncating a sample.
        min_length: fewest visits kept (>= 1).
        mask_key: the slot mask written by :class:`PadSequenced`.

    Example::

        RandHistoryTruncated(prob=0.3)(sample)  # sometimes a history of 1..T-1 most recent scans
    """

    def __init__(
        self,
        keys: KeysCollection = DEFAULT_SEQUENCE_KEYS,
        prob: float = 0.5,
        min_length: int = 1,
        mask_key: str = "history_mask",
        allow_missing_keys: bool = True,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if int(min_length) < 1:
            raise ValueError(f"min_length must be >= 1 (a forecast needs a prior scan), got {min_length}.")
        self.min_length = int(min_length)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        present = list(self.key_iterator(d))
        if not present:
            raise KeyError(f"RandHistoryTruncated: none of the keys {list(self.keys)} is in the sample.")
        mask = d.get(self.mask_key)
        slots = len(d[present[0]])
        for key in present:
            if len(d[key]) != slots:
                raise ValueError(
                    f"RandHistoryTruncated: key {key!r} has {len(d[key])} visits but {present[0]!r} has {slots}; "
                    "every per-visit key needs the same T (visit axis first)."
                )
        if mask is None:
            real = np.arange(slots)
        else:
            flags = np.asarray(convert_to_tensor(mask, dtype=torch.float32).detach().cpu()) > 0
            if flags.shape != (slots,):
                raise ValueError(
                    f"RandHistoryTruncated: {self.mask_key!r} has shape {flags.shape}, expected ({slots},)."
                )
            real = np.flatnonzero(flags)
            if real.size and real[-1] - real[0] + 1 != real.size:
                raise ValueError(
                    f"RandHistoryTruncated: the real slots of {self.mask_key!r} must be contiguous, got {real.tolist()}."
                )
        n = int(real.size)
        if not self._do_transform or n <= self.min_length:
            return d
        keep = int(self.R.randint(self.min_length, n))  # in [min_length, n - 1]
        kept = real[n - keep :]
        selected = slice(int(kept[0]), int(kept[-1]) + 1)
        keys = [*present, *([self.mask_key] if mask is not None else [])]
        if mask is None or any(isinstance(d[key], (list, tuple)) for key in present):
            # a raw item (its history a list of paths) or a sample without slots: cut every key
            for key in keys:
                d[key] = _take_visits(d[key], selected)
            return d
        # padded: re-pad the kept visits on the side the real ones were on (PadSequence moves the
        # per-visit metadata of a loaded history with them)
        pad = PadSequence(slots, side="right" if real[0] == 0 else "left")
        for key in keys:
            d[key] = pad(_take_visits(d[key], selected))
        return d


class ConformScansd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`ConformScan`: check every scan of a sample against the model's training data.

    Each key holds one scan ``(C, *spatial)`` (e.g. ``"target"``) or a list of them, one per visit
    (``"history"`` loaded with ``LoadSequenced(stack=False)``); the output has the same form (a list
    stays a list, each visit on the model's grid, ready for ``RegisterSequenced``). Errors name the
    subject (``data[subject_key]``), the key, the visit for lists and the file, with what was found
    and what the model expects. Run it in an inference bundle right after loading a user's
    manifest, so a scan unlike the training data is resampled or rejected -- never forecast from.
    Every key is checked against the same model settings: use a second ``ConformScansd`` with
    ``value_range=None`` and ``mode="nearest"`` for label maps.

    Args:
        keys: image keys (absent ones raise unless ``allow_missing_keys``).
        spatial_dims, channels, spacing, spatial_size: see :class:`ConformScan`.
        value_range, value_tolerance, spacing_tolerance, orientation, on_mismatch: see :class:`ConformScan`.
        mode: ``Spacing`` interpolation, one per key or one for all.
        padding_mode: ``Spacing`` padding, one per key or one for all.
        subject_key: key of the subject id named in errors (``None``: not named).
        allow_missing_keys: skip absent keys.

    Example::

        Compose([
            LoadSequenced("history", stack=False), LoadImaged("target", ensure_channel_first=True),
            ConformScansd(("history", "target"), spatial_dims=2, spacing=0.625, spatial_size=256),
            RegisterSequenced("history", reference="last", stages="rigid"),  # (T, 1, 256, 256)
        ])
    """

    backend = ConformScan.backend

    def __init__(
        self,
        keys: KeysCollection = ("history", "target"),
        spatial_dims: int = 2,
        channels: int | None = 1,
        spacing: Sequence[float] | float | None = None,
        spatial_size: Sequence[int] | int | None = None,
        value_range: tuple[float, float] | None = (0.0, 1.0),
        value_tolerance: float = 0.25,
        spacing_tolerance: float = 0.01,
        orientation: str | None = None,
        on_mismatch: str = "resample",
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "border",
        subject_key: str | None = "subject_id",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self.conform = ConformScan(
            spatial_dims=spatial_dims,
            channels=channels,
            spacing=spacing,
            spatial_size=spatial_size,
            value_range=value_range,
            value_tolerance=value_tolerance,
            spacing_tolerance=spacing_tolerance,
            orientation=orientation,
            on_mismatch=on_mismatch,
            mode=self.mode[0],
            padding_mode=self.padding_mode[0],
        )
        self.subject_key = subject_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        subject = self._subject(d)
        for key, mode, padding_mode in self.key_iterator(d, self.mode, self.padding_mode):
            value = d[key]
            if _is_path(value) or (isinstance(value, (list, tuple)) and any(_is_path(v) for v in value)):
                raise TypeError(
                    f"ConformScansd: {subject}key {key!r} holds file paths; it checks loaded scans: load them "
                    "first (LoadSequenced(stack=False) for a history, LoadImaged with ensure_channel_first=True for "
                    "one scan)."
                )
            if not isinstance(value, (list, tuple)):
                d[key] = self._conform(value, mode, padding_mode, f"{subject}key {key!r}")
                continue
            if not value:
                raise ValueError(f"ConformScansd: {subject}key {key!r} is an empty list; expected at least one visit.")
            outs = [
                self._conform(visit, mode, padding_mode, f"{subject}key {key!r}, visit {t} of {len(value)}")
                for t, visit in enumerate(value)
            ]
            d[key] = outs if isinstance(value, list) else tuple(outs)
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            if isinstance(value, (list, tuple)):
                d[key] = type(value)(self.conform.inverse(visit) for visit in value)
            else:
                d[key] = self.conform.inverse(value)
        return d

    def _conform(self, img: Any, mode: str, padding_mode: str, where: str) -> Any:
        try:
            return self.conform(img, mode=mode, padding_mode=padding_mode)
        except (TypeError, ValueError) as err:
            raise type(err)(f"ConformScansd: {where}: {err}") from err

    def _subject(self, d: Mapping[Hashable, Any]) -> str:
        if self.subject_key is None:
            return ""
        if self.subject_key not in d:
            return f"subject unknown (no {self.subject_key!r} in the sample), "
        return f"subject {str(d[self.subject_key])!r}, "


class SelectVisitd(MapTransform):
    """Dictionary version of :class:`SelectVisit`: copy one visit of a history to another key.

    ``data[output_key]`` receives visit ``index`` of ``data[key]`` (a ``(T, C, *spatial)`` stack or a
    list of visits) as a ``(C, *spatial)`` MetaTensor with its affine and metadata; ``data[key]`` is
    left as it is. Typical use: hand the last prior visit to ``Registerd(keys="target",
    fixed_key="reference")`` so that the target scan is registered onto the history's grid.

    Args:
        keys: history keys.
        index: visit to copy (``-1``: the most recent).
        output_key: destination key, one per key.
        allow_missing_keys: skip absent keys.

    Example::

        SelectVisitd("history", index=-1, output_key="reference")(sample)["reference"]  # (C, H, W)
    """

    backend = SelectVisit.backend

    def __init__(
        self,
        keys: KeysCollection = "history",
        index: int = -1,
        output_key: str | Sequence[str] = "reference",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_key = ensure_tuple(output_key)
        if len(self.output_key) != len(self.keys):
            raise ValueError(
                f"output_key needs one entry per key: keys {list(self.keys)}, output_key {list(self.output_key)}."
            )
        self.select = SelectVisit(index)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_key):
            try:
                d[output_key] = self.select(d[key])
            except (IndexError, TypeError, ValueError) as err:
                raise type(err)(f"SelectVisitd: key {key!r}: {err}") from err
        return d


def _is_path(value: Any) -> bool:
    return isinstance(value, (str, bytes, os.PathLike))


def _take_visits(value: Any, selected: slice) -> Any:
    """``value[selected]`` along the visit axis; a loaded history's per-visit metadata follows."""
    if isinstance(value, MetaTensor):
        meta = dict(value.meta)
        meta.pop("affine", None)
        for name in ("sequence_filenames", "sequence_affines"):
            if name in meta:
                meta[name] = meta[name][selected]
        return MetaTensor(value.as_tensor()[selected], meta=meta, affine=value.affine)
    return value[selected]


ConformScansD = ConformScansDict = ConformScansd
LoadSequenceD = LoadSequenceDict = LoadSequenced
PadSequenceD = PadSequenceDict = PadSequenced
RandFlipSequenceD = RandFlipSequenceDict = RandFlipSequenced
RandHistoryTruncateD = RandHistoryTruncateDict = RandHistoryTruncated
SelectVisitD = SelectVisitDict = SelectVisitd
