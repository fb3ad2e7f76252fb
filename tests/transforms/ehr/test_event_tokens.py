from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monai_twin.transforms.ehr import OOV_INDEX, PAD_INDEX, EHRToEventTokens, EHRToEventTokensd, EHRVocabulary

from .helpers import assert_same_arrays, subject_events, toy_events, toy_static


@pytest.fixture(scope="module")
def vocab() -> EHRVocabulary:
    return EHRVocabulary.fit(toy_events(), toy_static())


def test_tokens_are_time_ordered_relative_to_target_and_padded(vocab):
    code, value, time, mask, dropped = EHRToEventTokens(vocab, max_tokens=10)(
        subject_events(toy_events(), "a"), [0.0, 2.0], 5.5
    )
    assert code.dtype == torch.int64 and value.dtype == time.dtype == mask.dtype == torch.float32
    assert dropped == 0
    # the static GENOTYPE row (NaN time) and the drug stop at day 6 (after the target) are not tokens
    names = [vocab.code(int(i)) for i in code[:6]]
    assert names == ["LAB//x", "LAB//x", "LAB//x", "DRUG//d//START", "LAB//y", "LAB//x"]
    assert time[:6].tolist() == [-5.0, -4.5, -4.5, -3.5, -2.5, -0.5]
    # ties at day 1.0 are ordered by value, so the sequence never depends on row order
    x = vocab.normalise(vocab.index(["LAB//x"] * 2), np.array([2.0, 3.0]))
    assert value[1:3].tolist() == pytest.approx(x.tolist())
    assert mask.tolist() == [1.0] * 6 + [0.0] * 4
    assert (code[6:] == PAD_INDEX).all() and (value[6:] == 0).all() and (time[6:] == 0).all()


def test_keep_last_n_reports_dropped(vocab):
    code, _, time, mask, dropped = EHRToEventTokens(vocab, max_tokens=2)(subject_events(toy_events(), "a"), [0.0], 5.5)
    assert dropped == 4
    assert time.tolist() == [-2.5, -0.5]  # the two most recent events
    assert mask.tolist() == [1.0, 1.0]


def test_unknown_codes_and_missing_values(vocab):
    events = {
        "time": np.array([1.0, 2.0]),
        "code": np.array(["LAB//new", "LAB//x"], dtype=object),
        "numeric_value": np.array([5.0, np.nan]),
    }
    code, value, _, _, _ = EHRToEventTokens(vocab, max_tokens=3)(events, [0.0], 4.0)
    assert code.tolist() == [OOV_INDEX, vocab.index(["LAB//x"])[0], PAD_INDEX]
    assert value[1].item() == 0.0  # no value: the normalised centre


def test_lookback_window(vocab):
    events = {"time": np.array([-30.0, -1.0, 1.0]), "code": np.array(["LAB//x"] * 3), "numeric_value": np.ones(3)}
    t_default = EHRToEventTokens(vocab, max_tokens=4)
    t_week = EHRToEventTokens(vocab, max_tokens=4, lookback=7.0)
    t_all = EHRToEventTokens(vocab, max_tokens=4, lookback=None)
    assert t_default(events, [0.0], 2.0)[3].sum().item() == 1
    assert t_week(events, [0.0], 2.0)[2][:2].tolist() == [-3.0, -1.0]
    assert t_all(events, [0.0], 2.0)[2][:3].tolist() == [-32.0, -3.0, -1.0]
    with pytest.raises(ValueError, match="lookback"):
        EHRToEventTokens(vocab, lookback=-1.0)
    with pytest.raises(ValueError, match="max_tokens"):
        EHRToEventTokens(vocab, max_tokens=0)


def test_subject_without_events_gives_only_padding(vocab):
    empty = {"time": np.zeros(0), "code": np.zeros(0, dtype=object), "numeric_value": np.zeros(0)}
    code, value, time, mask, dropped = EHRToEventTokens(vocab, max_tokens=5)(empty, [0.0], 3.0)
    assert code.tolist() == [PAD_INDEX] * 5 and mask.sum().item() == 0 and dropped == 0


def test_bad_input_is_named(vocab):
    item = {
        "subject_id": "p3",
        "events": {"time": np.array([1.0]), "code": np.array(["LAB//x"]), "numeric_value": np.array([np.inf])},
        "history_times": np.array([0.0]),
        "target_time": 2.0,
    }
    with pytest.raises(ValueError, match=r"subject 'p3'.*infinite.*LAB//x"):
        EHRToEventTokensd(vocab)(item)


def test_dictionary_keys_stack_and_inputs_unchanged(vocab):
    from monai.data import DataLoader

    events = toy_events()
    items = [
        {"subject_id": s, "events": subject_events(events, s), "history_times": np.array([0.0]), "target_time": 5.5}
        for s in ("a", "b")
    ]
    before = [subject_events(events, s) for s in ("a", "b")]
    out = [EHRToEventTokensd(vocab, max_tokens=8)(item) for item in items]
    for item, kept in zip(items, before):
        assert_same_arrays(item["events"], kept)
    keys = ["ehr_tokens_code", "ehr_tokens_value", "ehr_tokens_time", "ehr_tokens_mask", "ehr_tokens_dropped"]
    batch = next(iter(DataLoader([{k: o[k] for k in keys} for o in out], batch_size=2)))
    assert batch["ehr_tokens_code"].shape == (2, 8)
    assert batch["ehr_tokens_dropped"].tolist() == [0, 0]
    assert batch["ehr_tokens_mask"].sum(1).tolist() == [6.0, 3.0]


@settings(max_examples=50, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from([0.0, 1.0, 1.5, 2.0]),
            st.sampled_from(["LAB//x", "LAB//y", "LAB//q"]),
            st.floats(-20, 20, allow_nan=False) | st.just(float("nan")),
        ),
        max_size=20,
    ),
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 8),
)
def test_property_tokens_ignore_row_order(vocab, rows, seed, n):
    frame = pd.DataFrame(
        {"time": [r[0] for r in rows], "code": [r[1] for r in rows], "numeric_value": [r[2] for r in rows]}
    )
    shuffled = frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)
    t = EHRToEventTokens(vocab, max_tokens=n)
    a, b = t(frame, [0.0], 2.5), t(shuffled, [0.0], 2.5)
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a[4] == b[4] == max(0, len(rows) - n)


def test_numpy_and_torch_inputs_agree(vocab):
    ev = subject_events(toy_events(), "a")
    t = EHRToEventTokens(vocab, max_tokens=6)
    a = t(ev, np.array([0.0, 2.0]), 5.5)
    ev_torch = dict(ev, time=torch.tensor(ev["time"]), numeric_value=torch.tensor(ev["numeric_value"]))
    b = t(ev_torch, torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor(5.5))
    for x, y in zip(a[:4], b[:4]):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert a[4] == b[4] == 0
