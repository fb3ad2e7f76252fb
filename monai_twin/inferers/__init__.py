"""Forecasting and what-if inference."""

from __future__ import annotations

from .whatif import WhatIfInferer, edit_events, save_what_if_png

__all__ = ["WhatIfInferer", "edit_events", "save_what_if_png"]
from .diffusion import (
    DIFFUSION_CONDITION_KEYS,
    LatentTwinInferer,
    TwinDiffusionInferer,
    make_scheduler,
    save_forecast_png,
)

__all__ += [
    "DIFFUSION_CONDITION_KEYS",
    "LatentTwinInferer",
    "TwinDiffusionInferer",
    "make_scheduler",
    "save_forecast_png",
]
