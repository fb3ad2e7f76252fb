"""Small synthetic EHR tables shared by the EHR transform tests."""

from __future__ import annotations

import numpy as np
import pandas as pd

COLUMNS = ("time", "code", "numeric_value", "text_value", "unit")


def toy_events() -> pd.DataFrame:
    """Two subjects; values chosen so every reducer can be checked by hand (see test_interval_features)."""
    return pd.DataFrame(
        {
            "subject_id": ["a"] * 8 + ["b"] * 3,
            "time": [np.nan, 0.5, 1.0, 1.0, 3.0, 5.0, 2.0, 6.0, 0.0, 1.0, 2.0],
            "code": [
                "GENOTYPE",
                "LAB//x",
                "LAB//x",
                "LAB//x",
                "LAB//y",
                "LAB//x",
                "DRUG//d//START",
                "DRUG//d//STOP",
                "LAB//x",
                "LAB//y",
                "LAB//x",
            ],
            "numeric_value": [np.nan, 1.0, 2.0, 3.0, 10.0, 4.0, 5.0, 5.0, 7.0, 8.0, np.nan],
            "text_value": ["pos", None, None, None, None, None, None, None, None, None, None],
            "unit": [None, "mg", "mg", "mg", "u", None, "mg/day", "mg/day", "mg", "u", None],
        }
    )


def toy_static() -> pd.DataFrame:
    return pd.DataFrame({"subject_id": ["a", "b"], "sex": ["F", "M"], "age": [50, 60]})


def toy_visits() -> pd.DataFrame:
    return pd.DataFrame({"subject_id": ["a", "a", "a", "b", "b"], "time": [0.0, 2.0, 5.5, 0.0, 3.0]})


def subject_events(events: pd.DataFrame, subject: str) -> dict[str, np.ndarray]:
    """One subject's events as the dict of arrays a dataset item carries."""
    rows = events[events["subject_id"] == subject]
    return {
        c: rows[c].to_numpy(dtype=np.float64 if c in ("time", "numeric_value") else object)
        for c in COLUMNS
        if c in rows.columns
    }


def assert_same_arrays(a: dict, b: dict) -> None:
    """Equal keys and element-wise equal arrays (NaN == NaN, object arrays included)."""
    assert a.keys() == b.keys()
    for key in a:
        assert pd.Series(a[key]).equals(pd.Series(b[key])), key


def random_cohort(n_subjects: int, events_per_subject: int, n_codes: int = 4, seed: int = 0, drugs: bool = True):
    """A random cohort in manifest form (sorted by subject, time): events and visits tables.

    Each subject has 2-5 visits over ~100 days, point events of ``n_codes`` lab codes (some values
    NaN, some duplicate timestamps) and, with ``drugs``, non-overlapping start/stop pairs of one drug.
    """
    rng = np.random.default_rng(seed)
    events, visits = [], []
    for s in range(n_subjects):
        sid = f"s{s:04d}"
        n_visits = int(rng.integers(2, 6))
        vt = np.sort(rng.choice(np.arange(0, 100, 0.5), size=n_visits, replace=False))
        vt = vt - vt[0]
        visits.append(pd.DataFrame({"subject_id": sid, "time": vt}))
        t = np.round(rng.uniform(-10, vt[-1] + 10, size=events_per_subject), 1)
        v = rng.normal(size=events_per_subject) * 3 + 10
        v[rng.random(events_per_subject) < 0.1] = np.nan
        codes = rng.choice([f"LAB//{k}" for k in range(n_codes)], size=events_per_subject)
        frame = pd.DataFrame({"subject_id": sid, "time": t, "code": codes, "numeric_value": v})
        if drugs:
            starts = np.sort(rng.uniform(-5, vt[-1], size=2))
            stop0 = min(starts[0] + rng.uniform(1, 20), starts[1])
            frame = pd.concat(
                [
                    frame,
                    pd.DataFrame(
                        {
                            "subject_id": sid,
                            "time": [starts[0], stop0, starts[1], starts[1] + rng.uniform(1, 30)],
                            "code": ["DRUG//d//START", "DRUG//d//STOP"] * 2,
                            "numeric_value": [10.0, 10.0, 20.0, 20.0],
                        }
                    ),
                ]
            )
        events.append(frame)
    events_df = pd.concat(events, ignore_index=True)
    events_df = events_df.sort_values(["subject_id", "time"], kind="stable").reset_index(drop=True)
    return events_df, pd.concat(visits, ignore_index=True)
