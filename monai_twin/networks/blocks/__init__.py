from __future__ import annotations

from .convlstm import ConvLSTM, ConvLSTMCell
from .ehr_encoder import EHREncoder
from .film import FiLM, STFiLM

__all__ = ["ConvLSTM", "ConvLSTMCell", "EHREncoder", "FiLM", "STFiLM"]
