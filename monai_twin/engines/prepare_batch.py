"""Batch preparation for MONAI's engines (``SupervisedTrainer`` / ``SupervisedEvaluator``) running a
forecasting twin: the history is the network input, the target scan the label, and the time and
EHR tensors travel as keyword arguments to ``network(history, **kwargs)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.engines.utils import PrepareBatch

__all__ = ["FORECAST_CONDITION_KEYS", "ForecastPrepareBatch"]

#: Batch keys passed to the forecaster as keyword arguments when present.
FORECAST_CONDITION_KEYS = ("times", "history_mask", "ehr_intervals", "ehr_intervals_mask", "ehr_static")


class ForecastPrepareBatch(PrepareBatch):
    """``batch -> (history, target, (), {times, history_mask, ehr_...})`` for MONAI's engines.

    Args:
        image_key: the stacked history ``(B, T, C, *spatial)``.
        target_key: the scan to forecast ``(B, C, *spatial)``; ``None`` at inference.
        condition_keys: batch keys forwarded as keyword arguments (absent ones are skipped;
            ``times`` is required).

    Example::

        trainer = SupervisedTrainer(..., network=TwinForecaster(...), prepare_batch=ForecastPrepareBatch())
    """

    def __init__(
        self,
        image_key: str = "history",
        target_key: str | None = "target",
        condition_keys: Sequence[str] = FORECAST_CONDITION_KEYS,
    ) -> None:
        self.image_key = image_key
        self.target_key = target_key
        self.condition_keys = tuple(condition_keys)

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None, tuple, dict[str, torch.Tensor]]:
        for key in (self.image_key, "times"):
            if key not in batchdata:
                raise KeyError(f"ForecastPrepareBatch: the batch has no {key!r} (keys: {sorted(batchdata)}).")

        def move(value: Any, key: str) -> torch.Tensor:
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"ForecastPrepareBatch: batch[{key!r}] is a {type(value).__name__}, expected a stacked tensor "
                    "(pad histories with PadSequenced so samples share T)."
                )
            return value.to(device=device, non_blocking=non_blocking, **kwargs)

        history = move(batchdata[self.image_key], self.image_key)
        target = None
        if self.target_key is not None and self.target_key in batchdata:
            target = move(batchdata[self.target_key], self.target_key)
        conditions = {k: move(batchdata[k], k) for k in self.condition_keys if k in batchdata}
        return history, target, (), conditions
