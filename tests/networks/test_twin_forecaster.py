from __future__ import annotations

import io

import pytest
import torch
from parameterized import parameterized

from monai_twin.networks import CONDITIONING, TwinForecaster
from monai_twin.networks.nets.twin_forecaster import warp_image

CASES = [(dims, cond) for dims in (2, 3) for cond in CONDITIONING] + [
    (2, "stfilm", "deformation"),
    (3, "film", "deformation"),
]


def _net(dims, cond="stfilm", **kw):
    kw.setdefault("channels", (4, 8))
    kw.setdefault("hidden_channels", 8)
    return TwinForecaster(
        dims, 1, ehr_interval_dim=3, ehr_static_dim=2, ehr_embed_dim=8, conditioning=cond, future_ehr_dim=2, **kw
    )


def _inputs(dims, b=2, t=3):
    spatial = (16, 16) if dims == 2 else (8, 8, 8)
    history = torch.rand(b, t, 1, *spatial)
    times = torch.tensor([[700.0, 400.0, 90.0], [500.0, 200.0, 0.0]])[:b, :t]
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])[:b, :t]
    return history, times, mask, torch.randn(b, t, 3), torch.ones(b, t, 3), torch.randn(b, 2)


def _train_toy(net, batch, steps, lr=3e-3):
    """Fit ``net`` with Adam on fresh ``batch()`` draws; its MSE and copy-last's on a fixed batch of 64."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    h, t, iv, target = batch(64)
    copy_last = float(((h[:, -1] - target) ** 2).mean())
    for _ in range(steps):
        hb, tb, ivb, yb = batch()
        loss = ((net(hb, tb, ehr_intervals=ivb) - yb) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        trained = float(((net(h, t, ehr_intervals=iv) - target) ** 2).mean())
    return trained, copy_last


class TestTwinForecaster:
    @parameterized.expand(CASES)
    def test_untrained_forecast_is_copy_last(self, dims, cond, change="additive"):
        net = _net(dims, cond, change=change)
        history, times, mask, iv, ivm, st = _inputs(dims)
        pred, future = net.forecast(history, times, mask, iv, ivm, st)
        assert pred.shape == history.shape[:1] + history.shape[2:] and future.shape == (2, 2)
        # sample 0 has 3 real visits, sample 1 only 2 (the third slot is padding)
        torch.testing.assert_close(pred[0], history[0, 2])
        torch.testing.assert_close(pred[1], history[1, 1])

    @parameterized.expand([(2, "additive"), (3, "additive"), (2, "deformation"), (3, "deformation")])
    def test_torchscript_round_trip(self, dims, change):
        net = _net(dims, change=change).eval()
        with torch.no_grad():
            for p in net.parameters():  # move away from the zero-initialised copy-last state
                p.add_(0.01 * torch.randn_like(p))
        args = _inputs(dims)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(net), buffer)
        buffer.seek(0)
        loaded = torch.jit.load(buffer)
        with torch.no_grad():
            torch.testing.assert_close(loaded(*args), net(*args))
            a, b = loaded.forecast(*args), net.forecast(*args)
        torch.testing.assert_close(a[1], b[1])

    @parameterized.expand([(2,), (3,)])
    def test_ehr_head_with_a_base_starts_at_locf_and_scripts(self, dims):
        """With ``future_ehr_base`` the untrained EHR head returns the last real interval's features."""
        net = _net(dims, future_ehr_base=[2, 0]).eval()
        history, times, mask, iv, ivm, st = _inputs(dims)
        _, future = net.forecast(history, times, mask, iv, ivm, st)
        torch.testing.assert_close(future[0], iv[0, 2, [2, 0]])
        torch.testing.assert_close(future[1], iv[1, 1, [2, 0]])  # sample 1: the third slot is padding
        scripted = torch.jit.script(net)
        torch.testing.assert_close(scripted.forecast(history, times, mask, iv, ivm, st)[1], future)

    def test_learns_an_ehr_driven_change(self):
        """A toy twin: the next scan brightens a disc in proportion to the dose of the last interval.
        With ST-FiLM the error falls well below copy-last's within a few dozen steps."""
        torch.manual_seed(0)
        net = TwinForecaster(2, 1, channels=(8, 16), hidden_channels=16, ehr_interval_dim=1, ehr_embed_dim=8)
        yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        disc = (((yy - 8) ** 2 + (xx - 8) ** 2) < 16).float()

        def batch(n=16):
            dose = torch.rand(n)
            base = 0.2 + 0.1 * torch.rand(n, 1, 1, 1)
            history = (base * disc).unsqueeze(1).repeat(1, 2, 1, 1, 1)
            target = history[:, -1] + 0.5 * dose.view(n, 1, 1, 1) * disc
            intervals = torch.stack([torch.zeros(n), dose], dim=1).unsqueeze(-1)
            return history, torch.tensor([[200.0, 100.0]]).repeat(n, 1), intervals, target

        trained, copy_last = _train_toy(net, batch, steps=60)
        assert trained < 0.25 * copy_last

    @parameterized.expand([(True,), (False,)])
    def test_isolated_ehr_head_leaves_the_trunk_alone(self, isolate):
        """The future-EHR loss reaches the image encoder and ConvLSTM only when not isolated."""
        net = _net(2, isolate_ehr_head=isolate)
        history, times, mask, iv, ivm, st = _inputs(2)
        _, future = net.forecast(history, times, mask, iv, ivm, st)
        future.square().sum().backward()
        assert net.ehr_head[-1].weight.grad.abs().sum() > 0
        trunk = [p.grad for m in (net.encoder, net.lstm, net.ehr_encoder) for p in m.parameters()]
        reached = any(g is not None and g.abs().sum() > 0 for g in trunk)
        assert reached != isolate

    @parameterized.expand([(2,), (3,)])
    def test_warp_matches_monai_warp(self, dims):
        """``warp_image`` is MONAI's ``Warp`` (bilinear, border) in a TorchScript-friendly form."""
        from monai.networks.blocks import Warp

        torch.manual_seed(0)
        image = torch.rand(2, 2, *([9] * dims))
        ddf = 2.0 * torch.randn(2, dims, *([9] * dims))
        torch.testing.assert_close(warp_image(image, ddf), Warp("bilinear", "border")(image, ddf), atol=1e-5, rtol=0)
        with pytest.raises(ValueError, match=rf"ddf must have shape \(B, {dims}"):
            warp_image(image, ddf[:, :1])

    def test_deformation_moves_the_last_scan(self):
        """A constant displacement of one pixel along axis 0 shifts the forecast by one row."""
        net = _net(2, change="deformation")
        with torch.no_grad():
            net.flow.conv.bias.copy_(torch.tensor([1.0, 0.0]) / net.flow_scale)
        history, times, mask, iv, ivm, st = _inputs(2)
        pred = net(history, times, mask, iv, ivm, st)
        torch.testing.assert_close(pred[0, :, :-1], history[0, 2, :, 1:])

    @parameterized.expand([(False,), (True,)])
    def test_deformation_learns_an_ehr_driven_growth(self, plan_film):
        """A toy lesion grows by a dose-dependent sub-pixel radius: the deformation twin learns it
        (with and without the plan's FiLM of the decoder)."""
        torch.manual_seed(0)
        net = TwinForecaster(
            2,
            1,
            channels=(8, 16),
            hidden_channels=16,
            ehr_interval_dim=1,
            ehr_embed_dim=8,
            change="deformation",
            plan_film=plan_film,
        )
        yy, xx = torch.meshgrid(torch.arange(24.0), torch.arange(24.0), indexing="ij")
        rho = torch.sqrt((yy - 12) ** 2 + (xx - 12) ** 2)

        def blob(radius):  # a soft-edged disc, (n, 1, 24, 24)
            return torch.sigmoid(2.0 * (radius.view(-1, 1, 1, 1) - rho))

        def batch(n=16):
            dose = torch.rand(n)
            r0 = 3.0 + 2.0 * torch.rand(n)
            history = torch.stack([blob(r0 - 0.5), blob(r0)], dim=1)
            target = blob(r0 + 1.5 * (1.0 - dose))
            intervals = torch.stack([torch.zeros(n), dose], dim=1).unsqueeze(-1)
            return history, torch.tensor([[200.0, 100.0]]).repeat(n, 1), intervals, target

        trained, copy_last = _train_toy(net, batch, steps=120)
        assert trained < 0.25 * copy_last

    @parameterized.expand([(2,), (3,)])
    def test_plan_film_starts_as_the_plain_twin_and_scripts(self, dims):
        """The decoder FiLM is the identity before training; once trained it still scripts."""
        torch.manual_seed(0)
        plain = _net(dims, "channels", change="deformation")
        with torch.no_grad():
            for p in plain.parameters():
                p.add_(0.01 * torch.randn_like(p))
        planned = _net(dims, "channels", change="deformation", plan_film=True)
        missing = planned.load_state_dict(plain.state_dict(), strict=False).missing_keys
        assert missing and all(k.startswith("plan_film.") for k in missing)
        args = _inputs(dims)
        with torch.no_grad():
            torch.testing.assert_close(planned(*args), plain(*args))
            for p in planned.plan_film.parameters():
                p.add_(0.05 * torch.randn_like(p))
            moved = planned(*args)
        assert not torch.allclose(moved, plain(*args))
        # the second sample's plan is its last *real* interval: editing it moves the forecast, editing
        # the padded slot after it does not
        real, padded = list(args), list(args)
        real[3], padded[3] = args[3].clone(), args[3].clone()
        real[3][1, 1] += 1.0
        padded[3][1, 2] += 1.0
        with torch.no_grad():
            assert not torch.allclose(planned(*real)[1], moved[1])
            torch.testing.assert_close(planned(*padded)[1], moved[1])
            torch.testing.assert_close(torch.jit.script(planned.eval())(*args), moved)

    @parameterized.expand([(2,), (3,)])
    def test_history_stacked_on_channels(self, dims):
        # the one-`image` layout of MONAI bundles: (B, T * C, *spatial) gives the same forecast, eager and scripted
        torch.manual_seed(0)
        net = _net(dims, change="deformation").eval()
        for p in net.parameters():  # leave the copy-last start so that the check sees every path
            p.data.add_(0.05 * torch.randn_like(p))
        history, times, mask, iv, ivm, st = _inputs(dims)
        stacked = history.flatten(1, 2)
        with torch.no_grad():
            expected = net.forecast(history, times, mask, iv, ivm, st)
            got = net.forecast(stacked, times, mask, iv, ivm, st)
            scripted = torch.jit.script(net)(stacked, times, mask, iv, ivm, st)
        torch.testing.assert_close(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1])
        torch.testing.assert_close(scripted, expected[0])

    @parameterized.expand(
        [
            ("rank", r"history must have shape \(B, T, C, \*2 spatial dims\)"),
            ("channels", "history has 2 channels, expected in_channels=1"),
            ("stacked", r"T \* C = 3 \* 1 = 3 channels \(T from times\), got \[2, 2, 16, 16\]"),
            ("too_long", "T=9 visits, more than max_history=8"),
            ("all_masked", "every visit of a sample as padding"),
            ("nan_ehr", "ehr_intervals contains NaN"),
            ("t_mismatch", r"ehr_intervals must have shape \(B, T, F\) = \(2, 3, 3\)"),
            ("times", r"times must have shape \(B, T\) = \(2, 3\)"),
            ("divisible", "must be divisible by 2"),
        ]
    )
    def test_bad_input(self, case, match):
        net = _net(2)
        history, times, mask, iv, ivm, st = _inputs(2)
        if case == "rank":
            history = history[:, 0, 0]
        elif case == "channels":
            history = history.repeat(1, 1, 2, 1, 1)
        elif case == "stacked":
            history = history[:, :2, 0]
        elif case == "too_long":
            history, times, mask = history.repeat(1, 3, 1, 1, 1), times.repeat(1, 3), mask.repeat(1, 3)
            iv, ivm = iv.repeat(1, 3, 1), ivm.repeat(1, 3, 1)
        elif case == "all_masked":
            mask[1] = 0
        elif case == "nan_ehr":
            iv[0, 0, 0] = float("nan")
        elif case == "t_mismatch":
            iv = iv[:, :2]
        elif case == "times":
            times = times[:, :2]
        elif case == "divisible":
            history = history[..., :15, :]
        with pytest.raises(ValueError, match=match):
            net(history, times, mask, iv, None if case == "t_mismatch" else ivm, st)

    @parameterized.expand(
        [
            ({"conditioning": "xattn"}, "conditioning must be one of"),
            ({"change": "affine"}, "change must be one of"),
            ({"change": "deformation", "residual": False}, "needs residual=True"),
            ({"flow_scale": 0.0}, "flow_scale must be > 0"),
            ({"plan_film": True, "conditioning": "none"}, "plan_film=True modulates by the EHR"),
            ({"out_channels": 2}, "residual=True needs out_channels"),
            ({"spatial_dims": 4}, "spatial_dims"),
            ({"max_history": 0}, "max_history"),
            ({"future_ehr_dim": 1, "ehr_interval_dim": 3, "future_ehr_base": [3]}, "future_ehr_base indices"),
            ({"future_ehr_dim": 2, "ehr_interval_dim": 3, "future_ehr_base": [0]}, "one feature index per"),
        ]
    )
    def test_bad_arguments(self, kwargs, match):
        args = {"spatial_dims": 2, "in_channels": 1, **kwargs}
        with pytest.raises(ValueError, match=match):
            TwinForecaster(**args)
