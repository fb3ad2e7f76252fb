from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader, MetaTensor
from monai.handlers import MeanSquaredError, from_engine
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged
from torch import nn

from monai_twin.data import LongitudinalDataset, collate_longitudinal, load_manifest
from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
from monai_twin.engines import ForecastEvaluator, ForecastPrepareBatch, WhatIfEvaluator
from monai_twin.networks import TwinForecaster
from monai_twin.transforms.ehr import EHRFutureValuesd, EHRStaticToTensord, EHRToIntervalFeaturesd, EHRVocabulary
from monai_twin.transforms.sequence import LoadSequenced, PadSequenced

CA153 = "LAB//CA15-3"
DOSE = "DRUG//tamoxifen:last"
MAX_HISTORY = 4


def build_cohort(folder: Path, targets: str = "all", batch_size: int = 8) -> dict:
    """The forecasting guide's pipeline on a 4-subject synthetic mammography cohort, as collated batches."""
    write_cohort("mammo2d", folder, n_subjects=4, seed=0, config=Mammo2DConfig(size=32), progress=False)
    manifest = load_manifest(folder)
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static)
    intervals = EHRToIntervalFeaturesd(vocabulary, carry_forward=True)
    pipeline = Compose(
        [
            LoadSequenced(),
            LoadImaged("target", image_only=True),
            EnsureChannelFirstd("target"),
            intervals,
            EHRStaticToTensord(vocabulary),
            EHRFutureValuesd(vocabulary, [CA153]),
            PadSequenced(MAX_HISTORY),
        ]
    )
    dataset = LongitudinalDataset(manifest, pipeline, max_history=MAX_HISTORY, targets=targets)
    batches = list(DataLoader(dataset, batch_size=batch_size, collate_fn=collate_longitudinal))
    return {"vocabulary": vocabulary, "names": intervals.feature_names, "batches": batches}


def make_twin(cohort: dict, sensitive: bool = False) -> TwinForecaster:
    """A small twin; untrained it is copy-last (image) and LOCF (CA 15-3).

    ``sensitive`` fills the zero-initialised layers (change head, FiLM generators, EHR head's last
    layer) with random weights, so the forecasts depend on the EHR as a trained twin's do.
    """
    names = cohort["names"]
    torch.manual_seed(0)
    twin = TwinForecaster(
        2,
        1,
        channels=(8, 16),
        hidden_channels=8,
        ehr_interval_dim=len(names),
        ehr_static_dim=cohort["batches"][0]["ehr_static"].shape[-1],
        future_ehr_dim=1,
        future_ehr_base=[names.index(f"{CA153}:last")],
        max_history=MAX_HISTORY,
    )
    if sensitive:
        with torch.no_grad():
            for p in twin.parameters():
                if not p.any():
                    p.normal_(0.0, 0.1)
    return twin


def edited(batch: dict, names: list[str], shift: float = 2.0) -> dict:
    """The batch plus a what-if: the tamoxifen dose feature shifted by ``shift`` (normalised) on every real visit."""
    j = names.index(DOSE)
    real = batch["history_mask"]
    intervals, mask = batch["ehr_intervals"].clone(), batch["ehr_intervals_mask"].clone()
    intervals[..., j] += shift * real
    mask[..., j] = torch.maximum(mask[..., j], real)
    edits = [[{"feature": DOSE, "shift": shift}] for _ in batch["subject_id"]]
    return {**batch, "ehr_intervals_whatif": intervals, "ehr_intervals_mask_whatif": mask, "whatif_edits": edits}


def run(evaluator: ForecastEvaluator) -> list[dict]:
    """Run the evaluator and keep every iteration's output."""
    outputs: list[dict] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    evaluator.run()
    return outputs


def last_real_visit(batch: dict) -> torch.Tensor:
    """``(B, C, *spatial)``: each sample's last unpadded prior scan."""
    last = (batch["history_mask"] > 0).long().cumsum(1).argmax(1)
    return batch["history"].as_tensor()[torch.arange(len(last)), last]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return build_cohort(tmp_path_factory.mktemp("evaluators") / "mammo")


def test_untrained_twin_is_copy_last_locf_and_mse_matches(cohort):
    batches = cohort["batches"]
    mse = MeanSquaredError(output_transform=from_engine(["pred", "label"]))
    evaluator = ForecastEvaluator(
        device="cpu", val_data_loader=batches, network=make_twin(cohort), clamp=None, key_val_metric={"mse": mse}
    )
    outputs = run(evaluator)
    assert len(outputs) == len(batches) == 3
    squared_errors = []
    for batch, out in zip(batches, outputs):
        last = last_real_visit(batch)
        assert set(out) == {"image", "label", "pred", "pred_ehr"}
        torch.testing.assert_close(out["pred"].as_tensor(), last, rtol=0, atol=1e-6)
        torch.testing.assert_close(out["label"].as_tensor(), batch["target"].as_tensor())
        # the forecast carries the history's metadata: the reference visit's grid, per sample
        assert isinstance(out["pred"], MetaTensor) and out["pred"].is_batch
        torch.testing.assert_close(out["pred"].affine, batch["history"].affine)
        assert out["pred"][1].affine.shape == (4, 4)
        measured = batch["future_ehr_locf_mask"] > 0
        assert out["pred_ehr"].shape == (len(last), 1) and measured.any()
        torch.testing.assert_close(out["pred_ehr"][measured], batch["future_ehr_locf"][measured], rtol=0, atol=1e-5)
        squared_errors.append(((last - batch["target"].as_tensor()) ** 2).flatten(1).mean(1))
    by_hand = float(torch.cat(squared_errors).mean())
    assert by_hand > 1e-4  # copy-last is not perfect on this cohort: the comparison means something
    assert evaluator.state.metrics["mse"] == pytest.approx(by_hand, rel=1e-5)


def test_clamp_and_network_without_forecast(cohort):
    batch = cohort["batches"][0]
    out = run(ForecastEvaluator(device="cpu", val_data_loader=[batch], network=make_twin(cohort), clamp=(0.0, 0.5)))
    torch.testing.assert_close(out[0]["pred"].as_tensor(), last_real_visit(batch).clamp(0.0, 0.5), rtol=0, atol=1e-6)

    class MeanOfVisits(nn.Module):  # no `forecast`: called through the inferer with the conditions as kwargs
        def forward(self, history, times, history_mask, **conditions):
            weights = (history_mask / history_mask.sum(1, keepdim=True)).reshape(*history_mask.shape, 1, 1, 1)
            return (history * weights).sum(1)

    out = run(ForecastEvaluator(device="cpu", val_data_loader=[batch], network=MeanOfVisits(), clamp=None))[0]
    real = batch["history_mask"].reshape(*batch["history_mask"].shape, 1, 1, 1)
    expected = (batch["history"].as_tensor() * real).sum(1) / real.sum(1)
    torch.testing.assert_close(out["pred"].as_tensor(), expected)
    assert out["pred_ehr"].shape == (len(expected), 0)
    assert out["label"] is not None  # the target is optional, and here present

    no_target = {k: v for k, v in batch.items() if k != "target"}
    out = run(ForecastEvaluator(device="cpu", val_data_loader=[no_target], network=MeanOfVisits()))[0]
    assert out["label"] is None and out["pred"].shape == expected.shape


def test_bad_arguments():
    with pytest.raises(ValueError, match="clamp"):
        ForecastEvaluator(device="cpu", val_data_loader=[], network=nn.Identity(), clamp=(1.0, 0.0))
    with pytest.raises(ValueError, match="iteration_update"):
        ForecastEvaluator(device="cpu", val_data_loader=[], network=nn.Identity(), iteration_update=lambda e, b: b)
    with pytest.raises(ValueError, match="suffix"):
        WhatIfEvaluator(device="cpu", val_data_loader=[], network=nn.Identity(), suffix="")
    evaluator = ForecastEvaluator(device="cpu", val_data_loader=[], network=nn.Identity())
    assert isinstance(evaluator.prepare_batch, ForecastPrepareBatch) and evaluator.clamp == (0.0, 1.0)


def test_whatif_difference_and_baseline(cohort):
    names, batches = cohort["names"], cohort["batches"][:2]
    twin = make_twin(cohort, sensitive=True)
    whatif_batches = [edited(b, names) for b in batches]
    mse = MeanSquaredError(output_transform=from_engine(["pred", "label"]))
    whatif = WhatIfEvaluator(device="cpu", val_data_loader=whatif_batches, network=twin, key_val_metric={"mse": mse})
    outputs = run(whatif)
    baseline = run(ForecastEvaluator(device="cpu", val_data_loader=batches, network=twin))
    # the counterfactual is the forecast of a batch whose encodings are the edited ones
    swapped = [
        {**b, "ehr_intervals": w["ehr_intervals_whatif"], "ehr_intervals_mask": w["ehr_intervals_mask_whatif"]}
        for b, w in zip(batches, whatif_batches)
    ]
    counterfactual = run(ForecastEvaluator(device="cpu", val_data_loader=swapped, network=twin))
    for out, base, cf, batch in zip(outputs, baseline, counterfactual, batches):
        assert {"pred", "pred_whatif", "difference", "pred_ehr", "pred_ehr_whatif"} <= set(out)
        torch.testing.assert_close(out["pred"].as_tensor(), base["pred"].as_tensor(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out["pred_whatif"].as_tensor(), cf["pred"].as_tensor(), rtol=0, atol=1e-6)
        torch.testing.assert_close(out["pred_ehr"], base["pred_ehr"], rtol=0, atol=1e-6)
        torch.testing.assert_close(out["pred_ehr_whatif"], cf["pred_ehr"], rtol=0, atol=1e-6)
        torch.testing.assert_close(out["difference"].as_tensor(), (out["pred_whatif"] - out["pred"]).as_tensor())
        assert float(out["difference"].abs().max()) > 1e-4  # the edit matters to this twin
        assert float((out["pred_ehr_whatif"] - out["pred_ehr"]).abs().max()) > 1e-4
        for key in ("pred", "pred_whatif", "difference"):
            torch.testing.assert_close(out[key].affine, batch["history"].affine)
    by_hand = torch.cat(
        [((o["pred"] - b["target"]).as_tensor() ** 2).flatten(1).mean(1) for o, b in zip(outputs, batches)]
    )
    assert whatif.state.metrics["mse"] == pytest.approx(float(by_hand.mean()), rel=1e-5)


def test_whatif_unchanged_encodings_give_zero_difference(cohort):
    batch = cohort["batches"][0]
    same = {
        **batch,
        "ehr_intervals_whatif": batch["ehr_intervals"].clone(),
        "ehr_static_whatif": batch["ehr_static"].clone(),
    }
    out = run(WhatIfEvaluator(device="cpu", val_data_loader=[same], network=make_twin(cohort, sensitive=True)))[0]
    assert float(out["difference"].abs().max()) < 1e-6
    torch.testing.assert_close(out["pred_ehr_whatif"], out["pred_ehr"], rtol=0, atol=1e-6)


def test_whatif_errors(cohort):
    batch = cohort["batches"][0]
    twin = make_twin(cohort)
    with pytest.raises(KeyError, match="no counterfactual input.*ehr_intervals_whatif"):
        WhatIfEvaluator(device="cpu", val_data_loader=[batch], network=twin).run()
    wrong = {**batch, "ehr_intervals_whatif": batch["ehr_intervals"][..., :3]}
    with pytest.raises(ValueError, match=r"'ehr_intervals_whatif'.*shape"):
        WhatIfEvaluator(device="cpu", val_data_loader=[wrong], network=twin).run()
    extra = {k: v for k, v in batch.items() if k != "ehr_static"}
    extra["ehr_static_whatif"] = batch["ehr_static"]
    with pytest.raises(KeyError, match="only for a key the baseline has"):
        WhatIfEvaluator(device="cpu", val_data_loader=[extra], network=twin).run()
