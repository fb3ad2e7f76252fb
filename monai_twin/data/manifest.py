"""The longitudinal manifest: three tables that describe a cohort of patients scanned over time.

* ``visits``: one row per scan -- ``subject_id, time, image`` (+ optional ``mask`` and any extra
  columns such as ``view``/``laterality`` or more image columns named in ``image_columns``).
* ``events``: MEDS-style long format -- ``subject_id, time, code, numeric_value`` (+ optional
  ``text_value``, ``unit``, any extra columns). A row with an empty ``time`` is a static
  measurement, as in MEDS.
* ``static``: ``subject_id`` + one column per attribute (sex, birth year, genotype, ...).

Every table may be given as a CSV (``.csv``, ``.csv.gz``, ``.tsv``) or Parquet file, or as a
:class:`pandas.DataFrame` (which is copied, never modified). :func:`load_manifest` validates all of
it and reports *every* problem of a kind at once in one :class:`ManifestError` whose message names
the table, column, rows (0-based data rows; CSV line numbers as well) and subjects.

Time rule (applies to ``visits.time`` and ``events.time``):

* a time column holds either **numbers of days** (any origin) or **datetimes**; one manifest uses
  one kind for both tables.
* datetimes are ``datetime64`` columns, ``datetime``/``Timestamp`` objects or ISO 8601 strings
  (``2031-05-02``, ``2031-05-02 14:30``, ``2031-05-02T14:30:00+02:00``). Other formats are
  rejected rather than guessed (``01/02/2031`` is ambiguous).
* either every datetime in the manifest is timezone-aware (converted to UTC) or none is (taken as
  the wall-clock of one site); a mix is an error, since naive times cannot be ordered against
  aware ones without guessing a zone.
* internally each subject's times are float **days since that subject's first visit** (its first
  visit is day 0); the origin of each subject is kept in :attr:`LongitudinalManifest.origins` so a
  date can be turned into days (:meth:`LongitudinalManifest.to_days`) and back.

Building on pandas for parsing and on nibabel / SimpleITK to read image headers.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

__all__ = [
    "EVENT_COLUMNS",
    "STATIC_COLUMNS",
    "VISIT_COLUMNS",
    "LongitudinalManifest",
    "ManifestError",
    "ManifestProblem",
    "load_manifest",
    "manifest_summary",
    "read_table",
]

TableSource = str | os.PathLike | pd.DataFrame

#: Required columns of each table.
VISIT_COLUMNS = ("subject_id", "time", "image")
EVENT_COLUMNS = ("subject_id", "time", "code", "numeric_value")
STATIC_COLUMNS = ("subject_id",)
#: Optional event columns with a meaning of their own.
EVENT_OPTIONAL_COLUMNS = ("text_value", "unit")

_TABLE_FILE_SUFFIXES = (".parquet", ".pq", ".csv", ".csv.gz", ".tsv", ".tsv.gz")
_DAY = np.timedelta64(1, "D")
# An explicit zone after a clock time: "...14:30Z", "...14:30:00+02:00", "...14:30 -0500", "... UTC".
_AWARE_PATTERN = r"\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?\s*(?:Z|UTC|GMT|[+-]\d{2}:?\d{2})$"
_MAX_LISTED = 10


@dataclass(frozen=True)
class ManifestProblem:
    """One kind of problem found in one table/column, with every row and subject it concerns.

    Attributes:
        table: ``"visits"``, ``"events"`` or ``"static"``.
        kind: short machine-readable name (``"missing_column"``, ``"dtype"``, ``"unparseable_time"``,
            ``"mixed_timezones"``, ``"duplicate_visit"``, ``"missing_image"``, ``"unreadable_image"``,
            ``"unknown_subject"``, ``"empty_table"``, ``"single_visit"``, ``"missing_value"``, ...).
        message: what is wrong and what was expected.
        column: the column concerned, if any.
        rows: 0-based data-row positions in the table as given.
        subjects: subject ids concerned.
    """

    table: str
    kind: str
    message: str
    column: str | None = None
    rows: tuple[int, ...] = ()
    subjects: tuple[str, ...] = ()
    source: str | None = None

    def describe(self) -> str:
        where = f"{self.table}" + (f" ({self.source})" if self.source else "")
        if self.column:
            where += f", column '{self.column}'"
        text = f"[{where}] {self.message}"
        if self.rows:
            listed = ", ".join(str(r) for r in self.rows[:_MAX_LISTED])
            more = f" and {len(self.rows) - _MAX_LISTED} more" if len(self.rows) > _MAX_LISTED else ""
            text += f"; {len(self.rows)} row(s): {listed}{more}"
            if self.source and self.source.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
                lines = ", ".join(str(r + 2) for r in self.rows[:_MAX_LISTED])
                text += f" (file lines {lines}{more})"
        if self.subjects:
            listed = ", ".join(self.subjects[:_MAX_LISTED])
            more = f" and {len(self.subjects) - _MAX_LISTED} more" if len(self.subjects) > _MAX_LISTED else ""
            text += f"; subject(s): {listed}{more}"
        return text


class ManifestError(ValueError):
    """Raised when a manifest fails validation; ``problems`` lists every problem found."""

    def __init__(self, problems: Sequence[ManifestProblem]):
        self.problems = list(problems)
        lines = [f"the longitudinal manifest has {len(self.problems)} problem(s):"]
        lines += [f"  - {p.describe()}" for p in self.problems]
        super().__init__("\n".join(lines))

    def kinds(self) -> set[str]:
        """The set of problem kinds, handy to branch on or to test."""
        return {p.kind for p in self.problems}


# ----------------------------------------------------------------------------------------------
# reading


def _find_table_file(directory: Path, name: str) -> Path | None:
    for suffix in _TABLE_FILE_SUFFIXES:
        candidate = directory / f"{name}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_table(source: TableSource, table: str) -> tuple[pd.DataFrame, str | None]:
    """Read one manifest table from a CSV/Parquet path or copy it from a DataFrame.

    CSV columns ``subject_id``, ``code``, ``text_value``, ``unit``, ``image``, ``mask`` and ``time``
    are read as text so that ids keep their leading zeros and times are parsed by the manifest's
    own rule, not pandas' guesses.

    Returns:
        the table and a label for its source (the file path, or ``None`` for a DataFrame).
    """
    if isinstance(source, pd.DataFrame):
        return source.copy(deep=True), None
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"{table}: expected a path to a CSV/Parquet file or a pandas DataFrame, got {type(source)!r}.")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"{table}: file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{table}: expected a file, got the directory {path}.")
    name = path.name.lower()
    text_columns = {"subject_id", "code", "text_value", "unit", "image", "mask", "time"}
    try:
        if name.endswith((".parquet", ".pq")):
            frame = pd.read_parquet(path)
        elif name.endswith((".csv", ".csv.gz", ".tsv", ".tsv.gz")):
            sep = "\t" if ".tsv" in name else ","
            header = pd.read_csv(path, sep=sep, nrows=0)
            dtype = {c: "string" for c in header.columns if c in text_columns}
            frame = pd.read_csv(path, sep=sep, dtype=dtype, keep_default_na=True)
        else:
            raise ValueError(
                f"{table}: unsupported file type {path.name!r}; expected one of {', '.join(_TABLE_FILE_SUFFIXES)}."
            )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{table}: could not read {path}: {err}") from err
    except Exception as err:  # pyarrow raises its own error types for corrupt files
        if type(err).__module__.startswith("pyarrow"):
            raise ValueError(f"{table}: could not read {path}: {err}") from err
        raise
    return frame, str(path)


# ----------------------------------------------------------------------------------------------
# column checks


class _Collector:
    """Collects problems for one table so they can all be reported together."""

    def __init__(self, table: str, source: str | None):
        self.table, self.source = table, source
        self.problems: list[ManifestProblem] = []

    def add(self, kind: str, message: str, column: str | None = None, rows=(), subjects=()) -> None:
        self.problems.append(
            ManifestProblem(
                table=self.table,
                kind=kind,
                message=message,
                column=column,
                rows=tuple(int(r) for r in rows),
                subjects=tuple(str(s) for s in subjects),
                source=self.source,
            )
        )


def _is_missing(series: pd.Series) -> np.ndarray:
    missing = np.array(series.isna(), dtype=bool)  # a writable copy (pandas may hand out read-only views)
    if pd.api.types.is_object_dtype(series.dtype) or pd.api.types.is_string_dtype(series.dtype):
        stripped = series.astype("string").str.strip()
        missing |= (stripped == "").fillna(True).to_numpy(dtype=bool)
    return missing


def _subject_ids(frame: pd.DataFrame, out: _Collector) -> pd.Series:
    """Normalise ``subject_id`` to strings; integers are accepted (MIMIC uses them)."""
    col = frame["subject_id"]
    missing = _is_missing(col)
    if missing.any():
        out.add("missing_value", "subject_id is empty", "subject_id", rows=np.flatnonzero(missing))
    dtype = col.dtype
    if pd.api.types.is_bool_dtype(dtype) or pd.api.types.is_float_dtype(dtype):
        out.add(
            "dtype",
            f"subject_id must be text or integers, got {dtype} (float ids lose digits; read the column as text)",
            "subject_id",
        )
    elif pd.api.types.is_object_dtype(dtype):
        bad = (
            ~missing & ~col.map(lambda v: isinstance(v, (str, int, np.integer)) and not isinstance(v, bool)).to_numpy()
        )
        if bad.any():
            out.add("dtype", "subject_id must be text or integers", "subject_id", rows=np.flatnonzero(bad))
    return col.astype("string").str.strip()


def _text_column(frame: pd.DataFrame, column: str, out: _Collector, required: bool) -> pd.Series:
    col = frame[column]
    missing = _is_missing(col)
    if required and missing.any():
        out.add("missing_value", f"{column} is empty", column, rows=np.flatnonzero(missing))
    dtype = col.dtype
    if not (
        pd.api.types.is_object_dtype(dtype)
        or pd.api.types.is_string_dtype(dtype)
        or pd.api.types.is_integer_dtype(dtype)
    ):
        if not missing.all():
            out.add("dtype", f"{column} must be text, got {dtype}", column)
    elif pd.api.types.is_object_dtype(dtype):
        bad = (
            ~missing & ~col.map(lambda v: isinstance(v, (str, int, np.integer)) and not isinstance(v, bool)).to_numpy()
        )
        if bad.any():
            out.add("dtype", f"{column} must be text", column, rows=np.flatnonzero(bad))
    result = col.astype("string").str.strip()
    return result.mask(pd.Series(missing, index=col.index))


@dataclass
class _ParsedTimes:
    kind: Literal["days", "datetime", "none"]
    values: np.ndarray  # float64 days, or datetime64[ns] (naive; aware converted to UTC)
    missing: np.ndarray  # empty cells
    invalid: np.ndarray  # present but unusable (already reported)
    aware: Literal["aware", "naive", "none"] = "none"

    @property
    def unusable(self) -> np.ndarray:
        return self.missing | self.invalid


def _parse_times(col: pd.Series, column: str, out: _Collector) -> _ParsedTimes:
    """Parse a time column by the module's time rule; problems go to ``out``."""
    n = len(col)
    dtype = col.dtype
    if isinstance(dtype, pd.DatetimeTZDtype):
        values = col.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
        missing = np.isnat(values)
        return _ParsedTimes("datetime", values, missing, np.zeros(n, bool), "aware" if (~missing).any() else "none")
    if pd.api.types.is_datetime64_dtype(dtype):
        values = col.to_numpy(dtype="datetime64[ns]")
        missing = np.isnat(values)
        return _ParsedTimes("datetime", values, missing, np.zeros(n, bool), "naive" if (~missing).any() else "none")
    if pd.api.types.is_bool_dtype(dtype):
        out.add("dtype", f"{column} must be numbers of days or datetimes, got booleans", column)
        return _ParsedTimes("none", np.full(n, np.nan), np.zeros(n, bool), np.ones(n, bool))
    if pd.api.types.is_numeric_dtype(dtype):
        values = np.array(col.to_numpy(dtype=np.float64, na_value=np.nan))
        missing = np.isnan(values)
        infinite = np.isinf(values)
        if infinite.any():
            out.add("unparseable_time", f"{column} holds infinite values", column, rows=np.flatnonzero(infinite))
            values = np.where(infinite, np.nan, values)
        return _ParsedTimes("days", values, missing, infinite)
    if not (pd.api.types.is_object_dtype(dtype) or pd.api.types.is_string_dtype(dtype)):
        out.add("dtype", f"{column} must be numbers of days or datetimes, got {dtype}", column)
        return _ParsedTimes("none", np.full(n, np.nan), np.zeros(n, bool), np.ones(n, bool))

    # text / python objects: numbers of days, ISO 8601 strings or datetime objects
    missing = _is_missing(col)
    if pd.api.types.is_object_dtype(dtype):  # python objects may be datetimes; a string column cannot
        is_datetime_obj = col.map(lambda v: hasattr(v, "year") and hasattr(v, "tzinfo")).to_numpy(dtype=bool)
        obj_aware = col.map(lambda v: getattr(v, "tzinfo", None) is not None).to_numpy(dtype=bool) & is_datetime_obj
    else:
        is_datetime_obj = obj_aware = np.zeros(n, dtype=bool)
    text = col.astype("string").str.strip()
    numbers = pd.to_numeric(text.where(~pd.Series(is_datetime_obj | missing, index=col.index)), errors="coerce")
    is_number = numbers.notna().to_numpy() & ~missing & ~is_datetime_obj
    rest = ~missing & ~is_number
    if is_number.any() and not rest.any():
        values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
        infinite = np.isinf(values)
        if infinite.any():
            out.add("unparseable_time", f"{column} holds infinite values", column, rows=np.flatnonzero(infinite))
            values = np.where(infinite, np.nan, values)
        return _ParsedTimes("days", values, missing, infinite)
    if is_number.any() and rest.any():
        out.add(
            "mixed_time_kinds",
            f"{column} mixes numbers of days with dates; use one kind for the whole manifest",
            column,
            rows=np.flatnonzero(is_number),
        )
    aware = np.zeros(n, dtype=bool)
    aware[rest] = text[rest].str.contains(_AWARE_PATTERN, regex=True, flags=re.IGNORECASE).fillna(False).to_numpy(bool)
    aware |= obj_aware
    naive = rest & ~aware
    values = np.full(n, np.datetime64("NaT"), dtype="datetime64[ns]")
    bad = np.zeros(n, dtype=bool)
    for mask, utc in ((naive, False), (aware, True)):
        if not mask.any():
            continue
        subset = col[mask]
        subset = subset.where(pd.Series(is_datetime_obj[mask], index=subset.index), text[mask])
        try:
            parsed = pd.to_datetime(subset, errors="coerce", format="ISO8601", utc=utc)
        except (ValueError, TypeError):  # mixed objects pandas refuses as a whole: go element-wise
            parsed = pd.Series([pd.to_datetime(v, errors="coerce", format="ISO8601", utc=utc) for v in subset])
        if utc:
            parsed = parsed.dt.tz_localize(None)
        elif isinstance(parsed.dtype, pd.DatetimeTZDtype):
            parsed = parsed.dt.tz_localize(None)
        arr = parsed.to_numpy(dtype="datetime64[ns]")
        values[mask] = arr
        bad[mask] = np.isnat(arr)
    bad &= rest & ~is_number
    if bad.any():
        examples = ", ".join(repr(str(v)) for v in col[bad].head(3))
        out.add(
            "unparseable_time",
            f"{column} could not be parsed as an ISO 8601 datetime (e.g. {examples}); "
            "expected YYYY-MM-DD[ HH:MM[:SS]][+HH:MM] or numbers of days",
            column,
            rows=np.flatnonzero(bad),
        )
    if aware[rest].any() and naive[rest & ~bad].any():
        out.add(
            "mixed_timezones",
            f"{column} mixes timezone-aware and naive datetimes; give every time a zone or none",
            column,
            rows=np.flatnonzero(naive & ~bad) if naive.sum() <= aware.sum() else np.flatnonzero(aware),
        )
    state: Literal["aware", "naive", "none"] = "aware" if aware.any() else ("naive" if naive.any() else "none")
    return _ParsedTimes("datetime", values, missing, bad | is_number, state)


# ----------------------------------------------------------------------------------------------
# image checks


def _image_problem(path: str) -> str | None:
    """``None`` if the header of the image at ``path`` can be read, else the reason."""
    p = Path(path)
    if not p.exists():
        return "missing"
    try:
        lower = p.name.lower()
        if p.is_dir():  # a DICOM series folder
            import SimpleITK as sitk

            if not sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(p)):
                return "unreadable: folder holds no DICOM series"
        elif lower.endswith((".nii", ".nii.gz", ".mgz", ".mgh", ".img", ".hdr")):
            import nibabel as nib

            img = nib.load(str(p))
            if len(img.shape) < 2:
                return f"unreadable: image has shape {img.shape}, expected 2D or more"
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            reader.ReadImageInformation()
    except Exception as err:  # any reader failure means "unreadable"; say why
        return f"unreadable: {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    return None


def _check_images(
    paths: pd.Series, column: str, subjects: pd.Series, mode: str, out: _Collector, progress: bool
) -> None:
    present = paths.notna().to_numpy()
    index = np.flatnonzero(present)
    if mode == "none" or index.size == 0:
        return
    values = paths.to_numpy(dtype=object)
    if mode == "exists":
        exists = np.array([os.path.exists(values[i]) for i in index], dtype=bool)
        reasons = [None if e else "missing" for e in exists]
    else:
        from concurrent.futures import ThreadPoolExecutor

        items = [values[i] for i in index]
        with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            iterator = pool.map(_image_problem, items, chunksize=16)
            if progress:
                from tqdm.auto import tqdm

                iterator = tqdm(iterator, total=len(items), desc=f"checking {column} files", unit="file")
            reasons = list(iterator)
    missing = [i for i, r in zip(index, reasons) if r == "missing"]
    unreadable = [(i, r) for i, r in zip(index, reasons) if r is not None and r != "missing"]
    sid = subjects.to_numpy(dtype=object)
    if missing:
        examples = ", ".join(str(values[i]) for i in missing[:3])
        out.add(
            "missing_image",
            f"{len(missing)} {column} file(s) do not exist (e.g. {examples})",
            column,
            rows=missing,
            subjects=sorted({str(sid[i]) for i in missing}),
        )
    if unreadable:
        examples = "; ".join(f"{values[i]} ({r})" for i, r in unreadable[:3])
        out.add(
            "unreadable_image",
            f"{len(unreadable)} {column} file(s) exist but their header cannot be read: {examples}",
            column,
            rows=[i for i, _ in unreadable],
            subjects=sorted({str(sid[i]) for i, _ in unreadable}),
        )


# ----------------------------------------------------------------------------------------------
# the manifest


@dataclass
class LongitudinalManifest:
    """A validated cohort: visits, events and static attributes with times in days per subject.

    Do not build one by hand; use :func:`load_manifest` (or :meth:`from_directory`), which
    validates. The tables are sorted by ``(subject_id, time)`` and have a fresh ``RangeIndex``.

    Attributes:
        visits: ``subject_id`` (str), ``time`` (float days since the subject's first visit),
            ``image`` (absolute path) and every other column given (image columns made absolute).
        events: ``subject_id``, ``time`` (float days on the same axis; NaN for static rows),
            ``code`` (str), ``numeric_value`` (float, NaN when the event has only text),
            ``text_value`` and ``unit`` (str or missing), and extra columns.
        static: ``subject_id`` + attributes, one row per subject that has static data.
        origins: per subject, the time of its first visit as given (``Timestamp`` for datetime
            manifests, float for numeric ones): day 0 on the subject's axis.
        time_kind: ``"datetime"`` or ``"days"`` -- what the input times were.
        image_columns: the visit columns that hold image paths.
        report: counts of what loading did (rows dropped by a policy, static rows, ...).
    """

    visits: pd.DataFrame
    events: pd.DataFrame
    static: pd.DataFrame
    origins: pd.Series
    time_kind: Literal["datetime", "days"]
    image_columns: tuple[str, ...] = ("image",)
    root: Path | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._visit_slices = _group_slices(self.visits["subject_id"])
        self._event_slices = _group_slices(self.events["subject_id"])
        self._static_rows = {sid: i for i, sid in enumerate(self.static["subject_id"].tolist())}

    # -- look-ups --------------------------------------------------------------------------
    @property
    def subjects(self) -> list[str]:
        """Subject ids with visits, sorted."""
        return list(self._visit_slices)

    def __len__(self) -> int:
        return len(self._visit_slices)

    def __repr__(self) -> str:
        return (
            f"LongitudinalManifest(subjects={len(self)}, visits={len(self.visits)}, events={len(self.events)}, "
            f"static_attributes={max(0, self.static.shape[1] - 1)}, time_kind={self.time_kind!r})"
        )

    def _check_subject(self, subject_id: str) -> str:
        sid = str(subject_id)
        if sid not in self._visit_slices:
            raise KeyError(f"subject_id {sid!r} is not in the manifest (it has {len(self)} subjects).")
        return sid

    def subject_visits(self, subject_id: str) -> pd.DataFrame:
        """The visits of one subject, in time order."""
        sid = self._check_subject(subject_id)
        return self.visits.iloc[self._visit_slices[sid]]

    def subject_events(self, subject_id: str) -> pd.DataFrame:
        """The events of one subject, in time order (static rows, with NaN time, first)."""
        sid = self._check_subject(subject_id)
        sl = self._event_slices.get(sid)
        return self.events.iloc[sl] if sl is not None else self.events.iloc[0:0]

    def subject_static(self, subject_id: str) -> dict[str, Any]:
        """The static attributes of one subject (empty dict if it has none)."""
        sid = self._check_subject(subject_id)
        row = self._static_rows.get(sid)
        if row is None:
            return {}
        record = self.static.iloc[row].to_dict()
        record.pop("subject_id", None)
        return record

    def event_slice(self, subject_id: str) -> slice:
        """Row slice of ``events`` belonging to ``subject_id`` (empty slice if none)."""
        return self._event_slices.get(str(subject_id), slice(0, 0))

    # -- time axis -------------------------------------------------------------------------
    def to_days(self, subject_id: str, when: Any) -> float:
        """Convert a date (datetime manifests) or a number (days manifests) to the subject's days.

        Example::

            days = manifest.to_days("p001", "2032-03-01")  # e.g. a forecast date
        """
        sid = self._check_subject(subject_id)
        origin = self.origins[sid]
        if self.time_kind == "datetime":
            stamp = pd.Timestamp(when)
            if stamp.tzinfo is not None:
                if self.report.get("timezone") != "aware":
                    raise ValueError(f"{when!r} has a timezone but the manifest's times are naive; give a naive time.")
                stamp = stamp.tz_convert("UTC").tz_localize(None)
            elif self.report.get("timezone") == "aware":
                raise ValueError(f"{when!r} has no timezone but the manifest's times are UTC-aware; add a zone.")
            return float((stamp - origin) / pd.Timedelta(days=1))
        if isinstance(when, (pd.Timestamp, np.datetime64, str)) or hasattr(when, "year"):
            raise TypeError(f"the manifest's times are numbers of days; got {when!r}.")
        return float(when) - float(origin)

    def to_time(self, subject_id: str, days: float) -> Any:
        """Inverse of :meth:`to_days`: the subject's day number as a Timestamp or a number."""
        sid = self._check_subject(subject_id)
        origin = self.origins[sid]
        if self.time_kind == "datetime":
            return origin + pd.Timedelta(days=float(days))
        return float(origin) + float(days)

    # -- subsets / persistence --------------------------------------------------------------
    def select(self, subjects: Iterable[str]) -> LongitudinalManifest:
        """A manifest restricted to ``subjects`` (e.g. a training split)."""
        keep = {str(s) for s in subjects}
        unknown = sorted(keep - set(self._visit_slices))
        if unknown:
            raise KeyError(f"select(): subject(s) not in the manifest: {', '.join(unknown[:_MAX_LISTED])}")
        return LongitudinalManifest(
            visits=self.visits[self.visits["subject_id"].isin(keep)].reset_index(drop=True),
            events=self.events[self.events["subject_id"].isin(keep)].reset_index(drop=True),
            static=self.static[self.static["subject_id"].isin(keep)].reset_index(drop=True),
            origins=self.origins[self.origins.index.isin(keep)],
            time_kind=self.time_kind,
            image_columns=self.image_columns,
            root=self.root,
            report=dict(self.report),
        )

    def absolute_tables(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Visits and events with times back on the input's axis (dates or the original numbers)."""
        visits, events = self.visits.copy(), self.events.copy()
        for frame in (visits, events):
            origin = frame["subject_id"].map(self.origins)
            if self.time_kind == "datetime":
                stamps = origin + pd.to_timedelta(frame["time"], unit="D")
                # a second is the finest unit the manifest promises to round-trip
                frame["time"] = stamps.dt.round("s")
                if self.report.get("timezone") == "aware":
                    frame["time"] = frame["time"].dt.tz_localize("UTC")
            else:
                frame["time"] = origin.astype(float) + frame["time"]
        return visits, events

    def save(self, directory: str | os.PathLike, file_format: Literal["parquet", "csv"] = "parquet") -> Path:
        """Write ``visits``, ``events`` and ``static`` to ``directory`` (temp name + rename each).

        Times are written on the input's axis (dates or original numbers), image paths relative
        to ``directory`` when they lie inside it, so the folder can be moved as a whole.
        """
        from ..utils.io import atomic_output_path

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        visits, events = self.absolute_tables()
        resolved = out.resolve()
        for column in self.image_columns:
            visits[column] = visits[column].map(lambda p: _relative_if_inside(p, resolved), na_action="ignore")
        suffix = ".parquet" if file_format == "parquet" else ".csv"
        if file_format not in ("parquet", "csv"):
            raise ValueError(f"file_format must be 'parquet' or 'csv', got {file_format!r}.")
        for name, frame in (("visits", visits), ("events", events), ("static", self.static)):
            if name != "visits" and frame.empty:
                continue  # absent tables mean "no events"/"no static", an empty file is an error on load
            with atomic_output_path(out / f"{name}{suffix}") as tmp:
                if file_format == "parquet":
                    frame.to_parquet(tmp, index=False)
                else:
                    frame.to_csv(tmp, index=False)
        return out

    @classmethod
    def from_directory(cls, directory: str | os.PathLike, **kwargs: Any) -> LongitudinalManifest:
        """Load ``visits.*``, ``events.*`` and ``static.*`` from a folder; see :func:`load_manifest`."""
        return load_manifest(directory, **kwargs)


def _relative_if_inside(path: str, root: Path) -> str:
    p = Path(path)
    try:
        return str(p.resolve().relative_to(root))
    except ValueError:
        return str(p)


def _group_slices(sorted_ids: pd.Series) -> OrderedDict[str, slice]:
    """Row slices per id of a column sorted by id (vectorised: one pass, no per-row Python)."""
    values = sorted_ids.to_numpy(dtype=object)
    if values.size == 0:
        return OrderedDict()
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])
    stops = np.r_[starts[1:], values.size]
    return OrderedDict((str(values[a]), slice(int(a), int(b))) for a, b in zip(starts, stops))


# ----------------------------------------------------------------------------------------------
# validation of each table


def _require_columns(frame: pd.DataFrame, required: Sequence[str], out: _Collector) -> bool:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        out.add(
            "missing_column",
            f"missing required column(s) {missing}; expected at least {list(required)}, found {list(frame.columns)}",
        )
        return False
    if frame.empty:
        out.add("empty_table", "the table has no rows")
        return False
    return True


def _validate_visits(frame, out, image_columns, root):
    subjects = _subject_ids(frame, out)
    times = _parse_times(frame["time"], "time", out)
    if times.kind != "none" and times.missing.any():
        out.add("missing_value", "time is empty; every visit needs a time", "time", rows=np.flatnonzero(times.missing))
    cleaned = frame.copy()
    cleaned["subject_id"] = subjects
    for column in image_columns:
        paths = _text_column(frame, column, out, required=(column == "image"))
        cleaned[column] = paths.map(lambda p: str((root / p) if root is not None else Path(p)), na_action="ignore")
    # duplicate (subject, time) among rows whose subject and time are valid
    valid = ~times.unusable & subjects.notna().to_numpy()
    if valid.any() and times.kind != "none":
        key = pd.DataFrame({"s": subjects.to_numpy(dtype=object)[valid], "t": times.values[valid]})
        dup = key.duplicated(keep=False).to_numpy()
        if dup.any():
            rows = np.flatnonzero(valid)[dup]
            out.add(
                "duplicate_visit",
                "more than one visit with the same (subject_id, time); keep one scan per visit time "
                "(put other views/sequences in extra image columns)",
                "time",
                rows=rows,
                subjects=sorted(set(key["s"][dup])),
            )
    return cleaned, times


def _validate_events(frame, out, valueless_events):
    subjects = _subject_ids(frame, out)
    times = _parse_times(frame["time"], "time", out)
    code = _text_column(frame, "code", out, required=True)
    cleaned = frame.copy()
    cleaned["subject_id"] = subjects
    cleaned["code"] = code
    value = frame["numeric_value"]
    if pd.api.types.is_bool_dtype(value.dtype):
        out.add("dtype", "numeric_value must be numbers, got booleans", "numeric_value")
        numbers = np.full(len(frame), np.nan)
    elif pd.api.types.is_numeric_dtype(value.dtype):
        numbers = value.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        # numbers written as text ("1.5") are accepted; anything else is a dtype problem
        missing_text = _is_missing(value)
        coerced = pd.to_numeric(value.astype("string").str.strip(), errors="coerce")
        numbers = coerced.to_numpy(dtype=np.float64, na_value=np.nan)
        bad = ~missing_text & np.isnan(numbers)
        if bad.any():
            examples = ", ".join(repr(str(v)) for v in value[bad].head(3))
            out.add(
                "dtype",
                f"numeric_value must be numbers (e.g. got {examples}); put text results in text_value",
                "numeric_value",
                rows=np.flatnonzero(bad),
            )
    infinite = np.isinf(numbers)
    if infinite.any():
        out.add("invalid_value", "numeric_value is infinite", "numeric_value", rows=np.flatnonzero(infinite))
        numbers = np.where(infinite, np.nan, numbers)
    cleaned["numeric_value"] = numbers
    for optional in EVENT_OPTIONAL_COLUMNS:
        if optional in frame.columns:
            cleaned[optional] = _text_column(frame, optional, out, required=False)
        else:
            cleaned[optional] = pd.Series(pd.NA, index=frame.index, dtype="string")
    no_value = np.isnan(numbers) & ~infinite & cleaned["text_value"].isna().to_numpy()
    if no_value.any() and valueless_events == "raise":
        out.add(
            "missing_value",
            "numeric_value is NaN and there is no text_value; give a value, or pass valueless_events='keep' "
            "for code-only events (diagnoses, procedures)",
            "numeric_value",
            rows=np.flatnonzero(no_value),
            subjects=sorted(set(subjects[no_value].dropna())),
        )
    return cleaned, times


def _validate_static(frame, out):
    subjects = _subject_ids(frame, out)
    cleaned = frame.copy()
    cleaned["subject_id"] = subjects
    dup = subjects.duplicated(keep=False).to_numpy() & subjects.notna().to_numpy()
    if dup.any():
        out.add(
            "duplicate_subject",
            "a subject has more than one static row; expected one row per subject",
            "subject_id",
            rows=np.flatnonzero(dup),
            subjects=sorted(set(subjects[dup])),
        )
    return cleaned


# ----------------------------------------------------------------------------------------------
# entry point


def load_manifest(
    visits: TableSource,
    events: TableSource | None = None,
    static: TableSource | None = None,
    *,
    root: str | os.PathLike | None = None,
    image_columns: Sequence[str] | None = None,
    check_images: Literal["header", "exists", "none"] = "header",
    unknown_subjects: Literal["raise", "drop"] = "raise",
    single_visit_subjects: Literal["raise", "drop"] = "raise",
    valueless_events: Literal["raise", "keep"] = "raise",
    progress: bool = False,
) -> LongitudinalManifest:
    """Read and validate a longitudinal manifest.

    Args:
        visits: the visits table (path or DataFrame), or a **folder** holding ``visits.*`` and
            optionally ``events.*`` and ``static.*`` (``.parquet``, ``.csv``, ``.csv.gz``, ``.tsv``).
        events: the events table; ``None`` means no events (or the folder's ``events.*``).
        static: the static table; ``None`` means none (or the folder's ``static.*``).
        root: folder that relative image paths are relative to. Default: the folder of the
            visits file, or the current directory for a DataFrame.
        image_columns: visit columns holding image paths. Default: ``image`` and, if present,
            ``mask``.
        check_images: ``"header"`` reads every image header (nibabel for NIfTI/MGH, SimpleITK
            for the rest, DICOM folders through GDCM), ``"exists"`` only checks the files exist,
            ``"none"`` skips the check.
        unknown_subjects: events/static rows whose subject has no visit: ``"raise"`` (default),
            or ``"drop"`` them -- the count is logged as a warning and kept in ``report``.
        single_visit_subjects: subjects with one visit have no forecasting target: ``"raise"``
            (default) or ``"drop"`` them (count in ``report``).
        valueless_events: events with neither a numeric nor a text value: ``"raise"`` (default) or
            ``"keep"`` (code-only events, e.g. diagnoses).
        progress: show a progress bar while checking image files.

    Returns:
        the validated :class:`LongitudinalManifest`.

    Raises:
        ManifestError: listing every problem found (a ``ValueError``).
        FileNotFoundError: a table file given explicitly does not exist.

    Example::

        manifest = load_manifest("cohort/")  # visits.parquet, events.parquet, static.parquet
        manifest = load_manifest(visits_df, events_df, static_df, root="images/")
    """
    import logging

    for name, value, allowed in (
        ("check_images", check_images, ("header", "exists", "none")),
        ("unknown_subjects", unknown_subjects, ("raise", "drop")),
        ("single_visit_subjects", single_visit_subjects, ("raise", "drop")),
        ("valueless_events", valueless_events, ("raise", "keep")),
    ):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")

    if isinstance(visits, (str, os.PathLike)) and Path(visits).is_dir():
        folder = Path(visits)
        found = _find_table_file(folder, "visits")
        if found is None:
            raise FileNotFoundError(f"no visits table in {folder}: expected visits{{{','.join(_TABLE_FILE_SUFFIXES)}}}")
        visits = found
        events = events if events is not None else _find_table_file(folder, "events")
        static = static if static is not None else _find_table_file(folder, "static")

    visits_df, visits_src = read_table(visits, "visits")
    events_df, events_src = read_table(events, "events") if events is not None else (None, None)
    static_df, static_src = read_table(static, "static") if static is not None else (None, None)
    if root is None:
        root = Path(visits_src).parent if visits_src is not None else None
    root_path = Path(root).resolve() if root is not None else None

    v_out, e_out, s_out = (
        _Collector("visits", visits_src),
        _Collector("events", events_src),
        _Collector("static", static_src),
    )
    # stage 1: structure -- without the required columns nothing else can be checked
    ok_v = _require_columns(visits_df, VISIT_COLUMNS, v_out)
    ok_e = events_df is None or _require_columns(events_df, EVENT_COLUMNS, e_out)
    ok_s = static_df is None or _require_columns(static_df, STATIC_COLUMNS, s_out)
    if not (ok_v and ok_e and ok_s):
        raise ManifestError(v_out.problems + e_out.problems + s_out.problems)

    if image_columns is None:
        image_columns = tuple(c for c in ("image", "mask") if c in visits_df.columns)
    else:
        image_columns = tuple(image_columns)
        absent = [c for c in image_columns if c not in visits_df.columns]
        if absent:
            v_out.add("missing_column", f"image column(s) {absent} named in image_columns are not in the table")
            raise ManifestError(v_out.problems)
        if "image" not in image_columns:
            image_columns = ("image", *image_columns)

    # stage 2: values of each table
    visits_c, v_times = _validate_visits(visits_df, v_out, image_columns, root_path)
    if events_df is not None:
        events_c, e_times = _validate_events(events_df, e_out, valueless_events)
    else:
        events_c = pd.DataFrame(
            {
                "subject_id": pd.Series(dtype="string"),
                "time": pd.Series(dtype=np.float64),
                "code": pd.Series(dtype="string"),
                "numeric_value": pd.Series(dtype=np.float64),
                "text_value": pd.Series(dtype="string"),
                "unit": pd.Series(dtype="string"),
            }
        )
        e_times = _ParsedTimes("none", np.zeros(0), np.zeros(0, bool), np.zeros(0, bool))
    static_c = (
        _validate_static(static_df, s_out)
        if static_df is not None
        else pd.DataFrame({"subject_id": pd.Series(dtype="string")})
    )

    # one time kind and one timezone state for the whole manifest
    kinds = {k for k in (v_times.kind, e_times.kind) if k != "none"}
    if events_df is not None and e_times.kind != "none" and e_times.unusable.all():
        kinds = {v_times.kind} - {"none"}  # only static rows: their empty times carry no kind
    if len(kinds) > 1:
        e_out.add(
            "mixed_time_kinds",
            f"visits.time holds {v_times.kind} but events.time holds {e_times.kind}; use one kind in both tables",
            "time",
        )
    states = {s for s in (v_times.aware, e_times.aware) if s != "none"}
    if len(states) > 1:
        e_out.add(
            "mixed_timezones",
            f"visits.time is {v_times.aware} but events.time is {e_times.aware}; "
            "give every time a zone or none (naive and aware times cannot be ordered without a guess)",
            "time",
        )

    # stage 3: cross-table checks
    report: dict[str, Any] = {"timezone": next(iter(states)) if len(states) == 1 else "none"}
    visit_subjects = set(visits_c["subject_id"].dropna())
    keep_events = np.ones(len(events_c), dtype=bool)
    keep_static = np.ones(len(static_c), dtype=bool)
    for table_out, frame, keep in ((e_out, events_c, keep_events), (s_out, static_c, keep_static)):
        if frame.empty:
            continue
        unknown = ~frame["subject_id"].isin(visit_subjects).to_numpy() & frame["subject_id"].notna().to_numpy()
        if unknown.any():
            names = sorted(set(frame["subject_id"][unknown]))
            if unknown_subjects == "raise":
                table_out.add(
                    "unknown_subject",
                    f"{int(unknown.sum())} row(s) of {len(names)} subject(s) that have no visit; "
                    "fix the ids or pass unknown_subjects='drop' to drop them (they are counted)",
                    "subject_id",
                    rows=np.flatnonzero(unknown),
                    subjects=names,
                )
            else:
                keep &= ~unknown
                report[f"{table_out.table}_unknown_subject_rows_dropped"] = int(unknown.sum())
                report[f"{table_out.table}_unknown_subjects_dropped"] = names
                logging.getLogger(__name__).warning(
                    "%s: dropped %d row(s) of %d subject(s) with no visit (e.g. %s)",
                    table_out.table,
                    int(unknown.sum()),
                    len(names),
                    ", ".join(names[:5]),
                )

    counts = visits_c["subject_id"].value_counts()
    single = sorted(counts.index[counts == 1].astype(str))
    if single:
        if single_visit_subjects == "raise":
            rows = np.flatnonzero(visits_c["subject_id"].isin(single).to_numpy())
            v_out.add(
                "single_visit",
                f"{len(single)} subject(s) have a single visit, so no earlier scan to forecast from; "
                "pass single_visit_subjects='drop' to leave them out",
                "subject_id",
                rows=rows,
                subjects=single,
            )
        else:
            report["single_visit_subjects_dropped"] = single

    problems = v_out.problems + e_out.problems + s_out.problems
    if problems:
        # image checks are the slow part: report structural problems first, without reading files
        raise ManifestError(problems)
    for column in image_columns:
        _check_images(visits_c[column], column, visits_c["subject_id"], check_images, v_out, progress)
    if v_out.problems:
        raise ManifestError(v_out.problems)

    # assemble: drop per policy, put times on each subject's day axis, sort
    if single:
        keep_visits = ~visits_c["subject_id"].isin(single).to_numpy()
        visits_c, v_values = visits_c[keep_visits], v_times.values[keep_visits]
        dropped = set(single)
        with_single = events_c["subject_id"].isin(dropped).to_numpy()
        report["single_visit_event_rows_dropped"] = int((with_single & keep_events).sum())
        keep_events &= ~with_single
        keep_static &= ~static_c["subject_id"].isin(dropped).to_numpy()
    else:
        v_values = v_times.values
    events_c, e_values = events_c[keep_events], (e_times.values[keep_events] if len(e_times.values) else e_times.values)
    static_c = static_c[keep_static]
    time_kind: Literal["datetime", "days"] = "datetime" if v_times.kind == "datetime" else "days"

    visits_c = visits_c.assign(_t=v_values)
    origins_raw = visits_c.groupby("subject_id", sort=True)["_t"].min()
    if time_kind == "datetime":
        origins = pd.Series(pd.to_datetime(origins_raw.to_numpy()), index=origins_raw.index.astype(str), name="origin")
    else:
        origins = pd.Series(origins_raw.to_numpy(dtype=np.float64), index=origins_raw.index.astype(str), name="origin")
    visits_c["time"] = _days_since(visits_c["_t"].to_numpy(), visits_c["subject_id"].map(origins).to_numpy(), time_kind)
    visits_c = visits_c.drop(columns="_t").sort_values(["subject_id", "time"], kind="stable").reset_index(drop=True)

    if len(events_c):
        origin_per_event = events_c["subject_id"].map(origins).to_numpy()
        events_c = events_c.assign(time=_days_since(e_values, origin_per_event, time_kind))
        events_c["numeric_value"] = events_c["numeric_value"].astype(np.float64)
    else:
        events_c = events_c.assign(time=np.zeros(0, dtype=np.float64))
    # static rows (NaN time) first within a subject, then by time; stable keeps the input order of ties
    events_c = events_c.sort_values(["subject_id", "time"], kind="stable", na_position="first").reset_index(drop=True)
    static_c = static_c.sort_values("subject_id", kind="stable").reset_index(drop=True)
    report["static_event_rows"] = int(events_c["time"].isna().sum())
    return LongitudinalManifest(
        visits=visits_c,
        events=events_c,
        static=static_c,
        origins=origins,
        time_kind=time_kind,
        image_columns=tuple(image_columns),
        root=root_path,
        report=report,
    )


def _days_since(values: np.ndarray, origins: np.ndarray, kind: str) -> np.ndarray:
    if kind == "datetime":
        values = np.asarray(values, dtype="datetime64[ns]")
        origins = np.asarray(origins, dtype="datetime64[ns]")
        return ((values - origins) / _DAY).astype(np.float64)
    return np.asarray(values, dtype=np.float64) - np.asarray(origins, dtype=np.float64)


def manifest_summary(manifest: LongitudinalManifest) -> Mapping[str, Any]:
    """Counts a person checks first: subjects, visits per subject, follow-up, events, codes."""
    per_subject = manifest.visits.groupby("subject_id")["time"]
    follow_up = per_subject.max()
    return {
        "subjects": len(manifest),
        "visits": len(manifest.visits),
        "visits_per_subject": {
            "min": int(per_subject.size().min()),
            "median": float(per_subject.size().median()),
            "max": int(per_subject.size().max()),
        },
        "follow_up_days": {"median": float(follow_up.median()), "max": float(follow_up.max())},
        "events": len(manifest.events),
        "event_codes": int(manifest.events["code"].nunique()),
        "static_attributes": [c for c in manifest.static.columns if c != "subject_id"],
        "time_kind": manifest.time_kind,
    }
