"""monai_twin transforms, MONAI-style: array transforms and their dictionary (``...d``) wrappers.

- :mod:`.ehr` -- EHR tables to tensors (fitted vocabulary, interval features, event tokens, static)
- :mod:`.registration` -- longitudinal registration (SimpleITK, learned VoxelMorph) and its QC
- :mod:`.sequence` -- load a visit history as one tensor, pad per-visit keys
"""

from __future__ import annotations

from .ehr import (
    EHRFutureValues,
    EHRFutureValuesD,
    EHRFutureValuesd,
    EHRFutureValuesDict,
    EHRStaticToTensor,
    EHRStaticToTensorD,
    EHRStaticToTensord,
    EHRStaticToTensorDict,
    EHRToEventTokens,
    EHRToEventTokensD,
    EHRToEventTokensd,
    EHRToEventTokensDict,
    EHRToIntervalFeatures,
    EHRToIntervalFeaturesD,
    EHRToIntervalFeaturesd,
    EHRToIntervalFeaturesDict,
    EHRVocabulary,
)
from .registration import (
    Register,
    RegisterD,
    Registerd,
    RegisterDict,
    RegisterSequence,
    RegisterSequenceD,
    RegisterSequenced,
    RegisterSequenceDict,
    RegistrationQuality,
    RegistrationQualityD,
    RegistrationQualityd,
    RegistrationQualityDict,
)
from .sequence import (
    LoadSequence,
    LoadSequenceD,
    LoadSequenced,
    LoadSequenceDict,
    PadSequence,
    PadSequenceD,
    PadSequenced,
    PadSequenceDict,
)

__all__ = [
    "EHRFutureValues",
    "EHRFutureValuesD",
    "EHRFutureValuesDict",
    "EHRFutureValuesd",
    "EHRStaticToTensor",
    "EHRStaticToTensorD",
    "EHRStaticToTensorDict",
    "EHRStaticToTensord",
    "EHRToEventTokens",
    "EHRToEventTokensD",
    "EHRToEventTokensDict",
    "EHRToEventTokensd",
    "EHRToIntervalFeatures",
    "EHRToIntervalFeaturesD",
    "EHRToIntervalFeaturesDict",
    "EHRToIntervalFeaturesd",
    "EHRVocabulary",
    "LoadSequence",
    "LoadSequenceD",
    "LoadSequenceDict",
    "LoadSequenced",
    "PadSequence",
    "PadSequenceD",
    "PadSequenceDict",
    "PadSequenced",
    "Register",
    "RegisterD",
    "RegisterDict",
    "RegisterSequence",
    "RegisterSequenceD",
    "RegisterSequenceDict",
    "RegisterSequenced",
    "Registerd",
    "RegistrationQuality",
    "RegistrationQualityD",
    "RegistrationQualityDict",
    "RegistrationQualityd",
]
