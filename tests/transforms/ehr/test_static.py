from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_twin.transforms.ehr import EHRStaticToTensor, EHRStaticToTensord, EHRVocabulary, static_feature_names

from .helpers import assert_same_arrays, subject_events, toy_events, toy_static


@pytest.fixture(scope="module")
def vocab() -> EHRVocabulary:
    return EHRVocabulary.fit(toy_events(), toy_static())


def test_layout_and_values(vocab):
    t = EHRStaticToTensor(vocab)
    assert (
        t.feature_names
        == static_feature_names(vocab)
        == [
            "age",
            "age:missing",
            "sex=F",
            "sex=M",
            "sex=<unknown>",
            "GENOTYPE=pos",
            "GENOTYPE=<unknown>",
        ]
    )
    out = t({"sex": "M", "age": 60}, subject_events(toy_events(), "a"))
    assert out.dtype == torch.float32 and out.shape == (7,)
    scale = vocab.static_numeric["age"]["scale"]
    assert out.tolist() == pytest.approx([5.0 / scale, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0])


def test_missing_and_unseen_values(vocab):
    t = EHRStaticToTensor(vocab)
    out = t({"sex": "X", "age": None}).tolist()
    assert out == [0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0]  # unseen category and absent genotype -> <unknown>
    assert t({"age": float("nan")}).tolist()[:2] == [0.0, 1.0]
    assert t(None).tolist() == t({}).tolist()
    with pytest.raises(ValueError, match="'age' must be a number"):
        t({"age": "old"})
    with pytest.raises(ValueError, match="'age' is infinite"):
        t({"age": float("inf")})


def test_static_table_and_event_rows_must_agree(vocab):
    events = {"time": np.array([np.nan]), "code": np.array(["sex"]), "numeric_value": np.array([np.nan]),
              "text_value": np.array(["F"], dtype=object)}  # fmt: skip
    t = EHRStaticToTensor(vocab)
    assert t({"sex": "F"}, events).tolist() == t({"sex": "F"}).tolist()
    with pytest.raises(ValueError, match="'sex' is 'M' in 'static' but 'F'"):
        t({"sex": "M"}, events)


def test_dictionary_transform(vocab):
    item = {"subject_id": "b", "static": {"sex": "M", "age": 60}, "events": subject_events(toy_events(), "b")}
    kept = dict(item["static"])
    events_before = subject_events(toy_events(), "b")
    out = EHRStaticToTensord(vocab)(item)
    assert out["ehr_static"].shape == (7,)
    assert out["static"] == kept
    assert_same_arrays(item["events"], events_before)
    bad = dict(item, static={"age": "old"})
    with pytest.raises(ValueError, match="subject 'b'"):
        EHRStaticToTensord(vocab)(bad)


def test_loaded_vocabulary_encodes_the_same(vocab, tmp_path):
    path = vocab.save(tmp_path / "v.json")
    a = EHRStaticToTensor(vocab)({"sex": "F", "age": 51})
    b = EHRStaticToTensor(path)({"sex": "F", "age": 51})
    torch.testing.assert_close(a, b, rtol=0, atol=0)
