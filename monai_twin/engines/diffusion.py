"""Training the latent diffusion twin with MONAI's engines.

Both stages run through :class:`monai.engines.SupervisedTrainer`:

1. the autoencoder (MONAI's ``AutoencoderKL``) with :class:`~monai_twin.networks.diffusion.AutoencoderKLLoss`
   (:func:`train_autoencoder`);
2. the denoiser (:class:`~monai_twin.networks.diffusion.LatentDiffusionTwin`) on precomputed latents
   with :class:`DiffusionTwinPrepareBatch` -- MONAI's ``DiffusionPrepareBatch`` extended with the
   twin's keyword conditions, condition dropout for classifier-free guidance and velocity targets
   for RFlow -- and :class:`~monai_twin.inferers.TwinDiffusionInferer` (:func:`train_diffusion_twin`).

Null-EHR pairs (:func:`null_ehr_sample`) teach "no events, no time -> no change": the target is the
prior under a small random affine, the events are empty and the gap is about zero.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.utils import convert_to_tensor

from ..inferers.diffusion import DIFFUSION_CONDITION_KEYS, DIFFUSION_OPTIONAL_KEYS, _is_rflow

__all__ = [
    "DiffusionTwinPrepareBatch",
    "encode_latents",
    "null_ehr_sample",
    "train_autoencoder",
    "train_diffusion_twin",
    "twin_conditions",
]


class DiffusionTwinPrepareBatch(DiffusionPrepareBatch):
    """``batch -> (x0, model target, (), {noise, timesteps, prior, ehr_..., gap, drop_condition})``.

    ``x0`` is the diffusion variable: the scaled latent change ``(target - prior) / residual_scale``
    (or the target latent when ``residual_scale`` is 0). The model target follows the scheduler:
    for DDPM/DDIM the noise (``prediction_type="epsilon"``), ``x0`` itself (``"sample"``) or MONAI's
    ``get_velocity`` (``"v_prediction"``); for RFlow ``x0 - noise`` (MONAI's velocity convention).
    The optional :data:`~monai_twin.inferers.DIFFUSION_OPTIONAL_KEYS` (interval features) are passed
    on when the batch has them. When the batch has ``base_key`` (the latent of a deterministic base
    forecast, for ``LatentDiffusionTwin(base_forecast=True)``), ``x0`` is ``(target - base) / residual_scale``
    and ``base`` is passed to the network.

    Args:
        scheduler: the training scheduler (its type decides the target; RFlow samples its own timesteps).
        residual_scale: as the network's ``residual_scale`` buffer.
        condition_dropout: probability of dropping a row's clinical context (classifier-free guidance).
        prior_key, target_key: latent keys of the batch.
        condition_keys: keys passed to the network as keyword arguments.
        base_key: latent key of the base forecast, used when the batch has it.
    """

    def __init__(
        self,
        scheduler: Any,
        residual_scale: float = 1.0,
        condition_dropout: float = 0.1,
        prior_key: str = "prior",
        target_key: str = "target",
        condition_keys: Sequence[str] = DIFFUSION_CONDITION_KEYS,
        base_key: str = "base",
    ) -> None:
        super().__init__(num_train_timesteps=scheduler.num_train_timesteps)
        self.base_key = base_key
        if not 0.0 <= condition_dropout < 1.0:
            raise ValueError(f"condition_dropout must be in [0, 1), got {condition_dropout}.")
        self.scheduler, self.residual_scale = scheduler, float(residual_scale)
        self.condition_dropout = float(condition_dropout)
        self.prior_key, self.target_key, self.condition_keys = prior_key, target_key, tuple(condition_keys)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        if _is_rflow(self.scheduler):
            return self.scheduler.sample_timesteps(images)
        return super().get_timesteps(images)

    def get_target(self, images: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if _is_rflow(self.scheduler):
            return images - noise
        kind = str(getattr(self.scheduler, "prediction_type", "epsilon"))
        if kind == "sample":
            return images
        if kind == "v_prediction":
            return self.scheduler.get_velocity(images, noise, timesteps)
        return noise

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict[str, torch.Tensor]]:
        missing = [k for k in (self.prior_key, self.target_key, *self.condition_keys) if k not in batchdata]
        if missing:
            raise KeyError(f"DiffusionTwinPrepareBatch: the batch has no {missing} (keys: {sorted(batchdata)}).")

        def move(key: str) -> torch.Tensor:
            # plain tensors: MetaTensor's per-op bookkeeping makes the small attention layers several times slower
            value = convert_to_tensor(batchdata[key], track_meta=False)
            return value.to(device=device, non_blocking=non_blocking, **kwargs)

        prior, target = move(self.prior_key), move(self.target_key)
        if prior.shape != target.shape:
            raise ValueError(
                f"batch[{self.prior_key!r}] {tuple(prior.shape)} != batch[{self.target_key!r}] {tuple(target.shape)}."
            )
        base = move(self.base_key) if self.base_key in batchdata else None
        if base is not None and base.shape != target.shape:
            raise ValueError(f"batch[{self.base_key!r}] {tuple(base.shape)} != the target {tuple(target.shape)}.")
        reference = prior if base is None else base
        x0 = (target - reference) / self.residual_scale if self.residual_scale > 0 else target
        noise = self.get_noise(x0)
        timesteps = self.get_timesteps(x0).to(x0.device)
        keys = self.condition_keys + tuple(
            k for k in DIFFUSION_OPTIONAL_KEYS if k in batchdata and k not in self.condition_keys
        )
        conditions = {k: move(k) for k in keys}
        drop = (torch.rand(x0.shape[0], device=x0.device) < self.condition_dropout).float()
        infer_kwargs = {"noise": noise, "timesteps": timesteps, "prior": prior, "drop_condition": drop, **conditions}
        if base is not None:
            infer_kwargs["base"] = base
        return x0, self.get_target(x0, noise, timesteps), (), infer_kwargs


def twin_conditions(
    item: Mapping[str, Any], vocabulary: Any, max_tokens: int = 32, intervals: bool = True
) -> dict[str, torch.Tensor]:
    """The twin's condition tensors for one item of ``build_longitudinal_items`` / ``forecast_item``.

    Every event before the target is a candidate token (``lookback=None``: a dose started before
    the first prior visit is still in force); the most recent ``max_tokens`` are kept. The gap is
    the days from the last prior visit to the target. With ``intervals``, the EHR features of the
    interval from the last prior visit to the target (``EHRToIntervalFeaturesd`` with its defaults:
    drug exposure = dose x days, per-code reducers, days since) and their mask are added -- the
    input of ``LatentDiffusionTwin(interval_dim=F)``'s direct EHR path; a what-if edit of the
    dose after the last scan changes its exposure column.

    Returns:
        ``ehr_tokens_code/value/time/mask`` ``(max_tokens,)``, ``ehr_static`` ``(S,)``, ``gap`` ``()``,
        and with ``intervals`` ``ehr_interval`` / ``ehr_interval_mask`` ``(F,)``.
    """
    from ..transforms.ehr import EHRStaticToTensord, EHRToEventTokensd, EHRToIntervalFeaturesd

    for key in ("events", "history_times", "target_time", "static"):
        if key not in item:
            raise KeyError(f"twin_conditions: the item has no {key!r} (keys: {sorted(item)}).")
    d = EHRToEventTokensd(vocabulary, max_tokens=max_tokens, lookback=None)(dict(item))
    d = EHRStaticToTensord(vocabulary)(d)
    gap = float(item["target_time"]) - float(np.asarray(item["history_times"], dtype=np.float64)[-1])
    out = {k: torch.as_tensor(d[k]) for k in DIFFUSION_CONDITION_KEYS if k != "gap"}
    out["ehr_tokens_code"] = out["ehr_tokens_code"].long()
    out["ehr_static"] = out["ehr_static"].float()
    out["gap"] = torch.tensor(gap, dtype=torch.float32)
    if intervals:
        last = np.asarray(item["history_times"], dtype=np.float64)[-1:]
        f = EHRToIntervalFeaturesd(vocabulary)(dict(item, history_times=last))
        out["ehr_interval"] = torch.as_tensor(f["ehr_intervals"]).float().reshape(-1)
        out["ehr_interval_mask"] = torch.as_tensor(f["ehr_intervals_mask"]).float().reshape(-1)
    return out


def null_ehr_sample(
    sample: Mapping[str, Any],
    rng: np.random.Generator,
    max_rotation_deg: float = 2.0,
    max_shift: float = 1.0,
    max_gap_days: float = 3.0,
    prior_key: str = "prior_image",
    target_key: str = "target_image",
    base_key: str = "base_image",
) -> dict[str, Any]:
    """A null-EHR training pair from a sample: target = prior under a small random affine, no events, gap ~0.

    When the sample has ``base_key`` (a base forecast, for a residual twin on a deterministic
    forecast), it becomes the prior: with no time to the target, the base forecast is the prior scan.

    Args:
        sample: an image-space sample with ``prior_key`` ``(C, *spatial)`` and the condition keys.
        rng: numpy generator (the draw: rotation, shift in voxels, gap in days).
        max_rotation_deg: rotation bound (about every axis in 3D), degrees.
        max_shift: shift bound, voxels.
        max_gap_days: the gap is uniform in ``[0, max_gap_days]``.
        prior_key: the prior image's key.
        target_key: the target image's key (replaced).
        base_key: the base forecast's key (replaced by the prior when present).
    """
    from monai.transforms import Affine

    if prior_key not in sample:
        raise KeyError(f"null_ehr_sample: the sample has no {prior_key!r}.")
    prior = torch.as_tensor(sample[prior_key], dtype=torch.float32)
    nd = prior.ndim - 1
    n_rot = 1 if nd == 2 else 3
    rotate = tuple(np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, n_rot)))
    shift = tuple(rng.uniform(-max_shift, max_shift, nd))
    moved, _ = Affine(rotate_params=rotate, translate_params=shift, padding_mode="border", image_only=False)(prior)
    out = dict(sample)
    out[target_key] = torch.as_tensor(moved).float().clamp(float(prior.min()), float(prior.max()))
    out["ehr_tokens_mask"] = torch.zeros_like(torch.as_tensor(sample["ehr_tokens_mask"]))
    out["ehr_tokens_code"] = torch.zeros_like(torch.as_tensor(sample["ehr_tokens_code"]))
    out["ehr_tokens_value"] = torch.zeros_like(torch.as_tensor(sample["ehr_tokens_value"]))
    out["ehr_tokens_time"] = torch.zeros_like(torch.as_tensor(sample["ehr_tokens_time"]))
    out["gap"] = torch.tensor(float(rng.uniform(0.0, max_gap_days)), dtype=torch.float32)
    for key in DIFFUSION_OPTIONAL_KEYS:  # no interval events either
        if key in sample:
            out[key] = torch.zeros_like(torch.as_tensor(sample[key]))
    if base_key in sample:
        out[base_key] = prior.clone()
    return out


def _progress_bar(trainer: Any, total: int, desc: str) -> None:
    from ignite.engine import Events
    from monai.engines.utils import IterationEvents  # noqa: F401  (engines are ignite engines)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, leave=False)

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine: Any) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{engine.state.output['loss'].item():.4f}")

    @trainer.on(Events.COMPLETED)
    def _close(engine: Any) -> None:
        bar.close()


def _epoch_losses(trainer: Any) -> list[float]:
    from ignite.engine import Events

    losses: list[float] = []
    running: list[float] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine: Any) -> None:
        running.append(engine.state.output["loss"].item())

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch(engine: Any) -> None:
        losses.append(float(np.mean(running)))
        running.clear()

    return losses


@torch.no_grad()
def encode_latents(
    autoencoder: torch.nn.Module, images: torch.Tensor, scale_factor: float = 1.0, batch_size: int = 32
) -> torch.Tensor:
    """``(N, C, *spatial)`` images -> ``(N, C_latent, *latent_spatial)`` scaled posterior means."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}.")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contains NaN or infinite values.")
    autoencoder.eval()
    out = [autoencoder.encode(images[i : i + batch_size])[0] for i in range(0, len(images), batch_size)]
    return torch.cat(out) * scale_factor


def train_autoencoder(
    autoencoder: torch.nn.Module,
    images: torch.Tensor,
    config: Any,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> list[float]:
    """Train an ``AutoencoderKL`` on ``images`` ``(N, C, *spatial)`` with MONAI's ``SupervisedTrainer``.

    ``images`` may also be (prior, target) pairs ``(N, 2, C, *spatial)``: the autoencoder is then
    trained through :class:`~monai_twin.networks.diffusion.PairedAutoencoder`, and the config's
    ``change_weight`` makes it keep the change between the two (what the twin must forecast).

    Args:
        autoencoder: MONAI ``AutoencoderKL`` (``AutoencoderConfig.build()``).
        images: training images or pairs, intensities ~[0, 1].
        config: its :class:`~monai_twin.networks.diffusion.AutoencoderConfig` (loss weights).
        progress: tqdm bar over iterations.

    Returns:
        the mean training loss of each epoch.
    """
    from monai.engines import SupervisedTrainer
    from torch.utils.data import DataLoader

    from ..networks.diffusion import AutoencoderKLLoss, PairedAutoencoder

    paired = isinstance(images, torch.Tensor) and images.ndim == config.spatial_dims + 3 and images.shape[1] == 2
    if not isinstance(images, torch.Tensor) or (images.ndim != config.spatial_dims + 2 and not paired):
        raise ValueError(
            f"images must be a (N, C, *spatial) tensor with {config.spatial_dims} spatial dims (or (N, 2, C, *spatial) pairs)."
        )
    if not bool(torch.isfinite(images).all()):
        raise ValueError("images contains NaN or infinite values.")
    torch.manual_seed(seed)
    # torch's DataLoader: plain tensors (MONAI's collate makes MetaTensors, slower for no benefit here)
    loader = DataLoader([{"image": im, "label": im} for im in images], batch_size=batch_size, shuffle=True)
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=epochs,
        train_data_loader=loader,
        network=(PairedAutoencoder(autoencoder) if paired else autoencoder).to(device),
        optimizer=torch.optim.Adam(autoencoder.parameters(), lr),
        loss_function=AutoencoderKLLoss(config),
        decollate=False,
    )
    losses = _epoch_losses(trainer)
    if progress:
        _progress_bar(trainer, epochs * len(loader), "autoencoder")
    trainer.run()
    autoencoder.eval()
    return losses


def train_diffusion_twin(
    network: torch.nn.Module,
    scheduler: Any,
    samples: Sequence[Mapping[str, torch.Tensor]],
    epochs: int = 50,
    batch_size: int = 16,
    lr: float = 5e-4,
    condition_dropout: float = 0.1,
    fit_residual_scale: bool = True,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress: bool = False,
    ema_decay: float = 0.0,
    lr_schedule: str | None = None,
) -> list[float]:
    """Train a :class:`~monai_twin.networks.diffusion.LatentDiffusionTwin` with MONAI's ``SupervisedTrainer``.

    Args:
        network: the twin (its ``residual_scale`` buffer decides the diffusion variable).
        scheduler: a MONAI scheduler (:func:`~monai_twin.inferers.make_scheduler`).
        samples: dicts with ``prior`` and ``target`` latents ``(C, *latent_spatial)`` and the
            :data:`~monai_twin.inferers.DIFFUSION_CONDITION_KEYS` tensors (null-EHR pairs included;
            plus ``ehr_interval`` / ``ehr_interval_mask`` for a twin with ``interval_dim > 0``, and
            ``base``, the latent of a base forecast, for a twin with ``base_forecast=True``).
        condition_dropout: probability of dropping a row's clinical context.
        fit_residual_scale: set ``network.residual_scale`` to the standard deviation of
            ``target - prior`` (``target - base`` with a base forecast) over ``samples`` before
            training (only when it is > 0).
        ema_decay: ``> 0`` keeps an exponential moving average of the parameters, updated after
            every iteration (``decay`` ramps up as ``min(ema_decay, (1 + n) / (10 + n))`` over the
            first iterations), and loads it into ``network`` when training ends; ``0`` (default)
            keeps the last iterate. The averaged denoiser is the usual choice for sampling.
        lr_schedule: ``None`` (constant ``lr``) or ``"cosine"`` (cosine annealing from ``lr`` to 0
            over all iterations, stepped every iteration).

    Returns:
        the mean training loss of each epoch.
    """
    from monai.engines import SupervisedTrainer
    from torch.utils.data import DataLoader

    from ..inferers.diffusion import TwinDiffusionInferer

    if len(samples) == 0:
        raise ValueError("samples is empty.")
    for key in ("prior", "target", *DIFFUSION_CONDITION_KEYS):
        if key not in samples[0]:
            raise KeyError(f"train_diffusion_twin: samples[0] has no {key!r} (keys: {sorted(samples[0])}).")
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
    if lr_schedule not in (None, "cosine"):
        raise ValueError(f"lr_schedule must be None or 'cosine', got {lr_schedule!r}.")
    uses_base = bool(getattr(network, "base_forecast", False))
    if uses_base != ("base" in samples[0]):
        raise KeyError(
            f"train_diffusion_twin: the twin has base_forecast={uses_base} but samples[0] "
            f"{'has' if 'base' in samples[0] else 'has no'} 'base'."
        )
    reference = "base" if uses_base else "prior"
    if fit_residual_scale and float(network.residual_scale) > 0:
        change = torch.stack([torch.as_tensor(s["target"]) - torch.as_tensor(s[reference]) for s in samples])
        network.residual_scale.fill_(max(float(change.std()), 1e-3))
    torch.manual_seed(seed)
    loader = DataLoader(list(samples), batch_size=batch_size, shuffle=True, drop_last=len(samples) > batch_size)
    optimizer = torch.optim.AdamW(network.parameters(), lr)
    trainer = SupervisedTrainer(
        device=torch.device(device),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network.to(device),
        optimizer=optimizer,
        loss_function=torch.nn.MSELoss(),
        inferer=TwinDiffusionInferer(scheduler),
        prepare_batch=DiffusionTwinPrepareBatch(scheduler, float(network.residual_scale), condition_dropout),
        decollate=False,
    )
    losses = _epoch_losses(trainer)
    if lr_schedule == "cosine":
        _cosine_schedule(trainer, optimizer, epochs * len(loader))
    if ema_decay > 0:
        _ema(trainer, network, ema_decay)
    if progress:
        _progress_bar(trainer, epochs * len(loader), "diffusion twin")
    trainer.run()
    network.eval()
    return losses


def _cosine_schedule(trainer: Any, optimizer: torch.optim.Optimizer, total: int) -> None:
    """Cosine annealing of the learning rate to 0 over ``total`` iterations, stepped per iteration."""
    from ignite.engine import Events

    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(int(total), 1))

    @trainer.on(Events.ITERATION_COMPLETED)
    def _step(engine: Any) -> None:
        schedule.step()


def _ema(trainer: Any, network: torch.nn.Module, decay: float) -> None:
    """An exponential moving average of ``network``'s parameters, loaded into it when training completes."""
    from ignite.engine import Events

    params = [p for p in network.parameters() if p.requires_grad]
    shadow = [p.detach().clone() for p in params]
    count = [0]

    @trainer.on(Events.ITERATION_COMPLETED)
    def _update(engine: Any) -> None:
        count[0] += 1
        d = min(decay, (1.0 + count[0]) / (10.0 + count[0]))
        with torch.no_grad():
            torch._foreach_lerp_(shadow, [p.detach() for p in params], 1.0 - d)

    @trainer.on(Events.COMPLETED)
    def _load(engine: Any) -> None:
        with torch.no_grad():
            for p, s in zip(params, shadow):
                p.copy_(s)
