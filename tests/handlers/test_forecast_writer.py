from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch

import monai_twin
from monai_twin.engines import ForecastEvaluator, WhatIfEvaluator
from monai_twin.handlers import ForecastWriter
from monai_twin.transforms.ehr import EHRFutureValues
from tests.engines.test_forecast_evaluators import CA153, build_cohort, edited, last_real_visit, make_twin, run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    # one item per subject (its last visit as the target): one batch of 4
    return build_cohort(tmp_path_factory.mktemp("writer") / "mammo", targets="last", batch_size=4)


def last_measured(events: dict, code: str) -> float:
    """The last value of ``code`` recorded before the target, in its units."""
    rows = np.flatnonzero(np.asarray(events["code"]) == code)
    return float(np.asarray(events["numeric_value"], dtype=float)[rows[np.argmax(events["time"][rows])]])


def test_forecast_files_hold_the_forecast(cohort, tmp_path):
    vocabulary, (batch,) = cohort["vocabulary"], cohort["batches"]
    writer = ForecastWriter(
        tmp_path,
        ehr_names=[CA153],
        ehr_denormalise=EHRFutureValues(vocabulary, [CA153]).denormalise,
        ehr_units=[vocabulary.units[CA153]],
    )
    evaluator = ForecastEvaluator(
        device="cpu", val_data_loader=[batch], network=make_twin(cohort), clamp=None, val_handlers=[writer]
    )
    (out,) = run(evaluator)
    last = last_real_visit(batch)
    assert len(writer.written) == 3 * 4 and all(p.is_file() for p in writer.written)
    for i, subject in enumerate(batch["subject_id"]):
        day = round(float(batch["target_time"][i]))
        stem = tmp_path / subject / f"{subject}_day{day}"
        image = nib.load(f"{stem}_forecast.nii.gz")
        assert image.get_data_dtype() == np.float32 and image.shape == (32, 32)
        np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), out["pred"][i, 0].numpy())
        np.testing.assert_array_equal(image.get_fdata(dtype=np.float32), last[i, 0].numpy())  # copy-last
        np.testing.assert_allclose(image.affine, batch["history"].affine[i].numpy())
        assert image.affine[0, 0] == 5.0  # the synthetic mammograms' 5 mm pixels, not an identity grid

        record = json.loads((tmp_path / subject / f"{subject}_day{day}_forecast.json").read_text())
        real = batch["history_mask"][i] > 0
        assert record["subject_id"] == subject and record["target_date"] is None
        assert record["target_time"] == pytest.approx(float(batch["target_time"][i]))
        assert record["history_times"] == pytest.approx(batch["history_times"][i][real].tolist())
        assert record["days_before_target"] == pytest.approx(batch["times"][i][real].tolist())
        (ca153,) = record["future_ehr"]
        assert ca153["name"] == CA153 and ca153["unit"] == "U/mL"
        assert ca153["normalised"] == pytest.approx(float(out["pred_ehr"][i, 0]), abs=1e-6)
        # the untrained twin is LOCF: the forecast CA 15-3 is the last one measured, in U/mL
        assert ca153["value"] == pytest.approx(last_measured(batch["events"][i], CA153), rel=1e-4)
        assert record["files"] == {
            "forecast": f"{subject}_day{day}_forecast.nii.gz",
            "panel": f"{subject}_day{day}_panel.png",
        }
        assert (tmp_path / subject / record["files"]["panel"]).read_bytes()[:8] == PNG_SIGNATURE


def test_existing_outputs_are_kept_unless_overwrite(cohort, tmp_path):
    (batch,) = cohort["batches"]
    twin = make_twin(cohort)
    first = ForecastWriter(tmp_path, png=False)
    ForecastEvaluator(device="cpu", val_data_loader=[batch], network=twin, val_handlers=[first]).run()
    target = first.written[0]
    assert target.name.endswith("_forecast.nii.gz")
    before = target.read_bytes()

    again = ForecastWriter(tmp_path, png=False)
    with pytest.raises(FileExistsError, match=re.escape(str(target))):
        ForecastEvaluator(device="cpu", val_data_loader=[batch], network=twin, val_handlers=[again]).run()
    assert target.read_bytes() == before and again.written == []
    assert not [p for p in tmp_path.rglob(".*") if p.is_file()]  # no temporary files left behind

    # a json-only clash also stops the sample before its image is rewritten (all files are checked first)
    target.unlink()
    with pytest.raises(FileExistsError, match=r"_forecast\.json"):
        ForecastEvaluator(device="cpu", val_data_loader=[batch], network=twin, val_handlers=[again]).run()
    assert not target.exists()

    replace = ForecastWriter(tmp_path, png=False, overwrite=True)
    halved = ForecastEvaluator(device="cpu", val_data_loader=[batch], network=twin, clamp=(0.0, 0.5))
    replace.attach(halved)
    replace.attach(halved)  # attaching twice writes once
    halved.run()
    assert len(replace.written) == 2 * 4
    written = nib.load(target).get_fdata(dtype=np.float32)
    np.testing.assert_array_equal(written, last_real_visit(batch)[0, 0].clamp(0.0, 0.5).numpy())
    assert written.max() <= 0.5 < float(last_real_visit(batch)[0].max())


def test_date_tags_raw_ehr_and_uncertainty(cohort, tmp_path):
    (batch,) = cohort["batches"]
    dated = {**batch, "target_date": ["2034-06-01", None, "2035-01-15", None]}
    writer = ForecastWriter(tmp_path, png=False)

    def with_std(data: dict) -> dict:  # e.g. a sampling twin's spread
        return {**data, "pred_std": torch.full_like(data["pred"].as_tensor(), 0.25)}

    evaluator = ForecastEvaluator(
        device="cpu", val_data_loader=[dated], network=make_twin(cohort), postprocessing=with_std, val_handlers=[writer]
    )
    evaluator.run()
    first, second = batch["subject_id"][:2]
    stem = tmp_path / first / f"{first}_2034-06-01"
    record = json.loads(stem.with_name(stem.name + "_forecast.json").read_text())
    assert record["target_date"] == "2034-06-01"
    assert record["future_ehr"] == [{"normalised": pytest.approx(float(evaluator.state.output["pred_ehr"][0, 0]))}]
    assert record["files"]["uncertainty"] == f"{first}_2034-06-01_uncertainty.nii.gz"
    spread = nib.load(stem.with_name(stem.name + "_uncertainty.nii.gz"))
    np.testing.assert_array_equal(spread.get_fdata(), np.full((32, 32), 0.25))
    np.testing.assert_allclose(spread.affine, batch["history"].affine[0].numpy())
    assert (tmp_path / second / f"{second}_day{round(float(batch['target_time'][1]))}_forecast.nii.gz").is_file()


def test_whatif_files(cohort, tmp_path):
    names, (batch,) = cohort["names"], cohort["batches"]
    twin = make_twin(cohort, sensitive=True)
    writer = ForecastWriter(tmp_path, ehr_names=[CA153])
    evaluator = WhatIfEvaluator(
        device="cpu", val_data_loader=[edited(batch, names)], network=twin, val_handlers=[writer]
    )
    evaluator.run()
    out = evaluator.state.output
    subject = batch["subject_id"][2]
    stem = tmp_path / subject / f"{subject}_day{round(float(batch['target_time'][2]))}"
    loaded = {k: nib.load(f"{stem}_{k}.nii.gz") for k in ("baseline", "counterfactual", "difference")}
    for key, name in (("pred", "baseline"), ("pred_whatif", "counterfactual"), ("difference", "difference")):
        np.testing.assert_array_equal(loaded[name].get_fdata(dtype=np.float32), out[key][2, 0].numpy())
        np.testing.assert_allclose(loaded[name].affine, batch["history"].affine[2].numpy())
    difference = loaded["difference"].get_fdata()
    np.testing.assert_allclose(
        difference, loaded["counterfactual"].get_fdata() - loaded["baseline"].get_fdata(), atol=1e-6
    )
    assert np.abs(difference).max() > 1e-4
    record = json.loads(stem.with_name(stem.name + "_whatif.json").read_text())
    assert record["whatif_edits"] == [{"feature": "DRUG//tamoxifen:last", "shift": 2.0}]
    assert record["baseline_ehr"][0]["normalised"] == pytest.approx(float(out["pred_ehr"][2, 0]), abs=1e-6)
    assert record["counterfactual_ehr"][0]["normalised"] == pytest.approx(float(out["pred_ehr_whatif"][2, 0]), abs=1e-6)
    assert record["counterfactual_ehr"][0]["name"] == CA153
    assert set(record["files"]) == {"baseline", "counterfactual", "difference", "whatif"}
    assert stem.with_name(stem.name + "_whatif.png").read_bytes()[:8] == PNG_SIGNATURE
    assert not list(tmp_path.rglob("*_forecast.nii.gz"))  # the baseline is the forecast: not written twice


def test_bad_inputs_are_named(cohort, tmp_path):
    (batch,) = cohort["batches"]
    out = run(ForecastEvaluator(device="cpu", val_data_loader=[batch], network=make_twin(cohort)))[0]
    sample = {"target_time": 400.0, "history": batch["history"][0]}
    output = {"pred": out["pred"][0], "pred_ehr": out["pred_ehr"][0]}
    writer = ForecastWriter(tmp_path, png=False, ehr_names=["a", "b"])
    with pytest.raises(KeyError, match="subject_id"):
        writer.write_sample(sample, output)
    with pytest.raises(ValueError, match="P9.*1 future EHR values but ehr_names has 2"):
        writer.write_sample({**sample, "subject_id": "P9"}, output)
    assert not list(tmp_path.rglob("*"))  # checked before anything is written
    with pytest.raises(KeyError, match="P9.*neither 'target_date' nor 'target_time'"):
        ForecastWriter(tmp_path).write_sample({"subject_id": "P9"}, output)
    with pytest.raises(ValueError, match="ehr_units"):
        ForecastWriter(tmp_path, ehr_names=["a"], ehr_units=["x", "y"])
    assert monai_twin.handlers.ForecastWriter is ForecastWriter
