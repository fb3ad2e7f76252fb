"""Training a forecasting twin with MONAI's engines: loss, trainer, evaluator and the usual handlers.

Built on :class:`monai.engines.SupervisedTrainer` / :class:`~monai.engines.SupervisedEvaluator`,
MONAI's :class:`~monai.losses.SSIMLoss`, metric handlers (PSNR, MSE, and SSIM through
:class:`~monai.handlers.IgniteMetricHandler`), :class:`~monai.handlers.CheckpointSaver`,
:class:`~monai.handlers.TensorBoardStatsHandler` / :class:`~monai.handlers.StatsHandler` and
ignite's tqdm :class:`~ignite.handlers.ProgressBar`. What MONAI lacks is one thing: its trainer
calls ``network(inputs)`` and one loss on the image, while a twin also predicts the future EHR
values. :class:`ForecastTrainer` adds that term (masked: values not measured at the target visit
do not count) and otherwise behaves as a ``SupervisedTrainer``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from torch import nn

from .prepare_batch import FORECAST_CONDITION_KEYS, ForecastPrepareBatch

__all__ = ["ForecastLoss", "ForecastTrainer", "masked_mse", "train_forecaster"]


class ForecastLoss(nn.Module):
    """``MSE + ssim_weight * (1 - SSIM)`` between the forecast and the target scan.

    Args:
        spatial_dims: 2 or 3.
        ssim_weight: weight of MONAI's :class:`~monai.losses.SSIMLoss` term (0: plain MSE).
        data_range: intensity range of the images (1.0 for the synthetic cohorts).
        win_size: SSIM window (odd; smaller than the images).
    """

    def __init__(self, spatial_dims: int, ssim_weight: float = 0.1, data_range: float = 1.0, win_size: int = 7):
        super().__init__()
        from monai.losses import SSIMLoss

        if ssim_weight < 0:
            raise ValueError(f"ssim_weight must be >= 0, got {ssim_weight}.")
        self.ssim_weight = float(ssim_weight)
        self.ssim = SSIMLoss(spatial_dims, data_range=data_range, win_size=win_size) if ssim_weight else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"ForecastLoss: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ.")
        loss = torch.mean((pred - target) ** 2)
        if self.ssim is not None:
            loss = loss + self.ssim_weight * self.ssim(pred, target)
        return loss


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the entries where ``mask`` is 1 (0 when nothing is measured)."""
    mask = mask.to(pred.dtype)
    return (mask * (pred - torch.nan_to_num(target)) ** 2).sum() / mask.sum().clamp_min(1.0)


class ForecastTrainer(SupervisedTrainer):
    """A :class:`~monai.engines.SupervisedTrainer` for twins: image loss + masked future-EHR loss.

    The network is called through its ``forecast`` method when it has one (``(image, future_ehr)``),
    otherwise through ``forward`` (a ``(image, future_ehr)`` tuple from it is unpacked: wrap a twin
    in :class:`~monai_twin.networks.ForecastOutputs` before ``DistributedDataParallel``). Each iteration's output holds MONAI's ``image``/``label``/
    ``pred``/``loss`` plus ``loss_image``, ``loss_ehr``, ``pred_ehr`` and ``future_ehr``, so the
    usual handlers (stats, TensorBoard, checkpoints, validation) work unchanged.

    Args:
        ehr_weight: weight of the future-EHR term (ignored when the batch has no ``ehr_key``).
        ehr_key: batch key of the future-EHR targets ``(B, K)``; ``<ehr_key>_mask`` marks measured ones.
        args, kwargs: as :class:`~monai.engines.SupervisedTrainer` (``prepare_batch`` defaults
            to :class:`~monai_twin.engines.ForecastPrepareBatch`; ``iteration_update`` is taken).
    """

    def __init__(self, *args: Any, ehr_weight: float = 1.0, ehr_key: str = "future_ehr", **kwargs: Any) -> None:
        if kwargs.get("iteration_update") is not None:
            raise ValueError("ForecastTrainer runs its own iteration; do not pass iteration_update.")
        kwargs.setdefault("prepare_batch", ForecastPrepareBatch())
        kwargs["iteration_update"] = self._forecast_iteration
        super().__init__(*args, **kwargs)
        self.ehr_weight, self.ehr_key = float(ehr_weight), ehr_key

    def _forecast_iteration(self, engine: ForecastTrainer, batchdata: dict[str, Any]) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        inputs, targets, args, kwargs = engine.prepare_batch(
            batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs
        )
        if targets is None:
            raise KeyError("ForecastTrainer: the batch has no target scan (ForecastPrepareBatch target_key).")
        engine.state.output = output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if hasattr(engine.network, "forecast"):
            pred, pred_ehr = engine.network.forecast(inputs, *args, **kwargs)
        else:  # e.g. DistributedDataParallel(ForecastOutputs(twin)): forward gives (image, future EHR)
            pred, pred_ehr = engine.inferer(inputs, engine.network, *args, **kwargs), None
            if isinstance(pred, (tuple, list)):
                pred, pred_ehr = pred
        output[Keys.PRED] = pred
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss_image = engine.loss_function(pred, targets).mean()
        loss = loss_image
        loss_ehr = torch.zeros((), device=loss.device)
        if pred_ehr is not None and pred_ehr.shape[-1] and self.ehr_key in batchdata and self.ehr_weight:
            target_ehr = torch.as_tensor(batchdata[self.ehr_key]).to(pred_ehr)
            mask = torch.as_tensor(batchdata.get(f"{self.ehr_key}_mask", torch.ones_like(target_ehr))).to(pred_ehr)
            if target_ehr.shape != pred_ehr.shape:
                raise ValueError(
                    f"batch[{self.ehr_key!r}] is {tuple(target_ehr.shape)}, the network predicts "
                    f"{tuple(pred_ehr.shape)} future EHR values."
                )
            loss_ehr = masked_mse(pred_ehr, target_ehr, mask)
            loss = loss + self.ehr_weight * loss_ehr
            output[self.ehr_key] = target_ehr
        output.update({Keys.LOSS: loss, "loss_image": loss_image.detach(), "loss_ehr": loss_ehr.detach()})
        output["pred_ehr"] = None if pred_ehr is None else pred_ehr.detach()
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output


def train_forecaster(
    network: nn.Module,
    train_data: Iterable,
    val_data: Iterable | None = None,
    *,
    output_dir: str | os.PathLike,
    max_epochs: int = 10,
    learning_rate: float = 1e-3,
    lr_schedule: str | None = "cosine",
    spatial_dims: int | None = None,
    ssim_weight: float = 0.1,
    ehr_weight: float = 0.01,
    data_range: float = 1.0,
    val_interval: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = True,
    tensorboard: bool = True,
    condition_keys: Sequence[str] = FORECAST_CONDITION_KEYS,
    extra_handlers: Sequence[Any] = (),
    loss_function: Callable | None = None,
) -> ForecastTrainer:
    """Train a twin on data loaders of collated samples (``history``, ``target``, ``times``, EHR).

    Sets up, and runs, a :class:`ForecastTrainer` with AdamW, :class:`ForecastLoss`, a tqdm progress
    bar, a TensorBoard log in ``output_dir/tensorboard``, and -- with ``val_data`` -- a
    :class:`~monai.engines.SupervisedEvaluator` every ``val_interval`` epochs scoring PSNR (key
    metric), SSIM and MSE on the clamped forecast; checkpoints go to ``output_dir/checkpoints``:
    the best validation PSNR (``best_network_*.pt``) and the final state (``final_*.pt``), as state
    dicts loadable with ``torch.load(..., weights_only=True)``.

    Args:
        network: a twin (``TwinForecaster``, ``ViViTTwin``, ...).
        train_data, val_data: iterables (e.g. MONAI ``DataLoader``) of collated batches.
        output_dir: where checkpoints and logs go (created).
        lr_schedule: ``"cosine"`` anneals the learning rate to 1 % of ``learning_rate`` over the
            run (per iteration when ``train_data`` has a length, else per epoch, through MONAI's
            ``LrScheduleHandler``); ``None`` keeps it constant.
        spatial_dims: for the SSIM terms; default the network's ``spatial_dims`` attribute.
        ssim_weight, ehr_weight, data_range: see :class:`ForecastLoss` / :class:`ForecastTrainer`. The
            EHR term of a ``TwinForecaster`` with ``isolate_ehr_head=True`` (its default) trains
            the head alone, so ``ehr_weight`` cannot pull the image features; for networks whose
            EHR head shares features with the image, keep the weighted term near the image MSE
            (~1e-4 for [0, 1] scans, while normalised EHR errors are ~0.1-1).
        progress, tensorboard: turn the progress bar / the TensorBoard log off.
        extra_handlers: more trainer handlers (attached after the default ones).
        loss_function: replaces :class:`ForecastLoss`.

    Returns:
        the trainer after ``run()``; ``trainer.state.metrics`` and, with validation,
        ``trainer.evaluator.state.best_metric`` hold the figures.
    """
    from monai.handlers import (
        CheckpointSaver,
        IgniteMetricHandler,
        MeanSquaredError,
        PeakSignalToNoiseRatio,
        StatsHandler,
        TensorBoardStatsHandler,
        ValidationHandler,
        from_engine,
    )
    from monai.metrics import SSIMMetric

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    network = network.to(device)
    dims = int(spatial_dims or getattr(network, "spatial_dims", 0))
    if dims not in (2, 3):
        raise ValueError("spatial_dims must be 2 or 3 (the network has no spatial_dims attribute).")
    optimizer = torch.optim.AdamW(network.parameters(), lr=learning_rate)
    prepare = ForecastPrepareBatch(condition_keys=condition_keys)
    if lr_schedule not in (None, "cosine"):
        raise ValueError(f"lr_schedule must be 'cosine' or None, got {lr_schedule!r}.")

    def loss_of(output: dict) -> float:
        return float(output[Keys.LOSS].detach())

    handlers: list[Any] = [StatsHandler(tag_name="train_loss", output_transform=loss_of)]
    if lr_schedule == "cosine":
        from monai.handlers import LrScheduleHandler

        try:
            steps, per_iteration = max_epochs * len(train_data), True  # type: ignore[arg-type]
        except TypeError:  # an iterable without a length: step once per epoch
            steps, per_iteration = max_epochs, False
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=max(steps, 1), eta_min=learning_rate / 100
        )
        handlers.append(LrScheduleHandler(scheduler, print_lr=False, epoch_level=not per_iteration))
    evaluator = None
    if val_data is not None:

        def clamp(output: dict) -> dict:
            output[Keys.PRED] = output[Keys.PRED].clamp(0.0, data_range)
            return output

        evaluator = SupervisedEvaluator(
            device=device,
            val_data_loader=val_data,
            network=network,
            prepare_batch=prepare,
            postprocessing=clamp,
            decollate=False,
            key_val_metric={
                "val_psnr": PeakSignalToNoiseRatio(max_val=data_range, output_transform=from_engine(["pred", "label"]))
            },
            additional_metrics={
                "val_ssim": IgniteMetricHandler(
                    metric_fn=SSIMMetric(dims, data_range=data_range), output_transform=from_engine(["pred", "label"])
                ),
                "val_mse": MeanSquaredError(output_transform=from_engine(["pred", "label"])),
            },
            val_handlers=[
                StatsHandler(iteration_log=False, output_transform=lambda x: None),
                CheckpointSaver(
                    save_dir=str(out / "checkpoints"), save_dict={"network": network}, save_key_metric=True
                ),
            ],
        )
        handlers.append(ValidationHandler(validator=evaluator, interval=val_interval, epoch_level=True))
    handlers.append(
        CheckpointSaver(
            save_dir=str(out / "checkpoints"),
            save_dict={"network": network, "optimizer": optimizer},
            save_final=True,
            final_filename="final.pt",
        )
    )
    if tensorboard:
        log_dir = str(out / "tensorboard")
        handlers.append(TensorBoardStatsHandler(log_dir=log_dir, tag_name="train_loss", output_transform=loss_of))
        if evaluator is not None:
            TensorBoardStatsHandler(log_dir=log_dir, iteration_log=False, output_transform=lambda x: None).attach(
                evaluator
            )
    trainer = ForecastTrainer(
        device=device,
        max_epochs=max_epochs,
        train_data_loader=train_data,
        network=network,
        optimizer=optimizer,
        loss_function=loss_function or ForecastLoss(dims, ssim_weight, data_range).to(device),
        prepare_batch=prepare,
        train_handlers=[*handlers, *extra_handlers],
        decollate=False,
        ehr_weight=ehr_weight,
    )
    if progress:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda output: {"loss": loss_of(output)})
    trainer.evaluator = evaluator
    trainer.run()
    return trainer
