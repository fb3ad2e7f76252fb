"""Convolutional LSTM for 2D and 3D image sequences (MONAI has none).

The four gates come from **one** convolution over ``[x_t, h_{t-1}(, gap_t)]`` with ``4 * hidden``
output channels, split afterwards: one large convolution is markedly faster than four small ones
(``benchmarks/convlstm_fused_gates.py`` measures it against a per-gate reference).

Irregular visit intervals are first-class: an optional per-step time gap (days) enters the gates
as one extra constant channel, and a per-step padding mask keeps the state unchanged on padded
slots, so sequences of different lengths share one batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv
from torch import nn

__all__ = ["ConvLSTM", "ConvLSTMCell"]


class ConvLSTMCell(nn.Module):
    """One ConvLSTM step: ``(x_t, (h, c)) -> (h', c')``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of ``x_t``.
        hidden_channels: channels of ``h`` and ``c``.
        kernel_size: odd kernel size of the gate convolution.
        bias: use a bias in the gate convolution (the forget gate's starts at 1, a standard
            choice that lets the cell remember from the first step).
        time_gap: add one input channel holding the step's time gap (already scaled by the caller).

    Example::

        cell = ConvLSTMCell(spatial_dims=2, in_channels=8, hidden_channels=16)
        h, c = cell(torch.randn(2, 8, 32, 32))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        bias: bool = True,
        time_gap: bool = False,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if in_channels < 1 or hidden_channels < 1:
            raise ValueError(f"in_channels and hidden_channels must be >= 1, got {in_channels}, {hidden_channels}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.hidden_channels = hidden_channels
        self.time_gap = time_gap
        conv_type = Conv[Conv.CONV, spatial_dims]
        extra = 1 if time_gap else 0
        self.gates = conv_type(
            in_channels + hidden_channels + extra, 4 * hidden_channels, kernel_size, padding=kernel_size // 2, bias=bias
        )
        if bias:
            with torch.no_grad():
                self.gates.bias.zero_()
                self.gates.bias[hidden_channels : 2 * hidden_channels].fill_(1.0)

    def init_state(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero ``(h, c)`` for an input ``x`` of shape ``(B, C, *spatial)``."""
        shape = [x.shape[0], self.hidden_channels] + list(x.shape[2:])
        zeros = torch.zeros(shape, dtype=x.dtype, device=x.device)
        return zeros, zeros.clone()

    def forward(
        self,
        x: torch.Tensor,
        state: tuple[torch.Tensor, torch.Tensor] | None = None,
        gap: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            x: ``(B, in_channels, *spatial)``.
            state: ``(h, c)``, each ``(B, hidden_channels, *spatial)``; zeros when ``None``.
            gap: ``(B,)`` time gap of this step (required when built with ``time_gap=True``).
        """
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, *{self.spatial_dims} spatial dims), got {list(x.shape)}."
            )
        if state is None:
            h, c = self.init_state(x)
        else:
            h, c = state
        parts = [x, h]
        if self.time_gap:
            if gap is None:
                raise ValueError("gap is required: the cell was built with time_gap=True.")
            view = [x.shape[0], 1] + [1] * self.spatial_dims
            parts.append(gap.to(x.dtype).reshape(view).expand([x.shape[0], 1] + list(x.shape[2:])))
        i, f, o, g = torch.split(self.gates(torch.cat(parts, dim=1)), self.hidden_channels, dim=1)
        c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_next = torch.sigmoid(o) * torch.tanh(c_next)
        return h_next, c_next


class ConvLSTM(nn.Module):
    """A stack of :class:`ConvLSTMCell` layers over a sequence ``(B, T, C, *spatial)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: channels of each frame.
        hidden_channels: hidden channels per layer (an int repeats for ``num_layers``).
        num_layers: number of stacked layers (ignored when ``hidden_channels`` is a sequence).
        kernel_size: odd gate kernel size.
        return_sequence: return every step's top-layer ``h`` ``(B, T, H, *spatial)`` instead of
            the last one ``(B, H, *spatial)``.
        time_gap: feed each step's time gap to every layer's gates.

    Shapes:
        ``forward(x, mask=None, gaps=None)`` with ``x`` ``(B, T, C, *spatial)``, ``mask`` ``(B, T)``
        (1 = real visit, 0 = padding; a padded step leaves the state unchanged, so the last state
        is that of the last real visit whatever the padding side) and ``gaps`` ``(B, T)``.
        Returns ``(output, (h, c))`` with the top layer's final state.

    Example::

        lstm = ConvLSTM(spatial_dims=3, in_channels=4, hidden_channels=(8, 8), time_gap=True)
        out, (h, c) = lstm(torch.randn(2, 5, 4, 16, 16, 16), mask=torch.ones(2, 5), gaps=torch.rand(2, 5))
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        hidden_channels: Sequence[int] | int,
        num_layers: int = 1,
        kernel_size: int = 3,
        return_sequence: bool = False,
        time_gap: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(hidden_channels, int):
            if num_layers < 1:
                raise ValueError(f"num_layers must be >= 1, got {num_layers}.")
            hidden = [hidden_channels] * num_layers
        else:
            hidden = list(hidden_channels)
            if not hidden:
                raise ValueError("hidden_channels must not be empty.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.hidden_channels = hidden
        self.return_sequence = return_sequence
        self.time_gap = time_gap
        self.cells = nn.ModuleList(
            ConvLSTMCell(spatial_dims, c_in, c_out, kernel_size, time_gap=time_gap)
            for c_in, c_out in zip([in_channels] + hidden[:-1], hidden)
        )

    @property
    def out_channels(self) -> int:
        return self.hidden_channels[-1]

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, gaps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if x.dim() != self.spatial_dims + 3 or x.shape[2] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, T, {self.in_channels}, *{self.spatial_dims} spatial dims), got {list(x.shape)}."
            )
        b, t = x.shape[0], x.shape[1]
        if mask is not None and (mask.dim() != 2 or mask.shape[0] != b or mask.shape[1] != t):
            raise ValueError(f"mask must have shape (B, T) = ({b}, {t}), got {list(mask.shape)}.")
        if self.time_gap and gaps is None:
            raise ValueError("gaps (B, T) is required: the ConvLSTM was built with time_gap=True.")
        if gaps is not None and (gaps.dim() != 2 or gaps.shape[0] != b or gaps.shape[1] != t):
            raise ValueError(f"gaps must have shape (B, T) = ({b}, {t}), got {list(gaps.shape)}.")
        layer_input = x
        h = x.new_zeros(1)
        c = x.new_zeros(1)
        for cell in self.cells:
            h, c = cell.init_state(layer_input[:, 0])
            steps: list[torch.Tensor] = []
            for step in range(t):
                gap = gaps[:, step] if gaps is not None else None
                h_new, c_new = cell(layer_input[:, step], (h, c), gap)
                if mask is not None:
                    keep = mask[:, step].to(x.dtype).reshape([b] + [1] * (self.spatial_dims + 1))
                    h_new = keep * h_new + (1.0 - keep) * h
                    c_new = keep * c_new + (1.0 - keep) * c
                h, c = h_new, c_new
                steps.append(h)
            layer_input = torch.stack(steps, dim=1)
        output = layer_input if self.return_sequence else h
        return output, (h, c)
