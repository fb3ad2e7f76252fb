"""Bad input from the issue: mismatched grids resample, blank or NaN images and 2D/3D mixes fail
clearly, bad arguments name what was expected."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from monai_twin.transforms.registration import Register, Registerd, RegisterSequence, registration_record

from .helpers import centred_affine, linear_map, phantom


def _pair():
    affine = centred_affine((40, 40), (1.0, 1.0))
    t = np.eye(3)
    t[:2, 2] = [-1.0, 1.5]
    return phantom((40, 40), affine, linear_map(t)), phantom((40, 40), affine)


class TestBadInput(unittest.TestCase):
    def test_different_shapes_and_spacings_are_resampled(self):
        fixed = phantom((40, 40), centred_affine((40, 40), (1.0, 1.0)))
        t = np.eye(3)
        t[:2, 2] = [-1.0, 1.5]
        moving = phantom((30, 52), centred_affine((30, 52), (1.4, 0.8)), linear_map(t))
        out = Register(stages="rigid")(moving, fixed)
        self.assertEqual(tuple(out.shape), (1, 40, 40))
        np.testing.assert_allclose(registration_record(out)["matrix"][:2, 2].numpy(), [1.0, -1.5], atol=0.3)

    @parameterized.expand([("zeros", 0.0), ("constant", 3.5)])
    def test_constant_image_is_a_clear_error(self, _, value):
        moving, fixed = _pair()
        blank = MetaTensor(torch.full_like(moving.as_tensor(), value), affine=moving.affine)
        with self.assertRaisesRegex(ValueError, "moving image is constant"):
            Register()(blank, fixed)
        with self.assertRaisesRegex(ValueError, "fixed image is constant"):
            Register()(moving, blank)

    def test_nan_pixels(self):
        moving, fixed = _pair()
        holed = moving.clone()
        holed[0, 5:8, 5:8] = float("nan")
        with self.assertRaisesRegex(ValueError, "9 NaN/infinite voxels"):
            Register()(holed, fixed)
        out = Register(nan_fill=0.0)(holed, fixed)
        self.assertTrue(torch.isfinite(out).all())  # filled before registering and resampling
        record = registration_record(out)
        self.assertTrue(torch.isfinite(record["matrix"]).all())
        np.testing.assert_allclose(record["matrix"][:2, 2].numpy(), [1.0, -1.5], atol=0.3)
        self.assertTrue(torch.isnan(holed).any())  # input not modified

    def test_2d_3d_mismatch(self):
        moving, _ = _pair()
        vol = MetaTensor(torch.rand(1, 16, 16, 16))
        with self.assertRaisesRegex(ValueError, "moving image is 2D .* fixed image is 3D"):
            Register()(moving, vol)
        with self.assertRaisesRegex(ValueError, "channel-first"):
            Register()(torch.rand(16, 16), vol)

    def test_bad_arguments_name_themselves(self):
        with self.assertRaisesRegex(ValueError, "unknown registration stage"):
            Register(stages="elastic")
        with self.assertRaisesRegex(ValueError, "must come last"):
            Register(stages=("demons", "affine"))
        with self.assertRaisesRegex(ValueError, "metric"):
            Register(metric="dice")
        with self.assertRaisesRegex(ValueError, "demons_iterations"):
            Register(levels=(2, 1), demons_iterations=(5, 5, 5))
        with self.assertRaisesRegex(ValueError, "reference"):
            RegisterSequence(reference="middle")
        with self.assertRaisesRegex(ValueError, "out of range"):
            RegisterSequence(reference=5)([_pair()[0], _pair()[1]])
        with self.assertRaisesRegex(TypeError, "MetaTensor, torch.Tensor or numpy array"):
            Register()([1, 2, 3], _pair()[1])

    def test_mask_problems(self):
        moving, fixed = _pair()
        with self.assertRaisesRegex(ValueError, "fixed_mask must have the spatial shape"):
            Register()(moving, fixed, fixed_mask=torch.ones(10, 10))
        with self.assertRaisesRegex(ValueError, "moving_mask is empty"):
            Register()(moving, fixed, moving_mask=torch.zeros(40, 40))

    def test_dictionary_names_the_key(self):
        moving, fixed = _pair()
        with self.assertRaisesRegex(KeyError, "fixed image key 'reference'"):
            Registerd(keys="image", fixed_key="reference")({"image": moving})
        blank = MetaTensor(torch.zeros_like(moving.as_tensor()))
        with self.assertRaisesRegex(ValueError, "key 'image'.*constant"):
            Registerd(keys="image", fixed_key="reference")({"image": blank, "reference": fixed})

    def test_sequence_names_the_visit(self):
        moving, fixed = _pair()
        blank = MetaTensor(torch.zeros_like(moving.as_tensor()))
        with self.assertRaisesRegex(ValueError, "visit 2 .*constant"):
            RegisterSequence()([fixed, moving, blank])


if __name__ == "__main__":
    unittest.main()
