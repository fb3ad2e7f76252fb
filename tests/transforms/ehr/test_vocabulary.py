from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monai_twin.transforms.ehr import OOV_INDEX, PAD_INDEX, EHRVocabulary

from .helpers import toy_events, toy_static


def test_fit_codes_units_and_robust_stats():
    vocab = EHRVocabulary.fit(toy_events(), toy_static())
    # static rows (NaN time) are static attributes, not codes; codes are sorted by name
    assert vocab.codes == ["DRUG//d//START", "DRUG//d//STOP", "LAB//x", "LAB//y"]
    assert vocab.index(["LAB//x", "nope", "DRUG//d//START"]).tolist() == [4, OOV_INDEX, 2]
    assert vocab.code(PAD_INDEX) == "<pad>" and vocab.code(OOV_INDEX) == "<oov>" and vocab.code(5) == "LAB//y"
    assert vocab.units == {"DRUG//d//START": "mg/day", "DRUG//d//STOP": "mg/day", "LAB//x": "mg", "LAB//y": "u"}
    assert vocab.counts["LAB//x"] == 6  # the NaN-valued row counts as an event too
    x = vocab.stats["LAB//x"]  # finite values 1, 2, 3, 4, 7
    assert x["centre"] == 3.0
    assert x["scale"] == pytest.approx(2.0 / 1.349)
    assert x["low"] == pytest.approx(np.quantile([1, 2, 3, 4, 7], 0.001))
    # one value: IQR and standard deviation are 0, so the scale falls back to 1
    assert vocab.stats["DRUG//d//START"]["scale"] == 1.0
    assert vocab.exposure_codes == ["DRUG//d"]
    assert vocab.feature_codes == ["DRUG//d", "LAB//x", "LAB//y"]
    # ages 50 and 60: linear quantiles 52.5 / 57.5, so IQR 5
    assert vocab.static_numeric == {"age": {"centre": 55.0, "scale": 5.0 / 1.349}}
    assert vocab.static_categorical == {"sex": ["F", "M"], "GENOTYPE": ["pos"]}


def test_min_count_sends_rare_codes_to_oov():
    vocab = EHRVocabulary.fit(toy_events(), min_count=3)
    assert vocab.codes == ["LAB//x"]
    assert vocab.index(["LAB//y"]).tolist() == [OOV_INDEX]
    with pytest.raises(ValueError, match="min_count"):
        EHRVocabulary.fit(toy_events(), min_count=0)


def test_fit_on_training_subjects_only():
    vocab = EHRVocabulary.fit(toy_events(), toy_static(), subjects=["b"])
    assert vocab.codes == ["LAB//x", "LAB//y"]  # subject a's drug is not seen
    assert vocab.stats["LAB//x"]["centre"] == 7.0  # only b's finite value
    assert vocab.static_categorical["sex"] == ["M"]


def test_text_only_events_become_their_own_codes():
    events = pd.DataFrame(
        {
            "time": [1.0, 2.0, 3.0],
            "code": ["LAB//u", "LAB//u", "LAB//u"],
            "numeric_value": [np.nan, np.nan, 1.0],
            "text_value": ["NEG", "POS", None],
        }
    )
    assert EHRVocabulary.fit(events).codes == ["LAB//u", "LAB//u//NEG", "LAB//u//POS"]
    assert EHRVocabulary.fit(events, text_codes=False).codes == ["LAB//u"]


def test_mixed_units_are_an_error_naming_the_code():
    events = pd.DataFrame(
        {
            "time": [1.0, 2.0],
            "code": ["LAB//glc", "LAB//glc"],
            "numeric_value": [5.0, 90.0],
            "unit": ["mmol/L", "mg/dL"],
        }
    )
    with pytest.raises(ValueError, match=r"LAB//glc.*mg/dL.*mmol/L"):
        EHRVocabulary.fit(events)
    vocab = EHRVocabulary.fit(events, unit_conversions={"LAB//glc": {"mmol/L": ("mg/dL", 18.0)}})
    assert vocab.units["LAB//glc"] == "mg/dL"
    assert vocab.stats["LAB//glc"]["centre"] == 90.0  # (5 * 18 + 90) / 2


def test_numbers_as_strings_and_bad_values():
    events = pd.DataFrame({"time": [1.0, 2.0], "code": ["A", "B"], "numeric_value": ["1.5", " 2 "]})
    vocab = EHRVocabulary.fit(events)
    assert vocab.stats["A"]["centre"] == 1.5 and vocab.stats["B"]["centre"] == 2.0
    bad = pd.DataFrame(
        {"subject_id": ["p1", "p2"], "time": [1.0, 2.0], "code": ["A", "B"], "numeric_value": ["1", "high"]}
    )
    with pytest.raises(ValueError, match=r"numeric_value.*not a number.*'B'.*p2"):
        EHRVocabulary.fit(bad)
    inf = pd.DataFrame({"subject_id": ["p1"], "time": [1.0], "code": ["A"], "numeric_value": [np.inf]})
    with pytest.raises(ValueError, match=r"infinite.*'A'.*p1"):
        EHRVocabulary.fit(inf)


def test_negative_dose_at_fit_names_code_and_subject():
    events = pd.DataFrame({"subject_id": ["p9"], "time": [1.0], "code": ["DRUG//x//START"], "numeric_value": [-5.0]})
    with pytest.raises(ValueError, match=r"negative dose.*DRUG//x//START.*p9"):
        EHRVocabulary.fit(events)


def test_fit_does_not_modify_inputs():
    events, static = toy_events(), toy_static()
    before_e, before_s = events.copy(deep=True), static.copy(deep=True)
    EHRVocabulary.fit(events, static, subjects=["a"], unit_conversions={"LAB//x": {"g": ("mg", 1000.0)}})
    pd.testing.assert_frame_equal(events, before_e)
    pd.testing.assert_frame_equal(static, before_s)


def test_json_round_trip_file(tmp_path):
    vocab = EHRVocabulary.fit(toy_events(), toy_static(), unit_conversions={"LAB//x": {"g": ("mg", 1000.0)}})
    path = vocab.save(tmp_path / "models" / "ehr_vocabulary.json")
    text = path.read_text()
    json.loads(text)  # standard JSON: no NaN/Infinity tokens
    assert "NaN" not in text and "Infinity" not in text
    loaded = EHRVocabulary.load(path)
    assert loaded == vocab
    assert loaded.to_json() == vocab.to_json()
    np.testing.assert_array_equal(loaded.centre, vocab.centre)
    np.testing.assert_array_equal(loaded.feature_column, vocab.feature_column)
    assert [p.name for p in path.parent.iterdir()] == ["ehr_vocabulary.json"]  # no temp file left


def test_from_dict_rejects_other_documents():
    with pytest.raises(ValueError, match="not an EHR vocabulary"):
        EHRVocabulary.from_dict({"format": "something"})
    data = EHRVocabulary.fit(toy_events()).to_dict()
    data["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        EHRVocabulary.from_dict(data)


finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.sampled_from(["A", "B", "C//START", "C//STOP", "D"]), finite | st.just(math.nan)),
        min_size=1,
        max_size=30,
    ),
    ages=st.lists(finite, min_size=1, max_size=5),
    min_count=st.integers(1, 3),
)
def test_json_round_trip_is_exact(rows, ages, min_count):
    codes = [c for c, _ in rows]
    values = [abs(v) if c.startswith("C//") else v for c, v in rows]  # doses must be >= 0
    events = pd.DataFrame({"time": np.arange(len(rows), dtype=float), "code": codes, "numeric_value": values})
    static = pd.DataFrame({"subject_id": [f"s{i}" for i in range(len(ages))], "age": ages})
    vocab = EHRVocabulary.fit(events, static, min_count=min_count)
    loaded = EHRVocabulary.from_json(vocab.to_json())
    assert loaded.to_dict() == vocab.to_dict()
    for table in ("centre", "scale", "low", "high"):
        np.testing.assert_array_equal(getattr(loaded, table), getattr(vocab, table))
    probe = np.array(codes, dtype=object)
    idx = vocab.index(probe)
    np.testing.assert_array_equal(loaded.index(probe), idx)
    raw = np.asarray(values, dtype=float)
    np.testing.assert_array_equal(loaded.normalise(idx, raw), vocab.normalise(idx, raw))
