"""Condition encoder and fusion adapter of the latent diffusion twin.

EHRXDiff fuses a prior-image latent, image tokens and EHR tokens through a cross-attention adapter
for the denoiser. This version keeps that shape and fixes what the seed paper leaves out: every
event token carries its time before the target (days), the gap to the target is a token of its
own, and EHR codes are embedded from a fitted vocabulary (no text-embedding service).

Tokens (width ``context_dim``):

* image tokens -- the prior latent patchified by a strided convolution, plus a coordinate MLP as
  position code (works at any latent size);
* event tokens -- code embedding + MLP of (value, time, value x time, Fourier features of time);
* one static token (linear map of ``ehr_static``) and one gap token (Fourier features of the gap).

The :class:`FusionAdapter` lets ``num_queries`` learned queries cross-attend to all tokens with
a key-padding mask (padded events are invisible; MONAI's ``CrossAttentionBlock`` takes no mask,
so ``torch.nn.MultiheadAttention`` is used) followed by MONAI's ``MLPBlock``. Its output
``(B, num_queries, context_dim)`` is the ``context`` of MONAI's ``DiffusionModelUNet``.

Classifier-free guidance: rows flagged in ``drop_condition`` lose their clinical tokens (events,
static, gap); a learned null token stands in. The prior image is kept -- the unconditional model
is "this patient, no clinical context".
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["EHRTokenEncoder", "FusionAdapter", "ImageTokenEncoder", "TwinConditionEncoder", "fourier_features"]

#: Event times and gaps are divided by this (days) before entering the network.
DAYS_PER_UNIT = 365.25


def fourier_features(x: torch.Tensor, num_frequencies: int) -> torch.Tensor:
    """``sin``/``cos`` of ``x`` at octave frequencies: ``(...,)`` -> ``(..., 2 * num_frequencies)``."""
    freqs = (2.0 ** torch.arange(num_frequencies, device=x.device, dtype=x.dtype)) * math.pi / 4.0
    angles = x.unsqueeze(-1) * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)


def _check(name: str, value: torch.Tensor, ndim: int, batch: int | None = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}.")
    if batch is not None and value.shape[0] != batch:
        raise ValueError(f"{name} has batch size {value.shape[0]}, expected {batch}.")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or infinite values.")


class EHRTokenEncoder(nn.Module):
    """Event, static and gap tokens.

    Args:
        num_codes: vocabulary size (``EHRVocabulary.size``; index 0 = padding, 1 = unknown).
        static_dim: length of ``ehr_static`` (0 for none).
        dim: token width.
        num_frequencies: Fourier features of event times and of the gap.
    """

    def __init__(self, num_codes: int, static_dim: int, dim: int, num_frequencies: int = 6) -> None:
        super().__init__()
        if num_codes < 2:
            raise ValueError(f"num_codes must be >= 2 (padding and unknown), got {num_codes}.")
        if static_dim < 0:
            raise ValueError(f"static_dim must be >= 0, got {static_dim}.")
        self.num_codes, self.static_dim, self.num_frequencies = num_codes, static_dim, num_frequencies
        self.code = nn.Embedding(num_codes, dim, padding_idx=0)
        self.event = nn.Sequential(nn.Linear(3 + 2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.static = nn.Linear(max(static_dim, 1), dim)
        self.gap = nn.Sequential(nn.Linear(1 + 2 * num_frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(
        self,
        code: torch.Tensor,
        value: torch.Tensor,
        time: torch.Tensor,
        mask: torch.Tensor,
        static: torch.Tensor,
        gap: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            code: ``(B, N)`` int64 code indices; value: ``(B, N)``; time: ``(B, N)`` days relative to
            the target (negative); mask: ``(B, N)`` 1 = real event; static: ``(B, S)``; gap: ``(B,)`` days.

        Returns:
            event tokens ``(B, N, D)``, their mask ``(B, N)`` (bool, True = real), and the static
            and gap tokens ``(B, 2, D)``.
        """
        t = time / DAYS_PER_UNIT
        features = torch.cat(
            [
                value.unsqueeze(-1),
                t.unsqueeze(-1),
                (value * t).unsqueeze(-1),
                fourier_features(t, self.num_frequencies),
            ],
            dim=-1,
        )
        real = mask > 0
        events = (self.code(code.clamp(0, self.num_codes - 1)) + self.event(features)) * real.unsqueeze(-1)
        static_in = static if self.static_dim > 0 else torch.zeros_like(gap).unsqueeze(-1)
        g = (gap / DAYS_PER_UNIT).unsqueeze(-1)
        gap_token = self.gap(torch.cat([g, fourier_features(g.squeeze(-1), self.num_frequencies)], dim=-1))
        return events, real, torch.stack([self.static(static_in), gap_token], dim=1)


class ImageTokenEncoder(nn.Module):
    """The prior latent as tokens: strided-convolution patches plus a coordinate-MLP position code.

    Args:
        spatial_dims: 2 or 3.
        in_channels: latent channels.
        dim: token width.
        patch_size: patch side in latent voxels.
    """

    def __init__(self, spatial_dims: int, in_channels: int, dim: int, patch_size: int = 2) -> None:
        super().__init__()
        from monai.networks.layers import Conv

        self.spatial_dims = spatial_dims
        self.patch = Conv[Conv.CONV, spatial_dims](in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.position = nn.Sequential(nn.Linear(spatial_dims, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, P, D)`` with ``P`` the number of patches."""
        x = self.patch(latent)
        axes = [torch.linspace(-1.0, 1.0, s, device=x.device, dtype=x.dtype) for s in x.shape[2:]]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, self.spatial_dims)
        return x.flatten(2).transpose(1, 2) + self.position(coords).unsqueeze(0)


class FusionAdapter(nn.Module):
    """Learned queries that cross-attend to image and clinical tokens (pre-norm, residual).

    Args:
        dim: token width.
        num_queries: output tokens.
        num_heads: attention heads.
        num_layers: cross-attention + MLP layers.
    """

    def __init__(self, dim: int, num_queries: int = 8, num_heads: int = 4, num_layers: int = 2) -> None:
        super().__init__()
        from monai.networks.blocks import MLPBlock

        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.queries = nn.Parameter(torch.randn(1, num_queries, dim) * 0.02)
        self.norm_q = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.norm_kv = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.attn = nn.ModuleList(nn.MultiheadAttention(dim, num_heads, batch_first=True) for _ in range(num_layers))
        self.norm_mlp = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_layers))
        self.mlp = nn.ModuleList(MLPBlock(dim, 2 * dim, 0.0) for _ in range(num_layers))
        self.out = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, L, D)``, ``token_mask`` ``(B, L)`` bool (True = attend) -> ``(B, Q, D)``."""
        q = self.queries.expand(tokens.shape[0], -1, -1)
        padding = ~token_mask
        for norm_q, norm_kv, attn, norm_mlp, mlp in zip(self.norm_q, self.norm_kv, self.attn, self.norm_mlp, self.mlp):
            kv = norm_kv(tokens)
            q = q + attn(norm_q(q), kv, kv, key_padding_mask=padding, need_weights=False)[0]
            q = q + mlp(norm_mlp(q))
        return self.out(q)


class TwinConditionEncoder(nn.Module):
    """Prior latent + EHR tokens + static + gap -> the denoiser's cross-attention context ``(B, Q, D)``.

    Args:
        spatial_dims: 2 or 3.
        latent_channels: channels of the prior latent.
        num_codes: EHR vocabulary size (``EHRVocabulary.size``).
        static_dim: length of ``ehr_static``.
        context_dim: token width (the denoiser's ``cross_attention_dim``).
        num_queries, num_heads, num_layers: the :class:`FusionAdapter`.
        patch_size: image-token patch side in latent voxels.

    Example::

        encoder = TwinConditionEncoder(2, 4, num_codes=5, static_dim=3, context_dim=64)
        context = encoder(prior_latent, code, value, time, mask, static, gap)   # (B, 8, 64)
    """

    def __init__(
        self,
        spatial_dims: int,
        latent_channels: int,
        num_codes: int,
        static_dim: int,
        context_dim: int = 64,
        num_queries: int = 8,
        num_heads: int = 4,
        num_layers: int = 2,
        patch_size: int = 2,
    ) -> None:
        super().__init__()
        self.image = ImageTokenEncoder(spatial_dims, latent_channels, context_dim, patch_size)
        self.ehr = EHRTokenEncoder(num_codes, static_dim, context_dim)
        self.null = nn.Parameter(torch.randn(1, 2, context_dim) * 0.02)
        self.kind = nn.Parameter(torch.randn(4, context_dim) * 0.02)  # image / event / static / gap type codes
        self.adapter = FusionAdapter(context_dim, num_queries, num_heads, num_layers)
        self.static_dim = static_dim

    def forward(
        self,
        prior: torch.Tensor,
        ehr_tokens_code: torch.Tensor,
        ehr_tokens_value: torch.Tensor,
        ehr_tokens_time: torch.Tensor,
        ehr_tokens_mask: torch.Tensor,
        ehr_static: torch.Tensor,
        gap: torch.Tensor,
        drop_condition: Optional[torch.Tensor] = None,  # noqa: UP045 (TorchScript)
    ) -> torch.Tensor:
        b = prior.shape[0]
        for name, value, ndim in (
            ("ehr_tokens_code", ehr_tokens_code, 2),
            ("ehr_tokens_value", ehr_tokens_value, 2),
            ("ehr_tokens_time", ehr_tokens_time, 2),
            ("ehr_tokens_mask", ehr_tokens_mask, 2),
            ("ehr_static", ehr_static, 2),
            ("gap", gap, 1),
        ):
            _check(name, value, ndim, b)
        n = ehr_tokens_code.shape[1]
        for name, value in (("ehr_tokens_value", ehr_tokens_value), ("ehr_tokens_time", ehr_tokens_time)):
            if value.shape[1] != n:
                raise ValueError(f"{name} has {value.shape[1]} tokens, ehr_tokens_code has {n}.")
        if ehr_tokens_mask.shape[1] != n:
            raise ValueError(f"ehr_tokens_mask has {ehr_tokens_mask.shape[1]} tokens, ehr_tokens_code has {n}.")
        if ehr_static.shape[1] != self.static_dim:
            raise ValueError(f"ehr_static has length {ehr_static.shape[1]}, the encoder expects {self.static_dim}.")
        image = self.image(prior) + self.kind[0]
        events, real, clinical = self.ehr(
            ehr_tokens_code.long(), ehr_tokens_value, ehr_tokens_time, ehr_tokens_mask, ehr_static, gap
        )
        events = events + self.kind[1]
        clinical = clinical + self.kind[2:4]
        if drop_condition is not None:
            _check("drop_condition", drop_condition, 1, b)
            drop = drop_condition.bool()
            real = real & ~drop.unsqueeze(1)
            clinical = torch.where(drop.view(-1, 1, 1), self.null.expand(b, -1, -1), clinical)
        tokens = torch.cat([image, clinical, events], dim=1)
        keep = torch.cat([torch.ones(b, image.shape[1] + 2, dtype=torch.bool, device=prior.device), real], dim=1)
        return self.adapter(tokens, keep)
