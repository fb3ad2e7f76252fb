from __future__ import annotations

import pytest
import torch
from parameterized import parameterized

from monai_twin.inferers import LatentTwinInferer, TwinDiffusionInferer, make_scheduler, save_forecast_png
from monai_twin.networks.diffusion import LatentDiffusionTwin, autoencoder_config

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


def _setup(dims: int = 2, kind: str = "ddim"):
    torch.manual_seed(0)
    ae_kind = "mammo2d" if dims == 2 else "mri_roi3d"
    ae = autoencoder_config(ae_kind, channels=(8, 16)).build().eval()
    net = LatentDiffusionTwin(dims, 4, N_CODES, STATIC, channels=(16, 32), context_dim=32).eval()
    net.residual_scale.fill_(0.1)
    # MONAI zero-initialises the UNet's output and attention projections: untrained, it would ignore its inputs
    with torch.no_grad():
        for p in net.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return LatentTwinInferer(make_scheduler(kind), ae, scale_factor=1.0, num_inference_steps=4), net


class TestScheduler:
    def test_kinds(self):
        from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler

        assert isinstance(make_scheduler("ddim"), DDIMScheduler) and not make_scheduler("ddim").clip_sample
        assert isinstance(make_scheduler("ddpm"), DDPMScheduler)
        assert isinstance(make_scheduler("rflow"), RFlowScheduler)
        with pytest.raises(ValueError, match="scheduler kind must be"):
            make_scheduler("euler")


class TestForecast:
    @parameterized.expand([(2, (16, 16), "ddim"), (3, (8, 8, 8), "ddim"), (2, (16, 16), "rflow")])
    def test_mean_and_std(self, dims, spatial, kind):
        inferer, net = _setup(dims, kind)
        prior = torch.rand(2, 1, *spatial)
        out = inferer.forecast(prior, net, _conditions(), n_samples=3, seed=0)
        assert out["samples"].shape == (3, 2, 1, *spatial)
        torch.testing.assert_close(out["mean"], out["samples"].mean(0))
        torch.testing.assert_close(out["std"], out["samples"].std(0))
        assert float(out["std"].min()) >= 0 and float(out["std"].max()) > 0  # different noise, different samples
        again = inferer.forecast(prior, net, _conditions(), n_samples=3, seed=0)
        torch.testing.assert_close(out["mean"], again["mean"])  # seeded
        single = inferer.forecast(prior, net, _conditions(), n_samples=1, seed=0)
        assert float(single["std"].abs().max()) == 0.0

    def test_residual_decode_keeps_the_prior_when_the_change_is_zero(self):
        inferer, net = _setup()
        net.residual_scale.fill_(1e-8)  # the sampled change is scaled to ~0: the forecast is the prior
        prior = torch.rand(1, 1, 16, 16)
        out = inferer.forecast(prior, net, _conditions(b=1), n_samples=2)
        torch.testing.assert_close(out["mean"], prior, atol=1e-4, rtol=0)

    def test_guidance_changes_the_sample(self):
        inferer, net = _setup()
        prior = torch.rand(2, 1, 16, 16)
        plain = inferer.forecast(prior, net, _conditions(), n_samples=1, guidance_scale=1.0)["mean"]
        guided = inferer.forecast(prior, net, _conditions(), n_samples=1, guidance_scale=3.0)["mean"]
        assert (plain - guided).abs().max() > 1e-6

    def test_pixel_space(self):
        torch.manual_seed(0)
        net = LatentDiffusionTwin(2, 1, N_CODES, STATIC, channels=(16, 32), context_dim=32).eval()
        inferer = LatentTwinInferer(make_scheduler("ddim"), None, num_inference_steps=3)
        out = inferer.forecast(torch.rand(2, 1, 16, 16), net, _conditions(), n_samples=2)
        assert out["mean"].shape == (2, 1, 16, 16)

    def test_bad_input(self):
        inferer, net = _setup()
        prior = torch.rand(2, 1, 16, 16)
        missing = _conditions()
        del missing["ehr_static"]
        with pytest.raises(KeyError, match="missing \\['ehr_static'\\]"):
            inferer.forecast(prior, net, missing)
        with pytest.raises(ValueError, match="prior_image contains NaN"):
            inferer.forecast(prior * float("nan"), net, _conditions())
        with pytest.raises(ValueError, match="conditions\\['gap'\\] has batch size 3, prior_image has 2"):
            inferer.forecast(prior, net, _conditions() | {"gap": torch.zeros(3)})
        with pytest.raises(ValueError, match="n_samples must be >= 1"):
            inferer.forecast(prior, net, _conditions(), n_samples=0)
        with pytest.raises(ValueError, match="noise must have shape"):
            inferer.forecast(prior, net, _conditions(), n_samples=2, noise=torch.randn(2, 2, 4, 4, 4))
        with pytest.raises(ValueError, match="scale_factor must be > 0"):
            LatentTwinInferer(make_scheduler("ddim"), None, scale_factor=0.0)
        with pytest.raises(ValueError, match="keyword conditions"):
            TwinDiffusionInferer(make_scheduler("ddim"))(
                torch.randn(1, 4, 4, 4), net, torch.randn(1, 4, 4, 4), torch.tensor([1]), condition=torch.ones(1)
            )


class TestWhatIf:
    def test_unchanged_events_give_zero_difference(self):
        inferer, net = _setup()
        prior = torch.rand(2, 1, 16, 16)
        out = inferer.what_if(prior, net, _conditions(), _conditions(), n_samples=2, seed=3)
        assert float(out["difference"].abs().max()) == 0.0
        torch.testing.assert_close(out["baseline"], out["counterfactual"])

    def test_edited_events_change_the_forecast(self):
        inferer, net = _setup()
        prior = torch.rand(2, 1, 16, 16)
        edited = _conditions()
        edited["ehr_tokens_value"] = edited["ehr_tokens_value"] * 0.0
        out = inferer.what_if(prior, net, _conditions(), edited, n_samples=2, seed=3)
        assert float(out["difference"].abs().max()) > 1e-6
        torch.testing.assert_close(out["difference"], out["counterfactual"] - out["baseline"])

    def test_pngs(self, tmp_path):
        from monai_twin.inferers import save_what_if_png

        inferer, net = _setup()
        prior = torch.rand(1, 1, 16, 16)
        out = inferer.forecast(prior, net, _conditions(b=1), n_samples=2)
        path = save_forecast_png(out, tmp_path / "f.png", prior=prior, target=prior)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        wi = inferer.what_if(prior, net, _conditions(b=1), _conditions(b=1, seed=2), n_samples=2)
        assert save_what_if_png(wi, tmp_path / "w.png").stat().st_size > 1000
        with pytest.raises(KeyError, match="has no 'std'"):
            save_forecast_png({"mean": prior}, tmp_path / "x.png")


class TestStochasticSteps:
    def test_eta_adds_step_noise_reproducibly(self):
        inferer, net = _setup()
        prior = torch.rand(2, 1, 16, 16)
        still = inferer.forecast(prior, net, _conditions(), n_samples=3, seed=5)
        noisy = inferer.forecast(prior, net, _conditions(), n_samples=3, seed=5, eta=1.0)
        again = inferer.forecast(prior, net, _conditions(), n_samples=3, seed=5, eta=1.0)
        other = inferer.forecast(prior, net, _conditions(), n_samples=3, seed=6, eta=1.0)
        torch.testing.assert_close(noisy["samples"], again["samples"])
        torch.testing.assert_close(noisy["noise"], still["noise"])  # the starting noise is the same draw
        assert float((noisy["samples"] - still["samples"]).abs().max()) > 1e-6
        assert float((noisy["samples"] - other["samples"]).abs().max()) > 1e-6
        # the inferer's default
        default = LatentTwinInferer(inferer.scheduler, inferer.autoencoder, num_inference_steps=4, eta=1.0)
        torch.testing.assert_close(default.forecast(prior, net, _conditions(), 3, seed=5)["samples"], noisy["samples"])

    def test_what_if_shares_the_step_noise(self):
        inferer, net = _setup()
        prior = torch.rand(2, 1, 16, 16)
        same = inferer.what_if(prior, net, _conditions(), _conditions(), n_samples=2, seed=3, eta=1.0)
        assert float(same["difference"].abs().max()) == 0.0
        edited = _conditions()
        edited["ehr_tokens_value"] = edited["ehr_tokens_value"] * 0.0
        out = inferer.what_if(prior, net, _conditions(), edited, n_samples=2, seed=3, eta=1.0)
        assert float(out["difference"].abs().max()) > 1e-6
        with pytest.raises(ValueError, match="needs a seed"):
            inferer.what_if(prior, net, _conditions(), edited, n_samples=2, seed=None, eta=1.0)

    def test_bad_eta(self):
        inferer, net = _setup()
        prior = torch.rand(1, 1, 16, 16)
        with pytest.raises(ValueError, match="eta must be >= 0"):
            LatentTwinInferer(make_scheduler("ddim"), None, eta=-1.0)
        with pytest.raises(ValueError, match="eta must be >= 0"):
            inferer.forecast(prior, net, _conditions(b=1), n_samples=2, eta=-0.5)
        rflow, net = _setup(kind="rflow")
        with pytest.raises(ValueError, match="eta > 0 needs a DDIM scheduler"):
            rflow.forecast(prior, net, _conditions(b=1), n_samples=2, eta=1.0)
