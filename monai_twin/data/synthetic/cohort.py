"""Simulate subjects, re-simulate them under edited EHR, and write whole cohorts to disk.

A written cohort is a manifest folder that :func:`monai_twin.data.load_manifest` accepts as is::

    out/
      visits.parquet   subject_id, time, image, mask, view
      events.parquet   subject_id, time, code, numeric_value, unit   (dose changes, labs, scores)
      static.parquet   subject_id, sex, birth_year, hormone_therapy | apoe4
      truth.parquet    one row per visit: true area/volumes, "changed" flag, acquisition parameters
      cohort.json      kind, seed, configuration, thresholds -- enough to re-create any subject
      images/<id>/vNN.nii.gz        acquired images
      masks/<id>/vNN.nii.gz         labels in the acquired frame
      transforms/<id>/vNN_displacement.nii.gz   dense pull-back displacement (voxels), 3D also vNN_gain.nii.gz

Times are datetimes (to the minute). Every file is written to a temporary name and renamed, and
the bytes depend only on ``(kind, n_subjects, seed, config)``: NIfTI files are gzipped without a
timestamp and tables are written in a fixed row order.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from . import mammo2d, mri_roi3d
from .acquisition import AcquisitionTransform, apply_acquisition, identity_grid, warp
from .subject import (
    DoseSchedule,
    SyntheticSubject,
    SyntheticVisits,
    build_events,
    schedule_from_events,
    write_nifti_deterministic,
)

__all__ = [
    "KINDS",
    "load_subject",
    "resimulate",
    "simulate_subject",
    "subject_truth",
    "write_cohort",
]

Kind = Literal["mammo2d", "mri_roi3d"]

# On-disk steps: images like a 12-bit detector over the simulators' [0, ~1] intensity range,
# displacements to 1/100 voxel, gains to 1/2000. Fixed steps keep the files compressible.
_IMAGE_QUANTUM = 1.0 / 4000.0
_DISPLACEMENT_QUANTUM = 0.01
_GAIN_QUANTUM = 1.0 / 2000.0


@dataclass(frozen=True)
class _Simulator:
    config: type
    sample: Callable[..., SyntheticSubject]
    truth: Callable[[SyntheticSubject, DoseSchedule, np.ndarray], pd.DataFrame]
    measure: Callable[[SyntheticSubject, DoseSchedule], dict[str, np.ndarray]]
    render: Callable[[SyntheticSubject, pd.Series], tuple[np.ndarray, np.ndarray, dict[str, float]]]
    change_column: str
    view: str


_SIMULATORS: dict[str, _Simulator] = {
    "mammo2d": _Simulator(
        mammo2d.Mammo2DConfig,
        mammo2d.sample_mammo2d_subject,
        mammo2d.mammo2d_truth,
        mammo2d.mammo2d_measure,
        mammo2d.mammo2d_render,
        "lesion_diameter_mm",
        "CC",
    ),
    "mri_roi3d": _Simulator(
        mri_roi3d.MRIROI3DConfig,
        mri_roi3d.sample_mri_roi3d_subject,
        mri_roi3d.mri_roi3d_truth,
        mri_roi3d.mri_roi3d_measure,
        mri_roi3d.mri_roi3d_render,
        "atrophy_mm",
        "T1w",
    ),
}
#: The simulator names.
KINDS: tuple[str, ...] = tuple(_SIMULATORS)


def _simulator(kind: str) -> _Simulator:
    if kind not in _SIMULATORS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    return _SIMULATORS[kind]


def _check_config(kind: str, config: Any) -> Any:
    sim = _simulator(kind)
    if config is None:
        return sim.config()
    if not isinstance(config, sim.config):
        raise TypeError(f"config for {kind!r} must be a {sim.config.__name__}, got {type(config).__name__}.")
    return config


def simulate_subject(kind: Kind, index: int, seed: int = 0, config: Any = None) -> SyntheticSubject:
    """Draw the plan of one subject (cheap: no images are rendered).

    Args:
        kind: ``"mammo2d"`` or ``"mri_roi3d"``.
        index: subject number; ``(seed, index)`` fixes the subject whatever the cohort size.
        seed: cohort seed.
        config: a :class:`~monai_twin.data.synthetic.Mammo2DConfig` or
            :class:`~monai_twin.data.synthetic.MRIROI3DConfig`; default settings when ``None``.

    Example::

        subject = simulate_subject("mammo2d", 0, seed=7)
        visits = resimulate(subject)  # the images as acquired
    """
    config = _check_config(kind, config)
    return _simulator(kind).sample(index, seed, config)


def _changed(kind: str, subject: SyntheticSubject, truth: pd.DataFrame) -> tuple[np.ndarray, pd.Series]:
    values = truth[_simulator(kind).change_column].to_numpy(dtype=np.float64)
    change = np.concatenate([[np.nan], np.abs(np.diff(values))])
    flags = pd.array([pd.NA] + list(change[1:] >= subject.config.change_threshold_mm), dtype="boolean")
    return change, pd.Series(flags, index=truth.index)


def subject_truth(
    subject: SyntheticSubject, edited_events: pd.DataFrame | None = None, days: Sequence[float] | None = None
) -> pd.DataFrame:
    """True quantities of a subject at its visits (or at ``days``) without rendering any image.

    Cheap enough to run over a whole cohort (e.g. to check dose monotonicity). Columns: see the
    simulator module (``mammo2d_truth`` / ``mri_roi3d_truth``) plus ``change_mm`` (absolute change
    of the tracked quantity since the previous row) and ``changed`` (``change_mm >=`` the
    configured threshold; missing on the first row).

    Args:
        subject: the subject.
        edited_events: an events table whose drug rows replace the subject's schedule; ``None``
            keeps the recorded schedule.
        days: times (days since the first visit); default the visit days.
    """
    sim = _simulator(subject.kind)
    schedule = schedule_from_events(subject, edited_events)
    at = subject.visit_days if days is None else np.asarray(days, dtype=np.float64)
    truth = sim.truth(subject, schedule, at)
    truth["change_mm"], truth["changed"] = _changed(subject.kind, subject, truth)
    return truth


def _acquisition_for(subject: SyntheticSubject, k: int) -> AcquisitionTransform:
    if k < len(subject.acquisitions):
        return subject.acquisitions[k]
    # extra times (e.g. a forecast date): a fresh acquisition from a stream of its own
    rng = np.random.default_rng([subject.seed, subject.index, 3, k])
    module = mammo2d if subject.kind == "mammo2d" else mri_roi3d
    return module.sample_visit_acquisition(rng, subject.config)


def _render_visit(subject: SyntheticSubject, row: pd.Series, k: int):
    sim = _simulator(subject.kind)
    aligned, mask, extra = sim.render(subject, row)
    transform = _acquisition_for(subject, k)
    displacement = transform.displacement()
    acquired = apply_acquisition(aligned, transform, intensity_range=1.0, displacement=displacement)
    positions = identity_grid(aligned.shape) + displacement
    mask_acquired = warp(mask.astype(np.float32), positions, order=0).astype(np.uint8)
    return aligned, acquired, mask_acquired, extra, transform, displacement


def resimulate(
    subject: SyntheticSubject, edited_events: pd.DataFrame | None = None, days: Sequence[float] | None = None
) -> SyntheticVisits:
    """Re-run a subject, optionally under an edited drug history: the true counterfactual.

    Anatomy, acquisitions and every noise draw are those of the original subject; only the drug
    schedule (and hence growth/atrophy, the images and the measured labs) changes. With
    ``edited_events=None`` the result is exactly what :func:`write_cohort` wrote for the subject.

    Args:
        subject: the subject (:func:`simulate_subject` or :func:`load_subject`).
        edited_events: an events table (``time``, ``code``, ``numeric_value``; ``time`` as
            datetimes or days since the first visit) whose drug rows define the new schedule:
            ``<drug>//START`` / ``//STOP`` events as recorded, or rows with the bare drug code,
            each a dose (mg/day) from its time on, 0 = stop; a table without drug rows means never
            treated. Other rows are measurements and are ignored.
        days: times to image (days since the first visit); default the visit days. Times past
            the last visit get acquisitions of their own.

    Returns:
        a :class:`SyntheticVisits` with ``images`` ``(T, *spatial)``, ``aligned``, ``masks``,
        ``truth`` and the ``events`` table that would have been recorded.

    Example::

        subject = load_subject("cohort/", "P0003")
        events = resimulate(subject).events
        events = events.assign(time=subject.to_days(events["time"]))
        halved = pd.DataFrame(edit_events(events, subject.drug_code, scale=0.5))  # monai_twin.data.edit_events
        what_if = resimulate(subject, halved)
    """
    sim = _simulator(subject.kind)
    schedule = schedule_from_events(subject, edited_events)
    at = subject.visit_days if days is None else np.asarray(days, dtype=np.float64).reshape(-1)
    truth = sim.truth(subject, schedule, at)
    truth["change_mm"], truth["changed"] = _changed(subject.kind, subject, truth)
    aligned, images, masks, extras = [], [], [], []
    for k in range(len(at)):
        a, img, m, extra, _, _ = _render_visit(subject, truth.iloc[k], k)
        aligned.append(a)
        images.append(img)
        masks.append(m)
        extras.append(extra)
    for key in extras[0] if extras else ():
        truth[key] = [e[key] for e in extras]
    events = build_events(subject, schedule, sim.measure(subject, schedule))
    return SyntheticVisits(
        days=np.asarray(at, dtype=np.float64),
        images=np.stack(images),
        aligned=np.stack(aligned),
        masks=np.stack(masks),
        truth=truth,
        events=events,
    )


# ------------------------------------------------------------------------------------------------
# writing a cohort


def _config_to_json(config: Any) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()}


def _config_from_json(kind: str, values: dict[str, Any]) -> Any:
    cls = _simulator(kind).config
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if k in names})


def _write_subject(args: tuple[str, int, int, Any, str, bool]) -> dict[str, pd.DataFrame]:
    kind, index, seed, config, out, save_aligned = args
    sim = _simulator(kind)
    subject = sim.sample(index, seed, config)
    out_dir = Path(out)
    truth = subject_truth(subject)
    sid = subject.subject_id
    spacing = [config.spacing] * len(config.spatial_shape)
    ndim = len(config.spatial_shape)
    rows: dict[str, list] = {k: [] for k in ("image", "mask", "displacement", "gain", "aligned", "acquisition")}
    extras: list[dict[str, float]] = []
    for k in range(subject.n_visits):
        aligned, acquired, mask, extra, transform, displacement = _render_visit(subject, truth.iloc[k], k)
        extras.append(extra)
        stem = f"v{k:02d}"
        image_rel = f"images/{sid}/{stem}.nii.gz"
        mask_rel = f"masks/{sid}/{stem}.nii.gz"
        disp_rel = f"transforms/{sid}/{stem}_displacement.nii.gz"
        write_nifti_deterministic(out_dir / image_rel, acquired, spacing, np.int16, quantum=_IMAGE_QUANTUM)
        write_nifti_deterministic(out_dir / mask_rel, mask, spacing, np.uint8)
        # NIfTI vector fields put the components on the fifth axis: (X, Y, Z, 1, ndim)
        disp = np.moveaxis(displacement, 0, -1)
        disp = disp.reshape(config.spatial_shape + (1,) * (3 - ndim) + (1, ndim))
        write_nifti_deterministic(
            out_dir / disp_rel, disp, spacing, np.int16, intent="vector", quantum=_DISPLACEMENT_QUANTUM
        )
        gain_rel = None
        if transform.bias_coefficients:
            gain_rel = f"transforms/{sid}/{stem}_gain.nii.gz"
            write_nifti_deterministic(
                out_dir / gain_rel, transform.gain_field(), spacing, np.int16, quantum=_GAIN_QUANTUM
            )
        aligned_rel = None
        if save_aligned:
            aligned_rel = f"aligned/{sid}/{stem}.nii.gz"
            write_nifti_deterministic(out_dir / aligned_rel, aligned, spacing, np.int16, quantum=_IMAGE_QUANTUM)
        for key, value in (
            ("image", image_rel),
            ("mask", mask_rel),
            ("displacement", disp_rel),
            ("gain", gain_rel),
            ("aligned", aligned_rel),
            ("acquisition", transform.to_json()),
        ):
            rows[key].append(value)
    dates = subject.dates()
    visits = pd.DataFrame(
        {
            "subject_id": pd.Series([sid] * subject.n_visits, dtype="string"),
            "time": dates,
            "image": pd.Series(rows["image"], dtype="string"),
            "mask": pd.Series(rows["mask"], dtype="string"),
            "view": pd.Series([sim.view] * subject.n_visits, dtype="string"),
        }
    )
    truth.insert(0, "subject_id", pd.Series([sid] * subject.n_visits, dtype="string"))
    truth.insert(1, "visit", np.arange(subject.n_visits, dtype=np.int64))
    truth.insert(2, "time", dates)
    for key in extras[0]:
        truth[key] = [e[key] for e in extras]
    for key in ("image", "mask", "displacement", "gain", "aligned", "acquisition"):
        truth[key] = pd.Series(rows[key], dtype="string")
    for key, value in subject.latent.items():
        if isinstance(value, str):
            truth[key] = pd.Series([value] * subject.n_visits, dtype="string")
    events = build_events(subject, subject.schedule, sim.measure(subject, subject.schedule))
    static = pd.DataFrame([{"subject_id": sid, **subject.static}]).astype({"subject_id": "string"})
    return {"visits": visits, "events": events, "static": static, "truth": truth}


def _write_table(frame: pd.DataFrame, path: Path) -> None:
    from ...utils.io import atomic_output_path

    with atomic_output_path(path) as tmp:
        # no index, no row-group statistics that could vary: the bytes follow the data
        frame.to_parquet(tmp, index=False, engine="pyarrow", compression="zstd")


def write_cohort(
    kind: Kind,
    out_dir: str | os.PathLike,
    n_subjects: int,
    seed: int = 0,
    config: Any = None,
    *,
    workers: int = 1,
    progress: bool = False,
    save_aligned: bool = False,
) -> Path:
    """Simulate ``n_subjects`` subjects and write them as a manifest folder with its truth.

    Args:
        kind: ``"mammo2d"`` or ``"mri_roi3d"``.
        out_dir: destination folder; it must not exist or be empty (nothing is ever overwritten).
        n_subjects: number of subjects (ids ``P0000`` ... ``P{n-1}``), >= 1.
        seed: cohort seed: the same seed and settings give byte-identical files.
        config: simulator settings (default settings when ``None``).
        workers: processes to simulate with; the output does not depend on it.
        progress: show a tqdm progress bar.
        save_aligned: also write the noise-free aligned renders under ``aligned/`` (they are
            always reproducible with :func:`resimulate`).

    Returns:
        the folder.

    Example::

        folder = write_cohort("mammo2d", "cohort/", n_subjects=20, seed=0)
        manifest = monai_twin.data.load_manifest(folder)
        truth = pandas.read_parquet(folder / "truth.parquet")
    """
    config = _check_config(kind, config)
    if not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise ValueError(f"n_subjects must be a positive integer, got {n_subjects!r}.")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}.")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"out_dir {str(out)!r} exists and is not an empty folder; choose a new folder.")
    out.mkdir(parents=True, exist_ok=True)
    if kind == "mri_roi3d":
        mri_roi3d._templates()  # load once here, so forked workers share it
    jobs = [(kind, i, int(seed), config, str(out), bool(save_aligned)) for i in range(int(n_subjects))]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"synth {kind}", unit="subject")
    results = []
    if workers == 1:
        for job in jobs:
            results.append(_write_subject(job))
            if bar is not None:
                bar.update()
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else None)
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(_write_subject, jobs, chunksize=1):  # map keeps the subject order
                results.append(result)
                if bar is not None:
                    bar.update()
    if bar is not None:
        bar.close()
    for name in ("visits", "events", "static", "truth"):
        frame = pd.concat([r[name] for r in results], ignore_index=True)
        _write_table(frame, out / f"{name}.parquet")
    meta = {
        "kind": kind,
        "seed": int(seed),
        "n_subjects": int(n_subjects),
        "config": _config_to_json(config),
        "changed": {
            "column": _simulator(kind).change_column,
            "threshold_mm": config.change_threshold_mm,
            "rule": "changed = |value(visit) - value(previous visit)| >= threshold_mm; missing on first visits",
        },
        "displacement_convention": "acquired(p) = gain(p) * aligned(p + u(p)) + noise; u in voxels, array-index order",
        "drug_code": mammo2d.DRUG_CODE if kind == "mammo2d" else mri_roi3d.DRUG_CODE,
    }
    from ...utils.io import atomic_write_text

    atomic_write_text(out / "cohort.json", json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def load_subject(folder: str | os.PathLike, subject_id: str) -> SyntheticSubject:
    """Re-create a subject of a written cohort from its ``cohort.json`` (for :func:`resimulate`).

    Args:
        folder: the cohort folder written by :func:`write_cohort`.
        subject_id: e.g. ``"P0003"``.

    Raises:
        FileNotFoundError: ``folder`` holds no ``cohort.json``.
        ValueError: ``subject_id`` is not a subject of the cohort.
    """
    meta_path = Path(folder) / "cohort.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no cohort.json in {folder}; is it a folder written by write_cohort?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    sid = str(subject_id)
    if not (sid.startswith("P") and sid[1:].isdigit() and int(sid[1:]) < meta["n_subjects"]):
        raise ValueError(f"subject_id {sid!r} is not in the cohort (P0000 .. P{meta['n_subjects'] - 1:04d}).")
    config = _config_from_json(meta["kind"], meta["config"])
    return simulate_subject(meta["kind"], int(sid[1:]), meta["seed"], config)
