from __future__ import annotations

from .twin_forecaster import CONDITIONING, TwinForecaster

__all__ = ["CONDITIONING", "TwinForecaster"]
