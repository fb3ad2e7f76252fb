from __future__ import annotations

import hashlib
import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from monai.transforms import LoadImage
from parameterized import parameterized

from monai_twin.data import LongitudinalDataset, edit_events, load_manifest
from monai_twin.data.synthetic import (
    Mammo2DConfig,
    load_subject,
    resimulate,
    simulate_subject,
    write_cohort,
)
from monai_twin.data.synthetic.subject import schedule_from_events
from tests.data.synthetic.conftest import CONFIGS, N_SUBJECTS

KINDS = [("mammo2d",), ("mri_roi3d",)]


def _hashes(folder):
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_cohort_passes_manifest_validation_and_loads(small_cohorts):
    for kind, folder in small_cohorts.items():
        manifest = load_manifest(folder)  # default settings: header check of every image and mask
        assert manifest.time_kind == "datetime"
        assert len(manifest) == N_SUBJECTS[kind]
        visits = pd.read_parquet(folder / "visits.parquet")
        truth = pd.read_parquet(folder / "truth.parquet")
        assert len(truth) == len(visits) == len(manifest.visits)
        per_subject = visits.groupby("subject_id").size()
        low, high = CONFIGS[kind].visits
        assert per_subject.between(low, high).all()
        # irregular visits: gaps of months that are not all equal
        gaps = manifest.visits.groupby("subject_id")["time"].diff().dropna()
        assert gaps.min() >= CONFIGS[kind].min_gap_days - 1 and gaps.nunique() > len(gaps) // 2
        dataset = LongitudinalDataset(manifest)
        assert len(dataset) == int((per_subject - 1).sum())
        item = dataset[len(dataset) - 1]
        image = LoadImage(image_only=True)(item["target"])
        assert tuple(image.shape) == CONFIGS[kind].spatial_shape
        label = LoadImage(image_only=True)(item["target_label"])
        assert set(np.unique(np.asarray(label)).tolist()) <= {0, 1, 2, 3}
        # the future-EHR target is measured at most visits (never all: some are missing)
        target_code = "LAB//CA15-3" if kind == "mammo2d" else "SCORE//MMSE"
        with_target = [target_code in set(it["target_events"]["code"]) for it in dataset.data]
        assert 0.5 < np.mean(with_target) <= 1.0
        meta = json.loads((folder / "cohort.json").read_text())
        assert meta["changed"]["threshold_mm"] == CONFIGS[kind].change_threshold_mm


def test_events_hold_dose_changes_and_labs_at_their_own_times(small_cohorts):
    events = pd.read_parquet(small_cohorts["mammo2d"] / "events.parquet")
    visits = pd.read_parquet(small_cohorts["mammo2d"] / "visits.parquet")
    drug = events[events["code"].str.startswith("DRUG//tamoxifen")]
    # the drug follows the exposure convention of the EHR transforms: start/stop events with the dose
    assert set(drug["code"]) == {"DRUG//tamoxifen//START", "DRUG//tamoxifen//STOP"}
    assert (drug["unit"] == "mg/day").all() and drug["numeric_value"].gt(0).all()
    # per subject the running dose never drops below zero and each stop closes an earlier start
    for _, rows in drug.groupby("subject_id"):
        signed = np.where(rows["code"].str.endswith("//START"), 1.0, -1.0) * rows["numeric_value"].to_numpy()
        running = pd.Series(signed).groupby(rows["time"].to_numpy()).sum().cumsum()
        assert running.min() >= -1e-9
    labs = events[events["code"] == "LAB//CA15-3"]
    assert labs["numeric_value"].between(5, 200).all()
    # some labs fall between visits (more than three hours from every scan)
    lab_t = labs["time"].to_numpy()[:, None]
    visit_t = visits["time"].to_numpy()[None, :]
    nearest = np.abs(lab_t - visit_t).min(1) / np.timedelta64(1, "h")
    assert (nearest > 3).any() and (nearest <= 3).any()
    mri = pd.read_parquet(small_cohorts["mri_roi3d"] / "events.parquet")
    assert {"DRUG//anti-amyloid//START", "DRUG//anti-amyloid//STOP", "LAB//amyloid-SUVR", "SCORE//MMSE"} >= set(
        mri["code"]
    )
    assert mri.loc[mri["code"] == "SCORE//MMSE", "numeric_value"].between(0, 30).all()


@parameterized.expand(KINDS)
def test_same_seed_same_bytes_different_seed_different_subjects(kind):
    import tempfile
    from pathlib import Path

    config = CONFIGS[kind]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        a = write_cohort(kind, root / "a", 3, seed=21, config=config)
        b = write_cohort(kind, root / "b", 3, seed=21, config=config, workers=2)
        c = write_cohort(kind, root / "c", 3, seed=22, config=config)
        ha, hb, hc = _hashes(a), _hashes(b), _hashes(c)
        assert ha == hb and len(ha) > 10
        assert ha.keys() != hc.keys() or any(ha[k] != hc[k] for k in ha)
        sa = pd.read_parquet(a / "visits.parquet")["time"]
        sc = pd.read_parquet(c / "visits.parquet")["time"]
        assert not sa.head(2).equals(sc.head(2))


def test_write_refuses_to_touch_an_existing_folder(small_cohorts, tmp_path):
    before = _hashes(small_cohorts["mammo2d"])
    with pytest.raises(ValueError, match="out_dir"):
        write_cohort("mammo2d", small_cohorts["mammo2d"], 2, config=CONFIGS["mammo2d"])
    assert _hashes(small_cohorts["mammo2d"]) == before
    with pytest.raises(ValueError, match="kind"):
        write_cohort("ct", tmp_path / "x", 2)
    with pytest.raises(TypeError, match="config"):
        write_cohort("mri_roi3d", tmp_path / "y", 2, config=Mammo2DConfig())
    with pytest.raises(ValueError, match="n_subjects"):
        write_cohort("mammo2d", tmp_path / "z", 0)


def test_resimulate_reproduces_the_written_subject(small_cohorts):
    for folder in small_cohorts.values():
        subject = load_subject(folder, "P0001")
        visits = resimulate(subject)
        truth = pd.read_parquet(folder / "truth.parquet")
        rows = truth[truth["subject_id"] == "P0001"]
        for k, rel in enumerate(rows["image"]):
            saved = np.asarray(nib.load(str(folder / rel)).get_fdata(dtype=np.float32))
            # images are stored in steps of 1/4000 of the intensity range (12-bit-like)
            assert np.abs(saved - visits.images[k]).max() <= 0.5 / 4000 + 1e-6
        np.testing.assert_allclose(visits.truth["change_mm"].iloc[1:], rows["change_mm"].iloc[1:])
        events = pd.read_parquet(folder / "events.parquet")
        written = events[events["subject_id"] == "P0001"].reset_index(drop=True)
        pd.testing.assert_frame_equal(visits.events, written, check_dtype=False)
    with pytest.raises(ValueError, match="subject_id"):
        load_subject(small_cohorts["mammo2d"], "P9999")


def _first_treated_with_lesion(config, seed=4):
    for index in range(100):
        subject = simulate_subject("mammo2d", index, seed=seed, config=config)
        if subject.latent["lesion_type"] != "none" and subject.schedule.doses.max(initial=0) > 0:
            return subject
    raise AssertionError("no treated subject with a lesion in 100 draws")


def test_resimulate_counterfactual_changes_only_the_lesion():
    subject = _first_treated_with_lesion(CONFIGS["mammo2d"])
    factual = resimulate(subject)
    # the what-if: the drug is never given
    never = pd.DataFrame({"time": [0.0], "code": [subject.drug_code], "numeric_value": [0.0]})
    what_if = resimulate(subject, never)
    area_f = factual.truth["lesion_area_mm2"].to_numpy()
    area_w = what_if.truth["lesion_area_mm2"].to_numpy()
    assert area_w[0] == area_f[0]
    assert area_w[-1] > area_f[-1]  # untreated, the lesion grows more
    # same anatomy, acquisition and noise: only pixels around the lesion (core and spicules) differ
    np.testing.assert_array_equal(what_if.images[0], factual.images[0])
    spacing = subject.config.spacing
    reach_px = 3.5 * np.sqrt(area_w.max() / np.pi) / spacing + 4.0  # spicules reach ~3 radii
    for k in range(1, subject.n_visits):
        differs = np.abs(what_if.images[k] - factual.images[k]) > 1e-3
        centre = np.argwhere(what_if.masks[k]).mean(0)
        distance = np.sqrt(((np.argwhere(differs) - centre) ** 2).sum(1))
        assert distance.max(initial=0.0) <= reach_px
    assert np.abs(what_if.images[-1] - factual.images[-1]).max() > 0.05
    # the recorded EHR follows the edit: no dose, and the marker is higher at the end
    assert not what_if.events["code"].str.startswith(subject.drug_code).any()
    assert what_if.truth["ca153_true"].iloc[-1] > factual.truth["ca153_true"].iloc[-1]


def test_resimulate_accepts_dates_and_forecast_days():
    subject = _first_treated_with_lesion(CONFIGS["mammo2d"], seed=6)
    events = resimulate(subject).events
    days = events.assign(time=subject.to_days(events["time"]))
    doubled = pd.DataFrame(edit_events(days, subject.drug_code, scale=2.0))
    # the edit acts on the running dose: the recorded schedule, doubled
    edited = schedule_from_events(subject, doubled)
    np.testing.assert_allclose(edited.doses, subject.schedule.doses * 2)
    np.testing.assert_allclose(edited.days, subject.schedule.days, atol=1e-6)
    factual, what_if = resimulate(subject), resimulate(subject, doubled)
    assert what_if.truth["lesion_area_mm2"].iloc[-1] < factual.truth["lesion_area_mm2"].iloc[-1]
    later = subject.visit_days[-1] + 365.0
    forecast = resimulate(subject, days=[*subject.visit_days, later])
    assert forecast.images.shape[0] == subject.n_visits + 1
    np.testing.assert_array_equal(forecast.images[:-1], factual.images)
    with pytest.raises(ValueError, match="edited_events"):
        resimulate(subject, events.drop(columns="numeric_value"))
    with pytest.raises(TypeError, match="edited_events"):
        resimulate(subject, {"time": [0]})


def test_save_aligned_writes_the_noise_free_renders(tmp_path):
    config = CONFIGS["mammo2d"]
    folder = write_cohort("mammo2d", tmp_path / "aligned", 1, seed=8, config=config, save_aligned=True)
    truth = pd.read_parquet(folder / "truth.parquet")
    visits = resimulate(load_subject(folder, "P0000"))
    for k, rel in enumerate(truth["aligned"]):
        saved = np.asarray(nib.load(str(folder / rel)).get_fdata(dtype=np.float32))
        assert np.abs(saved - visits.aligned[k]).max() <= 0.5 / 4000 + 1e-6
