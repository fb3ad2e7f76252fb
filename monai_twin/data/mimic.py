"""MIMIC-IV (``hosp`` module) to the longitudinal manifest's ``events`` / ``static`` tables.

MIMIC-IV is real, messy EHR: string results, units per row, medication orders with start/stop
times and text doses, blood pressure as ``"120/80"``. Each table is converted by one documented
rule, vectorised with pandas (no Python loop per row):

``labevents`` + ``d_labitems``
    code ``LAB//<itemid>//<valueuom>`` (``UNK`` when there is no unit), as the MEDS MIMIC-IV ETL
    does: one item measured in two units (MCHC in ``g/dL`` and ``%``) becomes two codes, so a code
    never mixes units. ``numeric_value`` = ``valuenum``; when that is empty, ``value`` parsed as a
    number; otherwise the text of ``value`` goes to ``text_value`` (``NEG``, ``HOLD.``...). The
    de-identification mask ``___`` and empty values count as missing; rows with neither a number
    nor a text are dropped (counted in ``report``). Time = ``charttime``.
``prescriptions``
    drug ``DRUG//<drug>//<dose_unit_rx>``; each order gives a ``//START`` event at ``starttime``
    and a ``//STOP`` event at ``stoptime``, both with ``numeric_value`` = the **daily dose** =
    dose x ``doses_per_24_hrs`` (the dose alone when that is empty or 0) and unit
    ``<dose_unit_rx>/day``, so the interval transforms can integrate dose x days. Text doses:
    ``"25,000"`` -> 25000, ranges ``"1-2"`` -> their midpoint 1.5; anything else keeps its text in
    ``text_value`` and no number (no exposure). No ``stoptime``: one day (stop = start + 1 day).
    ``stoptime`` before ``starttime`` (753 orders of the demo, mostly by one hour):
    ``invalid_intervals="drop"`` (default, counted), ``"swap"`` or ``"raise"``. Negative doses
    are an error naming the subject and drug.
``omr``
    ``Blood Pressure*`` results ``"120/80"`` become two events ``OMR//<result_name>//systolic``
    and ``//diastolic`` in ``mmHg``; any other result is a number (unit from the parenthesis of
    the name, ``Weight (Lbs)`` -> ``Lbs``) or, if it does not parse, text. Time = ``chartdate``
    (midnight).
``patients``
    static table: ``gender`` and ``anchor_year_group`` (categorical), ``anchor_age`` (years at
    the anchor year). ``anchor_year`` is left out (MIMIC shifts years per patient, so it carries
    no information across patients) and so is ``dod`` (an outcome, not an input).
``admissions`` (optional)
    :func:`mimic_admission_visits`: one visit per hospital admission at ``admittime``, for
    examples without images.

Times are naive datetimes (MIMIC's shifted 2100+ dates); :func:`~monai_twin.data.load_manifest`
turns them into days since each subject's first visit. The tables under ``mimic_dir`` are only
read, never written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = [
    "MimicTables",
    "load_mimic",
    "mimic_admission_visits",
    "mimic_lab_events",
    "mimic_omr_events",
    "mimic_prescription_events",
    "mimic_static",
]

_EVENT_COLUMNS = ["subject_id", "time", "code", "numeric_value", "text_value", "unit"]
_MISSING_TEXT = {"", "___", "nan", "none"}


@dataclass
class MimicTables:
    """Manifest-ready tables built from MIMIC-IV.

    Attributes:
        events: ``subject_id, time, code, numeric_value, text_value, unit`` sorted by subject and time.
        static: ``subject_id, gender, anchor_age, anchor_year_group``.
        codes: ``code, description`` (lab label/fluid/category, drug name, OMR result name).
        report: counts of rows dropped or changed by each rule.
    """

    events: pd.DataFrame
    static: pd.DataFrame
    codes: pd.DataFrame
    report: dict[str, Any] = field(default_factory=dict)


def _read(mimic_dir: Path, name: str, usecols: list[str] | None = None) -> pd.DataFrame:
    path = Path(mimic_dir) / "hosp" / f"{name}.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"MIMIC-IV table not found: {path} (expected <mimic_dir>/hosp/{name}.csv.gz).")
    return pd.read_csv(path, usecols=usecols, dtype={"subject_id": "string"}, low_memory=False)


def _clean_text(series: pd.Series) -> pd.Series:
    text = series.astype("string").str.strip()
    return text.mask(text.str.lower().isin(_MISSING_TEXT).fillna(True))


def _times(series: pd.Series, table: str, column: str) -> pd.Series:
    parsed = pd.to_datetime(series, errors="coerce", format="ISO8601")
    if isinstance(parsed.dtype, pd.DatetimeTZDtype):
        raise ValueError(f"{table}: column {column!r} holds timezone-aware times; MIMIC-IV times are naive.")
    bad = parsed.isna() & series.notna()
    if bad.any():
        examples = series[bad].head(3).tolist()
        raise ValueError(f"{table}: column {column!r} has {int(bad.sum())} unparseable time(s), e.g. {examples}.")
    return parsed


def _frame(subject, time, code, numeric, text, unit) -> pd.DataFrame:
    n = len(subject)

    def column(values, dtype) -> pd.Series:
        # scalars (one unit for a whole block) are broadcast to the block's length
        if values is None or np.isscalar(values):
            return pd.Series([values] * n, dtype=dtype)
        return pd.Series(values, dtype=dtype).reset_index(drop=True)

    return pd.DataFrame(
        {
            "subject_id": column(subject, "string"),
            "time": pd.Series(time).reset_index(drop=True),
            "code": column(code, "string"),
            "numeric_value": column(numeric, "float64"),
            "text_value": column(text, "string"),
            "unit": column(unit, "string"),
        }
    )


def mimic_lab_events(
    labevents: pd.DataFrame, d_labitems: pd.DataFrame | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``labevents`` (+ ``d_labitems`` for descriptions) -> events, code descriptions, report.

    See the module docstring for the rule. The input frames are not modified.
    """
    unit = _clean_text(labevents["valueuom"])
    code = "LAB//" + labevents["itemid"].astype("string") + "//" + unit.fillna("UNK")
    numeric = pd.to_numeric(labevents["valuenum"], errors="coerce").astype("float64")
    text = _clean_text(labevents["value"])
    from_text = pd.to_numeric(text.where(numeric.isna()), errors="coerce").astype("Float64").astype("float64")
    numeric = numeric.fillna(from_text)
    text = text.where(numeric.isna())
    keep = (numeric.notna() | text.notna()).to_numpy(dtype=bool)
    events = _frame(
        labevents["subject_id"][keep],
        _times(labevents["charttime"], "labevents", "charttime")[keep],
        code[keep],
        numeric[keep],
        text[keep],
        unit[keep],
    )
    report = {"lab_rows": len(labevents), "lab_rows_without_value_dropped": int((~keep).sum()),
              "lab_numbers_parsed_from_text": int(from_text.notna().sum())}  # fmt: skip
    codes = pd.DataFrame({"code": code, "itemid": labevents["itemid"]}).drop_duplicates("code")
    if d_labitems is not None:
        labels = d_labitems.set_index("itemid")
        desc = labels["label"].astype("string") + " (" + labels["fluid"].astype("string") + ", "
        desc = desc + labels["category"].astype("string") + ")"
        codes["description"] = codes["itemid"].map(desc).astype("string")
    else:
        codes["description"] = pd.Series(pd.NA, index=codes.index, dtype="string")
    return events, codes[["code", "description"]].reset_index(drop=True), report


def _parse_doses(text: pd.Series) -> pd.Series:
    """Doses as numbers: thousands separators removed, ``a-b`` ranges -> midpoint, else NaN."""
    clean = text.astype("string").str.strip().str.replace(",", "", regex=False)
    single = pd.to_numeric(clean, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    parts = clean.str.extract(r"^\s*([0-9]*\.?[0-9]+)\s*-\s*([0-9]*\.?[0-9]+)\s*$")
    low = pd.to_numeric(parts[0], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    high = pd.to_numeric(parts[1], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    return pd.Series(np.where(np.isnan(single), (low + high) / 2, single), index=text.index, dtype="float64")


def mimic_prescription_events(
    prescriptions: pd.DataFrame, invalid_intervals: Literal["drop", "swap", "raise"] = "drop"
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``prescriptions`` -> START/STOP events with daily doses, code descriptions, report.

    Args:
        prescriptions: the MIMIC-IV table (not modified).
        invalid_intervals: orders whose ``stoptime`` is before ``starttime``: ``"drop"`` them
            (counted in the report), ``"swap"`` the two times, or ``"raise"`` a ``ValueError``.
    """
    if invalid_intervals not in ("drop", "swap", "raise"):
        raise ValueError(f"invalid_intervals must be 'drop', 'swap' or 'raise', got {invalid_intervals!r}.")
    rx = prescriptions
    start = _times(rx["starttime"], "prescriptions", "starttime")
    stop = _times(rx["stoptime"], "prescriptions", "stoptime")
    if start.isna().any():
        rows = np.flatnonzero(start.isna().to_numpy())
        raise ValueError(
            f"prescriptions: column 'starttime' is empty in {rows.size} row(s) (rows {rows[:10].tolist()})."
        )
    no_stop = stop.isna()
    stop = stop.fillna(start + pd.Timedelta(days=1))
    backwards = (stop < start).to_numpy(dtype=bool)
    drug = _clean_text(rx["drug"]).fillna("UNKNOWN")
    dose_unit = _clean_text(rx["dose_unit_rx"]).fillna("UNK")
    base = "DRUG//" + drug + "//" + dose_unit
    if backwards.any():
        if invalid_intervals == "raise":
            rows = np.flatnonzero(backwards)
            subjects = sorted(set(rx["subject_id"].iloc[rows].astype(str)))
            raise ValueError(
                f"prescriptions: 'stoptime' before 'starttime' in {rows.size} row(s) (rows {rows[:10].tolist()}); "
                f"drug(s) {sorted(set(base.iloc[rows]))[:5]}; subject(s) {subjects[:10]}."
            )
        if invalid_intervals == "swap":
            start, stop = start.where(~backwards, stop), stop.where(~backwards, start)
    keep = ~backwards if invalid_intervals == "drop" else np.ones(len(rx), dtype=bool)
    dose = _parse_doses(rx["dose_val_rx"])
    per_day = pd.to_numeric(rx["doses_per_24_hrs"], errors="coerce")
    daily = dose * per_day.where(per_day > 0, 1.0)
    negative = (daily < 0).to_numpy(dtype=bool)
    if negative.any():
        rows = np.flatnonzero(negative)
        raise ValueError(
            f"prescriptions: negative dose in {rows.size} row(s) (rows {rows[:10].tolist()}); drug(s) "
            f"{sorted(set(base.iloc[rows]))[:5]}; subject(s) {sorted(set(rx['subject_id'].iloc[rows].astype(str)))[:10]}."
        )
    dose_text = _clean_text(rx["dose_val_rx"]).where(daily.isna())
    # doses that parse to nothing keep their text so the row still has a value (manifest rule)
    dose_text = dose_text.where(daily.notna(), dose_text.fillna("unknown dose"))
    unit = dose_unit + "/day"
    sel = np.flatnonzero(keep)
    parts = []
    for suffix, when in (("//START", start), ("//STOP", stop)):
        parts.append(
            _frame(
                rx["subject_id"].iloc[sel],
                when.iloc[sel],
                base.iloc[sel] + suffix,
                daily.iloc[sel],
                dose_text.iloc[sel],
                unit.iloc[sel],
            )  # fmt: skip
        )
    events = pd.concat(parts, ignore_index=True)
    codes = pd.DataFrame({"code": base, "description": drug + " (" + dose_unit + " per day)"}).drop_duplicates("code")
    report = {
        "prescription_rows": len(rx),
        "prescriptions_without_stop_given_one_day": int(no_stop.sum()),
        f"prescriptions_stop_before_start_{'dropped' if invalid_intervals == 'drop' else 'swapped'}": int(
            backwards.sum()
        ),
        "prescription_doses_unparsed": int(daily.isna().sum()),
    }
    return events, codes.reset_index(drop=True), report


def mimic_omr_events(omr: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``omr`` -> events (blood pressure split into systolic/diastolic), code descriptions, report."""
    name = _clean_text(omr["result_name"]).fillna("UNKNOWN")
    value = _clean_text(omr["result_value"])
    time = _times(omr["chartdate"], "omr", "chartdate")
    is_bp = name.str.startswith("Blood Pressure").fillna(False).to_numpy(dtype=bool)
    bp = value.str.extract(r"^(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)$")
    bp_ok = is_bp & bp[0].notna().to_numpy(dtype=bool)
    rows = np.flatnonzero(bp_ok)
    parts = []
    for k, part in enumerate(("systolic", "diastolic")):
        parts.append(
            _frame(
                omr["subject_id"].iloc[rows],
                time.iloc[rows],
                "OMR//" + name.iloc[rows] + "//" + part,
                pd.to_numeric(bp[k].iloc[rows]),
                None,
                "mmHg",
            )  # fmt: skip
        )
    rest = np.flatnonzero(~bp_ok)
    numeric = pd.to_numeric(value.iloc[rest], errors="coerce")
    unit = name.iloc[rest].str.extract(r"\(([^)]+)\)\s*$")[0]
    parts.append(
        _frame(
            omr["subject_id"].iloc[rest],
            time.iloc[rest],
            "OMR//" + name.iloc[rest],
            numeric,
            value.iloc[rest].where(numeric.isna()),
            unit,
        )  # fmt: skip
    )
    events = pd.concat(parts, ignore_index=True)
    events = events[events["numeric_value"].notna() | events["text_value"].notna()]
    codes = pd.DataFrame({"code": events["code"].unique()})
    codes["description"] = codes["code"].str.removeprefix("OMR//").str.replace("//", " ", regex=False)
    report = {"omr_rows": len(omr), "omr_blood_pressure_split": int(bp_ok.sum()),
              "omr_blood_pressure_unparsed": int((is_bp & ~bp_ok).sum())}  # fmt: skip
    return events.reset_index(drop=True), codes, report


def mimic_static(patients: pd.DataFrame) -> pd.DataFrame:
    """``patients`` -> static table ``subject_id, gender, anchor_age, anchor_year_group``."""
    return pd.DataFrame(
        {
            "subject_id": patients["subject_id"].astype("string"),
            "gender": _clean_text(patients["gender"]),
            "anchor_age": pd.to_numeric(patients["anchor_age"], errors="coerce").astype("float64"),
            "anchor_year_group": _clean_text(patients["anchor_year_group"]),
        }
    ).sort_values("subject_id", kind="stable", ignore_index=True)


def mimic_admission_visits(mimic_dir: str | os.PathLike, image: str = "none") -> pd.DataFrame:
    """One visit per hospital admission (``admittime``), a stand-in visit table for examples.

    ``image`` fills the manifest's required image column (load it with ``check_images="none"``).
    """
    adm = _read(Path(mimic_dir), "admissions", ["subject_id", "admittime"])
    time = _times(adm["admittime"], "admissions", "admittime")
    visits = pd.DataFrame({"subject_id": adm["subject_id"].astype("string"), "time": time, "image": image})
    return visits.drop_duplicates(["subject_id", "time"]).sort_values(["subject_id", "time"], ignore_index=True)


def load_mimic(
    mimic_dir: str | os.PathLike,
    tables: tuple[str, ...] = ("labevents", "prescriptions", "omr"),
    subjects: list[str] | None = None,
    invalid_intervals: Literal["drop", "swap", "raise"] = "drop",
) -> MimicTables:
    """Read MIMIC-IV ``hosp`` tables and convert them to manifest events and static tables.

    Args:
        mimic_dir: folder holding ``hosp/*.csv.gz`` (e.g. the MIMIC-IV demo 2.2).
        tables: which event tables to convert (``labevents``, ``prescriptions``, ``omr``).
        subjects: keep only these subject ids.
        invalid_intervals: rule for prescriptions whose stop is before their start.

    Example::

        mimic_dir = "../shared/data/mimic-iv-demo-2.2"
        mimic = load_mimic(mimic_dir)
        manifest = load_manifest(
            mimic_admission_visits(mimic_dir), mimic.events, mimic.static,
            check_images="none", single_visit_subjects="drop", unknown_subjects="drop",
        )
    """
    known = ("labevents", "prescriptions", "omr")
    unknown = [t for t in tables if t not in known]
    if unknown:
        raise ValueError(f"tables must be among {known}, got {unknown}.")
    root = Path(mimic_dir)
    parts, codes, report = [], [], {}
    if "labevents" in tables:
        lab = _read(root, "labevents", ["subject_id", "itemid", "charttime", "value", "valuenum", "valueuom"])
        d_lab = _read(root, "d_labitems") if (root / "hosp" / "d_labitems.csv.gz").is_file() else None
        e, c, r = mimic_lab_events(lab, d_lab)
        parts.append(e), codes.append(c), report.update(r)
    if "prescriptions" in tables:
        rx = _read(
            root, "prescriptions", ["subject_id", "starttime", "stoptime", "drug", "dose_val_rx", "dose_unit_rx",
                                    "doses_per_24_hrs"],
        )  # fmt: skip
        e, c, r = mimic_prescription_events(rx, invalid_intervals)
        parts.append(e), codes.append(c), report.update(r)
    if "omr" in tables:
        e, c, r = mimic_omr_events(_read(root, "omr"))
        parts.append(e), codes.append(c), report.update(r)
    events = pd.concat(parts, ignore_index=True) if parts else _frame([], [], [], [], [], [])
    static = mimic_static(_read(root, "patients"))
    if subjects is not None:
        keep = {str(s) for s in subjects}
        events = events[events["subject_id"].isin(keep)]
        static = static[static["subject_id"].isin(keep)]
    events = events.sort_values(["subject_id", "time", "code"], kind="stable", ignore_index=True)
    code_table = pd.concat(codes, ignore_index=True).drop_duplicates("code") if codes else pd.DataFrame()
    report["events"] = len(events)
    return MimicTables(events=events[_EVENT_COLUMNS], static=static.reset_index(drop=True), codes=code_table,
                       report=report)  # fmt: skip
