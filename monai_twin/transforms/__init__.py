"""monai_twin transforms, MONAI-style: array transforms and their dictionary (``...d``) wrappers."""

from __future__ import annotations

from .ehr import (
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

__all__ = [
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
]
