"""Ignite handlers for MONAI's engines running a twin: writing forecasts and what-if results."""

from __future__ import annotations

from .forecast_writer import ForecastWriter

__all__ = ["ForecastWriter"]
