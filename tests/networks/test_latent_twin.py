from __future__ import annotations

import pytest
import torch
from parameterized import parameterized

from monai_twin.networks.diffusion import (
    AutoencoderKLLoss,
    LatentDiffusionTwin,
    TwinConditionEncoder,
    autoencoder_config,
    kl_divergence,
)

pytestmark = pytest.mark.usefixtures("one_thread")


N_CODES, STATIC = 6, 3


def _conditions(b: int = 2, n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "ehr_tokens_code": torch.randint(2, N_CODES, (b, n), generator=g),
        "ehr_tokens_value": torch.randn(b, n, generator=g),
        "ehr_tokens_time": -torch.rand(b, n, generator=g) * 300,
        "ehr_tokens_mask": torch.ones(b, n),
        "ehr_static": torch.randn(b, STATIC, generator=g),
        "gap": torch.rand(b, generator=g) * 300,
    }


def _twin(dims: int, channels: int = 4) -> LatentDiffusionTwin:
    torch.manual_seed(0)
    return LatentDiffusionTwin(dims, channels, N_CODES, STATIC, channels=(16, 32), context_dim=32).eval()


class TestAutoencoderPresets:
    @parameterized.expand(
        [("mammo2d", (1, 1, 64, 64), (1, 4, 16, 16)), ("mri_roi3d", (1, 1, 32, 32, 32), (1, 4, 8, 8, 8))]
    )
    def test_latent_shape(self, kind, image_shape, latent_shape):
        config = autoencoder_config(kind)
        ae = config.build().eval()
        with torch.no_grad():
            recon, z_mu, z_sigma = ae(torch.rand(image_shape))
        assert recon.shape == image_shape and z_mu.shape == latent_shape and z_sigma.shape == latent_shape
        assert config.downsampling == image_shape[-1] // latent_shape[-1]

    def test_kl_and_loss_values(self):
        mu, sigma = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
        assert float(kl_divergence(mu, sigma)) == pytest.approx(0.0, abs=1e-6)
        # KL of N(1, 1) per voxel is 0.5; 256 voxels per sample
        assert float(kl_divergence(mu + 1, sigma)) == pytest.approx(128.0, rel=1e-5)
        loss = AutoencoderKLLoss(autoencoder_config("mammo2d", ssim_weight=0.0, kl_weight=0.0))
        image = torch.rand(2, 1, 16, 16)
        assert float(loss((image + 0.1, mu, sigma), image)) == pytest.approx(0.1, rel=1e-4)

    def test_bad_config(self):
        with pytest.raises(ValueError, match="kind must be one of"):
            autoencoder_config("ct")
        with pytest.raises(ValueError, match="norm_num_groups=8 must divide"):
            autoencoder_config("mammo2d", channels=(12, 24))
        with pytest.raises(TypeError, match="reconstruction, z_mu, z_sigma"):
            AutoencoderKLLoss(autoencoder_config("mammo2d"))(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8))


class TestLatentDiffusionTwin:
    @parameterized.expand([(2, (16, 16)), (3, (8, 8, 8))])
    def test_shapes(self, dims, spatial):
        net = _twin(dims)
        x, prior = torch.randn(2, 4, *spatial), torch.randn(2, 4, *spatial)
        with torch.no_grad():
            out = net(x, torch.tensor([10, 900]), prior=prior, **_conditions())
            context = net.encode_condition(prior, **_conditions())
            again = net(x, torch.tensor([10, 900]), prior=prior, context=context)
        assert out.shape == x.shape
        assert context.shape == (2, 8, 32)
        torch.testing.assert_close(out, again)

    def test_dropped_condition_ignores_the_ehr(self):
        net = _twin(2)
        prior, drop = torch.randn(2, 4, 8, 8), torch.tensor([1.0, 0.0])
        a = net.encode_condition(prior, **_conditions(seed=0), drop_condition=drop)
        b = net.encode_condition(prior, **_conditions(seed=1), drop_condition=drop)
        torch.testing.assert_close(a[0], b[0])  # dropped row: the EHR does not matter
        assert (a[1] - b[1]).abs().max() > 1e-4  # kept row: it does

    def test_padded_tokens_are_invisible(self):
        net = _twin(2)
        prior = torch.randn(2, 4, 8, 8)
        c1, c2 = _conditions(seed=0), _conditions(seed=0)
        c1["ehr_tokens_mask"][:, 3:] = 0
        c2["ehr_tokens_mask"][:, 3:] = 0
        c2["ehr_tokens_code"][:, 3:] = 1
        c2["ehr_tokens_value"][:, 3:] = 99.0
        torch.testing.assert_close(net.encode_condition(prior, **c1), net.encode_condition(prior, **c2))

    def test_event_time_matters(self):
        net = _twin(2)
        prior = torch.randn(2, 4, 8, 8)
        c1, c2 = _conditions(seed=0), _conditions(seed=0)
        c2["ehr_tokens_time"] = c2["ehr_tokens_time"] - 200.0
        assert (net.encode_condition(prior, **c1) - net.encode_condition(prior, **c2)).abs().max() > 1e-4

    def test_diffusion_variable_round_trip(self):
        net = _twin(2)
        net.residual_scale.fill_(0.25)
        target, prior = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
        x = net.to_diffusion(target, prior)
        torch.testing.assert_close(x, (target - prior) / 0.25)
        torch.testing.assert_close(net.from_diffusion(x, prior), target)
        net.residual_scale.fill_(0.0)
        torch.testing.assert_close(net.to_diffusion(target, prior), target)

    def test_bad_input(self):
        net = _twin(2)
        x, t = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
        with pytest.raises(ValueError, match="prior has 3 channels, expected latent_channels=4"):
            net(x, t, prior=torch.randn(2, 3, 8, 8), **_conditions())
        bad = _conditions()
        bad["ehr_tokens_value"][0, 1] = float("nan")
        with pytest.raises(ValueError, match="ehr_tokens_value contains NaN"):
            net(x, t, prior=x, **bad)
        missing = _conditions()
        del missing["gap"]
        with pytest.raises(ValueError, match=r"missing condition\(s\) \['gap'\]"):
            net(x, t, prior=x, **missing)
        short = _conditions()
        short["ehr_static"] = torch.randn(2, 5)
        with pytest.raises(ValueError, match="ehr_static has length 5, the encoder expects 3"):
            net(x, t, prior=x, **short)
        with pytest.raises(ValueError, match="ehr_tokens_mask has batch size 1, expected 2"):
            net(x, t, prior=x, **(_conditions() | {"ehr_tokens_mask": torch.ones(1, 5)}))
        with pytest.raises(ValueError, match="residual_scale must be >= 0"):
            LatentDiffusionTwin(2, 4, N_CODES, STATIC, residual_scale=-1.0)
        with pytest.raises(ValueError, match="num_codes must be >= 2"):
            TwinConditionEncoder(2, 4, num_codes=1, static_dim=0)
