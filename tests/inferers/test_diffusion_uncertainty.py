"""``summarise_uncertainty``: one uncertainty number per visit from the samples' std map, on the
std maps of forecasts of synthetic mammography scans."""

from __future__ import annotations

import pytest
import torch

from monai_twin.engines import twin_conditions
from monai_twin.inferers import DIFFUSION_CONDITION_KEYS, LatentTwinInferer, make_scheduler
from monai_twin.inferers.diffusion import UNCERTAINTY_SUMMARIES, summarise_uncertainty
from monai_twin.networks.diffusion import LatentDiffusionTwin, autoencoder_config
from tests.conftest import aligned_scan, small_mammo_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def forecast(tmp_path_factory):
    """Forecasts (4 samples) of four synthetic visits by an untrained (perturbed) twin: priors,
    targets and the output of ``LatentTwinInferer.forecast``."""
    _, items, vocabulary = small_mammo_cohort(tmp_path_factory.mktemp("unc") / "c", 3, 0)
    items = items[:4]
    torch.manual_seed(0)
    samples = [twin_conditions(item, vocabulary, max_tokens=8) for item in items]
    conditions = {k: torch.stack([s[k] for s in samples]) for k in DIFFUSION_CONDITION_KEYS}
    prior = torch.stack([aligned_scan(item["history"][-1]) for item in items])
    target = torch.stack([aligned_scan(item["target"]) for item in items])
    ae = autoencoder_config("mammo2d", channels=(8, 16)).build().eval()
    net = LatentDiffusionTwin(
        2, 4, vocabulary.size, conditions["ehr_static"].shape[1], channels=(16, 32), context_dim=32
    )
    net.residual_scale.fill_(0.1)
    with torch.no_grad():  # MONAI zero-initialises the UNet's output layer: untrained, the samples would agree
        for p in net.denoiser.parameters():
            p.add_(0.02 * torch.randn_like(p))
    inferer = LatentTwinInferer(make_scheduler("ddim"), ae, num_inference_steps=3)
    out = inferer.forecast(prior, net.eval(), conditions, n_samples=4, seed=0)
    return prior, target, out


def test_image_and_top5(forecast):
    _, _, out = forecast
    std = out["std"]
    assert float(std.max()) > 0  # the samples differ
    image = summarise_uncertainty(std)
    torch.testing.assert_close(image, std.flatten(1).mean(1))
    top = summarise_uncertainty(std, "top5")
    assert top.shape == (std.shape[0],)
    assert bool((top >= image).all())  # the largest 5 % average at least the whole image
    k = round(0.05 * std[0].numel())
    torch.testing.assert_close(top[0], std[0].flatten().sort(descending=True).values[:k].mean())


def test_change_region(forecast):
    prior, target, out = forecast
    std = out["std"]
    # no predicted change anywhere: nothing moves, the summary is 0
    zero = summarise_uncertainty(std, "change", prior=prior, base=prior)
    assert float(zero.abs().max()) == 0.0
    # a base that moves every pixel by more than the floor: the whole image counts
    torch.testing.assert_close(
        summarise_uncertainty(std, "change", prior=prior, base=prior + 0.1), std.flatten(1).mean(1)
    )
    # the true next scan as the base: between the two, the std where the scans differ by more than 0.02
    moved = (target - prior).abs() > 0.02
    expected = (std * moved).flatten(1).sum(1) / std[0].numel()
    torch.testing.assert_close(summarise_uncertainty(std, "change", prior=prior, base=target), expected)
    with pytest.raises(ValueError, match="needs prior= and base="):
        summarise_uncertainty(std, "change", prior=prior)


def test_image_plus_history(forecast):
    prior, _, out = forecast
    std = out["std"]
    # no spread of the base forecaster: the sample std alone
    torch.testing.assert_close(
        summarise_uncertainty(std, "image+history", base_std=torch.zeros_like(std)), summarise_uncertainty(std)
    )
    # independent sources add in variance: never below either one's mean
    base_std = 0.5 * (prior - prior.mean()).abs()
    both = summarise_uncertainty(std, "image+history", base_std=base_std)
    assert bool((both >= summarise_uncertainty(std) - 1e-7).all())
    assert bool((both >= base_std.flatten(1).mean(1) - 1e-7).all())
    torch.testing.assert_close(both, (std**2 + base_std**2).sqrt().flatten(1).mean(1))
    with pytest.raises(ValueError, match="needs base_std="):
        summarise_uncertainty(std, "image+history")
    with pytest.raises(ValueError, match="same shape"):
        summarise_uncertainty(std, "image+history", base_std=base_std[:, :, :8])


def test_unknown_summary(forecast):
    assert "image" in UNCERTAINTY_SUMMARIES
    with pytest.raises(ValueError, match="summary must be one of"):
        summarise_uncertainty(forecast[2]["std"], "median")
