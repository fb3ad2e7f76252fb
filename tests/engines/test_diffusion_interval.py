"""The diffusion twin's direct EHR path (interval features -> timestep embedding) and x0 / v targets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_twin.engines import (
    DiffusionTwinPrepareBatch,
    encode_latents,
    null_ehr_sample,
    train_autoencoder,
    train_diffusion_twin,
    twin_conditions,
)
from monai_twin.inferers import DIFFUSION_CONDITION_KEYS, DIFFUSION_OPTIONAL_KEYS, LatentTwinInferer, make_scheduler
from monai_twin.networks.diffusion import LatentDiffusionTwin
from tests.conftest import aligned_scan, small_mammo_cohort

KEYS = DIFFUSION_CONDITION_KEYS + DIFFUSION_OPTIONAL_KEYS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return small_mammo_cohort(tmp_path_factory.mktemp("di") / "c", 8, 1)


def _dose_after_last_scan(item) -> float:
    from monai_twin.data import running_dose

    times, doses = running_dose(item["events"], "DRUG//tamoxifen")
    k = np.searchsorted(times, item["history_times"][-1], side="right") - 1
    return float(doses[k]) if k >= 0 else 0.0


def _exposure_columns(vocabulary) -> list[int]:
    from monai_twin.transforms.ehr import EHRToIntervalFeaturesd

    names = EHRToIntervalFeaturesd(vocabulary).feature_names
    return [i for i, n in enumerate(names) if n.endswith(":exposure")]


def _stopped(item):
    from monai_twin.data import edit_events

    last = item["history_times"][-1]
    return dict(item, events=edit_events(item["events"], "DRUG//tamoxifen", value=0.0, after=last))


class TestIntervalConditions:
    def test_exposure_follows_a_dose_edit(self, cohort):
        _, items, vocabulary = cohort
        item = next(it for it in items if _dose_after_last_scan(it) > 0)
        c = twin_conditions(item, vocabulary, max_tokens=16)
        columns = _exposure_columns(vocabulary)
        assert c["ehr_interval"].ndim == 1 and c["ehr_interval"].shape == c["ehr_interval_mask"].shape
        assert columns and c["ehr_interval"].shape[0] >= len(columns)
        gap = item["target_time"] - item["history_times"][-1]
        # dose x days over the interval: the running dose over the whole gap here
        exposure = float(c["ehr_interval"][columns].sum())
        assert exposure == pytest.approx(_dose_after_last_scan(item) * gap, rel=0.05)
        stopped = twin_conditions(_stopped(item), vocabulary, max_tokens=16)
        assert float(stopped["ehr_interval"][columns].abs().sum()) == pytest.approx(0.0, abs=1e-3)
        assert "ehr_interval" not in twin_conditions(item, vocabulary, max_tokens=16, intervals=False)

    def test_null_pair_has_no_interval_events(self, cohort):
        folder, items, vocabulary = cohort
        item = next(it for it in items if _dose_after_last_scan(it) > 0)
        sample = twin_conditions(item, vocabulary, 16) | {"prior_image": aligned_scan(item["history"][-1])}
        out = null_ehr_sample(sample, np.random.default_rng(0))
        assert float(out["ehr_interval"].abs().sum()) == 0.0 and float(out["ehr_interval_mask"].sum()) == 0.0
        assert float(sample["ehr_interval"].abs().sum()) > 0.0  # the input is not modified


def _net(interval_dim: int, dims: int = 2) -> LatentDiffusionTwin:
    torch.manual_seed(0)
    net = LatentDiffusionTwin(dims, 4, 6, 3, channels=(16, 32), context_dim=32, interval_dim=interval_dim).eval()
    with torch.no_grad():  # MONAI zero-initialises the UNet's output layers (and this twin its null token)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _conditions(b: int, f: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random twin conditions for ``b`` items: five event tokens, three static values, the gap and,
    with ``f > 0``, ``f`` interval features."""
    g = torch.Generator().manual_seed(seed)
    conditions = {
        "ehr_tokens_code": torch.randint(2, 6, (b, 5), generator=g),
        "ehr_tokens_value": torch.randn(b, 5, generator=g),
        "ehr_tokens_time": -torch.rand(b, 5, generator=g) * 300,
        "ehr_tokens_mask": torch.ones(b, 5),
        "ehr_static": torch.randn(b, 3, generator=g),
        "gap": torch.rand(b, generator=g) * 300,
    }
    if f:
        conditions |= {"ehr_interval": torch.rand(b, f, generator=g) * 5000, "ehr_interval_mask": torch.ones(b, f)}
    return conditions


class TestIntervalPath:
    @pytest.mark.parametrize("dims,spatial", [(2, (8, 8)), (3, (4, 4, 4))])
    def test_interval_features_reach_the_denoiser(self, dims, spatial):
        net = _net(7, dims)
        x, prior, t = torch.randn(2, 4, *spatial), torch.randn(2, 4, *spatial), torch.tensor([10, 500])
        c = _conditions(2, 7)
        edited = c | {"ehr_interval": torch.zeros(2, 7)}
        with torch.no_grad():
            out = net(x, t, prior, **c)
            assert out.shape == x.shape
            assert not torch.allclose(out, net(x, t, prior, **edited))
            # a precomputed context carries the interval token (last) and gives the same output
            context = net.encode_condition(prior, **c)
            assert context.shape == (2, 8 + 1, 32)
            torch.testing.assert_close(net(x, t, prior, context=context), out)
            # dropped rows ignore the clinical context, the interval features included
            drop = torch.ones(2)
            torch.testing.assert_close(
                net(x, t, prior, **c, drop_condition=drop), net(x, t, prior, **edited, drop_condition=drop)
            )
            assert net.denoiser.time_embed.extra is None  # nothing left behind after a call

    def test_without_the_interval_path_the_features_are_ignored(self):
        net = _net(0)
        x, prior, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([3])
        c = _conditions(1, 7)
        with torch.no_grad():
            torch.testing.assert_close(
                net(x, t, prior, **c), net(x, t, prior, **(c | {"ehr_interval": torch.zeros(1, 7)}))
            )

    def test_bad_interval_input(self):
        net = _net(7)
        x, prior, t = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8), torch.tensor([3])
        c = _conditions(1, 7)
        with pytest.raises(ValueError, match="needs ehr_interval"):
            net(x, t, prior, **{k: v for k, v in c.items() if k != "ehr_interval"})
        with pytest.raises(ValueError, match="has 5 features, expected 7"):
            net(x, t, prior, **(c | {"ehr_interval": torch.zeros(1, 5), "ehr_interval_mask": torch.ones(1, 5)}))
        with pytest.raises(ValueError, match="interval_dim must be >= 0"):
            LatentDiffusionTwin(2, 4, 6, 3, interval_dim=-1)


class TestPredictionTypes:
    def _batch(self, b: int = 4):
        return {"prior": torch.randn(b, 4, 8, 8), "target": torch.randn(b, 4, 8, 8)} | _conditions(b, 7)

    def test_sample_target_is_the_clean_variable_and_intervals_pass_through(self):
        batch = self._batch()
        x0, target, _, kwargs = DiffusionTwinPrepareBatch(make_scheduler("ddim", prediction_type="sample"), 1.0)(batch)
        torch.testing.assert_close(target, x0)
        torch.testing.assert_close(kwargs["ehr_interval"], batch["ehr_interval"])

    def test_v_prediction_target(self):
        scheduler = make_scheduler("ddim", prediction_type="v_prediction")
        x0, target, _, kwargs = DiffusionTwinPrepareBatch(scheduler, 1.0)(self._batch())
        a = scheduler.alphas_cumprod[kwargs["timesteps"]].view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * kwargs["noise"] - (1 - a).sqrt() * x0)


class TestTrainingWithIntervals:
    def test_train_forecast_and_what_if(self, cohort):
        from monai_twin.networks.diffusion import autoencoder_config

        folder, items, vocabulary = cohort
        samples = [
            twin_conditions(it, vocabulary, 16)
            | {"prior_image": aligned_scan(it["history"][-1]), "target_image": aligned_scan(it["target"])}
            for it in items
        ]
        samples += [null_ehr_sample(s, np.random.default_rng(i)) for i, s in enumerate(samples[:6])]
        config = autoencoder_config("mammo2d", channels=(8, 16))
        ae = config.build()
        train_autoencoder(ae, torch.stack([s["target_image"] for s in samples]), config, epochs=2, batch_size=16)
        priors = encode_latents(ae, torch.stack([s["prior_image"] for s in samples]))
        targets = encode_latents(ae, torch.stack([s["target_image"] for s in samples]))
        latent = [{"prior": p, "target": t, **{k: s[k] for k in KEYS}} for p, t, s in zip(priors, targets, samples)]
        torch.manual_seed(0)
        f = samples[0]["ehr_interval"].shape[0]
        static = samples[0]["ehr_static"].shape[0]
        net = LatentDiffusionTwin(2, 4, vocabulary.size, static, channels=(16, 32), context_dim=32, interval_dim=f)
        scheduler = make_scheduler("ddim", prediction_type="sample")
        losses = train_diffusion_twin(net, scheduler, latent, epochs=20, batch_size=len(latent), lr=3e-3)
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])

        index = next(i for i, it in enumerate(items) if _dose_after_last_scan(it) > 0)
        recorded = {k: v[None] for k, v in twin_conditions(items[index], vocabulary, 16).items()}
        stopped = {k: v[None] for k, v in twin_conditions(_stopped(items[index]), vocabulary, 16).items()}
        inferer = LatentTwinInferer(scheduler, ae, num_inference_steps=3)
        prior = samples[index]["prior_image"][None]
        out = inferer.forecast(prior, net, recorded, 2)
        assert out["mean"].shape == (1, 1, 32, 32) and bool(torch.isfinite(out["mean"]).all())
        same = inferer.what_if(prior, net, recorded, recorded, 2)
        assert float(same["difference"].abs().max()) == 0.0
        edited = inferer.what_if(prior, net, recorded, stopped, 2)
        assert float(edited["difference"].abs().max()) > 0.0  # the exposure edit reaches the image


class TestChangePreservingAutoencoder:
    def test_change_term(self):
        from monai_twin.networks.diffusion import AutoencoderKLLoss, autoencoder_config

        config = autoencoder_config("mammo2d", ssim_weight=0.0, kl_weight=0.0, change_weight=2.0)
        pairs = torch.rand(3, 2, 1, 16, 16)
        mu, sigma = torch.zeros(6, 4, 4, 4), torch.ones(6, 4, 4, 4)
        # the same offset on both images of a pair: reconstruction error 0.1, no change error
        assert float(AutoencoderKLLoss(config)((pairs + 0.1, mu, sigma), pairs)) == pytest.approx(0.1, rel=1e-4)
        # the target's reconstruction loses the change: + 2 x mean |change|
        recon = pairs.clone()
        recon[:, 1] = pairs[:, 0]
        expected = (recon - pairs).abs().mean() + 2.0 * (pairs[:, 1] - pairs[:, 0]).abs().mean()
        assert float(AutoencoderKLLoss(config)((recon, mu, sigma), pairs)) == pytest.approx(float(expected), rel=1e-4)

    def test_train_on_pairs(self, cohort):
        from monai_twin.networks.diffusion import PairedAutoencoder, autoencoder_config

        folder, items, _ = cohort
        pairs = torch.stack(
            [torch.stack([aligned_scan(it["history"][-1]), aligned_scan(it["target"])]) for it in items]
        )
        config = autoencoder_config("mammo2d", channels=(8, 16), change_weight=1.0)
        ae = config.build()
        losses = train_autoencoder(ae, pairs, config, epochs=3, batch_size=16, lr=5e-3)
        assert losses[-1] < 0.8 * losses[0]
        assert not isinstance(ae, PairedAutoencoder) and hasattr(ae, "encode")  # the AutoencoderKL itself is trained
        with pytest.raises(ValueError, match=r"pairs must have shape \(B, 2, C, \*spatial\)"):
            PairedAutoencoder(ae)(torch.rand(2, 3, 1, 8, 8))


class TestChangeThreshold:
    def test_decoded_changes_below_the_floor_keep_the_prior(self, cohort):
        from monai_twin.networks.diffusion import autoencoder_config

        folder, items, vocabulary = cohort
        item = items[0]
        prior = aligned_scan(item["history"][-1])[None]
        conditions = {k: v[None] for k, v in twin_conditions(item, vocabulary, 16).items()}
        config = autoencoder_config("mammo2d", channels=(8, 16))
        torch.manual_seed(0)
        ae = config.build().eval()
        net = LatentDiffusionTwin(2, 4, vocabulary.size, conditions["ehr_static"].shape[1], channels=(16, 32))
        with torch.no_grad():  # an untrained UNet outputs zeros (MONAI zero-initialises its last layers)
            for p in net.parameters():
                p.add_(0.05 * torch.randn_like(p))
        scheduler = make_scheduler("ddim", prediction_type="sample")
        kept = LatentTwinInferer(scheduler, ae, num_inference_steps=2).forecast(prior, net, conditions, 2)
        floor = 0.05
        out = LatentTwinInferer(scheduler, ae, num_inference_steps=2, change_threshold=floor).forecast(
            prior, net, conditions, 2
        )
        change, kept_change = out["mean"] - prior, kept["mean"] - prior
        small = kept_change.abs() <= floor
        assert bool(small.any()) and bool((~small).any())
        assert float(change[small].abs().max()) == 0.0  # below the floor: the prior itself
        torch.testing.assert_close(change[~small], kept_change[~small])  # above it: unchanged
        torch.testing.assert_close(out["std"], kept["std"])  # the spread is that of the raw samples
        with pytest.raises(ValueError, match="change_threshold must be >= 0"):
            LatentTwinInferer(scheduler, ae, change_threshold=-1.0)
