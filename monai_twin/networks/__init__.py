"""Networks for forecasting twins (pure tensors in, tensors out)."""

from __future__ import annotations

from .blocks import ConvLSTM, ConvLSTMCell, EHREncoder, FiLM, STFiLM
from .nets import (
    CONDITIONING,
    VIVIT_CONDITIONING,
    CVAEGANRefiner,
    CVAEGANTrainingStep,
    RefinedTwin,
    TwinForecaster,
    ViViTTwin,
)

__all__ = [
    "CONDITIONING",
    "CVAEGANRefiner",
    "CVAEGANTrainingStep",
    "ConvLSTM",
    "ConvLSTMCell",
    "EHREncoder",
    "FiLM",
    "RefinedTwin",
    "STFiLM",
    "TwinForecaster",
    "VIVIT_CONDITIONING",
    "ViViTTwin",
]
