"""Figures a person looks at first: one subject's scans over time above its EHR.

Built on matplotlib (Agg backend, no display needed) and nibabel/SimpleITK through MONAI's
``LoadImage`` for reading any image format the manifest accepts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..data.manifest import LongitudinalManifest

__all__ = ["middle_slice", "plot_subject_timeline"]


def middle_slice(image: np.ndarray) -> np.ndarray:
    """A 2D view of an image: the image itself if 2D, else the middle slice of the last axis.

    Args:
        image: ``(H, W)``, ``(H, W, D)`` or channel-first ``(1, H, W[, D])``.
    """
    arr = np.asarray(image)
    if arr.ndim >= 3 and arr.shape[0] == 1:
        arr = arr[0]
    while arr.ndim > 2:
        arr = arr[..., arr.shape[-1] // 2]
    return arr


def plot_subject_timeline(
    manifest: LongitudinalManifest,
    subject_id: str,
    out_png: str | os.PathLike,
    codes: Sequence[str] | None = None,
    max_visits: int = 8,
    dpi: int = 110,
) -> Path:
    """Plot a subject's scans (top row, one per visit, labelled with its day) above the time
    course of its EHR codes (bottom panel, one line per code, drug doses as steps).

    Args:
        manifest: a validated manifest.
        subject_id: the subject to plot.
        out_png: destination PNG (written to a temporary name, then renamed).
        codes: event codes to plot (default: every timed numeric code of the subject, at most 6).
        max_visits: most scans shown (the first ``max_visits``).
        dpi: resolution.

    Returns:
        the PNG path.

    Example::

        plot_subject_timeline(manifest, "P0003", "outputs/P0003_timeline.png")
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from monai.transforms import LoadImage

    from ..utils.io import atomic_output_path

    visits = manifest.subject_visits(subject_id).iloc[:max_visits]
    events = manifest.subject_events(subject_id)
    timed = events[events["time"].notna() & events["numeric_value"].notna()]
    if codes is None:
        codes = list(dict.fromkeys(timed["code"].tolist()))[:6]
    else:
        unknown = sorted(set(codes) - set(timed["code"]))
        if unknown:
            raise ValueError(f"subject {subject_id!r} has no timed numeric events with code(s) {unknown}.")
    loader = LoadImage(image_only=True)
    n = len(visits)
    fig = plt.figure(figsize=(max(2.2 * n, 6.0), 5.2))
    grid = fig.add_gridspec(2, n, height_ratios=[1.15, 1.0])
    for k, (_, row) in enumerate(visits.iterrows()):
        ax = fig.add_subplot(grid[0, k])
        view = middle_slice(np.asarray(loader(row["image"])))
        ax.imshow(np.rot90(view), cmap="gray")
        ax.set_title(f"day {row['time']:.0f}", fontsize=9)
        ax.axis("off")
    ax = fig.add_subplot(grid[1, :])
    for code in codes:
        rows = timed[timed["code"] == code]
        step = "post" if code.upper().startswith(("DRUG", "DOSE", "MED")) else None
        if step:
            ax.step(rows["time"], rows["numeric_value"], where=step, label=code)
        else:
            ax.plot(rows["time"], rows["numeric_value"], marker="o", ms=3, label=code)
    for t in visits["time"]:
        ax.axvline(t, color="0.7", lw=0.8, ls=":")
    ax.set_xlabel("days since first visit")
    ax.set_ylabel("value (own units)")
    if codes:
        ax.legend(fontsize=8, ncol=min(3, len(codes)), loc="best")
    fig.suptitle(f"subject {subject_id}: scans and EHR", fontsize=11)
    fig.tight_layout()
    with atomic_output_path(out_png) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)
    return Path(out_png)
