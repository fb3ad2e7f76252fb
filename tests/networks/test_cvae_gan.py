from __future__ import annotations

import io
import math

import pytest
import torch
from monai.networks.nets import PatchDiscriminator
from parameterized import parameterized

from monai_twin.networks import CVAEGANRefiner, CVAEGANTrainingStep, RefinedTwin, TwinForecaster, ViViTTwin
from monai_twin.networks.nets.cvae_gan import gaussian_kl
from tests.networks.test_vivit_twin import KEYS, mammo_samples, stack

SHAPES = [(2, (16, 16)), (3, (8, 8, 8))]


def _refiner(dims, **kw):
    kw.setdefault("channels", (8, 16))
    kw.setdefault("latent_channels", 2)
    return CVAEGANRefiner(dims, 1, **kw)


def _perturb(net, scale=0.05):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn_like(p))
    return net


def _images(spatial, b=2):
    torch.manual_seed(0)
    return torch.rand(b, 1, *spatial), torch.rand(b, 1, *spatial), torch.rand(b, 1, *spatial)


@pytest.fixture(scope="module")
def mammo_cohort(tmp_path_factory):
    from monai_twin.data.synthetic import Mammo2DConfig, write_cohort

    folder = write_cohort(
        "mammo2d",
        tmp_path_factory.mktemp("cvae") / "cohort",
        10,
        seed=3,
        config=Mammo2DConfig(size=32),
        save_aligned=True,
    )
    return mammo_samples(folder)


class TestCVAEGANRefiner:
    @parameterized.expand(SHAPES)
    def test_untrained_refiner_returns_the_forecast(self, dims, spatial):
        refiner = _refiner(dims)
        forecast, context, target = _images(spatial)
        assert torch.equal(refiner(forecast, context), forecast)
        z = torch.randn(2, 2, *[s // 2 for s in spatial])
        assert torch.equal(refiner(forecast, context, z), forecast)
        mean, std = refiner.sample(forecast, context, num_samples=3)
        torch.testing.assert_close(mean, forecast)
        assert mean.shape == std.shape == forecast.shape and float(std.max()) < 1e-6
        mu, logvar = refiner.prior(forecast, context)  # the learned prior starts as N(0, 1)
        assert (
            mu.shape == (2, 2, *[s // 2 for s in spatial]) and float(mu.abs().max()) == float(logvar.abs().max()) == 0
        )

    @parameterized.expand(SHAPES)
    def test_samples_differ_per_z_and_std_matches(self, dims, spatial):
        refiner = _perturb(_refiner(dims)).eval()
        forecast, context, _ = _images(spatial)
        with torch.no_grad():
            z = torch.randn(2, 2, *[s // 2 for s in spatial])
            a, b = refiner(forecast, context, z), refiner(forecast, context, -z)
            assert float((a - b).abs().mean()) > 1e-4
            torch.manual_seed(5)
            mean, std = refiner.sample(forecast, context, num_samples=6)
            torch.manual_seed(5)
            mu, logvar = refiner.prior(forecast, context)
            draws = torch.stack(
                [refiner(forecast, context, mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)) for _ in range(6)]
            )
        torch.testing.assert_close(mean, draws.mean(0), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(std, draws.std(0), atol=1e-5, rtol=1e-3)

    def test_gaussian_kl(self):
        mu_q, mu_p, lv_q, lv_p = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
        ref = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu_q, torch.exp(0.5 * lv_q)),
            torch.distributions.Normal(mu_p, torch.exp(0.5 * lv_p)),
        )
        torch.testing.assert_close(gaussian_kl(mu_q, lv_q, mu_p, lv_p), ref)
        assert float(gaussian_kl(mu_q, lv_q, mu_q, lv_q).abs().max()) < 1e-6

    @parameterized.expand(SHAPES)
    def test_gradients_reach_every_parameter(self, dims, spatial):
        refiner = _perturb(_refiner(dims))
        forecast, context, target = _images(spatial)
        refined_q, refined_p, kl = refiner.training_outputs(forecast, context, target)
        assert refined_q.shape == refined_p.shape == forecast.shape and float(kl) > 0
        ((refined_q - target).abs().mean() + (refined_p - target).abs().mean() + kl).backward()
        missing = [n for n, p in refiner.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert missing == []

    def test_torchscript_round_trip(self):
        refiner = _perturb(_refiner(2), 0.01).eval()
        forecast, context, _ = _images((16, 16))
        z = torch.randn(2, 2, 8, 8)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(refiner), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            torch.testing.assert_close(loaded(forecast, context, z), refiner(forecast, context, z))
            torch.testing.assert_close(loaded(forecast, context), refiner(forecast, context))

    @parameterized.expand(
        [
            ("rank", r"forecast must have shape \(B, 1, \*2 spatial dims\)"),
            ("channels", r"forecast must have shape \(B, 1, \*2 spatial dims\), got \[2, 2, 16, 16\]"),
            ("divisible", "must be divisible by 2"),
            ("no_context", "context .* is required"),
            ("context", r"context must have shape \[2, 1, 16, 16\], got \[2, 1, 8, 8\]"),
            ("target", r"target must have the shape of forecast \[2, 1, 16, 16\]"),
            ("z", r"z must have shape \[2, 2, 8, 8\], got \[2, 3, 8, 8\]"),
            ("samples", "num_samples must be >= 1"),
        ]
    )
    def test_bad_input(self, case, match):
        refiner = _refiner(2)
        forecast, context, target = _images((16, 16))
        with pytest.raises(ValueError, match=match):
            if case == "rank":
                refiner(forecast[:, 0], context)
            elif case == "channels":
                refiner(forecast.repeat(1, 2, 1, 1), context)
            elif case == "divisible":
                refiner(forecast[..., :15], context[..., :15])
            elif case == "no_context":
                refiner(forecast)
            elif case == "context":
                refiner(forecast, context[..., :8, :8])
            elif case == "target":
                refiner.posterior(forecast, context, target[..., :8])
            elif case == "z":
                refiner(forecast, context, torch.randn(2, 3, 8, 8))
            else:
                refiner.sample(forecast, context, num_samples=0)

    @parameterized.expand(
        [
            ({"spatial_dims": 1}, "spatial_dims"),
            ({"channels": ()}, "channels"),
            ({"latent_channels": 0}, "latent_channels"),
            ({"context_channels": -1}, "context_channels"),
        ]
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            CVAEGANRefiner(**{"spatial_dims": 2, "in_channels": 1, **kwargs})


class TestRefinedTwin:
    @parameterized.expand([("convlstm",), ("vivit",)])
    def test_wraps_a_twin_with_its_call_signature(self, network):
        history = torch.rand(2, 3, 1, 16, 16)
        times = torch.tensor([[700.0, 400.0, 90.0], [500.0, 200.0, 0.0]])
        mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
        iv, ivm, st = torch.randn(2, 3, 3), torch.ones(2, 3, 3), torch.randn(2, 2)
        common = {"ehr_interval_dim": 3, "ehr_static_dim": 2, "future_ehr_dim": 2}
        if network == "convlstm":
            twin = TwinForecaster(2, 1, channels=(4, 8), hidden_channels=8, **common)
        else:
            twin = ViViTTwin(2, 1, img_size=16, patch_size=4, hidden_size=24, mlp_dim=32, num_heads=2, **common)
        refined = RefinedTwin(twin, _refiner(2))
        kwargs = {
            "times": times,
            "history_mask": mask,
            "ehr_intervals": iv,
            "ehr_intervals_mask": ivm,
            "ehr_static": st,
        }
        image, future = refined.forecast(history, **kwargs)
        assert future.shape == (2, 2)
        torch.testing.assert_close(image[0], history[0, 2])  # untrained twin + untrained refiner: copy-last
        torch.testing.assert_close(image[1], history[1, 1])
        _perturb(refined.refiner)
        with torch.no_grad():
            image = refined(history, **kwargs)
            garbage = history.clone()
            garbage[1, 2] = 9.0  # the padded slot is not the refiner's context
            torch.testing.assert_close(refined(garbage, **kwargs), image)
            mean, std = refined.sample(history, **kwargs, num_samples=4)
        assert mean.shape == std.shape == image.shape and float(std.mean()) > 1e-4


class TestCVAEGANTraining:
    def test_trains_through_supervised_trainer(self, mammo_cohort, one_thread):
        """The refiner of a (copy-last) twin trains through MONAI's SupervisedTrainer: discriminator and
        generator losses stay finite, and the refinements differ per z while staying close to the target.
        (The cohort's changes are small and the refiner here has few steps: it learns the uncertainty in the
        toy test below.)"""
        from ignite.engine import Events
        from monai.data import DataLoader
        from monai.engines import SupervisedTrainer

        from monai_twin.engines.prepare_batch import ForecastPrepareBatch

        torch.manual_seed(0)
        s0 = mammo_cohort[0]
        twin = TwinForecaster(
            2,
            1,
            channels=(4, 8),
            hidden_channels=8,
            ehr_interval_dim=s0["ehr_intervals"].shape[-1],
            ehr_static_dim=s0["ehr_static"].shape[-1],
            max_history=3,
        )
        refiner = CVAEGANRefiner(2, 1, channels=(8, 16, 32), latent_channels=2)
        discriminator = PatchDiscriminator(2, 8, in_channels=2, num_layers_d=2, norm="INSTANCE")
        g_opt = torch.optim.Adam(refiner.parameters(), 2e-3)
        step = CVAEGANTrainingStep(
            refiner, discriminator, g_opt, torch.optim.Adam(discriminator.parameters(), 2e-3), forecaster=twin
        )
        items = [{k: s[k] for k in (*KEYS, "target")} for s in mammo_cohort]
        trainer = SupervisedTrainer(
            device=torch.device("cpu"),
            max_epochs=8,
            train_data_loader=DataLoader(items, batch_size=8, shuffle=True),
            network=refiner,
            optimizer=g_opt,
            loss_function=torch.nn.L1Loss(),
            prepare_batch=ForecastPrepareBatch(),
            iteration_update=step,
            decollate=False,
        )
        logs = []
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: logs.append({k: float(e.state.output[k]) for k in ("loss", "d_loss", "rec", "kl", "adv")}),
        )
        trainer.run()
        assert len(logs) == 8 * math.ceil(len(items) / 8)
        assert all(math.isfinite(v) for row in logs for v in row.values())
        # the posterior's refinements stay as close to the target as the forecast (copy-last) is
        data = stack(mammo_cohort)
        rows = torch.arange(len(items))
        last = data["history"][rows, data["history_mask"].sum(1).long() - 1]
        copy_last_l1 = float((last - data["target"]).abs().mean())
        assert sum(r["rec"] for r in logs[-7:]) / 7 < 1.2 * copy_last_l1
        assert trainer.state.output["pred"].shape == trainer.state.output["label"].shape

        copy_last_mse = float(((last - data["target"]) ** 2).mean())
        refined = RefinedTwin(twin, refiner).eval()
        with torch.no_grad():
            torch.manual_seed(1)
            mean, std = refined.sample(*[data[k] for k in KEYS], num_samples=6)
            z = torch.randn(len(items), 2, 8, 8)
            a, b = refiner(last, last, z), refiner(last, last, -z)
        print(
            f"z effect {float((a - b).abs().mean()):.3g}, std {float(std.mean()):.3g}, "
            f"mse {float(((mean - data['target']) ** 2).mean()):.3g} vs copy-last {copy_last_mse:.3g}"
        )
        assert float((a - b).abs().mean()) > 1e-7  # z reaches the output
        assert float(std.max()) > 0
        assert float(((mean - data["target"]) ** 2).mean()) < 1.5 * copy_last_mse  # close to the target

    def test_uncertainty_sits_where_the_outcome_is_uncertain(self, one_thread):
        """A toy follow-up whose change is a disc brightening by an amplitude nothing in the inputs
        reveals: the prior's samples spread inside the disc and barely outside, and their mean is
        closer to the target than the forecast (copy-last)."""
        torch.manual_seed(0)
        yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        disc = (((yy - 8) ** 2 + (xx - 8) ** 2) < 16).float()

        def batch(n=16):
            last = (0.2 + 0.1 * torch.rand(n, 1, 1, 1)) * (0.5 + 0.5 * disc)
            return last, last + 0.3 * torch.rand(n, 1, 1, 1) * disc

        refiner = CVAEGANRefiner(2, 1, channels=(8, 16), latent_channels=2)
        discriminator = PatchDiscriminator(2, 8, in_channels=2, num_layers_d=2, norm="INSTANCE")
        step = CVAEGANTrainingStep(
            refiner,
            discriminator,
            torch.optim.Adam(refiner.parameters(), 2e-3),
            torch.optim.Adam(discriminator.parameters(), 2e-3),
        )
        logs = []
        for _ in range(200):
            last, target = batch()
            out = step.generator_step(last, last, target)
            logs.append([float(out[k]) for k in ("loss", "d_loss", "kl", "adv")])
        assert all(math.isfinite(v) for row in logs for v in row)
        last, target = batch(64)
        mean, std = refiner.eval().sample(last, last, num_samples=16)
        inside, outside = float(std[:, :, disc > 0].mean()), float(std[:, :, disc == 0].mean())
        print(f"std inside {inside:.3g}, outside {outside:.3g}")
        assert inside > 0.01 and inside > 3 * outside
        assert float(((mean - target) ** 2).mean()) < float(((last - target) ** 2).mean())
