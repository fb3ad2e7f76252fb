"""Small cohorts shared by the synthetic-data tests (written once per session, read-only)."""

from __future__ import annotations

import pytest

from monai_twin.data.synthetic import Mammo2DConfig, MRIROI3DConfig, write_cohort

SMALL_2D = Mammo2DConfig(size=64)
SMALL_3D = MRIROI3DConfig(size=24, spacing_mm=3.0)
CONFIGS = {"mammo2d": SMALL_2D, "mri_roi3d": SMALL_3D}
N_SUBJECTS = {"mammo2d": 6, "mri_roi3d": 4}


@pytest.fixture(scope="session")
def small_cohorts(tmp_path_factory):
    """``{kind: folder}`` of a small cohort per simulator, seed 11."""
    root = tmp_path_factory.mktemp("synthetic")
    return {kind: write_cohort(kind, root / kind, N_SUBJECTS[kind], seed=11, config=CONFIGS[kind]) for kind in CONFIGS}
