"""Networks for forecasting twins (pure tensors in, tensors out)."""

from __future__ import annotations

from .blocks import ConvLSTM, ConvLSTMCell, EHREncoder, FiLM, STFiLM
from .nets import CONDITIONING, TwinForecaster

__all__ = ["CONDITIONING", "ConvLSTM", "ConvLSTMCell", "EHREncoder", "FiLM", "STFiLM", "TwinForecaster"]
