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
from monai_twin.inferers import DIFFUSION_CONDITION_KEYS, LatentTwinInferer, make_scheduler
from tests.conftest import aligned_scan, small_mammo_cohort

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "prior": torch.randn(b, 4, 8, 8, generator=g),
        "target": torch.randn(b, 4, 8, 8, generator=g),
        "ehr_tokens_code": torch.randint(0, 5, (b, 6), generator=g),
        "ehr_tokens_value": torch.randn(b, 6, generator=g),
        "ehr_tokens_time": -torch.rand(b, 6, generator=g) * 100,
        "ehr_tokens_mask": torch.ones(b, 6),
        "ehr_static": torch.randn(b, 3, generator=g),
        "gap": torch.rand(b, generator=g) * 200,
    }


class TestPrepareBatch:
    def test_epsilon_target_and_residual_variable(self):
        batch = _batch()
        x0, target, args, kwargs = DiffusionTwinPrepareBatch(make_scheduler("ddim"), 0.5, 0.0)(batch)
        torch.testing.assert_close(x0, (batch["target"] - batch["prior"]) / 0.5)
        torch.testing.assert_close(target, kwargs["noise"])
        assert args == () and kwargs["timesteps"].shape == (4,) and int(kwargs["timesteps"].max()) < 1000
        assert float(kwargs["drop_condition"].sum()) == 0.0
        torch.testing.assert_close(kwargs["prior"], batch["prior"])
        assert set(DIFFUSION_CONDITION_KEYS) <= set(kwargs)

    def test_rflow_velocity_and_absolute_variable(self):
        batch = _batch()
        x0, target, _, kwargs = DiffusionTwinPrepareBatch(make_scheduler("rflow"), 0.0)(batch)
        torch.testing.assert_close(x0, batch["target"])
        torch.testing.assert_close(target, x0 - kwargs["noise"])

    def test_condition_dropout_rate(self):
        torch.manual_seed(0)
        _, _, _, kwargs = DiffusionTwinPrepareBatch(make_scheduler("ddim"), 1.0, 0.5)(_batch(400))
        assert 0.4 < float(kwargs["drop_condition"].mean()) < 0.6

    def test_bad_batch(self):
        batch = _batch()
        del batch["gap"]
        with pytest.raises(KeyError, match=r"has no \['gap'\]"):
            DiffusionTwinPrepareBatch(make_scheduler("ddim"))(batch)
        batch = _batch() | {"target": torch.randn(4, 4, 4, 4)}
        with pytest.raises(ValueError, match=r"batch\['prior'\] \(4, 4, 8, 8\) != batch\['target'\]"):
            DiffusionTwinPrepareBatch(make_scheduler("ddim"))(batch)
        with pytest.raises(ValueError, match="condition_dropout must be in"):
            DiffusionTwinPrepareBatch(make_scheduler("ddim"), condition_dropout=1.0)


class TestNullPair:
    @pytest.mark.parametrize("spatial", [(32, 32), (16, 16, 16)])
    def test_small_affine_no_events_no_gap(self, spatial):
        grid = np.meshgrid(*[np.linspace(-1, 1, s) for s in spatial], indexing="ij")
        prior = torch.from_numpy(np.exp(-4 * sum(g**2 for g in grid)).astype(np.float32))[None]
        sample = {k: v[0] for k, v in _batch(1).items() if k not in ("prior", "target")} | {"prior_image": prior}
        out = null_ehr_sample(sample, np.random.default_rng(1))
        assert float(out["ehr_tokens_mask"].sum()) == 0.0 and 0.0 <= float(out["gap"]) <= 3.0
        target = out["target_image"]
        assert target.shape == prior.shape and not torch.equal(target, prior)
        corr = np.corrcoef(target.flatten().numpy(), prior.flatten().numpy())[0, 1]
        assert corr > 0.9
        assert float(sample["ehr_tokens_mask"].sum()) == 6.0  # the input is not modified
        with pytest.raises(KeyError, match="has no 'prior_image'"):
            null_ehr_sample({}, np.random.default_rng(0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return small_mammo_cohort(tmp_path_factory.mktemp("dt") / "c", 6, 0)


class TestTraining:
    def test_twin_conditions(self, cohort):
        _, items, vocabulary = cohort
        item = items[0]
        c = twin_conditions(item, vocabulary, max_tokens=16)
        assert c["ehr_tokens_code"].shape == (16,) and c["ehr_tokens_code"].dtype == torch.int64
        assert float(c["gap"]) == pytest.approx(item["target_time"] - item["history_times"][-1], rel=1e-5)
        real = c["ehr_tokens_mask"] > 0
        assert bool((c["ehr_tokens_time"][real] < 0).all())
        with pytest.raises(KeyError, match="has no 'target_time'"):
            twin_conditions({k: v for k, v in item.items() if k != "target_time"}, vocabulary)

    def test_losses_go_down(self, cohort):
        from monai_twin.networks.diffusion import LatentDiffusionTwin, autoencoder_config

        folder, items, vocabulary = cohort
        images = torch.stack([aligned_scan(it["target"]) for it in items])
        config = autoencoder_config("mammo2d", channels=(8, 16))
        ae = config.build()
        ae_losses = train_autoencoder(ae, images, config, epochs=3, batch_size=18, lr=5e-3)
        assert ae_losses[-1] < 0.8 * ae_losses[0]

        samples = []
        for it in items:
            c = twin_conditions(it, vocabulary, max_tokens=16)
            samples.append(
                c | {"prior_image": aligned_scan(it["history"][-1]), "target_image": aligned_scan(it["target"])}
            )
        samples += [null_ehr_sample(s, np.random.default_rng(i)) for i, s in enumerate(samples[:6])]
        priors = encode_latents(ae, torch.stack([s["prior_image"] for s in samples]))
        targets = encode_latents(ae, torch.stack([s["target_image"] for s in samples]))
        latent = [
            {"prior": p, "target": t, **{k: s[k] for k in DIFFUSION_CONDITION_KEYS}}
            for p, t, s in zip(priors, targets, samples)
        ]
        torch.manual_seed(0)
        net = LatentDiffusionTwin(
            2, 4, vocabulary.size, samples[0]["ehr_static"].shape[0], channels=(16, 32), context_dim=32
        )
        scheduler = make_scheduler("ddim")
        losses = train_diffusion_twin(net, scheduler, latent, epochs=20, batch_size=len(latent), lr=3e-3)
        assert float(net.residual_scale) == pytest.approx(float((targets - priors).std()), rel=1e-4)
        assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3])
        out = LatentTwinInferer(scheduler, ae, num_inference_steps=3).forecast(
            samples[0]["prior_image"][None], net, {k: samples[0][k][None] for k in DIFFUSION_CONDITION_KEYS}, 2
        )
        assert out["mean"].shape == (1, 1, 32, 32) and bool(torch.isfinite(out["mean"]).all())

    def test_bad_training_input(self):
        from monai_twin.networks.diffusion import autoencoder_config

        config = autoencoder_config("mammo2d", channels=(8, 16))
        with pytest.raises(ValueError, match="images must be a \\(N, C, \\*spatial\\) tensor with 2 spatial dims"):
            train_autoencoder(config.build(), torch.rand(4, 32, 32), config)
        with pytest.raises(ValueError, match="images contains NaN"):
            train_autoencoder(config.build(), torch.full((2, 1, 16, 16), float("nan")), config)
        with pytest.raises(ValueError, match="samples is empty"):
            train_diffusion_twin(torch.nn.Linear(1, 1), make_scheduler("ddim"), [])
        with pytest.raises(KeyError, match="samples\\[0\\] has no 'prior'"):
            train_diffusion_twin(torch.nn.Linear(1, 1), make_scheduler("ddim"), [{"target": torch.zeros(1)}])


class TestEMAAndSchedule:
    @staticmethod
    def _toy():
        torch.manual_seed(0)
        from monai_twin.networks.diffusion import LatentDiffusionTwin

        net = LatentDiffusionTwin(2, 4, 5, 3, channels=(8, 16), context_dim=16, num_head_channels=8)
        batch = _batch(6)
        samples = [{k: v[i] for k, v in batch.items()} for i in range(6)]
        return net, samples

    def test_ema_is_the_average_of_the_iterates(self):
        # one iteration (the batch holds every sample): EMA = d * initial + (1 - d) * trained, d = 2 / 11
        net, samples = self._toy()
        initial = {k: v.clone() for k, v in net.state_dict().items()}
        train_diffusion_twin(net, make_scheduler("ddim"), samples, epochs=1, batch_size=6, lr=1e-2)
        trained = {k: v.clone() for k, v in net.state_dict().items()}
        ema_net, _ = self._toy()
        train_diffusion_twin(ema_net, make_scheduler("ddim"), samples, epochs=1, batch_size=6, lr=1e-2, ema_decay=0.99)
        d = 2.0 / 11.0
        moved = 0
        for name, value in ema_net.state_dict().items():
            if name == "residual_scale":
                torch.testing.assert_close(value, trained[name])
                continue
            torch.testing.assert_close(value, d * initial[name] + (1 - d) * trained[name], atol=1e-6, rtol=1e-5)
            moved += int(not torch.equal(trained[name], initial[name]))
        assert moved > 10

    def test_ema_decay_zero_is_the_last_iterate(self):
        net, samples = self._toy()
        train_diffusion_twin(net, make_scheduler("ddim"), samples, epochs=2, batch_size=3, lr=1e-2)
        other, _ = self._toy()
        train_diffusion_twin(other, make_scheduler("ddim"), samples, epochs=2, batch_size=3, lr=1e-2, ema_decay=0.0)
        for a, b in zip(net.parameters(), other.parameters()):
            torch.testing.assert_close(a, b)

    def test_cosine_schedule_anneals_to_zero(self):
        from ignite.engine import Engine

        from monai_twin.engines.diffusion import _cosine_schedule

        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        seen = []

        def step(engine, batch):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()

        engine = Engine(step)
        _cosine_schedule(engine, optimizer, 8)
        engine.run([0, 1, 2, 3], max_epochs=2)
        expected = [0.05 * (1 + np.cos(np.pi * k / 8)) for k in range(8)]
        np.testing.assert_allclose(seen, expected, rtol=1e-6)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    def test_cosine_training_runs_and_bad_options(self):
        net, samples = self._toy()
        losses = train_diffusion_twin(
            net, make_scheduler("ddim"), samples, epochs=2, batch_size=3, lr_schedule="cosine", ema_decay=0.9
        )
        assert len(losses) == 2 and all(np.isfinite(losses))
        with pytest.raises(ValueError, match="ema_decay must be in"):
            train_diffusion_twin(net, make_scheduler("ddim"), samples, ema_decay=1.0)
        with pytest.raises(ValueError, match="lr_schedule must be None or 'cosine'"):
            train_diffusion_twin(net, make_scheduler("ddim"), samples, lr_schedule="step")
