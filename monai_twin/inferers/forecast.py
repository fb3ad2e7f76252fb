"""Forecast one patient at a chosen date: the predicted scan, the change from the last scan, the
future EHR values, and a PNG panel (history | forecast | change) a person can look at.

Pair it with :func:`~monai_twin.data.forecast_item`, which builds the item for any future date
(with planned events), and with the same preprocessing pipeline as at training.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..engines.prepare_batch import FORECAST_CONDITION_KEYS

__all__ = ["ForecastInferer", "save_forecast_panel_png"]


class ForecastInferer:
    """Run a twin on one item (any target date) and return the forecast and what it implies.

    Args:
        pipeline: the preprocessing applied to an item (load history, encode EHR, pad) -- without
            loading a target.
        network: a twin taking ``(history, **conditions)``; its ``forecast`` method (when present)
            also gives the future EHR values.
        device: where to run.
        clamp: clip the forecast to this intensity range (``None``: leave it).

    Returns (from ``__call__``):
        ``{"forecast": (C, *spatial), "last": (C, *spatial), "change": forecast - last,
        "future_ehr": (K,), "history": (T, C, *spatial) real visits only, "times": (T,)}``.

    Example::

        item = forecast_item(manifest, "P0003", "2034-06-01")
        result = ForecastInferer(pipeline, twin)(item)
        save_forecast_panel_png(result, "outputs/P0003_2034-06-01.png")
    """

    def __init__(
        self,
        pipeline: Callable,
        network: torch.nn.Module,
        device: str | torch.device = "cpu",
        clamp: Sequence[float] | None = (0.0, 1.0),
    ) -> None:
        self.pipeline, self.network, self.device = pipeline, network, torch.device(device)
        self.clamp = None if clamp is None else (float(clamp[0]), float(clamp[1]))

    def __call__(self, item: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        sample = self.pipeline(dict(item))
        for key in ("history", "times"):
            if key not in sample:
                raise KeyError(f"the pipeline must produce {key!r} (got {sorted(map(str, sample))}).")
        tensors = {
            k: torch.as_tensor(np.asarray(sample[k]), dtype=torch.float32).unsqueeze(0).to(self.device)
            for k in ("history", *FORECAST_CONDITION_KEYS)
            if k in sample
        }
        history = tensors.pop("history")
        self.network.eval()
        with torch.no_grad():
            if hasattr(self.network, "forecast"):
                image, future = self.network.forecast(history, **tensors)
            else:
                image, future = self.network(history, **tensors), torch.zeros(1, 0)
        if self.clamp is not None:
            image = image.clamp(*self.clamp)
        mask = tensors.get("history_mask", torch.ones(history.shape[:2], device=history.device))[0] > 0
        real = history[0][mask].cpu()
        return {
            "forecast": image[0].cpu(),
            "last": real[-1],
            "change": image[0].cpu() - real[-1],
            "future_ehr": future[0].cpu(),
            "history": real,
            "times": tensors["times"][0][mask].cpu(),
        }


def save_forecast_panel_png(
    result: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = "forecast"
) -> Path:
    """Write the history, the forecast and the change map side by side (3D: middle slice).

    Each history panel is labelled with its days before the target; the change uses a symmetric
    diverging scale so that "no change" is white. Written to a temporary name and renamed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils.io import atomic_output_path
    from ..visualize.timeline import middle_slice

    history = np.asarray(result["history"])
    times = np.asarray(result["times"])
    panels = [middle_slice(h) for h in history] + [middle_slice(np.asarray(result["forecast"]))]
    change = middle_slice(np.asarray(result["change"]))
    limit = float(np.abs(change).max()) or 1.0
    n = len(panels) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.0))
    for k, (ax, panel) in enumerate(zip(axes, panels)):
        ax.imshow(np.rot90(panel), cmap="gray", vmin=0.0, vmax=max(1.0, float(panel.max())))
        ax.set_title(f"{times[k]:.0f} d before" if k < len(history) else "forecast", fontsize=9)
    shown = axes[-1].imshow(np.rot90(change), cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes[-1].set_title("change from last", fontsize=9)
    fig.colorbar(shown, ax=axes[-1], fraction=0.046)
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_output_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
