"""Residual diffusion on a deterministic base forecast (``LatentDiffusionTwin(base_forecast=True)``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_twin.engines import DiffusionTwinPrepareBatch, null_ehr_sample, train_diffusion_twin
from monai_twin.inferers import LatentTwinInferer, make_scheduler
from monai_twin.networks.diffusion import LatentDiffusionTwin, autoencoder_config
from tests.engines.test_diffusion_interval import _conditions

pytestmark = pytest.mark.usefixtures("one_thread")


def _net(base_forecast: bool, perturb: bool = True) -> LatentDiffusionTwin:
    torch.manual_seed(0)
    net = LatentDiffusionTwin(2, 4, 6, 3, channels=(16, 32), context_dim=32, base_forecast=base_forecast).eval()
    if perturb:  # MONAI zero-initialises the UNet's output layers: an untrained twin outputs zeros
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return net


class TestNetwork:
    def test_base_latent_is_an_input_and_the_reference_of_the_change(self):
        net = _net(True)
        x, prior, base, t = (
            torch.randn(2, 4, 8, 8),
            torch.randn(2, 4, 8, 8),
            torch.randn(2, 4, 8, 8),
            torch.tensor([5, 900]),
        )
        c = _conditions(2)
        with torch.no_grad():
            out = net(x, t, prior, **c, base=base)
            assert out.shape == x.shape
            assert not torch.allclose(out, net(x, t, prior, **c, base=base + 1.0))  # the base reaches the UNet
            context = net.encode_condition(prior, **c)  # the prior and the EHR stay in the condition
            torch.testing.assert_close(net(x, t, prior, context=context, base=base), out)
            assert not torch.allclose(net(x, t, prior + 1.0, **c, base=base), out)
        net.residual_scale.fill_(0.5)
        target = torch.randn(2, 4, 8, 8)
        z = net.to_diffusion(target, prior, base)
        torch.testing.assert_close(z, (target - base) / 0.5)
        torch.testing.assert_close(net.from_diffusion(z, prior, base), target)
        # without a base: the change from the prior, as before
        torch.testing.assert_close(net.to_diffusion(target, prior), (target - prior) / 0.5)

    def test_base_is_required_exactly_when_configured(self):
        x, prior, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([3])
        with pytest.raises(ValueError, match="needs base="):
            _net(True)(x, t, prior, **_conditions(1))
        with pytest.raises(ValueError, match="base_forecast=False"):
            _net(False)(x, t, prior, **_conditions(1), base=prior)
        with pytest.raises(ValueError, match="must have the same shape"):
            _net(True)(x, t, prior, **_conditions(1), base=torch.randn(1, 4, 4, 4))


class TestTraining:
    def _batch(self, b: int = 4) -> dict[str, torch.Tensor]:
        return {
            "prior": torch.randn(b, 4, 8, 8),
            "target": torch.randn(b, 4, 8, 8),
            "base": torch.randn(b, 4, 8, 8),
        } | _conditions(b)

    def test_prepare_batch_diffuses_the_change_from_the_base(self):
        batch = self._batch()
        x0, target, _, kwargs = DiffusionTwinPrepareBatch(make_scheduler("ddim", prediction_type="sample"), 2.0)(batch)
        torch.testing.assert_close(x0, (batch["target"] - batch["base"]) / 2.0)
        torch.testing.assert_close(target, x0)
        torch.testing.assert_close(kwargs["base"], batch["base"])
        torch.testing.assert_close(kwargs["prior"], batch["prior"])
        without = {k: v for k, v in batch.items() if k != "base"}
        x0, _, _, kwargs = DiffusionTwinPrepareBatch(make_scheduler("ddim"), 2.0)(without)
        torch.testing.assert_close(x0, (batch["target"] - batch["prior"]) / 2.0)
        assert "base" not in kwargs

    def test_train_fits_the_scale_of_the_residual_and_learns(self):
        g = torch.Generator().manual_seed(1)
        samples = []
        for i in range(16):
            prior = torch.randn(4, 8, 8, generator=g)
            base = prior + torch.randn(4, 8, 8, generator=g)  # far from the prior ...
            target = base + 0.1 * torch.randn(4, 8, 8, generator=g)  # ... the target close to the base
            samples.append(
                {"prior": prior, "target": target, "base": base} | {k: v[0] for k, v in _conditions(1, seed=i).items()}
            )
        net = _net(True, perturb=False).train()
        scheduler = make_scheduler("ddim", prediction_type="sample")
        losses = train_diffusion_twin(net, scheduler, samples, epochs=15, batch_size=16, lr=3e-3)
        assert float(net.residual_scale) == pytest.approx(0.1, rel=0.2)  # the std of target - base, not - prior
        assert np.mean(losses[-3:]) < np.mean(losses[:3])
        with pytest.raises(KeyError, match="has base_forecast=True but samples"):
            train_diffusion_twin(net, scheduler, [{k: v for k, v in s.items() if k != "base"} for s in samples])
        with pytest.raises(KeyError, match="has base_forecast=False but samples"):
            train_diffusion_twin(_net(False), scheduler, samples)

    def test_null_pair_base_is_the_prior(self):
        prior = torch.rand(1, 16, 16)
        sample = {"prior_image": prior, "base_image": torch.rand(1, 16, 16)} | {
            k: v[0] for k, v in _conditions(1).items()
        }
        out = null_ehr_sample(sample, np.random.default_rng(0))
        torch.testing.assert_close(out["base_image"], prior)
        assert not torch.equal(sample["base_image"], prior)  # the input is not modified


@pytest.fixture(scope="module")
def setup():
    """A tiny untrained autoencoder, a prior image, a base forecast and conditions."""
    config = autoencoder_config("mammo2d", channels=(8, 16))
    torch.manual_seed(0)
    ae = config.build().eval()
    g = torch.Generator().manual_seed(0)
    prior = torch.rand(2, 1, 32, 32, generator=g)
    base = (prior + 0.2 * torch.rand(2, 1, 32, 32, generator=g)).clamp(0, 1)
    return ae, prior, base, _conditions(2)


class TestInferer:
    def test_an_untrained_clean_sample_twin_returns_the_base(self, setup):
        ae, prior, base, c = setup
        inferer = LatentTwinInferer(make_scheduler("ddim", prediction_type="sample"), ae, num_inference_steps=3)
        # zero output = zero change: the forecast is the base forecast exactly (base + D(z_base) - D(z_base))
        out = inferer.forecast(prior, _net(True, perturb=False), c, 2, base_image=base)
        torch.testing.assert_close(out["mean"], base)
        assert float(out["std"].abs().max()) == 0.0
        # the default twin: the prior
        torch.testing.assert_close(inferer.forecast(prior, _net(False, perturb=False), c, 2)["mean"], prior)
        # what-if: the edited base forecast carries the effect; shared noise, same base -> exactly zero
        edited_base = (base + 0.1).clamp(0, 1)
        net = _net(True, perturb=False)
        wi = inferer.what_if(prior, net, c, c, 2, base_image=base, edited_base_image=edited_base)
        torch.testing.assert_close(wi["difference"], edited_base - base)
        same = inferer.what_if(prior, _net(True), c, c, 2, base_image=base)
        assert float(same["difference"].abs().max()) == 0.0

    def test_samples_spread_around_the_base_and_the_floor_keeps_it(self, setup):
        ae, prior, base, c = setup
        net = _net(True)
        scheduler = make_scheduler("ddim", prediction_type="sample")
        raw = LatentTwinInferer(scheduler, ae, num_inference_steps=2).forecast(prior, net, c, 3, base_image=base)
        assert float(raw["std"].max()) > 0.0
        floor = 0.05
        out = LatentTwinInferer(scheduler, ae, num_inference_steps=2, change_threshold=floor).forecast(
            prior, net, c, 3, base_image=base
        )
        change, raw_change = out["mean"] - base, raw["mean"] - base
        small = raw_change.abs() <= floor
        assert bool(small.any()) and bool((~small).any())
        assert float(change[small].abs().max()) == 0.0  # below the floor: the base forecast itself
        torch.testing.assert_close(change[~small], raw_change[~small])
        torch.testing.assert_close(out["std"], raw["std"])

    def test_base_image_checks(self, setup):
        ae, prior, base, c = setup
        inferer = LatentTwinInferer(make_scheduler("ddim"), ae, num_inference_steps=2)
        with pytest.raises(ValueError, match="base_image= is required"):
            inferer.forecast(prior, _net(True), c, 2)
        with pytest.raises(ValueError, match="base_image= is required"):
            inferer.forecast(prior, _net(False), c, 2, base_image=base)
        with pytest.raises(ValueError, match="must match prior_image"):
            inferer.forecast(prior, _net(True), c, 2, base_image=base[:, :, :16])
