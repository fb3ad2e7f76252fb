from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from monai_twin.data import LongitudinalDataset, collate_longitudinal, forecast_item, load_manifest
from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
from monai_twin.engines import ForecastLoss, ForecastTrainer, masked_mse, train_forecaster
from monai_twin.inferers import ForecastInferer, save_forecast_panel_png
from monai_twin.networks import TwinForecaster
from monai_twin.transforms.ehr import EHRFutureValuesd, EHRStaticToTensord, EHRToIntervalFeaturesd, EHRVocabulary
from monai_twin.transforms.sequence import LoadSequenced, PadSequenced

CA153 = "LAB//CA15-3"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = tmp_path_factory.mktemp("forecast") / "mammo"
    write_cohort("mammo2d", folder, 10, seed=4, config=Mammo2DConfig(size=32), progress=False)
    manifest = load_manifest(folder)
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static)
    encode = [
        EHRToIntervalFeaturesd(vocabulary, carry_forward=True),
        EHRStaticToTensord(vocabulary),
        EHRFutureValuesd(vocabulary, [CA153]),
        PadSequenced(3),
    ]
    train = Compose([LoadSequenced(), LoadImaged("target", image_only=True), EnsureChannelFirstd("target"), *encode])
    return manifest, vocabulary, train, Compose([LoadSequenced(), *encode])


def _twin(sample):
    return TwinForecaster(
        2,
        1,
        channels=(8, 16),
        hidden_channels=8,
        ehr_interval_dim=sample["ehr_intervals"].shape[-1],
        ehr_static_dim=sample["ehr_static"].shape[-1],
        future_ehr_dim=1,
        max_history=3,
    )


def test_forecast_loss_and_masked_mse():
    loss = ForecastLoss(2, ssim_weight=0.5)
    x = torch.rand(2, 1, 16, 16)
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, 1 - x)) > float(ForecastLoss(2, ssim_weight=0.0)(x, 1 - x)) > 0
    with pytest.raises(ValueError, match="differ"):
        loss(x, x[:, :, :8])
    # unmeasured entries (mask 0, NaN target) do not count
    pred, target = torch.tensor([[1.0, 5.0]]), torch.tensor([[0.0, float("nan")]])
    assert float(masked_mse(pred, target, torch.tensor([[1.0, 0.0]]))) == 1.0
    assert float(masked_mse(pred, target, torch.zeros(1, 2))) == 0.0


def test_train_forecaster_checkpoints_logs_and_learns(cohort, tmp_path):
    """Image and future-EHR losses go down (the EHR head beats any constant); best/final checkpoints and a
    TensorBoard log are written."""
    torch.manual_seed(0)
    manifest, _, train, _ = cohort
    loaders = {
        name: DataLoader(
            LongitudinalDataset(manifest, train, section=name, fractions=(0.8, 0.2, 0.0), max_history=3),
            batch_size=8,
            shuffle=name == "training",
            collate_fn=collate_longitudinal,
        )
        for name in ("training", "validation")
    }
    net = _twin(train(LongitudinalDataset(manifest, max_history=3)[0]))
    losses = []

    def record(engine):
        losses.append(
            (engine.state.epoch, float(engine.state.output["loss_image"]), float(engine.state.output["loss_ehr"]))
        )

    from ignite.engine import Events

    class Recorder:
        def attach(self, engine):
            engine.add_event_handler(Events.ITERATION_COMPLETED, record)

    trainer = train_forecaster(
        net,
        loaders["training"],
        loaders["validation"],
        output_dir=tmp_path / "run",
        max_epochs=8,
        learning_rate=3e-3,
        ehr_weight=1.0,
        progress=False,
        extra_handlers=[Recorder()],
    )
    assert isinstance(trainer, ForecastTrainer)
    # the default cosine schedule ends at 1 % of the learning rate
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(3e-5, rel=1e-3)
    first = np.mean([v for e, v, _ in losses if e == 1]), np.mean([v for e, _, v in losses if e == 1])
    last = np.mean([v for e, v, _ in losses if e == 8]), np.mean([v for e, _, v in losses if e == 8])
    # the image loss falls, and the EHR head ends better than the best constant (the targets' mean)
    targets = torch.cat([b["future_ehr"][b["future_ehr_mask"] > 0] for b in loaders["training"]])
    best_constant = float(((targets - targets.mean()) ** 2).mean())
    assert last[0] < first[0] and last[1] < best_constant < first[1]
    assert {"val_psnr", "val_ssim", "val_mse"} <= set(trainer.evaluator.state.metrics)
    assert trainer.evaluator.state.best_metric > 10  # dB on [0, 1] images
    checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert "final.pt" in checkpoints and any(n.startswith("network_key_metric") for n in checkpoints)
    state = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    fresh = _twin(train(LongitudinalDataset(manifest, max_history=3)[0]))
    fresh.load_state_dict(state["network"])
    assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_forecast_inferer_at_a_chosen_date_writes_a_panel(cohort, tmp_path):
    manifest, _, _, infer = cohort
    subject = manifest.subjects[0]
    last = float(manifest.subject_visits(subject)["time"].iloc[-1])
    item = forecast_item(manifest, subject, manifest.to_time(subject, last + 200), max_history=3)
    net = _twin(infer(dict(item)))
    result = ForecastInferer(infer, net)(item)
    # an untrained twin forecasts the last scan (zero-initialised change head)
    torch.testing.assert_close(result["forecast"], result["last"].clamp(0, 1))
    assert result["future_ehr"].shape == (1,) and result["history"].shape[1:] == (1, 32, 32)
    assert float(result["times"][-1]) == pytest.approx(200.0, abs=1e-3)
    png = save_forecast_panel_png(result, tmp_path / "panel.png", title=subject)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(KeyError, match="'history'"):
        ForecastInferer(lambda d: {"times": torch.zeros(1)}, net)(item)
