"""Registration metrics against closed forms and skimage."""

from __future__ import annotations

import time
import unittest

import numpy as np
import torch
from parameterized import parameterized

from monai_twin.metrics import (
    correlation,
    end_point_error,
    folding_fraction,
    jacobian_determinant,
    log_jacobian_std,
    normalized_mutual_information,
    ssim,
)


def _smooth(shape, seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    return gaussian_filter(rng.random(shape), 2.0)


class TestSimilarity(unittest.TestCase):
    def test_nmi_bounds_and_contrast_invariance(self):
        a = _smooth((64, 64))
        self.assertAlmostEqual(normalized_mutual_information(a, a), 2.0, places=6)
        # a monotone contrast change keeps the information: NMI stays high, correlation does not have to
        self.assertGreater(normalized_mutual_information(a, np.exp(5 * a)), 1.6)
        rng = np.random.default_rng(1)
        noise = rng.random((64, 64))
        self.assertLess(normalized_mutual_information(a, noise), 1.1)
        self.assertEqual(normalized_mutual_information(a, np.ones_like(a)), 1.0)

    def test_correlation(self):
        a = _smooth((32, 32))
        self.assertAlmostEqual(correlation(a, 3 * a + 1), 1.0, places=9)
        self.assertAlmostEqual(correlation(a, -a), -1.0, places=9)
        self.assertEqual(correlation(a, np.zeros_like(a)), 0.0)
        mask = np.zeros_like(a)
        mask[:10] = 1
        b = a.copy()
        b[10:] = 0  # differences only outside the mask
        self.assertAlmostEqual(correlation(a, b, mask=mask), 1.0, places=9)

    def test_masks_of_any_kind_and_the_joint_call_give_the_same_values(self):
        from monai_twin.metrics.registration import _nmi_and_correlation

        a = _smooth((48, 48))
        b = np.exp(2 * a) + 0.01 * np.random.default_rng(3).standard_normal(a.shape)
        b[0, 0] = np.nan  # never compared
        region = np.zeros(a.shape, dtype=bool)
        region[5:40, 8:30] = True
        for mask, expected_size in ((None, a.size - 1), (region, int(region.sum()))):
            nmi = normalized_mutual_information(a, b, mask=mask)
            corr = correlation(a, b, mask=mask)
            # the joint call gathers the voxels once and returns exactly the two separate values
            self.assertEqual(_nmi_and_correlation(a, b, mask=mask), (nmi, corr))
            if mask is not None:  # a float or tensor mask selects the same voxels as the boolean one
                self.assertEqual(normalized_mutual_information(a, b, mask=mask.astype(np.float32)), nmi)
                self.assertEqual(correlation(a, b, mask=torch.as_tensor(mask)), corr)
            # against a reference on the explicitly gathered values
            keep = np.isfinite(b) & (np.ones_like(region) if mask is None else region)
            self.assertEqual(int(keep.sum()), expected_size)
            self.assertAlmostEqual(corr, float(np.corrcoef(a[keep], b[keep])[0, 1]), places=12)
            hist = np.histogram2d(a[keep], b[keep], bins=32)[0]
            p = hist / hist.sum()

            def entropy(q):
                q = q[q > 0]
                return -(q * np.log(q)).sum()

            self.assertAlmostEqual(nmi, (entropy(p.sum(1)) + entropy(p.sum(0))) / entropy(p.ravel()), places=12)
        # an all-true mask compares every voxel, like no mask
        full = np.ones(a.shape, dtype=bool)
        self.assertEqual(normalized_mutual_information(a, a**2, mask=full), normalized_mutual_information(a, a**2))
        with self.assertRaisesRegex(ValueError, "mask must have"):
            correlation(a, b, mask=region[:10])

    @parameterized.expand([((64, 64),), ((24, 24, 24),)])
    def test_ssim_matches_skimage(self, shape):
        from skimage.metrics import structural_similarity

        a = _smooth(shape)
        b = a + 0.05 * np.random.default_rng(2).standard_normal(shape)
        expected = structural_similarity(
            a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
        )
        self.assertAlmostEqual(ssim(a, b, data_range=1.0), expected, places=6)
        self.assertAlmostEqual(ssim(torch.as_tensor(a), torch.as_tensor(a), data_range=1.0), 1.0, places=9)

    def test_ssim_fast_on_128_cubed(self):
        a = np.random.default_rng(0).random((128, 128, 128)).astype(np.float32)
        start = time.perf_counter()
        ssim(a, a * 0.9, data_range=1.0)
        self.assertLess(time.perf_counter() - start, 4.0)  # a dense 3D window (MONAI's) took 8 s here

    def test_bad_inputs(self):
        a = _smooth((32, 32))
        with self.assertRaisesRegex(ValueError, "same shape"):
            correlation(a, a[:10])
        with self.assertRaisesRegex(ValueError, "NaN"):
            ssim(a, np.full_like(a, np.nan))
        with self.assertRaisesRegex(ValueError, "constant"):
            ssim(a, np.ones_like(a))
        with self.assertRaisesRegex(ValueError, "no finite voxel"):
            normalized_mutual_information(a, a, mask=np.zeros_like(a))


class TestJacobian(unittest.TestCase):
    def test_affine_field_has_constant_determinant(self):
        shape = (20, 22)
        grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
        a = np.array([[0.2, 0.1], [-0.05, -0.3]])
        u = np.einsum("ij,j...->i...", a, grid)
        det = jacobian_determinant(u)
        np.testing.assert_allclose(det, np.linalg.det(np.eye(2) + a), atol=1e-9)
        self.assertEqual(folding_fraction(u), 0.0)
        self.assertAlmostEqual(log_jacobian_std(u), 0.0, places=9)
        # spacing: the same field in mm on a 2 mm grid halves the gradient
        np.testing.assert_allclose(jacobian_determinant(u, spacing=(2.0, 2.0)), np.linalg.det(np.eye(2) + a / 2))

    def test_folding_detected_3d(self):
        shape = (12, 12, 12)
        grid = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
        u = np.zeros((3, *shape))
        u[0] = -2.0 * grid[0]  # x -> -x: det = -1 everywhere
        self.assertEqual(folding_fraction(u), 1.0)
        self.assertEqual(log_jacobian_std(u), float("inf"))

    def test_end_point_error(self):
        t = np.zeros((2, 8, 8))
        e = np.zeros((2, 8, 8))
        e[0] = 3.0
        e[1] = 4.0
        self.assertAlmostEqual(end_point_error(e, t), 5.0)
        self.assertAlmostEqual(end_point_error(e, t, spacing=(2.0, 0.5)), np.hypot(6.0, 2.0))
        mask = np.zeros((8, 8))
        mask[0, 0] = 1
        e[:, 1:] = 0.0
        self.assertAlmostEqual(end_point_error(e, t, mask=mask), 5.0)


if __name__ == "__main__":
    unittest.main()
