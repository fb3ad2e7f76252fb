from __future__ import annotations

import numpy as np
import pytest

from monai_twin.data import load_manifest
from monai_twin.visualize import plot_subject_timeline
from monai_twin.visualize.timeline import middle_slice


def test_timeline_png(nifti_cohort, tmp_path):
    manifest = load_manifest(nifti_cohort)
    out = plot_subject_timeline(manifest, "S001", tmp_path / "fig" / "S001.png", dpi=50)
    import matplotlib.image as mpimg

    pixels = mpimg.imread(out)
    n_visits = len(manifest.subject_visits("S001"))
    # width follows the number of visits shown (2.2 in per scan at 50 dpi), and the figure is not blank
    assert pixels.shape[1] == int(round(max(2.2 * n_visits, 6.0) * 50))
    assert pixels[..., :3].std() > 0.05
    assert [p.name for p in out.parent.iterdir()] == ["S001.png"]  # no temporary file left


def test_timeline_bad_code(nifti_cohort, tmp_path):
    manifest = load_manifest(nifti_cohort)
    with pytest.raises(ValueError, match="LAB//nope"):
        plot_subject_timeline(manifest, "S001", tmp_path / "x.png", codes=["LAB//nope"])
    with pytest.raises(KeyError, match="S999"):
        plot_subject_timeline(manifest, "S999", tmp_path / "x.png")


def test_middle_slice():
    vol = np.arange(2 * 3 * 5).reshape(1, 2, 3, 5)
    np.testing.assert_array_equal(middle_slice(vol), vol[0, :, :, 2])
    img = np.ones((4, 4))
    assert middle_slice(img) is not None and middle_slice(img).shape == (4, 4)
