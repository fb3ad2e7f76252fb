"""``LongitudinalDataset``: one item per (subject, target visit) with that visit's history.

Built on :class:`monai.data.Dataset`; the item list (:func:`build_longitudinal_items`) is plain
Python data, so it also feeds :class:`monai.data.CacheDataset` / :class:`monai.data.PersistentDataset`
and DataLoader workers unchanged. Splits are by subject (:func:`split_subjects`), so no subject
ever appears in two sections.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from monai.data import Dataset
from monai.data.utils import list_data_collate

from .manifest import LongitudinalManifest

__all__ = [
    "SECTIONS",
    "LongitudinalDataset",
    "build_longitudinal_items",
    "collate_longitudinal",
    "forecast_item",
    "split_subjects",
]

#: Section names, as in MONAI's ``DecathlonDataset``.
SECTIONS = ("training", "validation", "test")


def split_subjects(
    subject_ids: Sequence[str], fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[str]]:
    """Deterministic subject-level split into ``training`` / ``validation`` / ``test``.

    Subjects are ranked by a SHA-256 hash of ``f"{seed}:{subject_id}"`` -- independent of the
    order they are listed in, of Python's hash seed and of the platform -- and cut into sections
    whose sizes follow ``fractions`` (largest-remainder rounding, so the counts add up exactly).
    Every subject lands in exactly one section: no subject leaks between them.

    Args:
        subject_ids: the subjects to split (duplicates are an error).
        fractions: three non-negative fractions summing to 1.
        seed: changes the assignment.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each list sorted.

    Example::

        >>> split = split_subjects([f"s{i}" for i in range(10)], (0.6, 0.2, 0.2), seed=1)
        >>> [len(split[k]) for k in ("training", "validation", "test")]
        [6, 2, 2]
    """
    ids = [str(s) for s in subject_ids]
    if len(set(ids)) != len(ids):
        dup = sorted({s for s in ids if ids.count(s) > 1})
        raise ValueError(f"split_subjects: duplicate subject ids {dup[:10]}.")
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.shape != (3,) or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {tuple(fractions)}.")
    ranked = sorted(ids, key=lambda s: hashlib.sha256(f"{seed}:{s}".encode()).hexdigest())
    exact = fr * len(ranked)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: len(ranked) - counts.sum()]:
        counts[i] += 1
    bounds = np.cumsum(counts)
    parts = (ranked[: bounds[0]], ranked[bounds[0] : bounds[1]], ranked[bounds[1] :])
    return {name: sorted(part) for name, part in zip(SECTIONS, parts)}


def _event_columns(manifest: LongitudinalManifest) -> dict[str, np.ndarray]:
    """The events table as arrays, converted once per item list."""
    ev = manifest.events
    return {
        "time": ev["time"].to_numpy(dtype=np.float64),
        "code": ev["code"].to_numpy(dtype=object, na_value=None),
        "numeric_value": ev["numeric_value"].to_numpy(dtype=np.float64),
        "text_value": ev["text_value"].to_numpy(dtype=object, na_value=None),
        "unit": ev["unit"].to_numpy(dtype=object, na_value=None),
    }


def _events_window(columns: dict[str, np.ndarray], rows: slice, lo: float, hi: float, closed_hi: bool) -> dict:
    """Events of one subject (its ``rows``) with ``lo <= time < hi`` (``<= hi`` if ``closed_hi``).

    Static rows (NaN time) are included when ``lo`` is ``-inf``.
    """
    t = columns["time"][rows]
    # rows are time-sorted with NaN first: two binary searches find the window, no scan
    n_static = int(np.isnan(t).sum())
    timed = t[n_static:]
    start = n_static + int(np.searchsorted(timed, lo, side="left")) if np.isfinite(lo) else 0
    stop = n_static + int(np.searchsorted(timed, hi, side="right" if closed_hi else "left"))
    sel = slice(rows.start + start, rows.start + stop)
    # copies, not views: a transform that edits one item's events in place must not edit another's
    return {name: values[sel].copy() for name, values in columns.items()}


def build_longitudinal_items(
    manifest: LongitudinalManifest,
    *,
    min_history: int = 1,
    max_history: int | None = None,
    targets: Literal["all", "last"] = "all",
    subjects: Sequence[str] | None = None,
    target_event_window: float = 1.0,
) -> list[dict[str, Any]]:
    """One dictionary per (subject, target visit), before any transform.

    Keys (names of ``ARCHITECTURE.md``; shapes before stacking, ``T`` = number of prior visits):

    - ``subject_id`` (str), ``target_index`` (int, visit number of the target within the subject)
    - ``history``: list of T image paths, oldest first; ``target``: the target image path
    - ``history_label`` / ``target_label``: the same for the ``mask`` column, when present; other
      extra image columns ``c`` appear as ``history_c`` / ``target_c``
    - ``history_mask``: (T,) float32 ones -- which slots are real (padding transforms add zeros)
    - ``times``: (T,) float32 days from each prior visit to the target visit (positive)
    - ``history_times``: (T,) float64 and ``target_time`` (float): days since the subject's
      first visit
    - ``events``: dict of arrays (``time``, ``code``, ``numeric_value``, ``text_value``,
      ``unit``) with every event strictly before the target time, static rows (NaN time)
      included -- the events between the last prior visit and the target are the what-if knob
    - ``target_events``: the same for ``target_time <= time <= target_time + target_event_window``:
      values measured at the target visit, the future-EHR targets (never in ``events``)
    - ``static``: dict of the subject's static attributes

    Args:
        manifest: a validated manifest.
        min_history: fewest prior visits an item needs (>= 1).
        max_history: most prior visits kept (the most recent ones); ``None`` keeps all.
        targets: ``"all"`` visits that have ``min_history`` predecessors, or only each subject's
            ``"last"`` visit.
        subjects: restrict to these subjects (e.g. one split section).
        target_event_window: days after the target visit whose events count as measured "at" it.
    """
    if min_history < 1:
        raise ValueError(f"min_history must be >= 1 (a target needs an earlier scan), got {min_history}.")
    if max_history is not None and max_history < min_history:
        raise ValueError(f"max_history ({max_history}) must be >= min_history ({min_history}).")
    if targets not in ("all", "last"):
        raise ValueError(f"targets must be 'all' or 'last', got {targets!r}.")
    if target_event_window < 0:
        raise ValueError(f"target_event_window must be >= 0 days, got {target_event_window}.")
    if subjects is None:
        subject_list = manifest.subjects
    else:
        subject_list = [str(s) for s in subjects]
        unknown = sorted(set(subject_list) - set(manifest.subjects))
        if unknown:
            raise KeyError(f"subject(s) not in the manifest: {unknown[:10]}")

    visits = manifest.visits
    times_all = visits["time"].to_numpy(dtype=np.float64)
    columns = {c: visits[c].to_numpy(dtype=object, na_value=None) for c in manifest.image_columns}
    event_columns = _event_columns(manifest)
    key_of = {c: ("" if c == "image" else ("label" if c == "mask" else c)) for c in manifest.image_columns}
    items: list[dict[str, Any]] = []
    for sid in subject_list:
        vs = manifest._visit_slices[sid]
        n = vs.stop - vs.start
        first_target = min_history
        target_indices = range(first_target, n) if targets == "all" else ([n - 1] if n - 1 >= first_target else [])
        ev_rows = manifest.event_slice(sid)
        static = manifest.subject_static(sid)
        for j in target_indices:
            lo = j - max_history if max_history is not None else 0
            lo = max(lo, 0)
            hist = slice(vs.start + lo, vs.start + j)
            tgt = vs.start + j
            t_hist = times_all[hist]
            t_tgt = float(times_all[tgt])
            item: dict[str, Any] = {"subject_id": sid, "target_index": j}
            for column, suffix in key_of.items():
                name_h = "history" if not suffix else f"history_{suffix}"
                name_t = "target" if not suffix else f"target_{suffix}"
                item[name_h] = list(columns[column][hist])
                item[name_t] = columns[column][tgt]
            item["history_mask"] = np.ones(len(t_hist), dtype=np.float32)
            item["times"] = (t_tgt - t_hist).astype(np.float32)
            item["history_times"] = t_hist.copy()
            item["target_time"] = t_tgt
            item["events"] = _events_window(event_columns, ev_rows, -np.inf, t_tgt, closed_hi=False)
            item["target_events"] = _events_window(
                event_columns, ev_rows, t_tgt, t_tgt + target_event_window, closed_hi=True
            )
            item["static"] = dict(static)
            items.append(item)
    return items


def forecast_item(
    manifest: LongitudinalManifest,
    subject_id: str,
    when: Any,
    *,
    max_history: int | None = None,
    planned_events: Mapping[str, Sequence] | None = None,
) -> dict[str, Any]:
    """An item to forecast ``subject_id`` at a chosen date, without a target scan.

    The history is every visit before ``when`` (the most recent ``max_history``), ``events`` every
    recorded event before ``when`` plus ``planned_events`` -- the treatment plan between the last
    scan and the forecast date, which is what a what-if question edits.

    Args:
        manifest: a validated manifest.
        subject_id: the patient.
        when: the forecast date: a datetime / ISO string for datetime manifests, a number of days
            (on the input's axis) for numeric ones (see :meth:`LongitudinalManifest.to_days`).
        max_history: most prior visits kept.
        planned_events: extra events as columns ``time`` (same kind as ``when``), ``code``,
            ``numeric_value`` and optionally ``text_value``/``unit``; they must fall after the
            last scan and before ``when``.

    Returns:
        a dictionary with the keys of :func:`build_longitudinal_items` except ``target``,
        ``target_label`` and ``target_events``; ``target_index`` is -1.

    Example::

        item = forecast_item(manifest, "P0003", "2034-06-01",
                             planned_events={"time": ["2033-09-01"], "code": ["DRUG//tamoxifen"],
                                             "numeric_value": [10.0]})
    """
    visits = manifest.subject_visits(subject_id)
    sid = str(subject_id)
    t_target = manifest.to_days(sid, when)
    prior = visits[visits["time"].to_numpy() < t_target]
    if prior.empty:
        raise ValueError(f"subject {sid!r} has no scan before the forecast date {when!r} (day {t_target:.1f}).")
    if max_history is not None:
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}.")
        prior = prior.iloc[-max_history:]
    t_hist = prior["time"].to_numpy(dtype=np.float64)
    columns = _event_columns(manifest)
    events = _events_window(columns, manifest.event_slice(sid), -np.inf, t_target, closed_hi=False)
    if planned_events is not None:
        events = _add_planned(events, planned_events, manifest, sid, float(t_hist[-1]), t_target)
    item: dict[str, Any] = {"subject_id": sid, "target_index": -1}
    for column in manifest.image_columns:
        name = "history" if column == "image" else ("history_label" if column == "mask" else f"history_{column}")
        item[name] = prior[column].tolist()
    item["history_mask"] = np.ones(len(t_hist), dtype=np.float32)
    item["times"] = (t_target - t_hist).astype(np.float32)
    item["history_times"] = t_hist.copy()
    item["target_time"] = float(t_target)
    item["events"] = events
    item["static"] = manifest.subject_static(sid)
    return item


def _add_planned(
    events: dict[str, np.ndarray],
    planned: Mapping[str, Sequence],
    manifest: LongitudinalManifest,
    sid: str,
    last_scan: float,
    target: float,
) -> dict[str, np.ndarray]:
    for column in ("time", "code", "numeric_value"):
        if column not in planned:
            raise KeyError(f"planned_events needs a {column!r} column (got {sorted(planned)}).")
    n = len(planned["code"])
    if any(len(v) != n for v in planned.values()):
        raise ValueError(
            f"planned_events columns must have equal lengths, got { {k: len(v) for k, v in planned.items()} }."
        )
    days = np.array([manifest.to_days(sid, t) for t in planned["time"]], dtype=np.float64)
    outside = (days <= last_scan) | (days >= target)
    if outside.any():
        raise ValueError(
            f"planned_events of subject {sid!r} must fall after the last scan (day {last_scan:.1f}) and before the "
            f"forecast date (day {target:.1f}); rows {np.flatnonzero(outside).tolist()} do not."
        )
    values = np.asarray(planned["numeric_value"], dtype=np.float64)
    if np.isinf(values).any():
        raise ValueError("planned_events numeric_value holds infinite values.")
    added = {
        "time": days,
        "code": np.asarray([str(c) for c in planned["code"]], dtype=object),
        "numeric_value": values,
        "text_value": np.asarray(planned.get("text_value", [None] * n), dtype=object),
        "unit": np.asarray(planned.get("unit", [None] * n), dtype=object),
    }
    merged = {k: np.concatenate([events[k], added[k]]) for k in events}
    # static rows (NaN) first, then time order; stable keeps recorded events before planned ones
    order = np.lexsort((np.arange(len(merged["time"])), np.nan_to_num(merged["time"], nan=-np.inf)))
    return {k: v[order] for k, v in merged.items()}


class LongitudinalDataset(Dataset):
    """A MONAI :class:`~monai.data.Dataset` of forecasting samples from a longitudinal manifest.

    Each item is the dictionary described in :func:`build_longitudinal_items` (paths, times, the
    subject's raw events and static attributes), passed through ``transform``.

    Args:
        manifest: a :class:`~monai_twin.data.LongitudinalManifest`, or a folder/path accepted by
            :func:`~monai_twin.data.load_manifest`.
        transform: a callable (typically a ``monai.transforms.Compose``) applied to each item.
        section: ``"training"``, ``"validation"``, ``"test"`` or ``None`` for every subject.
        fractions: the split fractions used for ``section``.
        seed: the split seed (see :func:`split_subjects`).
        min_history, max_history, targets, target_event_window: see :func:`build_longitudinal_items`.

    Example::

        from monai.data import DataLoader
        from monai_twin.data import LongitudinalDataset, collate_longitudinal

        train = LongitudinalDataset("cohort/", section="training", max_history=4)
        loader = DataLoader(train, batch_size=4, num_workers=2, collate_fn=collate_longitudinal)

    To cache transformed items, hand the item list to MONAI's caching datasets::

        items = train.data  # plain dicts, picklable
        cached = monai.data.CacheDataset(items, transform=pipeline)
    """

    def __init__(
        self,
        manifest: LongitudinalManifest | str | os.PathLike,
        transform: Callable | None = None,
        *,
        section: Literal["training", "validation", "test"] | None = None,
        fractions: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 0,
        min_history: int = 1,
        max_history: int | None = None,
        targets: Literal["all", "last"] = "all",
        target_event_window: float = 1.0,
    ) -> None:
        if not isinstance(manifest, LongitudinalManifest):
            from .manifest import load_manifest

            manifest = load_manifest(manifest)
        if section is not None and section not in SECTIONS:
            raise ValueError(f"section must be one of {SECTIONS} or None, got {section!r}.")
        self.manifest = manifest
        self.section = section
        self.split = split_subjects(manifest.subjects, fractions, seed)
        subjects = self.split[section] if section is not None else manifest.subjects
        items = build_longitudinal_items(
            manifest,
            min_history=min_history,
            max_history=max_history,
            targets=targets,
            subjects=subjects,
            target_event_window=target_event_window,
        )
        self.subjects = list(subjects)
        super().__init__(data=items, transform=transform)


def _stackable(values: Sequence[Any]) -> bool:
    """Tensors, arrays and numbers of one shape stack; text, dicts, lists and ragged arrays don't."""
    first = values[0]
    if isinstance(first, (str, bytes, dict, list, tuple)) or first is None:
        return False
    if isinstance(first, np.ndarray) and first.dtype.kind in "OUS":
        return False
    return len({tuple(np.shape(v)) for v in values}) == 1


def collate_longitudinal(batch: Sequence[Mapping[str, Any]], raw_keys: Sequence[str] = ()) -> dict[str, Any]:
    """Collate forecasting samples into a batch dictionary.

    Values that cannot be stacked stay lists of per-sample values: paths (``history``, and
    ``target`` before loading), event tables, static dicts, and arrays whose shape differs between
    samples (histories of different lengths before padding). Everything else is stacked with MONAI's
    :func:`~monai.data.utils.list_data_collate` (MetaTensors keep their metadata).

    Args:
        batch: the samples.
        raw_keys: keys to keep as lists even when they could be stacked.

    Example::

        loader = DataLoader(dataset, batch_size=4, collate_fn=collate_longitudinal)
    """
    if not batch:
        raise ValueError("collate_longitudinal: empty batch.")
    keys = list(batch[0])
    for i, item in enumerate(batch):
        if set(item) != set(keys):
            raise KeyError(f"collate_longitudinal: sample {i} has keys {sorted(item)}, sample 0 has {sorted(keys)}.")
    listed = {k for k in keys if k in raw_keys or not _stackable([item[k] for item in batch])}
    stackable = [{k: v for k, v in item.items() if k not in listed} for item in batch]
    out = dict(list_data_collate(stackable)) if stackable[0] else {}
    for key in listed:
        out[key] = [item[key] for item in batch]
    return {k: out[k] for k in keys}
