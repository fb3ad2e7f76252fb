"""EditEventsd: what-if edits of each item's forecast interval, on simulated mammography items."""

from __future__ import annotations

import numpy as np
import pytest

from monai_twin.data import build_longitudinal_items, edit_events, load_manifest, running_dose
from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
from monai_twin.transforms.ehr import EditEventsd, EHRToIntervalFeaturesd, EHRVocabulary

DRUG = "DRUG//tamoxifen"


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    folder = write_cohort(
        "mammo2d", tmp_path_factory.mktemp("edit") / "c", n_subjects=12, seed=5, config=Mammo2DConfig(size=32)
    )
    manifest = load_manifest(folder)
    return build_longitudinal_items(manifest, max_history=4), EHRVocabulary.fit(manifest.events, manifest.static)


def _dose_in_interval(item) -> float:
    times, level = running_dose(item["events"], DRUG)
    k = np.searchsorted(times, item["history_times"][-1], side="right") - 1
    return float(level[k]) if k >= 0 else 0.0


def test_halving_acts_on_the_forecast_interval_only(items):
    items, vocabulary = items
    item = next(i for i in items if _dose_in_interval(i) > 0)
    out = EditEventsd([{"code": DRUG, "scale": 0.5}])(item)
    last, target = float(item["history_times"][-1]), float(item["target_time"])
    expected = edit_events(item["events"], DRUG, scale=0.5, after=last, before=target)
    for column in ("time", "code", "numeric_value"):
        np.testing.assert_array_equal(np.asarray(out["events_whatif"][column]), np.asarray(expected[column]))
    assert out["events"] is item["events"]  # the recorded events are left as they were
    assert out["whatif_edits"] == [{"code": DRUG, "scale": 0.5, "from_day": last, "to_day": target, "applied": True}]
    # encoded: the last interval's exposure halves, the earlier intervals do not move
    base = EHRToIntervalFeaturesd(vocabulary)(out)
    edited = EHRToIntervalFeaturesd(vocabulary, events_key="events_whatif", output_key="cf", mask_key="cf_mask")(out)
    k = EHRToIntervalFeaturesd(vocabulary).feature_names.index(f"{DRUG}:exposure")
    np.testing.assert_allclose(edited["cf"][-1, k], 0.5 * base["ehr_intervals"][-1, k], rtol=1e-5)
    np.testing.assert_allclose(edited["cf"][:-1, k], base["ehr_intervals"][:-1, k], rtol=1e-6)


def test_an_edit_that_changes_nothing_is_an_error_or_recorded(items):
    items, _ = items
    item = next(
        i for i in items if _dose_in_interval(i) == 0 and not np.isin(i["events"]["code"], [f"{DRUG}//START"]).any()
    )
    with pytest.raises(ValueError, match=rf"subject '{item['subject_id']}'.*no event with code '{DRUG}'"):
        EditEventsd([{"code": DRUG, "scale": 0.5}])(item)
    out = EditEventsd([{"code": DRUG, "scale": 0.5}], on_noop="keep")(item)
    assert out["whatif_edits"][0]["applied"] is False
    for column in ("time", "code", "numeric_value"):
        np.testing.assert_array_equal(np.asarray(out["events_whatif"][column]), np.asarray(item["events"][column]))
    # starting the drug at 20 mg/day in the interval is an edit that applies
    started = EditEventsd([{"code": DRUG, "value": 20.0, "exposure": True}])(item)
    assert started["whatif_edits"][0]["applied"] is True
    times, level = running_dose(started["events_whatif"], DRUG)
    assert level.max() == pytest.approx(20.0)


@pytest.mark.parametrize(
    "edits, match",
    [
        ([], "at least one edit"),
        ([{"scale": 0.5}], "must have a 'code'"),
        ([{"code": DRUG, "scale": 0.5, "value": 1.0}], "exactly one of 'scale' and 'value'"),
        ([{"code": DRUG, "dose": 1.0}], "must have a 'code' and one of"),
    ],
)
def test_malformed_edits_are_rejected(edits, match):
    with pytest.raises(ValueError, match=match):
        EditEventsd(edits)


def test_missing_item_keys_are_named(items):
    items, _ = items
    item = {k: v for k, v in items[0].items() if k != "target_time"}
    with pytest.raises(KeyError, match="no 'target_time'"):
        EditEventsd([{"code": DRUG, "scale": 0.5}])(item)
