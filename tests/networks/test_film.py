from __future__ import annotations

import pytest
import torch
from parameterized import parameterized

from monai_twin.networks import EHREncoder, FiLM, STFiLM


class TestFiLM:
    @parameterized.expand([(2, (8, 8)), (3, (4, 4, 4))])
    def test_identity_at_init_and_affine_after(self, dims, spatial):
        film = FiLM(dims, 3, 5)
        x, z = torch.randn(2, 3, *spatial), torch.randn(2, 5)
        torch.testing.assert_close(film(x, z), x)
        with torch.no_grad():
            film.to_gamma_beta.bias.copy_(torch.tensor([1.0, 0.0, -0.5, 0.2, 0.0, 3.0]))
        y = film(x, z)
        torch.testing.assert_close(y[:, 0], 2 * x[:, 0] + 0.2)
        torch.testing.assert_close(y[:, 2], 0.5 * x[:, 2] + 3.0)

    def test_bad_cond(self):
        with pytest.raises(ValueError, match=r"cond must have shape \(B, cond_dim\) = \(2, 5\)"):
            FiLM(2, 3, 5)(torch.randn(2, 3, 4, 4), torch.randn(2, 4))


class TestSTFiLM:
    def test_identity_at_init(self):
        st = STFiLM(2, 4, 6)
        x, z = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 6)
        torch.testing.assert_close(st(x, z), x)

    def test_spatially_and_temporally_varying(self):
        torch.manual_seed(0)
        st = STFiLM(2, 2, 3, hidden=8)
        torch.nn.init.normal_(st.to_gamma_beta.weight, std=0.5)
        frame = torch.randn(1, 1, 2, 8, 8)
        x = frame.repeat(1, 3, 1, 1, 1)  # the same frame three times
        z = torch.tensor([[[0.0, 0, 0], [0.0, 0, 0], [2.0, -1, 1]]])
        y = st(x, z)
        torch.testing.assert_close(y[:, 0], y[:, 1])  # same frame, same condition
        assert not torch.allclose(y[:, 0], y[:, 2])  # the condition of step t acts on frame t only
        gamma_map = (y[0, 2] - x[0, 2]) / x[0, 2].clamp(min=1e-3)
        assert float(gamma_map.std()) > 1e-3  # the modulation varies over space

    def test_errors(self):
        st = STFiLM(3, 4, 6)
        with pytest.raises(ValueError, match=r"cond must have shape \(B, T, cond_dim\)"):
            st(torch.randn(2, 3, 4, 4, 4, 4), torch.randn(2, 6))
        with pytest.raises(ValueError, match="4 channels"):
            st(torch.randn(2, 5, 4, 4, 4), torch.randn(2, 6))


class TestEHREncoder:
    def test_shapes_and_mask(self):
        torch.manual_seed(0)
        enc = EHREncoder(interval_dim=3, static_dim=2, embed_dim=8)
        times = torch.tensor([[400.0, 100.0]])
        iv, st = torch.randn(1, 2, 3), torch.randn(1, 2)
        z = enc(times, iv, torch.ones(1, 2, 3), st)
        assert z.shape == (1, 2, 8)
        torch.testing.assert_close(enc(times, iv, None, st), z)
        # values and masks both reach the network: a carried-forward value (mask 0) is still seen
        masked = torch.tensor([[[1.0, 0, 1], [1, 1, 1]]])
        iv2 = iv.clone()
        iv2[0, 0, 1] = 99.0
        assert not torch.allclose(enc(times, iv2, masked, st), enc(times, iv, masked, st))
        assert not torch.allclose(enc(times, iv, masked, st), z)

    def test_raw_magnitudes_are_compressed(self):
        """Interval features enter through sign(x) log(1 + |x|): an exposure of 10^4 dose x days is ~9.2,
        not 10^4, and doubling it is still seen."""
        torch.manual_seed(0)
        enc = EHREncoder(interval_dim=2, static_dim=0, embed_dim=8)
        times = torch.tensor([[300.0]])
        x = torch.tensor([[[-0.5, 1.0e4]]])
        m = torch.ones_like(x)
        first = torch.cat([torch.tensor([[[-0.405465, 9.21044]]]), m, torch.log1p(times / 365.0).unsqueeze(-1)], -1)
        torch.testing.assert_close(enc(times, x, m), enc.mlp(first), atol=1e-4, rtol=1e-4)
        assert not torch.allclose(enc(times, x, m), enc(times, 2 * x, m))

    @parameterized.expand(
        [
            ("nan", "ehr_intervals contains NaN"),
            ("t", r"ehr_intervals must have shape \(B, T, F\) = \(1, 2, 3\)"),
            ("static", r"ehr_static must have shape"),
            ("missing", "ehr_intervals .* is required"),
        ]
    )
    def test_errors(self, case, match):
        enc = EHREncoder(3, 2, 8)
        times, iv, st = torch.ones(1, 2), torch.zeros(1, 2, 3), torch.zeros(1, 2)
        if case == "nan":
            iv[0, 1, 2] = float("nan")
        if case == "t":
            iv = torch.zeros(1, 3, 3)
        if case == "static":
            st = torch.zeros(1, 4)
        with pytest.raises(ValueError, match=match):
            enc(times, None if case == "missing" else iv, None, st)
