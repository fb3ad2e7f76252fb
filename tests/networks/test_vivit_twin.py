from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from parameterized import parameterized

from monai_twin.networks import TwinForecaster, ViViTTwin

KEYS = ("history", "times", "history_mask", "ehr_intervals", "ehr_intervals_mask", "ehr_static")


def _net(dims, cond="tokens", **kw):
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    kw.setdefault("patch_size", 4)
    return ViViTTwin(
        dims,
        1,
        img_size=spatial,
        hidden_size=24,
        mlp_dim=32,
        num_heads=2,
        decoder_channels=8,
        ehr_interval_dim=3,
        ehr_static_dim=2,
        ehr_embed_dim=8,
        conditioning=cond,
        future_ehr_dim=2,
        **kw,
    )


def _inputs(dims, b=2, t=3):
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    history = torch.rand(b, t, 1, *spatial)
    times = torch.tensor([[700.0, 400.0, 90.0], [500.0, 200.0, 0.0]])[:b, :t]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])[:b, :t]
    return history, times, mask, torch.randn(b, t, 3), torch.ones(b, t, 3), torch.randn(b, 2)


def _perturb(net, scale=0.05):
    """Move away from the zero-initialised copy-last state so every path reaches the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn_like(p))
    return net


def mammo_samples(folder, max_history=3, subjects=None):
    """Forecast samples ``{history, target, times, history_mask, ehr_*}`` of a synthetic mammography
    cohort written with ``save_aligned=True`` (the noise-free renders, in the subject's frame, as
    the oracle-registered testbed uses), plus ``changed`` from the simulator's truth."""
    import nibabel as nib
    import pandas as pd

    from monai_twin.data import build_longitudinal_items, load_manifest
    from monai_twin.transforms.ehr import EHRStaticToTensord, EHRToIntervalFeaturesd, EHRVocabulary
    from monai_twin.transforms.sequence import PadSequenced

    manifest = load_manifest(folder)
    truth = pd.read_parquet(folder / "truth.parquet")
    images = {
        (r.subject_id, int(r.visit)): np.asarray(nib.load(str(folder / r.aligned)).get_fdata(), np.float32)[None]
        for r in truth.itertuples()
    }
    changed = {(r.subject_id, int(r.visit)): bool(r.changed) for r in truth.itertuples() if not pd.isna(r.changed)}
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static)
    encode = [EHRToIntervalFeaturesd(vocabulary), EHRStaticToTensord(vocabulary), PadSequenced(max_history)]
    out = []
    for item in build_longitudinal_items(manifest, max_history=max_history, subjects=subjects):
        j, n, sid = item["target_index"], len(item["history"]), item["subject_id"]
        sample = dict(item, history=np.stack([images[(sid, k)] for k in range(j - n, j)]), target=images[(sid, j)])
        for t in encode:
            sample = t(sample)
        out.append({k: torch.as_tensor(np.asarray(sample[k]), dtype=torch.float32) for k in (*KEYS, "target")})
        out[-1]["changed"] = changed.get((sid, j), False)
    return out


def stack(samples):
    return {k: torch.stack([s[k] for s in samples]) for k in (*KEYS, "target")}


@pytest.fixture(scope="module")
def mammo_cohort(tmp_path_factory):
    from monai_twin.data.synthetic import Mammo2DConfig, write_cohort

    folder = write_cohort(
        "mammo2d",
        tmp_path_factory.mktemp("vivit") / "cohort",
        10,
        seed=3,
        config=Mammo2DConfig(size=32),
        save_aligned=True,
    )
    return mammo_samples(folder)


class TestViViTTwin:
    @parameterized.expand([(dims, cond) for dims in (2, 3) for cond in ("tokens", "none")])
    def test_untrained_forecast_is_copy_last(self, dims, cond):
        net = _net(dims, cond)
        history, times, mask, iv, ivm, st = _inputs(dims)
        pred, future = net.forecast(history, times, mask, iv, ivm, st)
        assert pred.shape == history.shape[:1] + history.shape[2:] and future.shape == (2, 2)
        # sample 0 has 3 real visits, sample 1 only 2 (the third slot is padding)
        torch.testing.assert_close(pred[0], history[0, 2])
        torch.testing.assert_close(pred[1], history[1, 1])
        assert torch.equal(net(history, times, mask, iv, ivm, st), pred)

    @parameterized.expand([(2,), (3,)])
    def test_padded_slots_do_not_change_the_output(self, dims):
        net = _perturb(_net(dims)).eval()
        history, times, mask, iv, ivm, st = _inputs(dims)
        with torch.no_grad():
            pred, future = net.forecast(history, times, mask, iv, ivm, st)
            assert float((pred[1] - history[1, 1]).abs().max()) > 1e-3  # the perturbed net does change the scan
            # garbage in the padded slot of sample 1: same forecast
            h2, t2, iv2, ivm2 = history.clone(), times.clone(), iv.clone(), ivm.clone()
            h2[1, 2], t2[1, 2], iv2[1, 2], ivm2[1, 2] = 5 * torch.rand_like(h2[1, 2]), 33.0, 7.0, 0.0
            pred2, future2 = net.forecast(h2, t2, mask, iv2, ivm2, st)
            torch.testing.assert_close(pred2, pred, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(future2, future, atol=1e-5, rtol=1e-5)
            # the same two visits without the padded slot (T=2): same forecast for sample 1
            single = net.forecast(history[1:, :2], times[1:, :2], mask[1:, :2], iv[1:, :2], ivm[1:, :2], st[1:])
            torch.testing.assert_close(single[0], pred[1:], atol=1e-5, rtol=1e-5)
            # left padding (PadSequenced(side="left")) gives the same forecast too
            left = [torch.roll(x[1:], 1, dims=1) for x in (history, times, mask, iv, ivm)]
            torch.testing.assert_close(net.forecast(*left, st[1:])[0], pred[1:], atol=1e-5, rtol=1e-5)

    def test_ehr_tokens_reach_the_forecast_only_when_on(self):
        history, times, mask, iv, ivm, st = _inputs(2)
        for cond, moves in (("tokens", True), ("none", False)):
            net = _perturb(_net(2, cond)).eval()
            with torch.no_grad():
                a = net(history, times, mask, iv, ivm, st)
                b = net(history, times, mask, iv + 1.0, ivm, st + 1.0)
            assert bool((a - b).abs().max() > 1e-4) == moves, cond

    @parameterized.expand([(2, "tokens"), (3, "tokens"), (2, "none")])
    def test_gradients_reach_every_parameter(self, dims, cond):
        net = _perturb(_net(dims, cond))
        pred, future = net.forecast(*_inputs(dims))
        (pred.square().mean() + future.square().mean()).backward()
        # MONAI's TransformerBlock always builds norm_cross_attn, used only with cross-attention
        trainable = [(n, p) for n, p in net.named_parameters() if p.requires_grad and "norm_cross_attn" not in n]
        missing = [n for n, p in trainable if p.grad is None or not bool(p.grad.abs().sum() > 0)]
        assert len(trainable) > 30 and missing == []
        assert not net.patch_embedding.position_embeddings.requires_grad  # sincos positions are fixed

    @parameterized.expand([(True,), (False,)])
    def test_isolated_ehr_head_leaves_the_trunk_alone(self, isolate):
        net = _perturb(_net(2, "tokens", isolate_ehr_head=isolate))
        _, future = net.forecast(*_inputs(2))
        future.square().sum().backward()
        trunk = [p.grad for p in net.patch_embedding.parameters() if p.requires_grad]
        reached = any(g is not None and bool(g.abs().sum() > 0) for g in trunk)
        assert reached != isolate

    @parameterized.expand([(2,), (3,)])
    def test_torchscript_round_trip(self, dims):
        net = _perturb(_net(dims), 0.01).eval()
        args = _inputs(dims)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(net), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            torch.testing.assert_close(loaded(*args), net(*args))
            torch.testing.assert_close(loaded.forecast(*args)[1], net.forecast(*args)[1])

    def test_future_ehr_base_starts_at_last_value(self):
        net = _net(2, future_ehr_base=[2, 0])
        history, times, mask, iv, ivm, st = _inputs(2)
        _, future = net.forecast(history, times, mask, iv, ivm, st)
        torch.testing.assert_close(future, torch.stack([iv[0, 2][[2, 0]], iv[1, 1][[2, 0]]]))
        with pytest.raises(ValueError, match="one feature index per future value"):
            _net(2, future_ehr_base=[0])

    def test_swaps_for_twin_forecaster(self):
        """Same keywords as TwinForecaster: the engines' keyword call works for both."""
        history, times, mask, iv, ivm, st = _inputs(2)
        kwargs = {
            "times": times,
            "history_mask": mask,
            "ehr_intervals": iv,
            "ehr_intervals_mask": ivm,
            "ehr_static": st,
        }
        conv = TwinForecaster(2, 1, channels=(4, 8), hidden_channels=8, ehr_interval_dim=3, ehr_static_dim=2)
        torch.testing.assert_close(_net(2)(history, **kwargs), conv(history, **kwargs))

    def test_training_beats_copy_last_on_a_synthetic_cohort(self, mammo_cohort, one_thread):
        """A short run on simulated mammograms: the training MSE falls well below copy-last's."""
        torch.manual_seed(0)
        start = time.perf_counter()
        s0 = mammo_cohort[0]
        net = ViViTTwin(
            2,
            1,
            img_size=32,
            patch_size=8,
            hidden_size=32,
            mlp_dim=64,
            num_heads=4,
            num_layers=1,
            decoder_channels=16,
            ehr_interval_dim=s0["ehr_intervals"].shape[-1],
            ehr_static_dim=s0["ehr_static"].shape[-1],
            max_history=3,
        )
        data = stack(mammo_cohort)
        rows = torch.arange(len(mammo_cohort))
        last = data["history"][rows, data["history_mask"].sum(1).long() - 1]
        copy_last = float(((last - data["target"]) ** 2).mean())
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        losses = []
        for _ in range(30):
            for chunk in torch.randperm(len(mammo_cohort)).split(8):
                pred = net(*[data[k][chunk] for k in KEYS])
                loss = ((pred - data["target"][chunk]) ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
        with torch.no_grad():
            trained = float(((net(*[data[k] for k in KEYS]) - data["target"]) ** 2).mean())
        print(
            f"copy-last {copy_last:.3g}, trained {trained:.3g} ({trained / copy_last:.2f}), {time.perf_counter() - start:.1f} s"
        )
        assert np.mean(losses[-5:]) < np.mean(losses[:5])
        assert trained < 0.7 * copy_last

    @parameterized.expand(
        [
            ("rank", r"history must have shape \(B, T, C, \*2 spatial dims\)"),
            ("channels", "history has 2 channels, expected in_channels=1"),
            ("too_long", "T=9 visits, more than max_history=8"),
            ("all_masked", "every visit of a sample as padding"),
            ("nan_ehr", "ehr_intervals contains NaN"),
            ("nan_static", "ehr_static contains NaN"),
            ("t_mismatch", r"ehr_intervals must have shape \(B, T, F\) = \(2, 3, 3\)"),
            ("times", r"times must have shape \(B, T\) = \(2, 3\)"),
            ("mask", r"history_mask must have shape \(B, T\) = \(2, 3\)"),
            ("size", r"history spatial size \[16, 12\] must equal img_size=\[16, 16\]"),
        ]
    )
    def test_bad_input(self, case, match):
        net = _net(2)
        history, times, mask, iv, ivm, st = _inputs(2)
        if case == "rank":
            history = history[:, :, 0]
        elif case == "channels":
            history = history.repeat(1, 1, 2, 1, 1)
        elif case == "too_long":
            history, times, mask = history.repeat(1, 3, 1, 1, 1), times.repeat(1, 3), mask.repeat(1, 3)
            iv, ivm = iv.repeat(1, 3, 1), ivm.repeat(1, 3, 1)
        elif case == "all_masked":
            mask[1] = 0
        elif case == "nan_ehr":
            iv[0, 0, 0] = float("nan")
        elif case == "nan_static":
            st[1, 0] = float("nan")
        elif case == "t_mismatch":
            iv = iv[:, :2]
        elif case == "times":
            times = times[:, :2]
        elif case == "mask":
            mask = mask[:, :2]
        elif case == "size":
            history = history[..., :12]
        with pytest.raises(ValueError, match=match):
            net(history, times, mask, iv, None if case == "t_mismatch" else ivm, st)

    @parameterized.expand(
        [
            ({"conditioning": "stfilm"}, "conditioning must be one of"),
            ({"out_channels": 2}, "residual=True needs out_channels"),
            ({"spatial_dims": 4}, "spatial_dims"),
            ({"max_history": 0}, "max_history"),
            ({"patch_size": 6, "img_size": 24}, "power of two"),
            ({"patch_size": 8, "img_size": 20}, "divisible by patch_size"),
            ({"hidden_size": 30, "num_heads": 4}, "divisible by num_heads"),
            ({"hidden_size": 30, "num_heads": 3}, "multiple of 4 for sincos"),
        ]
    )
    def test_bad_arguments(self, kwargs, match):
        args = {"spatial_dims": 2, "in_channels": 1, "img_size": 32, **kwargs}
        with pytest.raises(ValueError, match=match):
            ViViTTwin(**args)
