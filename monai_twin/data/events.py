"""Editing an item's events for what-if questions ("halve the dose from the last scan on").

Two kinds of codes are edited differently:

* **Drugs recorded as exposures** -- ``<code>//START`` / ``<code>//STOP`` events whose value is the
  daily dose, the convention of :func:`~monai_twin.data.mimic.load_mimic`, the synthetic cohorts
  and :class:`~monai_twin.transforms.ehr.EHRToIntervalFeatures`. An edit acts on the *running daily
  dose* over the time window, whether or not a prescription starts inside it: halving a drug that
  was started a year before the window halves what is taken inside the window. The drug's events
  inside the window are replaced by start/stop pairs at every point where the edited dose changes,
  and a closing pair at the window's end restores the recorded dose, so the running dose outside
  the window -- and every event there -- is exactly what was recorded.
* **Any other code** (a lab, a score, a drug recorded as a plain dose value): the values of its
  events inside the window are scaled or set.

Pure numpy; the input is never modified.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["edit_events", "running_dose"]


def _as_arrays(events: Mapping) -> dict[str, np.ndarray]:
    for column in ("time", "code", "numeric_value"):
        if column not in events:
            raise KeyError(f"events needs a {column!r} column (got {sorted(events)}).")
    return {str(k): np.array(v, copy=True) for k, v in events.items()}


def running_dose(
    events: Mapping, code: str, *, start_suffix: str = "//START", stop_suffix: str = "//STOP"
) -> tuple[np.ndarray, np.ndarray]:
    """The daily dose of an exposure drug as a step function.

    Args:
        events: columns ``time`` (days), ``code``, ``numeric_value`` (dict of arrays or DataFrame).
        code: the drug's base code, e.g. ``"DRUG//tamoxifen"`` (its events are ``code + start_suffix``
            and ``code + stop_suffix``).

    Returns:
        ``(times, doses)``: the sorted distinct event times and the dose in force from each of them
        on (before the first time the dose is 0).

    Raises:
        ValueError: a start/stop without a numeric dose, or a stop taking the dose below zero
            (naming the day).
    """
    columns = _as_arrays(events)
    times = np.asarray(columns["time"], dtype=np.float64)
    codes = np.asarray(columns["code"], dtype=object)
    sign = (codes == code + start_suffix).astype(np.float64) - (codes == code + stop_suffix)
    rows = np.flatnonzero(sign != 0)
    doses = np.asarray(columns["numeric_value"], dtype=np.float64)[rows]
    if np.isnan(doses).any() or np.isnan(times[rows]).any():
        bad = rows[np.isnan(doses) | np.isnan(times[rows])][:5].tolist()
        raise ValueError(f"events of {code!r} need a time and a numeric_value (daily dose); rows {bad} lack one.")
    t = times[rows]
    change_times, inverse = np.unique(t, return_inverse=True)
    delta = np.bincount(inverse, weights=sign[rows] * doses, minlength=change_times.size)
    level = np.cumsum(delta)
    tol = 1e-9 * max(1.0, float(np.abs(doses).max(initial=0.0)))
    if (level < -tol).any():
        day = float(change_times[np.flatnonzero(level < -tol)[0]])
        raise ValueError(f"{code + stop_suffix!r} on day {day:g} stops more than was started (daily dose below zero).")
    level[np.abs(level) <= tol] = 0.0
    return change_times, level


def _level_at(change_times: np.ndarray, level: np.ndarray, t: np.ndarray, inclusive: bool) -> np.ndarray:
    k = np.searchsorted(change_times, t, side="right" if inclusive else "left") - 1
    return np.where(k >= 0, level[np.clip(k, 0, None)] if level.size else 0.0, 0.0)


def edit_events(
    events: Mapping,
    code: str,
    *,
    scale: float | None = None,
    value: float | None = None,
    after: float = -np.inf,
    before: float = np.inf,
    start_suffix: str = "//START",
    stop_suffix: str = "//STOP",
    exposure: bool | None = None,
) -> dict[str, np.ndarray]:
    """A copy of ``events`` with ``code`` changed in the window ``[after, before)`` (days).

    Args:
        events: the item's events (dict of arrays as made by
            :func:`~monai_twin.data.build_longitudinal_items` / :func:`~monai_twin.data.forecast_item`,
            or a DataFrame with ``time`` in days); never modified.
        code: what to edit. An exposure drug is named by its base code (``"DRUG//tamoxifen"`` when
            the events hold ``DRUG//tamoxifen//START`` / ``//STOP``); see the module docstring.
        scale: multiply the values / the running daily dose (``0.5`` halves a dose).
        value: set the values / the running daily dose (``0`` stops a drug; for an exposure drug
            a positive value also starts it where it was not taken).
        after, before: the window in the subject's days (default: all time).
        start_suffix, stop_suffix: how exposure events are marked.
        exposure: treat ``code`` as an exposure drug (``True``) or a plain code (``False``);
            ``None`` decides from the events (start/stop rows present). Pass ``True`` to start a
            drug the patient has never had (``value=`` a daily dose).

    Returns:
        dict of arrays with the same columns; rows in time order (rows without a time first).

    Raises:
        ValueError: neither or both of ``scale`` and ``value``; an empty window; or an edit that
            changes nothing (no event of ``code`` in the window, or a drug not taken there) --
            almost always a mistake, so it is reported with the codes present.

    Example::

        last_scan = item["history_times"][-1]
        halved = edit_events(item["events"], "DRUG//tamoxifen", scale=0.5, after=last_scan)
    """
    if (scale is None) == (value is None):
        raise ValueError("give exactly one of scale= or value=.")
    factor = None if scale is None else float(scale)
    setting = None if value is None else float(value)
    if (factor is not None and factor < 0) or (setting is not None and setting < 0):
        raise ValueError(f"scale= and value= must be >= 0, got scale={scale}, value={value}.")
    if not after < before:
        raise ValueError(f"the window [after={after}, before={before}) is empty.")
    columns = _as_arrays(events)
    codes = np.asarray(columns["code"], dtype=object)
    if exposure is None:
        exposure = bool(np.isin(codes, [code + start_suffix, code + stop_suffix]).any() and not (codes == code).any())
    if exposure:
        return _edit_exposure(columns, code, factor, setting, after, before, start_suffix, stop_suffix)
    times = np.asarray(columns["time"], dtype=np.float64)
    hit = (codes == code) & (times >= after) & (times < before)
    if not hit.any():
        present = sorted({str(c) for c in codes})
        raise ValueError(
            f"no event with code {code!r} between day {after} and day {before}; codes present: {present[:10]}"
        )
    values = columns["numeric_value"].astype(np.float64)
    values[hit] = values[hit] * factor if factor is not None else setting
    columns["numeric_value"] = values
    return columns


def _edit_exposure(
    columns: dict[str, np.ndarray],
    code: str,
    factor: float | None,
    setting: float | None,
    after: float,
    before: float,
    start_suffix: str,
    stop_suffix: str,
) -> dict[str, np.ndarray]:
    change_times, level = running_dose(columns, code, start_suffix=start_suffix, stop_suffix=stop_suffix)
    times = np.asarray(columns["time"], dtype=np.float64)
    codes = np.asarray(columns["code"], dtype=object)
    drug = np.isin(codes, [code + start_suffix, code + stop_suffix])
    inside = drug & (times >= after) & (times < before)
    # the points where the edited dose may change: the window start and the recorded changes in it
    if not np.isfinite(after) and not change_times.size:
        raise ValueError(f"no {code + start_suffix!r}/{code + stop_suffix!r} events: give after= to start {code!r}.")
    lo = after if np.isfinite(after) else change_times[0]
    points = np.unique(np.concatenate([[lo], change_times[(change_times > lo) & (change_times < before)]]))
    recorded = _level_at(change_times, level, points, inclusive=True)
    edited = recorded * factor if factor is not None else np.full(points.size, setting)
    if np.allclose(edited, recorded):
        raise ValueError(
            f"the edit of {code!r} changes nothing between day {after} and day {before}: the recorded daily dose "
            f"there is {sorted(set(np.round(recorded, 6).tolist()))}."
        )
    new_t, new_code, new_dose = [], [], []

    def switch(t: float, old: float, new: float) -> None:
        if np.isclose(old, new):
            return
        if old > 0:
            new_t.append(t), new_code.append(code + stop_suffix), new_dose.append(old)
        if new > 0:
            new_t.append(t), new_code.append(code + start_suffix), new_dose.append(new)

    current = float(_level_at(change_times, level, np.array([lo]), inclusive=False)[0])
    for t, dose in zip(points, edited):
        switch(float(t), current, float(dose))
        current = float(dose)
    if np.isfinite(before):
        switch(float(before), current, float(_level_at(change_times, level, np.array([before]), inclusive=False)[0]))
    keep = ~inside
    n = len(new_t)
    # new rows copy the other columns (unit, subject_id, ...) from a recorded dose of the drug, else
    # from any timed row (the unit is then left empty)
    template = int(np.flatnonzero(drug)[0]) if drug.any() else int(np.argmax(np.isfinite(times)))
    added: dict[str, np.ndarray] = {}
    for key, column in columns.items():
        if key == "time":
            added[key] = np.asarray(new_t, dtype=column.dtype if column.dtype.kind == "f" else np.float64)
        elif key == "code":
            added[key] = np.asarray(new_code, dtype=column.dtype)
        elif key == "numeric_value":
            added[key] = np.asarray(new_dose, dtype=np.float64)
        elif key == "text_value" or (key == "unit" and not drug.any()):
            added[key] = np.full(n, None, dtype=object) if column.dtype == object else np.full(n, np.nan)
        else:  # unit, subject_id, ...: as on the drug's recorded rows
            added[key] = np.repeat(column[template : template + 1], n)
    merged = {k: np.concatenate([v[keep], added[k]]) for k, v in columns.items()}
    t_all = np.asarray(merged["time"], dtype=np.float64)
    order = np.lexsort((np.arange(t_all.size), np.nan_to_num(t_all, nan=-np.inf)))
    return {k: v[order] for k, v in merged.items()}
