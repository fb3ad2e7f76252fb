"""Quality control of registrations: metrics per pair, per-modality thresholds, a policy.

Absolute similarity is a poor judge on its own (noise of sigma 0.02 lowers SSIM more than a
2-pixel misalignment; demons can raise mutual information while overlap gets worse), so the
checks combine the gain in NMI/correlation over the unregistered pair, SSIM after registration,
and for deformable results the Jacobian (folding and how unevenly the field compresses). The
thresholds are configuration per modality and can be *calibrated* on pairs known to be good.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms.transform import Transform
from monai.utils import TraceKeys, TransformBackends

from .array import RegistrationError, _as_image, _valid_region, registration_record

__all__ = [
    "DEFAULT_THRESHOLDS",
    "POLICIES",
    "QualityThresholds",
    "RegistrationQuality",
    "RegistrationQualityError",
    "pair_quality",
]

POLICIES = ("warn", "flag", "raise", "drop")


class RegistrationQualityError(ValueError):
    """A registration failed quality control under ``policy="raise"``."""


@dataclass(frozen=True)
class QualityThresholds:
    """Pass/fail limits; ``None`` disables a check.

    Attributes:
        min_nmi_gain: NMI after minus NMI before registration.
        min_nmi: NMI after registration (Studholme, 1 = independent, 2 = identical information).
        min_correlation: Pearson correlation after registration.
        min_ssim: mean SSIM after registration.
        max_folding: share of voxels with Jacobian determinant <= 0 (deformable results only).
        max_log_jacobian_std: spread of log det J (deformable results only).
    """

    min_nmi_gain: float | None = None
    min_nmi: float | None = None
    min_correlation: float | None = None
    min_ssim: float | None = None
    max_folding: float | None = 0.0
    max_log_jacobian_std: float | None = None

    def failures(self, metrics: Mapping[str, float]) -> list[str]:
        """Human-readable reasons ``metrics`` fails (empty when it passes)."""
        checks = [
            ("nmi_gain", self.min_nmi_gain, "min"),
            ("nmi_after", self.min_nmi, "min"),
            ("correlation_after", self.min_correlation, "min"),
            ("ssim", self.min_ssim, "min"),
            ("folding", self.max_folding, "max"),
            ("log_jacobian_std", self.max_log_jacobian_std, "max"),
        ]
        reasons = []
        for name, limit, kind in checks:
            value = metrics.get(name)
            if limit is None or value is None:
                continue
            if not math.isfinite(value):
                reasons.append(f"{name} is {value}")
            elif kind == "min" and value < limit:
                reasons.append(f"{name} {value:.4f} < {limit:.4f}")
            elif kind == "max" and value > limit:
                reasons.append(f"{name} {value:.4f} > {limit:.4f}")
        return reasons

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)


# Starting points, to be replaced by calibrate() on each site's known-good pairs. The SSIM floor
# for mammograms follows the seed paper's 0.80; folding is never acceptable.
DEFAULT_THRESHOLDS: dict[str, QualityThresholds] = {
    "mammography": QualityThresholds(min_nmi_gain=-0.01, min_ssim=0.80, max_folding=0.0),
    "mri": QualityThresholds(min_nmi_gain=-0.01, min_nmi=1.1, min_correlation=0.5, max_folding=0.0),
    "generic": QualityThresholds(min_nmi_gain=-0.01, max_folding=0.0),
}


def _fixed_channel(fixed: torch.Tensor, channel: int | None) -> np.ndarray:
    f = fixed.float()
    return (f.mean(0) if channel is None else f[channel]).numpy()


def pair_quality(
    registered: torch.Tensor,
    fixed: torch.Tensor,
    record: Mapping[str, Any],
    channel: int | None = 0,
    data_range: float | None = None,
) -> dict[str, float]:
    """Quality metrics of one registered pair.

    Args:
        registered: ``(C, *spatial)`` moving image after registration (fixed grid).
        fixed: ``(C', *spatial)`` reference image.
        record: the pair's registration record (:func:`~.array.registration_record`); supplies the
            metrics before registration, the field of view and the deformable displacement.
        channel: channel compared (``None``: channel mean).
        data_range: SSIM's intensity range; default the fixed image's.

    Returns:
        ``nmi_before``, ``nmi_after``, ``nmi_gain``, ``correlation_before``, ``correlation_after``,
        ``correlation_gain``, ``ssim``, ``overlap`` (share of the fixed grid the moving image
        covers) and, for a deformable result, ``folding`` and ``log_jacobian_std``; ``failed`` (1.0)
        when the engine itself failed.
    """
    from monai_twin.metrics import (
        correlation,
        folding_fraction,
        log_jacobian_std,
        normalized_mutual_information,
        ssim,
    )

    reg = registered.float()
    reg = (reg.mean(0) if channel is None else reg[channel]).numpy()
    fix = _fixed_channel(fixed, channel)
    if reg.shape != fix.shape:
        raise ValueError(f"registered image {reg.shape} and fixed image {fix.shape} must share the fixed grid.")
    valid = _valid_region(
        record["src_shape"],
        record["src_affine"],
        record["dst_affine"],
        record["dst_shape"],
        record["matrix"],
        record["displacement"],
    ).numpy()
    metrics: dict[str, float] = {"overlap": float(valid.mean()), "failed": 1.0 if record.get("failed") else 0.0}
    if not np.isfinite(reg).all():
        raise RegistrationError("the registered image contains NaN or infinite values.")
    if valid.sum() < 16:
        metrics.update(nmi_after=float("nan"), correlation_after=float("nan"), ssim=float("nan"))
    else:
        metrics["nmi_after"] = normalized_mutual_information(reg, fix, mask=valid)
        metrics["correlation_after"] = correlation(reg, fix, mask=valid)
        if data_range is None:
            data_range = float(fix.max() - fix.min()) or 1.0
        try:
            metrics["ssim"] = ssim(reg, fix, data_range=data_range, mask=valid)
        except ValueError:  # e.g. an image smaller than the SSIM window or no voxel away from the border
            metrics["ssim"] = float("nan")
    for name in ("nmi", "correlation"):
        before = record.get(f"{name}_before")
        if before is not None:
            metrics[f"{name}_before"] = float(before)
            metrics[f"{name}_gain"] = metrics[f"{name}_after"] - float(before)
    if record.get("displacement") is not None:
        disp = torch.as_tensor(record["displacement"])
        affine = torch.as_tensor(record["dst_affine"], dtype=torch.float64)
        ndim = disp.shape[0]
        spacing = torch.linalg.norm(affine[:ndim, :ndim], dim=0).tolist()
        metrics["folding"] = folding_fraction(disp.numpy(), spacing=spacing)
        metrics["log_jacobian_std"] = log_jacobian_std(disp.numpy(), spacing=spacing)
    return metrics


class RegistrationQuality(Transform):
    """Measure a registration and apply a policy when it fails the thresholds.

    Works on the output of :class:`~.array.Register` (pass ``fixed``) and of
    :class:`~.array.RegisterSequence` (the reference visit inside the stack is the fixed image).
    The metrics go to ``img.meta["registration_quality"]`` (a dict for a pair, a list per visit
    for a sequence, each with ``passed`` and ``reasons``).

    Policies for a failing pair or visit:

    * ``"warn"``: a ``UserWarning`` naming the visit and the reasons; the image passes through.
    * ``"flag"``: only the metadata says ``passed=False`` (downstream code decides).
    * ``"raise"``: :class:`RegistrationQualityError`.
    * ``"drop"`` (sequences): failing visits are removed from the stack; ``meta["kept_visits"]``
      lists the original indices kept (the reference is never dropped) and
      ``meta["dropped_visits"]`` maps each dropped index to its reasons. For a pair, ``"drop"``
      raises, as there is nothing left to return.

    A visit whose engine failed (``Register(on_error="identity")``) always fails.

    Args:
        thresholds: a :class:`QualityThresholds`, a dict of its fields, or a modality name from
            :data:`DEFAULT_THRESHOLDS` (``"mammography"``, ``"mri"``, ``"generic"``).
        policy: one of :data:`POLICIES`.
        channel: channel compared (``None``: channel mean).
        data_range: SSIM intensity range; default each fixed image's range.

    Example::

        qc = RegistrationQuality("mammography", policy="flag")
        qc.calibrate([(registered, fixed) for registered, fixed in good_pairs])
        checked = qc(registered, fixed)
        checked.meta["registration_quality"]["passed"]
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        thresholds: QualityThresholds | Mapping[str, float | None] | str = "generic",
        policy: str = "flag",
        channel: int | None = 0,
        data_range: float | None = None,
    ) -> None:
        if isinstance(thresholds, str):
            if thresholds not in DEFAULT_THRESHOLDS:
                raise ValueError(f"unknown modality {thresholds!r}; expected one of {sorted(DEFAULT_THRESHOLDS)}.")
            thresholds = DEFAULT_THRESHOLDS[thresholds]
        elif isinstance(thresholds, Mapping):
            known = {f.name for f in fields(QualityThresholds)}
            extra = set(thresholds) - known
            if extra:
                raise ValueError(f"unknown threshold(s) {sorted(extra)}; expected names from {sorted(known)}.")
            thresholds = QualityThresholds(**thresholds)
        elif not isinstance(thresholds, QualityThresholds):
            raise TypeError(
                f"thresholds must be QualityThresholds, a dict or a modality name, got {type(thresholds).__name__}."
            )
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
        self.thresholds = thresholds
        self.policy = policy
        self.channel = channel
        self.data_range = data_range

    def measure(self, img: MetaTensor, fixed: Any = None) -> dict[str, float] | list[dict[str, float]]:
        """Metrics of a registered pair (a dict) or sequence (a list per visit), no policy applied."""
        img = _as_image(img, "registered image") if not isinstance(img, MetaTensor) else img
        record = registration_record(img)
        if "visits" in record:
            ref = record["reference"]
            stack = img.as_tensor()
            out = []
            for t, rec in enumerate(record["visits"]):
                if t == ref:
                    out.append({"reference": 1.0})
                    continue
                out.append(pair_quality(stack[t], stack[ref], rec, self.channel, self.data_range))
            return out
        if fixed is None:
            raise ValueError("fixed is required to check a pairwise registration (the reference image).")
        fixed = _as_image(fixed, "fixed image")
        return pair_quality(img.as_tensor(), fixed.as_tensor(), record, self.channel, self.data_range)

    def _judge(self, metrics: dict[str, float]) -> dict[str, Any]:
        if metrics.get("reference"):
            return {**metrics, "passed": True, "reasons": []}
        reasons = self.thresholds.failures(metrics)
        if metrics.get("failed"):
            reasons.insert(0, "the registration engine failed")
        for name in ("nmi_after", "correlation_after", "ssim"):
            if name in metrics and not math.isfinite(metrics[name]) and name not in " ".join(reasons):
                reasons.append(f"{name} could not be computed (no overlap with the reference)")
        return {**metrics, "passed": not reasons, "reasons": reasons}

    def __call__(self, img: MetaTensor, fixed: Any = None) -> MetaTensor:
        """
        Args:
            img: registered image ``(C, *spatial)`` or registered sequence ``(T, C, *spatial)``.
            fixed: the reference image for a pair; ignored for a sequence.

        Returns:
            ``img`` with ``meta["registration_quality"]`` set (and failing visits removed under
            ``"drop"``). The input is not modified.
        """
        measured = self.measure(img, fixed)
        out = img.clone()
        out.meta = dict(img.meta)
        if isinstance(measured, dict):
            verdict = self._judge(measured)
            out.meta["registration_quality"] = verdict
            if not verdict["passed"]:
                self._act("registration", verdict["reasons"], droppable=False)
            return out
        verdicts = [self._judge(m) for m in measured]
        out.meta["registration_quality"] = verdicts
        failing = [t for t, v in enumerate(verdicts) if not v["passed"]]
        for t in failing:
            self._act(f"visit {t}", verdicts[t]["reasons"], droppable=True)
        if self.policy == "drop":
            keep = [t for t in range(len(verdicts)) if t not in failing]
            out = _select_visits(out, keep)
            out.meta["kept_visits"] = keep
            out.meta["dropped_visits"] = {t: verdicts[t]["reasons"] for t in failing}
        return out

    def _act(self, what: str, reasons: Sequence[str], droppable: bool) -> None:
        message = f"{what} failed registration quality control: {'; '.join(reasons)}"
        if self.policy == "warn":
            warnings.warn(message, UserWarning, stacklevel=3)
        elif self.policy == "raise" or (self.policy == "drop" and not droppable):
            suffix = "" if self.policy == "raise" else " (policy 'drop' applies to sequences only)"
            raise RegistrationQualityError(message + suffix)

    def calibrate(
        self,
        pairs: Iterable[tuple[MetaTensor, Any]] | Iterable[Mapping[str, float]],
        quantile: float = 0.05,
        slack: float = 0.5,
    ) -> QualityThresholds:
        """Set the thresholds from registrations known to be good.

        Each lower limit becomes the ``quantile`` of the good values minus ``slack`` times their
        standard deviation; each upper limit the ``1 - quantile`` plus the same margin (folding
        keeps at least 0). Checks disabled (``None``) stay disabled.

        Args:
            pairs: ``(registered, fixed)`` tuples (``fixed`` ignored for sequences) or metric dicts
                from :meth:`measure`.
            quantile: tail share of the good pairs allowed to sit beyond the limit before slack.
            slack: margin in standard deviations of the good values.

        Returns:
            the new thresholds (also stored on the transform).
        """
        rows: list[Mapping[str, float]] = []
        for item in pairs:
            if isinstance(item, Mapping):
                rows.append(item)
                continue
            measured = self.measure(*item)
            rows.extend(m for m in (measured if isinstance(measured, list) else [measured]) if not m.get("reference"))
        if len(rows) < 2:
            raise ValueError(f"calibrate needs at least 2 known-good pairs, got {len(rows)}.")
        names = {
            "min_nmi_gain": ("nmi_gain", "min"),
            "min_nmi": ("nmi_after", "min"),
            "min_correlation": ("correlation_after", "min"),
            "min_ssim": ("ssim", "min"),
            "max_folding": ("folding", "max"),
            "max_log_jacobian_std": ("log_jacobian_std", "max"),
        }
        updates: dict[str, float | None] = {}
        for field_name, (metric, kind) in names.items():
            if getattr(self.thresholds, field_name) is None:
                continue
            values = np.asarray([r[metric] for r in rows if metric in r and math.isfinite(r[metric])], dtype=float)
            if values.size == 0:
                continue
            spread = float(values.std())
            if kind == "min":
                updates[field_name] = float(np.quantile(values, quantile)) - slack * spread
            else:
                updates[field_name] = max(0.0, float(np.quantile(values, 1.0 - quantile)) + slack * spread)
        self.thresholds = replace(self.thresholds, **updates)
        return self.thresholds


def _select_visits(img: MetaTensor, keep: Sequence[int]) -> MetaTensor:
    """Keep some visits of a registered sequence, and their records, consistently."""
    out = MetaTensor(img.as_tensor()[list(keep)], meta=dict(img.meta))
    ops = [dict(op) for op in img.applied_operations]
    for op in reversed(ops):
        if op.get(TraceKeys.CLASS_NAME) == "RegisterSequence":
            info = dict(op[TraceKeys.EXTRA_INFO])
            ref = info["reference"]
            info["visits"] = [info["visits"][t] for t in keep]
            info["reference"] = list(keep).index(ref)
            op[TraceKeys.EXTRA_INFO] = info
            break
    out.applied_operations = ops
    if "registration_quality" in img.meta:
        out.meta["registration_quality"] = [img.meta["registration_quality"][t] for t in keep]
    return out
