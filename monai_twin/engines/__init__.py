"""Glue between MONAI's engines and the twins."""

from __future__ import annotations

from .prepare_batch import FORECAST_CONDITION_KEYS, ForecastPrepareBatch

__all__ = ["FORECAST_CONDITION_KEYS", "ForecastPrepareBatch"]
