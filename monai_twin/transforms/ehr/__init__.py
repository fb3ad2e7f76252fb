"""EHR-to-tensor transforms: static attributes, per-interval features and time-aware event tokens.

Fit an :class:`EHRVocabulary` on the training subjects, save it as JSON, and build the array or
dictionary transforms from it (or from the JSON path) so inference encodes exactly as training.
"""

from __future__ import annotations

from .array import EHRStaticToTensor, EHRToEventTokens, EHRToIntervalFeatures
from .dictionary import (
    EHRStaticToTensorD,
    EHRStaticToTensord,
    EHRStaticToTensorDict,
    EHRToEventTokensD,
    EHRToEventTokensd,
    EHRToEventTokensDict,
    EHRToIntervalFeaturesD,
    EHRToIntervalFeaturesd,
    EHRToIntervalFeaturesDict,
)
from .functional import (
    REDUCERS,
    IntervalFeatureTable,
    interval_feature_names,
    interval_feature_table,
    static_feature_names,
)
from .future import EHRFutureValues, EHRFutureValuesD, EHRFutureValuesd, EHRFutureValuesDict
from .vocabulary import OOV_INDEX, PAD_INDEX, EHRVocabulary
from .whatif import EditEventsD, EditEventsd, EditEventsDict

__all__ = [
    "EHRFutureValues",
    "EHRFutureValuesD",
    "EHRFutureValuesDict",
    "EHRFutureValuesd",
    "OOV_INDEX",
    "PAD_INDEX",
    "REDUCERS",
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
    "EditEventsD",
    "EditEventsDict",
    "EditEventsd",
    "IntervalFeatureTable",
    "interval_feature_names",
    "interval_feature_table",
    "static_feature_names",
]
