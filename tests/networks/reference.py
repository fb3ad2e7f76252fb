"""A per-gate ConvLSTM cell (four separate convolutions), the reference that the fused cell must
match; used by the tests and by benchmarks/convlstm_fused_gates.py."""

from __future__ import annotations

import torch
from torch import nn

from monai_twin.networks import ConvLSTMCell


class PerGateConvLSTMCell(nn.Module):
    """The textbook formulation: one convolution per gate over ``[x, h]``."""

    def __init__(self, fused: ConvLSTMCell) -> None:
        super().__init__()
        conv = type(fused.gates)
        k = fused.gates.kernel_size[0]
        c_in, hid = fused.gates.in_channels, fused.hidden_channels
        self.hidden = hid
        self.convs = nn.ModuleList(conv(c_in, hid, k, padding=k // 2) for _ in range(4))
        with torch.no_grad():  # same parameters as the fused cell, split per gate
            for g, c in enumerate(self.convs):
                c.weight.copy_(fused.gates.weight[g * hid : (g + 1) * hid])
                c.bias.copy_(fused.gates.bias[g * hid : (g + 1) * hid])

    def forward(self, x, state):
        h, c = state
        z = torch.cat([x, h], dim=1)
        i, f, o, g = (conv(z) for conv in self.convs)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c


class TextbookConvLSTMCell(nn.Module):
    """Shi et al.'s formulation as written: per gate, one convolution of ``x`` and one of ``h``
    (eight convolutions), e.g. ``i = sigmoid(W_xi * x + W_hi * h + b_i)``."""

    def __init__(self, fused: ConvLSTMCell) -> None:
        super().__init__()
        conv = type(fused.gates)
        k = fused.gates.kernel_size[0]
        c_x, hid = fused.in_channels, fused.hidden_channels
        self.x_convs = nn.ModuleList(conv(c_x, hid, k, padding=k // 2) for _ in range(4))
        self.h_convs = nn.ModuleList(conv(hid, hid, k, padding=k // 2, bias=False) for _ in range(4))
        with torch.no_grad():
            for g in range(4):
                w = fused.gates.weight[g * hid : (g + 1) * hid]
                self.x_convs[g].weight.copy_(w[:, :c_x])
                self.x_convs[g].bias.copy_(fused.gates.bias[g * hid : (g + 1) * hid])
                self.h_convs[g].weight.copy_(w[:, c_x : c_x + hid])

    def forward(self, x, state):
        h, c = state
        i, f, o, g = (cx(x) + ch(h) for cx, ch in zip(self.x_convs, self.h_convs))
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
