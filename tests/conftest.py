"""Shared fixtures: a small on-the-fly NIfTI cohort and the MIMIC-IV demo location."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

# Tests use both cores at most; torch must not oversubscribe when DataLoader workers run.
os.environ.setdefault("OMP_NUM_THREADS", "2")

MIMIC_DIR = Path(
    os.environ.get(
        "MONAI_TWIN_MIMIC_DIR", Path(__file__).resolve().parents[2] / "shared" / "data" / "mimic-iv-demo-2.2"
    )
)


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> Path:
    import nibabel as nib

    affine = np.diag([*spacing[: array.ndim], 1.0]) if array.ndim == 3 else np.diag([*spacing[:2], 1.0, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(path))
    return path


def make_nifti_cohort(root: Path, n_subjects: int = 6, seed: int = 0, shape=(16, 16, 8)) -> dict[str, pd.DataFrame]:
    """A small cohort on disk: 3-5 visits per subject at irregular dates, a growing blob per
    subject, labs and a drug between visits, sex/birth-year statics. Returns the three tables
    (image paths relative to ``root``)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    visits, events, static = [], [], []
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    for i in range(n_subjects):
        sid = f"S{i:03d}"
        n_visits = int(rng.integers(3, 6))
        start = pd.Timestamp("2030-01-01") + pd.Timedelta(days=int(rng.integers(0, 400)))
        gaps = rng.integers(60, 400, size=n_visits - 1)
        dates = [start] + [start + pd.Timedelta(days=int(d)) for d in np.cumsum(gaps)]
        centre = np.array(shape) / 2 + rng.normal(0, 1, size=3)
        radius = 2.0
        for j, date in enumerate(dates):
            radius *= 1.0 + rng.uniform(0.0, 0.3)
            dist = np.sqrt(((grid - centre[:, None, None, None]) ** 2).sum(0))
            img = (dist < radius).astype(np.float32) + rng.normal(0, 0.05, size=shape)
            rel = Path("images") / f"{sid}_v{j}.nii.gz"
            write_nifti(root / rel, img)
            mask_rel = Path("images") / f"{sid}_v{j}_mask.nii.gz"
            write_nifti(root / mask_rel, (dist < radius).astype(np.float32))
            visits.append(
                {
                    "subject_id": sid,
                    "time": date.strftime("%Y-%m-%d %H:%M:%S"),
                    "image": str(rel),
                    "mask": str(mask_rel),
                    "view": "CC",
                }
            )
            events.append(
                {
                    "subject_id": sid,
                    "time": (date + pd.Timedelta(hours=2)).isoformat(sep=" "),
                    "code": "LAB//CA15-3",
                    "numeric_value": float(20 + 10 * radius),
                    "text_value": None,
                    "unit": "U/mL",
                }
            )
            events.append(
                {
                    "subject_id": sid,
                    "time": (date + pd.Timedelta(days=7)).isoformat(sep=" "),
                    "code": "DRUG//tamoxifen",
                    "numeric_value": float(rng.choice([0.0, 10.0, 20.0])),
                    "text_value": None,
                    "unit": "mg",
                }
            )
        events.append(
            {
                "subject_id": sid,
                "time": None,
                "code": "GENOTYPE//BRCA1",
                "numeric_value": np.nan,
                "text_value": rng.choice(["positive", "negative"]),
                "unit": None,
            }
        )
        static.append({"subject_id": sid, "sex": "F", "birth_year": int(rng.integers(1950, 1990))})
    tables = {"visits": pd.DataFrame(visits), "events": pd.DataFrame(events), "static": pd.DataFrame(static)}
    return tables


@pytest.fixture
def nifti_cohort(tmp_path) -> Path:
    """A cohort folder with visits.csv, events.csv, static.csv and NIfTI images."""
    root = tmp_path / "cohort"
    tables = make_nifti_cohort(root)
    for name, frame in tables.items():
        frame.to_csv(root / f"{name}.csv", index=False)
    return root


@pytest.fixture(scope="session")
def mimic_dir() -> Path:
    if not (MIMIC_DIR / "hosp" / "labevents.csv.gz").is_file():
        pytest.skip(f"MIMIC-IV demo tables not found at {MIMIC_DIR} (set MONAI_TWIN_MIMIC_DIR to their folder)")
    return MIMIC_DIR


@pytest.fixture
def one_thread():
    """Tiny networks and training tests run on one thread: on a shared, loaded CPU a second thread
    gains nothing and can cost several-fold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_mammo_cohort(folder, n_subjects: int, seed: int):
    """A 32² mammography cohort with aligned copies of its scans: ``(folder, items, vocabulary)``
    with one-visit histories and an EHR vocabulary fitted on every subject."""
    from monai_twin.data import build_longitudinal_items, load_manifest
    from monai_twin.data.synthetic import Mammo2DConfig, write_cohort
    from monai_twin.transforms.ehr import EHRVocabulary

    folder = write_cohort("mammo2d", folder, n_subjects, seed, Mammo2DConfig(size=32), save_aligned=True)
    manifest = load_manifest(folder, check_images="exists")
    vocabulary = EHRVocabulary.fit(manifest.events, manifest.static)
    return folder, build_longitudinal_items(manifest, max_history=1), vocabulary


def aligned_scan(path):
    """The aligned copy (``aligned/``) of a cohort scan (``images/``) as a ``(1, *spatial)`` tensor."""
    import nibabel as nib
    import torch

    aligned = str(path).replace("/images/", "/aligned/")
    return torch.from_numpy(np.asarray(nib.load(aligned).get_fdata(dtype=np.float32)))[None]
