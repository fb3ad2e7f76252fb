"""Pairwise registration: recovered transforms against known truth, inverse, masks, labels, threads."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from monai_twin.metrics import end_point_error
from monai_twin.transforms.registration import (
    Register,
    Registerd,
    RegistrationError,
    registration_displacement,
    registration_record,
)

from .helpers import centred_affine, linear_map, phantom, rotation_3d


def _translation(t) -> np.ndarray:
    m = np.eye(len(t) + 1)
    m[: len(t), len(t)] = t
    return m


class TestRegister2D(unittest.TestCase):
    @parameterized.expand([("translation",), ("rigid",)])
    def test_world_shift_recovered_on_rotated_flipped_grids(self, stage):
        # fixed and moving on different, non-identity grids: the shift in RAS mm only comes out right
        # if the RAS<->LPS conversion and both affines are handled correctly
        fixed = phantom((64, 64), centred_affine((64, 64), (0.7, 0.7), rotation=0.3, flip=(0,)))
        shift = np.array([2.1, -1.4])
        moving_affine = centred_affine((60, 70), (0.75, 0.65), rotation=-0.2)
        moving = phantom((60, 70), moving_affine, world_map=linear_map(_translation(-shift)))
        out = Register(stages=stage)(moving, fixed)
        matrix = registration_record(out)["matrix"].numpy()
        np.testing.assert_allclose(matrix[:2, 2], shift, atol=0.3 * 0.7)
        np.testing.assert_allclose(matrix[:2, :2], np.eye(2), atol=0.01)
        np.testing.assert_allclose(out.affine.numpy(), fixed.affine.numpy())
        self.assertEqual(tuple(out.shape), (1, 64, 64))
        residual = np.abs(out[0].numpy() - fixed[0].numpy())[8:-8, 8:-8].max()
        self.assertLess(residual, 0.05)

    @parameterized.expand([("numpy",), ("torch",)])
    def test_plain_arrays_voxel_shift(self, kind):
        fixed = phantom((64, 64), centred_affine((64, 64), (0.8, 0.8)))
        shift_vox = np.array([2.5, -1.7])
        moving = phantom((64, 64), centred_affine((64, 64), (0.8, 0.8)), linear_map(_translation(-shift_vox * 0.8)))
        f = fixed.numpy() if kind == "numpy" else fixed.as_tensor()
        m = moving.numpy() if kind == "numpy" else moving.as_tensor()
        m_before = m.copy() if kind == "numpy" else m.clone()
        out = Register(stages="rigid")(m, f)
        self.assertIsInstance(out, MetaTensor)
        field = registration_displacement(out, space="voxel")
        # the anatomy sits shift_vox further along the moving grid: registered(p) = moving(p + shift_vox)
        np.testing.assert_allclose(field[:, 32, 32].numpy(), shift_vox, atol=0.3)
        np.testing.assert_array_equal(np.asarray(m), np.asarray(m_before))  # input untouched

    def test_inverse_round_trip(self):
        affine = centred_affine((64, 64), (1.0, 1.0))
        fixed = phantom((64, 64), affine)
        truth = np.eye(3)
        truth[:2, :2] = [[np.cos(0.08), -np.sin(0.08)], [np.sin(0.08), np.cos(0.08)]]
        truth[:2, 2] = [1.5, -2.0]
        moving = phantom((64, 64), affine, linear_map(np.linalg.inv(truth)))
        reg = Register(stages=("rigid", "affine"))
        out = reg(moving, fixed)
        self.assertEqual(len(out.applied_operations), 1)
        back = reg.inverse(out)
        self.assertEqual(len(back.applied_operations), 0)
        self.assertEqual(len(out.applied_operations), 1)  # the registered tensor keeps its record
        np.testing.assert_allclose(back.affine.numpy(), moving.affine.numpy())
        err = np.abs(back[0].numpy() - moving[0].numpy())[10:-10, 10:-10]
        self.assertLess(err.max(), 0.03)

    @parameterized.expand([("demons",), ("diffeomorphic_demons",), ("fast_symmetric_demons",), ("bspline",)])
    def test_deformable_recovers_smooth_field(self, stage):
        shape = (64, 64)
        affine = centred_affine(shape, (1.0, 1.0))
        fixed = phantom(shape, affine)

        def bump(points):
            b = 1.6 * np.exp(-((points[0] - 3) ** 2 + (points[1] + 2) ** 2) / (2 * 9.0**2))
            return np.stack([b, -0.6 * b])

        # moving shows g(y - b(y)); the point y it must sample for fixed point x solves y = x + b(y)
        moving = phantom(shape, affine, lambda y: y - bump(y))
        # same contrast: correlation drives the B-spline (Mattes MI lets it drift in the flat background)
        reg = Register(
            stages=(stage,),
            levels=(2, 1),
            demons_iterations=(100, 60),
            demons_sigma=1.5,  # a 64^2 phantom with a bump of sigma 9 mm: less smoothing than the default
            match_histograms=False,  # identical intensities: nothing to match
            bspline_spacing=8,
            metric="correlation",
        )
        out = reg(moving, fixed)
        field = registration_displacement(out, space="world").numpy()
        pts = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
        world = np.einsum("ij,j...->i...", affine[:2, :2], pts) + affine[:2, 2].reshape(2, 1, 1)
        target = world.copy()
        for _ in range(30):
            target = world + bump(target)
        truth = target - world
        inner = np.zeros(shape, bool)
        inner[12:-12, 12:-12] = True
        before = end_point_error(np.zeros_like(truth), truth, mask=inner)
        after = end_point_error(field, truth, mask=inner)
        self.assertLess(after, 0.5 * before, f"{stage}: EPE {after:.3f} vs {before:.3f} before")
        residual = np.abs(out[0].numpy() - fixed[0].numpy())[inner].mean()
        self.assertLess(residual, np.abs(moving[0].numpy() - fixed[0].numpy())[inner].mean() * 0.5)
        back = reg.inverse(out)  # inverting the deformable part brings the moving image back
        self.assertLess(np.abs(back[0].numpy() - moving[0].numpy())[inner].mean(), 0.01)

    def test_labels_follow_with_nearest_and_masks_restrict_metric(self):
        affine = centred_affine((64, 64), (1.0, 1.0))
        fixed = phantom((64, 64), affine)
        moving = phantom((64, 64), affine, linear_map(_translation(np.array([-2.0, 1.0]))))
        labels = MetaTensor(torch.zeros((1, 64, 64), dtype=torch.int64), affine=moving.affine)
        labels[0, 20:40, 25:35] = 3
        labels[0, 40:50, 10:20] = 7
        mask = (fixed[0].abs() > 0.05).float()
        reg = Registerd(
            keys=("image", "label"),
            fixed_key="fixed",
            fixed_mask_key="fixed_mask",
            mode=("bilinear", "nearest"),
            stages="rigid",
        )
        data = {"image": moving, "label": labels, "fixed": fixed, "fixed_mask": mask}
        out = reg(data)
        self.assertIs(data["image"], moving)  # the input dictionary is not modified
        self.assertEqual(out["label"].dtype, torch.int64)
        self.assertEqual(set(torch.unique(out["label"]).tolist()), {0, 3, 7})
        # moving shows the anatomy 2 voxels further along i: registered(p) = moving(p + 2), so the
        # label box that started at row 20 now starts at row 18
        rows = torch.nonzero(out["label"][0] == 3)[:, 0]
        self.assertEqual(int(rows.min()), 18)
        restored = reg.inverse(out)
        self.assertTrue(torch.equal(restored["label"][0, 25:35, 28:32], labels[0, 25:35, 28:32]))

    def test_unregistrable_pair_raises_or_records(self):
        affine = centred_affine((32, 32), (1.0, 1.0))
        fixed = phantom((32, 32), affine)
        # the moving grid lies 500 mm away and no centre initialisation brings it back: no overlap
        moving = MetaTensor(fixed.as_tensor().clone(), affine=torch.eye(4))
        moving.affine[:2, 3] = torch.tensor([500.0, 500.0])
        with self.assertRaisesRegex(RegistrationError, "failed"):
            Register(stages="rigid", init="none")(moving, fixed)
        out = Register(stages="rigid", init="none", on_error="identity")(moving, fixed)
        self.assertIsNotNone(registration_record(out)["failed"])
        self.assertEqual(float(out.abs().max()), 0.0)  # nothing of the moving image lands on the fixed grid


class TestRegister3D(unittest.TestCase):
    def test_rigid_rotation_and_shift(self):
        shape = (32, 32, 32)
        affine = centred_affine(shape, (1.0, 1.0, 1.0))
        fixed = phantom(shape, affine)
        truth = np.eye(4)
        truth[:3, :3] = rotation_3d(np.deg2rad([4.0, -3.0, 5.0]))
        truth[:3, 3] = [1.2, -0.8, 0.6]
        moving = phantom(shape, centred_affine(shape, (1.1, 1.0, 0.9)), linear_map(np.linalg.inv(truth)))
        out = Register(stages="rigid", levels=(2, 1))(moving, fixed)
        matrix = registration_record(out)["matrix"].numpy()
        rel = matrix[:3, :3] @ truth[:3, :3].T
        angle = np.degrees(np.arccos(np.clip((np.trace(rel) - 1) / 2, -1, 1)))
        self.assertLess(angle, 1.0)
        np.testing.assert_allclose(matrix[:3, 3], truth[:3, 3], atol=0.5)
        self.assertEqual(tuple(out.shape), (1, *shape))


class TestThreads(unittest.TestCase):
    def test_one_thread_inside_dataloader_workers(self):
        from torch.utils.data import DataLoader, Dataset

        from monai_twin.transforms.registration.sitk_backend import sitk_thread_cap

        class Probe(Dataset):
            def __len__(self):
                return 2

            def __getitem__(self, i):
                import SimpleITK as sitk

                with sitk_thread_cap(None):
                    return sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()

        seen = [int(x) for x in DataLoader(Probe(), num_workers=1, batch_size=None)]
        self.assertEqual(seen, [1, 1])


if __name__ == "__main__":
    unittest.main()


class TestDeformable3D(unittest.TestCase):
    def test_rigid_then_demons_3d(self):
        shape = (32, 32, 32)
        affine = centred_affine(shape, (1.0, 1.0, 1.0))
        fixed = phantom(shape, affine)

        def bump(points):
            b = 1.5 * np.exp(-((points[0] - 2) ** 2 + points[1] ** 2 + (points[2] + 1) ** 2) / (2 * 7.0**2))
            return np.stack([b, -0.5 * b, 0.5 * b])

        moving = phantom(shape, affine, lambda y: y - bump(y))
        reg = Register(
            stages=("rigid", "diffeomorphic_demons"), levels=(2, 1), demons_sigma=1.5, match_histograms=False
        )
        out = reg(moving, fixed)
        inner = (slice(8, -8),) * 3
        before = np.abs(moving[0].numpy() - fixed[0].numpy())[inner].mean()
        after = np.abs(out[0].numpy() - fixed[0].numpy())[inner].mean()
        self.assertLess(after, 0.5 * before)
        field = registration_displacement(out, space="world")
        self.assertEqual(tuple(field.shape), (3, *shape))
        # the bump centre moves by about (1.5, -0.75, 0.75) mm
        np.testing.assert_allclose(field[:, 18, 16, 15].numpy(), [1.5, -0.75, 0.75], atol=0.5)
