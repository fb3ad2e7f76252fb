"""Quality control: metrics before/after, thresholds, calibration and every policy."""

from __future__ import annotations

import unittest
import warnings

import numpy as np
import torch
from monai.data import MetaTensor

from monai_twin.transforms.registration import (
    QualityThresholds,
    Register,
    RegisterSequence,
    RegistrationQuality,
    RegistrationQualityd,
    RegistrationQualityError,
)

from .helpers import centred_affine, linear_map, phantom

AFFINE = centred_affine((48, 48), (1.0, 1.0))


def _shifted(shift, noise=0.0, seed=0):
    t = np.eye(3)
    t[:2, 2] = -np.asarray(shift)
    img = phantom((48, 48), AFFINE, linear_map(t))
    if noise:
        img = img + noise * torch.as_tensor(np.random.default_rng(seed).standard_normal(img.shape), dtype=torch.float32)
    return img


def _unrelated(seed=3):
    from scipy.ndimage import gaussian_filter

    arr = gaussian_filter(np.random.default_rng(seed).random((48, 48)), 1.0).astype(np.float32)
    return MetaTensor(torch.as_tensor(arr[None]), affine=phantom((48, 48), AFFINE).affine)


class TestJointHistogram(unittest.TestCase):
    def test_counts_match_numpy_histogram2d(self):
        from monai_twin.metrics.registration import _joint_histogram

        rng = np.random.default_rng(0)
        for _ in range(40):
            x = rng.random(2000) ** 3 * rng.uniform(0.1, 1e3)
            y = np.round(rng.random(2000) * 7) / 7 - 0.3  # few distinct values, many on bin edges
            x[:50] = np.linspace(x.min(), x.max(), 33)[rng.integers(0, 33, 50)]  # values exactly on edges
            for bins in (7, 32, 200):  # 200: the joint index no longer fits 16 bits
                np.testing.assert_array_equal(_joint_histogram(x, y, bins), np.histogram2d(x, y, bins=bins)[0])


class TestPairQuality(unittest.TestCase):
    def test_gain_and_metrics_of_a_good_registration(self):
        fixed = _shifted((0, 0))
        out = Register(stages="rigid")(_shifted((2.5, -2.0)), fixed)
        qc = RegistrationQuality(QualityThresholds(min_nmi_gain=0.05, min_ssim=0.95), policy="raise")
        checked = qc(out, fixed)
        verdict = checked.meta["registration_quality"]
        self.assertTrue(verdict["passed"], verdict["reasons"])
        self.assertGreater(verdict["nmi_gain"], 0.05)
        self.assertGreater(verdict["correlation_after"], 0.99)
        self.assertGreater(verdict["correlation_after"], verdict["correlation_before"])
        self.assertGreater(verdict["ssim"], 0.95)
        self.assertNotIn("folding", verdict)  # linear result: no Jacobian checks
        self.assertNotIn("registration_quality", out.meta)  # the input is not modified

    def test_deformable_reports_jacobian(self):
        fixed = _shifted((0, 0))
        out = Register(stages=("rigid", "demons"), levels=(2, 1), match_histograms=False)(_shifted((1.0, 0.5)), fixed)
        verdict = RegistrationQuality("generic")(out, fixed).meta["registration_quality"]
        self.assertEqual(verdict["folding"], 0.0)
        self.assertGreaterEqual(verdict["log_jacobian_std"], 0.0)
        self.assertLess(verdict["log_jacobian_std"], 0.2)

    def test_policies_on_an_unregistrable_pair(self):
        fixed = _shifted((0, 0))
        out = Register(stages="rigid")(_unrelated(), fixed)
        thresholds = {"min_correlation": 0.8, "min_ssim": 0.5}
        flagged = RegistrationQuality(thresholds, policy="flag")(out, fixed)
        self.assertFalse(flagged.meta["registration_quality"]["passed"])
        self.assertTrue(any("correlation_after" in r for r in flagged.meta["registration_quality"]["reasons"]))
        with self.assertWarnsRegex(UserWarning, "failed registration quality control"):
            RegistrationQuality(thresholds, policy="warn")(out, fixed)
        with self.assertRaisesRegex(RegistrationQualityError, "correlation_after"):
            RegistrationQuality(thresholds, policy="raise")(out, fixed)
        with self.assertRaisesRegex(RegistrationQualityError, "sequences only"):
            RegistrationQuality(thresholds, policy="drop")(out, fixed)

    def test_engine_failure_always_fails(self):
        fixed = _shifted((0, 0))
        far = MetaTensor(fixed.as_tensor().clone(), affine=torch.eye(4))
        far.affine[:2, 3] = torch.tensor([400.0, 400.0])
        out = Register(stages="rigid", init="none", on_error="identity")(far, fixed)
        verdict = RegistrationQuality(QualityThresholds(max_folding=None), policy="flag")(out, fixed).meta[
            "registration_quality"
        ]
        self.assertFalse(verdict["passed"])
        self.assertIn("the registration engine failed", verdict["reasons"])

    def test_calibrate_on_known_good_pairs(self):
        fixed = _shifted((0, 0))
        reg = Register(stages="rigid")
        good = [(reg(_shifted(s, noise=0.02, seed=i), fixed), fixed) for i, s in enumerate([(1, 0), (0, 2), (-1.5, 1)])]
        qc = RegistrationQuality(QualityThresholds(min_ssim=0.0, min_correlation=0.0, max_folding=None))
        thresholds = qc.calibrate(good, quantile=0.0, slack=0.5)
        ssims = [qc.measure(r, f)["ssim"] for r, f in good]
        self.assertLessEqual(thresholds.min_ssim, min(ssims))
        self.assertGreater(thresholds.min_ssim, 0.5)  # calibrated on good pairs it is no longer 0
        self.assertIsNone(thresholds.max_folding)  # disabled checks stay disabled
        # every known-good pair passes its own calibration; the unrelated image does not
        for r, f in good:
            self.assertTrue(qc(r, f).meta["registration_quality"]["passed"])
        bad = reg(_unrelated(), fixed)
        self.assertFalse(qc(bad, fixed).meta["registration_quality"]["passed"])
        with self.assertRaisesRegex(ValueError, "at least 2"):
            qc.calibrate(good[:1])


class TestSequenceQuality(unittest.TestCase):
    def _sequence(self):
        visits = [_shifted((0, 0)), _shifted((1.5, -1.0)), _unrelated(), _shifted((-1.0, 2.0))]
        return RegisterSequence(reference="first", stages="rigid")(visits)

    def test_drop_removes_failing_visits_everywhere(self):
        out = self._sequence()
        data = {
            "history": out,
            "history_labels": (out > 0.5).to(torch.uint8),
            "history_times": torch.tensor([-300.0, -200.0, -100.0, -30.0]),
            "history_paths": ["a", "b", "c", "d"],
        }
        qc = RegistrationQualityd(
            keys=("history", "history_labels"),
            thresholds={"min_correlation": 0.8},
            policy="drop",
            drop_keys=("history_times", "history_paths"),
            quality_key="history_quality",
        )
        result = qc(data)
        self.assertEqual(result["history"].meta["kept_visits"], [0, 1, 3])
        self.assertEqual(tuple(result["history"].shape), (3, 1, 48, 48))
        self.assertEqual(tuple(result["history_labels"].shape), (3, 1, 48, 48))
        self.assertEqual(result["history_times"].tolist(), [-300.0, -200.0, -30.0])
        self.assertEqual(result["history_paths"], ["a", "b", "d"])
        self.assertEqual(len(result["history_quality"]), 3)  # one verdict per kept visit
        self.assertTrue(all(v["passed"] for v in result["history_quality"]))
        self.assertEqual(list(result["history"].meta["dropped_visits"]), [2])
        self.assertTrue(any("correlation_after" in r for r in result["history"].meta["dropped_visits"][2]))
        self.assertEqual(tuple(data["history"].shape), (4, 1, 48, 48))  # input untouched
        # the kept visits still invert: the record was trimmed with them
        from monai_twin.transforms.registration import registration_displacement

        self.assertEqual(tuple(registration_displacement(result["history"]).shape), (3, 2, 48, 48))

    def test_flag_keeps_every_visit(self):
        out = self._sequence()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            checked = RegistrationQuality({"min_correlation": 0.8}, policy="flag")(out)
        passed = [v["passed"] for v in checked.meta["registration_quality"]]
        self.assertEqual(passed, [True, True, False, True])
        self.assertEqual(tuple(checked.shape), (4, 1, 48, 48))

    def test_bad_configuration(self):
        with self.assertRaisesRegex(ValueError, "policy"):
            RegistrationQuality(policy="ignore")
        with self.assertRaisesRegex(ValueError, "unknown threshold"):
            RegistrationQuality({"min_dice": 0.5})
        with self.assertRaisesRegex(ValueError, "unknown modality"):
            RegistrationQuality("ultrasound")
        with self.assertRaisesRegex(ValueError, "fixed is required"):
            RegistrationQuality()(Register()(_shifted((1, 0)), _shifted((0, 0))))


if __name__ == "__main__":
    unittest.main()
