"""Vectorised kernels behind the EHR transforms (pure functions on numpy arrays, no torch).

Time axis: float **days** on each subject's axis (``monai_twin.data`` puts day 0 at the subject's
first visit). Static rows have a NaN time and are never part of an interval or a token.

**Intervals.** A subject's *bounds* are its visit times ``b_0 < b_1 < ... < b_T`` (for a dataset
item: the prior visits then the target visit). Interval ``i`` is ``[b_i, b_{i+1})``: an event at
exactly a visit time belongs to the interval that *starts* at that visit, and the last interval
ends just before the target visit -- the what-if knob. Events before ``b_0`` or at/after ``b_T``
are outside every interval and change nothing, with one exception by design: an exposure (drug)
started before ``b_0`` and still running counts for the days it overlaps an interval.

**Reducers** per (interval, code) over the normalised values (see
:class:`~monai_twin.transforms.ehr.EHRVocabulary`):

* ``last``: the value at the latest time; several values at that same time (duplicate
  timestamps) resolve to the largest, so the result never depends on row order;
* ``mean``, ``min``, ``max``: over the values in the interval;
* ``count``: number of events of the code in the interval, valueless ones included (raw count);
* NaN values are skipped by ``last``/``mean``/``min``/``max`` (like pandas' ``last()``), so
  ``last`` is the last *measured* value; they still count for ``count``.
* ``exposure`` (drugs given as ``<drug>//START`` / ``<drug>//STOP`` events whose value is the
  daily dose): ``sum over prescriptions of daily dose x days overlapping the interval``, i.e. the
  integral of the running daily rate over the interval, in (dose unit) x days. Overlapping
  prescriptions add up. A stop that would take the running rate below zero (a stop before its
  start) is an error; a start with no stop runs until the end of the last interval.
* ``days_since_last``: days from the latest event of the code (in this or an earlier interval)
  to the end of the interval; ``-1`` when the code has not been seen since ``b_0``.
* ``cumulative_exposure`` (optional): dose x days of a drug from the subject's first recorded
  event to the end of the interval, prescriptions before ``b_0`` included -- what a history window
  of the last few visits cannot add up from its own intervals, and what dose-dependent effects
  such as a growth rate damped by total drug exposure depend on.

Undefined features (no measurement) are ``fill_value`` (0.0, the normalised centre) and their
mask is 0. With ``carry_forward`` the value reducers of an interval without a value take the
most recent earlier interval's values times ``exp(-age / decay)`` (``age`` = days from that
measurement to the end of the interval; no decay when ``decay`` is ``None``); the mask stays 0,
since nothing was measured.

No Python loop runs per event or per subject: events are sorted once by (subject, time) -- a
table already in that order, as :func:`~monai_twin.data.load_manifest` returns it, is detected in
O(N) and not re-sorted -- visits are located with a vectorised binary search, and the per
(interval, code) reductions are ``ufunc.at`` scatters into dense tables. For a whole cohort,
:func:`interval_feature_table` runs this on blocks of whole subjects (~65 k events each), which
keeps the temporaries small and the scatter tables in cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from .vocabulary import EHRVocabulary

__all__ = [
    "REDUCERS",
    "EncodedEvents",
    "IntervalFeatureTable",
    "encode_events",
    "event_columns",
    "event_tokens",
    "interval_feature_names",
    "interval_feature_table",
    "interval_features",
    "numeric_values",
    "static_features",
    "static_feature_names",
    "token_codes",
]

#: Reducers available per (interval, code).
REDUCERS = ("last", "mean", "min", "max", "count")


# ----------------------------------------------------------------------------------------------
# reading event columns


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().numpy()
    if isinstance(value, (pd.Series, pd.Index)):
        return value.to_numpy()
    return np.asarray(value)


def _times(values: Any, where: str) -> np.ndarray:
    """Float days; datetimes are refused (the transforms work on each subject's day axis)."""
    if isinstance(values, pd.Series) and pd.api.types.is_numeric_dtype(values.dtype):
        if pd.api.types.is_bool_dtype(values.dtype):
            raise TypeError(f"{where}['time'] must be float days, got booleans.")
        return values.to_numpy(dtype=np.float64, na_value=np.nan)
    arr = _to_numpy(values)
    if arr.dtype.kind in "fiu":
        return arr.astype(np.float64, copy=False)
    if arr.dtype.kind == "M" or isinstance(values, pd.Series) and isinstance(values.dtype, pd.DatetimeTZDtype):
        raise TypeError(
            f"{where}['time'] holds datetimes; the EHR transforms take float days since the subject's first "
            "visit -- load the tables with monai_twin.data.load_manifest, which converts them."
        )
    if arr.dtype == object:
        stamps = [v for v in arr if hasattr(v, "year")]
        if stamps:
            zones = {getattr(v, "tzinfo", None) is not None for v in stamps}
            kind = "a mix of timezone-aware and naive datetimes" if len(zones) > 1 else "datetimes"
            raise TypeError(
                f"{where}['time'] holds {kind}; the EHR transforms take float days since the subject's first "
                "visit -- load the tables with monai_twin.data.load_manifest, which converts them "
                "(and rejects naive/aware mixes)."
            )
        try:
            return arr.astype(np.float64)
        except (TypeError, ValueError) as err:
            raise TypeError(f"{where}['time'] must be float days: {err}") from err
    raise TypeError(f"{where}['time'] must be float days, got dtype {arr.dtype}.")


def event_columns(events: Any, where: str = "events") -> dict[str, Any]:
    """The event columns as arrays, from a DataFrame or a dict of arrays/tensors (never modified).

    Returns a dict with ``time`` (float64 days, NaN for static rows), ``numeric_value`` (as
    given), ``code``, ``text_value``, ``unit`` (pandas Series, so codes can be hashed without a
    copy) and ``subject_id`` (Series or ``None``).
    """
    if isinstance(events, pd.DataFrame):
        get = events.__getitem__
        names = set(events.columns)
    elif isinstance(events, Mapping):
        get = events.__getitem__
        names = set(events)
    else:
        raise TypeError(f"{where} must be a pandas DataFrame or a dict of arrays, got {type(events).__name__}.")
    missing = [c for c in ("time", "code", "numeric_value") if c not in names]
    if missing:
        raise ValueError(
            f"{where}: missing column(s) {missing}; expected time, code, numeric_value[, text_value, unit]."
        )

    def series(name: str, required: bool) -> pd.Series | None:
        if name not in names:
            return None if not required else pd.Series([], dtype=object)
        value = get(name)
        if isinstance(value, pd.Series):
            return value.reset_index(drop=True)
        return pd.Series(_to_numpy(value).astype(object) if np.ndim(value) else [], dtype=object)

    time = _times(get("time"), where)
    code = series("code", True)
    n = len(time)
    if len(code) != n:
        raise ValueError(f"{where}: columns 'time' ({n}) and 'code' ({len(code)}) differ in length.")
    if code.isna().any():
        rows = np.flatnonzero(code.isna().to_numpy(dtype=bool))
        raise ValueError(f"{where}: column 'code' is empty in {rows.size} row(s) (rows {rows[:10].tolist()}).")
    text = series("text_value", False)
    unit = series("unit", False)
    value = get("numeric_value")
    out = {
        "time": time,
        "code": code,
        "numeric_value": value,
        "text_value": text,
        "unit": unit,
        "subject_id": series("subject_id", False),
    }
    for name in ("numeric_value", "text_value", "unit"):
        if out[name] is not None and len(out[name]) != n:
            raise ValueError(f"{where}: column {name!r} has {len(out[name])} rows, 'time' has {n}.")
    return out


def filled_columns(cols: dict[str, Any]) -> dict[str, Any]:
    """``cols`` with absent ``text_value`` / ``unit`` as all-missing object Series (for the slow paths)."""
    n = len(cols["time"])
    return {k: (pd.Series([None] * n, dtype=object) if v is None and k in ("text_value", "unit") else v)
            for k, v in cols.items()}  # fmt: skip


def numeric_values(cols: Mapping[str, Any], where: str = "events") -> np.ndarray:
    """``numeric_value`` as float64 (a new array when it had to be converted).

    Numbers written as strings are parsed; any other non-empty string, and any infinite value, is
    a ``ValueError`` naming the code(s) and subject(s). NaN means "no numeric value".
    """
    raw = cols["numeric_value"]
    if isinstance(raw, pd.Series) and pd.api.types.is_float_dtype(raw.dtype):
        values = raw.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        arr = _to_numpy(raw)
        if arr.dtype.kind in "fiu":
            values = arr.astype(np.float64, copy=False)
        elif arr.dtype.kind == "b":
            raise TypeError(f"{where}: column 'numeric_value' holds booleans; expected numbers.")
        else:
            text = pd.Series(arr.astype(object)).astype("string").str.strip()
            values = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            bad = text.notna().to_numpy(dtype=bool) & (text != "").fillna(False).to_numpy(bool) & np.isnan(values)
            bad &= ~text.str.lower().isin(["nan", "none", "null", "na"]).fillna(False).to_numpy(bool)
            if bad.any():
                raise ValueError(
                    _rows_message("column 'numeric_value' holds text that is not a number", cols, bad, where)
                )
    infinite = np.isinf(values)
    if infinite.any():
        raise ValueError(_rows_message("column 'numeric_value' is infinite", cols, infinite, where))
    return values


def _rows_message(what: str, cols: Mapping[str, Any], rows: np.ndarray, where: str) -> str:
    idx = np.flatnonzero(rows)
    code = cols["code"]
    codes = sorted({str(code.iloc[r]) for r in idx[:200]})
    text = f"{where}: {what} in {idx.size} row(s) (rows {idx[:10].tolist()}); code(s): {codes[:10]}"
    subjects = cols.get("subject_id")
    if subjects is not None and len(subjects):
        text += f"; subject(s): {sorted({str(subjects.iloc[r]) for r in idx[:200]})[:10]}"
    return text


def token_codes(code: pd.Series, values: np.ndarray, text: pd.Series, text_codes: bool) -> np.ndarray:
    """Codes as object array, with ``"<code>//<text>"`` for text-only events when ``text_codes``."""
    out = code.astype(object).to_numpy(dtype=object, copy=True)
    if text_codes:
        sel = np.isnan(values) & text.notna().to_numpy(dtype=bool)
        if sel.any():
            out[sel] = (code[sel].astype(str) + "//" + text[sel].astype(str)).to_numpy(dtype=object)
    return out


@dataclass
class EncodedEvents:
    """Events encoded with a vocabulary (one row per input row, input order).

    Attributes:
        time: float64 days (NaN for static rows).
        index: int64 token index (``OOV_INDEX`` for unknown codes).
        value: float64 normalised value (NaN when the event has no numeric value).
        rate: float64 signed daily dose for exposure start (+) / stop (-) events, else 0.
    """

    time: np.ndarray
    index: np.ndarray
    value: np.ndarray
    rate: np.ndarray


def encode_events(
    events: Any,
    vocab: EHRVocabulary,
    where: str = "events",
    check_units: bool = True,
    index: np.ndarray | None = None,
) -> EncodedEvents:
    """Validate and encode events with ``vocab`` (the input is not modified).

    ``index`` may carry ``vocab.index(events["code"])`` computed beforehand (a caller encoding a
    big table block by block hashes the code column once).

    Raises:
        TypeError: datetimes in ``time`` (naive, aware or mixed), booleans as values.
        ValueError: non-numeric strings or infinite values in ``numeric_value``, units that differ
            from the fitted unit, negative doses -- naming the code(s) and subject(s).
    """
    cols = event_columns(events, where)
    values = numeric_values(cols, where)
    has_units = cols["unit"] is not None and cols["unit"].notna().any()
    if (check_units and has_units) or (vocab.unit_conversions and cols["unit"] is not None):
        values, _ = vocab.convert_units(
            cols["code"].to_numpy(dtype=object),
            values,
            cols["unit"].to_numpy(dtype=object),
            None if cols["subject_id"] is None else cols["subject_id"].to_numpy(dtype=object),
            check=check_units,
        )
    index = vocab.index(cols["code"]) if index is None else np.asarray(index, dtype=np.intp)
    if vocab.settings["text_codes"] and cols["text_value"] is not None:
        # only text-only rows take the "<code>//<text>" form; re-index just those
        sel = np.isnan(values) & cols["text_value"].notna().to_numpy(dtype=bool)
        if sel.any():
            index = index.copy()
            index[sel] = vocab.index(token_codes(cols["code"][sel], values[sel], cols["text_value"][sel], True))
    # exposure events are few: build the signed-rate column from their rows only
    exposure_rows = np.flatnonzero(vocab.exposure_sign[index])
    doses = values[exposure_rows]
    negative = doses < 0
    if negative.any():
        rows = np.zeros(values.size, dtype=bool)
        rows[exposure_rows[negative]] = True
        raise ValueError(_rows_message("negative dose(s) in column 'numeric_value'", cols, rows, where))
    rate = np.zeros(values.size)
    rate[exposure_rows] = np.nan_to_num(doses, nan=0.0) * vocab.exposure_sign[index[exposure_rows]]
    return EncodedEvents(time=cols["time"], index=index, value=vocab.normalise(index, values), rate=rate)


# ----------------------------------------------------------------------------------------------
# interval features


def interval_feature_names(
    vocab: EHRVocabulary,
    reducers: Sequence[str] = REDUCERS,
    exposure: bool = True,
    time_since: bool = True,
    cumulative_exposure: bool = False,
) -> list[str]:
    """Names of the F feature columns, in order: one block per reducer over
    ``vocab.feature_codes``, then ``<drug>:exposure`` per exposure code, then
    ``<code>:days_since_last``, then (optional) ``<drug>:cumulative_exposure`` per exposure code."""
    names = [f"{c}:{r}" for r in reducers for c in vocab.feature_codes]
    if exposure:
        names += [f"{c}:exposure" for c in vocab.exposure_codes]
    if time_since:
        names += [f"{c}:days_since_last" for c in vocab.feature_codes]
    if cumulative_exposure:
        names += [f"{c}:cumulative_exposure" for c in vocab.exposure_codes]
    return names


def _check_reducers(reducers: Sequence[str]) -> tuple[str, ...]:
    reducers = tuple(reducers)
    unknown = [r for r in reducers if r not in REDUCERS]
    if unknown or len(set(reducers)) != len(reducers):
        raise ValueError(f"reducers must be distinct names from {REDUCERS}, got {reducers}.")
    return reducers


def _segment_starts(sorted_ids: np.ndarray, n_groups: int) -> np.ndarray:
    return np.searchsorted(sorted_ids, np.arange(n_groups + 1), side="left")


def interval_features(
    group: np.ndarray,
    time: np.ndarray,
    column: np.ndarray,
    value: np.ndarray,
    exposure_column: np.ndarray,
    rate: np.ndarray,
    bounds: np.ndarray,
    bounds_offsets: np.ndarray,
    n_codes: int,
    n_exposure: int,
    reducers: Sequence[str] = REDUCERS,
    exposure: bool = True,
    time_since: bool = True,
    carry_forward: bool = False,
    decay: float | None = None,
    fill_value: float = 0.0,
    out: tuple[np.ndarray, np.ndarray] | None = None,
    cumulative_exposure: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate events per (interval, code) for many groups (subjects or items) at once.

    Args:
        group: (N,) int group of each event, in ``[0, G)``.
        time: (N,) float days (finite; drop static rows before).
        column: (N,) feature column of each event in ``[0, n_codes)``, -1 to skip it.
        value: (N,) normalised values, NaN for none.
        exposure_column: (N,) exposure column in ``[0, n_exposure)`` for start/stop events, else -1.
        rate: (N,) signed daily dose (+ start, - stop), 0 for other events.
        bounds: flat visit times per group, strictly increasing within a group (days).
        bounds_offsets: (G + 1,) start of each group's bounds in ``bounds``; a group with one
            visit has no interval.
        n_codes, n_exposure: number of feature codes / exposure codes.
        reducers, exposure, time_since, carry_forward, decay, fill_value, cumulative_exposure: see
            the module docstring.
        out: optional C-contiguous ``(features, mask)`` arrays of shape (J, F), float32 and bool,
            written in place (lets a caller fill row blocks of one big table).

    Returns:
        ``features`` (J, F) float32 and ``mask`` (J, F) bool, J = sum over groups of
        (bounds - 1): the intervals in (group, time) order; F as in :func:`interval_feature_names`.

    Raises:
        ValueError: bounds not strictly increasing (message names the group), or an exposure
            whose running rate would go below zero (a stop before its start).
    """
    reducers = _check_reducers(reducers)
    if decay is not None and not decay > 0:
        raise ValueError(f"decay must be a positive number of days or None, got {decay}.")
    group = np.asarray(group)
    time = np.asarray(time, dtype=np.float64)
    column = np.asarray(column)
    value = np.asarray(value, dtype=np.float64)
    bounds = np.asarray(bounds, dtype=np.float64)
    offsets = np.asarray(bounds_offsets, dtype=np.int64)
    n_groups = offsets.size - 1
    n_bounds = np.diff(offsets)
    if (n_bounds < 1).any():
        bad = np.flatnonzero(n_bounds < 1)
        raise ValueError(f"every group needs at least one visit time; group(s) {bad[:10].tolist()} have none.")
    bound_group = np.repeat(np.arange(n_groups), n_bounds)
    same = bound_group[1:] == bound_group[:-1]
    if not np.isfinite(bounds).all():
        raise ValueError("visit times must be finite days.")
    if not (np.diff(bounds)[same] > 0).all():
        bad = np.unique(bound_group[1:][same & ~(np.diff(bounds) > 0)])
        raise ValueError(
            f"visit times must be strictly increasing within a subject (history then target); group(s) "
            f"{bad[:10].tolist()} are not."
        )
    n = time.size
    if n and not np.isfinite(time).all():
        raise ValueError("event times must be finite here; drop static rows (NaN time) before.")

    # sort once by (group, time) unless the input already is (a manifest's events are)
    if n and not ((group[1:] > group[:-1]) | ((group[1:] == group[:-1]) & (time[1:] >= time[:-1]))).all():
        order = np.lexsort((time, group))
        group, time, column, value = group[order], time[order], column[order], value[order]
        exposure_column, rate = np.asarray(exposure_column)[order], np.asarray(rate)[order]
        del order

    n_intervals = int(offsets[-1] - n_groups)
    cells = n_intervals * n_codes
    # index arrays stay np.intp: numpy converts narrower index arrays on every gather, which costs
    # more than the memory they save
    itype = np.intp
    # where each visit falls among its group's events: a vectorised binary search, log2(max events) passes
    starts = np.searchsorted(group, np.arange(n_groups + 1), side="left")
    lo, hi = starts[bound_group], starts[bound_group + 1]
    while True:
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) // 2
        # a group with an active search has events, so n >= 1 here
        right = active & (time[np.minimum(mid, n - 1)] < bounds)
        lo = np.where(right, mid + 1, lo)
        hi = np.where(active & ~right, mid, hi)
    # events from position lo[b] on are at/after visit b. Counting the interval-opening visits at
    # or before each position numbers the intervals; +1/-1 at each group's first/last visit marks
    # the events inside [first visit, last visit).
    is_last = np.zeros(bounds.size, dtype=bool)
    is_last[offsets[1:] - 1] = True
    is_first = np.zeros(bounds.size, dtype=bool)
    is_first[offsets[:-1]] = True
    # small scatters (one entry per visit) into per-event counters, then one cumulative sum each
    opening = np.zeros(n + 1, dtype=itype)
    np.add.at(opening, lo[~is_last], 1)
    interval = np.cumsum(opening[:n], dtype=itype)
    interval -= 1
    del opening
    # int8 wraps around, but the net value at any position is -1, 0 or 1, so the sums stay exact
    edge = np.zeros(n + 1, dtype=np.int8)
    np.add.at(edge, lo[is_first], 1)
    np.subtract.at(edge, lo[is_last], 1)
    inside = np.cumsum(edge[:n], dtype=np.int8) > 0
    del edge

    interval_group = np.repeat(np.arange(n_groups), n_bounds - 1)
    start_t, end_t = bounds[~is_last], bounds[~is_first]
    first_interval = (offsets[:-1] - np.arange(n_groups))[interval_group]
    rows = np.arange(n_intervals)

    n_features = (
        len(reducers) * n_codes
        + (n_exposure if exposure else 0)
        + (n_codes if time_since else 0)
        + (n_exposure if cumulative_exposure else 0)
    )
    if out is None:
        features = np.empty((n_intervals, n_features), dtype=np.float32)
        mask = np.empty((n_intervals, n_features), dtype=bool)
    else:
        features, mask = out
        if features.shape != (n_intervals, n_features) or mask.shape != features.shape:
            raise ValueError(f"out must hold two ({n_intervals}, {n_features}) arrays, got {features.shape}.")

    def block(k: int) -> slice:
        return slice(k * n_codes, (k + 1) * n_codes)

    # per-(interval, code) cell of every event; events outside every interval or without a
    # feature column go to one extra "dump" cell that is dropped, so no per-event array is compressed
    seg = interval  # reused in place: the interval numbers are not needed once the cells are known
    seg *= n_codes
    seg += column
    seg[~(inside & (column >= 0))] = cells
    del interval
    # ufunc.at scatters beat bincount here (no range scan, no index conversion)
    count = np.zeros(cells + 1, dtype=np.int64)
    np.add.at(count, seg, 1)
    count = count[:cells].reshape(n_intervals, n_codes)
    seen = count > 0
    if "count" in reducers:
        k = reducers.index("count")
        features[:, block(k)] = count
        mask[:, block(k)] = seen
    del count
    if time_since:
        # done now, while seg still holds every event, so its table is freed before the value reducers
        last_seen = np.full(cells + 1, -np.inf)
        np.maximum.at(last_seen, seg, time)
        # row of the latest interval (same group) where each code was seen, as flat indices into last_seen
        source = np.where(seen, rows[:, None], -1)
        np.maximum.accumulate(source, axis=0, out=source)
        known = source >= first_interval[:, None]
        np.maximum(source, 0, out=source)
        source *= n_codes
        source += np.arange(n_codes)
        k = len(reducers) * n_codes + (n_exposure if exposure else 0)
        view = features[:, k : k + n_codes]
        np.subtract(end_t[:, None], np.take(last_seen, source), out=view, casting="same_kind")
        np.copyto(view, -1.0, where=~known)
        mask[:, k : k + n_codes] = known
        del last_seen, source, known

    value_reducers = [r for r in reducers if r != "count"]
    # NaN values all land in the dump cell; comparisons with them there are expected and dropped
    with np.errstate(invalid="ignore", divide="ignore"):
        if value_reducers:
            seg[np.isnan(value)] = cells
            nval = np.zeros(cells + 1, dtype=np.int64)
            np.add.at(nval, seg, 1)
            nval = nval[:cells].reshape(n_intervals, n_codes)
            measured = nval > 0
            unmeasured = ~measured
            unmeasured_flat = unmeasured.ravel()
            # time of the latest value, then the largest value among those at that time (row-order free)
            tlast = np.full(cells + 1, -np.inf)
            np.maximum.at(tlast, seg, time)
            # float32 values: the features are float32 anyway, and the scatters move half the bytes
            value32 = value.astype(np.float32)
            buffer = np.empty(cells + 1, dtype=np.float32)  # one scratch table reused by every reducer
            keep: dict[str, np.ndarray] = {}
            # "last" goes last: it overwrites the cell index of every value not at its cell's
            # latest time, which the other reducers still need
            for name in sorted(value_reducers, key=lambda r: r == "last"):
                k = reducers.index(name)
                if name == "last":
                    seg[time != np.take(tlast, seg)] = cells
                    buffer.fill(-np.inf)
                    np.maximum.at(buffer, seg, value32)
                    result = buffer[:cells]
                elif name == "mean":
                    # NaN values sit in the dump cell, so they never reach a real cell's sum
                    total = np.zeros(cells + 1)
                    np.add.at(total, seg, value)
                    result = total[:cells]
                    result /= nval.ravel()  # in place: no second table
                elif name == "min":
                    buffer.fill(np.inf)
                    np.minimum.at(buffer, seg, value32)
                    result = buffer[:cells]
                else:
                    buffer.fill(-np.inf)
                    np.maximum.at(buffer, seg, value32)
                    result = buffer[:cells]
                # fill the contiguous scratch table first: one strided write into the output per block
                np.copyto(result, fill_value, where=unmeasured_flat)
                view = features[:, block(k)]
                np.copyto(view, result.reshape(n_intervals, n_codes), casting="same_kind")
                mask[:, block(k)] = measured
                if carry_forward:
                    keep[name] = view
            del nval, buffer, value32
            if carry_forward and n_intervals:
                tlast = tlast[:cells].reshape(n_intervals, n_codes)
                # the most recent earlier interval of the same group that has a value, per code
                source = np.maximum.accumulate(np.where(measured, rows[:, None], -1), axis=0)
                usable = (source >= first_interval[:, None]) & unmeasured
                source = np.where(usable, source, 0)
                weight = 1.0
                if decay is not None:
                    age = end_t[:, None] - np.take_along_axis(tlast, source, axis=0)
                    weight = np.exp(-np.where(usable, age, 0.0) / decay)
                for view in keep.values():
                    carried = np.take_along_axis(view, source, axis=0) * weight
                    np.copyto(view, carried, where=usable, casting="same_kind")
            del tlast
    del seg

    k = len(reducers) * n_codes
    if exposure and n_exposure:
        x_features, x_mask = _exposure(
            group, time, lo, is_first, is_last, inside, np.asarray(exposure_column), np.asarray(rate, dtype=np.float64),
            n_intervals, n_exposure, interval_group, first_interval, start_t, end_t, starts,
        )  # fmt: skip
        features[:, k : k + n_exposure] = x_features
        mask[:, k : k + n_exposure] = x_mask
    if cumulative_exposure:
        k = n_features - n_exposure
        features[:, k:], mask[:, k:] = _cumulative_exposure(
            time, np.asarray(exposure_column), np.asarray(rate, dtype=np.float64), lo[~is_first],
            starts[bound_group[~is_first]], end_t, n_exposure,
        )  # fmt: skip

    return features, mask


def _cumulative_exposure(time, xcol, rate, end_lo, group_start, end_t, n_exposure):
    """Dose x days from each group's first event to each interval's end, per exposure code.

    The running rate is a sum of steps (``+dose`` at a start, ``-dose`` at a stop), so the
    integral up to ``T`` is ``sum_k rate_k (T - t_k)`` over the events before ``T``: two prefix
    sums (of ``rate`` and ``rate * t``) per exposure code answer it for every interval end at once.
    """
    n_intervals = end_t.size
    if n_exposure == 0 or n_intervals == 0:
        return np.zeros((n_intervals, n_exposure)), np.zeros((n_intervals, n_exposure), dtype=bool)
    idx = np.flatnonzero((xcol >= 0) & (rate != 0))
    steps = np.zeros((time.size + 1, n_exposure))
    moments = np.zeros((time.size + 1, n_exposure))
    steps[idx + 1, xcol[idx]] = rate[idx]
    moments[idx + 1, xcol[idx]] = rate[idx] * time[idx]
    np.cumsum(steps, axis=0, out=steps)
    np.cumsum(moments, axis=0, out=moments)
    # events before each interval end (positions < end_lo) of the interval's own group (>= group_start)
    total = end_t[:, None] * (steps[end_lo] - steps[group_start]) - (moments[end_lo] - moments[group_start])
    tol = 1e-9 * max(1.0, float(np.abs(total).max(initial=0.0)))
    total[total <= tol] = 0.0
    return total, total > 0


def _exposure(
    group, time, lo, is_first, is_last, inside, xcol, rate, n_intervals, n_exposure, interval_group, first_interval,
    start_t, end_t, starts,
):  # fmt: skip
    """Dose x overlapping days per (interval, exposure code); see the module docstring."""
    exposure = np.zeros((n_intervals, n_exposure))
    active = np.zeros((n_intervals, n_exposure), dtype=bool)
    idx = np.flatnonzero((xcol >= 0) & (rate != 0))
    if idx.size == 0:
        return exposure, active
    g, t, x, r = group[idx], time[idx], xcol[idx].astype(np.int64), rate[idx]
    # running daily rate per (group, drug). The subset is already in (group, time) order, so a
    # stable sort on (group, drug) keeps time order; the rate is checked only after the last event
    # of each (group, drug, time) tie, so a renewal (stop and restart at one instant) is not a dip
    order = np.argsort(g * n_exposure + x, kind="stable")
    g_s, x_s, t_s, r_s = g[order], x[order], t[order], r[order]
    new = np.r_[True, (g_s[1:] != g_s[:-1]) | (x_s[1:] != x_s[:-1])]
    tie_end = np.r_[new[1:] | (t_s[1:] != t_s[:-1]), True]
    csum = np.cumsum(r_s)
    base = (csum - r_s)[new]
    running = (csum - np.repeat(base, np.diff(np.r_[np.flatnonzero(new), r_s.size])))[tie_end]
    tol = 1e-9 * max(1.0, float(np.abs(r_s).max()))
    if (running < -tol).any():
        bad = np.flatnonzero(tie_end)[np.flatnonzero(running < -tol)[0]]
        raise _ExposureError(int(g_s[bad]), int(x_s[bad]))
    # interval of each exposure event: count of the group's interval-opening visits at or before it
    n_groups = starts.size - 1
    first_lo = lo[is_first]  # per group
    visit_lo = lo[~is_last]  # the interval-opening visits, in order
    j = np.searchsorted(visit_lo, idx, side="right") - 1
    ins = inside[idx]
    seg = j[ins] * n_exposure + x[ins]
    cells = n_intervals * n_exposure
    contrib = np.bincount(seg, weights=r[ins] * (end_t[j[ins]] - t[ins]), minlength=cells)
    delta = np.bincount(seg, weights=r[ins], minlength=cells).reshape(n_intervals, n_exposure)
    events_in = np.bincount(seg, minlength=cells).reshape(n_intervals, n_exposure) > 0
    pre = idx < first_lo[g]
    prior = np.bincount(g[pre] * n_exposure + x[pre], weights=r[pre], minlength=n_groups * n_exposure)
    prior = prior.reshape(n_groups, n_exposure)
    # rate at each interval start: prior-window rate plus the deltas of the group's earlier intervals
    csd = np.cumsum(delta, axis=0)
    exclusive = csd - delta
    rate_at_start = prior[interval_group] + exclusive - exclusive[first_interval]
    rate_at_start[np.abs(rate_at_start) <= tol] = 0.0
    exposure = rate_at_start * (end_t - start_t)[:, None] + contrib.reshape(n_intervals, n_exposure)
    exposure[np.abs(exposure) <= tol] = 0.0
    active = (rate_at_start > 0) | events_in
    return exposure, active


class _ExposureError(ValueError):
    """A stop that takes the running rate below zero; carries (group, exposure column) for the caller."""

    def __init__(self, group: int, column: int):
        self.group, self.column = group, column
        super().__init__(f"exposure column {column} of group {group}: a stop comes before its start.")


def _exposure_message(err: _ExposureError, vocab: EHRVocabulary, subject: str) -> str:
    drug = vocab.exposure_codes[err.column]
    start, stop = vocab.settings["start_suffix"], vocab.settings["stop_suffix"]
    return (
        f"events: subject {subject}, code {drug + stop!r}: a stop comes before its start (the running daily dose "
        f"of {drug!r} would drop below zero); every {drug + stop!r} needs an earlier {drug + start!r} with the "
        "same dose."
    )


@dataclass
class IntervalFeatureTable:
    """Interval features of every consecutive visit pair of every subject.

    Row ``r`` is the interval ``[start[r], end[r])`` after visit ``visit_index[r]`` of subject
    ``subject_id[r]``; a dataset item whose target is visit ``j`` (full history) has exactly the
    rows of visits ``0 .. j-1`` of its subject, so every item is a slice of this table and nothing
    is duplicated.

    Attributes:
        subject_id: (J,) object; visit_index: (J,) int64; start, end: (J,) float64 days.
        features: (J, F) float32; mask: (J, F) bool (the transforms hand out float masks).
        feature_names: the F column names.
    """

    subject_id: np.ndarray
    visit_index: np.ndarray
    start: np.ndarray
    end: np.ndarray
    features: np.ndarray
    mask: np.ndarray
    feature_names: list[str]

    def item(self, subject_id: str, target_index: int) -> tuple[np.ndarray, np.ndarray]:
        """Features and mask (T, F) of the item of ``subject_id`` whose target is visit ``target_index``."""
        lo = int(np.searchsorted(self.subject_id, subject_id, side="left"))
        hi = int(np.searchsorted(self.subject_id, subject_id, side="right"))
        if hi == lo or not 1 <= target_index <= hi - lo:
            raise KeyError(f"no item ({subject_id!r}, target visit {target_index}) in the table.")
        return self.features[lo : lo + target_index], self.mask[lo : lo + target_index]


def _subject_codes(visit_subjects: pd.Series, event_subjects: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Integer codes for subjects (sorted unique visit subjects); events of unknown subjects get -1."""
    uniques = pd.Index(pd.unique(visit_subjects)).sort_values()
    v = uniques.get_indexer(visit_subjects)
    values = event_subjects.to_numpy()
    if values.dtype.kind in "iu" and np.asarray(uniques).dtype.kind in "iu" and values.size:
        # run-length path for a table grouped by subject: hash one value per run, not per row
        change = np.flatnonzero(values[1:] != values[:-1]) + 1
        run_starts = np.r_[0, change]
        run_codes = uniques.get_indexer(values[run_starts]).astype(np.int32)  # group ids: 4 bytes a row
        e = np.repeat(run_codes, np.diff(np.r_[run_starts, values.size]))
    else:
        # hash the column once (fast for pyarrow strings too), then look up only the distinct ids
        labels, distinct = pd.factorize(event_subjects, use_na_sentinel=True)
        e = np.append(uniques.get_indexer(distinct), -1).astype(np.int32)[labels]
    return np.asarray(uniques, dtype=object), v, e


def interval_feature_table(
    events: pd.DataFrame,
    visits: pd.DataFrame,
    vocab: EHRVocabulary,
    reducers: Sequence[str] = REDUCERS,
    exposure: bool = True,
    time_since: bool = True,
    carry_forward: bool = False,
    decay: float | None = None,
    fill_value: float = 0.0,
    check_units: bool = True,
    chunk_events: int = 1 << 16,
    cumulative_exposure: bool = False,
) -> IntervalFeatureTable:
    """Interval features for every item of a cohort in one vectorised pass.

    Args:
        events: MEDS-style events with ``subject_id`` and times in days on each subject's axis
            (``manifest.events``); extra columns are ignored; events of subjects without visits
            are ignored.
        visits: ``subject_id, time`` (days), one row per visit (``manifest.visits``).
        vocab: the fitted :class:`~monai_twin.transforms.ehr.EHRVocabulary`.
        reducers, exposure, time_since, carry_forward, decay, fill_value, cumulative_exposure: as
            in :class:`~monai_twin.transforms.ehr.EHRToIntervalFeatures`.
        check_units: verify the ``unit`` column against the fitted units.
        chunk_events: when the events are grouped by subject (as ``load_manifest`` returns them),
            they are processed in blocks of whole subjects of about this many rows, which bounds
            the temporary memory and keeps the scatter tables cache-sized; the result is the same.

    Returns:
        an :class:`IntervalFeatureTable` (items with full history are slices of it).

    Example::

        table = interval_feature_table(manifest.events, manifest.visits, vocab)
        features, mask = table.item("S001", target_index=3)  # (3, F) each
    """
    for name, frame in (("events", events), ("visits", visits)):
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"{name} must be a pandas DataFrame, got {type(frame).__name__}.")
        for column in ("subject_id", "time"):
            if column not in frame.columns:
                raise ValueError(f"{name}: missing column {column!r}.")
    uniques, v_code, e_code = _subject_codes(visits["subject_id"], events["subject_id"])
    v_time = _times(visits["time"], "visits")
    v_order = np.lexsort((v_time, v_code))
    v_code_s, v_time_s = v_code[v_order], v_time[v_order]
    offsets = _segment_starts(v_code_s, len(uniques))
    repeated = (v_code_s[1:] == v_code_s[:-1]) & (v_time_s[1:] == v_time_s[:-1])
    if repeated.any() or not np.isfinite(v_time_s).all():
        bad = np.r_[v_code_s[1:][repeated], v_code_s[~np.isfinite(v_time_s)]]
        raise ValueError(
            f"visits: column 'time' must be finite and distinct per subject; subject(s) "
            f"{sorted({str(uniques[b]) for b in bad})[:10]} are not."
        )
    n_codes, n_exposure = len(vocab.feature_codes), len(vocab.exposure_codes)
    names = interval_feature_names(vocab, _check_reducers(reducers), exposure, time_since, cumulative_exposure)
    n_groups = len(uniques)
    n_intervals = int(offsets[-1] - n_groups)
    features = np.empty((n_intervals, len(names)), dtype=np.float32)
    mask = np.empty((n_intervals, len(names)), dtype=bool)
    options = dict(reducers=reducers, exposure=exposure, time_since=time_since, carry_forward=carry_forward,
                   decay=decay, fill_value=fill_value, cumulative_exposure=cumulative_exposure)  # fmt: skip

    def run(rows: slice | np.ndarray, g0: int, g1: int) -> None:
        # encode and aggregate the events of groups [g0, g1); their intervals are one row block
        part = events.iloc[rows]
        enc = encode_events(part, vocab, check_units=check_units, index=code_index[rows])
        group, time, index, value, rate = e_code[rows] - g0, enc.time, enc.index, enc.value, enc.rate
        usable = (group >= 0) & np.isfinite(time)
        if not usable.all():  # static rows or unknown subjects: drop them (most blocks have none)
            keep = np.flatnonzero(usable)
            group, time, index, value, rate = group[keep], time[keep], index[keep], value[keep], rate[keep]
        r0, r1 = int(offsets[g0] - g0), int(offsets[g1] - g1)
        try:
            interval_features(
                group, time, vocab.feature_column[index], value,
                vocab.exposure_column[index], rate, v_time_s[offsets[g0] : offsets[g1]],
                offsets[g0 : g1 + 1] - offsets[g0], n_codes, n_exposure, out=(features[r0:r1], mask[r0:r1]),
                **options,
            )  # fmt: skip
        except _ExposureError as err:
            raise ValueError(_exposure_message(err, vocab, str(uniques[g0 + err.group]))) from None

    # hash the code column once for the whole table (int32 keeps it at 4 bytes a row)
    code_index = vocab.index(events["code"]).astype(np.int32)
    grouped = e_code.size == 0 or ((e_code >= 0).all() and (e_code[1:] >= e_code[:-1]).all())
    if grouped and e_code.size > chunk_events:
        # events grouped by subject (a manifest's are): walk blocks of whole subjects of about
        # chunk_events rows -- a loop over ~N / chunk_events blocks, not over subjects -- so the
        # per-event temporaries and the dense tables stay small enough for the caches
        group_starts = np.searchsorted(e_code, np.arange(n_groups + 1), side="left")
        cuts = np.unique(
            np.r_[0, np.searchsorted(group_starts, np.arange(chunk_events, e_code.size, chunk_events)), n_groups]
        )
        for g0, g1 in zip(cuts[:-1], cuts[1:]):
            run(slice(int(group_starts[g0]), int(group_starts[g1])), int(g0), int(g1))
    else:
        run(slice(0, e_code.size), 0, n_groups)
    n_visits = np.diff(offsets)
    keep_row = np.ones(v_time_s.size, dtype=bool)
    keep_row[offsets[1:] - 1] = False
    visit_index = np.arange(v_time_s.size) - np.repeat(offsets[:-1], n_visits)
    return IntervalFeatureTable(
        subject_id=np.repeat(uniques, n_visits - 1),
        visit_index=visit_index[keep_row],
        start=v_time_s[keep_row],
        end=v_time_s[np.r_[False, keep_row[:-1]]],
        features=features,
        mask=mask,
        feature_names=names,
    )


# ----------------------------------------------------------------------------------------------
# tokens


def event_tokens(
    time: np.ndarray,
    index: np.ndarray,
    value: np.ndarray,
    window_start: float,
    target_time: float,
    max_tokens: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """The events of ``[window_start, target_time)`` as a fixed-length, time-ordered token sequence.

    Ties in time are ordered by (token index, value), so the sequence never depends on row order.
    When there are more than ``max_tokens`` events the most recent ``max_tokens`` are kept.

    Returns:
        ``code`` (N,) int64 (0 = padding), ``value`` (N,) float32 (normalised; 0 when the event
        has none), ``time`` (N,) float32 days relative to the target (negative = before it, 0 in
        padding), ``mask`` (N,) float32 (1 = real token), and the number of events dropped.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}.")
    time = np.asarray(time, dtype=np.float64)
    sel = np.isfinite(time) & (time >= window_start) & (time < target_time)
    t, i, v = time[sel], np.asarray(index)[sel], np.asarray(value, dtype=np.float64)[sel]
    order = np.lexsort((np.nan_to_num(v, nan=-np.inf), i, t))
    dropped = max(0, order.size - max_tokens)
    order = order[dropped:]
    k = order.size
    code = np.zeros(max_tokens, dtype=np.int64)
    val = np.zeros(max_tokens, dtype=np.float32)
    rel = np.zeros(max_tokens, dtype=np.float32)
    mask = np.zeros(max_tokens, dtype=np.float32)
    code[:k] = i[order]
    val[:k] = np.nan_to_num(v[order], nan=0.0)
    rel[:k] = t[order] - target_time
    mask[:k] = 1.0
    return code, val, rel, mask, dropped


# ----------------------------------------------------------------------------------------------
# static attributes


def static_feature_names(vocab: EHRVocabulary) -> list[str]:
    """Names of the S static features: ``<attr>`` and ``<attr>:missing`` per numeric attribute,
    then ``<attr>=<category>`` per category and ``<attr>=<unknown>`` per categorical attribute."""
    names: list[str] = []
    for attr in vocab.static_numeric:
        names += [attr, f"{attr}:missing"]
    for attr, cats in vocab.static_categorical.items():
        names += [f"{attr}={c}" for c in cats] + [f"{attr}=<unknown>"]
    return names


def static_features(vocab: EHRVocabulary, static: Mapping[str, Any] | None, events: Any = None) -> np.ndarray:
    """Encode one subject's static attributes as a (S,) float32 vector.

    Values come from ``static`` (a dict, e.g. an item's ``static``) and from static event rows
    (NaN time) in ``events``; an attribute given in both must agree. Numeric attributes are
    ``(v - centre) / scale`` plus a missing flag (value 0 when missing); categorical ones are
    one-hot with an ``<unknown>`` slot for missing or unseen categories. Several static rows for
    one code: the numeric ones are averaged, the text ones must agree.
    """
    given: dict[str, Any] = {str(k): v for k, v in (static or {}).items()}
    if events is not None:
        cols = filled_columns(event_columns(events, "events"))
        rows = np.flatnonzero(np.isnan(cols["time"]))
        if rows.size:
            values = numeric_values(cols, "events")
            for code, group in pd.DataFrame(
                {"code": cols["code"].iloc[rows].astype(str).to_numpy(), "value": values[rows],
                 "text": cols["text_value"].iloc[rows].to_numpy(dtype=object)}
            ).groupby("code", sort=True):  # fmt: skip
                finite = group["value"].to_numpy(dtype=np.float64)
                finite = finite[np.isfinite(finite)]
                texts = sorted({str(t) for t in group["text"].dropna()})
                if finite.size:
                    found: Any = float(finite.mean())
                elif len(texts) > 1:
                    raise ValueError(f"events: static code {code!r} has conflicting text values {texts}.")
                else:
                    found = texts[0] if texts else None
                if code in given and not _same(given[code], found):
                    raise ValueError(
                        f"static attribute {code!r} is {given[code]!r} in 'static' but {found!r} in a static event row."
                    )
                given[str(code)] = found
    out: list[float] = []
    for attr, st in vocab.static_numeric.items():
        raw = given.get(attr)
        try:
            number = float(raw) if raw is not None and not (isinstance(raw, str) and not raw.strip()) else np.nan
        except (TypeError, ValueError):
            raise ValueError(f"static attribute {attr!r} must be a number, got {raw!r}.") from None
        if np.isinf(number):
            raise ValueError(f"static attribute {attr!r} is infinite.")
        missing = not np.isfinite(number)
        out += [0.0 if missing else (number - st["centre"]) / st["scale"], 1.0 if missing else 0.0]
    for attr, cats in vocab.static_categorical.items():
        raw = given.get(attr)
        onehot = [0.0] * (len(cats) + 1)
        key = None if raw is None or (isinstance(raw, float) and np.isnan(raw)) or raw is pd.NA else str(raw)
        onehot[cats.index(key) if key in cats else len(cats)] = 1.0
        out += onehot
    return np.asarray(out, dtype=np.float32)


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(np.isclose(float(a), float(b)))
    except (TypeError, ValueError):
        return str(a) == str(b)
