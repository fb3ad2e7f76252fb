"""Bundle datalists on a simulated mammography cohort: sections, forecast dates, required codes."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from monai_twin.data import (
    build_longitudinal_items,
    fit_vocabulary,
    forecast_datalist,
    load_manifest,
    manifest_datalist,
    split_subjects,
)
from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
from monai_twin.transforms.ehr import EHRVocabulary


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return write_cohort(
        "mammo2d", tmp_path_factory.mktemp("datalist") / "c", n_subjects=10, seed=3, config=Mammo2DConfig(size=32)
    )


def test_sections_partition_the_subjects_and_match_the_dataset_items(cohort):
    manifest = load_manifest(cohort)
    split = split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=0)
    seen = {}
    for section in ("training", "validation", "test"):
        items = manifest_datalist(cohort, section, max_history=4)
        seen[section] = {i["subject_id"] for i in items}
        assert seen[section] <= set(split[section])
        expected = build_longitudinal_items(manifest, max_history=4, subjects=split[section])
        assert [(i["subject_id"], i["target_index"]) for i in items] == [
            (i["subject_id"], i["target_index"]) for i in expected
        ]
    assert not (seen["training"] & seen["test"]) and not (seen["validation"] & seen["test"])
    # target_date is the visit's calendar date
    item = manifest_datalist(cohort, "training", max_history=4)[0]
    visits = manifest.subject_visits(item["subject_id"])
    stamp = pd.Timestamp(manifest.to_time(item["subject_id"], visits["time"].iloc[item["target_index"]]))
    assert item["target_date"] == stamp.date().isoformat()


def test_forecast_items_fall_the_chosen_days_after_the_last_scan(cohort):
    manifest = load_manifest(cohort)
    items = forecast_datalist(cohort, days_after_last=200, max_history=3)
    assert [i["subject_id"] for i in items] == manifest.subjects
    for item in items:
        last = float(manifest.subject_visits(item["subject_id"])["time"].iloc[-1])
        assert item["target_time"] == pytest.approx(last + 200)
        assert item["times"][-1] == pytest.approx(200)
        assert len(item["history"]) == min(3, len(manifest.subject_visits(item["subject_id"])))
        assert item["target_index"] == -1
    one = forecast_datalist(cohort, when={manifest.subjects[0]: "2040-01-01"}, subjects=manifest.subjects[:1])
    assert one[0]["target_date"] == "2040-01-01"


def test_missing_codes_are_listed_by_name(cohort, tmp_path):
    with pytest.raises(ValueError, match=r"needs the EHR code\(s\) \['DRUG//letrozole', 'LAB//CEA'\]"):
        manifest_datalist(cohort, required_codes=["DRUG//tamoxifen", "DRUG//letrozole", "LAB//CA15-3", "LAB//CEA"])
    # a manifest whose events lack the lab the model forecasts
    folder = tmp_path / "no_lab"
    shutil.copytree(cohort, folder)
    events = pd.read_parquet(folder / "events.parquet")
    events[events["code"] != "LAB//CA15-3"].to_parquet(folder / "events.parquet")
    with pytest.raises(ValueError, match=r"no_lab.*\['LAB//CA15-3'\]"):
        forecast_datalist(folder, required_codes=["DRUG//tamoxifen", "LAB//CA15-3"])
    with pytest.raises(FileNotFoundError, match="not a folder"):
        manifest_datalist(tmp_path / "nowhere")
    with pytest.raises(KeyError, match="P9999"):
        forecast_datalist(cohort, subjects=["P9999"])


def test_vocabulary_is_fitted_on_training_subjects_and_saved(cohort, tmp_path):
    manifest = load_manifest(cohort)
    split = split_subjects(manifest.subjects, (0.7, 0.15, 0.15), seed=0)
    path = tmp_path / "models" / "ehr_vocabulary.json"
    vocabulary = fit_vocabulary(cohort, save_to=path)
    assert vocabulary == EHRVocabulary.fit(manifest.events, manifest.static, subjects=split["training"])
    assert EHRVocabulary.load(path) == vocabulary
    counts = manifest.events[manifest.events["subject_id"].isin(split["training"])]["code"].value_counts()
    np.testing.assert_equal(vocabulary.counts["LAB//CA15-3"], int(counts["LAB//CA15-3"]))
