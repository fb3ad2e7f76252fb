from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from monai_twin.data import forecast_item, load_manifest
from monai_twin.inferers import WhatIfInferer, edit_events, save_what_if_png
from monai_twin.networks import TwinForecaster
from monai_twin.transforms.ehr import EHRStaticToTensord, EHRToIntervalFeaturesd, EHRVocabulary
from monai_twin.transforms.sequence import LoadSequenced, PadSequenced

DRUG = "DRUG//tamoxifen"


class DoseResponse(torch.nn.Module):
    """A stand-in twin with a known answer: the forecast is the last scan plus the dose feature of
    the last interval, so halving the dose must halve the predicted change."""

    def __init__(self, feature: int) -> None:
        super().__init__()
        self.feature = feature

    def forward(self, history, times, history_mask, ehr_intervals, **kwargs):
        last = history_mask.sum(1).long() - 1
        rows = torch.arange(history.shape[0])
        dose = ehr_intervals[rows, last, self.feature].reshape(-1, *[1] * (history.dim() - 2))
        return history[rows, last] + dose


@pytest.fixture
def setting(nifti_cohort):
    manifest = load_manifest(nifti_cohort)
    vocab = EHRVocabulary.fit(manifest.events, manifest.static)
    pipeline = Compose([LoadSequenced(), EHRToIntervalFeaturesd(vocab), EHRStaticToTensord(vocab), PadSequenced(4)])
    return manifest, vocab, pipeline


class TestForecastItem:
    def test_future_date_with_planned_dose(self, setting):
        manifest, _, _ = setting
        visits = manifest.subject_visits("S002")
        last_date = manifest.to_time("S002", visits["time"].iloc[-1])
        when = last_date + np.timedelta64(200, "D")
        planned = {"time": [last_date + np.timedelta64(30, "D")], "code": [DRUG], "numeric_value": [40.0]}
        item = forecast_item(manifest, "S002", when, max_history=3, planned_events=planned)
        assert item["target_index"] == -1 and "target" not in item
        assert len(item["history"]) == 3 and item["history"] == visits["image"].iloc[-3:].tolist()
        np.testing.assert_allclose(item["times"][-1], 200.0, atol=1e-4)
        drug = item["events"]["code"] == DRUG
        assert item["events"]["numeric_value"][drug][-1] == 40.0
        assert np.isclose(item["events"]["time"][drug][-1], visits["time"].iloc[-1] + 30.0)
        # every recorded event is there too, in time order with static rows first
        t = item["events"]["time"]
        assert np.isnan(t[0]) and np.all(np.diff(t[~np.isnan(t)]) >= 0)

    def test_errors(self, setting):
        manifest, _, _ = setting
        first = manifest.to_time("S002", 0.0)
        with pytest.raises(ValueError, match="no scan before the forecast date"):
            forecast_item(manifest, "S002", first)
        late = manifest.to_time("S002", 5000.0)
        with pytest.raises(ValueError, match="must fall after the last scan"):
            forecast_item(
                manifest, "S002", late, planned_events={"time": [first], "code": [DRUG], "numeric_value": [1.0]}
            )
        with pytest.raises(KeyError, match="'numeric_value'"):
            forecast_item(manifest, "S002", late, planned_events={"time": [late], "code": [DRUG]})


class TestEditEvents:
    def test_scale_and_set_copy(self):
        events = {
            "time": np.array([1.0, 5.0, 9.0]),
            "code": np.array([DRUG, "LAB//x", DRUG], dtype=object),
            "numeric_value": np.array([20.0, 3.0, 20.0]),
            "text_value": np.array([None] * 3, dtype=object),
            "unit": np.array(["mg", "u", "mg"], dtype=object),
        }
        halved = edit_events(events, DRUG, scale=0.5, after=4.0)
        np.testing.assert_allclose(halved["numeric_value"], [20.0, 3.0, 10.0])
        np.testing.assert_allclose(events["numeric_value"], [20.0, 3.0, 20.0])  # input untouched
        stopped = edit_events(events, DRUG, value=0.0)
        np.testing.assert_allclose(stopped["numeric_value"], [0.0, 3.0, 0.0])
        with pytest.raises(ValueError, match="exactly one"):
            edit_events(events, DRUG)
        with pytest.raises(ValueError, match="no event with code 'DRUG//other'"):
            edit_events(events, "DRUG//other", scale=2.0)


class TestWhatIfInferer:
    def test_known_dose_response(self, setting, tmp_path):
        manifest, vocab, pipeline = setting
        sid = "S001"
        visits = manifest.subject_visits(sid)
        last = visits["time"].iloc[-1]
        when = manifest.to_time(sid, last + 120.0)
        planned = {"time": [manifest.to_time(sid, last + 10.0)], "code": [DRUG], "numeric_value": [20.0]}
        item = forecast_item(manifest, sid, when, max_history=4, planned_events=planned)
        edited = dict(item, events=edit_events(item["events"], DRUG, scale=0.5, after=last))
        before, after = pipeline(dict(item)), pipeline(dict(edited))
        row = int(before["history_mask"].sum()) - 1  # the interval from the last scan to the forecast date
        delta = np.asarray(after["ehr_intervals"][row]) - np.asarray(before["ehr_intervals"][row])
        changed = np.flatnonzero(~np.isclose(delta, 0.0))
        assert changed.size >= 1  # halving the planned dose changes the last interval's features
        feature = int(changed[0])
        result = WhatIfInferer(pipeline, DoseResponse(feature))(item, edited)
        expected = float(delta[feature])
        assert result["baseline"].shape == (1, 16, 16, 8)
        torch.testing.assert_close(result["difference"], torch.full_like(result["difference"], expected))
        png = save_what_if_png(result, tmp_path / "whatif.png", title=f"{sid}: half dose")
        assert png.stat().st_size > 5_000

    def test_untrained_twin_has_no_effect(self, setting):
        manifest, vocab, pipeline = setting
        sid = "S003"
        last = manifest.subject_visits(sid)["time"].iloc[-1]
        item = forecast_item(
            manifest,
            sid,
            manifest.to_time(sid, last + 90.0),
            planned_events={"time": [manifest.to_time(sid, last + 5.0)], "code": [DRUG], "numeric_value": [20.0]},
        )
        edited = dict(item, events=edit_events(item["events"], DRUG, value=0.0, after=last))
        sample = pipeline(dict(item))
        net = TwinForecaster(
            3,
            1,
            channels=(4, 8),
            hidden_channels=8,
            ehr_interval_dim=sample["ehr_intervals"].shape[-1],
            ehr_static_dim=sample["ehr_static"].shape[-1],
            future_ehr_dim=1,
            max_history=4,
        )
        result = WhatIfInferer(pipeline, net)(item, edited)
        # a twin at its copy-last start forecasts the last scan whatever the treatment
        assert float(result["difference"].abs().max()) == 0.0
        assert result["baseline_ehr"].shape == (1,)
