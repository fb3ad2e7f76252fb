from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monai_twin.data import edit_events, running_dose
from monai_twin.data.synthetic import Mammo2DConfig, simulate_subject, subject_truth
from monai_twin.data.synthetic.subject import build_events
from monai_twin.transforms.ehr import EHRToIntervalFeatures, EHRVocabulary

DRUG = "DRUG//d"


def _events():
    """20 mg/day from day 10, changed to 40 on day 100 (stop+start), stopped on day 200; a lab."""
    return {
        "time": np.array([np.nan, 10.0, 50.0, 100.0, 100.0, 200.0]),
        "code": np.array(["STATIC//sex//F", DRUG + "//START", "LAB//x", DRUG + "//STOP", DRUG + "//START", DRUG + "//STOP"], dtype=object),
        "numeric_value": np.array([np.nan, 20.0, 3.0, 20.0, 40.0, 40.0]),
        "unit": np.array([None, "mg/day", "u", "mg/day", "mg/day", "mg/day"], dtype=object),
        "text_value": np.array([None] * 6, dtype=object),
    }  # fmt: skip


def _integral(events, lo, hi):
    """Numerical integral of the running dose over [lo, hi) (10 000 samples)."""
    times, level = running_dose(events, DRUG)
    grid = np.linspace(lo, hi, 10_001)[:-1] + (hi - lo) / 20_000
    k = np.searchsorted(times, grid, side="right") - 1
    return float(np.where(k >= 0, level[np.clip(k, 0, None)], 0.0).mean() * (hi - lo))


def test_running_dose_reads_start_stop_pairs():
    times, level = running_dose(_events(), DRUG)
    np.testing.assert_array_equal(times, [10.0, 100.0, 200.0])
    np.testing.assert_array_equal(level, [20.0, 40.0, 0.0])
    bad = _events()
    bad["numeric_value"][5] = 60.0
    with pytest.raises(ValueError, match=r"DRUG//d//STOP.*day 200"):
        running_dose(bad, DRUG)


def test_halving_acts_on_the_running_dose_inside_the_window_only():
    events = _events()
    edited = edit_events(events, DRUG, scale=0.5, after=60.0, before=150.0)
    times, level = running_dose(edited, DRUG)
    # 20 until day 60, halved to 10 until 100, 20 (half of 40) until 150, back to 40 until 200
    np.testing.assert_array_equal(times, [10.0, 60.0, 100.0, 150.0, 200.0])
    np.testing.assert_array_equal(level, [20.0, 10.0, 20.0, 40.0, 0.0])
    for lo, hi, factor in [(0, 60, 1.0), (60, 150, 0.5), (150, 300, 1.0)]:
        assert _integral(edited, lo, hi) == pytest.approx(factor * _integral(events, lo, hi), rel=1e-3)
    # the other rows are untouched, static rows stay first, the input is not modified
    assert edited["code"][0] == "STATIC//sex//F" and "LAB//x" in set(edited["code"])
    np.testing.assert_array_equal(events["numeric_value"], _events()["numeric_value"])
    assert set(edited["unit"][np.char.startswith(edited["code"].astype(str), DRUG)]) == {"mg/day"}
    assert np.all(np.diff(edited["time"][1:]) >= 0)


def test_edit_without_an_event_in_the_window_still_changes_the_dose():
    # the drug runs through [120, 180) without any event there: a plain value edit would do nothing
    edited = edit_events(_events(), DRUG, value=0.0, after=120.0)
    times, level = running_dose(edited, DRUG)
    np.testing.assert_array_equal(times, [10.0, 100.0, 120.0])
    np.testing.assert_array_equal(level, [20.0, 40.0, 0.0])
    started = edit_events(_events(), DRUG, value=5.0, after=250.0)
    assert running_dose(started, DRUG)[1][-1] == 5.0
    # a drug the patient never had: exposure=True says what the code is
    never = {k: v[[0, 2]] for k, v in _events().items()}
    first = edit_events(never, DRUG, value=10.0, after=60.0, exposure=True)
    assert list(first["code"][-1:]) == [DRUG + "//START"] and first["unit"][-1] is None
    np.testing.assert_array_equal(running_dose(first, DRUG)[1], [10.0])
    with pytest.raises(ValueError, match="give after="):
        edit_events(never, DRUG, value=10.0, exposure=True)


def test_edits_that_change_nothing_or_are_malformed_are_errors():
    with pytest.raises(ValueError, match=r"'DRUG//d' changes nothing"):
        edit_events(_events(), DRUG, scale=0.5, after=300.0)
    with pytest.raises(ValueError, match="exactly one"):
        edit_events(_events(), DRUG)
    with pytest.raises(ValueError, match="empty"):
        edit_events(_events(), DRUG, scale=2.0, after=5.0, before=5.0)
    with pytest.raises(ValueError, match=r"no event with code 'LAB//y'"):
        edit_events(_events(), "LAB//y", scale=2.0)
    with pytest.raises(KeyError, match="numeric_value"):
        edit_events({"time": [1.0], "code": ["a"]}, "a", scale=2.0)


def test_plain_codes_keep_the_value_edit():
    edited = edit_events(_events(), "LAB//x", value=7.0)
    assert edited["numeric_value"][2] == 7.0


def test_edited_synthetic_events_reach_the_exposure_feature_and_the_simulator():
    """The synthetic cohort's drug events, the EHR exposure feature and the what-if edit agree."""
    subject = next(
        s
        for s in (simulate_subject("mammo2d", i, seed=11, config=Mammo2DConfig(size=64)) for i in range(60))
        if len(s.schedule.doses) and s.schedule.doses[0] > 0 and s.n_visits >= 3
    )
    truth = subject_truth(subject)
    recorded = build_events(subject, subject.schedule, {p.code: np.ones(len(p.days)) for p in subject.labs})
    recorded = recorded.assign(time=subject.to_days(recorded["time"]))
    vocab = EHRVocabulary.fit(recorded)
    assert vocab.exposure_codes == [subject.drug_code]
    bounds = subject.visit_days
    encode = EHRToIntervalFeatures(vocab)
    name = encode.feature_names.index(f"{subject.drug_code}:exposure")
    exposure = encode(recorded, bounds[:-1], bounds[-1])[0][:, name].numpy().astype(np.float64)
    expected = [_integral_of(subject, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    np.testing.assert_allclose(exposure, expected, rtol=1e-4)
    assert exposure.max() > 0
    # halving from the second visit on: the feature halves there, the simulator's lesion grows more
    halved = pd.DataFrame(edit_events(recorded, subject.drug_code, scale=0.5, after=float(bounds[1])))
    exposure_h = encode(halved, bounds[:-1], bounds[-1])[0][:, name].numpy()
    np.testing.assert_allclose(exposure_h[1:], 0.5 * exposure[1:], rtol=1e-4)
    np.testing.assert_allclose(exposure_h[:1], exposure[:1], rtol=1e-6)
    truth_h = subject_truth(subject, halved)
    assert (truth_h["lesion_area_mm2"].to_numpy() >= truth["lesion_area_mm2"].to_numpy() - 1e-9).all()


def _integral_of(subject, lo, hi):
    e = subject.schedule.exposure(np.array([lo, hi]))
    return float(e[1] - e[0])
