"""``ViViTTwin``: earlier scans + EHR -> the next scan at a chosen date (+ future EHR values), with
factorised space-time attention (ViViT, Arnab et al. 2021, "factorised self-attention").

Each prior scan is cut into patch tokens; every frame gets one *global token* carrying that
visit's EHR embedding (the interval after the visit, the last one reaching the target date) and
its time to the target, much as ViT's class token summarises an image. One extra frame stands for
the target date: learned query tokens plus a *static/gap token* (static attributes and the gap from
the last visit). Each layer attends within every frame (spatial attention over its patches and
global token), then across frames at every token position (temporal attention, padded visits
masked out as keys). The target frame's tokens are decoded, with skip features from the last scan,
to the **change** from the last scan; the last layer starts at zero, so an untrained model
forecasts copy-last, exactly like :class:`TwinForecaster`. An MLP on the target's global token
predicts the future EHR values.

Built on MONAI's :class:`~monai.networks.blocks.PatchEmbeddingBlock` (patch tokens + spatial
position embedding), :class:`~monai.networks.blocks.TransformerBlock` (both attention stages) and
``Convolution``/``UpSample`` (decoder), and this package's :class:`EHREncoder`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution, PatchEmbeddingBlock, TransformerBlock, UpSample
from monai.utils import ensure_tuple_rep
from torch import nn

from ..blocks.ehr_encoder import EHREncoder
from .forecast_inputs import check_forecast_inputs, future_ehr_head, last_visit_index

__all__ = ["VIVIT_CONDITIONING", "ViViTTwin"]

#: How EHR reaches the ViViT twin: as per-frame global tokens, or not at all (times still do).
VIVIT_CONDITIONING = ("tokens", "none")


class _SkipUp(nn.Module):
    """Upsample by 2, concatenate the skip features, convolve."""

    def __init__(self, spatial_dims: int, channels: int, act: str | tuple, norm: str | tuple) -> None:
        super().__init__()
        self.up = UpSample(spatial_dims, channels, channels, scale_factor=2, mode="deconv")
        self.conv = Convolution(spatial_dims, 2 * channels, channels, act=act, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class ViViTTwin(nn.Module):
    """ViViT twin with per-frame EHR global tokens; same call signature as :class:`TwinForecaster`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each scan.
        img_size: spatial size of the scans (fixed: the spatial position embedding is per patch).
        out_channels: channels of the forecast (default ``in_channels``; must equal it when
            ``residual``).
        patch_size: patch side (int or one per dim), a power of two dividing ``img_size``.
        hidden_size: token size (a multiple of 4 in 2D and of 6 in 3D for ``"sincos"`` positions).
        mlp_dim: width of each transformer MLP.
        num_heads: attention heads (must divide ``hidden_size``).
        num_layers: factorised layers, each one spatial and one temporal ``TransformerBlock``.
        decoder_channels: channels of the decoder and of the last-scan skip features.
        ehr_interval_dim: ``F`` of ``ehr_intervals`` (0: none).
        ehr_static_dim: ``S`` of ``ehr_static`` (0: none).
        ehr_embed_dim: per-time EHR embedding size.
        conditioning: ``"tokens"`` (EHR in the global tokens) or ``"none"`` (the global tokens carry
            only the times, so the gaps are still seen).
        future_ehr_dim: ``K`` values predicted by the future-EHR head (0: no head).
        max_history: most prior visits accepted.
        time_scale: days per time unit for the time embeddings (a year by default).
        residual: predict the change from the last scan (recommended) instead of the scan.
        pos_embed_type: spatial position embedding of ``PatchEmbeddingBlock`` (``"sincos"``,
            ``"learnable"``, ...).
        dropout_rate: dropout in the transformer.
        act, norm: MONAI layer factory names for the decoder blocks.
        future_ehr_base: for each future value, the index of an ``ehr_intervals`` feature holding
            its last known value; the EHR head then predicts the change from it (untrained: LOCF),
            as in :class:`TwinForecaster`.
        isolate_ehr_head: the EHR head reads detached features, so the future-EHR loss never
            steers the image path (as in :class:`TwinForecaster`, the default).

    Inputs of ``forward`` / ``forecast`` are those of :class:`TwinForecaster`: history
    ``(B, T, C, *spatial)``, times ``(B, T)`` days from each visit to the target, history_mask
    ``(B, T)`` (default all ones; real visits contiguous from slot 0), ehr_intervals ``(B, T, F)``,
    ehr_intervals_mask ``(B, T, F)``, ehr_static ``(B, S)``.

    Returns:
        ``forward``: the forecast ``(B, out_channels, *spatial)``; ``forecast``: the forecast and
        the future EHR values ``(B, K)``.

    Example::

        net = ViViTTwin(spatial_dims=2, in_channels=1, img_size=64, ehr_interval_dim=12, ehr_static_dim=6)
        pred = net(torch.rand(2, 3, 1, 64, 64), times=torch.tensor([[700.0, 400, 90], [500, 200, 30]]),
                   ehr_intervals=torch.randn(2, 3, 12), ehr_static=torch.randn(2, 6))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        img_size: Sequence[int] | int,
        out_channels: int | None = None,
        patch_size: Sequence[int] | int = 8,
        hidden_size: int = 96,
        mlp_dim: int = 192,
        num_heads: int = 4,
        num_layers: int = 2,
        decoder_channels: int = 32,
        ehr_interval_dim: int = 0,
        ehr_static_dim: int = 0,
        ehr_embed_dim: int = 32,
        conditioning: str = "tokens",
        future_ehr_dim: int = 0,
        max_history: int = 8,
        time_scale: float = 365.0,
        residual: bool = True,
        pos_embed_type: str = "sincos",
        dropout_rate: float = 0.0,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        future_ehr_base: Sequence[int] | None = None,
        isolate_ehr_head: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if conditioning not in VIVIT_CONDITIONING:
            raise ValueError(f"conditioning must be one of {VIVIT_CONDITIONING}, got {conditioning!r}.")
        out_channels = in_channels if out_channels is None else out_channels
        if residual and out_channels != in_channels:
            raise ValueError(f"residual=True needs out_channels == in_channels ({in_channels}), got {out_channels}.")
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}.")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}).")
        if pos_embed_type == "sincos" and hidden_size % (2 * spatial_dims) != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be a multiple of {2 * spatial_dims} for sincos position embedding "
                f"in {spatial_dims}D."
            )
        sizes = [int(s) for s in ensure_tuple_rep(img_size, spatial_dims)]
        patches = [int(p) for p in ensure_tuple_rep(patch_size, spatial_dims)]
        levels = {int(round(math.log2(p))) if p > 0 else -1 for p in patches}
        if len(levels) != 1 or any(p < 1 or 2 ** int(round(math.log2(p))) != p for p in patches):
            raise ValueError(f"patch_size must be one power of two for every dim, got {patches}.")
        if any(s % p != 0 for s, p in zip(sizes, patches)):
            raise ValueError(f"img_size {sizes} must be divisible by patch_size {patches}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.img_size = sizes
        self.grid = [s // p for s, p in zip(sizes, patches)]
        self.num_patches = int(math.prod(self.grid))
        self.conditioning = conditioning
        self.max_history = max_history
        self.time_scale = float(time_scale)
        self.residual = residual
        self.isolate_ehr_head = isolate_ehr_head
        self.future_ehr_dim = future_ehr_dim
        self.hidden_size = hidden_size
        self.ehr_tokens = conditioning == "tokens"

        self.patch_embedding = PatchEmbeddingBlock(
            in_channels,
            sizes,
            patches,
            hidden_size,
            num_heads,
            proj_type="conv",
            pos_embed_type=pos_embed_type,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
        )
        self.ehr_encoder = EHREncoder(ehr_interval_dim, ehr_static_dim, ehr_embed_dim, time_scale=time_scale)
        # time to the target, added to every token of a frame: irregular gaps are seen as they are
        self.time_embedding = nn.Sequential(nn.Linear(2, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        # built only when used, so every parameter gets a gradient (DDP without find_unused_parameters)
        self.ehr_to_token: nn.Module | None = nn.Linear(ehr_embed_dim, hidden_size) if self.ehr_tokens else None
        self.static_to_token: nn.Module | None = (
            nn.Linear(ehr_static_dim, hidden_size) if self.ehr_tokens and ehr_static_dim > 0 else None
        )
        self.gap_embedding = nn.Sequential(nn.Linear(2, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))
        self.frame_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.target_token = nn.Parameter(torch.zeros(1, hidden_size))
        self.target_query = nn.Parameter(torch.zeros(1, 1, hidden_size))
        for p in (self.frame_token, self.target_token, self.target_query):
            nn.init.trunc_normal_(p, std=0.02)
        self.spatial_blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate) for _ in range(num_layers)
        )
        self.temporal_blocks = nn.ModuleList(
            TransformerBlock(hidden_size, mlp_dim, num_heads, dropout_rate) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden_size)

        c = decoder_channels
        self.skip_encoder = nn.ModuleList(
            Convolution(
                spatial_dims, in_channels if level == 0 else c, c, strides=1 if level == 0 else 2, act=act, norm=norm
            )
            for level in range(levels.pop() + 1)
        )
        self.from_tokens = Convolution(spatial_dims, hidden_size, c, kernel_size=1, act=act, norm=norm)
        self.bridge = Convolution(spatial_dims, 2 * c, c, act=act, norm=norm)
        self.decoder = nn.ModuleList(_SkipUp(spatial_dims, c, act, norm) for _ in range(len(self.skip_encoder) - 1))
        self.head = Convolution(spatial_dims, c, out_channels, kernel_size=1, conv_only=True)
        if residual:
            # zero change before training: the untrained twin is the copy-last baseline
            nn.init.zeros_(self.head.conv.weight)
            nn.init.zeros_(self.head.conv.bias)
        self.ehr_head: nn.Module | None
        self.ehr_head, base = future_ehr_head(
            hidden_size + ehr_embed_dim + 1, future_ehr_dim, ehr_interval_dim, future_ehr_base
        )
        self.has_ehr_base = bool(base)
        self.register_buffer("future_ehr_base", torch.tensor(base, dtype=torch.long), persistent=False)

    def _time_features(self, days: torch.Tensor) -> torch.Tensor:
        scaled = days.clamp(min=0.0) / self.time_scale
        return torch.stack([torch.log1p(scaled), scaled], dim=-1)

    @torch.jit.export
    def forecast(
        self,
        history: torch.Tensor,
        times: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The forecast ``(B, out_channels, *spatial)`` and future EHR values ``(B, K)`` (K may be 0)."""
        mask = torch.ones_like(times) if history_mask is None else history_mask.to(times.dtype)
        check_forecast_inputs(history, times, mask, self.spatial_dims, self.in_channels, self.max_history)
        if list(history.shape[3:]) != self.img_size:
            raise ValueError(
                f"history spatial size {list(history.shape[3:])} must equal img_size={self.img_size} of this network."
            )
        b, t, d, n = history.shape[0], history.shape[1], self.hidden_size, self.num_patches
        cond = self.ehr_encoder(times, ehr_intervals, ehr_intervals_mask, ehr_static)  # (B, T, E); checks EHR
        last = last_visit_index(mask)
        rows = torch.arange(b, device=history.device)
        last_scan = history[rows, last]
        gap = times[rows, last]

        patches = self.patch_embedding(history.reshape([b * t] + list(history.shape[2:]))).reshape(b, t, n, d)
        global_tokens = self.frame_token.expand(b, t, d)
        if self.ehr_to_token is not None:
            global_tokens = global_tokens + self.ehr_to_token(cond)
        frames = torch.cat([global_tokens.unsqueeze(2), patches], dim=2)
        frames = frames + self.time_embedding(self._time_features(times)).unsqueeze(2)

        target_global = self.target_token.expand(b, d) + self.gap_embedding(self._time_features(gap))
        if self.static_to_token is not None and ehr_static is not None:
            target_global = target_global + self.static_to_token(ehr_static.to(times.dtype))
        target_patches = self.target_query + self.patch_embedding.position_embeddings
        target = torch.cat([target_global.unsqueeze(1), target_patches.expand(b, n, d)], dim=1)
        target = target + self.time_embedding(self._time_features(torch.zeros_like(gap))).unsqueeze(1)
        x = torch.cat([frames, target.unsqueeze(1)], dim=1)  # (B, T + 1, N + 1, D)

        # padded visits are never attended to; the target slot is always real
        keys = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        keys = keys.unsqueeze(1).expand(b, n + 1, t + 1).reshape(b * (n + 1), t + 1)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks):
            x = spatial(x.reshape(b * (t + 1), n + 1, d)).reshape(b, t + 1, n + 1, d)
            x = x.transpose(1, 2).reshape(b * (n + 1), t + 1, d)
            x = temporal(x, attn_mask=keys).reshape(b, n + 1, t + 1, d).transpose(1, 2)
        out_tokens = self.norm(x[:, t])  # the target frame (B, N + 1, D)

        skips: list[torch.Tensor] = []
        y = last_scan
        for block in self.skip_encoder:
            y = block(y)
            skips.append(y)
        grid = out_tokens[:, 1:].transpose(1, 2).reshape([b, d] + self.grid)
        y = self.bridge(torch.cat([self.from_tokens(grid), skips[-1]], dim=1))
        for i, block in enumerate(self.decoder):
            y = block(y, skips[-2 - i])
        out = self.head(y)
        if self.residual:
            out = out + last_scan

        if self.ehr_head is not None:
            gap_feature = torch.log1p(gap.clamp(min=0.0) / self.time_scale).unsqueeze(1)
            pooled, ehr_cond = out_tokens[:, 0], cond[rows, last]
            if self.isolate_ehr_head:
                pooled = pooled.detach()
                if self.conditioning != "none":  # the EHR encoder also feeds the image path
                    ehr_cond = ehr_cond.detach()
            future = self.ehr_head(torch.cat([pooled, ehr_cond, gap_feature], dim=1))
            if self.has_ehr_base and ehr_intervals is not None:
                future = future + ehr_intervals[rows, last][:, self.future_ehr_base]
        else:
            future = torch.zeros(b, 0, dtype=out.dtype, device=out.device)
        return out, future

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
