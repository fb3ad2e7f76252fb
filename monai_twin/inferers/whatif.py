"""What-if questions: the same patient forecast twice, once with the recorded/planned treatment and
once with an edited one, and the difference between the two forecasts.

Both forecasts go through the same preprocessing pipeline and the same network call in one batch,
so the difference map shows the effect of the EHR edit alone. Plain forecasting needs nothing new:
MONAI's :class:`~monai.inferers.SimpleInferer` passes the condition tensors to the network as
keyword arguments (see :class:`~monai_twin.engines.ForecastPrepareBatch`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.events import edit_events
from ..engines.prepare_batch import FORECAST_CONDITION_KEYS

__all__ = ["WhatIfInferer", "edit_events", "save_what_if_png"]


class WhatIfInferer:
    """Forecast an item under its recorded events and under edited ones; return both and the difference.

    Args:
        pipeline: the preprocessing applied to an item (loads the history, encodes the EHR, pads;
            the same as at training, without loading a target).
        network: a forecaster taking ``(history, **conditions)``; when it has a ``forecast`` method
            returning ``(image, future_ehr)`` the future EHR values are returned too.
        device: where to run.

    Returns (from ``__call__``):
        ``{"baseline": (C, *spatial), "counterfactual": (C, *spatial), "difference":
        counterfactual - baseline, "baseline_ehr": (K,), "counterfactual_ehr": (K,)}``.

    Example::

        inferer = WhatIfInferer(pipeline, twin)
        item = forecast_item(manifest, "P0003", "2034-06-01")
        edited = dict(item, events=edit_events(item["events"], "DRUG//tamoxifen", scale=0.5))
        result = inferer(item, edited)
        save_what_if_png(result, "outputs/P0003_half_dose.png")
    """

    def __init__(self, pipeline: Callable, network: torch.nn.Module, device: str | torch.device = "cpu") -> None:
        self.pipeline = pipeline
        self.network = network
        self.device = torch.device(device)

    def _prepare(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sample = self.pipeline(dict(item))
        if "history" not in sample or "times" not in sample:
            raise KeyError("the pipeline must produce 'history' (T, C, *spatial) and 'times' (T,).")
        keys = ("history",) + tuple(k for k in FORECAST_CONDITION_KEYS if k in sample)
        return {k: torch.as_tensor(np.asarray(sample[k]), dtype=torch.float32) for k in keys}

    def __call__(self, item: Mapping[str, Any], edited_item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        a, b = self._prepare(item), self._prepare(edited_item)
        if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
            raise ValueError("the edited item must preprocess to the same tensors (keys and shapes) as the original.")
        batch = {k: torch.stack([a[k], b[k]]).to(self.device) for k in a}
        history = batch.pop("history")
        self.network.eval()
        with torch.no_grad():
            if hasattr(self.network, "forecast"):
                images, future = self.network.forecast(history, **batch)
            else:
                images, future = self.network(history, **batch), torch.zeros(2, 0)
        images, future = images.cpu(), future.cpu()
        return {
            "baseline": images[0],
            "counterfactual": images[1],
            "difference": images[1] - images[0],
            "baseline_ehr": future[0],
            "counterfactual_ehr": future[1],
        }


def save_what_if_png(result: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "what if") -> Path:
    """Write baseline, counterfactual and their difference side by side (3D: middle slice).

    The difference uses a symmetric diverging colour scale so that "no effect" is white.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_output_path
    from ..visualize.timeline import middle_slice

    panels = [middle_slice(np.asarray(result[k])) for k in ("baseline", "counterfactual", "difference")]
    limit = float(np.abs(panels[2]).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.6))
    for ax, panel, name in zip(axes, panels, ("forecast as planned", "forecast with the edit", "difference")):
        if name == "difference":
            shown = ax.imshow(np.rot90(panel), cmap="RdBu_r", vmin=-limit, vmax=limit)
            fig.colorbar(shown, ax=ax, fraction=0.046)
        else:
            ax.imshow(np.rot90(panel), cmap="gray")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return Path(path)
