from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from monai.metrics import SSIMMetric
from parameterized import parameterized

from monai_twin.data.synthetic import (
    AcquisitionTransform,
    MRIROI3DConfig,
    apply_acquisition,
    invert_acquisition,
    invert_displacement,
    resimulate,
    sample_acquisition,
    simulate_subject,
)
from monai_twin.data.synthetic.acquisition import identity_grid, warp
from tests.data.synthetic.conftest import CONFIGS

# (kind, config): the 2D case small, the 3D case at the default 64^3 (a 3 mm 24^3 ROI is mostly partial volume)
INVERSE_CASES = [
    ("mammo2d", CONFIGS["mammo2d"]),
    ("mri_roi3d", MRIROI3DConfig()),
]


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    metric = SSIMMetric(spatial_dims=a.ndim, data_range=1.0)
    return float(metric(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None]).item())


@parameterized.expand([((32, 40),), ((16, 20, 12),)])
def test_inverse_displacement_composes_to_identity(shape):
    rng = np.random.default_rng(0)
    kwargs = {"compression": (0.1, 0.1), "deform_amplitude": 1.0} if len(shape) == 2 else {"bias_strength": 0.1}
    t = sample_acquisition(rng, shape, max_rotation_deg=5.0, max_shift=3.0, noise_sigma=0.0, **kwargs)
    u = t.displacement()
    assert u.shape == (len(shape), *shape)
    assert np.abs(u).max() > 0.5  # a real misalignment, not the identity
    v = invert_displacement(u)
    grid = identity_grid(shape)
    # v followed by u returns every point (away from the border, where sampling clamps)
    composed = v + np.stack([warp(u[a], grid + v) for a in range(len(shape))])
    inner = tuple(slice(4, s - 4) for s in shape)
    assert np.abs(composed[(slice(None), *inner)]).max() < 1e-3


@parameterized.expand(INVERSE_CASES)
def test_inverse_acquisition_recovers_aligned_render(kind, config):
    subject = simulate_subject(kind, 2, seed=5, config=config)
    visits = resimulate(subject)
    scores = [
        _ssim(invert_acquisition(visits.images[k], subject.acquisitions[k]), visits.aligned[k])
        for k in range(subject.n_visits)
    ]
    raw = [_ssim(visits.images[k], visits.aligned[k]) for k in range(subject.n_visits)]
    assert min(scores) >= 0.95, scores
    # the acquisition really moved the image: the un-inverted scans are far from aligned
    assert max(raw) < 0.9, raw


def test_saved_displacement_and_gain_match_parameters(small_cohorts):
    for kind, folder in small_cohorts.items():
        truth = pd.read_parquet(folder / "truth.parquet")
        row = truth.iloc[1]
        transform = AcquisitionTransform.from_dict(row["acquisition"])
        saved = np.asarray(nib.load(str(folder / row["displacement"])).get_fdata(dtype=np.float32))
        ndim = transform.ndim
        saved = np.moveaxis(saved.reshape(transform.spatial_shape + (ndim,)), -1, 0)
        expected = transform.displacement()
        # stored in steps of 1/100 voxel: rounding error at most half a step
        assert np.abs(saved - expected).max() <= 0.005 + 1e-6
        if kind == "mri_roi3d":
            gain = np.asarray(nib.load(str(folder / row["gain"])).get_fdata(dtype=np.float32))
            np.testing.assert_allclose(gain, transform.gain_field(), atol=0.5 / 2000 + 1e-6)
        else:
            assert pd.isna(row["gain"])
        # and the saved field inverts the acquired file back to the aligned frame
        acquired = np.asarray(nib.load(str(folder / row["image"])).get_fdata(dtype=np.float32))
        a = invert_acquisition(acquired, transform, displacement=saved)
        b = invert_acquisition(acquired, transform)
        # away from the border, where the numerical inverse of a clamped field is least exact
        inner = tuple(slice(3, s - 3) for s in transform.spatial_shape)
        assert np.abs(a - b)[inner].max() < 0.02


def test_transform_json_round_trip_and_validation():
    rng = np.random.default_rng(1)
    t = sample_acquisition(rng, (8, 9, 10), max_rotation_deg=2.0, max_shift=1.0, noise_sigma=0.01, bias_strength=0.1)
    again = AcquisitionTransform.from_dict(t.to_json())
    assert again == t
    np.testing.assert_array_equal(again.displacement(), t.displacement())
    with pytest.raises(ValueError, match="rotation_deg"):
        AcquisitionTransform(spatial_shape=(8, 8), rotation_deg=(1.0, 2.0), shift=(0.0, 0.0))
    with pytest.raises(ValueError, match="gain"):
        AcquisitionTransform(spatial_shape=(8, 8), rotation_deg=(1.0,), shift=(0.0, 0.0), gain=0.0)
    with pytest.raises(ValueError, match="aligned"):
        apply_acquisition(np.zeros((4, 4)), t)


def test_noise_is_fixed_by_the_seed_and_air_stays_clean():
    rng = np.random.default_rng(2)
    t = sample_acquisition(rng, (32, 32), max_rotation_deg=0.0, max_shift=0.0, noise_sigma=0.05)
    image = np.zeros((32, 32), dtype=np.float32)
    image[8:24, 8:24] = 0.5
    a, b = apply_acquisition(image, t), apply_acquisition(image, t)
    np.testing.assert_array_equal(a, b)
    # quantum-like 2D noise: none in air, about sigma * sqrt(signal) in tissue
    assert np.abs(a[:4, :4]).max() < 1e-6
    assert 0.5 * 0.05 * np.sqrt(0.5) < a[10:22, 10:22].std() < 1.5 * 0.05 * np.sqrt(0.5)


@parameterized.expand([((40, 48),), ((20, 24, 16),)])
def test_analytic_inverse_of_rigid_acquisitions_matches_the_fixed_point(shape):
    rng = np.random.default_rng(3)
    t = sample_acquisition(rng, shape, max_rotation_deg=6.0, max_shift=3.0, noise_sigma=0.0)
    exact = t.inverse_displacement()
    numeric = invert_displacement(t.displacement())
    inner = (slice(None),) + tuple(slice(5, s - 5) for s in shape)
    assert np.abs(exact[inner] - numeric[inner]).max() < 1e-3
    assert np.abs(exact).max() > 0.5
