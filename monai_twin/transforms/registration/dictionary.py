"""Dictionary registration transforms: the first key drives the registration, every key follows.

Typical pairs: ``keys=("image", "label")`` with ``mode=("bilinear", "nearest")`` -- the image is
registered to ``data[fixed_key]`` and the label is resampled through the same transform with
nearest-neighbour interpolation. Each key records the transform in its own MetaTensor, so
``Registerd.inverse`` (or MONAI's ``Invertd``) restores every key.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms.inverse import InvertibleTransform
from monai.transforms.transform import MapTransform
from monai.utils import ensure_tuple_rep

from .array import Register, RegisterSequence, _as_image, _before_metrics
from .quality import QualityThresholds, RegistrationQuality, _select_visits

__all__ = [
    "RegisterD",
    "RegisterDict",
    "RegisterSequenceD",
    "RegisterSequenceDict",
    "RegisterSequenced",
    "Registerd",
    "RegistrationQualityD",
    "RegistrationQualityDict",
    "RegistrationQualityd",
]


def _require(d: Mapping[Hashable, Any], key: Hashable | None, what: str) -> Any:
    if key is None:
        return None
    if key not in d:
        raise KeyError(f"{what} key {key!r} is missing from the data dictionary (keys: {sorted(map(str, d))}).")
    return d[key]


class Registerd(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`~monai_twin.transforms.registration.Register`.

    Args:
        keys: keys to transform; the first one is registered, the others (masks, labels, other
            channels on the same grid) follow with the same transform.
        fixed_key: key of the reference image ``(C, H, W[, D])``.
        moving_mask_key: optional key of a mask on the moving grid restricting the metric.
        fixed_mask_key: optional key of a mask on the fixed grid.
        mode: interpolation per key (``"nearest"`` for labels); one value applies to all keys.
        padding_mode: padding per key.
        allow_missing_keys: skip follower keys that are absent (the first key is always required).
        register_kwargs: :class:`Register` arguments (``stages``, ``metric``, ``levels``, ...).

    Example::

        reg = Registerd(keys=("image", "label"), fixed_key="reference", mode=("bilinear", "nearest"),
                        stages=("rigid", "affine"))
        out = reg({"image": moving, "label": labels, "reference": fixed})
    """

    backend = Register.backend

    def __init__(
        self,
        keys: KeysCollection,
        fixed_key: str,
        moving_mask_key: str | None = None,
        fixed_mask_key: str | None = None,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        allow_missing_keys: bool = False,
        **register_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fixed_key = fixed_key
        self.moving_mask_key = moving_mask_key
        self.fixed_mask_key = fixed_mask_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self.register = Register(mode=self.mode[0], padding_mode=self.padding_mode[0], **register_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        driver = self.keys[0]
        moving = _require(d, driver, "moving image")
        fixed = _require(d, self.fixed_key, "fixed image")
        try:
            record = self.register.compute(
                moving,
                fixed,
                moving_mask=_require(d, self.moving_mask_key, "moving mask"),
                fixed_mask=_require(d, self.fixed_mask_key, "fixed mask"),
            )
        except (ValueError, TypeError) as err:
            raise type(err)(f"Registerd, key {driver!r} to {self.fixed_key!r}: {err}") from err
        record.update(
            _before_metrics(
                _as_image(moving, str(driver)), _as_image(fixed, self.fixed_key), record, self.register.channel
            )
        )
        for key, mode, padding in self.key_iterator(d, self.mode, self.padding_mode):
            try:
                d[key] = self.register.apply_recorded(d[key], record, mode=mode, padding_mode=padding)
            except ValueError as err:
                raise ValueError(f"Registerd, key {key!r}: {err}") from err
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.register.inverse(d[key])
        return d


class RegisterSequenced(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`~monai_twin.transforms.registration.RegisterSequence`.

    ``data[keys[0]]`` -- a list of visits ``(C, H, W[, D])`` or a stacked ``(T, C, H, W[, D])``
    history -- is registered visit by visit to the reference visit; the other keys (per-visit
    masks or labels with the same grids) follow through the same transforms. Every key comes out
    stacked ``(T, C, *reference_spatial)``.

    Args:
        keys: sequence keys; the first drives the registration.
        reference: ``"first"``, ``"last"`` or a visit index.
        stages: stage chain per visit, e.g. ``("rigid", "affine", "fast_symmetric_demons")``.
        mask_key: optional key of per-visit masks restricting the metric (not resampled unless
            also listed in ``keys``).
        mode: interpolation per key (``"nearest"`` for labels).
        padding_mode: padding per key.
        allow_missing_keys: skip follower keys that are absent.
        register_kwargs: other :class:`Register` arguments.

    Example::

        seq = RegisterSequenced(keys=("history", "history_labels"), reference="last",
                                stages=("rigid", "affine"), mode=("bilinear", "nearest"))
        out = seq(item)   # out["history"]: (T, C, H, W) on the last visit's grid
    """

    backend = Register.backend

    def __init__(
        self,
        keys: KeysCollection,
        reference: str | int = "first",
        stages: str | Sequence[str] = "rigid",
        mask_key: str | None = None,
        mode: str | Sequence[str] = "bilinear",
        padding_mode: str | Sequence[str] = "zeros",
        allow_missing_keys: bool = False,
        **register_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = ensure_tuple_rep(padding_mode, len(self.keys))
        self.sequence = RegisterSequence(
            reference=reference, stages=stages, mode=self.mode[0], padding_mode=self.padding_mode[0], **register_kwargs
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        driver = self.keys[0]
        images = _require(d, driver, "sequence")
        masks = _require(d, self.mask_key, "sequence mask")
        if masks is not None and not isinstance(masks, (list, tuple)):
            masks = list(masks)
        try:
            record = self.sequence.compute(images, masks)
        except (ValueError, TypeError) as err:
            raise type(err)(f"RegisterSequenced, key {driver!r}: {err}") from err
        for key, mode, padding in self.key_iterator(d, self.mode, self.padding_mode):
            try:
                d[key] = self.sequence.apply_recorded(d[key], record, mode=mode, padding_mode=padding)
            except ValueError as err:
                raise ValueError(f"RegisterSequenced, key {key!r}: {err}") from err
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.sequence.inverse(d[key])
        return d


class RegistrationQualityd(MapTransform):
    """Dictionary version of :class:`~monai_twin.transforms.registration.RegistrationQuality`.

    Checks ``data[keys[0]]`` (a registered pair: give ``fixed_key``; a registered sequence: the
    reference is inside the stack). Under ``policy="drop"`` the failing visits are removed from
    every key in ``keys`` and from each ``drop_keys`` entry indexed by visit along its first axis
    (e.g. ``"history_times"``), so the item stays consistent. The verdicts also go to
    ``data[quality_key]`` when given.

    Args:
        keys: registered image key first, then follower keys (labels) registered with it.
        fixed_key: reference image key for a pairwise registration.
        thresholds: :class:`QualityThresholds`, a dict, or a modality name.
        policy: ``"warn"``, ``"flag"``, ``"raise"`` or ``"drop"``.
        drop_keys: per-visit keys (lists, arrays, tensors) trimmed with the dropped visits.
        quality_key: optional key receiving the verdict(s).
        channel: channel compared.
        data_range: SSIM intensity range.
        allow_missing_keys: skip absent follower and drop keys.

    Example::

        qc = RegistrationQualityd(keys="history", thresholds="mri", policy="drop", drop_keys=("history_times",))
    """

    def __init__(
        self,
        keys: KeysCollection,
        fixed_key: str | None = None,
        thresholds: QualityThresholds | Mapping[str, float | None] | str = "generic",
        policy: str = "flag",
        drop_keys: Sequence[str] = (),
        quality_key: str | None = None,
        channel: int | None = 0,
        data_range: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fixed_key = fixed_key
        self.quality = RegistrationQuality(thresholds, policy=policy, channel=channel, data_range=data_range)
        self.drop_keys = tuple(drop_keys)
        self.quality_key = quality_key

    def calibrate(self, pairs, quantile: float = 0.05, slack: float = 0.5) -> QualityThresholds:
        """See :meth:`RegistrationQuality.calibrate`."""
        return self.quality.calibrate(pairs, quantile=quantile, slack=slack)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        driver = self.keys[0]
        img = _require(d, driver, "registered image")
        fixed = _require(d, self.fixed_key, "fixed image")
        try:
            checked = self.quality(img, fixed)
        except (ValueError, TypeError) as err:
            raise type(err)(f"RegistrationQualityd, key {driver!r}: {err}") from err
        d[driver] = checked
        if self.quality_key is not None:
            d[self.quality_key] = checked.meta["registration_quality"]
        keep = checked.meta.get("kept_visits")
        if keep is None or self.quality.policy != "drop":
            return d
        for key in self.key_iterator(d):
            if key != driver:
                d[key] = _select_visits(d[key], keep) if isinstance(d[key], MetaTensor) else d[key][keep]
        for key in self.drop_keys:
            if key not in d:
                if self.allow_missing_keys:
                    continue
                raise KeyError(f"drop key {key!r} is missing from the data dictionary.")
            value = d[key]
            if isinstance(value, (list, tuple)):
                d[key] = type(value)(value[t] for t in keep)
            elif isinstance(value, (np.ndarray, torch.Tensor)):
                d[key] = value[list(keep)]
            else:
                raise TypeError(
                    f"drop key {key!r} must be a list, array or tensor indexed by visit, got {type(value).__name__}."
                )
        return d


RegisterD = RegisterDict = Registerd
RegisterSequenceD = RegisterSequenceDict = RegisterSequenced
RegistrationQualityD = RegistrationQualityDict = RegistrationQualityd
