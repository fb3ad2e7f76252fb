"""Forecasting and what-if inference."""

from __future__ import annotations

from .forecast import ForecastInferer, save_forecast_panel_png
from .whatif import WhatIfInferer, edit_events, save_what_if_png

__all__ = ["ForecastInferer", "WhatIfInferer", "edit_events", "save_forecast_panel_png", "save_what_if_png"]
from .diffusion import (
    DIFFUSION_CONDITION_KEYS,
    DIFFUSION_OPTIONAL_KEYS,
    LatentTwinInferer,
    TwinDiffusionInferer,
    make_scheduler,
    save_forecast_png,
)

__all__ += [
    "DIFFUSION_CONDITION_KEYS",
    "DIFFUSION_OPTIONAL_KEYS",
    "LatentTwinInferer",
    "TwinDiffusionInferer",
    "make_scheduler",
    "save_forecast_png",
]
