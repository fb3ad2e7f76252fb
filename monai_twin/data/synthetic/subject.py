"""What the simulators share: the subject plan, dose schedules, measurements and NIfTI writing.

A :class:`SyntheticSubject` is a *plan*: static attributes, visit days, the drug schedule, when
each lab is measured (with its noise draw), the per-visit acquisitions and the latent biology
(growth or atrophy rates, anatomy seeds). Images, truth values and measured labs are functions
of the plan, so the same subject can be re-run under an edited drug schedule with everything else
-- anatomy, acquisitions, noise -- held fixed (:func:`~monai_twin.data.synthetic.resimulate`).

Time is counted in days since the subject's first visit (day 0); the subject's ``origin`` turns
days into dates when tables are written.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..events import running_dose
from .acquisition import AcquisitionTransform

__all__ = [
    "DoseSchedule",
    "LabPlan",
    "SyntheticSubject",
    "SyntheticVisits",
    "build_events",
    "days_to_datetimes",
    "sample_dose_schedule",
    "sample_lab_plan",
    "sample_visit_days",
    "schedule_from_events",
    "write_nifti_deterministic",
]

_MINUTES_PER_DAY = 1440.0


@dataclass(frozen=True)
class DoseSchedule:
    """A piecewise-constant daily dose: from ``days[k]`` on, the dose is ``doses[k]`` (0 = stopped).

    Before the first change the dose is 0. Exposure before day 0 (the first visit) is not
    modelled: a change dated earlier takes effect at day 0.

    Attributes:
        days: change times, shape ``(K,)``, days since the first visit, non-decreasing.
        doses: the new daily dose at each change, shape ``(K,)``, mg/day, >= 0.
    """

    days: np.ndarray
    doses: np.ndarray

    def __post_init__(self) -> None:
        days = np.asarray(self.days, dtype=np.float64).reshape(-1)
        doses = np.asarray(self.doses, dtype=np.float64).reshape(-1)
        if days.shape != doses.shape:
            raise ValueError(f"days {days.shape} and doses {doses.shape} must have the same length.")
        if np.any(~np.isfinite(days)) or np.any(~np.isfinite(doses)):
            raise ValueError("dose schedule days and doses must be finite.")
        if np.any(doses < 0):
            raise ValueError(f"doses must be >= 0 mg/day, got {doses[doses < 0][:5]}.")
        order = np.argsort(days, kind="stable")
        object.__setattr__(self, "days", np.maximum(days[order], 0.0))
        object.__setattr__(self, "doses", doses[order])

    def segments(self, horizon: float) -> tuple[np.ndarray, np.ndarray]:
        """Segment starts (``(S,)``, first is 0) and the constant dose on each, up to ``horizon`` days."""
        starts = np.concatenate([[0.0], self.days[self.days < horizon]]) if horizon > 0 else np.zeros(1)
        doses = np.concatenate([[0.0], self.doses[self.days < horizon]]) if horizon > 0 else np.zeros(1)
        # several changes on one day: the last one stands
        keep = np.append(starts[1:] != starts[:-1], True)
        return starts[keep], doses[keep]

    def dose_at(self, days: np.ndarray) -> np.ndarray:
        """Daily dose in force at each time (mg/day)."""
        days = np.asarray(days, dtype=np.float64)
        idx = np.searchsorted(self.days, days, side="right") - 1
        return np.where(idx >= 0, self.doses[np.clip(idx, 0, None)] if len(self.doses) else 0.0, 0.0)

    def exposure(self, days: np.ndarray) -> np.ndarray:
        """Cumulative exposure ``integral_0^t dose`` (mg x days) at each time."""
        days = np.asarray(days, dtype=np.float64)
        horizon = float(np.max(days, initial=0.0)) + 1.0
        starts, doses = self.segments(horizon)
        ends = np.append(starts[1:], np.inf)
        at_start = np.concatenate([[0.0], np.cumsum(doses[:-1] * (ends[:-1] - starts[:-1]))])
        k = np.clip(np.searchsorted(starts, days, side="right") - 1, 0, None)
        return at_start[k] + doses[k] * np.clip(days - starts[k], 0.0, None)

    def scaled(self, factor: float) -> DoseSchedule:
        """The same schedule with every dose multiplied by ``factor`` (a what-if helper)."""
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}.")
        return DoseSchedule(self.days.copy(), self.doses * float(factor))


@dataclass(frozen=True)
class LabPlan:
    """When one lab or score is measured and the standard-normal draw of each measurement's noise.

    Attributes:
        code: event code (``LAB//CA15-3``).
        unit: unit written to the events table.
        days: measurement times, shape ``(L,)``, days since the first visit.
        z: noise draws, shape ``(L,)``.
    """

    code: str
    unit: str
    days: np.ndarray
    z: np.ndarray


@dataclass
class SyntheticSubject:
    """One simulated subject: everything that is fixed whatever the drug schedule.

    Attributes:
        kind: ``"mammo2d"`` or ``"mri_roi3d"``.
        subject_id: the id written to the tables.
        index: position in the cohort (seeds its random streams together with ``seed``).
        seed: the cohort seed.
        config: the simulator configuration (``Mammo2DConfig`` / ``MRIROI3DConfig``).
        origin: the first visit's date and time (day 0).
        visit_days: shape ``(T,)``, days since the first visit.
        static: static attributes written to the ``static`` table.
        latent: hidden biology (rates, carrying capacity, anatomy seeds, ...), the simulator's truth.
        schedule: the drug schedule as recorded in the EHR.
        labs: measurement plans of the labs/scores.
        acquisitions: one :class:`AcquisitionTransform` per visit.
    """

    kind: str
    subject_id: str
    index: int
    seed: int
    config: Any
    origin: pd.Timestamp
    visit_days: np.ndarray
    static: dict[str, Any]
    latent: dict[str, Any]
    schedule: DoseSchedule
    labs: tuple[LabPlan, ...]
    acquisitions: tuple[AcquisitionTransform, ...]
    drug_code: str = ""
    drug_unit: str = "mg/day"
    _anatomy_cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def n_visits(self) -> int:
        return len(self.visit_days)

    def dates(self, days: np.ndarray | None = None) -> pd.DatetimeIndex:
        """Dates of ``days`` (default: the visits), to the minute."""
        return days_to_datetimes(self.origin, self.visit_days if days is None else days)

    def to_days(self, when: Any) -> np.ndarray:
        """Datetimes (or numbers of days, passed through) as days since the first visit."""
        values = pd.Series(when) if not isinstance(when, pd.Series) else when
        if pd.api.types.is_numeric_dtype(values.dtype):
            return values.to_numpy(dtype=np.float64, copy=True)
        stamps = pd.to_datetime(values)
        return np.asarray((stamps - self.origin) / pd.Timedelta(days=1), dtype=np.float64)


@dataclass
class SyntheticVisits:
    """What one (re-)simulation of a subject produced, one entry per visit.

    Attributes:
        days: shape ``(T,)``, days since the first visit.
        images: acquired images, shape ``(T, *spatial)`` float32 (what the scanner recorded).
        aligned: noise-free aligned renders, shape ``(T, *spatial)`` float32.
        masks: label maps in the acquired frame, shape ``(T, *spatial)`` uint8.
        truth: one row per visit of true quantities (see the simulator modules).
        events: the EHR events table under this schedule (dose changes and measured labs).
    """

    days: np.ndarray
    images: np.ndarray
    aligned: np.ndarray
    masks: np.ndarray
    truth: pd.DataFrame
    events: pd.DataFrame


# ------------------------------------------------------------------------------------------------
# sampling helpers shared by the simulators


def _round_minutes(days: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(days, dtype=np.float64) * _MINUTES_PER_DAY) / _MINUTES_PER_DAY


def days_to_datetimes(origin: pd.Timestamp, days: np.ndarray) -> pd.DatetimeIndex:
    """``origin + days``, rounded to whole minutes (as a clinical record would hold them)."""
    minutes = np.round(np.asarray(days, dtype=np.float64) * _MINUTES_PER_DAY).astype(np.int64)
    return pd.DatetimeIndex(origin + pd.to_timedelta(minutes, unit="min")).as_unit("us")


def sample_visit_days(
    rng: np.random.Generator, visits: tuple[int, int], mean_gap_days: float, min_gap_days: float
) -> tuple[np.ndarray, int]:
    """Irregular visit days: ``visits[0]..visits[1]`` visits, gamma-distributed gaps, clinic hours.

    Returns:
        shape ``(T,)`` float64 days since the first visit (day 0), each at a time of day between
        08:00 and 17:00 to the minute, and the first visit's time of day in minutes after midnight
        (the origin's clock, which later times are relative to).
    """
    low, high = visits
    if low < 2 or high < low:
        raise ValueError(f"visits must be (low, high) with 2 <= low <= high, got {visits}.")
    if mean_gap_days <= min_gap_days or min_gap_days <= 0:
        raise ValueError(f"need 0 < min_gap_days < mean_gap_days, got {min_gap_days} and {mean_gap_days}.")
    n = int(rng.integers(low, high + 1))
    shape = 3.0  # gamma with shape 3: gaps cluster around the mean but vary by months
    gaps = min_gap_days + rng.gamma(shape, (mean_gap_days - min_gap_days) / shape, n - 1)
    whole_days = np.concatenate([[0.0], np.cumsum(np.round(gaps))])
    clock = rng.integers(8 * 60, 17 * 60, n) / _MINUTES_PER_DAY
    days = whole_days + clock - clock[0]
    return _round_minutes(days), int(round(clock[0] * _MINUTES_PER_DAY))


def sample_dose_schedule(
    rng: np.random.Generator,
    visit_days: np.ndarray,
    treated_probability: float,
    dose_levels: Sequence[float],
    change_probability: float = 0.3,
) -> DoseSchedule:
    """A realistic drug history: maybe a start, dose changes and stops at times between visits.

    A treated subject starts at a visit or inside the first interval; in each later interval the
    dose changes (to another level or to 0 = stop, then possibly a restart) with probability
    ``change_probability``, at a time of its own.
    """
    if not 0.0 <= treated_probability <= 1.0:
        raise ValueError(f"treated_probability must be in [0, 1], got {treated_probability}.")
    levels = np.asarray(dose_levels, dtype=np.float64)
    if levels.size == 0 or np.any(levels <= 0):
        raise ValueError(f"dose_levels must be positive mg/day values, got {tuple(dose_levels)}.")
    treated = rng.random() < treated_probability
    # draws are made whether or not the subject is treated, so later streams do not depend on it
    start_at_visit = rng.random() < 0.4
    start_frac = rng.uniform(0.1, 0.9)
    start_level = rng.choice(levels)
    n_int = len(visit_days) - 1
    change = rng.random(n_int) < change_probability
    change_frac = rng.uniform(0.1, 0.9, n_int)
    change_to = rng.integers(0, levels.size + 1, n_int)  # 0 = stop
    if not treated or n_int < 1:
        return DoseSchedule(np.zeros(0), np.zeros(0))
    first_gap = visit_days[1] - visit_days[0]
    start = 0.0 + 2.0 / 24 if start_at_visit else start_frac * first_gap
    days, doses = [start], [float(start_level)]
    for k in range(1, n_int):
        if change[k]:
            t = visit_days[k] + change_frac[k] * (visit_days[k + 1] - visit_days[k])
            new = 0.0 if change_to[k] == 0 else float(levels[change_to[k] - 1])
            if new != doses[-1]:
                days.append(t)
                doses.append(new)
    return DoseSchedule(_round_minutes(np.asarray(days)), np.asarray(doses))


def sample_lab_plan(
    rng: np.random.Generator,
    code: str,
    unit: str,
    visit_days: np.ndarray,
    at_visit_probability: float,
    extra_per_interval: float,
    origin_clock_minutes: int = 0,
) -> LabPlan:
    """Measurement times of one lab: about an hour after most visits, plus some of its own.

    Args:
        rng: the generator.
        code: event code.
        unit: unit string.
        visit_days: ``(T,)`` visit days.
        at_visit_probability: chance that the lab is measured at a visit (the rest are missing).
        extra_per_interval: mean number (Poisson) of measurements at their own times per interval.
        origin_clock_minutes: time of day of day 0, so own-time measurements fall in clinic hours.
    """
    n = len(visit_days)
    present = rng.random(n) < at_visit_probability
    offset = rng.integers(30, 180, n) / _MINUTES_PER_DAY  # 30 min to 3 h after the scan
    at_visit = (visit_days + offset)[present]
    counts = rng.poisson(extra_per_interval, n - 1)
    fracs = rng.uniform(0.05, 0.95, int(counts.sum()))
    starts = np.repeat(visit_days[:-1], counts)
    lengths = np.repeat(np.diff(visit_days), counts)
    clock = (rng.integers(8 * 60, 18 * 60, fracs.size) - origin_clock_minutes) / _MINUTES_PER_DAY
    extra = np.floor(starts + fracs * lengths) + clock
    days = _round_minutes(np.sort(np.concatenate([at_visit, extra])))
    return LabPlan(code=code, unit=unit, days=days, z=rng.standard_normal(days.size))


START, STOP = "//START", "//STOP"


def _exposure_rows(code: str, schedule: DoseSchedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A dose schedule as ``<code>//STOP`` (old dose) / ``<code>//START`` (new dose) events."""
    previous = np.concatenate([[0.0], schedule.doses[:-1]])
    days, codes, doses = [], [], []
    for day, old, new in zip(schedule.days, previous, schedule.doses):
        if old == new:
            continue
        if old > 0:
            days.append(day), codes.append(code + STOP), doses.append(old)
        if new > 0:
            days.append(day), codes.append(code + START), doses.append(new)
    return np.asarray(days, dtype=np.float64), np.asarray(codes, dtype=object), np.asarray(doses, dtype=np.float64)


def build_events(subject: SyntheticSubject, schedule: DoseSchedule, measured: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The events table of one subject: the drug as start/stop events and the measured labs, by time.

    The drug follows the exposure convention of the EHR transforms (and of the MIMIC loader): a
    dose change from ``a`` to ``b`` mg/day is ``<drug>//STOP`` with value ``a`` and
    ``<drug>//START`` with value ``b`` at the same time; a first start has no stop, a final stop
    no start.

    Args:
        subject: the subject.
        schedule: the drug schedule to record.
        measured: measured values per lab code, aligned with that lab plan's ``days``.
    """
    drug_days, drug_codes, drug_doses = _exposure_rows(subject.drug_code, schedule)
    times = [drug_days]
    codes = [drug_codes]
    values = [drug_doses]
    units = [np.full(len(drug_days), subject.drug_unit, dtype=object)]
    for plan in subject.labs:
        times.append(plan.days)
        codes.append(np.full(len(plan.days), plan.code, dtype=object))
        values.append(np.asarray(measured[plan.code], dtype=np.float64))
        units.append(np.full(len(plan.days), plan.unit, dtype=object))
    days = np.concatenate(times)
    frame = pd.DataFrame(
        {
            "subject_id": pd.Series([subject.subject_id] * len(days), dtype="string"),
            "time": subject.dates(days),
            "code": pd.Series(np.concatenate(codes), dtype="string"),
            "numeric_value": np.concatenate(values).astype(np.float64),
            "unit": pd.Series(np.concatenate(units), dtype="string"),
        }
    )
    return frame.sort_values(["time", "code"], kind="stable").reset_index(drop=True)


def schedule_from_events(subject: SyntheticSubject, events: pd.DataFrame | None) -> DoseSchedule:
    """The drug schedule held in an events table.

    The drug may be written either way (not both in one table):

    * ``<drug>//START`` / ``<drug>//STOP`` events with the daily dose as value -- what
      :func:`build_events` writes and :func:`~monai_twin.data.edit_events` edits;
    * rows with the bare drug code, each the new daily dose from its time on (0 = stop) -- handy
      for writing a schedule by hand.

    ``time`` may hold datetimes or numbers of days since the first visit. Rows of other codes
    (measurements) do not change the biology and are ignored; a table without drug rows means
    never treated.
    """
    if events is None:
        return subject.schedule
    if not isinstance(events, pd.DataFrame):
        raise TypeError(f"edited_events must be a pandas DataFrame, got {type(events)!r}.")
    missing = [c for c in ("time", "code", "numeric_value") if c not in events.columns]
    if missing:
        raise ValueError(f"edited_events is missing column(s) {missing}; expected time, code, numeric_value.")
    code = events["code"].astype("string")
    drug = subject.drug_code
    bare = (code == drug).fillna(False).to_numpy(dtype=bool)
    paired = code.isin([drug + START, drug + STOP]).fillna(False).to_numpy(dtype=bool)
    if bare.any() and paired.any():
        raise ValueError(
            f"edited_events mixes bare {drug!r} rows with {drug + START!r}/{drug + STOP!r} rows; use one form."
        )
    rows = events[bare | paired]
    if "subject_id" in rows.columns:
        other = rows["subject_id"].astype("string") != subject.subject_id
        if other.any():
            raise ValueError(
                f"edited_events holds rows of subject(s) {sorted(set(rows['subject_id'][other]))[:5]}, "
                f"expected only {subject.subject_id!r}."
            )
    doses = rows["numeric_value"].to_numpy(dtype=np.float64, copy=True)
    if np.any(np.isnan(doses)):
        raise ValueError(f"edited_events: {drug} rows need a numeric_value (dose in mg/day).")
    days = subject.to_days(rows["time"])
    if bare.any():
        return DoseSchedule(days, doses)
    change_days, level = running_dose(
        {"time": days, "code": rows["code"].astype(str).to_numpy(dtype=object), "numeric_value": doses}, drug
    )
    return DoseSchedule(change_days, level)


# ------------------------------------------------------------------------------------------------
# writing


def write_nifti_deterministic(
    path: str | os.PathLike,
    array: np.ndarray,
    spacing: Sequence[float],
    dtype: type | np.dtype,
    intent: str | None = None,
    quantum: float | None = None,
) -> Path:
    """Write a NIfTI-1 file whose bytes depend only on the data (no timestamps).

    ``nibabel`` writes ``.nii.gz`` through :mod:`gzip`, which stamps the current time into the
    stream; here the uncompressed bytes are compressed with ``mtime=0`` instead, so the same
    array always gives the same file. Float data stored as an integer ``dtype`` get nibabel's
    automatic ``scl_slope``/``scl_inter`` (readers return the scaled floats). The file is written
    to a temporary name and renamed into place.

    Args:
        path: destination, ``.nii`` or ``.nii.gz``.
        array: the data, spatial axes first (a vector field is ``(*spatial, 1, ncomp)`` for 3D).
        spacing: voxel size in mm along the spatial axes.
        dtype: on-disk data type.
        intent: NIfTI intent name (e.g. ``"vector"`` for a displacement field).
        quantum: store ``round(array / quantum)`` with ``scl_slope = quantum`` instead of
            nibabel's automatic scaling: a fixed step (e.g. 1/4000 of the intensity range, like a
            12-bit detector) keeps noise out of the low bits, so files compress several times better.
    """
    import nibabel as nib

    from ...utils.io import atomic_output_path

    spacing = [float(s) for s in spacing]
    affine = np.diag([*spacing, *([1.0] * (3 - len(spacing))), 1.0])
    if quantum is None:
        image = nib.Nifti1Image(np.asarray(array), affine)
        image.set_data_dtype(dtype)
    else:
        if quantum <= 0:
            raise ValueError(f"quantum must be > 0, got {quantum}.")
        info = np.iinfo(dtype)
        steps = np.round(np.asarray(array, dtype=np.float64) / quantum)
        if steps.size and (steps.min() < info.min or steps.max() > info.max):
            raise ValueError(
                f"{path}: values exceed {np.dtype(dtype).name} at quantum {quantum}; use a larger quantum."
            )
        image = nib.Nifti1Image(steps.astype(dtype), affine)
        image.header.set_slope_inter(quantum, 0.0)
    image.header.set_xyzt_units("mm", "sec")
    if intent is not None:
        image.header.set_intent(intent)
    raw = image.to_bytes()
    path = Path(path)
    # noisy 16-bit data barely compress beyond level 1; small-integer label maps gain from level 6
    level = 6 if np.dtype(dtype).itemsize == 1 else 1
    data = gzip.compress(raw, compresslevel=level, mtime=0) if path.name.endswith(".gz") else raw
    with atomic_output_path(path) as tmp:
        tmp.write_bytes(data)
    return path
