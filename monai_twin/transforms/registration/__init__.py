"""Longitudinal registration: bring every visit of a patient into one frame before modelling change.

Pairwise (:class:`Register` / :class:`Registerd`) and sequence-level (:class:`RegisterSequence` /
:class:`RegisterSequenced`) transforms compute a registration with SimpleITK (rigid, affine,
demons variants, B-spline), resample onto the reference grid and record the transform in the
MetaTensor so it can be inverted, read back (:func:`registration_displacement`) and re-applied
to masks and labels. :class:`RegistrationQuality` / :class:`RegistrationQualityd` score the result
and apply a policy. The learned VoxelMorph model lives in :mod:`.learned` (imported on demand).
"""

from __future__ import annotations

from .array import Register, RegisterSequence, RegistrationError, registration_displacement, registration_record
from .dictionary import (
    RegisterD,
    Registerd,
    RegisterDict,
    RegisterSequenceD,
    RegisterSequenced,
    RegisterSequenceDict,
    RegistrationQualityD,
    RegistrationQualityd,
    RegistrationQualityDict,
)
from .quality import (
    DEFAULT_THRESHOLDS,
    POLICIES,
    QualityThresholds,
    RegistrationQuality,
    RegistrationQualityError,
    pair_quality,
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "POLICIES",
    "QualityThresholds",
    "Register",
    "RegisterD",
    "RegisterDict",
    "RegisterSequence",
    "RegisterSequenceD",
    "RegisterSequenceDict",
    "RegisterSequenced",
    "Registerd",
    "RegistrationError",
    "RegistrationQuality",
    "RegistrationQualityD",
    "RegistrationQualityDict",
    "RegistrationQualityError",
    "RegistrationQualityd",
    "pair_quality",
    "registration_displacement",
    "registration_record",
]
