"""The denoiser of the latent diffusion twin: MONAI's ``DiffusionModelUNet`` with the twin's conditions.

Built on :class:`monai.networks.nets.DiffusionModelUNet` (time embedding, residual blocks, spatial
transformers with cross-attention); this module adds what a forecasting twin needs around it:

* the prior latent is concatenated to the noisy latent as channels (structure: "this patient");
* :class:`~monai_twin.networks.diffusion.TwinConditionEncoder` turns the prior latent, the timed
  EHR event tokens, the static attributes and the gap to the target into the cross-attention
  context (clinical context: "what happened since, and how long until the target");
* optionally (``interval_dim > 0``) the EHR features of the interval from the prior scan to the
  target (``EHRToIntervalFeaturesd`` on that one interval: drug exposure = dose x days, counts,
  last values, days since; with their mask, the static attributes and the gap) are embedded by the
  project's :class:`~monai_twin.networks.blocks.EHREncoder` (the ConvLSTM twin's FiLM input) and
  *added to the UNet's timestep embedding*, so every residual block of the denoiser receives the
  treatment dose directly (a per-channel shift), not only through the cross-attention bottleneck;
  the same embedding is also appended to the cross-attention context as one more token;
* ``drop_condition`` removes the clinical context per row (classifier-free guidance);
* the diffusion variable is either the target latent (``residual_scale = 0``) or the change
  ``(z_target - z_prior) / residual_scale`` -- the default, because most of a follow-up scan is
  the prior scan and a small change is what must be learned;
* optionally (``base_forecast=True``) the diffusion is *residual on a deterministic forecast*: a
  base forecast of the same target (e.g. the ConvLSTM twin's, :class:`~monai_twin.networks.TwinForecaster`)
  is encoded to a latent ``z_base``, concatenated as further channels, and the diffusion variable
  becomes ``(z_target - z_base) / residual_scale``. The prior latent and the EHR tokens stay in the
  condition; the samples then spread around the base forecast (what it gets wrong), and the
  inferer decodes ``base + D(z) - D(z_base)``.

The same class works in pixel space (``latent_channels`` = image channels, the "latent" is the
image), which is how the benchmark compares latent and pixel-space sampling speed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from .condition import TwinConditionEncoder, _check

__all__ = ["INTERVAL_CONDITION_KEYS", "LatentDiffusionTwin"]

#: Optional condition keys: the EHR features of the prior-scan -> target interval and their mask.
INTERVAL_CONDITION_KEYS = ("ehr_interval", "ehr_interval_mask")


class _TimeEmbeddingPlus(nn.Module):
    """MONAI ``DiffusionModelUNet.time_embed`` plus an additive per-row embedding set for one call."""

    def __init__(self, time_embed: nn.Module) -> None:
        super().__init__()
        self.time_embed = time_embed
        self.extra: Optional[torch.Tensor] = None  # noqa: UP045

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t_emb)
        return emb if self.extra is None else emb + self.extra.to(emb.dtype)


class LatentDiffusionTwin(nn.Module):
    """Noise (or velocity) prediction for a future latent given the prior latent and the EHR.

    Args:
        spatial_dims: 2 or 3.
        latent_channels: channels of the (prior and target) latent.
        num_codes: EHR vocabulary size (``EHRVocabulary.size``).
        static_dim: length of ``ehr_static``.
        channels: ``DiffusionModelUNet`` channels per level.
        attention_levels: levels with (cross-)attention.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head in the UNet.
        norm_num_groups: group-norm groups of the UNet.
        context_dim: width of the condition tokens (the UNet's ``cross_attention_dim``).
        num_queries, adapter_heads, adapter_layers, patch_size: the condition encoder's adapter.
        residual_scale: ``> 0`` -- diffuse the change ``(z_target - z_prior) / residual_scale``;
            ``0`` -- diffuse the target latent itself. Kept as a buffer so checkpoints carry it.
        interval_dim: ``F`` of ``ehr_interval`` (the interval features of the prior-scan -> target
            interval, see :func:`~monai_twin.engines.twin_conditions`); ``0`` (default) -- no
            interval path, the EHR reaches the denoiser through cross-attention only.
        base_forecast: ``True`` -- the twin also takes ``base=`` (the latent of a deterministic
            forecast of the same target) as input channels and diffuses ``(z_target - z_base) / residual_scale``;
            ``False`` (default) -- the change from the prior latent.

    Example::

        net = LatentDiffusionTwin(2, latent_channels=4, num_codes=6, static_dim=3)
        eps = net(noisy, timesteps, prior=prior_latent, ehr_tokens_code=code, ehr_tokens_value=value,
                  ehr_tokens_time=time, ehr_tokens_mask=mask, ehr_static=static, gap=gap)
    """

    def __init__(
        self,
        spatial_dims: int,
        latent_channels: int,
        num_codes: int,
        static_dim: int,
        channels: Sequence[int] = (32, 64),
        attention_levels: Sequence[bool] = (False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 16,
        norm_num_groups: int = 8,
        context_dim: int = 64,
        num_queries: int = 8,
        adapter_heads: int = 4,
        adapter_layers: int = 2,
        patch_size: int = 2,
        residual_scale: float = 1.0,
        interval_dim: int = 0,
        base_forecast: bool = False,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DiffusionModelUNet

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {latent_channels}.")
        if residual_scale < 0:
            raise ValueError(f"residual_scale must be >= 0 (0 = diffuse the target itself), got {residual_scale}.")
        if interval_dim < 0:
            raise ValueError(f"interval_dim must be >= 0, got {interval_dim}.")
        self.spatial_dims, self.latent_channels = spatial_dims, latent_channels
        self.base_forecast = bool(base_forecast)
        self.interval_dim, self.static_dim, self.context_dim = int(interval_dim), int(static_dim), int(context_dim)
        self.condition = TwinConditionEncoder(
            spatial_dims,
            latent_channels,
            num_codes,
            static_dim,
            context_dim=context_dim,
            num_queries=num_queries,
            num_heads=adapter_heads,
            num_layers=adapter_layers,
            patch_size=patch_size,
        )
        self.denoiser = DiffusionModelUNet(
            spatial_dims=spatial_dims,
            in_channels=(3 if self.base_forecast else 2) * latent_channels,
            out_channels=latent_channels,
            num_res_blocks=num_res_blocks,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            norm_num_groups=norm_num_groups,
            num_head_channels=num_head_channels,
            with_conditioning=True,
            cross_attention_dim=context_dim,
        )
        self.register_buffer("residual_scale", torch.tensor(float(residual_scale)))
        if self.interval_dim > 0:
            from ..blocks.ehr_encoder import EHREncoder

            time_embed_dim = 4 * int(channels[0])  # DiffusionModelUNet's timestep-embedding width
            self.interval = EHREncoder(self.interval_dim, static_dim, context_dim, hidden=2 * context_dim)
            self.interval_null = nn.Parameter(torch.zeros(1, 1, context_dim))
            self.interval_to_time = nn.Sequential(nn.SiLU(), nn.Linear(context_dim, time_embed_dim))
            self.denoiser.time_embed = _TimeEmbeddingPlus(self.denoiser.time_embed)

    # ---------------------------------------------------------------------------------------------
    # diffusion variable <-> target latent

    def to_diffusion(
        self,
        target: torch.Tensor,
        prior: torch.Tensor,
        base: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """Target latent -> the variable the model diffuses (the scaled change from ``base`` if given,
        else from ``prior``, or the target itself when ``residual_scale`` is 0)."""
        s = float(self.residual_scale)
        reference = prior if base is None else base
        return (target - reference) / s if s > 0 else target

    def from_diffusion(
        self,
        x: torch.Tensor,
        prior: torch.Tensor,
        base: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """Inverse of :meth:`to_diffusion`."""
        s = float(self.residual_scale)
        reference = prior if base is None else base
        return reference + s * x if s > 0 else x

    # ---------------------------------------------------------------------------------------------

    def encode_condition(
        self,
        prior: torch.Tensor,
        ehr_tokens_code: torch.Tensor,
        ehr_tokens_value: torch.Tensor,
        ehr_tokens_time: torch.Tensor,
        ehr_tokens_mask: torch.Tensor,
        ehr_static: torch.Tensor,
        gap: torch.Tensor,
        drop_condition: Optional[torch.Tensor] = None,  # noqa: UP045 (TorchScript)
        ehr_interval: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_interval_mask: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """The condition context ``(B, Q, context_dim)`` (``Q + 1`` tokens with the interval path,
        whose embedding is the last token); computed once per sampling run."""
        self._check_prior(prior)
        context = self.condition(
            prior, ehr_tokens_code, ehr_tokens_value, ehr_tokens_time, ehr_tokens_mask, ehr_static, gap, drop_condition
        )
        if self.interval_dim == 0:
            return context
        b = prior.shape[0]
        if ehr_interval is None:
            raise ValueError(f"LatentDiffusionTwin(interval_dim={self.interval_dim}) needs ehr_interval (B, F).")
        _check("ehr_interval", ehr_interval, 2, b)
        if ehr_interval.shape[1] != self.interval_dim:
            raise ValueError(f"ehr_interval has {ehr_interval.shape[1]} features, expected {self.interval_dim}.")
        mask = torch.ones_like(ehr_interval) if ehr_interval_mask is None else ehr_interval_mask.to(ehr_interval)
        if mask.shape != ehr_interval.shape:
            raise ValueError(
                f"ehr_interval_mask {tuple(mask.shape)} must match ehr_interval {tuple(ehr_interval.shape)}."
            )
        token = self.interval(
            gap.view(b, 1).to(ehr_interval),
            ehr_interval.unsqueeze(1),
            mask.unsqueeze(1),
            ehr_static.to(ehr_interval) if self.static_dim > 0 else None,
        )
        if drop_condition is not None:
            token = torch.where(drop_condition.bool().view(-1, 1, 1), self.interval_null.expand(b, -1, -1), token)
        return torch.cat([context, token.to(context)], dim=1)

    def _check_prior(self, prior: torch.Tensor) -> None:
        _check("prior", prior, self.spatial_dims + 2)
        if prior.shape[1] != self.latent_channels:
            raise ValueError(f"prior has {prior.shape[1]} channels, expected latent_channels={self.latent_channels}.")

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        prior: torch.Tensor,
        ehr_tokens_code: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_tokens_value: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_tokens_time: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_tokens_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_static: Optional[torch.Tensor] = None,  # noqa: UP045
        gap: Optional[torch.Tensor] = None,  # noqa: UP045
        drop_condition: Optional[torch.Tensor] = None,  # noqa: UP045
        context: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_interval: Optional[torch.Tensor] = None,  # noqa: UP045
        ehr_interval_mask: Optional[torch.Tensor] = None,  # noqa: UP045
        base: Optional[torch.Tensor] = None,  # noqa: UP045
    ) -> torch.Tensor:
        """
        Args:
            x: noisy diffusion variable ``(B, C, *spatial)`` (``C = latent_channels``).
            timesteps: ``(B,)`` scheduler timesteps.
            prior: prior latent ``(B, C, *spatial)``.
            ehr_tokens_code, ehr_tokens_value, ehr_tokens_time, ehr_tokens_mask: ``(B, N)`` event
                tokens (``EHRToEventTokensd``; time in days relative to the target).
            ehr_static: ``(B, S)``; gap: ``(B,)`` days from the prior scan to the target.
            drop_condition: ``(B,)`` 1 = drop the clinical context (classifier-free guidance).
            context: a precomputed :meth:`encode_condition` output; the EHR arguments are then unused.
            ehr_interval, ehr_interval_mask: ``(B, F)`` interval features and mask (``interval_dim > 0``).
            base: ``(B, C, *spatial)`` latent of the base forecast (``base_forecast=True`` only).

        Returns:
            the model output ``(B, C, *spatial)`` (noise for DDPM/DDIM, velocity for RFlow).
        """
        _check("x", x, self.spatial_dims + 2)
        self._check_prior(prior)
        if prior.shape != x.shape:
            raise ValueError(f"prior {tuple(prior.shape)} and x {tuple(x.shape)} must have the same shape.")
        _check("timesteps", timesteps, 1, x.shape[0])
        if self.base_forecast:
            if base is None:
                raise ValueError("LatentDiffusionTwin(base_forecast=True) needs base= (the base forecast's latent).")
            if base.shape != x.shape:
                raise ValueError(f"base {tuple(base.shape)} and x {tuple(x.shape)} must have the same shape.")
            inputs = torch.cat([x, prior, base], dim=1)
        elif base is not None:
            raise ValueError("base= was given but the twin was built with base_forecast=False.")
        else:
            inputs = torch.cat([x, prior], dim=1)
        if context is None:
            missing = [
                name
                for name, value in (
                    ("ehr_tokens_code", ehr_tokens_code),
                    ("ehr_tokens_value", ehr_tokens_value),
                    ("ehr_tokens_time", ehr_tokens_time),
                    ("ehr_tokens_mask", ehr_tokens_mask),
                    ("ehr_static", ehr_static),
                    ("gap", gap),
                )
                if value is None
            ]
            if missing:
                raise ValueError(f"LatentDiffusionTwin: missing condition(s) {missing} (or pass context=).")
            assert ehr_tokens_code is not None and ehr_tokens_value is not None and ehr_tokens_time is not None
            assert ehr_tokens_mask is not None and ehr_static is not None and gap is not None
            context = self.encode_condition(
                prior,
                ehr_tokens_code,
                ehr_tokens_value,
                ehr_tokens_time,
                ehr_tokens_mask,
                ehr_static,
                gap,
                drop_condition,
                ehr_interval,
                ehr_interval_mask,
            )
        elif context.shape[0] != x.shape[0]:
            raise ValueError(f"context has batch size {context.shape[0]}, x has {x.shape[0]}.")
        if self.interval_dim == 0:
            return self.denoiser(inputs, timesteps, context=context)
        time_embed = self.denoiser.time_embed
        assert isinstance(time_embed, _TimeEmbeddingPlus)
        time_embed.extra = self.interval_to_time(context[:, -1])
        try:
            return self.denoiser(inputs, timesteps, context=context)
        finally:
            time_embed.extra = None
