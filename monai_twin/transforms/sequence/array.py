"""Array transforms for visit sequences: load a history of scans into one ``(T, C, *spatial)``
MetaTensor (or a list of visits), check each scan against what a model was trained on, pick one
visit, and pad/trim per-visit arrays to a fixed number of slots.

Loading builds on MONAI's :class:`~monai.transforms.LoadImage` and
:class:`~monai.transforms.EnsureChannelFirst`. :class:`ConformScan` resamples only onto the model's
grid (MONAI's ``Orientation``, ``Spacing`` and ``ResizeWithPadOrCrop``); registering the visits
into one frame is the job of ``monai_twin.transforms.registration``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import DtypeLike
from monai.data import MetaTensor
from monai.data.meta_obj import get_track_meta
from monai.data.utils import affine_to_spacing, to_affine_nd
from monai.transforms import (
    EnsureChannelFirst,
    InvertibleTransform,
    LoadImage,
    Orientation,
    ResizeWithPadOrCrop,
    Spacing,
    Transform,
)
from monai.utils import SpaceKeys, TraceKeys, TransformBackends, convert_to_tensor

__all__ = ["ConformScan", "LoadSequence", "PadSequence", "SelectVisit"]


class LoadSequence(Transform):
    """Load a list of image paths (one per visit, oldest first) into a ``(T, C, *spatial)`` MetaTensor.

    Every visit must have the same shape after adding the channel axis (register or resample
    first otherwise); the error names the files that differ. The result's metadata is that of the
    **last** visit (the one nearest the target, and the frame a forecast is produced in), with the
    list of files in ``"sequence_filenames"`` and every visit's affine in ``"sequence_affines"``
    ``(T, 4, 4)``.

    With ``stack=False`` the visits come back as a list of ``(C, *spatial)`` MetaTensors, each with
    its own affine and metadata (``"filename_or_obj"`` included), and may differ in shape: use this
    for a user's scans that may be on different grids, then :class:`ConformScan` and/or
    ``RegisterSequence`` (which accepts a list) bring them onto one grid and stack them.

    Args:
        reader: reader name or instance passed to :class:`~monai.transforms.LoadImage`.
        ensure_channel_first: add/move the channel axis of each visit (2D and 3D images without a
            channel get one).
        dtype: data type of the stacked array.
        stack: stack the visits into one ``(T, C, *spatial)`` MetaTensor (default) or return a list.

    Example::

        history = LoadSequence()(["v0.nii.gz", "v1.nii.gz", "v2.nii.gz"])  # (3, 1, H, W, D)
        visits = LoadSequence(stack=False)(["v0.nii.gz", "v1.nii.gz"])  # [(1, H0, W0, D0), (1, H1, W1, D1)]
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        reader: Any = None,
        ensure_channel_first: bool = True,
        dtype: DtypeLike = np.float32,
        stack: bool = True,
    ) -> None:
        self.loader = LoadImage(reader=reader, image_only=True, dtype=dtype)
        self.channel_first = EnsureChannelFirst() if ensure_channel_first else None
        self.stack = bool(stack)

    def __call__(self, paths: Sequence[str]) -> MetaTensor | list[MetaTensor]:
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
        if not self.stack:
            return images
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


class ConformScan(InvertibleTransform):
    """Check that a scan ``(C, *spatial)`` matches what a model was trained on; resample it or reject it.

    A trained twin forecasts garbage, silently, from a scan unlike its training data. This
    transform runs before registration and the network, and checks, in this order:

    1. the number of spatial dims is ``spatial_dims`` -- a 3D volume given to a 2D model (or the
       reverse) is a different modality or protocol: always rejected, never resampled;
    2. the number of channels is ``channels``: always rejected otherwise;
    3. every value is finite and the intensities lie in ``value_range`` widened by
       ``value_tolerance`` of its width on each side: a scan outside (e.g. a CT in Hounsfield
       units given to a model trained on [0, 1] intensities) is another modality or was not
       normalised like the training data: always rejected;
    4. the orientation codes of the affine are ``orientation``;
    5. the voxel spacing (mm, from the affine) is within ``spacing_tolerance`` (relative) of
       ``spacing``;
    6. the spatial shape is ``spatial_size``.

    A mismatch in 4-6 raises with ``on_mismatch="raise"``; with ``"resample"`` the scan is
    reoriented with MONAI's :class:`~monai.transforms.Orientation`, resampled with
    :class:`~monai.transforms.Spacing` (``mode``) and centre-padded with zeros / cropped with
    :class:`~monai.transforms.ResizeWithPadOrCrop`. The steps taken are recorded as one entry of
    the MetaTensor's ``applied_operations``, so :meth:`inverse` (and MONAI's ``Invertd``) puts an
    output such as a forecast back on the scan's original grid. Every error names the file
    (``meta["filename_or_obj"]``), what was found and what the model expects; checks given as
    ``None`` are skipped.

    Orientation codes follow nibabel/MONAI (``"RAS"``, ``"LPS"``, ...; read in the MetaTensor's
    ``"space"``); a 2D scan uses the first two axes (``"RA"``, ``"LA"``, ...), which for a
    projection image such as a mammogram fixes left/right and up/down flips only.

    Orientation and spacing are read from the affine, so they need a MetaTensor (as loaded by
    ``LoadImage``); a numpy array or plain tensor can only be checked for shape, channels and
    values.

    Args:
        spatial_dims: number of spatial dims the model takes (2 or 3).
        channels: channels per scan; ``None`` skips the check.
        spacing: voxel spacing in mm the model was trained at, one value per spatial dim (a single
            value is repeated); ``None`` skips the check.
        spatial_size: spatial shape the model takes (a single value is repeated); ``None`` skips
            the check.
        value_range: ``(low, high)`` intensities of the training data; ``None`` skips the check
            (e.g. for label maps).
        value_tolerance: margin added below ``low`` and above ``high``, as a fraction of
            ``high - low``. Acquisition gain and noise move real scans outside the nominal range:
            the synthetic mammography cohort (gain up to 1.15) reaches about 1.16 on a [0, 1] scale,
            so the default 0.25 accepts it while a scan in Hounsfield units, 8-bit grey levels or
            z-scores is still rejected.
        spacing_tolerance: relative spacing difference accepted without resampling.
        orientation: axis codes the model was trained in (``len == spatial_dims``); ``None`` skips
            the check.
        on_mismatch: ``"resample"`` (default) or ``"raise"`` for orientation, spacing and size.
        mode: interpolation of :class:`~monai.transforms.Spacing` (``"nearest"`` for labels).
        padding_mode: padding of :class:`~monai.transforms.Spacing` outside the input.

    Raises:
        ValueError: on bad arguments, and on a scan that does not conform (see above).
        TypeError: when given a path instead of a loaded scan.

    Example::

        conform = ConformScan(spatial_dims=2, spacing=0.625, spatial_size=256, value_range=(0.0, 1.0))
        scan = conform(LoadImage(image_only=True, ensure_channel_first=True)("user_scan.nii.gz"))  # (1, 256, 256)
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        spatial_dims: int = 2,
        channels: int | None = 1,
        spacing: Sequence[float] | float | None = None,
        spatial_size: Sequence[int] | int | None = None,
        value_range: tuple[float, float] | None = (0.0, 1.0),
        value_tolerance: float = 0.25,
        spacing_tolerance: float = 0.01,
        orientation: str | None = None,
        on_mismatch: str = "resample",
        mode: str = "bilinear",
        padding_mode: str = "border",
    ) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
        if channels is not None and (isinstance(channels, bool) or int(channels) != channels or channels < 1):
            raise ValueError(f"channels must be a positive integer or None, got {channels!r}.")
        if on_mismatch not in ("raise", "resample"):
            raise ValueError(f"on_mismatch must be 'raise' or 'resample', got {on_mismatch!r}.")
        if value_range is not None:
            if len(value_range) != 2 or not float(value_range[0]) < float(value_range[1]):
                raise ValueError(f"value_range must be (low, high) with low < high, got {value_range!r}.")
            value_range = (float(value_range[0]), float(value_range[1]))
        if not value_tolerance >= 0:
            raise ValueError(f"value_tolerance must be >= 0, got {value_tolerance!r}.")
        if not spacing_tolerance >= 0:
            raise ValueError(f"spacing_tolerance must be >= 0, got {spacing_tolerance!r}.")
        self.spatial_dims = int(spatial_dims)
        self.channels = None if channels is None else int(channels)
        self.spacing = _per_axis(spacing, self.spatial_dims, "spacing", float)
        self.spatial_size = _per_axis(spatial_size, self.spatial_dims, "spatial_size", int)
        self.value_range = value_range
        self.value_tolerance = float(value_tolerance)
        self.spacing_tolerance = float(spacing_tolerance)
        self.orientation = None if orientation is None else _check_axcodes(orientation, self.spatial_dims)
        self.on_mismatch = on_mismatch
        self.mode = mode
        self.padding_mode = padding_mode
        # labels=None: codes are read in the MetaTensor's "space" (RAS or LPS), as _axcodes does
        self.resamplers: dict[str, InvertibleTransform] = {}
        if self.orientation is not None:
            self.resamplers["orientation"] = Orientation(axcodes=self.orientation, labels=None)
        if self.spacing is not None:
            self.resamplers["spacing"] = Spacing(pixdim=self.spacing, mode=mode, padding_mode=padding_mode)
        if self.spatial_size is not None:
            self.resamplers["spatial_size"] = ResizeWithPadOrCrop(self.spatial_size)

    def __call__(self, img: Any, mode: str | None = None, padding_mode: str | None = None) -> torch.Tensor:
        """
        Args:
            img: one scan ``(C, *spatial)``, a MetaTensor for the orientation and spacing checks.
            mode: overrides the ``Spacing`` interpolation for this call.
            padding_mode: overrides the ``Spacing`` padding for this call.

        Returns:
            the scan on the model's grid ``(C, *spatial_size)``; the input is not modified.
        """
        if isinstance(img, (str, bytes, os.PathLike)):
            raise TypeError(
                f"ConformScan checks loaded scans, got the path {str(img)!r}: load it first (LoadImage with "
                "ensure_channel_first=True, or LoadSequence(stack=False) for a history)."
            )
        if not isinstance(img, (np.ndarray, torch.Tensor)):
            raise TypeError(f"ConformScan expects a (C, *spatial) array or MetaTensor, got {type(img).__name__}.")
        source = _source(img)
        self._check_shape(img, source)
        self._check_values(img, source)
        has_affine = isinstance(img, MetaTensor)
        needs_affine = [name for name in ("orientation", "spacing") if getattr(self, name) is not None]
        if needs_affine and not has_affine:
            raise ValueError(
                f"{source}: a {type(img).__name__} has no affine, so its {' and '.join(needs_affine)} cannot be "
                "checked; load the scan with LoadImage to keep its header."
            )
        if needs_affine and not get_track_meta():
            raise RuntimeError("ConformScan reads the affine of each step's output: enable monai.data.set_track_meta.")
        out = convert_to_tensor(img, track_meta=get_track_meta())
        if out is img:
            # own metadata and history: recording this transform must not change the caller's scan
            out = MetaTensor(img.as_tensor(), meta=copy.copy(img.meta), applied_operations=list(img.applied_operations))
        orig_size = tuple(int(s) for s in out.shape[1:])
        steps = []
        if self.orientation is not None:
            found = _axcodes(out)
            if found != self.orientation:
                self._mismatch(source, f"orientation {found}", f"orientation {self.orientation}")
                out = self.resamplers["orientation"](out)
                steps.append("orientation")
        if self.spacing is not None:
            found = tuple(float(s) for s in affine_to_spacing(out.affine, r=self.spatial_dims))
            expected = np.asarray(self.spacing)
            if np.any(np.abs(np.asarray(found) - expected) > self.spacing_tolerance * expected):
                self._mismatch(
                    source,
                    f"voxel spacing {_fmt(found)} mm",
                    f"{_fmt(self.spacing)} mm (within {self.spacing_tolerance:.0%})",
                )
                out = self.resamplers["spacing"](
                    out,
                    mode=self.mode if mode is None else mode,
                    padding_mode=self.padding_mode if padding_mode is None else padding_mode,
                )
                steps.append("spacing")
        if self.spatial_size is not None and tuple(out.shape[1:]) != self.spatial_size:
            self._mismatch(
                source,
                f"spatial shape {tuple(int(s) for s in out.shape[1:])}" + (" after resampling" if steps else ""),
                f"{self.spatial_size}",
            )
            out = self.resamplers["spatial_size"](out)
            steps.append("spatial_size")
        if isinstance(out, MetaTensor) and get_track_meta():
            # one entry for the whole check (like ResizeWithPadOrCrop for its crop and pad), so an
            # inverse pops exactly what this call did
            records = [out.applied_operations.pop() for _ in steps][::-1]
            self.push_transform(out, orig_size=orig_size, extra_info={"steps": steps, "records": records})
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        """Undo the resampling steps recorded by :meth:`__call__` (e.g. put a forecast on the scan's grid)."""
        transform = self.pop_transform(data)
        return self.inverse_transform(data, transform)

    def inverse_transform(self, data: torch.Tensor, transform: dict) -> torch.Tensor:
        info = transform[TraceKeys.EXTRA_INFO]
        for step, record in zip(reversed(info["steps"]), reversed(info["records"])):
            data.applied_operations.append(record)
            data = self.resamplers[step].inverse(data)
        return data

    def _check_shape(self, img: Any, source: str) -> None:
        shape = tuple(int(s) for s in img.shape)
        rank = len(shape) - 1
        if rank != self.spatial_dims:
            meta = img.meta if isinstance(img, MetaTensor) else {}
            if rank == self.spatial_dims + 1 and "sequence_filenames" in meta:
                hint = (
                    "this is a stacked history (T, C, *spatial): conform each visit before stacking "
                    "(LoadSequence(stack=False))"
                )
            elif rank == self.spatial_dims - 1:
                hint = "is the channel axis missing? (EnsureChannelFirst)"
            else:
                hint = (
                    f"a {rank}D scan is a different modality or protocol and is not resampled into {self.spatial_dims}D"
                )
            raise ValueError(
                f"{source}: shape {shape} has {rank} spatial dims, the model expects {self.spatial_dims} "
                f"(C, *spatial); {hint}."
            )
        if self.channels is not None and shape[0] != self.channels:
            raise ValueError(
                f"{source}: {shape[0]} channels (shape {shape}), the model expects {self.channels}; a scan with other "
                "channels is another sequence/modality and is not converted."
            )

    def _check_values(self, img: Any, source: str) -> None:
        values = convert_to_tensor(img, track_meta=False)
        if not values.is_floating_point():
            values = values.float()
        finite = torch.isfinite(values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ValueError(
                f"{source}: {bad} of {values.numel()} voxels are NaN or infinite; the model expects finite "
                "intensities (a corrupt or unconverted file?)."
            )
        if self.value_range is None or values.numel() == 0:
            return
        low, high = self.value_range
        margin = self.value_tolerance * (high - low)
        found = (float(values.min()), float(values.max()))
        if found[0] < low - margin or found[1] > high + margin:
            raise ValueError(
                f"{source}: intensities in [{found[0]:.4g}, {found[1]:.4g}], the model expects [{low:g}, {high:g}] "
                f"(accepted [{low - margin:g}, {high + margin:g}]); the intensities look like another modality or a "
                "scan not normalised as in training (e.g. a CT in Hounsfield units): normalise it like the training "
                "data or use a model trained on this kind of scan."
            )

    def _mismatch(self, source: str, found: str, expected: str) -> None:
        if self.on_mismatch == "raise":
            raise ValueError(
                f"{source}: {found}, the model expects {expected} (on_mismatch='raise'; "
                "on_mismatch='resample' resamples it)."
            )


class SelectVisit(Transform):
    """Copy one visit of a history: ``(T, C, *spatial)`` stack or list of ``(C, *spatial)`` -> ``(C, *spatial)``.

    The copy carries the visit's affine and metadata (for a list, the visit's own; for a stack, the
    stack's affine -- the grid every visit is on once registered -- with ``"filename_or_obj"`` set to
    the visit's file when ``"sequence_filenames"`` is there; the per-visit ``"sequence_*"`` entries
    are dropped). The input is not modified. Select before :class:`PadSequence`: ``index`` counts
    slots, and a padding slot is rejected.

    Args:
        index: visit to copy (negative counts from the most recent; ``-1`` is the last prior visit).

    Example::

        reference = SelectVisit(-1)(history)  # (C, H, W), e.g. the fixed image to register the target onto
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, index: int = -1) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an integer, got {index!r}.")
        self.index = int(index)

    def __call__(self, visits: Any) -> torch.Tensor:
        if isinstance(visits, (str, bytes, os.PathLike)):
            raise TypeError(f"SelectVisit expects loaded visits, got the path {str(visits)!r}: load them first.")
        if isinstance(visits, (list, tuple)):
            t = self._slot(len(visits))
            visit = visits[t]
            if not isinstance(visit, (np.ndarray, torch.Tensor)):
                raise TypeError(f"visit {t} is a {type(visit).__name__}, expected a loaded (C, *spatial) scan.")
            if isinstance(visit, MetaTensor):
                return MetaTensor(
                    visit.as_tensor().clone(),
                    meta=copy.deepcopy(dict(visit.meta)),
                    applied_operations=copy.deepcopy(visit.applied_operations),
                )
            return convert_to_tensor(visit, track_meta=get_track_meta()).clone()
        if not isinstance(visits, (np.ndarray, torch.Tensor)):
            raise TypeError(
                f"SelectVisit expects a (T, C, *spatial) array or a list of visits, got {type(visits).__name__}."
            )
        if visits.ndim < 3:
            raise ValueError(f"a stacked history must be (T, C, *spatial), got shape {tuple(visits.shape)}.")
        t = self._slot(int(visits.shape[0]))
        if not isinstance(visits, MetaTensor):
            return convert_to_tensor(visits, track_meta=get_track_meta())[t].clone()
        meta = {k: copy.deepcopy(v) for k, v in visits.meta.items() if k != "affine"}
        names = meta.pop("sequence_filenames", None)
        meta.pop("sequence_affines", None)
        if names is not None:
            if not names[t]:
                raise ValueError(
                    f"visit slot {t} of {len(names)} is padding (no file); select the visit before PadSequence."
                )
            meta["filename_or_obj"] = names[t]
        return MetaTensor(
            visits.as_tensor()[t].clone(),
            affine=visits.affine.clone(),
            meta=meta,
            applied_operations=copy.deepcopy(visits.applied_operations),
        )

    def _slot(self, n: int) -> int:
        if not -n <= self.index < n:
            raise IndexError(f"visit index {self.index} is out of range for a history of {n} visits.")
        return self.index % n


def _per_axis(value: Any, n: int, name: str, cast: type) -> tuple | None:
    """``value`` as ``n`` positive numbers (a scalar is repeated); ``None`` stays ``None``."""
    if value is None:
        return None
    values = tuple(value) if isinstance(value, (Sequence, np.ndarray, torch.Tensor)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"{name} needs one value per spatial dim (spatial_dims={n}), got {value!r}.")
    out = tuple(cast(v) for v in values)
    if any(o <= 0 or o != float(v) for o, v in zip(out, values)):
        raise ValueError(f"{name} must hold positive {cast.__name__}s, got {value!r}.")
    return out


_AXIS_OF_CODE = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}


def _check_axcodes(orientation: str, spatial_dims: int) -> str:
    codes = str(orientation).upper()
    axes = [_AXIS_OF_CODE.get(c) for c in codes]
    if len(codes) != spatial_dims or None in axes or sorted(axes) != list(range(spatial_dims)):
        letters = "one of L/R, P/A" + (", I/S" if spatial_dims == 3 else "")
        raise ValueError(
            f"orientation must be {spatial_dims} axis codes ({letters}, each axis once), got {orientation!r}."
        )
    return codes


def _axcodes(img: MetaTensor) -> str:
    """Orientation codes of a channel-first MetaTensor's affine, read in its ``"space"`` as MONAI's Orientation does."""
    rank = img.ndim - 1
    affine = to_affine_nd(rank, np.asarray(img.affine.detach().cpu(), dtype=np.float64))
    lps = "space" in img.meta and SpaceKeys(img.meta["space"]) == SpaceKeys.LPS
    labels = (("R", "L"), ("A", "P"), ("I", "S")) if lps else (("L", "R"), ("P", "A"), ("I", "S"))
    return "".join(code or "?" for code in nib.orientations.aff2axcodes(affine, labels=labels))


def _source(img: Any) -> str:
    name = img.meta.get("filename_or_obj") if isinstance(img, MetaTensor) else None
    return f"file {str(name)!r}" if name else "scan (no file name in its metadata)"


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
