"""VoxelMorph: training reduces the loss, the transform records like Register, weights round-trip."""

from __future__ import annotations

import json
import unittest
from pathlib import Path
from tempfile import TemporaryDirectory

import numpy as np
import torch
from parameterized import parameterized

from monai_twin.transforms.registration import registration_displacement, registration_record
from monai_twin.transforms.registration.learned import (
    RegisterVoxelMorph,
    ResidualRefiner,
    _BlockMax,
    _normalise,
    _warp,
    build_voxelmorph,
    compose_displacements,
    demons_fields,
    displacement_smoothness,
    load_voxelmorph,
    masked_ssim_loss,
    train_refiner,
    train_voxelmorph,
)

from .helpers import centred_affine, phantom

SHAPE = (32, 32)
AFFINE = centred_affine(SHAPE, (1.5, 1.5))


SHIFT = np.array([1.2, -0.9])  # mm


def _pairs(n=6, seed=0):
    """Noisy copies of one pair whose moving image shows the anatomy shifted by SHIFT: a model that
    learns it from seconds of training is checkable, unlike a general registration."""
    fixed = phantom(SHAPE, AFFINE)
    moving = phantom(SHAPE, AFFINE, lambda y: y - SHIFT.reshape(2, 1, 1))
    rng = np.random.default_rng(seed)
    # moving shows g(y - s): the true pull-back is +s mm, i.e. s / 1.5 voxels, everywhere
    truth = np.broadcast_to((SHIFT / 1.5).reshape(2, 1, 1), (2, *SHAPE)).astype(np.float32)
    noisy = [
        (
            moving[0].numpy() + 0.01 * rng.standard_normal(SHAPE).astype(np.float32),
            fixed[0].numpy() + 0.01 * rng.standard_normal(SHAPE).astype(np.float32),
            truth,
        )
        for _ in range(n)
    ]
    return noisy


def _assert_full_resolution_term_learns_the_shift(test: unittest.TestCase, pairs, term: str) -> None:
    # unsupervised, one image term on the full-resolution grid only: the coarse grid's field,
    # upsampled as at inference, must still move the moving image onto the fixed one
    torch.manual_seed(0)
    result = train_voxelmorph(
        pairs,
        2,
        steps=120,
        batch_size=3,
        learning_rate=3e-3,
        similarity=0.0,
        smoothness=0.01,
        nb_features=(8, 8),
        scale=2,
        log_every=0,
        **{term: 1.0},
    )
    test.assertEqual(result["config"]["training"][term], 1.0)
    test.assertLess(np.mean(result["losses"][-10:]), 0.6 * np.mean(result["losses"][:10]))
    moving = phantom(SHAPE, AFFINE, lambda y: y - SHIFT.reshape(2, 1, 1))
    out = RegisterVoxelMorph(result["model"])(moving, phantom(SHAPE, AFFINE))
    field = registration_displacement(out, space="world")[:, 8:-8, 8:-8].mean((1, 2)).numpy()
    np.testing.assert_allclose(field, SHIFT, atol=0.4)


class _OneThread(unittest.TestCase):
    def setUp(self):
        # small convolutions: thread start-up costs more than it saves, and other jobs share the CPU
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def tearDown(self):
        torch.set_num_threads(self._threads)


class TestVoxelMorph(_OneThread):
    def test_smoothness_is_zero_for_a_constant_field(self):
        self.assertEqual(float(displacement_smoothness(torch.ones(1, 2, 8, 8))), 0.0)
        ramp = torch.arange(8.0).reshape(1, 1, 8, 1).expand(1, 2, 8, 8)
        self.assertAlmostEqual(float(displacement_smoothness(ramp)), 0.5)  # 1 along one of two axes

    def test_supervised_training_learns_the_shift_and_round_trips(self):
        pairs = _pairs()
        with TemporaryDirectory() as tmp:
            path = Path(tmp) / "vxm.pt"
            result = train_voxelmorph(
                pairs,
                2,
                steps=80,
                batch_size=3,
                learning_rate=3e-3,
                supervised=1.0,
                nb_features=(8, 8, 8),
                log_every=0,
                out=path,
            )
            losses = result["losses"]
            self.assertLess(np.mean(losses[-10:]), 0.5 * np.mean(losses[:10]))
            model = load_voxelmorph(path)  # weights_only load of the saved dict
            for a, b in zip(model.state_dict().values(), result["model"].state_dict().values()):
                self.assertTrue(torch.equal(a, b))
            self.assertLess(path.stat().st_size, 5e6)
            state = torch.load(path, weights_only=True)  # a bare state_dict, the architecture in the JSON
            self.assertTrue(all(torch.is_tensor(v) for v in state.values()))
            record = json.loads(path.with_suffix(".json").read_text())
            self.assertEqual(record["architecture"]["nb_features"], [8, 8, 8])
            self.assertEqual(record["training"]["steps"], 80)
        reg = RegisterVoxelMorph(model)
        moving = phantom(SHAPE, AFFINE, lambda y: y - SHIFT.reshape(2, 1, 1))
        fixed = phantom(SHAPE, AFFINE)
        out = reg(moving, fixed)
        field = registration_displacement(out, space="world")[:, 8:-8, 8:-8].mean((1, 2)).numpy()
        np.testing.assert_allclose(field, SHIFT, atol=0.3)
        self.assertEqual(registration_record(out)["stages"], ["voxelmorph"])
        back = reg.inverse(out)
        self.assertEqual(back.shape, moving.shape)
        self.assertEqual(len(back.applied_operations), 0)

    def test_full_resolution_similarity_alone_learns_the_shift(self):
        _assert_full_resolution_term_learns_the_shift(self, _pairs(), "fine_similarity")

    def test_upsampling_matches_the_forward_pass(self):
        torch.manual_seed(0)
        net = build_voxelmorph(2, (4, 4), integration_steps=2, scale=4)
        source, target = torch.rand(1, 1, 30, 37), torch.rand(1, 1, 30, 37)
        with torch.no_grad():
            full = net(source, target)
            coarse = net.vxm(*net.network_input(source, target))
            torch.testing.assert_close(net.upsample(coarse)[:, :, :30, :37], full)

    def test_bad_input(self):
        with self.assertRaisesRegex(ValueError, "at least one"):
            train_voxelmorph([], 2)
        with self.assertRaisesRegex(ValueError, "true field"):
            train_voxelmorph([(np.zeros(SHAPE), np.zeros(SHAPE), None)], 2, supervised=1.0)
        model = train_voxelmorph(_pairs(2), 2, steps=1, nb_features=(4, 4), log_every=0)["model"]
        blank = phantom(SHAPE, AFFINE) * 0
        with self.assertRaisesRegex(ValueError, "constant"):
            RegisterVoxelMorph(model)(blank, phantom(SHAPE, AFFINE))
        for bad_value in (float("nan"), float("inf"), -float("inf")):
            spoiled = phantom(SHAPE, AFFINE)
            spoiled[0, 3, 5] = bad_value
            with self.assertRaisesRegex(ValueError, "NaN/infinite"):
                RegisterVoxelMorph(model)(spoiled, phantom(SHAPE, AFFINE))
            with self.assertRaisesRegex(ValueError, "NaN/infinite"):
                RegisterVoxelMorph(model)(phantom(SHAPE, AFFINE), spoiled)
        with TemporaryDirectory() as tmp:
            bad = Path(tmp) / "bad.pt"
            torch.save({"weights": torch.zeros(1)}, bad)
            with self.assertRaisesRegex(ValueError, "no bad.json next to it"):
                load_voxelmorph(bad)
            bad.with_suffix(".json").write_text(json.dumps({"architecture": {"spatial_dims": 2}}))
            torch.save({"weights": [1, 2]}, bad)
            with self.assertRaisesRegex(ValueError, "not a monai_twin VoxelMorph checkpoint"):
                load_voxelmorph(bad)

    @parameterized.expand([(2, (1, 3, 9, 8)), (2, (2, 4, 16, 16)), (3, (1, 2, 5, 6, 7))])
    def test_block_max_is_max_pool_at_inference_and_in_training(self, ndim, shape):
        pool = torch.nn.MaxPool2d(2) if ndim == 2 else torch.nn.MaxPool3d(2)
        fast = _BlockMax(pool, ndim)
        x = torch.randn(*shape)
        x[(0, 0, *([slice(0, 2)] * ndim))] = 0.5  # ties inside a block
        x.view(-1)[3] = float("nan")  # a NaN wins its block, as with max_pool
        with torch.inference_mode():
            torch.testing.assert_close(fast(x), pool(x), equal_nan=True, rtol=0, atol=0)
        # with autograd the module is max_pool itself: the same gradient (one winner per tie)
        a, b = x.nan_to_num().requires_grad_(), x.nan_to_num().requires_grad_()
        fast(a).sum().backward()
        pool(b).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        # the U-Net's poolings are wrapped; nothing else is, and the weights are the same keys
        net = build_voxelmorph(ndim, (4, 4), integration_steps=2)
        self.assertEqual(sum(isinstance(m, _BlockMax) for m in net.modules()), 2)
        plain = [m for m in net.modules() if isinstance(m, (torch.nn.MaxPool2d, torch.nn.MaxPool3d))]
        self.assertEqual(len(plain), 2)  # each kept inside its wrapper for training
        self.assertFalse(any("pool" in key for key in net.state_dict()))

    def test_normalise_maps_the_1st_and_99th_percentiles_to_0_and_1(self):
        torch.manual_seed(0)
        x = torch.rand(3, 1, 40, 50) ** 2 * torch.tensor([1.0, 10.0, 0.01]).reshape(3, 1, 1, 1)
        x[0, 0, :5] = 0.0  # ties at the bottom, as air in a mammogram
        out = _normalise(x)
        # the reference: the order statistics of a full sort of each image (all 2 000 voxels are used)
        ordered = x.flatten(1).sort(dim=1).values
        lo, hi = ordered[:, int(round(0.01 * 1999))], ordered[:, int(round(0.99 * 1999))]
        expected = ((x - lo.reshape(3, 1, 1, 1)) / (hi - lo).reshape(3, 1, 1, 1)).clamp(-0.5, 1.5)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        # the autograd path (topk) selects the same values
        torch.testing.assert_close(_normalise(x.clone().requires_grad_()).detach(), out, rtol=0, atol=0)

    def test_warp_reuses_its_grid_with_the_same_result(self):
        from monai_twin.transforms.registration import learned

        image = torch.rand(1, 1, 21, 26)
        disp = 1.5 * torch.randn(1, 2, 21, 26)
        kept = disp.clone()
        first = _warp(image, disp)
        grid, _ = learned._identity_grid(disp)
        again = _warp(image, disp)
        self.assertIs(learned._identity_grid(disp)[0], grid)  # built once per shape
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        # the same warp written out: x + d(x) on the voxel grid, grid_sample's unit coordinates
        y, x = torch.meshgrid(torch.arange(21.0), torch.arange(26.0), indexing="ij")
        unit = torch.stack([2 * (x + disp[0, 1]) / 25 - 1, 2 * (y + disp[0, 0]) / 20 - 1], -1)[None]
        expected = torch.nn.functional.grid_sample(image, unit, align_corners=True)
        torch.testing.assert_close(first, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(disp, kept, rtol=0, atol=0)  # the field is not modified in place

    @parameterized.expand([(2, (30, 37), 1), (2, (30, 37), 2), (3, (12, 10, 9), 2)])
    def test_scaled_network_keeps_the_input_grid(self, ndim, shape, scale):
        torch.manual_seed(0)
        net = build_voxelmorph(ndim, (4, 4, 4), integration_steps=2, scale=scale)
        with torch.no_grad():
            disp = net(torch.rand(2, 1, *shape), torch.rand(2, 1, *shape))
        self.assertEqual(tuple(disp.shape), (2, ndim, *shape))
        self.assertTrue(torch.isfinite(disp).all())
        # a constant coarse field comes back multiplied by the scale (voxels of the finer grid)
        net.vxm.forward = lambda s, t: torch.ones(s.shape[0], ndim, *s.shape[2:])
        disp = net(torch.rand(1, 1, *shape), torch.rand(1, 1, *shape))
        torch.testing.assert_close(disp, torch.full_like(disp, float(scale)))

    @parameterized.expand([(2, (30, 37), 4), (3, (12, 10, 9), 2)])
    def test_unshuffle_pooling_feeds_every_voxel_as_a_channel(self, ndim, shape, scale):
        torch.manual_seed(0)
        net = build_voxelmorph(ndim, (4, 4), integration_steps=2, scale=scale, pooling="unshuffle")
        source, target = torch.rand(2, 1, *shape), torch.rand(2, 1, *shape)
        s, t = net.network_input(source, target)
        self.assertEqual(s.shape[1], scale**ndim)
        padded = net._pad(source)
        if ndim == 2:
            torch.testing.assert_close(s, torch.nn.functional.pixel_unshuffle(padded, scale))
        else:  # channel k holds the block offset (k // s^2, k // s % s, k % s)
            k = 5
            offset = (k // scale**2, k // scale % scale, k % scale)
            torch.testing.assert_close(
                s[:, k], padded[:, 0, offset[0] :: scale, offset[1] :: scale, offset[2] :: scale]
            )
        # the average of the block channels is the average-pooled image
        torch.testing.assert_close(t.mean(1, keepdim=True), net.coarse(target))
        with torch.no_grad():
            self.assertEqual(tuple(net(source, target).shape), (2, ndim, *shape))
        with self.assertRaisesRegex(ValueError, "pooling"):
            build_voxelmorph(ndim, (4, 4), scale=scale, pooling="max")

    def test_identity_pairs_are_added_and_recorded(self):
        with TemporaryDirectory() as tmp:
            path = Path(tmp) / "vxm.pt"
            train_voxelmorph(
                _pairs(4),
                2,
                steps=2,
                batch_size=2,
                supervised=1.0,
                nb_features=(4, 4),
                scale=2,
                pooling="unshuffle",
                identity_fraction=0.5,
                log_every=0,
                out=path,
            )
            record = json.loads(path.with_suffix(".json").read_text())
            self.assertEqual((record["training"]["pairs"], record["training"]["identity_pairs"]), (4, 2))
            self.assertEqual(record["architecture"]["pooling"], "unshuffle")
            model = load_voxelmorph(path)
            self.assertEqual((model.pooling, model.scale), ("unshuffle", 2))
        with self.assertRaisesRegex(ValueError, "identity_fraction"):
            train_voxelmorph(_pairs(2), 2, steps=1, identity_fraction=-1.0)

    def test_flips_and_fine_tuning(self):
        pairs = _pairs(4)
        first = train_voxelmorph(pairs, 2, steps=2, batch_size=2, supervised=1.0, nb_features=(4, 4), log_every=0)
        state = first["model"].state_dict()
        # a zero learning rate keeps the initial weights: the fine-tuned model starts from them
        again = train_voxelmorph(
            pairs,
            2,
            steps=3,
            batch_size=2,
            learning_rate=0.0,
            supervised=1.0,
            nb_features=(4, 4),
            flip_axes=(1,),
            initial_state=state,
            log_every=0,
        )
        for key, value in again["model"].state_dict().items():
            torch.testing.assert_close(value, state[key])
        self.assertEqual(again["config"]["training"]["flip_axes"], [1])
        self.assertTrue(again["config"]["training"]["fine_tuned"])
        self.assertTrue(np.isfinite(again["losses"]).all())
        with self.assertRaisesRegex(ValueError, "flip_axes"):
            train_voxelmorph(pairs, 2, steps=1, flip_axes=(2,))
        with self.assertRaisesRegex(ValueError, "pooling='average'"):
            train_voxelmorph(pairs, 2, steps=1, scale=2, pooling="unshuffle", flip_axes=(0,))


class TestDistillationAndSSIM(_OneThread):
    """The classical step as a teacher, and the SSIM image term."""

    def test_demons_fields_recover_the_shift(self):
        pairs = _pairs(2)
        fields = demons_fields(pairs, spacing=1.5)
        self.assertEqual(fields.shape, (2, 2, *SHAPE))
        self.assertEqual(fields.dtype, np.float32)
        # the pull-back of the shifted anatomy: +SHIFT / 1.5 voxels, where the phantom has structure
        inner = fields[:, :, 10:-10, 10:-10].mean((0, 2, 3))
        np.testing.assert_allclose(inner, SHIFT / 1.5, atol=0.25)

    def test_masked_ssim_loss_matches_the_benchmark_metric(self):
        from monai_twin.metrics import ssim

        rng = np.random.default_rng(0)
        a = rng.random((40, 36)).astype(np.float32)
        b = (0.7 * a + 0.3 * rng.random((40, 36))).astype(np.float32)
        mask = np.zeros((40, 36), bool)
        mask[8:30, 6:26] = True
        loss = masked_ssim_loss(
            torch.as_tensor(a)[None, None], torch.as_tensor(b)[None, None], torch.as_tensor(mask)[None, None]
        )
        self.assertAlmostEqual(1.0 - float(loss), ssim(a, b, data_range=1.0, mask=mask), places=4)
        same = masked_ssim_loss(
            torch.as_tensor(b)[None, None], torch.as_tensor(b)[None, None], torch.ones(1, 1, 40, 36)
        )
        self.assertAlmostEqual(float(same), 0.0, places=5)

    def test_distillation_alone_learns_the_teacher_field(self):
        # no image term, no true field: the teacher's field (here the opposite of the true shift, so
        # the model can only have learned it from the teacher) is what the model reproduces
        pairs = [(m, f, None) for m, f, _ in _pairs()]
        teacher = np.broadcast_to((-SHIFT / 1.5).reshape(2, 1, 1), (2, *SHAPE)).astype(np.float32)
        torch.manual_seed(0)
        result = train_voxelmorph(
            pairs,
            2,
            steps=80,
            batch_size=3,
            learning_rate=3e-3,
            similarity=0.0,
            smoothness=0.0,
            teacher_fields=[teacher] * len(pairs),
            distill=1.0,
            nb_features=(8, 8, 8),
            log_every=0,
        )
        self.assertEqual(result["config"]["training"]["distill"], 1.0)
        with torch.no_grad():
            m, f = pairs[0][0], pairs[0][1]
            pair = _normalise(torch.as_tensor(np.stack([m, f]))[:, None])
            disp = result["model"](pair[:1], pair[1:])[0, :, 10:-10, 10:-10].mean((1, 2)).numpy()
        np.testing.assert_allclose(disp, -SHIFT / 1.5, atol=0.3)
        # identity pairs get a zero teacher field, mirrored batches a mirrored one
        mixed = train_voxelmorph(
            pairs,
            2,
            steps=2,
            batch_size=4,
            teacher_fields=[teacher] * len(pairs),
            distill=1.0,
            nb_features=(4, 4),
            identity_fraction=0.5,
            flip_axes=(0, 1),
            log_every=0,
        )
        self.assertEqual(mixed["config"]["training"]["identity_pairs"], 3)
        self.assertTrue(np.isfinite(mixed["losses"]).all())
        with self.assertRaisesRegex(ValueError, "teacher_fields"):
            train_voxelmorph(pairs, 2, steps=1, distill=1.0)
        with self.assertRaisesRegex(ValueError, "teacher_fields"):
            train_voxelmorph(pairs, 2, steps=1, distill=1.0, teacher_fields=[teacher[:1]] * len(pairs))

    def test_full_resolution_ssim_term_alone_learns_the_shift(self):
        # without the true fields (unsupervised)
        _assert_full_resolution_term_learns_the_shift(self, [(m, f, None) for m, f, _ in _pairs()], "fine_ssim")


BUNDLES = Path(__file__).resolve().parents[3] / "bundles"


class TestCascade(_OneThread):
    """The coarse U-Net followed by a full-resolution residual refiner."""

    def test_composed_field_warps_like_the_two_warps_in_turn(self):
        # smooth fields of a few voxels: warping by `first` then by `second` is one warp by the composition
        y, x = torch.meshgrid(torch.arange(48.0), torch.arange(40.0), indexing="ij")
        first = torch.stack([2.0 * torch.sin(x / 9.0), 1.5 * torch.cos(y / 7.0)])[None]
        second = torch.stack([torch.cos(x / 6.0 + y / 11.0), -0.8 * torch.sin(y / 5.0)])[None]
        image = torch.sin(x / 4.0)[None, None] * torch.cos(y / 5.0)[None, None]
        twice = _warp(_warp(image, first), second)
        inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))

        def error(disp):
            return float((twice - _warp(image, disp))[inner].abs().mean())

        composed = error(compose_displacements(first, second))
        self.assertLess(composed, 0.005)  # bilinear interpolation, twice vs once
        # neither the plain sum of the two fields nor the composition in the other order is that close
        self.assertGreater(error(first + second), 3 * composed)
        self.assertGreater(error(compose_displacements(second, first)), 3 * composed)

    def test_untrained_refiner_leaves_the_coarse_field_and_weights_round_trip(self):
        torch.manual_seed(0)
        coarse = build_voxelmorph(2, (4, 4), integration_steps=2, scale=2)
        cascade = build_voxelmorph(2, (4, 4), integration_steps=2, scale=2, refine_features=(4, 4), refine_scale=2)
        cascade.vxm.load_state_dict(coarse.vxm.state_dict())
        self.assertIsNone(coarse.refine)
        source, target = torch.rand(2, 1, 30, 37), torch.rand(2, 1, 30, 37)
        with torch.no_grad():
            # the refiner's last convolution starts at zero: the cascade starts as the coarse model
            torch.testing.assert_close(cascade(source, target), coarse(source, target))
        with self.assertRaisesRegex(ValueError, "refine_scale 3 must divide"):
            build_voxelmorph(2, (4, 4), scale=2, refine_features=(4,), refine_scale=3)
        with self.assertRaisesRegex(ValueError, "multiple of scale"):
            ResidualRefiner(2, (4,), scale=2)(torch.rand(1, 1, 9, 8), torch.rand(1, 1, 9, 8))
        with self.assertRaisesRegex(ValueError, "needs a cascade"):
            train_refiner(_pairs(2), coarse, steps=1)

    def test_refiner_recovers_what_a_frozen_coarse_model_misses(self):
        # a coarse model that predicts nothing (its flow layer zeroed) and is frozen: the shift can
        # only come from the refiner, trained on the full-resolution image term alone
        torch.manual_seed(0)
        model = build_voxelmorph(2, (4, 4), integration_steps=2, scale=2, refine_features=(8, 8), refine_scale=2)
        flow = [m for m in model.vxm.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        torch.nn.init.zeros_(flow.weight)
        torch.nn.init.zeros_(flow.bias)
        frozen = {k: v.clone() for k, v in model.vxm.state_dict().items()}
        with TemporaryDirectory() as tmp:
            path = Path(tmp) / "cascade.pt"
            result = train_refiner(
                _pairs(),
                model,
                steps=150,
                batch_size=3,
                learning_rate=3e-3,
                similarity=1.0,
                ssim=0.0,
                smoothness=0.01,
                log_every=0,
                out=path,
            )
            self.assertLess(np.mean(result["losses"][-10:]), 0.6 * np.mean(result["losses"][:10]))
            for key, value in result["model"].vxm.state_dict().items():
                self.assertTrue(torch.equal(value, frozen[key]), key)
            record = json.loads(path.with_suffix(".json").read_text())
            self.assertEqual(
                (record["architecture"]["refine_features"], record["architecture"]["refine_scale"]), ([8, 8], 2)
            )
            self.assertEqual(record["refiner_training"]["coarse_learning_rate"], 0.0)
            loaded = load_voxelmorph(path)  # weights_only, the refiner rebuilt from the JSON
            for a, b in zip(loaded.state_dict().values(), result["model"].state_dict().values()):
                self.assertTrue(torch.equal(a, b))
        moving = phantom(SHAPE, AFFINE, lambda y: y - SHIFT.reshape(2, 1, 1))
        out = RegisterVoxelMorph(loaded)(moving, phantom(SHAPE, AFFINE))
        field = registration_displacement(out, space="world")[:, 8:-8, 8:-8].mean((1, 2)).numpy()
        np.testing.assert_allclose(field, SHIFT, atol=0.3)
        self.assertEqual(registration_record(out)["stages"], ["voxelmorph"])
        # without its refiner the cascade is the zeroed coarse stage: no displacement at all
        coarse_only = RegisterVoxelMorph(loaded, refine=False)(moving, phantom(SHAPE, AFFINE))
        self.assertEqual(float(registration_displacement(coarse_only, space="world").abs().max()), 0.0)

    def test_supervised_and_ssim_terms_fine_tune_the_coarse_model_when_asked(self):
        torch.manual_seed(0)
        model = build_voxelmorph(2, (4, 4), integration_steps=2, scale=2, refine_features=(4,), refine_scale=1)
        before = {k: v.clone() for k, v in model.vxm.state_dict().items()}
        result = train_refiner(
            _pairs(4),
            model,
            steps=5,
            batch_size=2,
            ssim=1.0,
            ssim_crop=16,
            supervised=1.0,
            coarse_learning_rate=1e-3,
            identity_fraction=0.5,
            flip_axes=(1,),
            log_every=0,
        )
        self.assertTrue(np.isfinite(result["losses"]).all())
        self.assertTrue(any(not torch.equal(v, before[k]) for k, v in result["model"].vxm.state_dict().items()))
        self.assertEqual(result["config"]["refiner_training"]["identity_pairs"], 2)

    def test_refiner_raises_the_ssim_of_the_shipped_model_on_testbed_pairs(self):
        # the shipped 2D cascade's U-Net as the frozen coarse stage, a new refiner trained briefly on three testbed
        # mammography pairs (seed 5: no training, validation or benchmark cohort): on those pairs the
        # cascade's registered image is closer to the fixed one over tissue, and its field does not fold
        path = BUNDLES / "mammo_twin_2d" / "models" / "voxelmorph.pt"
        if not path.is_file():
            self.skipTest(f"{path} is not in this checkout")
        from monai_twin.metrics import folding_fraction, ssim
        from monai_twin.transforms.registration.learned import testbed_pairs

        pairs = testbed_pairs("mammo2d", 3, seed=5, visits_per_subject=2)
        base = load_voxelmorph(path)
        torch.manual_seed(0)
        cascade = build_voxelmorph(
            2, base.nb_features, base.integration_steps, base.scale, base.pooling, (8, 8), refine_scale=4
        )
        cascade.vxm.load_state_dict(base.vxm.state_dict())
        train_refiner(pairs, cascade, steps=60, batch_size=3, learning_rate=2e-3, ssim=1.0, smoothness=0.2, log_every=0)
        scores = {True: [], False: []}
        for moving, fixed, _ in pairs:
            tissue = fixed > 0.1
            pair = _normalise(torch.as_tensor(np.stack([moving, fixed]))[:, None])
            for refine in (True, False):
                with torch.no_grad():
                    disp = cascade(pair[:1], pair[1:], refine=refine)
                warped = _warp(torch.as_tensor(moving)[None, None], disp)[0, 0].numpy()
                scores[refine].append(ssim(warped, fixed, data_range=1.0, mask=tissue))
                if refine:
                    self.assertEqual(folding_fraction(disp[0].numpy(), mask=tissue), 0.0)
        # +0.010 here (0.844 vs 0.834; the shipped cascade, whose refiner trained 17 500 steps, scores 0.890)
        self.assertGreater(np.mean(scores[True]), np.mean(scores[False]) + 0.003)


class TestShippedWeights(unittest.TestCase):
    """The committed weights load without unpickling code, are small, and leave an unchanged pair alone."""

    @parameterized.expand([("mammo_twin_2d", "mammo2d"), ("mri_roi_twin_3d", "mri_roi3d")])
    def test_bundle_weights(self, bundle, kind):
        path = BUNDLES / bundle / "models" / "voxelmorph.pt"
        if not path.is_file():
            self.skipTest(f"{path} is not in this checkout")
        self.assertLess(path.stat().st_size, 5e6)
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.assertTrue(all(torch.is_tensor(v) for v in state.values()))
        record = json.loads(path.with_suffix(".json").read_text())
        self.assertIn("command", record)
        from monai_twin.data.synthetic.cohort import resimulate, simulate_subject

        model = load_voxelmorph(path)
        # a testbed scan against itself: nothing to recover (the 2D model still predicts ~0.2 px on
        # tissue, a bias towards the compression residuals it was trained on, down from ~0.6 px
        # before identity pairs were added to its training and ~0.3 px before the larger cohort)
        # seed 5: neither a training cohort (1, 3), the validation seed (2) nor the benchmark's (0)
        image = torch.as_tensor(resimulate(simulate_subject(kind, 0, seed=5)).images[0], dtype=torch.float32)
        pair = _normalise(image[None, None])
        with torch.no_grad():
            disp = model(pair, pair)
        self.assertEqual(tuple(disp.shape), (1, image.ndim, *image.shape))
        tissue = pair[0, 0] > 0.05
        self.assertLess(float(disp[0].norm(dim=0)[tissue].mean()), 1.0)  # voxels


if __name__ == "__main__":
    unittest.main()
