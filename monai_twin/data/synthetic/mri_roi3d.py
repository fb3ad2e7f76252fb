"""A 3D brain-MRI ROI cohort on real anatomy, with atrophy driven by the EHR.

Anatomy comes from the MNI ICBM152 2009 T1 / grey-matter / white-matter templates that ship inside
nilearn's wheel (``nilearn/datasets/data/``, read offline, never downloaded). Each subject sees the
template through its own smooth warp, head-size scale and ROI jitter; the ROI is a cube (default
64^3 voxels of 1.5 mm) centred on the left medial temporal lobe, which holds the hippocampus, the
temporal horn and part of the lateral ventricle. CSF is the part of the intracranial volume that
is neither grey nor white matter.

Dynamics (the truth): atrophy ``S(t)`` is the distance (mm) by which tissue boundaries have
retreated from the CSF, with rate::

    dS/dt = r0 * (1 + 0.05 (age0 - 70)) * (1 + 0.6 apoe4) * (1 + 1.2 (amyloid(t) - 1.1)) / (1 + dose / 10)

``amyloid(t) = a0 + a1 t`` is a latent SUVR-like level; the drug slows atrophy through the last
factor, so more drug gives less atrophy at every later time (dose monotonicity). ``S`` is applied
as a smooth displacement that pulls tissue away from CSF: grey matter shrinks, sulci and
ventricles widen. A cognitive score tracks atrophy::

    MMSE = clip(mmse0 - 2.5 S, 0, 30),   measured = round(MMSE + z)

A visit is *changed* when ``S`` advanced by at least ``change_threshold_mm`` (default 0.3 mm)
since the previous visit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .acquisition import AcquisitionTransform, identity_grid, sample_acquisition, smooth_random_field, warp
from .subject import DoseSchedule, SyntheticSubject, sample_dose_schedule, sample_lab_plan, sample_visit_days

__all__ = [
    "AMYLOID_CODE",
    "DRUG_CODE",
    "LABELS",
    "MMSE_CODE",
    "MRIROI3DConfig",
    "mri_roi3d_anatomy",
    "mri_roi3d_measure",
    "mri_roi3d_render",
    "mri_roi3d_truth",
    "sample_mri_roi3d_subject",
    "template_paths",
]

DRUG_CODE = "DRUG//anti-amyloid"
AMYLOID_CODE = "LAB//amyloid-SUVR"
MMSE_CODE = "SCORE//MMSE"
#: Tissue labels of the masks.
LABELS = {"background": 0, "csf": 1, "grey_matter": 2, "white_matter": 3}


@dataclass(frozen=True)
class MRIROI3DConfig:
    """Settings of the 3D MRI ROI simulator.

    Args:
        size: ROI side in voxels (volumes are ``(size, size, size)``).
        spacing_mm: isotropic voxel size, mm.
        roi_centre_mm: ROI centre in MNI coordinates (mm); default the left medial temporal lobe.
        visits: ``(low, high)`` number of visits per subject.
        mean_gap_days: mean gap between visits, days.
        min_gap_days: shortest gap, days.
        treated_probability: fraction of subjects who receive the drug.
        dose_levels: daily doses, mg/day.
        ec50: dose (mg/day) that halves the atrophy rate.
        noise_sigma: Rician noise level, fraction of the intensity range.
        max_rotation_deg: rigid misalignment bound per axis, degrees.
        max_shift_mm: rigid shift bound per axis, mm.
        bias_strength: standard deviation of the log-bias coefficients.
        gain_range: ``(low, high)`` global gain.
        subject_warp_mm: standard deviation of the per-subject anatomical warp, mm.
        change_threshold_mm: a visit is "changed" when atrophy advanced by at least this much (mm).
    """

    size: int = 64
    spacing_mm: float = 1.5
    roi_centre_mm: tuple[float, float, float] = (-26.0, -20.0, -6.0)
    visits: tuple[int, int] = (3, 7)
    mean_gap_days: float = 270.0
    min_gap_days: float = 90.0
    treated_probability: float = 0.6
    dose_levels: tuple[float, ...] = (5.0, 10.0, 20.0)
    ec50: float = 10.0
    noise_sigma: float = 0.006
    max_rotation_deg: float = 3.0
    max_shift_mm: float = 3.0
    bias_strength: float = 0.08
    gain_range: tuple[float, float] = (0.9, 1.1)
    subject_warp_mm: float = 1.5
    change_threshold_mm: float = 0.3

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"size must be >= 8 voxels, got {self.size}.")
        if self.spacing_mm <= 0:
            raise ValueError(f"spacing_mm must be > 0, got {self.spacing_mm}.")
        if self.ec50 <= 0:
            raise ValueError(f"ec50 must be > 0 mg/day, got {self.ec50}.")
        if self.change_threshold_mm <= 0:
            raise ValueError(f"change_threshold_mm must be > 0, got {self.change_threshold_mm}.")

    @property
    def spacing(self) -> float:
        return self.spacing_mm

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return (self.size, self.size, self.size)


def template_paths() -> dict[str, Path]:
    """Paths of the MNI ICBM152 2009 templates inside the installed nilearn package.

    Raises:
        FileNotFoundError: nilearn is installed without its bundled templates.
    """
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    paths = {k: folder / f"mni_icbm152_{k}_tal_nlin_sym_09a_converted.nii.gz" for k in ("t1", "gm", "wm")}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"nilearn's bundled MNI templates are missing: {missing}")
    return paths


@functools.lru_cache(maxsize=1)
def _templates() -> tuple[dict[str, np.ndarray], np.ndarray]:
    """T1, GM, WM and CSF maps on the template grid (float32 in [0, 1]) and the grid's affine."""
    import nibabel as nib
    from scipy.ndimage import binary_closing, binary_fill_holes

    paths = template_paths()
    images = {k: nib.load(str(p)) for k, p in paths.items()}
    maps = {k: np.asarray(img.dataobj, dtype=np.float32) / 255.0 for k, img in images.items()}
    tissue = maps["gm"] + maps["wm"]
    # the intracranial volume: tissue with sulci and ventricles closed/filled in
    intracranial = binary_fill_holes(binary_closing(tissue > 0.3, iterations=3))
    maps["csf"] = np.clip(1.0 - tissue, 0.0, 1.0) * intracranial
    return maps, images["t1"].affine


def sample_visit_acquisition(rng: np.random.Generator, config: MRIROI3DConfig) -> AcquisitionTransform:
    """One visit's acquisition (rigid misalignment, bias field, gain, noise) under ``config``."""
    mm = 1.0 / config.spacing_mm
    return sample_acquisition(
        rng,
        config.spatial_shape,
        max_rotation_deg=config.max_rotation_deg,
        max_shift=config.max_shift_mm * mm,
        noise_sigma=config.noise_sigma,
        gain_range=config.gain_range,
        bias_strength=config.bias_strength,
    )


def sample_mri_roi3d_subject(index: int, seed: int = 0, config: MRIROI3DConfig | None = None) -> SyntheticSubject:
    """Draw the plan of one MRI subject.

    Args:
        index: subject number in the cohort (ids ``P0000``, ...).
        seed: cohort seed; ``(seed, index)`` fixes the subject.
        config: simulator settings.

    Example::

        subject = sample_mri_roi3d_subject(0, seed=1)
        subject.static  # {'sex': ..., 'birth_year': ..., 'apoe4': 0 or 1}
    """
    config = config or MRIROI3DConfig()
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}.")
    plan_rng = np.random.default_rng([seed, index, 0])
    acq_rng = np.random.default_rng([seed, index, 2])
    visit_days, clock0 = sample_visit_days(plan_rng, config.visits, config.mean_gap_days, config.min_gap_days)
    origin = pd.Timestamp("2012-01-01") + pd.Timedelta(days=int(plan_rng.integers(0, 6 * 365)))
    origin = origin + pd.Timedelta(minutes=clock0)
    age0 = float(plan_rng.uniform(60.0, 85.0))
    apoe4 = int(plan_rng.random() < 0.35)
    sex = str(plan_rng.choice(["F", "M"]))
    latent = {
        "age0": age0,
        "r0": float(np.exp(plan_rng.normal(np.log(0.3), 0.35))) / 365.25,  # mm/day
        "amyloid0": float(plan_rng.uniform(0.9, 1.7) + 0.2 * apoe4),
        "amyloid_slope": float(plan_rng.uniform(0.0, 0.04)) / 365.25,  # SUVR/day
        "mmse0": float(plan_rng.uniform(26.0, 30.0) - apoe4),
        "contrast": float(plan_rng.uniform(0.9, 1.1)),
        "scale": float(plan_rng.uniform(0.95, 1.05)),
        "jitter_mm": [float(v) for v in plan_rng.normal(0.0, 2.0, 3)],
    }
    schedule = sample_dose_schedule(plan_rng, visit_days, config.treated_probability, config.dose_levels)
    amyloid = sample_lab_plan(
        plan_rng,
        AMYLOID_CODE,
        "SUVR",
        visit_days,
        at_visit_probability=0.3,
        extra_per_interval=0.5,
        origin_clock_minutes=clock0,
    )
    mmse = sample_lab_plan(
        plan_rng,
        MMSE_CODE,
        "points",
        visit_days,
        at_visit_probability=0.9,
        extra_per_interval=0.3,
        origin_clock_minutes=clock0,
    )
    acquisitions = tuple(sample_visit_acquisition(acq_rng, config) for _ in visit_days)
    return SyntheticSubject(
        kind="mri_roi3d",
        subject_id=f"P{index:04d}",
        index=index,
        seed=seed,
        config=config,
        origin=origin,
        visit_days=visit_days,
        static={"sex": sex, "birth_year": int(origin.year - np.floor(age0)), "apoe4": apoe4},
        latent=latent,
        schedule=schedule,
        labs=(amyloid, mmse),
        acquisitions=acquisitions,
        drug_code=DRUG_CODE,
    )


# ------------------------------------------------------------------------------------------------
# dynamics


def _atrophy(subject: SyntheticSubject, schedule: DoseSchedule, days: np.ndarray) -> np.ndarray:
    """``S(t)`` in mm, integrated exactly on each constant-dose segment (the rate is linear in t there)."""
    lat, cfg = subject.latent, subject.config
    days = np.asarray(days, dtype=np.float64)
    base = lat["r0"] * max(0.3, 1.0 + 0.05 * (lat["age0"] - 70.0)) * (1.0 + 0.6 * subject.static["apoe4"])
    c0 = 1.0 + 1.2 * (lat["amyloid0"] - 1.1)  # amyloid factor at day 0 ...
    c1 = 1.2 * lat["amyloid_slope"]  # ... and its slope per day
    horizon = float(np.max(days, initial=0.0)) + 1.0
    starts, doses = schedule.segments(horizon)
    slow = 1.0 / (1.0 + doses / cfg.ec50)

    def seg(k: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return base * slow[k] * (c0 * (b - a) + 0.5 * c1 * (b**2 - a**2))

    ends = np.append(starts[1:], np.inf)
    idx = np.arange(len(starts) - 1)
    at_start = np.concatenate([[0.0], np.cumsum(seg(idx, starts[:-1], ends[:-1]))])
    k = np.clip(np.searchsorted(starts, days, side="right") - 1, 0, None)
    return at_start[k] + seg(k, starts[k], np.maximum(days, starts[k]))


def mri_roi3d_truth(subject: SyntheticSubject, schedule: DoseSchedule, days: np.ndarray) -> pd.DataFrame:
    """True atrophy, amyloid and cognition at each time (no images).

    Returns:
        columns ``day``, ``age``, ``dose_mg_day``, ``exposure_mg_day``, ``atrophy_mm``,
        ``amyloid_true`` (SUVR), ``mmse_true`` (points).
    """
    lat = subject.latent
    days = np.asarray(days, dtype=np.float64)
    atrophy = _atrophy(subject, schedule, days)
    return pd.DataFrame(
        {
            "day": days,
            "age": lat["age0"] + days / 365.25,
            "dose_mg_day": schedule.dose_at(days),
            "exposure_mg_day": schedule.exposure(days),
            "atrophy_mm": atrophy,
            "amyloid_true": lat["amyloid0"] + lat["amyloid_slope"] * days,
            "mmse_true": np.clip(lat["mmse0"] - 2.5 * atrophy, 0.0, 30.0),
        }
    )


def mri_roi3d_measure(subject: SyntheticSubject, schedule: DoseSchedule) -> dict[str, np.ndarray]:
    """Measured amyloid (log-normal noise) and MMSE (integer points) at their plans' times."""
    amyloid, mmse = subject.labs
    t_amy = mri_roi3d_truth(subject, schedule, amyloid.days)["amyloid_true"].to_numpy()
    t_mmse = mri_roi3d_truth(subject, schedule, mmse.days)["mmse_true"].to_numpy()
    return {
        amyloid.code: np.round(t_amy * np.exp(0.04 * amyloid.z), 3),
        mmse.code: np.clip(np.round(t_mmse + mmse.z), 0.0, 30.0),
    }


# ------------------------------------------------------------------------------------------------
# rendering


def mri_roi3d_anatomy(subject: SyntheticSubject) -> dict[str, np.ndarray]:
    """The subject's ROI before atrophy (T1, GM, WM, CSF) and the unit atrophy field (voxels per mm)."""
    from scipy.ndimage import gaussian_filter

    cache = subject._anatomy_cache
    if cache:
        return cache
    cfg: MRIROI3DConfig = subject.config
    maps, affine = _templates()
    rng = np.random.default_rng([subject.seed, subject.index, 1])
    shape = cfg.spatial_shape
    lat = subject.latent
    centre = np.asarray(cfg.roi_centre_mm, dtype=np.float64) + np.asarray(lat["jitter_mm"])
    offsets = (identity_grid(shape) - ((np.asarray(shape) - 1) / 2.0).reshape(3, 1, 1, 1)) * cfg.spacing_mm
    world = centre.reshape(3, 1, 1, 1) + lat["scale"] * offsets
    for axis in range(3):
        world[axis] += cfg.subject_warp_mm * smooth_random_field(rng, shape, 4)
    inverse = np.linalg.inv(affine)
    voxels = np.tensordot(inverse[:3, :3], world, axes=1) + inverse[:3, 3].reshape(3, 1, 1, 1)
    # crop a box around the sampled positions first: interpolating into the full template is slower
    lo = np.maximum(np.floor(voxels.reshape(3, -1).min(1)).astype(int) - 2, 0)
    hi = np.minimum(np.ceil(voxels.reshape(3, -1).max(1)).astype(int) + 3, maps["t1"].shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    local = voxels - lo.reshape(3, 1, 1, 1)
    out = {k: np.clip(warp(maps[k][box], local), 0.0, 1.0) for k in ("t1", "gm", "wm", "csf")}
    out["t1"] = out["t1"] * lat["contrast"]
    # the atrophy direction: up the gradient of smoothed CSF (tissue moves away from CSF), weighted
    # by the smoothed CSF itself so the displacement grows towards CSF and tissue at the boundary
    # is compressed (a pull-back field with positive divergence shrinks what it samples)
    smooth = gaussian_filter(out["csf"], 1.5)
    grad = np.stack(np.gradient(smooth))
    norm = np.sqrt((grad**2).sum(0) + 0.02**2)
    out["atrophy_field"] = (smooth * grad / norm / cfg.spacing_mm).astype(np.float32)
    cache.update(out)
    return cache


def mri_roi3d_render(subject: SyntheticSubject, row: pd.Series) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Noise-free aligned T1 ROI, tissue labels (uint8, see ``LABELS``) and tissue volumes (mm^3)."""
    anatomy = mri_roi3d_anatomy(subject)
    shape = subject.config.spatial_shape
    positions = identity_grid(shape) + float(row["atrophy_mm"]) * anatomy["atrophy_field"]
    t1 = warp(anatomy["t1"], positions)
    tissues = np.stack([warp(anatomy[k], positions) for k in ("csf", "gm", "wm")])
    other = np.clip(1.0 - tissues.sum(0), 0.0, 1.0)
    labels = np.argmax(np.concatenate([other[None], tissues]), axis=0).astype(np.uint8)
    voxel = subject.config.spacing_mm**3
    volumes = {
        "csf_volume_mm3": float(tissues[0].sum() * voxel),
        "gm_volume_mm3": float(tissues[1].sum() * voxel),
        "wm_volume_mm3": float(tissues[2].sum() * voxel),
    }
    return t1.astype(np.float32), labels, volumes
