from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

from monai_twin.data import LongitudinalDataset, collate_longitudinal, load_manifest
from monai_twin.engines import ForecastPrepareBatch
from monai_twin.networks import TwinForecaster
from monai_twin.transforms.sequence import LoadSequenced, PadSequenced


def test_prepare_batch_routes_conditions():
    batch = {
        "history": torch.rand(2, 3, 1, 8, 8),
        "target": torch.rand(2, 1, 8, 8),
        "times": torch.rand(2, 3),
        "history_mask": torch.ones(2, 3),
        "events": [{}, {}],
    }
    history, target, args, kwargs = ForecastPrepareBatch()(batch)
    assert history.shape == (2, 3, 1, 8, 8) and target.shape == (2, 1, 8, 8) and args == ()
    assert set(kwargs) == {"times", "history_mask"}
    with pytest.raises(KeyError, match="no 'times'"):
        ForecastPrepareBatch()({"history": batch["history"]})
    with pytest.raises(TypeError, match="PadSequenced"):
        ForecastPrepareBatch()({**batch, "history": [batch["history"][0]]})


def test_supervised_trainer_runs_a_twin(nifti_cohort):
    """A MONAI SupervisedTrainer trains the twin on manifest samples; the loss must go down."""
    torch.manual_seed(0)
    manifest = load_manifest(nifti_cohort)
    pipeline = Compose(
        [LoadSequenced(), LoadImaged("target", image_only=True), EnsureChannelFirstd("target"), PadSequenced(3)]
    )
    data = LongitudinalDataset(manifest, transform=pipeline, max_history=3)
    loader = DataLoader(data, batch_size=4, shuffle=True, collate_fn=collate_longitudinal)
    net = TwinForecaster(3, 1, channels=(4, 8), hidden_channels=8, conditioning="none", max_history=3)
    losses = []
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=6,
        train_data_loader=loader,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 3e-3),
        loss_function=torch.nn.MSELoss(),
        prepare_batch=ForecastPrepareBatch(),
    )
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda e: losses.append((e.state.epoch, e.state.output[0]["loss"]))
    )
    trainer.run()
    per_epoch = [sum(v for ep, v in losses if ep == k) / sum(1 for ep, _ in losses if ep == k) for k in range(1, 7)]
    assert per_epoch[-1] < 0.7 * per_epoch[0]
