from __future__ import annotations

import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import LoadImage
from parameterized import parameterized
from scipy.ndimage import map_coordinates

from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
from monai_twin.transforms.registration import RegisterSequenced
from monai_twin.transforms.sequence import (
    ConformScan,
    ConformScansd,
    LoadSequence,
    LoadSequenced,
    SelectVisit,
    SelectVisitd,
)
from tests.conftest import write_nifti

SIZE = 32
SPACING = 160.0 / SIZE  # Mammo2DConfig(size=32): fov_mm / size = 5 mm


def _load(path) -> MetaTensor:
    return LoadImage(image_only=True, ensure_channel_first=True)(str(path))


def _pattern(n: int, spacing: float) -> np.ndarray:
    """A smooth image in [0.1, 0.9] sampled at ``spacing`` mm on ``n x n`` pixels (origin at 0 mm)."""
    mm = np.arange(n) * spacing
    return 0.5 + 0.4 * np.outer(np.sin(2 * np.pi * mm / 160.0), np.cos(2 * np.pi * mm / 200.0))


def _resave(image: np.ndarray, spacing: float, path) -> str:
    """``image`` (5 mm pixels) re-sampled at ``spacing`` mm over the same field of view and saved."""
    n = int(round(image.shape[0] * SPACING / spacing))
    idx = np.arange(n) * spacing / SPACING
    grid = np.meshgrid(idx, idx, indexing="ij")
    write_nifti(path, map_coordinates(image, grid, order=1, mode="nearest"), spacing=(spacing, spacing))
    return str(path)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    folder = write_cohort(
        "mammo2d", tmp_path_factory.mktemp("cohort") / "c", n_subjects=2, seed=0, config=Mammo2DConfig(size=SIZE)
    )
    visits = pd.read_parquet(folder / "visits.parquet")
    first = visits[visits["subject_id"] == "P0000"]
    return [str(folder / rel) for rel in first["image"]]


def _conform(**kwargs) -> ConformScansd:
    options = {"spatial_dims": 2, "spacing": SPACING, "spatial_size": SIZE, "orientation": "RA"}
    options.update(kwargs)
    return ConformScansd(**options)


class TestConformScan:
    def test_conforming_scan_unchanged(self, cohort):
        scan = _load(cohort[0])
        assert tuple(scan.shape) == (1, SIZE, SIZE)
        n_ops = len(scan.applied_operations)
        out = _conform(keys="target")({"subject_id": "P0000", "target": scan})["target"]
        torch.testing.assert_close(out.as_tensor(), scan.as_tensor(), rtol=0, atol=0)
        torch.testing.assert_close(out.affine, scan.affine)
        assert out.meta["filename_or_obj"] == cohort[0]
        assert out.applied_operations[-1]["class"] == "ConformScan"
        assert out.applied_operations[-1]["extra_info"]["steps"] == []
        assert len(scan.applied_operations) == n_ops  # the input's history is not touched

    def test_half_spacing_resampled_and_inverted(self, tmp_path):
        path = write_nifti(tmp_path / "half.nii.gz", _pattern(2 * SIZE, SPACING / 2), spacing=(SPACING / 2,) * 2)
        scan = _load(path)
        conform = ConformScan(spatial_dims=2, spacing=SPACING, spatial_size=SIZE)
        out = conform(scan)
        assert tuple(out.shape) == (1, SIZE, SIZE)
        np.testing.assert_allclose(affine_to_spacing(out.affine, r=2).numpy(), [SPACING, SPACING])
        np.testing.assert_allclose(out[0].numpy(), _pattern(SIZE, SPACING), atol=1e-4)
        assert out.applied_operations[-1]["extra_info"]["steps"] == ["spacing"]
        back = conform.inverse(out)  # e.g. a forecast put back on the user's grid
        assert tuple(back.shape) == (1, 2 * SIZE, 2 * SIZE)
        torch.testing.assert_close(back.affine, scan.affine)
        np.testing.assert_allclose(back[0, :-2, :-2].numpy(), _pattern(2 * SIZE, SPACING / 2)[:-2, :-2], atol=0.01)

    def test_half_spacing_rejected_on_raise(self, tmp_path):
        path = write_nifti(tmp_path / "half.nii.gz", _pattern(2 * SIZE, SPACING / 2), spacing=(SPACING / 2,) * 2)
        conform = _conform(keys="target", on_mismatch="raise")
        with pytest.raises(
            ValueError, match=r"subject 'P0001', key 'target': file '.*half\.nii\.gz'.*\(2\.5, 2\.5\) mm.*\(5, 5\) mm"
        ):
            conform({"subject_id": "P0001", "target": _load(path)})

    def test_spacing_within_tolerance_kept(self, tmp_path):
        spacing = SPACING * 1.005
        path = write_nifti(tmp_path / "near.nii.gz", _pattern(SIZE, spacing), spacing=(spacing, spacing))
        scan = _load(path)
        out = ConformScan(spacing=SPACING, spacing_tolerance=0.01, on_mismatch="raise")(scan)
        torch.testing.assert_close(out.as_tensor(), scan.as_tensor())

    def test_flipped_orientation(self, tmp_path):
        image = _pattern(SIZE, SPACING)
        path = tmp_path / "flipped.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([-SPACING, SPACING, 1.0, 1.0])), str(path))
        scan = _load(path)
        with pytest.raises(ValueError, match=r"flipped\.nii\.gz.*orientation LA.*orientation RA"):
            ConformScan(orientation="RA", on_mismatch="raise")(scan)
        out = ConformScan(orientation="RA")(scan)
        np.testing.assert_array_equal(out[0].numpy(), image[::-1].astype(np.float32))
        assert float(out.affine[0, 0]) == SPACING

    @parameterized.expand([("3d_volume_to_2d_model", (16, 16, 8), 2, 3), ("2d_scan_to_3d_model", (16, 16), 3, 2)])
    def test_spatial_rank_rejected(self, _, shape, spatial_dims, found):
        with tempfile.TemporaryDirectory() as folder:
            path = write_nifti(Path(folder) / "other.nii.gz", np.full(shape, 0.5))
            scan = _load(path)
        conform = ConformScansd(keys="target", spatial_dims=spatial_dims, on_mismatch="resample")
        with pytest.raises(
            ValueError, match=rf"other\.nii\.gz.*has {found} spatial dims, the model expects {spatial_dims}"
        ):
            conform({"subject_id": "P0000", "target": scan})

    @parameterized.expand([("numpy", np.full), ("torch", lambda shape, v: torch.full(shape, v))])
    def test_channels_rejected(self, _, full):
        with pytest.raises(ValueError, match=r"2 channels .*the model expects 1"):
            ConformScan(channels=1)(full((2, SIZE, SIZE), 0.5))

    @parameterized.expand([("numpy", np.asarray), ("torch", torch.as_tensor)])
    def test_plain_arrays_checked_without_geometry(self, _, as_array):
        image = as_array(_pattern(20, SPACING)[None].astype(np.float32))
        out = ConformScan(spatial_size=SIZE)(image)
        assert tuple(out.shape) == (1, SIZE, SIZE)
        np.testing.assert_allclose(np.asarray(out[0, 6:26, 6:26]), _pattern(20, SPACING), atol=1e-6)
        with pytest.raises(ValueError, match="no affine"):
            ConformScan(spacing=SPACING)(image)

    @parameterized.expand(
        [
            ("hounsfield_units", -1000.0, 3000.0, r"\[-1000, 3000\]"),
            ("8bit_grey_levels", 0.0, 255.0, r"\[0, 255\]"),
            ("z_scores", -1.5, 4.0, r"\[-1\.5, 4\]"),
        ]
    )
    def test_other_intensities_rejected(self, _, low, high, found):
        image = np.linspace(low, high, SIZE * SIZE).reshape(SIZE, SIZE)
        with tempfile.TemporaryDirectory() as folder:
            scan = _load(write_nifti(Path(folder) / "other.nii.gz", image, spacing=(SPACING, SPACING)))
        with pytest.raises(ValueError, match=rf"other\.nii\.gz.*intensities in {found}.*expects \[0, 1\].*modality"):
            _conform(keys="target")({"subject_id": "P0000", "target": scan})

    def test_every_cohort_scan_passes_the_defaults(self, cohort):
        # the simulator's acquisition gain (up to 1.15) puts some scans above 1.1
        scans = [_load(p) for p in cohort]
        assert max(float(s.max()) for s in scans) > 1.1
        out = _conform(keys="history", on_mismatch="raise")({"subject_id": "P0000", "history": scans})["history"]
        for scan, conformed in zip(scans, out):
            torch.testing.assert_close(conformed.as_tensor(), scan.as_tensor(), rtol=0, atol=0)

    def test_nan_rejected(self, tmp_path):
        image = _pattern(SIZE, SPACING)
        image[3, 4] = np.nan
        path = write_nifti(tmp_path / "nan.nii.gz", image, spacing=(SPACING, SPACING))
        with pytest.raises(ValueError, match=r"nan\.nii\.gz.*1 of 1024 voxels are NaN"):
            ConformScan()(_load(path))

    def test_value_tolerance(self):
        image = torch.full((1, 8, 8), 0.5)
        image[0, 0, 0] = 1.08  # within 10 % of the range above 1
        ConformScan(value_range=(0.0, 1.0), value_tolerance=0.1)(image)
        with pytest.raises(ValueError, match=r"intensities in \[0\.5, 1\.08\]"):
            ConformScan(value_range=(0.0, 1.0), value_tolerance=0.05)(image)
        ConformScan(value_range=None)(image * 1000)

    @parameterized.expand(
        [
            ({"on_mismatch": "warn"}, "on_mismatch"),
            ({"spacing": (1.0, 1.0, 1.0)}, "spacing needs one value per spatial dim"),
            ({"spatial_size": (32,)}, "spatial_size needs one value per spatial dim"),
            ({"spatial_size": (32, 0)}, "positive"),
            ({"orientation": "RAS"}, "orientation must be 2 axis codes"),
            ({"value_range": (1.0, 0.0)}, "low < high"),
            ({"spatial_dims": 4}, "spatial_dims"),
        ]
    )
    def test_bad_arguments(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            ConformScansd(**{"spatial_dims": 2, **kwargs})

    def test_paths_must_be_loaded_first(self, cohort):
        with pytest.raises(TypeError, match=r"key 'history' holds file paths.*load them first"):
            _conform(keys="history")({"subject_id": "P0000", "history": cohort[:2]})
        with pytest.raises(TypeError, match="load it first"):
            ConformScan()(cohort[0])


class TestConformHistory:
    def test_visits_on_different_grids_conformed_then_registered(self, cohort, tmp_path):
        originals = [_load(p) for p in cohort[:3]]
        paths = [cohort[0], _resave(originals[1][0].numpy(), 2.5, tmp_path / "v1.nii.gz")]
        paths.append(_resave(originals[2][0].numpy(), 4.0, tmp_path / "v2.nii.gz"))
        sample = LoadSequenced("history", stack=False)({"subject_id": "P0000", "history": paths})
        assert [tuple(v.shape) for v in sample["history"]] == [(1, 32, 32), (1, 64, 64), (1, 40, 40)]

        conform = _conform(keys="history")
        out = conform(sample)
        assert isinstance(out["history"], list) and len(out["history"]) == 3
        for visit, original in zip(out["history"], originals):
            assert tuple(visit.shape) == (1, SIZE, SIZE)
            np.testing.assert_allclose(affine_to_spacing(visit.affine, r=2).numpy(), [SPACING, SPACING])
            # each visit is back on the 5 mm grid its acquisition was simulated on
            assert float((visit - original).abs()[0, 2:-2, 2:-2].mean()) < 0.01
        np.testing.assert_array_equal(out["history"][0].numpy(), originals[0].numpy())
        assert [type(v) for v in sample["history"]] == [MetaTensor] * 3
        assert tuple(sample["history"][1].shape) == (1, 64, 64)  # the input sample is not modified
        back = conform.inverse({"history": [v.clone() for v in out["history"]]})["history"]
        assert [tuple(v.shape) for v in back] == [(1, 32, 32), (1, 64, 64), (1, 40, 40)]
        assert [float(v.affine[0, 0]) for v in back] == [SPACING, 2.5, 4.0]

        registered = RegisterSequenced(keys="history", reference="last", stages="rigid")(out)
        assert tuple(registered["history"].shape) == (3, 1, SIZE, SIZE)
        # the other visits are registered onto the last one, which keeps its voxels
        np.testing.assert_allclose(registered["history"][2].numpy(), out["history"][2].numpy(), atol=1e-5)

    def test_error_names_subject_key_visit_and_file(self, cohort, tmp_path):
        ct = write_nifti(tmp_path / "ct.nii.gz", np.full((SIZE, SIZE), 1500.0), spacing=(SPACING, SPACING))
        sample = LoadSequenced("history", stack=False)({"subject_id": "P0000", "history": [cohort[0], str(ct)]})
        with pytest.raises(ValueError, match=r"subject 'P0000', key 'history', visit 1 of 2: file '.*ct\.nii\.gz'"):
            _conform(keys="history")(sample)


class TestLoadSequenceUnstacked:
    def test_list_keeps_each_affine(self, tmp_path):
        paths = [
            str(write_nifti(tmp_path / "a.nii.gz", _pattern(SIZE, SPACING), spacing=(SPACING, SPACING))),
            str(write_nifti(tmp_path / "b.nii.gz", _pattern(2 * SIZE, 2.5), spacing=(2.5, 2.5))),
        ]
        visits = LoadSequenced(stack=False)({"history": paths})["history"]
        assert isinstance(visits, list)
        assert [tuple(v.shape) for v in visits] == [(1, SIZE, SIZE), (1, 2 * SIZE, 2 * SIZE)]
        assert [float(v.affine[0, 0]) for v in visits] == [SPACING, 2.5]
        assert [v.meta["filename_or_obj"] for v in visits] == paths
        with pytest.raises(ValueError, match="must share one shape"):
            LoadSequence()(paths)


def _stacked_history(folder: Path) -> tuple[list[str], MetaTensor]:
    """Three 2D visits of constant value 0, 1, 2 loaded as a ``(3, 1, 6, 5)`` history."""
    paths = [
        str(write_nifti(folder / f"v{k}.nii.gz", np.full((6, 5), float(k)), spacing=(SPACING, SPACING)))
        for k in range(3)
    ]
    return paths, LoadSequence()(paths)


class TestSelectVisit:
    @parameterized.expand([(0, 0.0), (-1, 2.0), (1, 1.0)])
    def test_stack(self, index, value):
        with tempfile.TemporaryDirectory() as folder:
            paths, history = _stacked_history(Path(folder))
        before = history.clone()
        out = SelectVisitd("history", index=index, output_key="reference")({"history": history})
        reference = out["reference"]
        assert tuple(reference.shape) == (1, 6, 5)
        np.testing.assert_array_equal(reference.numpy(), np.full((1, 6, 5), value, np.float32))
        torch.testing.assert_close(reference.affine, history.affine)
        assert reference.meta["filename_or_obj"] == paths[index]
        assert "sequence_filenames" not in reference.meta
        reference += 10.0  # a copy: the history stays as it was
        assert out["history"] is history
        torch.testing.assert_close(history.as_tensor(), before.as_tensor())
        assert history.meta["sequence_filenames"] == paths

    def test_list_keeps_visit_affine(self):
        visits = [
            MetaTensor(torch.full((1, 4, 4), float(k)), affine=torch.diag(torch.tensor([k + 1.0, 1, 1, 1])))
            for k in range(3)
        ]
        reference = SelectVisit(1)(visits)
        np.testing.assert_array_equal(reference.numpy(), np.ones((1, 4, 4), np.float32))
        assert float(reference.affine[0, 0]) == 2.0
        assert reference is not visits[1]

    def test_out_of_range(self, tmp_path):
        _, history = _stacked_history(tmp_path)
        with pytest.raises(IndexError, match=r"key 'history'.*index 3 .*3 visits"):
            SelectVisitd("history", index=3)({"history": history})
        with pytest.raises(IndexError, match=r"index -4 .*3 visits"):
            SelectVisit(-4)(list(history))
