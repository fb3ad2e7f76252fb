"""Synthetic longitudinal cohorts with known truth: the testbed every twin is measured on.

Two simulators whose dynamics are explicit equations driven by EHR variables:

* ``mammo2d`` -- CC-view-like mammograms; a mass grows by a Gompertz law slowed by cumulative
  drug exposure; a CA 15-3-like marker is the future-EHR target (:mod:`.mammo2d`).
* ``mri_roi3d`` -- a medial-temporal ROI of the MNI ICBM152 brain (real anatomy, bundled with
  nilearn); atrophy driven by age, an APOE4-like flag, an amyloid-like lab and a drug; an
  MMSE-like score is the future-EHR target (:mod:`.mri_roi3d`).

Each visit is acquired through a recorded transform (:mod:`.acquisition`); cohorts are written as
manifest folders with a truth table (:func:`write_cohort`), and any subject can be re-run under
edited EHR (:func:`resimulate`) for what-if scoring. :func:`copy_last_baseline` gives the bar a
forecaster must clear.

Example::

    from monai_twin.data import load_manifest
    from monai_twin.data.synthetic import load_subject, resimulate, write_cohort

    folder = write_cohort("mammo2d", "cohort/", n_subjects=50, seed=0)
    manifest = load_manifest(folder)
    what_if = resimulate(load_subject(folder, "P0001"), edited_events)
"""

from __future__ import annotations

from .acquisition import (
    AcquisitionTransform,
    apply_acquisition,
    invert_acquisition,
    invert_displacement,
    sample_acquisition,
)
from .baseline import copy_last_baseline, summarise_by_change
from .cohort import KINDS, load_subject, resimulate, simulate_subject, subject_truth, write_cohort
from .mammo2d import Mammo2DConfig
from .mri_roi3d import MRIROI3DConfig
from .subject import DoseSchedule, LabPlan, SyntheticSubject, SyntheticVisits

__all__ = [
    "KINDS",
    "AcquisitionTransform",
    "DoseSchedule",
    "LabPlan",
    "MRIROI3DConfig",
    "Mammo2DConfig",
    "SyntheticSubject",
    "SyntheticVisits",
    "apply_acquisition",
    "copy_last_baseline",
    "invert_acquisition",
    "invert_displacement",
    "load_subject",
    "resimulate",
    "sample_acquisition",
    "simulate_subject",
    "subject_truth",
    "summarise_by_change",
    "write_cohort",
]
