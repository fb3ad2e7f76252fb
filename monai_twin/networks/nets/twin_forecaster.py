"""``TwinForecaster``: earlier scans + EHR -> the next scan at a chosen date (+ future EHR values).

Image encoder (shared over time) -> EHR conditioning (ST-FiLM / FiLM / extra channels / none)
-> ConvLSTM over the visits, seeing each irregular gap -> U-Net-style decoder with skips from the
last scan -> **change** applied to the last scan. The decoder's last layer starts at zero, so an
untrained model forecasts "no change" (copy-last, the strong baseline on longitudinal images) and
training only has to learn what changes. The change is either added to the last scan
(``change="additive"``) or is a dense displacement that warps the last scan plus an additive
residual (``change="deformation"``): growth, shrinkage and atrophy move tissue boundaries, and a
sub-voxel boundary move is a smooth displacement but a thin, sharp ring of intensity change. An
MLP head reads the final state for future EHR values.

Built from MONAI's ``Convolution``/``UpSample`` blocks and this package's :class:`ConvLSTM`,
:class:`FiLM`, :class:`STFiLM` and :class:`EHREncoder`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, UpSample
from torch import nn

from ..blocks.convlstm import ConvLSTM
from ..blocks.ehr_encoder import EHREncoder
from ..blocks.film import FiLM, STFiLM
from .forecast_inputs import check_forecast_inputs, future_ehr_head, last_visit_index, unstack_history

__all__ = ["CHANGE_MODELS", "CONDITIONING", "ForecastOutputs", "TwinForecaster", "warp_image"]

#: The ways EHR reaches the image features: one flag for the ablation.
CONDITIONING = ("stfilm", "film", "channels", "none")
#: How the predicted change is applied to the last scan.
CHANGE_MODELS = ("additive", "deformation")


def warp_image(image: torch.Tensor, ddf: torch.Tensor) -> torch.Tensor:
    """Warp ``image`` ``(B, C, *spatial)`` by a dense displacement ``ddf`` ``(B, dims, *spatial)`` in voxels.

    The same convention as MONAI's :class:`monai.networks.blocks.Warp` (bilinear, border padding,
    ``output(p) = image(p + ddf(p))`` with ``ddf`` channel ``i`` along spatial axis ``i``), written
    with ``grid_sample`` directly so that it compiles with TorchScript (MONAI's ``Warp`` does not).
    """
    spatial = image.shape[2:]
    dims = len(spatial)
    if ddf.shape[1] != dims or ddf.shape[2:] != spatial or ddf.shape[0] != image.shape[0]:
        raise ValueError(
            f"ddf must have shape (B, {dims}, *{list(spatial)}) for an image of shape {list(image.shape)}, "
            f"got {list(ddf.shape)}."
        )
    axes = [torch.linspace(-1.0, 1.0, int(n), dtype=image.dtype, device=image.device) for n in spatial]
    identity = torch.stack(torch.meshgrid(axes, indexing="ij"), dim=-1)  # (*spatial, dims), axis order
    scale = torch.tensor([2.0 / max(int(n) - 1, 1) for n in spatial], dtype=image.dtype, device=image.device)
    grid = identity.unsqueeze(0) + ddf.movedim(1, -1) * scale
    return F.grid_sample(image, grid.flip(-1), mode="bilinear", padding_mode="border", align_corners=True)


class _UpBlock(nn.Module):
    """Upsample by 2, concatenate the skip features, convolve."""

    def __init__(self, spatial_dims: int, c_in: int, c_out: int, act: str | tuple, norm: str | tuple) -> None:
        super().__init__()
        self.up = UpSample(spatial_dims, c_in, c_out, scale_factor=2, mode="deconv")
        self.conv = Convolution(spatial_dims, 2 * c_out, c_out, act=act, norm=norm)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class TwinForecaster(nn.Module):
    """ConvLSTM twin with spatio-temporal FiLM conditioning.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each scan.
        out_channels: channels of the forecast (default ``in_channels``; must equal it when
            ``residual``).
        channels: encoder channels per level; each level after the first halves the resolution,
            so spatial sizes must be divisible by ``2 ** (len(channels) - 1)``.
        hidden_channels: ConvLSTM hidden channels (int, or one per layer).
        ehr_interval_dim: ``F`` of ``ehr_intervals`` (0: none).
        ehr_static_dim: ``S`` of ``ehr_static`` (0: none).
        ehr_embed_dim: per-time EHR embedding size.
        conditioning: ``"stfilm"``, ``"film"``, ``"channels"`` (embedding broadcast as extra
            channels) or ``"none"`` (EHR ignored; the time gaps still reach the ConvLSTM).
        future_ehr_dim: ``K`` values predicted by the future-EHR head (0: no head).
        max_history: most prior visits accepted.
        time_scale: days per time unit for gaps fed to the network (a year by default).
        residual: predict the change from the last scan (recommended) instead of the scan.
        change: with ``residual``, ``"additive"`` (the decoder's output is added to the last scan)
            or ``"deformation"`` (a displacement field, in voxels, warps the last scan and an
            additive residual is added; both start at zero).
        flow_scale: with ``change="deformation"``, voxels per unit of the displacement head's
            output. Adam moves each weight by about the learning rate per step whatever the
            gradient's size, so this sets how fast displacements can grow during training.
        isolate_ehr_head: the future-EHR head reads detached features, so its loss never steers the
            image encoder, the ConvLSTM or (unless ``conditioning="none"``, where the image path
            does not use it) the EHR encoder: the default. With a shared trunk the EHR term, whose
            normalised MSE is ~10^3 times the image MSE, took over the trunk's gradients and cost
            0.6 dB on changed testbed visits (forecasting guide).
        act, norm: MONAI layer factory names for the encoder/decoder blocks.
        future_ehr_base: for each future value, the index of an ``ehr_intervals`` feature holding
            its last known value (the ``<code>:last`` feature with ``carry_forward=True``); the
            EHR head then predicts the change from it, so the untrained head is
            last-value-carried-forward -- as the image head starts at copy-last.
        plan_film: also modulate the decoder's full-resolution features (:class:`FiLM`, identity at
            initialisation) with the EHR embedding of the forecast interval -- the planned events
            and the gap to the target -- so the plan scales the predicted change directly rather
            than only through the ConvLSTM. Needs ``conditioning != "none"``.

    Inputs of ``forward`` (``T`` prior visits, padded slots marked in ``history_mask``):
        history ``(B, T, C, *spatial)`` -- or ``(B, T * C, *spatial)``, the visits stacked on the
        channel axis oldest first, the one-``image`` layout of MONAI bundles and MONAI Label (``T``
        is read from ``times``) --, times ``(B, T)`` days from each visit to the target,
        history_mask ``(B, T)`` (default all ones; real visits must be contiguous),
        ehr_intervals ``(B, T, F)``, ehr_intervals_mask ``(B, T, F)``, ehr_static ``(B, S)``.

    Returns:
        ``forward``: the forecast ``(B, out_channels, *spatial)``; ``forecast``: the forecast and
        the future EHR values ``(B, K)``.

    Example::

        net = TwinForecaster(spatial_dims=2, in_channels=1, ehr_interval_dim=12, ehr_static_dim=6, future_ehr_dim=1)
        pred = net(torch.rand(2, 3, 1, 64, 64), times=torch.tensor([[700.0, 400, 90], [500, 200, 30]]),
                   ehr_intervals=torch.randn(2, 3, 12), ehr_static=torch.randn(2, 6))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int | None = None,
        channels: Sequence[int] = (16, 32),
        hidden_channels: Sequence[int] | int = 32,
        ehr_interval_dim: int = 0,
        ehr_static_dim: int = 0,
        ehr_embed_dim: int = 32,
        conditioning: str = "stfilm",
        future_ehr_dim: int = 0,
        max_history: int = 8,
        time_scale: float = 365.0,
        residual: bool = True,
        act: str | tuple = "PRELU",
        norm: str | tuple = "INSTANCE",
        future_ehr_base: Sequence[int] | None = None,
        change: str = "additive",
        isolate_ehr_head: bool = True,
        flow_scale: float = 4.0,
        plan_film: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if conditioning not in CONDITIONING:
            raise ValueError(f"conditioning must be one of {CONDITIONING}, got {conditioning!r}.")
        if change not in CHANGE_MODELS:
            raise ValueError(f"change must be one of {CHANGE_MODELS}, got {change!r}.")
        if change == "deformation" and not residual:
            raise ValueError("change='deformation' warps the last scan: it needs residual=True.")
        out_channels = in_channels if out_channels is None else out_channels
        if residual and out_channels != in_channels:
            raise ValueError(f"residual=True needs out_channels == in_channels ({in_channels}), got {out_channels}.")
        channels = list(channels)
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {channels}.")
        if max_history < 1:
            raise ValueError(f"max_history must be >= 1, got {max_history}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.conditioning = conditioning
        self.max_history = max_history
        self.time_scale = float(time_scale)
        self.residual = residual
        self.future_ehr_dim = future_ehr_dim
        self.levels = len(channels)

        self.encoder = nn.ModuleList()
        c_prev = in_channels
        for level, c in enumerate(channels):
            self.encoder.append(
                Convolution(spatial_dims, c_prev, c, strides=1 if level == 0 else 2, act=act, norm=norm)
            )
            c_prev = c
        self.ehr_encoder = EHREncoder(ehr_interval_dim, ehr_static_dim, ehr_embed_dim, time_scale=time_scale)
        deep = channels[-1]
        self.modulation: nn.Module | None = None
        if conditioning == "stfilm":
            self.modulation = STFiLM(spatial_dims, deep, ehr_embed_dim)
        elif conditioning == "film":
            self.modulation = FiLM(spatial_dims, deep, ehr_embed_dim)
        lstm_in = deep + (ehr_embed_dim if conditioning == "channels" else 0)
        self.lstm = ConvLSTM(spatial_dims, lstm_in, hidden_channels, time_gap=True)
        self.bridge = Convolution(spatial_dims, self.lstm.out_channels + deep, deep, act=act, norm=norm)

        self.decoder = nn.ModuleList(
            _UpBlock(spatial_dims, channels[level], channels[level - 1], act, norm)
            for level in range(self.levels - 1, 0, -1)
        )
        if plan_film and conditioning == "none":
            raise ValueError("plan_film=True modulates by the EHR: it needs conditioning other than 'none'.")
        self.plan_film: nn.Module | None = FiLM(spatial_dims, channels[0], ehr_embed_dim) if plan_film else None
        self.head = Convolution(spatial_dims, channels[0], out_channels, kernel_size=1, conv_only=True)
        if residual:
            # zero change before training: the untrained twin is the copy-last baseline
            nn.init.zeros_(self.head.conv.weight)
            nn.init.zeros_(self.head.conv.bias)
        self.change = change
        self.isolate_ehr_head = isolate_ehr_head
        if flow_scale <= 0:
            raise ValueError(f"flow_scale must be > 0, got {flow_scale}.")
        self.flow_scale = float(flow_scale)
        self.flow: nn.Module | None = None
        if change == "deformation":
            self.flow = Convolution(spatial_dims, channels[0], spatial_dims, kernel_size=3, conv_only=True)
            nn.init.zeros_(self.flow.conv.weight)  # identity warp before training
            nn.init.zeros_(self.flow.conv.bias)
        self.ehr_head: nn.Module | None
        self.ehr_head, base = future_ehr_head(
            self.lstm.out_channels + ehr_embed_dim + 1, future_ehr_dim, ehr_interval_dim, future_ehr_base
        )
        self.has_ehr_base = bool(base)
        self.register_buffer("future_ehr_base", torch.tensor(base, dtype=torch.long), persistent=False)

    def _check_inputs(self, history: torch.Tensor, times: torch.Tensor, mask: torch.Tensor) -> None:
        check_forecast_inputs(history, times, mask, self.spatial_dims, self.in_channels, self.max_history)
        factor = 2 ** (self.levels - 1)
        for size in history.shape[3:]:
            if size % factor != 0:
                raise ValueError(f"spatial size {list(history.shape[3:])} must be divisible by {factor}.")

    def _gaps(self, times: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Days from each real visit to the next real one, the last reaching the target (scaled)."""
        zeros = torch.zeros_like(times[:, :1])
        next_real = torch.cat([mask[:, 1:], zeros], dim=1)
        next_time = torch.cat([times[:, 1:], zeros], dim=1) * next_real
        return (times - next_time).clamp(min=0.0) * mask / self.time_scale

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
        history = unstack_history(history, times, self.spatial_dims, self.in_channels)
        mask = torch.ones_like(times) if history_mask is None else history_mask.to(times.dtype)
        self._check_inputs(history, times, mask)
        b, t = history.shape[0], history.shape[1]
        frames = history.reshape([b * t] + list(history.shape[2:]))
        skips: list[torch.Tensor] = []
        x = frames
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        feats = x.reshape([b, t] + list(x.shape[1:]))
        cond = self.ehr_encoder(times, ehr_intervals, ehr_intervals_mask, ehr_static)  # (B, T, E)
        if self.conditioning == "channels":
            view = [b, t, cond.shape[2]] + [1] * self.spatial_dims
            feats = torch.cat([feats, cond.reshape(view).expand([b, t, cond.shape[2]] + list(feats.shape[3:]))], dim=2)
        elif self.modulation is not None:
            if self.conditioning == "stfilm":
                feats = self.modulation(feats, cond)
            else:
                flat = self.modulation(feats.reshape([b * t] + list(feats.shape[2:])), cond.reshape(b * t, -1))
                feats = flat.reshape(feats.shape)
        _, (h, _c) = self.lstm(feats, mask, self._gaps(times, mask))

        # the last real visit of each sample (real visits are contiguous)
        last = last_visit_index(mask)
        rows = torch.arange(b, device=history.device)
        last_skips = [s.reshape([b, t] + list(s.shape[1:]))[rows, last] for s in skips]
        y = self.bridge(torch.cat([h, last_skips[-1]], dim=1))
        for i, block in enumerate(self.decoder):
            y = block(y, last_skips[-2 - i])
        if self.plan_film is not None:
            y = self.plan_film(y, cond[rows, last])
        out = self.head(y)
        if self.residual:
            last_scan = history[rows, last]
            if self.flow is not None:
                last_scan = warp_image(last_scan, self.flow(y) * self.flow_scale)
            out = out + last_scan

        if self.ehr_head is not None:
            pooled = h.flatten(2).mean(dim=2)
            gap_to_target = torch.log1p(times[rows, last].clamp(min=0.0) / self.time_scale).unsqueeze(1)
            ehr_cond = cond[rows, last]
            if self.isolate_ehr_head:
                pooled = pooled.detach()
                if self.conditioning != "none":  # the EHR encoder also feeds the image path
                    ehr_cond = ehr_cond.detach()
            future = self.ehr_head(torch.cat([pooled, ehr_cond, gap_to_target], dim=1))
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


class ForecastOutputs(nn.Module):
    """A twin whose ``forward`` returns what its ``forecast`` does: ``(image, future_ehr)``.

    :class:`torch.nn.parallel.DistributedDataParallel` synchronises gradients only for calls
    through ``forward``, so a twin trained with several processes is wrapped in this before DDP;
    :class:`~monai_twin.engines.ForecastTrainer` unpacks the tuple and keeps the future-EHR term.
    The parameters are the twin's (``twin.*`` in this module's state dict): save and load the
    twin itself.

    Example::

        ddp = DistributedDataParallel(ForecastOutputs(twin))
        image, future = ddp(history, times=times, ehr_intervals=intervals)
    """

    def __init__(self, twin: nn.Module) -> None:
        super().__init__()
        if not hasattr(twin, "forecast"):
            raise TypeError(f"ForecastOutputs needs a twin with a forecast method, got {type(twin).__name__}.")
        self.twin = twin

    def forward(
        self,
        history: torch.Tensor,
        times: torch.Tensor,
        history_mask: torch.Tensor | None = None,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.twin.forecast(history, times, history_mask, ehr_intervals, ehr_intervals_mask, ehr_static)
