"""Sequence registration: every visit to one reference, different grids, labels, inverse."""

from __future__ import annotations

import unittest

import numpy as np
import torch
from monai.data import MetaTensor
from parameterized import parameterized

from monai_twin.transforms.registration import (
    RegisterSequence,
    RegisterSequenced,
    registration_displacement,
    registration_record,
)

from .helpers import centred_affine, linear_map, phantom

SHIFTS = [np.array([0.0, 0.0]), np.array([1.8, -1.2]), np.array([-1.5, 2.2])]


def _visits(shapes=((64, 64), (56, 72), (64, 60)), spacings=((1.0, 1.0), (1.1, 0.9), (0.95, 1.05))):
    """Three visits of one anatomy: visit t shows it shifted by SHIFTS[t] (mm), each on its own grid."""
    out = []
    for shape, spacing, shift in zip(shapes, spacings, SHIFTS):
        t = np.eye(3)
        t[:2, 2] = -shift
        out.append(phantom(shape, centred_affine(shape, spacing), linear_map(t)))
    return out


class TestRegisterSequence(unittest.TestCase):
    @parameterized.expand([("first", 0), ("last", 2), (1, 1), (-2, 1)])
    def test_reference_choice_and_recovered_shifts(self, reference, ref_index):
        visits = _visits()
        out = RegisterSequence(reference=reference, stages=("rigid", "affine"))(visits)
        ref_shape = tuple(visits[ref_index].shape[1:])
        self.assertEqual(tuple(out.shape), (3, 1, *ref_shape))
        np.testing.assert_allclose(out.affine.numpy(), visits[ref_index].affine.numpy())
        record = registration_record(out)
        self.assertEqual(record["reference"], ref_index)
        for t, rec in enumerate(record["visits"]):
            # fixed-world point x of the reference is found at x + (shift_t - shift_ref) in visit t
            np.testing.assert_allclose(rec["matrix"][:2, 2].numpy(), SHIFTS[t] - SHIFTS[ref_index], atol=0.3)
        fields = registration_displacement(out, space="world")
        self.assertEqual(tuple(fields.shape), (3, 2, *ref_shape))
        self.assertEqual(float(fields[ref_index].abs().max()), 0.0)
        ref = out[ref_index, 0].numpy()
        for t in range(3):
            self.assertLess(np.abs(out[t, 0].numpy() - ref)[10:-10, 10:-10].max(), 0.05)

    def test_stacked_history_and_inverse(self):
        affine = centred_affine((48, 48), (1.0, 1.0))
        stack = []
        for shift in SHIFTS:
            t = np.eye(3)
            t[:2, 2] = -shift
            stack.append(phantom((48, 48), affine, linear_map(t)).as_tensor())
        history = MetaTensor(torch.stack(stack), affine=phantom((48, 48), affine).affine)
        seq = RegisterSequence(reference="first", stages="rigid")
        out = seq(history)
        self.assertEqual(tuple(out.shape), (3, 1, 48, 48))
        back = seq.inverse(out)
        self.assertIsInstance(back, MetaTensor)
        self.assertEqual(tuple(back.shape), (3, 1, 48, 48))
        err = (back - history).abs()[:, 0, 10:-10, 10:-10]
        self.assertLess(float(err.max()), 0.05)  # two linear interpolations on a 48^2 phantom

    def test_list_inverse_returns_original_grids(self):
        visits = _visits()
        seq = RegisterSequence(reference="first", stages="rigid")
        back = seq.inverse(seq(visits))
        self.assertIsInstance(back, list)
        for original, restored in zip(visits, back):
            self.assertEqual(restored.shape, original.shape)
            np.testing.assert_allclose(restored.affine.numpy(), original.affine.numpy(), atol=1e-9)
            self.assertLess(float((restored - original).abs()[0, 12:-12, 12:-12].max()), 0.05)

    def test_dictionary_labels_follow(self):
        visits = _visits()
        labels = []
        for v in visits:
            lab = MetaTensor(torch.zeros(v.shape, dtype=torch.uint8), affine=v.affine)
            lab[0] = (v[0] > 0.5).to(torch.uint8) * 2
            labels.append(lab)
        seq = RegisterSequenced(
            keys=("history", "history_labels"), reference="last", stages="rigid", mode=("bilinear", "nearest")
        )
        out = seq({"history": visits, "history_labels": labels})
        self.assertEqual(out["history_labels"].dtype, torch.uint8)
        self.assertEqual(set(torch.unique(out["history_labels"]).tolist()), {0, 2})
        ref_lab = out["history_labels"][2, 0].float()
        for t in range(2):
            dice = (
                2
                * (out["history_labels"][t, 0].float() * ref_lab).sum()
                / (out["history_labels"][t, 0].float().sum() + ref_lab.sum())
            )
            self.assertGreater(float(dice) / 2, 0.95)  # labels are 2 and 0: the product carries a factor 2
        inv = seq.inverse(out)
        self.assertEqual(tuple(inv["history_labels"][1].shape), tuple(labels[1].shape))

    def test_missing_key_and_mixed_dims(self):
        visits = _visits()
        with self.assertRaisesRegex(KeyError, "history"):
            RegisterSequenced(keys="history")({"image": visits})
        vol = MetaTensor(torch.rand(1, 16, 16, 16))
        with self.assertRaisesRegex(ValueError, "mixes 2D and 3D"):
            RegisterSequence()([visits[0], vol])


if __name__ == "__main__":
    unittest.main()
