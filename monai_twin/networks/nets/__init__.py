from __future__ import annotations

from .cvae_gan import CVAEGANRefiner, CVAEGANTrainingStep, RefinedTwin
from .twin_forecaster import CHANGE_MODELS, CONDITIONING, ForecastOutputs, TwinForecaster, warp_image
from .vivit_twin import VIVIT_CONDITIONING, ViViTTwin

__all__ = [
    "CHANGE_MODELS",
    "CONDITIONING",
    "CVAEGANRefiner",
    "CVAEGANTrainingStep",
    "ForecastOutputs",
    "RefinedTwin",
    "TwinForecaster",
    "VIVIT_CONDITIONING",
    "ViViTTwin",
    "warp_image",
]
