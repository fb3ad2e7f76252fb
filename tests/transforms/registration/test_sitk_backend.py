"""RAS <-> LPS conversion: the MONAI/ITK boundary is where sign errors hide, so test it with
rotated, flipped, anisotropic grids."""

from __future__ import annotations

import unittest

import numpy as np
from parameterized import parameterized

from monai_twin.transforms.registration.sitk_backend import (
    array_to_sitk,
    ras_to_lps,
    sitk_field_to_ras,
    sitk_linear_to_ras,
    sitk_thread_cap,
    sitk_to_array,
)

from .helpers import centred_affine


def _affine(ndim: int) -> np.ndarray:
    shape = (9, 7, 5)[:ndim]
    affine = centred_affine(shape, (1.5, 0.8, 2.0)[:ndim], rotation=0.4, flip=(1,))
    affine[:ndim, ndim] += np.array([10.0, -5.0, 3.0][:ndim])
    return affine


class TestConversion(unittest.TestCase):
    @parameterized.expand([(2,), (3,)])
    def test_voxel_world_position_agrees(self, ndim):
        affine = _affine(ndim)
        shape = (9, 7, 5)[:ndim]
        arr = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        image = array_to_sitk(arr, affine)
        index = (4, 2, 1)[:ndim]
        # the same voxel holds the same value in both libraries...
        self.assertEqual(image.GetPixel(index), arr[index])
        # ...and sits at the same world point, up to the sign flip of x and y
        lps = np.asarray(image.TransformIndexToPhysicalPoint(index))
        ras = affine[:ndim, :ndim] @ np.asarray(index) + affine[:ndim, ndim]
        np.testing.assert_allclose(lps, ras_to_lps(ndim) @ ras, atol=1e-9)
        self.assertFalse(np.allclose(lps, ras))  # the flip is real for this grid
        back, back_affine = sitk_to_array(image)
        np.testing.assert_array_equal(back, arr)
        np.testing.assert_allclose(back_affine, affine, atol=1e-9)

    def test_linear_transform_to_ras(self):
        import SimpleITK as sitk

        tx = sitk.Euler2DTransform()
        tx.SetCenter((1.0, 2.0))
        tx.SetAngle(0.3)
        tx.SetTranslation((4.0, -1.0))
        matrix = sitk_linear_to_ras(tx, 2)
        x_ras = np.array([3.0, -7.0])
        flip = ras_to_lps(2)
        expected = flip @ np.asarray(tx.TransformPoint(tuple(flip @ x_ras)))
        np.testing.assert_allclose(matrix[:2, :2] @ x_ras + matrix[:2, 2], expected, atol=1e-9)

    def test_field_components_flip(self):
        import SimpleITK as sitk

        field = np.zeros((5, 6, 2))  # sitk order (j, i, vector)
        field[..., 0] = 1.5
        field[..., 1] = -0.5
        image = sitk.GetImageFromArray(field, isVector=True)
        ras = sitk_field_to_ras(image)
        self.assertEqual(ras.shape, (2, 6, 5))
        np.testing.assert_allclose(ras[0], -1.5)
        np.testing.assert_allclose(ras[1], 0.5)

    def test_shear_is_rejected(self):
        affine = np.eye(3)
        affine[0, 1] = 0.5
        with self.assertRaisesRegex(ValueError, "shear"):
            array_to_sitk(np.zeros((4, 4)), affine)

    def test_thread_cap_restores_default(self):
        import SimpleITK as sitk

        before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        with sitk_thread_cap(1) as n:
            self.assertEqual(n, 1)
            self.assertEqual(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), 1)
        self.assertEqual(sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(), before)
        with self.assertRaises(ValueError):
            with sitk_thread_cap(0):
                pass


if __name__ == "__main__":
    unittest.main()
