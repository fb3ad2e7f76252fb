"""Networks for forecasting twins (pure tensors in, tensors out)."""

from __future__ import annotations

from .blocks import ConvLSTM, ConvLSTMCell, EHREncoder, FiLM, STFiLM
from .diffusion import AutoencoderKLLoss, LatentDiffusionTwin, TwinConditionEncoder, autoencoder_config
from .nets import (
    CHANGE_MODELS,
    CONDITIONING,
    VIVIT_CONDITIONING,
    CVAEGANRefiner,
    CVAEGANTrainingStep,
    ForecastOutputs,
    RefinedTwin,
    TwinForecaster,
    ViViTTwin,
    warp_image,
)

__all__ = [
    "AutoencoderKLLoss",
    "CHANGE_MODELS",
    "CONDITIONING",
    "CVAEGANRefiner",
    "CVAEGANTrainingStep",
    "ConvLSTM",
    "ConvLSTMCell",
    "EHREncoder",
    "FiLM",
    "ForecastOutputs",
    "LatentDiffusionTwin",
    "RefinedTwin",
    "STFiLM",
    "TwinConditionEncoder",
    "TwinForecaster",
    "VIVIT_CONDITIONING",
    "ViViTTwin",
    "autoencoder_config",
    "warp_image",
]
