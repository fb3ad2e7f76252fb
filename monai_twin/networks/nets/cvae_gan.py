"""cVAE+GAN refinement of a deterministic forecast (seed section 3.4; Bao et al., "CVAE-GAN", 2017).

A deterministic twin trained with MSE forecasts the *mean* future scan: sharp details that may or
may not appear come out blurred, and one forecast says nothing about how sure the twin is. The
refiner adds a latent map ``z`` to the forecast:

- a conditional encoder reads the forecast and a context image (the last scan by default);
- the **posterior** ``q(z | target, forecast, context)`` sees the true future scan (training only);
- the **prior** ``p(z | forecast, context)`` is learned (or a standard normal) and is what
  inference samples from; a KL term pulls the posterior to it;
- a U-Net decoder turns ``(features, z)`` into a *correction* of the forecast, its last layer
  zero-initialised, so an untrained refiner returns the forecast unchanged;
- a conditional :class:`~monai.networks.nets.PatchDiscriminator` trained with
  :class:`~monai.losses.PatchAdversarialLoss` keeps the refined scans sharp.

``N`` samples from the prior give a mean forecast and a per-pixel standard deviation (the
uncertainty map). :class:`RefinedTwin` wraps a forecaster and a refiner behind the forecasters'
call signature, and :class:`CVAEGANTrainingStep` trains the refiner through MONAI's
``SupervisedTrainer`` (as its ``iteration_update``) or a plain loop. The head is optional: nothing
else in the package uses it unless asked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.losses import PatchAdversarialLoss
from monai.networks.blocks import Convolution, UpSample
from monai.utils.enums import CommonKeys
from torch import nn

from .forecast_inputs import last_visit_index

__all__ = ["CVAEGANRefiner", "CVAEGANTrainingStep", "RefinedTwin", "gaussian_kl"]


def gaussian_kl(mu_q: torch.Tensor, logvar_q: torch.Tensor, mu_p: torch.Tensor, logvar_p: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu_q, exp(logvar_q)) || N(mu_p, exp(logvar_p)))`` per element (diagonal Gaussians)."""
    return 0.5 * (logvar_p - logvar_q + (torch.exp(logvar_q) + (mu_q - mu_p) ** 2) / torch.exp(logvar_p) - 1.0)


class _SkipUp(nn.Module):
    def __init__(self, spatial_dims: int, c_in: int, c_out: int, act: str | tuple, norm: str | tuple | None) -> None:
        super().__init__()
        self.up = UpSample(spatial_dims, c_in, c_out, scale_factor=2, mode="deconv")
        self.conv = Convolution(spatial_dims, 2 * c_out, c_out, act=act, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


def _encoder(
    spatial_dims: int, c_in: int, channels: Sequence[int], act: str | tuple, norm: str | tuple | None
) -> nn.ModuleList:
    layers = nn.ModuleList()
    for level, c in enumerate(channels):
        layers.append(Convolution(spatial_dims, c_in, c, strides=1 if level == 0 else 2, act=act, norm=norm))
        c_in = c
    return layers


class CVAEGANRefiner(nn.Module):
    """Conditional VAE refinement of a forecast, with a spatial latent map.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of the forecast and of the target scan.
        context_channels: channels of the context image (default ``in_channels``: the last scan).
        channels: encoder channels per level; each level after the first halves the resolution and
            the latent sits at the last level (sizes divisible by ``2 ** (len(channels) - 1)``).
        latent_channels: channels of ``z``.
        learned_prior: learn ``p(z | forecast, context)``; ``False``: a standard normal prior.
        logvar_range: clamp of the predicted log-variances (numerical safety).
        change_scale: the posterior sees ``(target - forecast) * change_scale`` and the decoder's
            correction is divided by it: visit-to-visit changes are a few percent of the intensity
            range, which the normalised encoders would otherwise drown in the anatomy.
        act, norm: MONAI layer factory names. No normalisation by default: a per-sample norm
            (instance, group) removes the global amplitude of a change that ``z`` carries, and the
            decoder then learns to ignore the latent (posterior collapse).

    Shapes:
        forecast ``(B, C, *spatial)``, context ``(B, context_channels, *spatial)``, target
        ``(B, C, *spatial)``, z ``(B, latent_channels, *spatial / 2 ** (len(channels) - 1))``.
        ``forward(forecast, context, z=None)`` -> refined ``(B, C, *spatial)``; without ``z`` the
        prior mean is used, so the output is deterministic (what-if differences stay noise-free).

    Example::

        refiner = CVAEGANRefiner(spatial_dims=2, in_channels=1)
        mean, std = refiner.sample(forecast, last_scan, num_samples=8)
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        context_channels: int | None = None,
        channels: Sequence[int] = (16, 32, 64),
        latent_channels: int = 4,
        learned_prior: bool = True,
        logvar_range: tuple[float, float] = (-8.0, 4.0),
        change_scale: float = 20.0,
        act: str | tuple = "PRELU",
        norm: str | tuple | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        channels = list(channels)
        if len(channels) < 1 or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}.")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}.")
        context_channels = in_channels if context_channels is None else context_channels
        if context_channels < 0:
            raise ValueError(f"context_channels must be >= 0, got {context_channels}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.context_channels = context_channels
        self.latent_channels = latent_channels
        self.learned_prior = learned_prior
        self.levels = len(channels)
        self.logvar_min, self.logvar_max = float(logvar_range[0]), float(logvar_range[1])
        if not change_scale > 0:
            raise ValueError(f"change_scale must be > 0, got {change_scale}.")
        self.change_scale = float(change_scale)
        conv = Convolution
        deep = channels[-1]
        self.cond_encoder = _encoder(spatial_dims, in_channels + context_channels, channels, act, norm)
        self.posterior_encoder = _encoder(spatial_dims, 2 * in_channels + context_channels, channels, act, norm)
        self.posterior_head = conv(spatial_dims, deep, 2 * latent_channels, kernel_size=1, conv_only=True)
        self.prior_head = conv(spatial_dims, deep, 2 * latent_channels, kernel_size=1, conv_only=True)
        # the learned prior starts as N(0, 1)
        nn.init.zeros_(self.prior_head.conv.weight)
        nn.init.zeros_(self.prior_head.conv.bias)
        self.bridge = conv(spatial_dims, deep + latent_channels, deep, act=act, norm=norm)
        self.decoder = nn.ModuleList(
            _SkipUp(spatial_dims, channels[level], channels[level - 1], act, norm)
            for level in range(self.levels - 1, 0, -1)
        )
        self.head = conv(spatial_dims, channels[0], in_channels, kernel_size=1, conv_only=True)
        # an untrained refiner returns the forecast unchanged
        nn.init.zeros_(self.head.conv.weight)
        nn.init.zeros_(self.head.conv.bias)

    def _check(self, forecast: torch.Tensor, context: torch.Tensor | None, name: str, x: torch.Tensor | None) -> None:
        if forecast.dim() != self.spatial_dims + 2 or forecast.shape[1] != self.in_channels:
            raise ValueError(
                f"forecast must have shape (B, {self.in_channels}, *{self.spatial_dims} spatial dims), "
                f"got {list(forecast.shape)}."
            )
        factor = 2 ** (self.levels - 1)
        for size in forecast.shape[2:]:
            if size % factor != 0:
                raise ValueError(f"spatial size {list(forecast.shape[2:])} must be divisible by {factor}.")
        if self.context_channels > 0:
            if context is None:
                raise ValueError(f"context ({self.context_channels} channels, e.g. the last scan) is required.")
            if list(context.shape) != [forecast.shape[0], self.context_channels] + list(forecast.shape[2:]):
                raise ValueError(
                    f"context must have shape {[forecast.shape[0], self.context_channels] + list(forecast.shape[2:])}, "
                    f"got {list(context.shape)}."
                )
        if x is not None and x.shape != forecast.shape:
            raise ValueError(f"{name} must have the shape of forecast {list(forecast.shape)}, got {list(x.shape)}.")

    def _inputs(self, forecast: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        if self.context_channels > 0 and context is not None:
            return torch.cat([forecast, context.to(forecast.dtype)], dim=1)
        return forecast

    def _features(self, forecast: torch.Tensor, context: torch.Tensor | None) -> list[torch.Tensor]:
        skips: list[torch.Tensor] = []
        x = self._inputs(forecast, context)
        for block in self.cond_encoder:
            x = block(x)
            skips.append(x)
        return skips

    def _split(self, stats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = torch.chunk(stats, 2, dim=1)
        return mu, logvar.clamp(self.logvar_min, self.logvar_max)

    def _prior(self, skips: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        stats = self.prior_head(skips[-1])
        if not self.learned_prior:
            stats = torch.zeros_like(stats)
        return self._split(stats)

    def _decode(self, forecast: torch.Tensor, skips: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
        if list(z.shape) != [skips[-1].shape[0], self.latent_channels] + list(skips[-1].shape[2:]):
            raise ValueError(
                f"z must have shape {[skips[-1].shape[0], self.latent_channels] + list(skips[-1].shape[2:])}, "
                f"got {list(z.shape)}."
            )
        y = self.bridge(torch.cat([skips[-1], z], dim=1))
        for i, block in enumerate(self.decoder):
            y = block(y, skips[-2 - i])
        return forecast + self.head(y) / self.change_scale

    @torch.jit.export
    def prior(self, forecast: torch.Tensor, context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``p(z | forecast, context)``."""
        self._check(forecast, context, "forecast", None)
        return self._prior(self._features(forecast, context))

    @torch.jit.export
    def posterior(
        self, forecast: torch.Tensor, context: torch.Tensor | None, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``q(z | target, forecast, context)`` (training only)."""
        self._check(forecast, context, "target", target)
        change = (target.to(forecast.dtype) - forecast) * self.change_scale
        x = torch.cat([change, self._inputs(forecast, context)], dim=1)
        for block in self.posterior_encoder:
            x = block(x)
        return self._split(self.posterior_head(x))

    def forward(
        self, forecast: torch.Tensor, context: torch.Tensor | None = None, z: torch.Tensor | None = None
    ) -> torch.Tensor:
        self._check(forecast, context, "forecast", None)
        skips = self._features(forecast, context)
        if z is None:
            z = self._prior(skips)[0]
        return self._decode(forecast, skips, z)

    def training_outputs(
        self, forecast: torch.Tensor, context: torch.Tensor | None, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training draw: ``(refined from z ~ posterior, refined from z ~ prior, mean KL per latent element)``."""
        mu_q, logvar_q = self.posterior(forecast, context, target)
        skips = self._features(forecast, context)
        mu_p, logvar_p = self._prior(skips)
        z_q = mu_q + torch.exp(0.5 * logvar_q) * torch.randn_like(mu_q)
        z_p = mu_p + torch.exp(0.5 * logvar_p) * torch.randn_like(mu_p)
        kl = gaussian_kl(mu_q, logvar_q, mu_p, logvar_p).mean()
        return self._decode(forecast, skips, z_q), self._decode(forecast, skips, z_p), kl

    @torch.jit.export
    def sample(
        self, forecast: torch.Tensor, context: torch.Tensor | None = None, num_samples: int = 8
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-pixel standard deviation ``(B, C, *spatial)`` of ``num_samples`` refined forecasts,
        ``z`` drawn from the prior (no gradients)."""
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
        self._check(forecast, context, "forecast", None)
        with torch.no_grad():
            skips = self._features(forecast, context)
            mu, logvar = self._prior(skips)
            # Welford's running mean / sum of squared deviations: stable where the draws barely differ
            mean = torch.zeros_like(forecast)
            m2 = torch.zeros_like(forecast)
            for k in range(num_samples):
                refined = self._decode(forecast, skips, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu))
                delta = refined - mean
                mean = mean + delta / (k + 1)
                m2 = m2 + delta * (refined - mean)
        return mean, torch.sqrt(m2 / max(num_samples - 1, 1))


def _last_scan(history: torch.Tensor, history_mask: torch.Tensor | None) -> torch.Tensor:
    if history_mask is None:
        return history[:, -1]
    last = last_visit_index(history_mask.to(torch.float32))
    return history[torch.arange(history.shape[0], device=history.device), last]


class RefinedTwin(nn.Module):
    """A forecasting twin followed by a :class:`CVAEGANRefiner`, with the forecasters' call signature.

    ``forward`` / ``forecast`` refine with the prior mean (deterministic, so ``WhatIfInferer`` and the
    engines can use it as any twin); ``sample`` gives the mean and per-pixel std of ``num_samples``
    draws. The context of the refiner is the last real scan of the history.

    Args:
        forecaster: a :class:`TwinForecaster` or :class:`ViViTTwin` (anything with ``forecast``).
        refiner: the refinement head, ``context_channels`` equal to the scans' channels.
        freeze_forecaster: run the forecaster without gradients (the usual second training stage).

    TorchScript: script the forecaster and the refiner separately (both script); this wrapper holds
    any forecaster module and stays Python.
    """

    def __init__(self, forecaster: nn.Module, refiner: CVAEGANRefiner, freeze_forecaster: bool = True) -> None:
        super().__init__()
        self.forecaster = forecaster
        self.refiner = refiner
        self.freeze_forecaster = freeze_forecaster

    def deterministic(
        self,
        history: torch.Tensor,
        times: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(forecast, future_ehr, last scan)`` of the wrapped forecaster (no gradients when frozen)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_forecaster):
            image, future = self.forecaster.forecast(
                history, times, history_mask, ehr_intervals, ehr_intervals_mask, ehr_static
            )
        return image, future, _last_scan(history, history_mask)

    def forecast(
        self,
        history: torch.Tensor,
        times: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, future, last = self.deterministic(
            history, times, history_mask, ehr_intervals, ehr_intervals_mask, ehr_static
        )
        return self.refiner(image, last), future

    def forward(
        self,
        history: torch.Tensor,
        times: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forecast(history, times, history_mask, ehr_intervals, ehr_intervals_mask, ehr_static)[0]

    def sample(
        self,
        history: torch.Tensor,
        times: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
        num_samples: int = 8,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and per-pixel standard deviation of ``num_samples`` refined forecasts."""
        image, _, last = self.deterministic(history, times, history_mask, ehr_intervals, ehr_intervals_mask, ehr_static)
        return self.refiner.sample(image, last, num_samples)


class CVAEGANTrainingStep:
    """One cVAE-GAN iteration: a discriminator update, then a generator (refiner) update.

    Generator loss: ``rec_weight * L1(refined_posterior, target) + kl_weight * KL
    + adv_weight * adversarial(refined from posterior and prior)``; discriminator loss: the patch
    adversarial loss on ``[target - context, context]`` (real) vs ``[refined - context, context]`` (fake). The
    discriminator is conditional: its ``in_channels`` is the scans' channels + the context's.

    Args:
        refiner: the :class:`CVAEGANRefiner` to train.
        discriminator: e.g. ``PatchDiscriminator(spatial_dims, channels=16, in_channels=2 * C, num_layers_d=2)``.
        g_optimizer, d_optimizer: optimisers of the refiner and the discriminator.
        forecaster: the deterministic twin whose forecasts are refined (needed by ``__call__``; run
            without gradients).
        rec_weight, kl_weight, adv_weight: loss weights.
        criterion: ``PatchAdversarialLoss`` criterion (``"least_squares"``, ``"hinge"``, ``"bce"``).

    Use as ``SupervisedTrainer(..., network=refiner, optimizer=g_optimizer, loss_function=torch.nn.L1Loss(),
    prepare_batch=ForecastPrepareBatch(), iteration_update=step)``; ``engine.state.output`` then holds
    ``loss`` (generator), ``d_loss``, ``rec``, ``kl``, ``adv`` and ``pred`` (refined from the prior mean).
    ``generator_step`` / ``discriminator_step`` serve a plain loop.
    """

    def __init__(
        self,
        refiner: CVAEGANRefiner,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        forecaster: nn.Module | None = None,
        rec_weight: float = 1.0,
        kl_weight: float = 1e-3,
        adv_weight: float = 1e-3,
        criterion: str = "least_squares",
    ) -> None:
        self.refiner = refiner
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.forecaster = forecaster
        self.rec_weight = float(rec_weight)
        self.kl_weight = float(kl_weight)
        self.adv_weight = float(adv_weight)
        self.adversarial = PatchAdversarialLoss(criterion=criterion)

    def _critic(self, image: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        # the critic sees the change from the context (the last scan) beside the context: the changes
        # are small next to the anatomy, and a critic of whole images cannot tell them apart
        x = image if context is None else torch.cat([image - context.to(image.dtype), context.to(image.dtype)], dim=1)
        out = self.discriminator(x)
        return out[-1] if isinstance(out, (list, tuple)) else out

    def discriminator_step(
        self, fake: torch.Tensor, context: torch.Tensor | None, target: torch.Tensor
    ) -> torch.Tensor:
        """Update the discriminator on ``target`` (real) vs ``fake`` (detached); returns its loss."""
        self.discriminator.train()
        self.d_optimizer.zero_grad(set_to_none=True)
        real_loss = self.adversarial(self._critic(target, context), target_is_real=True, for_discriminator=True)
        fake_loss = self.adversarial(self._critic(fake.detach(), context), target_is_real=False, for_discriminator=True)
        loss = 0.5 * (real_loss + fake_loss)
        loss.backward()
        self.d_optimizer.step()
        return loss.detach()

    def generator_step(
        self, forecast: torch.Tensor, context: torch.Tensor | None, target: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Update the discriminator, then the refiner; returns the losses and the refined draws."""
        self.refiner.train()
        refined_q, refined_p, kl = self.refiner.training_outputs(forecast, context, target)
        d_loss = self.discriminator_step(
            torch.cat([refined_q, refined_p]), _repeat(context), torch.cat([target, target])
        )
        self.g_optimizer.zero_grad(set_to_none=True)
        for p in self.discriminator.parameters():
            p.requires_grad_(False)
        adv = self.adversarial(
            self._critic(torch.cat([refined_q, refined_p]), _repeat(context)),
            target_is_real=True,
            for_discriminator=False,
        )
        for p in self.discriminator.parameters():
            p.requires_grad_(True)
        rec = torch.nn.functional.l1_loss(refined_q, target)
        loss = self.rec_weight * rec + self.kl_weight * kl + self.adv_weight * adv
        loss.backward()
        self.g_optimizer.step()
        return {
            "loss": loss.detach(),
            "d_loss": d_loss,
            "rec": rec.detach(),
            "kl": kl.detach(),
            "adv": adv.detach(),
            "refined_posterior": refined_q.detach(),
            "refined_prior": refined_p.detach(),
        }

    def __call__(self, engine: Any, batchdata: Mapping[str, Any]) -> dict[str, Any]:
        """``iteration_update`` for MONAI's ``SupervisedTrainer`` with ``ForecastPrepareBatch``."""
        if self.forecaster is None:
            raise ValueError("CVAEGANTrainingStep needs forecaster= to train through an engine.")
        history, target, _args, kwargs = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)
        if target is None:
            raise ValueError("CVAEGANTrainingStep: the batch has no target scan to train on.")
        self.forecaster.eval()
        with torch.no_grad():
            forecast = self.forecaster(history, **kwargs)
        context = _last_scan(history, kwargs.get("history_mask"))
        out = self.generator_step(forecast, context, target)
        with torch.no_grad():
            self.refiner.eval()
            pred = self.refiner(forecast, context)
        engine.state.output = {
            CommonKeys.IMAGE: history,
            CommonKeys.LABEL: target,
            CommonKeys.PRED: pred,
            CommonKeys.LOSS: out["loss"],
            **{k: out[k] for k in ("d_loss", "rec", "kl", "adv")},
        }
        return engine.state.output


def _repeat(context: torch.Tensor | None) -> torch.Tensor | None:
    return None if context is None else torch.cat([context, context])
