"""Sampling the latent diffusion twin: forecasts with uncertainty maps and shared-noise what-ifs.

Built on MONAI's :class:`~monai.inferers.DiffusionInferer` and schedulers
(:class:`~monai.networks.schedulers.DDIMScheduler`, :class:`~monai.networks.schedulers.RFlowScheduler`,
``DDPMScheduler``). MONAI's inferers pass one ``condition`` tensor; the twin needs several (prior
latent as channels, event tokens, static, gap) and classifier-free guidance over the clinical
ones, so :class:`TwinDiffusionInferer` is a thin subclass whose calls forward keyword conditions.
:class:`LatentTwinInferer` adds the autoencoder (as MONAI's ``LatentDiffusionInferer`` does),
``N``-sample mean / per-voxel standard deviation, and what-if sampling where the recorded and the
edited events share every noise draw, so their difference is the effect of the edit alone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import DiffusionInferer

__all__ = [
    "DIFFUSION_CONDITION_KEYS",
    "DIFFUSION_OPTIONAL_KEYS",
    "LatentTwinInferer",
    "TwinDiffusionInferer",
    "UNCERTAINTY_SUMMARIES",
    "make_scheduler",
    "save_forecast_png",
    "summarise_uncertainty",
]

#: Batch keys the twin receives as keyword conditions (besides ``prior``).
DIFFUSION_CONDITION_KEYS = (
    "ehr_tokens_code",
    "ehr_tokens_value",
    "ehr_tokens_time",
    "ehr_tokens_mask",
    "ehr_static",
    "gap",
)

#: Optional keyword conditions, passed on when present: the features of the prior-scan -> target
#: interval (``LatentDiffusionTwin(interval_dim > 0)`` needs them; other twins ignore them).
DIFFUSION_OPTIONAL_KEYS = ("ehr_interval", "ehr_interval_mask")


def _condition_keys(conditions: Mapping[str, Any]) -> tuple[str, ...]:
    return DIFFUSION_CONDITION_KEYS + tuple(k for k in DIFFUSION_OPTIONAL_KEYS if k in conditions)


def make_scheduler(kind: str = "ddim", num_train_timesteps: int = 1000, **kwargs: Any):
    """A MONAI scheduler for the twin: ``"ddpm"``, ``"ddim"`` or ``"rflow"``.

    DDPM/DDIM use the ``scaled_linear_beta`` schedule of latent diffusion and no sample clipping
    (latents are not in [-1, 1]); RFlow uses MONAI's defaults with discrete timesteps. DDPM/DDIM take
    MONAI's ``prediction_type`` (``"epsilon"`` by default, ``"sample"`` -- the network predicts the
    clean diffusion variable, so an uncertain network falls back to the conditional mean change --
    or ``"v_prediction"``); training follows it (:class:`~monai_twin.engines.DiffusionTwinPrepareBatch`).
    """
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

    if kind == "rflow":
        kwargs.setdefault("use_discrete_timesteps", True)
        return RFlowScheduler(num_train_timesteps=num_train_timesteps, **kwargs)
    kwargs.setdefault("schedule", "scaled_linear_beta")
    kwargs.setdefault("beta_start", 0.0015)
    kwargs.setdefault("beta_end", 0.0195)
    kwargs.setdefault("clip_sample", False)
    if kind == "ddim":
        return DDIMScheduler(num_train_timesteps=num_train_timesteps, **kwargs)
    if kind == "ddpm":
        return DDPMScheduler(num_train_timesteps=num_train_timesteps, **kwargs)
    raise ValueError(f"scheduler kind must be 'ddpm', 'ddim' or 'rflow', got {kind!r}.")


def _is_rflow(scheduler: Any) -> bool:
    from monai.networks.schedulers import RFlowScheduler

    return isinstance(scheduler, RFlowScheduler)


def _progress(iterable, verbose: bool, desc: str):
    if not verbose:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False)


class TwinDiffusionInferer(DiffusionInferer):
    """MONAI's ``DiffusionInferer`` with keyword conditions and classifier-free guidance.

    ``__call__`` is the training forward pass (used by ``SupervisedTrainer`` with
    :class:`~monai_twin.engines.DiffusionTwinPrepareBatch`): noise ``inputs`` at ``timesteps`` and
    return ``diffusion_model(noisy, timesteps, **conditions)``. :meth:`sample` runs the reverse
    process in the diffusion variable's space.

    Args:
        scheduler: a MONAI scheduler (:func:`make_scheduler`).
    """

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        diffusion_model: torch.nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        condition: torch.Tensor | None = None,
        mode: str = "crossattn",
        seg: torch.Tensor | None = None,
        **conditions: torch.Tensor,
    ) -> torch.Tensor:
        if condition is not None or seg is not None:
            raise ValueError(
                "TwinDiffusionInferer takes keyword conditions (prior=, ehr_tokens_code=, ...), not condition=/seg=."
            )
        if noise.shape != inputs.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must match inputs {tuple(inputs.shape)}.")
        noisy = self.scheduler.add_noise(original_samples=inputs, noise=noise, timesteps=timesteps)
        return diffusion_model(noisy, timesteps, **conditions)

    @torch.no_grad()
    def sample(  # type: ignore[override]
        self,
        input_noise: torch.Tensor,
        diffusion_model: torch.nn.Module,
        scheduler: Any = None,
        save_intermediates: bool = False,
        intermediate_steps: int | None = None,
        conditioning: torch.Tensor | None = None,
        mode: str = "crossattn",
        verbose: bool = False,
        seg: torch.Tensor | None = None,
        cfg: float | None = None,
        cfg_fill_value: float = -1,
        *,
        prior: torch.Tensor | None = None,
        conditions: Mapping[str, torch.Tensor] | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        base: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Reverse diffusion from ``input_noise`` to the diffusion variable (a latent change or latent).

        Args:
            input_noise: ``(B, C, *spatial)`` starting noise (shared noise = shared ``input_noise``).
            diffusion_model: a :class:`~monai_twin.networks.diffusion.LatentDiffusionTwin`.
            scheduler: overrides the inferer's scheduler (e.g. RFlow instead of DDIM).
            prior: ``(B, C, *spatial)`` prior latent.
            conditions: the :data:`DIFFUSION_CONDITION_KEYS` tensors, batch ``B`` (and the
                :data:`DIFFUSION_OPTIONAL_KEYS` ones if the twin uses them).
            num_inference_steps: DDIM / RFlow steps.
            guidance_scale: classifier-free guidance ``w``: ``eps_u + w (eps_c - eps_u)``; 1 = conditional only.
            eta: DDIM's ``eta``: 0 (default) -- deterministic steps, the only randomness is
                ``input_noise``; ``> 0`` -- every step adds fresh noise of standard deviation
                ``eta * sigma_t`` (1 = DDPM's posterior variance). DDIM schedulers only.
            generator: draws that step noise (the same seeded generator = the same step noise).
            base: ``(B, C, *spatial)`` latent of a base forecast, for a twin with ``base_forecast=True``.
            verbose: tqdm progress bar over the steps.

        The positional arguments of MONAI's ``DiffusionInferer.sample`` that do not apply
        (``conditioning``, ``seg``, ``cfg``, intermediates) must stay at their defaults.
        """
        if conditioning is not None or seg is not None or cfg is not None or save_intermediates:
            raise ValueError("TwinDiffusionInferer.sample takes prior= and conditions=, not conditioning/seg/cfg.")
        if prior is None:
            raise ValueError("TwinDiffusionInferer.sample: prior= (the prior latent) is required.")
        if conditions is None:
            raise ValueError(
                f"TwinDiffusionInferer.sample: conditions= with keys {DIFFUSION_CONDITION_KEYS} is required."
            )
        missing = [k for k in DIFFUSION_CONDITION_KEYS if k not in conditions]
        if missing:
            raise KeyError(f"TwinDiffusionInferer.sample: conditions is missing {missing}.")
        if input_noise.shape != prior.shape:
            raise ValueError(f"input_noise {tuple(input_noise.shape)} must match prior {tuple(prior.shape)}.")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale}.")
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        scheduler = scheduler or self.scheduler
        if eta > 0:
            from monai.networks.schedulers import DDIMScheduler

            if not isinstance(scheduler, DDIMScheduler):
                raise ValueError(f"eta > 0 needs a DDIM scheduler, got {type(scheduler).__name__}.")
        b = prior.shape[0]
        cond = {k: conditions[k] for k in _condition_keys(conditions)}
        context = diffusion_model.encode_condition(prior, **cond)
        guided = guidance_scale != 1.0
        if guided:
            drop = torch.ones(b, device=prior.device)
            context = torch.cat([context, diffusion_model.encode_condition(prior, **cond, drop_condition=drop)])
            prior_in = torch.cat([prior, prior])
            base_in = None if base is None else torch.cat([base, base])
        else:
            prior_in, base_in = prior, base
        extra = {} if base_in is None else {"base": base_in}
        if _is_rflow(scheduler):
            scheduler.set_timesteps(
                num_inference_steps, device=prior.device, input_img_size_numel=int(prior[0, 0].numel())
            )
        else:
            scheduler.set_timesteps(num_inference_steps, device=prior.device)
        timesteps = scheduler.timesteps
        next_timesteps = torch.cat([timesteps[1:], torch.zeros_like(timesteps[:1])])
        x = input_noise
        for t, t_next in _progress(list(zip(timesteps, next_timesteps)), verbose, "sampling"):
            x_in = torch.cat([x, x]) if guided else x
            t_batch = torch.full((x_in.shape[0],), int(t), device=x.device, dtype=torch.long)
            out = diffusion_model(x_in, t_batch, prior=prior_in, context=context, **extra)
            if guided:
                out_c, out_u = out.chunk(2)
                out = out_u + guidance_scale * (out_c - out_u)
            if _is_rflow(scheduler):
                x, _ = scheduler.step(out, int(t), x, int(t_next))
            elif eta > 0:
                x, _ = scheduler.step(out, int(t), x, eta=eta, generator=generator)
            else:
                x, _ = scheduler.step(out, int(t), x)
        return x


class LatentTwinInferer(TwinDiffusionInferer):
    """Forecast images (mean + per-voxel std over ``N`` samples) and what-ifs with shared noise.

    Args:
        scheduler: a MONAI scheduler (:func:`make_scheduler`).
        autoencoder: a trained ``AutoencoderKL``; ``None`` for a pixel-space twin (the image is the latent).
        scale_factor: latent scaling of latent diffusion (``z = scale_factor * z_mu``).
        residual_decode: decode as ``prior_image + D(z_pred) - D(z_prior)`` -- the autoencoder's
            reconstruction error of the prior cancels, so unchanged anatomy keeps the prior's detail.
        change_threshold: with ``residual_decode``, voxels where the forecast's mean change
            (mean over samples of ``D(z_pred) - D(z_prior)``) is at most this (image units) keep the
            prior in ``mean``. A local latent change moves the whole decoded image a little (the
            decoder's group norms pool statistics over the image): a faint halo of a few thousandths
            that, summed over a region, outweighs a lesion-boundary move. ``samples`` and ``std``
            stay the raw draws (the spread is an uncertainty, not a forecast). ``0`` keeps every change.
        num_inference_steps: default sampling steps.
        guidance_scale: default classifier-free guidance scale.
        eta: default DDIM ``eta`` (0: deterministic steps; ``> 0``: fresh noise at every step,
            drawn from a second stream seeded by ``seed``, so a what-if still shares every draw).

    With a twin built with ``base_forecast=True``, :meth:`forecast` and :meth:`what_if` take the
    image of a deterministic base forecast of the same target (``base_image=``, e.g. the ConvLSTM
    twin's prediction): the samples decode as ``base + D(z) - D(z_base)`` and ``change_threshold``
    floors the mean change from the base (the base forecast itself is kept as it is).

    Example::

        inferer = LatentTwinInferer(make_scheduler("ddim"), autoencoder, scale_factor=1.0)
        out = inferer.forecast(prior_image, twin, conditions, n_samples=8, seed=0)
        out["mean"], out["std"]           # (B, C, *spatial) each
    """

    def __init__(
        self,
        scheduler: Any,
        autoencoder: torch.nn.Module | None = None,
        scale_factor: float = 1.0,
        residual_decode: bool = True,
        num_inference_steps: int = 25,
        guidance_scale: float = 1.0,
        change_threshold: float = 0.0,
        eta: float = 0.0,
    ) -> None:
        super().__init__(scheduler)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}.")
        self.eta = float(eta)
        if scale_factor <= 0:
            raise ValueError(f"scale_factor must be > 0, got {scale_factor}.")
        if change_threshold < 0:
            raise ValueError(f"change_threshold must be >= 0, got {change_threshold}.")
        self.change_threshold = float(change_threshold)
        self.autoencoder, self.scale_factor = autoencoder, float(scale_factor)
        self.residual_decode = residual_decode
        self.num_inference_steps, self.guidance_scale = int(num_inference_steps), float(guidance_scale)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image ``(B, C, *spatial)`` -> scaled latent (the mean of ``AutoencoderKL``'s posterior)."""
        if self.autoencoder is None:
            return image
        z_mu, _ = self.autoencoder.encode(image)
        return z_mu * self.scale_factor

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if self.autoencoder is None:
            return latent
        return self.autoencoder.decode(latent / self.scale_factor)

    @torch.no_grad()
    def forecast(
        self,
        prior_image: torch.Tensor,
        diffusion_model: torch.nn.Module,
        conditions: Mapping[str, torch.Tensor],
        n_samples: int = 8,
        seed: int | None = 0,
        noise: torch.Tensor | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        scheduler: Any = None,
        verbose: bool = False,
        eta: float | None = None,
        base_image: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``n_samples`` forecasts per item, their mean and per-voxel standard deviation.

        Args:
            prior_image: ``(B, C, *spatial)`` the last prior scan, in the target's frame.
            diffusion_model: the trained :class:`~monai_twin.networks.diffusion.LatentDiffusionTwin`.
            conditions: the :data:`DIFFUSION_CONDITION_KEYS` tensors for the ``B`` items (and the
                :data:`DIFFUSION_OPTIONAL_KEYS` ones if the twin uses them).
            n_samples: samples per item.
            seed: seeds the noise (same seed = same noise, the basis of shared-noise what-ifs).
            noise: explicit starting noise ``(n_samples, B, C, *latent_spatial)``; overrides ``seed``
                for the starting noise (with ``eta > 0`` the step noise still follows ``seed``).
            eta: overrides the inferer's DDIM ``eta``.
            base_image: ``(B, C, *spatial)`` a deterministic forecast of the same target, in the
                target's frame (required by a twin with ``base_forecast=True``, refused otherwise).

        Returns:
            ``samples`` ``(n_samples, B, C, *spatial)``, ``mean`` and ``std`` ``(B, C, *spatial)``,
            and ``noise`` (what was used, to share with an edited run).
        """
        if not isinstance(prior_image, torch.Tensor):
            raise TypeError(f"prior_image must be a torch.Tensor, got {type(prior_image).__name__}.")
        if not bool(torch.isfinite(prior_image).all()):
            raise ValueError("prior_image contains NaN or infinite values.")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}.")
        missing = [k for k in DIFFUSION_CONDITION_KEYS if k not in conditions]
        if missing:
            raise KeyError(f"LatentTwinInferer.forecast: conditions is missing {missing}.")
        b = prior_image.shape[0]
        keys = _condition_keys(conditions)
        for key in keys:
            if conditions[key].shape[0] != b:
                raise ValueError(f"conditions[{key!r}] has batch size {conditions[key].shape[0]}, prior_image has {b}.")
        uses_base = bool(getattr(diffusion_model, "base_forecast", False))
        if uses_base != (base_image is not None):
            raise ValueError(
                "base_image= is required by a twin with base_forecast=True and refused by other twins "
                f"(this twin: base_forecast={uses_base})."
            )
        if base_image is not None and base_image.shape != prior_image.shape:
            raise ValueError(f"base_image {tuple(base_image.shape)} must match prior_image {tuple(prior_image.shape)}.")
        prior = self.encode(prior_image)
        base = None if base_image is None else self.encode(base_image)
        if noise is None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            noise = torch.randn((n_samples, *prior.shape), generator=generator).to(prior)
        elif tuple(noise.shape) != (n_samples, *prior.shape):
            raise ValueError(f"noise must have shape {(n_samples, *prior.shape)}, got {tuple(noise.shape)}.")
        eta = self.eta if eta is None else float(eta)
        # the step noise (eta > 0) comes from its own stream, so that it does not depend on whether
        # the starting noise was drawn here or passed in (what_if passes it)
        step_generator = torch.Generator().manual_seed(int(seed) + 1_000_003) if eta > 0 and seed is not None else None
        # all samples in one batch: (n_samples * B, ...)
        rep = lambda t: t.repeat(n_samples, *([1] * (t.ndim - 1)))  # noqa: E731
        x = self.sample(
            noise.reshape(-1, *prior.shape[1:]),
            diffusion_model,
            scheduler,
            verbose=verbose,
            prior=rep(prior),
            conditions={k: rep(conditions[k]) for k in keys},
            num_inference_steps=num_inference_steps or self.num_inference_steps,
            guidance_scale=self.guidance_scale if guidance_scale is None else guidance_scale,
            eta=eta,
            generator=step_generator,
            base=None if base is None else rep(base),
        )
        latent = diffusion_model.from_diffusion(x, rep(prior), None if base is None else rep(base))
        images = self.decode(latent)
        residual = self.residual_decode and self.autoencoder is not None
        # the reference the decoded change is added to: the prior scan, or the base forecast
        ref_image, ref = (prior_image, prior) if base is None else (base_image, base)
        if residual:
            images = rep(ref_image) + images - self.decode(rep(ref))
        samples = images.reshape(n_samples, *prior_image.shape)
        std = samples.std(0, unbiased=True) if n_samples > 1 else torch.zeros_like(samples[0])
        mean = samples.mean(0)
        if residual and self.change_threshold > 0:
            change = mean - ref_image
            mean = ref_image + torch.where(change.abs() > self.change_threshold, change, torch.zeros_like(change))
        return {"samples": samples, "mean": mean, "std": std, "noise": noise}

    @torch.no_grad()
    def what_if(
        self,
        prior_image: torch.Tensor,
        diffusion_model: torch.nn.Module,
        conditions: Mapping[str, torch.Tensor],
        edited_conditions: Mapping[str, torch.Tensor],
        n_samples: int = 8,
        seed: int | None = 0,
        base_image: torch.Tensor | None = None,
        edited_base_image: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, torch.Tensor]:
        """Forecast under the recorded and the edited conditions with the *same* noise.

        Args:
            prior_image: ``(B, C, *spatial)`` the last prior scan.
            diffusion_model: the trained twin.
            conditions: the recorded conditions (as :meth:`forecast`).
            edited_conditions: the same keys under the edited events.
            n_samples: samples per item.
            seed: seeds the shared noise.
            base_image: the base forecast under the recorded events (twins with ``base_forecast=True``).
            edited_base_image: the base forecast under the edited events (default: ``base_image``).
            kwargs: further :meth:`forecast` arguments.

        Returns:
            ``baseline`` and ``counterfactual`` (sample means), ``difference`` (their difference,
            ``(B, C, *spatial)``), ``baseline_std``, ``counterfactual_std`` and ``difference_std``
            (per-voxel std of the paired differences). Unchanged conditions give exactly zero.
            ``save_what_if_png`` (:mod:`monai_twin.inferers.whatif`) draws it.
        """
        eta = self.eta if kwargs.get("eta") is None else float(kwargs["eta"])
        if eta > 0 and seed is None:
            raise ValueError("what_if with eta > 0 needs a seed (the step noise must be shared).")
        if edited_base_image is None:
            edited_base_image = base_image
        base = self.forecast(prior_image, diffusion_model, conditions, n_samples, seed, base_image=base_image, **kwargs)
        kwargs.pop("noise", None)
        edit = self.forecast(
            prior_image,
            diffusion_model,
            edited_conditions,
            n_samples,
            seed,
            noise=base["noise"],
            base_image=edited_base_image,
            **kwargs,
        )
        paired = edit["samples"] - base["samples"]
        return {
            "baseline": base["mean"],
            "counterfactual": edit["mean"],
            "difference": edit["mean"] - base["mean"],
            "baseline_std": base["std"],
            "counterfactual_std": edit["std"],
            "difference_std": paired.std(0) if n_samples > 1 else torch.zeros_like(paired[0]),
        }


#: The ways :func:`summarise_uncertainty` turns a per-voxel std map into one number per item.
UNCERTAINTY_SUMMARIES = ("image", "top5", "change", "image+history")


def summarise_uncertainty(
    std: torch.Tensor,
    summary: str = "image",
    *,
    prior: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    base_std: torch.Tensor | None = None,
    floor: float = 0.02,
) -> torch.Tensor:
    """One uncertainty number per item from the per-voxel std of its samples (``forecast()["std"]``).

    Args:
        std: ``(B, C, *spatial)`` per-voxel standard deviation of the samples.
        summary: ``"image"``: the mean over the image; ``"top5"``: the mean of its largest 5 % (where
            the samples disagree most); ``"change"``: the mean of ``std`` where the forecast moves,
            i.e. where ``|base - prior| > floor`` (zero elsewhere; divided by the whole image size, so
            an item with little predicted change scores low); ``"image+history"``: the mean of
            ``sqrt(std**2 + base_std**2)``, adding the deterministic base forecaster's own spread
            (e.g. the ConvLSTM twin's forecasts from its 1..4 most recent prior scans), as the
            variance of two independent error sources.
        prior, base: the prior image and the base forecast (``"change"``).
        base_std: the base forecaster's per-voxel spread, the shape of ``std`` (``"image+history"``).
        floor: the change that counts as a move (image units; ``"change"``).

    Returns:
        ``(B,)`` tensor.
    """
    if summary not in UNCERTAINTY_SUMMARIES:
        raise ValueError(f"summary must be one of {UNCERTAINTY_SUMMARIES}, got {summary!r}.")
    flat = std.flatten(1)
    if summary == "image":
        return flat.mean(1)
    if summary == "top5":
        k = max(1, int(round(0.05 * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(1)
    if summary == "change":
        if prior is None or base is None:
            raise ValueError("summary='change' needs prior= and base=.")
        moved = ((base - prior).abs() > floor).to(std.dtype)
        return (std * moved).flatten(1).mean(1)
    if base_std is None:
        raise ValueError("summary='image+history' needs base_std=.")
    if base_std.shape != std.shape:
        raise ValueError(f"base_std {tuple(base_std.shape)} and std {tuple(std.shape)} must have the same shape.")
    return (std**2 + base_std**2).sqrt().flatten(1).mean(1)


def save_forecast_png(
    result: Mapping[str, Any],
    path: str | os.PathLike,
    prior: Any = None,
    target: Any = None,
    title: str = "forecast",
) -> Path:
    """Prior (optional), forecast mean, per-voxel std and target (optional) side by side (3D: middle slice).

    Args:
        result: a :meth:`LatentTwinInferer.forecast` output (one item: batch element 0 is drawn).
        path: the PNG to write (written to a temporary name, then renamed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_output_path
    from ..visualize.timeline import middle_slice

    for key in ("mean", "std"):
        if key not in result:
            raise KeyError(f"save_forecast_png: result has no {key!r} (keys: {sorted(result)}).")

    def first(x: Any) -> np.ndarray:
        a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        while a.ndim > 3 or (a.ndim == 3 and a.shape[0] == 1):
            a = a[0]
        return middle_slice(a)

    panels = [("prior", prior, "gray"), ("forecast (mean)", result["mean"], "gray")]
    panels += [("uncertainty (std)", result["std"], "magma"), ("target", target, "gray")]
    panels = [(n, first(v), c) for n, v, c in panels if v is not None]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, (name, image, cmap) in zip(np.atleast_1d(axes), panels):
        shown = ax.imshow(np.rot90(image), cmap=cmap, **({} if cmap != "gray" else {"vmin": 0.0, "vmax": 1.0}))
        if cmap != "gray":
            fig.colorbar(shown, ax=ax, fraction=0.046)
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
