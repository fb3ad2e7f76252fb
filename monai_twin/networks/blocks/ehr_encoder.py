"""Per-time EHR embedding for the forecasters: static attributes + the events of each interval
(+ their "measured" masks) + the time left to the target -> one vector per prior visit.

Inputs are the tensors of ``monai_twin.transforms.ehr`` (``ehr_static`` ``(B, S)``,
``ehr_intervals`` ``(B, T, F)`` and ``ehr_intervals_mask`` ``(B, T, F)``) and ``times`` ``(B, T)``
(days from each prior visit to the target). Row ``t`` of the intervals holds what happened after
visit ``t`` -- the last row reaches the target date and is where a what-if edit lands.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["EHREncoder"]


class EHREncoder(nn.Module):
    """MLP embedding ``[symlog(intervals), mask, static, log1p(times / time_scale)]`` per time step.

    ``symlog(x) = sign(x) log(1 + |x|)`` puts features of any unit on one scale: the interval
    features mix normalised values with raw exposures (dose x days), counts and day counts.

    Values and masks enter side by side rather than masked: the EHR transforms fill unmeasured
    features with 0 by default, and with ``carry_forward=True`` an unmeasured feature holds the
    value still in force (a dose), which the network must see.

    Args:
        interval_dim: ``F``, features per interval (0: no interval features).
        static_dim: ``S``, encoded static attributes (0: none).
        embed_dim: size of each output embedding.
        hidden: width of the MLP.
        time_scale: days that count as one unit of time before the ``log1p`` (a year by default).

    Shapes:
        ``forward(times, ehr_intervals=None, ehr_intervals_mask=None, ehr_static=None)`` ->
        ``(B, T, embed_dim)``. A missing mask means every interval feature was measured.

    Example::

        enc = EHREncoder(interval_dim=12, static_dim=6, embed_dim=32)
        z = enc(torch.rand(2, 4) * 400, torch.randn(2, 4, 12), torch.ones(2, 4, 12), torch.randn(2, 6))
    """

    def __init__(
        self, interval_dim: int, static_dim: int, embed_dim: int, hidden: int = 64, time_scale: float = 365.0
    ) -> None:
        super().__init__()
        if interval_dim < 0 or static_dim < 0 or embed_dim < 1 or hidden < 1:
            raise ValueError(
                f"interval_dim and static_dim must be >= 0, embed_dim and hidden >= 1; got {interval_dim}, "
                f"{static_dim}, {embed_dim}, {hidden}."
            )
        if not time_scale > 0:
            raise ValueError(f"time_scale must be > 0 days, got {time_scale}.")
        self.interval_dim = interval_dim
        self.static_dim = static_dim
        self.embed_dim = embed_dim
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(
            nn.Linear(2 * interval_dim + static_dim + 1, hidden), nn.GELU(), nn.Linear(hidden, embed_dim)
        )

    def forward(
        self,
        times: torch.Tensor,
        ehr_intervals: torch.Tensor | None = None,
        ehr_intervals_mask: torch.Tensor | None = None,
        ehr_static: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if times.dim() != 2:
            raise ValueError(f"times must have shape (B, T), got {list(times.shape)}.")
        b, t = times.shape[0], times.shape[1]
        parts: list[torch.Tensor] = []
        if self.interval_dim > 0:
            if ehr_intervals is None:
                raise ValueError(f"ehr_intervals (B, T, {self.interval_dim}) is required by this encoder.")
            if ehr_intervals.dim() != 3 or ehr_intervals.shape[0] != b or ehr_intervals.shape[1] != t:
                raise ValueError(
                    f"ehr_intervals must have shape (B, T, F) = ({b}, {t}, {self.interval_dim}) to match times, "
                    f"got {list(ehr_intervals.shape)}."
                )
            if ehr_intervals.shape[2] != self.interval_dim:
                raise ValueError(f"ehr_intervals has {ehr_intervals.shape[2]} features, expected {self.interval_dim}.")
            if bool(torch.isnan(ehr_intervals).any()):
                raise ValueError("ehr_intervals contains NaN; missing values must be 0 with ehr_intervals_mask = 0.")
            mask = (
                torch.ones_like(ehr_intervals)
                if ehr_intervals_mask is None
                else ehr_intervals_mask.to(ehr_intervals.dtype)
            )
            if mask.shape != ehr_intervals.shape:
                raise ValueError(
                    f"ehr_intervals_mask must have the shape of ehr_intervals {list(ehr_intervals.shape)}, got {list(mask.shape)}."
                )
            # symmetric log: normalised values (~1) pass almost unchanged, while raw magnitudes -- an
            # exposure of 10^4 dose x days, 10^3 days since an event, counts -- are brought to a few
            # units, so no feature's scale swamps the MLP (or the FiLM maps it drives)
            parts += [torch.sign(ehr_intervals) * torch.log1p(ehr_intervals.abs()), mask]
        if self.static_dim > 0:
            if ehr_static is None:
                raise ValueError(f"ehr_static (B, {self.static_dim}) is required by this encoder.")
            if ehr_static.dim() != 2 or ehr_static.shape[0] != b or ehr_static.shape[1] != self.static_dim:
                raise ValueError(
                    f"ehr_static must have shape (B, S) = ({b}, {self.static_dim}), got {list(ehr_static.shape)}."
                )
            if bool(torch.isnan(ehr_static).any()):
                raise ValueError("ehr_static contains NaN.")
            parts.append(ehr_static.unsqueeze(1).expand(b, t, self.static_dim))
        if bool(torch.isnan(times).any()):
            raise ValueError("times contains NaN.")
        parts.append(torch.log1p(times.clamp(min=0.0) / self.time_scale).unsqueeze(-1))
        return self.mlp(torch.cat([p.to(times.dtype) for p in parts], dim=-1))
