"""Input checks shared by the forecasting twins (:class:`TwinForecaster`, :class:`ViViTTwin`).

Every twin takes the same tensors (``history (B, T, C, *spatial)``, ``times (B, T)``,
``history_mask (B, T)`` and the EHR tensors, the latter checked by :class:`EHREncoder`), so the
errors a user sees for a bad batch are the same whichever network they swap in. Both functions are
TorchScript-compatible so scripted twins keep the checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["check_forecast_inputs", "future_ehr_head", "last_visit_index", "unstack_history"]


def check_forecast_inputs(
    history: torch.Tensor,
    times: torch.Tensor,
    mask: torch.Tensor,
    spatial_dims: int,
    in_channels: int,
    max_history: int,
) -> None:
    """Raise a ``ValueError`` naming the argument and the expected shape when a forecast input is wrong.

    Args:
        history: ``(B, T, C, *spatial)`` prior scans.
        times: ``(B, T)`` days from each prior visit to the target.
        mask: ``(B, T)`` history mask (1 real visit, 0 padding), as a float tensor.
        spatial_dims: 2 or 3.
        in_channels: expected ``C``.
        max_history: most visits accepted.
    """
    if history.dim() != spatial_dims + 3:
        raise ValueError(
            f"history must have shape (B, T, C, *{spatial_dims} spatial dims) or, visits stacked on the channel axis, "
            f"(B, T * C, *{spatial_dims} spatial dims), got {list(history.shape)}."
        )
    if history.shape[2] != in_channels:
        raise ValueError(f"history has {history.shape[2]} channels, expected in_channels={in_channels}.")
    b, t = history.shape[0], history.shape[1]
    if t > max_history:
        raise ValueError(f"history has T={t} visits, more than max_history={max_history}.")
    if times.dim() != 2 or times.shape[0] != b or times.shape[1] != t:
        raise ValueError(f"times must have shape (B, T) = ({b}, {t}) to match history, got {list(times.shape)}.")
    if mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != t:
        raise ValueError(f"history_mask must have shape (B, T) = ({b}, {t}), got {list(mask.shape)}.")
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("history_mask marks every visit of a sample as padding; each sample needs a prior scan.")
    if bool(torch.isnan(history).any()) or bool(torch.isnan(times).any()):
        raise ValueError("history or times contains NaN.")


def unstack_history(history: torch.Tensor, times: torch.Tensor, spatial_dims: int, in_channels: int) -> torch.Tensor:
    """``(B, T, C, *spatial)`` from a history whose visits are stacked on the channel axis.

    MONAI bundles and MONAI Label hand a network one ``image`` of ``(B, channels, *spatial)``; a
    twin's history arrives there as ``(B, T * C, *spatial)``, oldest visit first, and ``times``
    ``(B, T)`` says how many visits it holds. A history that already has the visit axis is
    returned as it is.
    """
    if history.dim() != spatial_dims + 2:
        return history
    if times.dim() != 2 or times.shape[0] != history.shape[0]:
        raise ValueError(
            f"times must have shape (B, T) with B={history.shape[0]} to unstack a history of shape "
            f"{list(history.shape)}, got {list(times.shape)}."
        )
    t = times.shape[1]
    if history.shape[1] != t * in_channels:
        raise ValueError(
            f"a history stacked on the channel axis must have T * C = {t} * {in_channels} = {t * in_channels} "
            f"channels (T from times), got {list(history.shape)}."
        )
    return history.reshape([history.shape[0], t, in_channels] + list(history.shape[2:]))


def last_visit_index(mask: torch.Tensor) -> torch.Tensor:
    """``(B,)`` index of the last real visit of each sample (real visits are contiguous from slot 0)."""
    order = torch.arange(1, mask.shape[1] + 1, device=mask.device, dtype=mask.dtype).unsqueeze(0)
    return torch.argmax(mask * order, dim=1)


def future_ehr_head(
    in_features: int, future_ehr_dim: int, ehr_interval_dim: int, future_ehr_base: Sequence[int] | None
) -> tuple[nn.Module | None, list[int]]:
    """The twins' future-EHR MLP head (``None`` when ``future_ehr_dim`` is 0) and its checked base indices.

    With ``future_ehr_base`` (one ``ehr_intervals`` feature index per future value: its last known
    value) the head predicts the change from that value, and its last layer starts at zero so an
    untrained head is last-value-carried-forward.
    """
    head = None
    if future_ehr_dim > 0:
        head = nn.Sequential(nn.Linear(in_features, 64), nn.GELU(), nn.Linear(64, future_ehr_dim))
    base = [] if future_ehr_base is None else [int(i) for i in future_ehr_base]
    if base:
        if len(base) != future_ehr_dim:
            raise ValueError(
                f"future_ehr_base needs one feature index per future value ({future_ehr_dim}), got {base}."
            )
        if min(base) < 0 or max(base) >= ehr_interval_dim:
            raise ValueError(
                f"future_ehr_base indices must lie in [0, ehr_interval_dim={ehr_interval_dim}), got {base}."
            )
        nn.init.zeros_(head[-1].weight)
        nn.init.zeros_(head[-1].bias)
    return head, base
