from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from parameterized import parameterized

from monai_twin.transforms.ehr import (
    EHRToIntervalFeatures,
    EHRToIntervalFeaturesd,
    EHRVocabulary,
    interval_feature_table,
)

from .helpers import assert_same_arrays, random_cohort, subject_events, toy_events, toy_static, toy_visits


@pytest.fixture(scope="module")
def vocab() -> EHRVocabulary:
    return EHRVocabulary.fit(toy_events(), toy_static())


def _feature(transform, features, name):
    return features[:, transform.feature_names.index(name)]


def test_hand_computed_subject(vocab):
    t = EHRToIntervalFeatures(vocab)
    f, m = t(subject_events(toy_events(), "a"), [0.0, 2.0], 5.5)
    assert f.shape == m.shape == (2, len(t.feature_names)) and f.dtype == torch.float32
    f, m = f.numpy(), m.numpy()
    c, s = vocab.stats["LAB//x"]["centre"], vocab.stats["LAB//x"]["scale"]
    low = vocab.stats["LAB//x"]["low"]
    # interval [0, 2): x = 1.0 @0.5, 2.0 @1.0, 3.0 @1.0 -- two values at the last time: the larger wins
    assert _feature(t, f, "LAB//x:last")[0] == pytest.approx((3.0 - c) / s)
    assert _feature(t, f, "LAB//x:mean")[0] == pytest.approx(
        ((low + 2.0 + 3.0) / 3 - c) / s
    )  # values are clipped first
    assert _feature(t, f, "LAB//x:min")[0] == pytest.approx((low - c) / s)  # clipped to the fitted low quantile
    assert _feature(t, f, "LAB//x:count")[0] == 3
    assert _feature(t, f, "LAB//x:days_since_last")[0] == pytest.approx(1.0)
    # LAB//y is first measured in [2, 5.5): nothing before, so masked with the -1 "never" marker
    assert _feature(t, m, "LAB//y:last")[0] == 0 and _feature(t, f, "LAB//y:last")[0] == 0.0
    assert _feature(t, f, "LAB//y:days_since_last").tolist() == [-1.0, 2.5]
    # drug 5 mg/day from day 2 to 6: 3.5 days overlap the last interval (the stop lies beyond the target)
    assert _feature(t, f, "DRUG//d:exposure").tolist() == [0.0, 17.5]
    assert _feature(t, m, "DRUG//d:exposure").tolist() == [0.0, 1.0]
    # the NaN-valued rows of subject b still count, but `last` is the last *measured* value
    fb, mb = t(subject_events(toy_events(), "b"), [0.0], 3.0)
    assert _feature(t, fb.numpy(), "LAB//x:count")[0] == 2
    assert _feature(t, fb.numpy(), "LAB//x:last")[0] == pytest.approx((min(7.0, vocab.stats["LAB//x"]["high"]) - c) / s)


def test_batch_table_equals_per_item_transform():
    events, visits = random_cohort(12, 40, seed=3)
    vocab = EHRVocabulary.fit(events)
    kwargs = {"carry_forward": True, "decay": 30.0}
    table = interval_feature_table(events, visits, vocab, **kwargs)
    t = EHRToIntervalFeatures(vocab, **kwargs)
    assert table.feature_names == t.feature_names
    checked = 0
    for sid, group in visits.groupby("subject_id"):
        times = group["time"].to_numpy()
        ev = subject_events(events, sid)
        for target in range(1, len(times)):
            f, m = t(ev, times[:target], times[target])
            tf, tm = table.item(sid, target)
            np.testing.assert_allclose(f.numpy(), tf, rtol=1e-6, atol=1e-5)
            np.testing.assert_array_equal(m.numpy(), tm)
            checked += 1
    assert checked == len(visits) - visits["subject_id"].nunique()


def test_numpy_and_torch_inputs_agree(vocab):
    ev = subject_events(toy_events(), "a")
    t = EHRToIntervalFeatures(vocab)
    f_np, m_np = t(ev, np.array([0.0, 2.0]), 5.5)
    ev_torch = dict(ev, time=torch.tensor(ev["time"]), numeric_value=torch.tensor(ev["numeric_value"]))
    f_t, m_t = t(ev_torch, torch.tensor([0.0, 2.0], dtype=torch.float64), torch.tensor(5.5))
    torch.testing.assert_close(f_np, f_t)
    torch.testing.assert_close(m_np, m_t)


@parameterized.expand(
    [
        (("last",), False, False, 3),
        (("count", "mean"), False, False, 6),
        (("last", "mean", "min", "max", "count"), True, False, 16),
        (("max",), True, True, 7),
    ]
)
def test_shapes_follow_the_options(reducers, exposure, time_since, n_features):
    vocab = EHRVocabulary.fit(toy_events())
    t = EHRToIntervalFeatures(vocab, reducers=reducers, exposure=exposure, time_since=time_since)
    f, m = t(subject_events(toy_events(), "a"), [0.0, 1.0, 2.0], 5.5)
    assert tuple(f.shape) == tuple(m.shape) == (3, n_features) == (3, len(t.feature_names))


def test_bad_options():
    vocab = EHRVocabulary.fit(toy_events())
    with pytest.raises(ValueError, match="reducers"):
        EHRToIntervalFeatures(vocab, reducers=("median",))
    with pytest.raises(ValueError, match="decay"):
        EHRToIntervalFeatures(vocab, decay=0.0)
    with pytest.raises(TypeError, match="vocabulary"):
        EHRToIntervalFeatures({"codes": []})


def test_carry_forward_with_decay(vocab):
    events = {"time": np.array([0.5]), "code": np.array(["LAB//y"], dtype=object), "numeric_value": np.array([10.0])}
    plain = EHRToIntervalFeatures(vocab, reducers=("last",), time_since=False, exposure=False)
    carried = EHRToIntervalFeatures(vocab, reducers=("last",), time_since=False, exposure=False, carry_forward=True)
    decayed = EHRToIntervalFeatures(
        vocab, reducers=("last",), time_since=False, exposure=False, carry_forward=True, decay=10.0
    )
    col = plain.feature_names.index("LAB//y:last")
    value = vocab.normalise(vocab.index(["LAB//y"]), np.array([10.0]))[0]  # clipped, centred, scaled
    f0, m0 = plain(events, [0.0, 5.0], 20.0)
    f1, m1 = carried(events, [0.0, 5.0], 20.0)
    f2, m2 = decayed(events, [0.0, 5.0], 20.0)
    assert f0[:, col].tolist() == pytest.approx([value, 0.0])
    assert f1[:, col].tolist() == pytest.approx([value, value])
    # the measurement is 19.5 days old at the end of the second interval (day 20)
    assert f2[:, col].tolist() == pytest.approx([value, value * np.exp(-19.5 / 10.0)], rel=1e-6)
    for m in (m0, m1, m2):
        assert m[:, col].tolist() == [1.0, 0.0]  # a carried value is not a measurement


def _overlapping_prescriptions() -> pd.DataFrame:
    """10 mg/day from day -3 to 2, 2 mg/day from day 1 to 4, 1 mg/day from day 8 on."""
    return pd.DataFrame(
        {
            "time": [-3.0, 1.0, 2.0, 4.0, 8.0],
            "code": ["D//START", "D//START", "D//STOP", "D//STOP", "D//START"],
            "numeric_value": [10.0, 2.0, 10.0, 2.0, 1.0],
        }
    )


def test_exposure_overlaps_prior_starts_and_open_ends():
    events = _overlapping_prescriptions()
    vocab = EHRVocabulary.fit(events)
    t = EHRToIntervalFeatures(vocab, reducers=("count",), time_since=False)
    f, m = t(events, [0.0, 3.0], 10.0)
    col = t.feature_names.index("D:exposure")
    # [0, 3): 10/day from before day 0 to day 2 (20) + 2/day from day 1 on (4); [3, 10): 2/day to day 4 + 1/day 8..10
    assert f[:, col].tolist() == pytest.approx([24.0, 4.0])
    assert f[:, t.feature_names.index("D:count")].tolist() == [1.0, 1.0]  # starts in each interval


def test_cumulative_exposure_counts_the_whole_record():
    events = _overlapping_prescriptions()
    vocab = EHRVocabulary.fit(events)
    t = EHRToIntervalFeatures(vocab, reducers=("count",), time_since=False, cumulative_exposure=True)
    assert t.feature_names == ["D:count", "D:exposure", "D:cumulative_exposure"]
    f, m = t(events, [0.0, 3.0], 10.0)
    # to day 3: 10/day from day -3 to 2 (50) + 2/day from day 1 (4); to day 10: + 2/day 3..4 (2) + 1/day 8..10 (2)
    assert f[:, 2].tolist() == pytest.approx([54.0, 58.0])
    assert m[:, 2].tolist() == [1.0, 1.0]
    # after the first interval it grows by exactly that interval's exposure
    assert (f[1:, 2] - f[:-1, 2]).tolist() == pytest.approx(f[1:, 1].tolist())
    # a window of the last visit only sees 4 mg x days of exposure, but the same 58 in total
    f_late, _ = t(events, [3.0], 10.0)
    assert f_late[:, 1].tolist() == pytest.approx([4.0]) and f_late[:, 2].tolist() == pytest.approx([58.0])
    # before any drug: zero and unmasked
    f_early, m_early = t(events.iloc[3:].assign(code=["LAB//x", "D//START"]).iloc[1:], [0.0, 5.0], 7.0)
    assert f_early[:, -1].tolist() == [0.0, 0.0] and m_early[:, -1].tolist() == [0.0, 0.0]


def test_cumulative_exposure_table_equals_truncated_items():
    events, visits = random_cohort(12, 40, seed=4)
    vocab = EHRVocabulary.fit(events)
    table = interval_feature_table(events, visits, vocab, cumulative_exposure=True, chunk_events=60)
    t = EHRToIntervalFeatures(vocab, cumulative_exposure=True)
    assert table.feature_names == t.feature_names and vocab.exposure_codes
    cols = [t.feature_names.index(f"{c}:cumulative_exposure") for c in vocab.exposure_codes]
    assert (table.features[:, cols] > 0).any()
    for sid, group in visits.groupby("subject_id"):
        times = group["time"].to_numpy()
        ev = subject_events(events, sid)
        for target in range(2, len(times)):
            full, _ = table.item(sid, target)
            # the last two visits only: the total exposure still reaches back to the first record
            f, _ = t(ev, times[target - 2 : target], times[target])
            np.testing.assert_allclose(f.numpy()[:, cols], full[-2:, cols], rtol=1e-6, atol=1e-4)


def test_stop_before_start_names_subject_and_code():
    events = pd.DataFrame({"time": [1.0, 2.0], "code": ["D//STOP", "D//START"], "numeric_value": [5.0, 5.0]})
    vocab = EHRVocabulary.fit(events)
    item = {
        "subject_id": "p42",
        "events": {c: events[c].to_numpy() for c in events},
        "history_times": [0.0],
        "target_time": 5.0,
    }
    with pytest.raises(ValueError, match=r"p42.*D//STOP.*before its start"):
        EHRToIntervalFeaturesd(vocab)(item)
    # renewals at one instant (stop and restart) are fine: starts are applied first
    ok = pd.DataFrame(
        {
            "time": [0.0, 2.0, 2.0, 4.0],
            "code": ["D//START", "D//STOP", "D//START", "D//STOP"],
            "numeric_value": [5.0] * 4,
        }
    )
    f, _ = EHRToIntervalFeatures(vocab, reducers=(), time_since=False)(ok, [0.0], 5.0)
    assert f[0, 0].item() == pytest.approx(20.0)


def test_negative_dose_names_code_and_subject(vocab):
    item = {
        "subject_id": "p7",
        "events": {"time": np.array([1.0]), "code": np.array(["DRUG//d//START"]), "numeric_value": np.array([-1.0])},
        "history_times": np.array([0.0]),
        "target_time": 3.0,
    }
    with pytest.raises(ValueError, match=r"p7.*negative dose.*DRUG//d//START"):
        EHRToIntervalFeaturesd(vocab)(item)


def test_bad_values_and_times(vocab):
    t = EHRToIntervalFeatures(vocab)
    base = subject_events(toy_events(), "a")
    with pytest.raises(ValueError, match=r"infinite.*LAB//x"):
        t(dict(base, numeric_value=np.where(base["code"] == "LAB//x", np.inf, base["numeric_value"])), [0.0], 5.0)
    as_text = dict(
        base, numeric_value=np.array([("" if np.isnan(v) else str(v)) for v in base["numeric_value"]], dtype=object)
    )
    np.testing.assert_array_equal(t(as_text, [0.0, 2.0], 5.5)[0], t(base, [0.0, 2.0], 5.5)[0])
    with pytest.raises(ValueError, match=r"not a number.*LAB//y"):
        t(dict(as_text, numeric_value=np.where(base["code"] == "LAB//y", "high", as_text["numeric_value"])), [0.0], 5.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        t(base, [0.0, 2.0, 2.0], 5.5)
    with pytest.raises(ValueError, match="strictly increasing"):
        t(base, [0.0, 6.0], 5.5)
    with pytest.raises(ValueError, match="empty"):
        t(base, [], 5.5)
    with pytest.raises(ValueError, match="unit"):
        t(dict(base, unit=np.where(base["code"] == "LAB//y", "mmol/L", base["unit"])), [0.0], 5.0)


def test_datetimes_are_refused_naive_aware_mix_named(vocab):
    t = EHRToIntervalFeatures(vocab)
    stamps = np.array([pd.Timestamp("2030-01-01"), pd.Timestamp("2030-01-02", tz="UTC")], dtype=object)
    events = {"time": stamps, "code": np.array(["LAB//x", "LAB//x"]), "numeric_value": np.array([1.0, 2.0])}
    with pytest.raises(TypeError, match="mix of timezone-aware and naive"):
        t(events, [0.0], 5.0)
    events["time"] = np.array(["2030-01-01", "2030-01-02"], dtype="datetime64[ns]")
    with pytest.raises(TypeError, match="datetimes"):
        t(events, [0.0], 5.0)


def test_unknown_codes_and_outside_events_change_nothing(vocab):
    t = EHRToIntervalFeatures(vocab)
    base = subject_events(toy_events(), "a")
    extra = {
        "time": np.array([1.0, -4.0, 5.5, 9.0]),  # inside (unknown code), before b_0, at the target, after it
        "code": np.array(["LAB//never-seen", "LAB//x", "LAB//x", "LAB//y"], dtype=object),
        "numeric_value": np.array([3.0, 2.0, 2.0, 2.0]),
        "text_value": np.array([None] * 4, dtype=object),
        "unit": np.array([None] * 4, dtype=object),
    }
    more = {k: np.concatenate([base[k], extra[k]]) for k in base}
    f0, m0 = t(base, [0.0, 2.0], 5.5)
    f1, m1 = t(more, [0.0, 2.0], 5.5)
    torch.testing.assert_close(f0, f1)
    torch.testing.assert_close(m0, m1)


def test_subject_without_events(vocab):
    t = EHRToIntervalFeatures(vocab)
    empty = {"time": np.zeros(0), "code": np.zeros(0, dtype=object), "numeric_value": np.zeros(0)}
    f, m = t(empty, [0.0, 10.0], 20.0)
    assert f.shape == (2, len(t.feature_names))
    assert m.sum().item() == 0
    since = [i for i, n in enumerate(t.feature_names) if n.endswith("days_since_last")]
    assert (f[:, since] == -1).all() and (np.delete(f.numpy(), since, axis=1) == 0).all()


def test_inputs_are_not_modified(vocab):
    events = toy_events()
    frame_before = events.copy(deep=True)
    ev = subject_events(events, "a")
    arrays_before = {k: v.copy() for k, v in ev.items()}
    history = np.array([2.0, 0.0])[::-1].copy()
    t = EHRToIntervalFeatures(vocab, carry_forward=True)
    t(ev, history, 5.5)
    visits = toy_visits()
    visits_before = visits.copy(deep=True)
    interval_feature_table(events, visits, vocab)
    assert_same_arrays(ev, arrays_before)
    np.testing.assert_array_equal(history, [0.0, 2.0])
    pd.testing.assert_frame_equal(events, frame_before)
    pd.testing.assert_frame_equal(visits, visits_before)


def test_dictionary_transform_writes_stackable_keys(vocab):
    from monai.data import DataLoader

    events = toy_events()
    items = [
        {
            "subject_id": s,
            "events": subject_events(events, s),
            "history_times": np.array([0.0, 1.0]),
            "target_time": 5.5,
        }
        for s in ("a", "b", "a")
    ]
    td = EHRToIntervalFeaturesd(vocab)
    out = [td(item) for item in items]
    assert set(out[0]) == set(items[0]) | {"ehr_intervals", "ehr_intervals_mask"}
    assert out[0]["events"] is items[0]["events"]  # inputs passed through untouched
    batch = next(
        iter(DataLoader([{k: o[k] for k in ("ehr_intervals", "ehr_intervals_mask")} for o in out], batch_size=3))
    )
    assert batch["ehr_intervals"].shape == (3, 2, len(td.feature_names))
    torch.testing.assert_close(batch["ehr_intervals"][0], batch["ehr_intervals"][2])


def test_works_on_dataset_items(nifti_cohort):
    from monai_twin.data import build_longitudinal_items, load_manifest

    manifest = load_manifest(nifti_cohort, check_images="none", valueless_events="keep")
    vocab = EHRVocabulary.fit(manifest.events, manifest.static, subjects=manifest.subjects[:4])
    table = interval_feature_table(manifest.events, manifest.visits, vocab)
    td = EHRToIntervalFeaturesd(vocab)
    for item in build_longitudinal_items(manifest):
        out = td(item)
        tf, tm = table.item(item["subject_id"], item["target_index"])
        np.testing.assert_allclose(out["ehr_intervals"].numpy(), tf, rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out["ehr_intervals_mask"].numpy(), tm)
        assert out["ehr_intervals"].shape[0] == len(item["history_times"])


# -- properties -------------------------------------------------------------------------------

event_rows = st.lists(
    st.tuples(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 4.5]),  # coarse grid: many duplicate timestamps
        st.sampled_from(["LAB//x", "LAB//y", "LAB//z"]),
        st.floats(-50, 50, allow_nan=False) | st.just(float("nan")),
    ),
    max_size=25,
)


def _frame(rows):
    return pd.DataFrame(
        {
            "time": [r[0] for r in rows],
            "code": pd.Series([r[1] for r in rows], dtype=object),
            "numeric_value": [r[2] for r in rows],
        }
    )


@settings(max_examples=60, deadline=None)
@given(rows=event_rows, seed=st.integers(0, 2**32 - 1))
def test_property_row_order_does_not_matter(rows, seed):
    vocab = EHRVocabulary.fit(_frame(rows + [(0.0, "LAB//x", 1.0), (0.0, "LAB//y", 2.0), (0.0, "LAB//z", 3.0)]))
    t = EHRToIntervalFeatures(vocab, carry_forward=True, decay=3.0)
    frame = _frame(rows)
    shuffled = frame.sample(frac=1.0, random_state=seed % 2**31).reset_index(drop=True)
    f0, m0 = t(frame, [0.0, 1.0, 2.5], 4.5)
    f1, m1 = t(shuffled, [0.0, 1.0, 2.5], 4.5)
    # sums may differ in the last bit with the order of addition; everything else is exact
    torch.testing.assert_close(f0, f1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m0, m1, rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(
    rows=event_rows,
    outside=st.lists(
        st.tuples(
            st.floats(-100, -0.001) | st.floats(4.5, 100),
            st.sampled_from(["LAB//x", "LAB//y", "LAB//unknown"]),
            st.floats(-50, 50, allow_nan=False),
        ),
        min_size=1,
        max_size=5,
    ),
)
def test_property_events_outside_every_interval_change_nothing(rows, outside):
    vocab = EHRVocabulary.fit(_frame([(0.0, "LAB//x", 1.0), (0.0, "LAB//y", 5.0)]))
    t = EHRToIntervalFeatures(vocab, carry_forward=True)
    f0, m0 = t(_frame(rows), [0.0, 1.0, 2.5], 4.5)
    f1, m1 = t(_frame(rows + outside), [0.0, 1.0, 2.5], 4.5)
    torch.testing.assert_close(f0, f1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m0, m1, rtol=0, atol=0)


def test_table_names_subjects_with_repeated_visit_times(vocab):
    visits = pd.DataFrame({"subject_id": ["a", "a", "b", "b"], "time": [0.0, 0.0, 0.0, 3.0]})
    with pytest.raises(ValueError, match=r"distinct per subject.*\['a'\]"):
        interval_feature_table(toy_events(), visits, vocab)
    with pytest.raises(TypeError, match="datetimes"):
        interval_feature_table(toy_events().assign(time=pd.Timestamp("2030-01-01")), toy_visits(), vocab)


def test_table_in_subject_blocks_equals_one_pass():
    events, visits = random_cohort(30, 25, seed=5)
    # a single-visit subject has no interval but must not shift anyone else's rows
    visits = pd.concat([visits, pd.DataFrame({"subject_id": ["s9999"], "time": [0.0]})], ignore_index=True)
    events = pd.concat(
        [events, pd.DataFrame({"subject_id": ["s9999"], "time": [1.0], "code": ["LAB//0"], "numeric_value": [1.0]})],
        ignore_index=True,
    )
    vocab = EHRVocabulary.fit(events)
    whole = interval_feature_table(events, visits, vocab, carry_forward=True, decay=5.0)
    blocks = interval_feature_table(events, visits, vocab, carry_forward=True, decay=5.0, chunk_events=40)
    np.testing.assert_array_equal(blocks.features, whole.features)
    np.testing.assert_array_equal(blocks.mask, whole.mask)
    assert "s9999" not in set(whole.subject_id)
    assert len(whole.features) == len(visits) - visits["subject_id"].nunique()
