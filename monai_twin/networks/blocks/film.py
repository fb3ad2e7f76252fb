"""Feature-wise linear modulation: FiLM (one γ/β per channel) and ST-FiLM (per-time, spatially
varying γ/β maps), both starting as the identity.

``FiLM`` follows Perez et al.: ``y = x * (1 + γ(z)) + β(z)`` with γ, β linear in the condition
``z``. ``STFiLM`` predicts γ and β *maps* from the frame's own features and its time step's
condition, so the same drug dose can shrink a lesion without touching the rest of the image.
Both generators end in a zero-initialised layer: before training the block passes features
through unchanged, and the forecaster around it starts at its copy-last behaviour.
"""

from __future__ import annotations

import torch
from monai.networks.layers.factories import Act, Conv
from torch import nn

__all__ = ["FiLM", "STFiLM"]


def _check_cond(cond: torch.Tensor, batch: int, cond_dim: int) -> None:
    if cond.dim() != 2 or cond.shape[0] != batch or cond.shape[1] != cond_dim:
        raise ValueError(f"cond must have shape (B, cond_dim) = ({batch}, {cond_dim}), got {list(cond.shape)}.")


class FiLM(nn.Module):
    """Channel-wise FiLM: ``x * (1 + γ(cond)) + β(cond)``, γ and β constant over space.

    Args:
        spatial_dims: 2 or 3.
        num_features: channels ``C`` of ``x``.
        cond_dim: size of the condition vector.

    Shapes:
        ``x`` ``(B, C, *spatial)``, ``cond`` ``(B, cond_dim)`` -> ``(B, C, *spatial)``.

    Example::

        film = FiLM(spatial_dims=2, num_features=16, cond_dim=8)
        y = film(torch.randn(4, 16, 32, 32), torch.randn(4, 8))  # == x before training
    """

    def __init__(self, spatial_dims: int, num_features: int, cond_dim: int) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        self.spatial_dims = spatial_dims
        self.num_features = num_features
        self.cond_dim = cond_dim
        self.to_gamma_beta = nn.Linear(cond_dim, 2 * num_features)
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.num_features:
            raise ValueError(f"x must have shape (B, {self.num_features}, *spatial), got {list(x.shape)}.")
        _check_cond(cond, x.shape[0], self.cond_dim)
        gamma, beta = torch.chunk(self.to_gamma_beta(cond), 2, dim=1)
        view = [x.shape[0], self.num_features] + [1] * self.spatial_dims
        return x * (1.0 + gamma.reshape(view)) + beta.reshape(view)


class STFiLM(nn.Module):
    """Spatio-temporal FiLM: per-time, spatially varying modulation maps.

    For each frame, the condition is projected to ``hidden`` channels, broadcast over space,
    concatenated with the frame's features and passed through two convolutions that output the
    ``γ`` and ``β`` maps. Applied to a sequence, frame ``t`` is modulated by condition ``t``.

    Args:
        spatial_dims: 2 or 3.
        num_features: channels ``C`` of the features.
        cond_dim: size of each per-time condition vector.
        hidden: channels of the map generator.
        kernel_size: odd kernel size of the generator's convolutions.

    Shapes:
        ``x`` ``(B, C, *spatial)`` with ``cond`` ``(B, cond_dim)``, or a sequence ``x``
        ``(B, T, C, *spatial)`` with ``cond`` ``(B, T, cond_dim)`` -> same shape as ``x``.

    Example::

        stfilm = STFiLM(spatial_dims=3, num_features=16, cond_dim=8)
        y = stfilm(torch.randn(2, 5, 16, 8, 8, 8), torch.randn(2, 5, 8))
    """

    def __init__(
        self, spatial_dims: int, num_features: int, cond_dim: int, hidden: int = 32, kernel_size: int = 3
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
        self.spatial_dims = spatial_dims
        self.num_features = num_features
        self.cond_dim = cond_dim
        conv = Conv[Conv.CONV, spatial_dims]
        self.project = nn.Linear(cond_dim, hidden)
        self.body = conv(num_features + hidden, hidden, kernel_size, padding=kernel_size // 2)
        self.act = Act[Act.GELU]()
        self.to_gamma_beta = conv(hidden, 2 * num_features, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def _frame(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        _check_cond(cond, x.shape[0], self.cond_dim)
        z = self.project(cond).reshape([x.shape[0], -1] + [1] * self.spatial_dims)
        z = z.expand([x.shape[0], z.shape[1]] + list(x.shape[2:]))
        gamma, beta = torch.chunk(self.to_gamma_beta(self.act(self.body(torch.cat([x, z], dim=1)))), 2, dim=1)
        return x * (1.0 + gamma) + beta

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        if x.dim() == self.spatial_dims + 2:
            if x.shape[1] != self.num_features:
                raise ValueError(f"x must have {self.num_features} channels, got shape {list(x.shape)}.")
            return self._frame(x, cond)
        if x.dim() != self.spatial_dims + 3 or x.shape[2] != self.num_features:
            raise ValueError(
                f"x must have shape (B, {self.num_features}, *spatial) or (B, T, {self.num_features}, *spatial), "
                f"got {list(x.shape)}."
            )
        b, t = x.shape[0], x.shape[1]
        if cond.dim() != 3 or cond.shape[0] != b or cond.shape[1] != t:
            raise ValueError(
                f"cond must have shape (B, T, cond_dim) = ({b}, {t}, {self.cond_dim}), got {list(cond.shape)}."
            )
        # fold time into the batch: one generator pass for every frame
        flat = self._frame(x.reshape([b * t] + list(x.shape[2:])), cond.reshape(b * t, cond.shape[2]))
        return flat.reshape(x.shape)
