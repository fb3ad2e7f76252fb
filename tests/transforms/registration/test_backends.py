"""Optional engines behind Register: ANTsPy (SyN) and itk-elastix (B-spline).

The engines are extras; their tests skip cleanly when the package is absent (the argument checks
and the stage mapping run everywhere).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import unittest

import numpy as np
import pytest
import torch
from parameterized import parameterized

from monai_twin.transforms.registration import Register, registration_displacement, registration_record
from monai_twin.transforms.registration.ants_backend import ants_transform_type

from .helpers import centred_affine, linear_map, phantom

HAS_ANTS = importlib.util.find_spec("ants") is not None


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


# elastix lives inside the itk namespace: the distribution says whether it is there
HAS_ELASTIX = _has_distribution("itk-elastix")


def _shifted_pair(shift):
    """Fixed and moving on different rotated/flipped grids; the moving anatomy is shifted by ``shift`` mm,
    so the true pull-back is ``+shift`` mm everywhere (a sign or RAS/LPS slip shows at once)."""
    fixed = phantom((48, 48), centred_affine((48, 48), (1.0, 1.0), rotation=0.3, flip=(0,)))
    t = np.eye(3)
    t[:2, 2] = -np.asarray(shift)
    moving = phantom((44, 52), centred_affine((44, 52), (1.1, 0.9), rotation=-0.2), linear_map(t))
    return moving, fixed


class TestBackendArguments(unittest.TestCase):
    def test_stage_mapping(self):
        self.assertEqual(ants_transform_type(("rigid", "affine", "syn")), "SyN")
        self.assertEqual(ants_transform_type(("syn",)), "SyNOnly")
        self.assertEqual(ants_transform_type(("rigid",)), "Rigid")
        with self.assertRaisesRegex(ValueError, "starts from an affine"):
            ants_transform_type(("rigid", "syn"))

    def test_bad_backend_and_stages(self):
        with self.assertRaisesRegex(ValueError, "backend must be one of"):
            Register(backend="flirt")
        with self.assertRaisesRegex(ValueError, "for backend 'ants'"):
            Register(stages=("rigid", "demons"), backend="ants")
        with self.assertRaisesRegex(ValueError, "for backend 'elastix'"):
            Register(stages=("rigid", "syn"), backend="elastix")

    @parameterized.expand([("ants", HAS_ANTS, "monai_twin\\[ants\\]"), ("elastix", HAS_ELASTIX, "elastix")])
    def test_missing_engine_names_the_extra(self, backend, installed, extra):
        if installed:
            self.skipTest(f"{backend} is installed")
        moving, fixed = _shifted_pair([1.0, 0.0])
        with self.assertRaisesRegex(ImportError, extra):
            Register(stages="rigid", backend=backend)(moving, fixed)


class TestAnts(unittest.TestCase):
    def setUp(self):
        self.ants = pytest.importorskip("ants")

    def test_rigid_shift_on_rotated_grids(self):
        moving, fixed = _shifted_pair([2.0, -1.5])
        out = Register(stages="rigid", backend="ants", num_threads=1)(moving, fixed)
        np.testing.assert_allclose(registration_record(out)["matrix"][:2, 2].numpy(), [2.0, -1.5], atol=0.3)

    def test_syn_recovers_the_shift_and_inverts(self):
        # the record is ANTs' affine applied after its SyN field: read back, it must give the true shift
        moving, fixed = _shifted_pair([1.0, 0.5])
        reg = Register(stages=("rigid", "affine", "syn"), backend="ants", num_threads=1)
        out = reg(moving, fixed)
        field = registration_displacement(out, space="world")
        self.assertEqual(tuple(field.shape), (2, 48, 48))
        centre = field[:, 12:-12, 12:-12].mean((1, 2)).numpy()
        np.testing.assert_allclose(centre, [1.0, 0.5], atol=0.35)
        back = reg.inverse(out)
        self.assertEqual(back.shape, moving.shape)


class TestElastix(unittest.TestCase):
    def setUp(self):
        if not HAS_ELASTIX:
            self.skipTest("itk-elastix is not installed")
        pytest.importorskip("itk")

    def test_rigid_then_bspline(self):
        moving, fixed = _shifted_pair([2.0, -1.5])
        out = Register(stages=("rigid", "bspline"), backend="elastix", num_threads=1)(moving, fixed)
        field = registration_displacement(out, space="world")[:, 12:-12, 12:-12].mean((1, 2)).numpy()
        np.testing.assert_allclose(field, [2.0, -1.5], atol=0.35)
        self.assertTrue(torch.isfinite(out).all())


if __name__ == "__main__":
    unittest.main()
