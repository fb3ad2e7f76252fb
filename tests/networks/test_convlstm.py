from __future__ import annotations

import pytest
import torch
from parameterized import parameterized

from monai_twin.networks import ConvLSTM, ConvLSTMCell
from tests.networks.reference import PerGateConvLSTMCell, TextbookConvLSTMCell

SHAPES = [(2, (12, 10)), (3, (6, 8, 4))]


class TestConvLSTMCell:
    @parameterized.expand(SHAPES)
    def test_shapes_and_forget_bias(self, dims, spatial):
        cell = ConvLSTMCell(dims, in_channels=3, hidden_channels=5)
        h, c = cell(torch.randn(2, 3, *spatial))
        assert h.shape == c.shape == (2, 5, *spatial)
        assert torch.all(cell.gates.bias[5:10] == 1) and torch.all(cell.gates.bias[:5] == 0)
        assert float(h.detach().abs().max()) < 1.0  # o * tanh(c) is bounded

    @parameterized.expand(SHAPES)
    def test_matches_per_gate_reference(self, dims, spatial):
        torch.manual_seed(0)
        cell = ConvLSTMCell(dims, 3, 4)
        x = torch.randn(2, 3, *spatial)
        state = (torch.randn(2, 4, *spatial), torch.randn(2, 4, *spatial))
        for ref in (PerGateConvLSTMCell(cell), TextbookConvLSTMCell(cell)):
            for a, b in zip(cell(x, state), ref(x, state)):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)

    def test_time_gap_changes_output(self):
        torch.manual_seed(0)
        cell = ConvLSTMCell(2, 2, 3, time_gap=True)
        x = torch.randn(1, 2, 8, 8)
        h0, _ = cell(x, gap=torch.tensor([0.1]))
        h1, _ = cell(x, gap=torch.tensor([2.0]))
        assert not torch.allclose(h0, h1)
        with pytest.raises(ValueError, match="gap is required"):
            cell(x)

    @parameterized.expand(
        [
            ({"spatial_dims": 1, "in_channels": 1, "hidden_channels": 1}, "spatial_dims"),
            ({"spatial_dims": 2, "in_channels": 0, "hidden_channels": 1}, "in_channels"),
            ({"spatial_dims": 2, "in_channels": 1, "hidden_channels": 1, "kernel_size": 4}, "kernel_size"),
        ]
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ConvLSTMCell(**kwargs)

    def test_bad_input(self):
        cell = ConvLSTMCell(2, 3, 4)
        with pytest.raises(ValueError, match=r"x must have shape \(B, 3"):
            cell(torch.randn(1, 2, 8, 8))


class TestConvLSTM:
    @parameterized.expand(SHAPES)
    def test_sequence_and_layers(self, dims, spatial):
        lstm = ConvLSTM(dims, 2, (4, 6), return_sequence=True)
        out, (h, c) = lstm(torch.randn(3, 5, 2, *spatial))
        assert out.shape == (3, 5, 6, *spatial) and h.shape == (3, 6, *spatial)
        torch.testing.assert_close(out[:, -1], h)
        last, _ = ConvLSTM(dims, 2, 4, num_layers=2)(torch.randn(3, 5, 2, *spatial))
        assert last.shape == (3, 4, *spatial)

    def test_padding_leaves_state_unchanged(self):
        torch.manual_seed(1)
        lstm = ConvLSTM(2, 2, 4, time_gap=True)
        seq = torch.randn(1, 2, 2, 8, 8)
        gaps = torch.tensor([[0.5, 0.2]])
        ref, (h_ref, c_ref) = lstm(seq, gaps=gaps)
        pad = torch.randn(1, 1, 2, 8, 8)
        right, (h_r, c_r) = lstm(torch.cat([seq, pad], 1), torch.tensor([[1.0, 1, 0]]), torch.tensor([[0.5, 0.2, 9.0]]))
        left, _ = lstm(torch.cat([pad, seq], 1), torch.tensor([[0.0, 1, 1]]), torch.tensor([[9.0, 0.5, 0.2]]))
        torch.testing.assert_close(right, ref)
        torch.testing.assert_close(left, ref)
        torch.testing.assert_close(c_r, c_ref)

    def test_errors(self):
        lstm = ConvLSTM(2, 2, 4, time_gap=True)
        x = torch.randn(2, 3, 2, 8, 8)
        with pytest.raises(ValueError, match="gaps"):
            lstm(x)
        with pytest.raises(ValueError, match=r"mask must have shape \(B, T\) = \(2, 3\)"):
            lstm(x, torch.ones(2, 4), torch.ones(2, 3))
        with pytest.raises(ValueError, match=r"x must have shape \(B, T, 2"):
            lstm(torch.randn(2, 3, 5, 8, 8), gaps=torch.ones(2, 3))
        with pytest.raises(ValueError, match="hidden_channels must not be empty"):
            ConvLSTM(2, 2, [])

    def test_torchscript(self):
        lstm = ConvLSTM(3, 1, 3, time_gap=True)
        scripted = torch.jit.script(lstm)
        x, m, g = torch.randn(1, 2, 1, 6, 6, 6), torch.ones(1, 2), torch.rand(1, 2)
        torch.testing.assert_close(scripted(x, m, g)[0], lstm(x, m, g)[0])
