"""A 2D mammography (CC-view-like) cohort whose lesion growth is an explicit function of the EHR.

Anatomy (fixed per subject): a breast outline against the chest wall (axis 0 = 0, the nipple
towards large axis-0 indices) with a per-subject size, shape exponent and wobble; a skin line;
fibroglandular tissue from smoothed fractal noise whose dense fraction falls with age and rises
under hormone therapy; in some subjects a mass (round, lobulated or spiculated).

Dynamics (the truth): the lesion area ``A`` (mm^2) follows a Gompertz law whose rate falls with
cumulative drug exposure ``E(t) = integral_0^t dose`` (mg x days)::

    dA/dt = r(t) A ln(K / A),   r(t) = r0 exp(-kappa E(t))

With ``u = ln(K/A)`` this is ``du/dt = -r u``, so ``A(t) = K exp(-u0 exp(-I(t)))`` with
``I(t) = integral_0^t r``, integrated exactly on each constant-dose segment. More drug gives a
larger ``E``, a smaller ``r`` and a smaller ``A`` at every later time: dose monotonicity holds by
construction. A CA 15-3-like tumour marker tracks the burden with multiplicative noise::

    CA15-3 = base + 0.06 A,   measured = CA15-3 exp(0.08 z)

A visit is *changed* when the lesion's equivalent-circle diameter moved by at least
``change_threshold_mm`` (default 1 mm) since the previous visit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .acquisition import AcquisitionTransform, identity_grid, sample_acquisition, smooth_random_field
from .subject import DoseSchedule, SyntheticSubject, sample_dose_schedule, sample_lab_plan, sample_visit_days

__all__ = [
    "DRUG_CODE",
    "LAB_CODE",
    "LESION_TYPES",
    "Mammo2DConfig",
    "mammo2d_anatomy",
    "mammo2d_prior_lesion_area",
    "mammo2d_measure",
    "mammo2d_render",
    "mammo2d_truth",
    "sample_mammo2d_subject",
]

DRUG_CODE = "DRUG//tamoxifen"
LAB_CODE = "LAB//CA15-3"
LESION_TYPES = ("none", "round", "lobulated", "spiculated")
# the cohort's prior of the two growth latents no scan shows before a second one: capacity K (mm^2,
# uniform) and growth rate r0 (1/day, log-normal, raised by hormone therapy)
CAPACITY_RANGE_MM2 = (600.0, 1500.0)
GROWTH_RATE_LOG_MEAN = float(np.log(0.0012))
GROWTH_RATE_LOG_SD = 0.5
HRT_GROWTH_FACTOR = 0.3


@dataclass(frozen=True)
class Mammo2DConfig:
    """Settings of the 2D mammography simulator.

    Args:
        size: image side in pixels (images are ``(size, size)``).
        fov_mm: field of view in mm; the pixel spacing is ``fov_mm / size``.
        visits: ``(low, high)`` number of visits per subject (uniform).
        mean_gap_days: mean gap between visits, days.
        min_gap_days: shortest gap, days.
        mass_probability: fraction of subjects with a mass.
        treated_probability: fraction of subjects who receive the drug.
        dose_levels: daily doses a prescription picks from, mg/day.
        kappa: drug effect, per mg x day of cumulative exposure.
        noise_sigma: acquisition noise, fraction of the intensity range.
        max_rotation_deg: acquisition rotation bound, degrees.
        max_shift_mm: acquisition shift bound, mm.
        compression: ``(low, high)`` compression stretch (fraction, at the nipple end).
        deform_mm: standard deviation of the smooth random acquisition deformation, mm.
        gain_range: ``(low, high)`` acquisition gain.
        change_threshold_mm: a visit is "changed" when the lesion's equivalent diameter moved by at
            least this much (mm) since the previous visit.
    """

    size: int = 256
    fov_mm: float = 160.0
    visits: tuple[int, int] = (3, 8)
    mean_gap_days: float = 240.0
    min_gap_days: float = 60.0
    mass_probability: float = 0.7
    treated_probability: float = 0.6
    dose_levels: tuple[float, ...] = (10.0, 20.0, 40.0)
    kappa: float = 1.0 / 2500.0
    noise_sigma: float = 0.01
    max_rotation_deg: float = 4.0
    max_shift_mm: float = 4.0
    compression: tuple[float, float] = (0.0, 0.12)
    deform_mm: float = 0.8
    gain_range: tuple[float, float] = (0.85, 1.15)
    change_threshold_mm: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}.")
        if self.fov_mm <= 0:
            raise ValueError(f"fov_mm must be > 0, got {self.fov_mm}.")
        if not 0.0 <= self.mass_probability <= 1.0:
            raise ValueError(f"mass_probability must be in [0, 1], got {self.mass_probability}.")
        if self.change_threshold_mm <= 0:
            raise ValueError(f"change_threshold_mm must be > 0, got {self.change_threshold_mm}.")

    @property
    def spacing(self) -> float:
        """Pixel spacing in mm."""
        return self.fov_mm / self.size

    @property
    def spatial_shape(self) -> tuple[int, int]:
        return (self.size, self.size)


def sample_visit_acquisition(rng: np.random.Generator, config: Mammo2DConfig) -> AcquisitionTransform:
    """One visit's acquisition (compression, deformation, rotation, shift, gain, noise) under ``config``."""
    mm = 1.0 / config.spacing
    return sample_acquisition(
        rng,
        config.spatial_shape,
        max_rotation_deg=config.max_rotation_deg,
        max_shift=config.max_shift_mm * mm,
        noise_sigma=config.noise_sigma,
        compression=config.compression,
        deform_amplitude=config.deform_mm * mm,
        gain_range=config.gain_range,
    )


def sample_mammo2d_subject(index: int, seed: int = 0, config: Mammo2DConfig | None = None) -> SyntheticSubject:
    """Draw the plan of one mammography subject.

    Args:
        index: subject number in the cohort (ids are ``P0000``, ``P0001``, ...).
        seed: cohort seed; ``(seed, index)`` fixes the subject.
        config: simulator settings.

    Example::

        subject = sample_mammo2d_subject(3, seed=0)
        subject.static  # {'sex': 'F', 'birth_year': ..., 'hormone_therapy': ...}
    """
    config = config or Mammo2DConfig()
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}.")
    plan_rng = np.random.default_rng([seed, index, 0])
    acq_rng = np.random.default_rng([seed, index, 2])
    visit_days, clock0 = sample_visit_days(plan_rng, config.visits, config.mean_gap_days, config.min_gap_days)
    origin = pd.Timestamp("2015-01-01") + pd.Timedelta(days=int(plan_rng.integers(0, 5 * 365)))
    origin = origin + pd.Timedelta(minutes=clock0)
    age0 = float(plan_rng.uniform(40.0, 75.0))
    hrt = int(plan_rng.random() < 0.3)
    has_mass = plan_rng.random() < config.mass_probability
    lesion_type = str(plan_rng.choice(LESION_TYPES[1:])) if has_mass else "none"
    latent = {
        "age0": age0,
        "density_logit": float(plan_rng.normal(-0.3, 0.8)),
        "lesion_type": lesion_type,
        "area0": float(np.exp(plan_rng.normal(np.log(30.0), 0.5))) if has_mass else 0.0,
        "capacity": float(plan_rng.uniform(*CAPACITY_RANGE_MM2)),
        "r0": float(np.exp(plan_rng.normal(GROWTH_RATE_LOG_MEAN, GROWTH_RATE_LOG_SD)))
        * (1.0 + HRT_GROWTH_FACTOR * hrt),
        "marker_base": float(plan_rng.uniform(12.0, 25.0)),
        "anatomy_seed": int(plan_rng.integers(0, 2**31 - 1)),
    }
    schedule = sample_dose_schedule(plan_rng, visit_days, config.treated_probability, config.dose_levels)
    lab = sample_lab_plan(
        plan_rng,
        LAB_CODE,
        "U/mL",
        visit_days,
        at_visit_probability=0.9,
        extra_per_interval=0.7,
        origin_clock_minutes=clock0,
    )
    acquisitions = tuple(sample_visit_acquisition(acq_rng, config) for _ in visit_days)
    birth_year = int(origin.year - np.floor(age0))
    return SyntheticSubject(
        kind="mammo2d",
        subject_id=f"P{index:04d}",
        index=index,
        seed=seed,
        config=config,
        origin=origin,
        visit_days=visit_days,
        static={"sex": "F", "birth_year": birth_year, "hormone_therapy": hrt},
        latent=latent,
        schedule=schedule,
        labs=(lab,),
        acquisitions=acquisitions,
        drug_code=DRUG_CODE,
    )


# ------------------------------------------------------------------------------------------------
# dynamics


def _growth_integral(subject: SyntheticSubject, schedule: DoseSchedule, days: np.ndarray) -> np.ndarray:
    """``I(t) = integral_0^t r0 exp(-kappa E(s)) ds`` at each time, exact per constant-dose segment."""
    r0, kappa = subject.latent["r0"], subject.config.kappa
    days = np.asarray(days, dtype=np.float64)
    horizon = float(np.max(days, initial=0.0)) + 1.0
    starts, doses = schedule.segments(horizon)
    e_start = schedule.exposure(starts)

    def seg(k: np.ndarray, length: np.ndarray) -> np.ndarray:
        # integral over [start_k, start_k + length] of r0 exp(-kappa (E_k + d_k s)) ds
        rate = kappa * doses[k]
        safe = np.where(rate > 0, rate, 1.0)
        factor = np.where(rate > 0, -np.expm1(-rate * length) / safe, length)
        return r0 * np.exp(-kappa * e_start[k]) * factor

    ends = np.append(starts[1:], np.inf)
    full = seg(np.arange(len(starts) - 1), ends[:-1] - starts[:-1])
    at_start = np.concatenate([[0.0], np.cumsum(full)])
    k = np.clip(np.searchsorted(starts, days, side="right") - 1, 0, None)
    return at_start[k] + seg(k, np.clip(days - starts[k], 0.0, None))


def mammo2d_prior_lesion_area(
    subject: SyntheticSubject, schedule: DoseSchedule, days: np.ndarray, n_draws: int = 4000, seed: int = 0
) -> np.ndarray:
    """The lesion area (mm^2) at ``days`` under ``schedule``, averaged over the cohort's prior of the
    growth rate and capacity given the subject's initial area and hormone therapy: what one scan
    tells about the lesion's future.

    A single scan shows the lesion's size but neither how fast it grows (``r0``) nor where it
    saturates (``K``); the simulator draws both independently of the initial size. This is the
    best forecast of the area (in mean squared error) from the first scan, the schedule and the
    static record, so it bounds what any forecaster can do with a one-scan history -- e.g. the
    Pearson r of its predicted what-if effects against the true ones. Vectorised over the draws:
    the growth integral is ``r0`` times an integral that does not depend on ``r0``.

    Args:
        subject: a mammography subject (its ``area0``, hormone therapy and config are used).
        schedule: the drug schedule (recorded, or edited for a what-if).
        days: times, days since the first visit.
        n_draws: Monte Carlo draws of ``(r0, K)``.
        seed: seed of the draws (use the same seed for two schedules so their difference has
            common draws).

    Returns:
        ``(len(days),)`` expected areas; zeros when the subject has no lesion.
    """
    days = np.asarray(days, dtype=np.float64).reshape(-1)
    area0 = subject.latent["area0"]
    if subject.latent["lesion_type"] == "none" or not area0 > 0:
        return np.zeros_like(days)
    rng = np.random.default_rng(seed)
    hrt = subject.static["hormone_therapy"]
    capacity = rng.uniform(max(CAPACITY_RANGE_MM2[0], area0 * (1 + 1e-9)), CAPACITY_RANGE_MM2[1], n_draws)
    r0 = np.exp(rng.normal(GROWTH_RATE_LOG_MEAN, GROWTH_RATE_LOG_SD, n_draws)) * (1.0 + HRT_GROWTH_FACTOR * hrt)
    unit = dataclasses.replace(subject, latent=dict(subject.latent, r0=1.0))
    integral = _growth_integral(unit, schedule, days)  # (D,) for r0 = 1
    u0 = np.log(capacity / area0)[:, None]
    return np.mean(capacity[:, None] * np.exp(-u0 * np.exp(-r0[:, None] * integral[None])), axis=0)


def mammo2d_truth(subject: SyntheticSubject, schedule: DoseSchedule, days: np.ndarray) -> pd.DataFrame:
    """True lesion area, exposure, density and marker at each time (no images).

    Returns:
        columns ``day``, ``age``, ``dose_mg_day``, ``exposure_mg_day`` (mg x days),
        ``lesion_area_mm2``, ``lesion_diameter_mm`` (equivalent circle), ``density`` (dense
        fraction), ``ca153_true`` (U/mL).
    """
    lat = subject.latent
    days = np.asarray(days, dtype=np.float64)
    age = lat["age0"] + days / 365.25
    if lat["lesion_type"] != "none":
        u0 = np.log(lat["capacity"] / lat["area0"])
        area = lat["capacity"] * np.exp(-u0 * np.exp(-_growth_integral(subject, schedule, days)))
    else:
        area = np.zeros_like(days)
    density = 1.0 / (
        1.0 + np.exp(-(lat["density_logit"] - 0.06 * (age - 50.0) + 0.9 * subject.static["hormone_therapy"]))
    )
    return pd.DataFrame(
        {
            "day": days,
            "age": age,
            "dose_mg_day": schedule.dose_at(days),
            "exposure_mg_day": schedule.exposure(days),
            "lesion_area_mm2": area,
            "lesion_diameter_mm": 2.0 * np.sqrt(area / np.pi),
            "density": density,
            "ca153_true": lat["marker_base"] + 0.06 * area,
        }
    )


def mammo2d_measure(subject: SyntheticSubject, schedule: DoseSchedule) -> dict[str, np.ndarray]:
    """Measured marker values at the lab plan's times (true value times log-normal noise)."""
    plan = subject.labs[0]
    true = mammo2d_truth(subject, schedule, plan.days)["ca153_true"].to_numpy()
    return {plan.code: np.round(true * np.exp(0.08 * plan.z), 1)}


# ------------------------------------------------------------------------------------------------
# rendering


def _fractal_noise(rng: np.random.Generator, shape: tuple[int, int], beta: float = 3.0) -> np.ndarray:
    """Zero-mean, unit-variance noise with power spectrum ``1 / f^beta`` (parenchyma-like texture)."""
    white = rng.standard_normal(shape)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    spectrum = np.fft.rfft2(white) / f ** (beta / 2.0)
    spectrum[0, 0] = 0.0
    field = np.fft.irfft2(spectrum, s=shape)
    return ((field - field.mean()) / field.std()).astype(np.float32)


def mammo2d_anatomy(subject: SyntheticSubject) -> dict[str, np.ndarray]:
    """The fixed anatomy of a subject: breast mask, thickness, skin, gland noise and lesion geometry."""
    from scipy.ndimage import distance_transform_edt

    cache = subject._anatomy_cache
    if cache:
        return cache
    cfg: Mammo2DConfig = subject.config
    rng = np.random.default_rng([subject.seed, subject.index, 1])
    shape, sp = cfg.spatial_shape, cfg.spacing
    grid = identity_grid(shape) * sp  # mm
    x, y = grid[0], grid[1]
    depth = rng.uniform(0.55, 0.8) * cfg.fov_mm
    half_width = rng.uniform(0.32, 0.45) * cfg.fov_mm
    centre_y = cfg.fov_mm / 2.0 + rng.normal(0.0, 0.03) * cfg.fov_mm
    exponent = rng.uniform(1.7, 2.4)
    level = (x / depth) ** exponent + ((y - centre_y) / half_width) ** 2
    level = level + 0.04 * smooth_random_field(rng, shape, 5)
    breast = level < 1.0
    thickness = np.sqrt(np.clip(1.0 - level, 0.0, 1.0)).astype(np.float32)
    skin = np.exp(-distance_transform_edt(breast) * sp / 0.7).astype(np.float32) * breast
    gland = _fractal_noise(rng, shape, 2.6)
    # glandular tissue sits behind the nipple and away from the skin
    gland = gland + 1.2 * np.exp(-((((x / depth) - 0.45) / 0.3) ** 2)) - 1.5 * (1.0 - thickness)
    inside = np.sort(gland[breast])
    cache.update(
        breast=breast.astype(np.float32),
        thickness=thickness,
        skin=skin,
        gland=gland.astype(np.float32),
        gland_sorted=inside,
    )
    if subject.latent["lesion_type"] != "none":
        candidates = np.flatnonzero((level < 0.5).ravel())
        centre_flat = candidates[rng.integers(0, candidates.size)]
        centre = np.array(np.unravel_index(centre_flat, shape), dtype=np.float64) * sp
        dx, dy = x - centre[0], y - centre[1]
        rho = np.sqrt(dx**2 + dy**2)
        theta = np.arctan2(dy, dx)
        kind = subject.latent["lesion_type"]
        orders = np.arange(2, 7)
        amps = rng.uniform(0.08, 0.16, orders.size) * (orders >= 3) if kind == "lobulated" else np.full(5, 0.03)
        phases = rng.uniform(0.0, 2 * np.pi, orders.size)
        shape_profile = 1.0 + (amps[:, None, None] * np.cos(orders[:, None, None] * theta + phases[:, None, None])).sum(
            0
        )
        n_spicules = int(rng.integers(8, 17)) if kind == "spiculated" else 0
        area_factor = 1.0 + 0.5 * np.sum(amps**2)
        spicule_angles = rng.uniform(-np.pi, np.pi, n_spicules)
        spicule_lengths = rng.uniform(0.6, 1.4, n_spicules)
        texture = 1.0 + 0.1 * _fractal_noise(rng, shape, 2.0)
        # the lesion never outgrows its carrying capacity: render it only inside the box it can
        # reach (core, spicules up to 1.5 lengths beyond the rim, and the soft edge's tail)
        max_radius = np.sqrt(subject.latent["capacity"] / (np.pi * area_factor)) * float(shape_profile.max())
        reach = max_radius * (1.0 + 1.5 * float(spicule_lengths.max(initial=0.0))) + 4.0
        lo = np.maximum(np.floor((centre - reach) / sp).astype(int), 0)
        hi = np.minimum(np.ceil((centre + reach) / sp).astype(int) + 1, shape)
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        cache.update(
            lesion_box=box,
            lesion_rho=rho[box].astype(np.float32),
            lesion_theta=theta[box].astype(np.float32),
            lesion_profile=shape_profile[box].astype(np.float32),
            # area of r <= R * profile(theta) is pi R^2 (1 + sum(a^2) / 2): rescale so the mask area is A
            lesion_area_factor=np.float64(area_factor),
            spicule_angles=spicule_angles,
            spicule_lengths=spicule_lengths,
            lesion_texture=texture[box].astype(np.float32),
        )
    return cache


def mammo2d_render(subject: SyntheticSubject, row: pd.Series) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Noise-free aligned image (intensity ~[0, 1]), lesion mask (uint8) and its area (mm^2) for one truth row."""
    anatomy = mammo2d_anatomy(subject)
    breast, thickness = anatomy["breast"], anatomy["thickness"]
    inside = anatomy["gland_sorted"]
    threshold = inside[int(np.clip((1.0 - row["density"]) * (inside.size - 1), 0, inside.size - 1))]
    dense = 1.0 / (1.0 + np.exp(-(anatomy["gland"] - threshold) / 0.3))
    image = breast * (0.18 + 0.22 * thickness + 0.38 * dense * np.sqrt(thickness)) + 0.25 * anatomy["skin"]
    mask = np.zeros(breast.shape, dtype=np.uint8)
    area = float(row["lesion_area_mm2"])
    if subject.latent["lesion_type"] != "none" and area > 0:
        radius = np.sqrt(area / (np.pi * anatomy["lesion_area_factor"]))
        boundary = radius * anatomy["lesion_profile"]
        rho = anatomy["lesion_rho"]
        edge = 0.35  # mm: masses are sharp but not pixel-sharp
        core = 1.0 / (1.0 + np.exp(-np.clip((boundary - rho) / edge, -30, 30)))
        lesion = core * anatomy["lesion_texture"]
        theta = anatomy["lesion_theta"]
        for angle, length in zip(anatomy["spicule_angles"], anatomy["spicule_lengths"]):
            along = rho * np.cos(theta - angle)
            across = rho * np.sin(theta - angle)
            reach = length * radius * 1.5
            ray = np.exp(-(across**2) / (2 * 0.3**2)) * (along > 0) * np.clip(1.0 - (along - radius) / reach, 0, 1)
            lesion = np.maximum(lesion, 0.6 * ray * (along > radius * 0.5))
        box = anatomy["lesion_box"]
        image[box] += 0.32 * lesion * breast[box]
        mask[box] = (rho <= boundary) & (breast[box] > 0)
    area_mm2 = float(mask.sum()) * subject.config.spacing**2
    return image.astype(np.float32), mask, {"mask_area_mm2": area_mm2}
