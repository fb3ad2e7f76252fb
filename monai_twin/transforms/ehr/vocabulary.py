"""``EHRVocabulary``: the fitted state every EHR transform encodes with.

It is fitted once, on the *training* subjects only, saved as JSON inside a bundle and loaded at
inference, so a record is encoded exactly as it was during training. It holds:

* the **code vocabulary**: index 0 is padding, index 1 the out-of-vocabulary (OOV) bucket, then
  every code seen at least ``min_count`` times, sorted by name (so the indices do not depend on
  the order of the rows it was fitted on);
* per code, **one unit** (mixed units for one code are an error unless ``unit_conversions`` maps
  them onto one) and robust **numeric statistics**: centre = median, scale = IQR / 1.349 (the
  standard deviation of a normal with that IQR; the standard deviation, then 1.0, when the IQR is
  0), and clip bounds = the ``clip_quantiles`` of the raw values. A value is encoded as
  ``(clip(v, low, high) - centre) / scale``;
* **exposure codes**: drugs given as start/stop pairs (``<drug>//START`` and ``<drug>//STOP``
  events whose ``numeric_value`` is the daily dose) -- see :mod:`monai_twin.transforms.ehr.functional`;
* **static attributes**: numeric ones (median/IQR scale) and categorical ones (sorted category
  list, with an extra "unknown" slot at encoding), from the ``static`` table and from static event
  rows (events with an empty time, as in MEDS).

Rules for the event rows it is fitted on (the same rules are applied when encoding):

* an event with no numeric value but a ``text_value`` becomes the code ``"<code>//<text>"``
  (e.g. ``LAB//51486//NEG``) when ``text_codes=True``: a categorical result is its own token;
* ``numeric_value`` may hold numbers written as strings (``"1.5"``); any other string is an error
  naming the code; infinite values are an error;
* a missing unit is taken to be the code's fitted unit (MEDS leaves units empty when there are none).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from monai_twin.utils.io import atomic_write_text

__all__ = ["EHRVocabulary", "OOV_INDEX", "PAD_INDEX"]

#: Token index used for padding.
PAD_INDEX = 0
#: Token index of codes the vocabulary has never seen (or saw fewer than ``min_count`` times).
OOV_INDEX = 1
_FORMAT = "monai_twin.ehr_vocabulary"
_FORMAT_VERSION = 1


def _float_or_none(value: float) -> float | None:
    # strict JSON has no NaN/inf; None stands for "not defined"
    return float(value) if value is not None and math.isfinite(value) else None


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else float(value)


class EHRVocabulary:
    """Code vocabulary, units, numeric statistics and static encodings, fitted on training data.

    Build one with :meth:`fit` (or :meth:`load`), never by hand.

    Args:
        codes: vocabulary codes in index order (index ``i + 2`` is ``codes[i]``).
        units: code -> unit (``None`` when the code never had one).
        stats: code -> ``{"centre", "scale", "low", "high"}`` for codes with numeric values.
        counts: code -> number of events seen at fit time.
        unit_conversions: code -> ``{from_unit: [to_unit, factor]}`` applied before anything else.
        static_numeric: attribute -> ``{"centre", "scale"}``.
        static_categorical: attribute -> list of categories.
        settings: the fit arguments (``min_count``, ``start_suffix``, ``stop_suffix``,
            ``text_codes``, ``clip_quantiles``).

    Example::

        vocab = EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
        vocab.save("bundle/models/ehr_vocabulary.json")
        same = EHRVocabulary.load("bundle/models/ehr_vocabulary.json")
        assert same == vocab
    """

    def __init__(
        self,
        codes: Sequence[str],
        units: Mapping[str, str | None],
        stats: Mapping[str, Mapping[str, float]],
        counts: Mapping[str, int],
        unit_conversions: Mapping[str, Mapping[str, Sequence]] | None = None,
        static_numeric: Mapping[str, Mapping[str, float]] | None = None,
        static_categorical: Mapping[str, Sequence[str]] | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.codes = [str(c) for c in codes]
        if len(set(self.codes)) != len(self.codes):
            raise ValueError("EHRVocabulary: codes must be unique.")
        self.units = {str(k): (None if v is None else str(v)) for k, v in units.items()}
        self.stats = {str(k): {n: float(x) for n, x in v.items()} for k, v in stats.items()}
        self.counts = {str(k): int(v) for k, v in counts.items()}
        self.unit_conversions = {
            str(c): {str(u): [str(to), float(f)] for u, (to, f) in m.items()}
            for c, m in (unit_conversions or {}).items()
        }
        self.static_numeric = {str(k): {n: float(x) for n, x in v.items()} for k, v in (static_numeric or {}).items()}
        self.static_categorical = {str(k): [str(x) for x in v] for k, v in (static_categorical or {}).items()}
        defaults = {
            "min_count": 1,
            "start_suffix": "//START",
            "stop_suffix": "//STOP",
            "text_codes": True,
            "clip_quantiles": [0.001, 0.999],
        }
        defaults.update(dict(settings or {}))
        defaults["clip_quantiles"] = [float(q) for q in defaults["clip_quantiles"]]
        self.settings = defaults
        self._index = {c: i + 2 for i, c in enumerate(self.codes)}
        self._build_tables()

    # ------------------------------------------------------------------------------------------
    # look-up tables, rebuilt from the plain fields so a loaded vocabulary behaves identically

    def _build_tables(self) -> None:
        n = len(self.codes) + 2
        self.centre = np.zeros(n, dtype=np.float64)
        self.scale = np.ones(n, dtype=np.float64)
        self.low = np.full(n, -np.inf)
        self.high = np.full(n, np.inf)
        self.has_stats = np.zeros(n, dtype=bool)
        for code, st in self.stats.items():
            i = self._index[code]
            self.centre[i], self.scale[i] = st["centre"], st["scale"]
            self.low[i], self.high[i] = st["low"], st["high"]
            self.has_stats[i] = True
        start, stop = self.settings["start_suffix"], self.settings["stop_suffix"]
        # exposure bookkeeping: +1 for a start code, -1 for a stop code, keyed by the drug's base code
        self.exposure_sign = np.zeros(n, dtype=np.int8)
        base_of: dict[int, str] = {}
        for code, i in self._index.items():
            if start and code.endswith(start):
                self.exposure_sign[i], base_of[i] = 1, code[: -len(start)]
            elif stop and code.endswith(stop):
                self.exposure_sign[i], base_of[i] = -1, code[: -len(stop)]
        self.exposure_codes = sorted({b for i, b in base_of.items() if self.exposure_sign[i] == 1})
        exposure_pos = {b: k for k, b in enumerate(self.exposure_codes)}
        # int32 look-up tables keep the per-event arrays gathered from them at 4 bytes a row
        self.exposure_column = np.full(n, -1, dtype=np.int32)
        for i, b in base_of.items():
            if b in exposure_pos:
                self.exposure_column[i] = exposure_pos[b]
        # interval-feature codes: stop codes fold into their drug, start codes are named by the drug
        feature_codes = sorted({base_of.get(i, code) for code, i in self._index.items() if self.exposure_sign[i] >= 0})
        self.feature_codes = feature_codes
        feature_pos = {c: k for k, c in enumerate(feature_codes)}
        self.feature_column = np.full(n, -1, dtype=np.int32)
        for code, i in self._index.items():
            if self.exposure_sign[i] >= 0:
                self.feature_column[i] = feature_pos[base_of.get(i, code)]

    # ------------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of token indices, padding and OOV included (the embedding table size)."""
        return len(self.codes) + 2

    def __len__(self) -> int:
        return self.size

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EHRVocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return (
            f"EHRVocabulary(codes={len(self.codes)}, numeric={len(self.stats)}, exposure={len(self.exposure_codes)}, "
            f"static_numeric={len(self.static_numeric)}, static_categorical={len(self.static_categorical)})"
        )

    def index(self, codes: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
        """Token index of each code (``OOV_INDEX`` for unknown codes); vectorised through a hash factorisation."""
        series = codes if isinstance(codes, pd.Series) else pd.Series(np.asarray(codes, dtype=object))
        labels, uniques = pd.factorize(series, use_na_sentinel=True)
        # np.intp: the result indexes the look-up tables, and numpy converts narrower index arrays per gather
        lookup = np.array([self._index.get(str(u), OOV_INDEX) for u in uniques], dtype=np.intp)
        lookup = np.append(lookup, OOV_INDEX)  # the NA sentinel -1 lands on OOV
        return lookup[labels]

    def code(self, index: int) -> str:
        """The code of a token index (``"<pad>"`` / ``"<oov>"`` for the reserved ones)."""
        if index == PAD_INDEX:
            return "<pad>"
        if index == OOV_INDEX:
            return "<oov>"
        return self.codes[index - 2]

    # ------------------------------------------------------------------------------------------
    # fitting

    @classmethod
    def fit(
        cls,
        events: pd.DataFrame,
        static: pd.DataFrame | None = None,
        *,
        subjects: Sequence[str] | None = None,
        min_count: int = 1,
        unit_conversions: Mapping[str, Mapping[str, Sequence]] | None = None,
        start_suffix: str = "//START",
        stop_suffix: str = "//STOP",
        text_codes: bool = True,
        clip_quantiles: Sequence[float] = (0.001, 0.999),
    ) -> EHRVocabulary:
        """Fit the vocabulary on an events table (and optionally a static table).

        Args:
            events: MEDS-style events (``subject_id, time, code, numeric_value`` [+ ``text_value``,
                ``unit``]); ``time`` in days or datetimes -- only "empty or not" matters here.
                Never modified.
            static: optional static table, ``subject_id`` + one column per attribute.
            subjects: fit on these subjects only -- pass the *training* split, never all subjects.
            min_count: codes seen fewer times go to the OOV bucket.
            unit_conversions: ``{code: {from_unit: (to_unit, factor)}}``; a value in ``from_unit``
                is multiplied by ``factor`` and then counts as ``to_unit``.
            start_suffix, stop_suffix: suffixes marking drug exposure start/stop events.
            text_codes: turn text-only events into ``"<code>//<text>"`` codes.
            clip_quantiles: raw-value quantiles used as clip bounds per code.

        Raises:
            ValueError: mixed units for a code, non-numeric strings or infinite values in
                ``numeric_value``, negative doses, bad arguments -- naming the code.
        """
        from .functional import event_columns, filled_columns, numeric_values, token_codes

        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}.")
        q_lo, q_hi = (float(q) for q in clip_quantiles)
        if not 0.0 <= q_lo < q_hi <= 1.0:
            raise ValueError(f"clip_quantiles must satisfy 0 <= low < high <= 1, got {tuple(clip_quantiles)}.")
        if not isinstance(events, pd.DataFrame):
            raise TypeError(f"events must be a pandas DataFrame, got {type(events).__name__}.")
        if subjects is not None:
            if "subject_id" not in events.columns:
                raise ValueError("events: column 'subject_id' is needed to fit on a subset of subjects.")
            keep = events["subject_id"].astype("string").isin([str(s) for s in subjects]).to_numpy(dtype=bool)
            events = events[keep]
            if static is not None:
                static = static[static["subject_id"].astype("string").isin([str(s) for s in subjects]).to_numpy(bool)]
        cols = filled_columns(event_columns(events, where="events"))
        settings = {
            "min_count": int(min_count),
            "start_suffix": start_suffix,
            "stop_suffix": stop_suffix,
            "text_codes": bool(text_codes),
            "clip_quantiles": [q_lo, q_hi],
        }
        draft = cls([], {}, {}, {}, unit_conversions=unit_conversions, settings=settings)
        values = numeric_values(cols, where="events")
        values, units = draft.convert_units(cols["code"], values, cols["unit"], cols.get("subject_id"), check=False)
        codes = token_codes(cols["code"], values, cols["text_value"], text_codes)
        is_static = np.isnan(cols["time"])

        frame = pd.DataFrame({"code": codes[~is_static], "value": values[~is_static], "unit": units[~is_static]})
        counts = frame["code"].value_counts(sort=False)
        kept = sorted(str(c) for c, n in counts.items() if n >= min_count)
        frame = frame[frame["code"].isin(kept)]
        unit_sets = frame.dropna(subset=["unit"]).groupby("code", sort=True)["unit"].unique()
        mixed = {c: sorted(map(str, u)) for c, u in unit_sets.items() if len(u) > 1}
        if mixed:
            listed = "; ".join(f"{c!r}: {u}" for c, u in list(mixed.items())[:10])
            raise ValueError(
                f"events: code(s) with more than one unit ({listed}); give unit_conversions={{code: "
                "{from_unit: (to_unit, factor)}} or split the code by unit."
            )
        units_out = {c: (str(unit_sets[c][0]) if c in unit_sets.index else None) for c in kept}

        numeric = frame[np.isfinite(frame["value"].to_numpy(dtype=np.float64))]
        stats: dict[str, dict[str, float]] = {}
        if len(numeric):
            grouped = numeric.groupby("code", sort=True)["value"]
            quant = grouped.quantile([0.25, 0.5, 0.75, q_lo, q_hi]).unstack()
            std = grouped.std(ddof=0)
            for code, row in quant.iterrows():
                scale = (row[0.75] - row[0.25]) / 1.349
                if not scale > 0:
                    scale = std[code] if std[code] > 0 else 1.0
                stats[str(code)] = {
                    "centre": float(row[0.5]),
                    "scale": float(scale),
                    "low": float(row[q_lo]),
                    "high": float(row[q_hi]),
                }
        vocab = cls(
            kept,
            units_out,
            stats,
            {str(c): int(counts[c]) for c in kept},
            unit_conversions=unit_conversions,
            settings=settings,
        )
        bad_dose = (vocab.exposure_sign[vocab.index(codes)] != 0) & (values < 0)
        if bad_dose.any():
            raise ValueError(vocab._describe_rows("negative dose(s) in numeric_value", cols, bad_dose))

        # static attributes: the static table and the static event rows (empty time)
        static_numeric, static_categorical = _fit_static(static, cols, values, is_static)
        vocab.static_numeric, vocab.static_categorical = static_numeric, static_categorical
        return vocab

    # ------------------------------------------------------------------------------------------
    # encoding helpers shared by the transforms

    def convert_units(
        self,
        codes: np.ndarray,
        values: np.ndarray,
        units: np.ndarray,
        subjects: np.ndarray | None = None,
        check: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply ``unit_conversions`` and (``check=True``) verify each event's unit.

        Returns new arrays (the inputs are not modified): values and units after conversion.

        Raises:
            ValueError: an event's unit differs from its code's fitted unit with no conversion,
                naming the code, the units and the subjects.
        """
        values = np.array(values, dtype=np.float64, copy=True)
        units = np.asarray(units, dtype=object).copy()
        if self.unit_conversions and len(codes):
            frame = pd.DataFrame({"code": pd.Series(codes, dtype=object), "unit": pd.Series(units, dtype=object)})
            for code, mapping in self.unit_conversions.items():
                for from_unit, (to_unit, factor) in mapping.items():
                    hit = ((frame["code"] == code) & (frame["unit"] == from_unit)).to_numpy(dtype=bool)
                    values[hit] *= factor
                    units[hit] = to_unit
        if check and len(codes) and self.units:
            present = pd.notna(units)
            if present.any():
                idx = self.index(np.asarray(codes, dtype=object)[present])
                expected = np.array([None, None] + [self.units.get(c) for c in self.codes], dtype=object)[idx]
                given = units[present]
                wrong = (expected != None) & (given != expected)  # noqa: E711 -- elementwise on object arrays
                if wrong.any():
                    rows = np.flatnonzero(present)[wrong]
                    pairs = sorted({(str(codes[r]), str(units[r])) for r in rows[:50]})
                    listed = "; ".join(f"{c!r} in {u!r} (fitted: {self.units[c]!r})" for c, u in pairs[:5])
                    who = ""
                    if subjects is not None:
                        who = f"; subject(s): {', '.join(sorted({str(subjects[r]) for r in rows})[:10])}"
                    raise ValueError(
                        f"events: column 'unit' differs from the fitted unit for {len(rows)} row(s): {listed}{who}; "
                        "add a unit_conversions entry when fitting."
                    )
        return values, units

    def normalise(self, index: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``(clip(v, low, high) - centre) / scale`` per event's code; NaN stays NaN, codes without
        numeric statistics keep their raw value."""
        index = np.asarray(index)
        # one gather buffer reused for the four look-ups keeps the peak at two per-event arrays
        out = np.maximum(values, np.take(self.low, index))  # NaN propagates
        buffer = np.take(self.high, index)
        np.minimum(out, buffer, out=out)
        np.take(self.centre, index, out=buffer)
        out -= buffer
        np.take(self.scale, index, out=buffer)
        out /= buffer
        return out

    def _describe_rows(self, what: str, cols: Mapping[str, np.ndarray], rows: np.ndarray) -> str:
        where = np.flatnonzero(rows)
        codes = sorted({str(cols["code"][r]) for r in where[:200]})
        text = f"events: {what} in {where.size} row(s) (rows {', '.join(map(str, where[:10]))}); code(s): {codes[:10]}"
        if cols.get("subject_id") is not None:
            subs = sorted({str(cols["subject_id"][r]) for r in where[:200]})
            text += f"; subject(s): {subs[:10]}"
        return text

    # ------------------------------------------------------------------------------------------
    # persistence

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary (non-finite numbers become ``None``)."""
        return {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "settings": {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in self.settings.items()},
            "codes": list(self.codes),
            "counts": {c: self.counts.get(c, 0) for c in self.codes},
            "units": {c: self.units.get(c) for c in self.codes},
            "stats": {
                c: {k: _float_or_none(v) for k, v in self.stats[c].items()} for c in self.codes if c in self.stats
            },
            "unit_conversions": self.unit_conversions,
            "static_numeric": {a: {k: _float_or_none(v) for k, v in s.items()} for a, s in self.static_numeric.items()},
            "static_categorical": {a: list(v) for a, v in self.static_categorical.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EHRVocabulary:
        """Inverse of :meth:`to_dict`."""
        if data.get("format") != _FORMAT:
            raise ValueError(f"not an EHR vocabulary: 'format' is {data.get('format')!r}, expected {_FORMAT!r}.")
        if int(data.get("version", -1)) > _FORMAT_VERSION:
            raise ValueError(f"EHR vocabulary version {data['version']} is newer than this monai_twin understands.")
        stats = {c: {k: _nan_if_none(v) for k, v in s.items()} for c, s in data["stats"].items()}
        static_numeric = {a: {k: _nan_if_none(v) for k, v in s.items()} for a, s in data["static_numeric"].items()}
        return cls(
            data["codes"],
            data["units"],
            stats,
            data["counts"],
            unit_conversions=data.get("unit_conversions"),
            static_numeric=static_numeric,
            static_categorical=data.get("static_categorical"),
            settings=data.get("settings"),
        )

    def to_json(self) -> str:
        """Serialise to standard JSON (floats written with ``repr``, so they read back bit-exact)."""
        return json.dumps(self.to_dict(), indent=1, sort_keys=False, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> EHRVocabulary:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the vocabulary as JSON (temporary file + atomic rename)."""
        return atomic_write_text(path, self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> EHRVocabulary:
        """Read a vocabulary written by :meth:`save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


def _robust(values: np.ndarray) -> dict[str, float]:
    q25, q50, q75 = np.quantile(values, [0.25, 0.5, 0.75])
    scale = (q75 - q25) / 1.349
    if not scale > 0:
        std = float(np.std(values))
        scale = std if std > 0 else 1.0
    return {"centre": float(q50), "scale": float(scale)}


def _fit_static(
    static: pd.DataFrame | None, cols: Mapping[str, np.ndarray], values: np.ndarray, is_static: np.ndarray
) -> tuple[dict[str, dict[str, float]], dict[str, list[str]]]:
    numeric: dict[str, dict[str, float]] = {}
    categorical: dict[str, list[str]] = {}
    if static is not None:
        for column in static.columns:
            if column == "subject_id":
                continue
            series = static[column]
            if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
                finite = series.to_numpy(dtype=np.float64, na_value=np.nan)
                finite = finite[np.isfinite(finite)]
                numeric[str(column)] = _robust(finite) if finite.size else {"centre": 0.0, "scale": 1.0}
            else:
                categorical[str(column)] = sorted({str(v) for v in series.dropna().tolist()})
    if is_static.any():
        codes = np.asarray(cols["code"], dtype=object)[is_static]
        vals = values[is_static]
        texts = np.asarray(cols["text_value"], dtype=object)[is_static]
        frame = pd.DataFrame({"code": codes, "value": vals, "text": texts})
        for code, group in frame.groupby("code", sort=True):
            finite = group["value"].to_numpy(dtype=np.float64)
            finite = finite[np.isfinite(finite)]
            name = str(code)
            if name in numeric or name in categorical:
                raise ValueError(f"static attribute {name!r} is both a static-table column and a static event code.")
            if finite.size:
                numeric[name] = _robust(finite)
            else:
                categorical[name] = sorted({str(v) for v in group["text"].dropna().tolist()})
    return numeric, categorical
