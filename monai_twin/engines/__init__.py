"""Glue between MONAI's engines and the twins."""

from __future__ import annotations

from .evaluators import ForecastEvaluator, WhatIfEvaluator
from .forecast import ForecastLoss, ForecastTrainer, masked_mse, train_forecaster
from .prepare_batch import FORECAST_CONDITION_KEYS, ForecastPrepareBatch

__all__ = [
    "FORECAST_CONDITION_KEYS",
    "ForecastEvaluator",
    "ForecastLoss",
    "ForecastPrepareBatch",
    "ForecastTrainer",
    "WhatIfEvaluator",
    "masked_mse",
    "train_forecaster",
]
from .diffusion import (
    DiffusionTwinPrepareBatch,
    encode_latents,
    null_ehr_sample,
    train_autoencoder,
    train_diffusion_twin,
    twin_conditions,
)

__all__ += [
    "DiffusionTwinPrepareBatch",
    "encode_latents",
    "null_ehr_sample",
    "train_autoencoder",
    "train_diffusion_twin",
    "twin_conditions",
]
