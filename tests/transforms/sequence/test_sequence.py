from __future__ import annotations

import numpy as np
import pytest
import torch
from parameterized import parameterized

from monai_twin.data import build_longitudinal_items, load_manifest
from monai_twin.transforms.ehr import EHRToIntervalFeaturesd, EHRVocabulary
from monai_twin.transforms.sequence import (
    LoadSequence,
    LoadSequenced,
    PadSequence,
    PadSequenced,
    RandFlipSequenced,
    RandHistoryTruncated,
)
from tests.conftest import write_nifti


@pytest.fixture
def three_visits(tmp_path):
    paths = []
    for k in range(3):
        affine_scale = 1.0 + 0.5 * k
        import nibabel as nib

        p = tmp_path / f"v{k}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((6, 5, 4), float(k), np.float32), np.diag([affine_scale, 1, 1, 1])), str(p))
        paths.append(str(p))
    return paths


class TestLoadSequence:
    def test_stack_and_meta(self, three_visits):
        seq = LoadSequence()(three_visits)
        assert tuple(seq.shape) == (3, 1, 6, 5, 4)
        np.testing.assert_array_equal(seq[:, 0, 0, 0, 0].numpy(), [0.0, 1.0, 2.0])
        assert seq.meta["sequence_filenames"] == three_visits
        assert seq.meta["sequence_affines"].shape == (3, 4, 4)
        assert float(seq.affine[0, 0]) == 2.0  # the last visit's frame
        assert float(seq.meta["sequence_affines"][0, 0, 0]) == 1.0

    def test_shape_mismatch_names_files(self, three_visits, tmp_path):
        other = write_nifti(tmp_path / "odd.nii.gz", np.zeros((7, 5, 4)))
        with pytest.raises(ValueError, match="odd.nii.gz: \\(1, 7, 5, 4\\)"):
            LoadSequence()([*three_visits, str(other)])

    @parameterized.expand([("a.nii",), ([],)])
    def test_bad_input(self, value):
        with pytest.raises((TypeError, ValueError)):
            LoadSequence()(value)


class TestPadSequence:
    @parameterized.expand(
        [
            ("right", [300.0, 120.0], [300.0, 120.0, 0.0, 0.0]),
            ("left", [300.0, 120.0], [0.0, 0.0, 300.0, 120.0]),
            ("right", [5.0, 4, 3, 2, 1, 0.5], [3.0, 2.0, 1.0, 0.5]),  # keeps the most recent visits
        ]
    )
    def test_pad_and_trim(self, side, values, expected):
        for data in (np.array(values), torch.tensor(values)):
            np.testing.assert_allclose(PadSequence(4, side=side)(data).numpy(), expected)

    def test_meta_follows_slots(self, three_visits):
        seq = PadSequence(5)(LoadSequence()(three_visits))
        assert seq.shape[0] == 5 and seq.meta["sequence_filenames"][3:] == ["", ""]
        assert seq.meta["sequence_affines"].shape == (5, 4, 4)
        trimmed = PadSequence(2)(LoadSequence()(three_visits))
        assert trimmed.meta["sequence_filenames"] == three_visits[1:]
        np.testing.assert_array_equal(trimmed[:, 0, 0, 0, 0].numpy(), [1.0, 2.0])

    def test_bad_arguments(self):
        with pytest.raises(ValueError, match="length"):
            PadSequence(0)
        with pytest.raises(ValueError, match="side"):
            PadSequence(2, side="middle")


class TestPadSequenced:
    def test_sample_from_dataset(self, nifti_cohort):
        m = load_manifest(nifti_cohort)
        item = build_longitudinal_items(m, max_history=3)[1]  # two prior visits
        out = PadSequenced(4)(LoadSequenced()(item))
        assert tuple(out["history"].shape[:2]) == (4, 1)
        np.testing.assert_array_equal(out["history_mask"].numpy(), [1, 1, 0, 0])
        np.testing.assert_allclose(out["times"].numpy()[:2], item["times"])
        assert out["times"].shape == (4,) and out["history_times"].shape == (4,)
        assert item["history_mask"].shape == (2,)  # the input sample is not modified

    def test_mismatched_t(self):
        with pytest.raises(ValueError, match="key 'ehr_intervals' has 3 visits but 'times' has 2"):
            PadSequenced(4)({"times": np.zeros(2), "ehr_intervals": np.zeros((3, 5))})
        with pytest.raises(KeyError, match="none of the keys"):
            PadSequenced(4)({"other": 1})


class TestRandFlipSequenced:
    def test_history_and_target_flip_together(self, three_visits):
        """A loaded history (MetaTensor) and a plain target flip along the same axis in the same draw; the
        history's affine is updated as MONAI's Flip does and the plain target stays a plain tensor."""
        torch.manual_seed(0)
        history = LoadSequence()(three_visits) + torch.rand(3, 1, 6, 5, 4)  # keeps the loaded meta
        target = torch.rand(1, 6, 5, 4)
        flip = RandFlipSequenced(("history", "target"), spatial_dims=3, spatial_axis=1, prob=0.5)
        flip.set_random_state(0)
        outcomes = set()
        for _ in range(8):
            out = flip({"history": history, "target": target, "times": torch.ones(3)})
            flipped = not torch.equal(torch.as_tensor(out["target"]), target)
            outcomes.add(flipped)
            expected_target = torch.flip(target, dims=(2,)) if flipped else target
            torch.testing.assert_close(out["target"], expected_target)
            torch.testing.assert_close(
                out["history"].as_tensor(),
                torch.flip(history.as_tensor(), dims=(3,)) if flipped else history.as_tensor(),
            )
            assert type(out["target"]) is torch.Tensor
            assert torch.equal(out["times"], torch.ones(3))
            if flipped:
                assert not torch.allclose(out["history"].affine, history.affine)
        assert outcomes == {True, False}

    def test_bad_input(self):
        with pytest.raises(ValueError, match="spatial_axis must be in"):
            RandFlipSequenced(spatial_dims=2, spatial_axis=2)
        flip = RandFlipSequenced(("target",), spatial_dims=3, prob=1.0)
        with pytest.raises(ValueError, match="key 'target' has shape"):
            flip({"target": torch.zeros(4, 4)})


VISIT_KEYS = ("history", "history_label", "times", "history_times", "ehr_intervals", "ehr_intervals_mask")


class TestRandHistoryTruncated:
    @staticmethod
    def _encoded(manifest, vocabulary, subject, target_index, max_history, side="right"):
        item = next(
            i
            for i in build_longitudinal_items(manifest, max_history=max_history, subjects=[subject])
            if i["target_index"] == target_index
        )
        sample = LoadSequenced(("history", "history_label"))(item)
        sample = EHRToIntervalFeaturesd(vocabulary, carry_forward=True, cumulative_exposure=True)(sample)
        return item, PadSequenced(5, keys=VISIT_KEYS, side=side)(sample)

    def test_padded_sample_matches_the_dataset_built_with_fewer_visits(self, nifti_cohort):
        """On an encoded, padded sample (scans, masks, interval features), keeping the last m visits gives
        exactly what the dataset yields when built with ``max_history=m``: the kept visits' EHR features do
        not depend on the dropped scans, and the record before the target stays whole."""
        manifest = load_manifest(nifti_cohort)
        vocabulary = EHRVocabulary.fit(manifest.events, manifest.static)
        lengths = manifest.visits.groupby("subject_id").size()
        subject = str(lengths.idxmax())
        target = int(lengths.max()) - 1  # the last visit: every earlier one is history
        assert target >= 3
        for side in ("right", "left"):
            item, full = self._encoded(manifest, vocabulary, subject, target, None, side)
            truncate = RandHistoryTruncated(keys=VISIT_KEYS, prob=1.0)
            truncate.set_random_state(0)
            seen = set()
            for _ in range(30):
                out = truncate(full)
                m = int(out["history_mask"].sum())
                seen.add(m)
                _, expected = self._encoded(manifest, vocabulary, subject, target, m, side)
                for key in (*VISIT_KEYS, "history_mask"):
                    assert out[key].shape == full[key].shape, key
                    np.testing.assert_allclose(np.asarray(out[key]), np.asarray(expected[key]), atol=1e-6, err_msg=key)
                assert out["history"].meta["sequence_filenames"] == expected["history"].meta["sequence_filenames"]
                assert out["events"] is full["events"]  # the record is not touched
            assert seen == set(range(1, target))  # every shorter history, never the full one
            np.testing.assert_array_equal(np.asarray(full["history_mask"]).sum(), target)  # input unchanged
            assert len(item["history"]) == target

    def test_full_slots_keep_their_shape(self):
        """A padded sample whose every slot is real still comes back with the same number of slots."""
        sample = {"times": torch.tensor([400.0, 300.0, 200.0]), "history_mask": torch.ones(3)}
        truncate = RandHistoryTruncated(prob=1.0, min_length=2)
        out = truncate(sample)
        np.testing.assert_array_equal(out["times"].numpy(), [300.0, 200.0, 0.0])
        np.testing.assert_array_equal(out["history_mask"].numpy(), [1.0, 1.0, 0.0])

    def test_unpadded_item_and_probability(self, nifti_cohort):
        manifest = load_manifest(nifti_cohort)
        item = max(build_longitudinal_items(manifest), key=lambda i: len(i["history"]))
        n = len(item["history"])
        truncate = RandHistoryTruncated(keys=("history", "times", "history_times"), prob=1.0, min_length=2)
        truncate.set_random_state(1)
        out = truncate(item)
        m = len(out["history"])
        assert 2 <= m < n and isinstance(out["history"], list)
        assert out["history"] == item["history"][n - m :]
        np.testing.assert_array_equal(out["times"], item["times"][n - m :])
        np.testing.assert_array_equal(out["history_mask"], np.ones(m, np.float32))
        assert len(item["history"]) == n  # the input item is not modified
        never = RandHistoryTruncated(keys=("history", "times"), prob=0.0)
        assert never(item)["history"] == item["history"]
        short = {"history": item["history"][:2], "times": item["times"][:2]}
        assert (
            RandHistoryTruncated(keys=("history", "times"), prob=1.0, min_length=2)(short)["history"]
            == short["history"]
        )

    def test_bad_input(self):
        with pytest.raises(ValueError, match="min_length must be >= 1"):
            RandHistoryTruncated(min_length=0)
        truncate = RandHistoryTruncated(prob=1.0)
        with pytest.raises(ValueError, match="key 'ehr_intervals' has 3 visits but 'times' has 4"):
            truncate({"times": torch.zeros(4), "ehr_intervals": torch.zeros(3, 2)})
        with pytest.raises(ValueError, match="must be contiguous"):
            truncate({"times": torch.zeros(4), "history_mask": torch.tensor([1.0, 0.0, 1.0, 0.0])})
        with pytest.raises(ValueError, match="'history_mask' has shape"):
            truncate({"times": torch.zeros(4), "history_mask": torch.ones(3)})
        with pytest.raises(KeyError, match="none of the keys"):
            truncate({"other": 1})
