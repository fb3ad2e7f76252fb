from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
from parameterized import parameterized

from monai_twin.data.synthetic import DoseSchedule, simulate_subject, subject_truth
from monai_twin.data.synthetic.mammo2d import mammo2d_measure, mammo2d_truth
from tests.data.synthetic.conftest import CONFIGS

FACTORS = (0.0, 0.5, 1.0, 2.0, 4.0)
#: the tracked quantity of each simulator, which more drug must reduce
OUTCOME = {"mammo2d": "lesion_area_mm2", "mri_roi3d": "atrophy_mm"}


def _scaled_events(subject, factor):
    s = subject.schedule.scaled(factor)
    return pd.DataFrame({"time": s.days, "code": subject.drug_code, "numeric_value": s.doses})


@parameterized.expand([("mammo2d",), ("mri_roi3d",)])
def test_dose_monotonicity_over_a_cohort(kind):
    strict = 0
    for index in range(40):
        subject = simulate_subject(kind, index, seed=3, config=CONFIGS[kind])
        outcome = np.stack(
            [subject_truth(subject, _scaled_events(subject, f))[OUTCOME[kind]].to_numpy() for f in FACTORS]
        )
        growth = outcome - outcome[:, :1]
        # more drug never gives more growth, at any visit
        assert np.all(np.diff(growth, axis=0) <= 1e-9), (kind, index, growth)
        treated = len(subject.schedule.doses) and subject.schedule.doses.max() > 0
        if treated and growth[0, -1] > 0:
            assert growth[-1, -1] < growth[0, -1]
            strict += 1
    assert strict >= 10  # the cohort has enough treated, progressing subjects to make this a check


def test_exposure_matches_a_numerical_integral():
    schedule = DoseSchedule(np.array([10.5, 40.0, 40.0, 90.25]), np.array([20.0, 10.0, 5.0, 0.0]))
    t = np.linspace(0.0, 120.0, 120001)
    dose = schedule.dose_at(t)
    numeric = np.concatenate([[0.0], np.cumsum(0.5 * (dose[1:] + dose[:-1]) * np.diff(t))])
    exact = schedule.exposure(t)
    assert np.abs(exact - numeric).max() < 0.05
    # the last change on a day wins; before the first change the dose is 0
    assert schedule.dose_at(np.array([5.0, 45.0]))[0] == 0.0
    assert schedule.dose_at(np.array([45.0]))[0] == 5.0
    assert exact[-1] == pytest.approx(20 * 29.5 + 5 * 50.25)


def test_gompertz_solution_matches_the_ode():
    subject = simulate_subject("mammo2d", 0, seed=0, config=CONFIGS["mammo2d"])
    subject.latent.update(lesion_type="round", area0=25.0, capacity=900.0, r0=0.004)
    schedule = DoseSchedule(np.array([100.0, 300.0]), np.array([20.0, 0.0]))
    dt = 0.05
    t = np.arange(0.0, 600.0 + dt, dt)
    area = np.empty_like(t)
    area[0] = 25.0
    rate = subject.latent["r0"] * np.exp(-subject.config.kappa * schedule.exposure(t))
    for i in range(1, t.size):  # explicit Euler on dA/dt = r A ln(K/A)
        area[i] = area[i - 1] + dt * rate[i - 1] * area[i - 1] * np.log(900.0 / area[i - 1])
    closed = mammo2d_truth(subject, schedule, t[::2000])["lesion_area_mm2"].to_numpy()
    np.testing.assert_allclose(closed, area[::2000], rtol=5e-3)


@parameterized.expand([("mammo2d",), ("mri_roi3d",)])
def test_changed_flag_uses_the_stated_threshold(kind):
    config = CONFIGS[kind]
    flags, changes = [], []
    for index in range(30):
        truth = subject_truth(simulate_subject(kind, index, seed=1, config=config))
        assert pd.isna(truth["changed"].iloc[0]) and np.isnan(truth["change_mm"].iloc[0])
        column = "lesion_diameter_mm" if kind == "mammo2d" else "atrophy_mm"
        np.testing.assert_allclose(truth["change_mm"].iloc[1:], np.abs(np.diff(truth[column])))
        flags.append(truth["changed"].iloc[1:].to_numpy(dtype=bool))
        changes.append(truth["change_mm"].iloc[1:].to_numpy())
    flags, changes = np.concatenate(flags), np.concatenate(changes)
    np.testing.assert_array_equal(flags, changes >= config.change_threshold_mm)
    # both subsets are populated, so changed/unchanged scores are both measurable
    assert 0.15 < flags.mean() < 0.85


def test_future_ehr_targets_track_the_truth():
    log_ratios = []
    for index in range(30):
        subject = simulate_subject("mammo2d", index, seed=2, config=CONFIGS["mammo2d"])
        truth = subject_truth(subject)
        # the marker is the subject's baseline plus a term proportional to tumour burden
        np.testing.assert_allclose(
            truth["ca153_true"] - subject.latent["marker_base"], 0.06 * truth["lesion_area_mm2"], atol=1e-9
        )
        plan = subject.labs[0]
        measured = mammo2d_measure(subject, subject.schedule)[plan.code]
        true = mammo2d_truth(subject, subject.schedule, plan.days)["ca153_true"].to_numpy()
        log_ratios.append(np.log(measured / true))
    spread = np.concatenate(log_ratios).std()
    assert 0.06 < spread < 0.10  # the stated 8 % multiplicative noise
    for index in range(10):
        truth = subject_truth(simulate_subject("mri_roi3d", index, seed=2, config=CONFIGS["mri_roi3d"]))
        assert np.all(np.diff(truth["atrophy_mm"]) > 0)
        assert np.all(np.diff(truth["mmse_true"]) <= 0)


def test_dose_schedule_validation():
    with pytest.raises(ValueError, match="doses"):
        DoseSchedule(np.array([1.0]), np.array([-5.0]))
    with pytest.raises(ValueError, match="same length"):
        DoseSchedule(np.array([1.0, 2.0]), np.array([5.0]))
    with pytest.raises(ValueError, match="factor"):
        DoseSchedule(np.array([1.0]), np.array([5.0])).scaled(-1.0)


def test_mri_atrophy_shrinks_grey_matter_and_widens_csf():
    from monai_twin.data.synthetic.mri_roi3d import MRIROI3DConfig, mri_roi3d_render

    subject = simulate_subject("mri_roi3d", 1, seed=0, config=MRIROI3DConfig(size=32, spacing_mm=2.0))
    volumes = []
    for atrophy in (0.0, 1.0, 2.0):
        _, labels, vol = mri_roi3d_render(subject, pd.Series({"atrophy_mm": atrophy}))
        assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}
        volumes.append(vol)
    gm = [v["gm_volume_mm3"] for v in volumes]
    csf = [v["csf_volume_mm3"] for v in volumes]
    assert gm[0] > gm[1] > gm[2] and csf[0] < csf[1] < csf[2]
    # about 2 mm of boundary retreat removes a few percent of the ROI's grey matter, not all of it
    assert 0.005 < 1.0 - gm[2] / gm[0] < 0.2


def test_prior_lesion_area_is_the_mean_over_the_cohort_prior():
    from monai_twin.data.synthetic.mammo2d import (
        CAPACITY_RANGE_MM2,
        GROWTH_RATE_LOG_MEAN,
        GROWTH_RATE_LOG_SD,
        HRT_GROWTH_FACTOR,
        mammo2d_prior_lesion_area,
    )

    subjects = [simulate_subject("mammo2d", i, seed=5, config=CONFIGS["mammo2d"]) for i in range(12)]
    subject = next(s for s in subjects if s.latent["lesion_type"] != "none" and len(s.schedule.doses))
    days = np.asarray([0.0, 200.0, 500.0, 900.0])
    # the vectorised form (growth integral = r0 x an r0-free integral) against explicit subjects with
    # the same draws of the growth rate and capacity
    rng = np.random.default_rng(7)
    capacity = rng.uniform(*CAPACITY_RANGE_MM2, 30)
    hrt = subject.static["hormone_therapy"]
    r0 = np.exp(rng.normal(GROWTH_RATE_LOG_MEAN, GROWTH_RATE_LOG_SD, 30)) * (1.0 + HRT_GROWTH_FACTOR * hrt)
    explicit = np.mean(
        [
            mammo2d_truth(
                dataclasses.replace(subject, latent=dict(subject.latent, capacity=k, r0=r)), subject.schedule, days
            )["lesion_area_mm2"].to_numpy()
            for k, r in zip(capacity, r0)
        ],
        axis=0,
    )
    expected = mammo2d_prior_lesion_area(subject, subject.schedule, days, n_draws=30, seed=7)
    np.testing.assert_allclose(expected, explicit, rtol=1e-10)
    # the first scan is seen exactly; the draws bracket the subject's own future
    assert expected[0] == pytest.approx(subject.latent["area0"])
    assert np.all(np.diff(expected) > 0)
    # more drug, a smaller expected lesion later on; no lesion, nothing expected
    more = mammo2d_prior_lesion_area(subject, subject.schedule.scaled(3.0), days, seed=7, n_draws=30)
    assert np.all(more[1:] < expected[1:])
    plain = next(s for s in subjects if s.latent["lesion_type"] == "none")
    np.testing.assert_array_equal(mammo2d_prior_lesion_area(plain, plain.schedule, days), np.zeros(4))
