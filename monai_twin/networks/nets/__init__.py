from __future__ import annotations

from .cvae_gan import CVAEGANRefiner, CVAEGANTrainingStep, RefinedTwin
from .twin_forecaster import CONDITIONING, TwinForecaster
from .vivit_twin import VIVIT_CONDITIONING, ViViTTwin

__all__ = [
    "CONDITIONING",
    "CVAEGANRefiner",
    "CVAEGANTrainingStep",
    "RefinedTwin",
    "TwinForecaster",
    "VIVIT_CONDITIONING",
    "ViViTTwin",
]
