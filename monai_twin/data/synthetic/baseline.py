"""The copy-last-scan baseline on a synthetic cohort: the bar every forecaster must clear.

The "forecast" of visit ``j`` is simply visit ``j - 1``. On longitudinal medical images this is a
strong baseline (most of the image does not change between visits), so a model's SSIM/PSNR mean
little until they are compared with it -- separately on the visits whose true change exceeded the
cohort's threshold (``changed``) and on the rest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from .acquisition import AcquisitionTransform, invert_acquisition

__all__ = ["copy_last_baseline", "summarise_by_change"]


def _load(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))


def copy_last_baseline(
    folder: str | os.PathLike,
    frame: Literal["aligned", "acquired"] = "aligned",
    subjects: list[str] | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """SSIM and PSNR of "the next scan equals the last one" for every (previous, target) visit pair.

    Metrics are MONAI's :class:`~monai.metrics.SSIMMetric` and :class:`~monai.metrics.PSNRMetric`
    with a data range of 1 (the simulators' intensity scale; images are clipped to ``[0, 1]``).

    Args:
        folder: a cohort written by :func:`~monai_twin.data.synthetic.write_cohort`.
        frame: ``"aligned"`` maps both scans back to the subject's frame with the true
            acquisition transforms (perfect registration and gain correction: what a forecaster
            sees after preprocessing); ``"acquired"`` compares the files as written.
        subjects: restrict to these subject ids.
        batch_size: pairs per metric call (memory bound).

    Returns:
        one row per pair: ``subject_id``, ``visit`` (the target), ``days`` (gap), ``changed``,
        ``change_mm``, ``ssim``, ``psnr``.

    Example::

        pairs = copy_last_baseline("cohort/")
        summarise_by_change(pairs)  # mean SSIM/PSNR on changed / unchanged / all
    """
    import torch
    from monai.metrics import PSNRMetric, SSIMMetric

    if frame not in ("aligned", "acquired"):
        raise ValueError(f"frame must be 'aligned' or 'acquired', got {frame!r}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    root = Path(folder)
    meta_path = root / "cohort.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"no cohort.json in {root}; is it a folder written by write_cohort?")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    truth = pd.read_parquet(root / "truth.parquet")
    if subjects is not None:
        truth = truth[truth["subject_id"].isin([str(s) for s in subjects])]
    truth = truth.sort_values(["subject_id", "visit"], kind="stable").reset_index(drop=True)
    spatial_dims = 2 if meta["kind"] == "mammo2d" else 3
    ssim_metric = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0)
    psnr_metric = PSNRMetric(max_val=1.0)

    def image_of(row: pd.Series) -> np.ndarray:
        image = _load(root / row["image"])
        if frame == "aligned":
            image = invert_acquisition(image, AcquisitionTransform.from_dict(row["acquisition"]))
        return np.clip(image, 0.0, 1.0)

    sid = truth["subject_id"].to_numpy(dtype=object)
    pairs = np.flatnonzero(sid[1:] == sid[:-1]) + 1  # rows whose previous row is the same subject
    records, preds, targets = [], [], []
    cache: dict[int, np.ndarray] = {}

    def flush() -> None:
        if not preds:
            return
        p = torch.from_numpy(np.stack(preds)[:, None])
        t = torch.from_numpy(np.stack(targets)[:, None])
        ssim = ssim_metric(p, t).reshape(-1).tolist()
        psnr = psnr_metric(p, t).reshape(-1).tolist()
        for record, s_val, p_val in zip(records[-len(preds) :], ssim, psnr):
            record["ssim"], record["psnr"] = float(s_val), float(p_val)
        preds.clear()
        targets.clear()

    for row in pairs:
        prev = cache.pop(row - 1, None)
        if prev is None:
            prev = image_of(truth.iloc[row - 1])
        target = image_of(truth.iloc[row])
        cache[row] = target
        changed = truth["changed"].iloc[row]
        records.append(
            {
                "subject_id": str(sid[row]),
                "visit": int(truth["visit"].iloc[row]),
                "days": float(truth["day"].iloc[row] - truth["day"].iloc[row - 1]),
                "changed": bool(changed) if not pd.isna(changed) else False,
                "change_mm": float(truth["change_mm"].iloc[row]),
            }
        )
        preds.append(prev)
        targets.append(target)
        if len(preds) >= batch_size:
            flush()
    flush()
    return pd.DataFrame.from_records(
        records, columns=["subject_id", "visit", "days", "changed", "change_mm", "ssim", "psnr"]
    )


def summarise_by_change(pairs: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation of SSIM/PSNR on the ``changed``, ``unchanged`` and ``all`` pairs.

    Args:
        pairs: the output of :func:`copy_last_baseline` (or any table with ``changed``, ``ssim``,
            ``psnr`` columns, e.g. a model's scores).
    """
    missing = [c for c in ("changed", "ssim", "psnr") if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs is missing column(s) {missing}.")
    rows = {}
    for name, subset in (
        ("changed", pairs[pairs["changed"]]),
        ("unchanged", pairs[~pairs["changed"]]),
        ("all", pairs),
    ):
        rows[name] = {
            "n": len(subset),
            "ssim_mean": subset["ssim"].mean(),
            "ssim_std": subset["ssim"].std(),
            "psnr_mean": subset["psnr"].mean(),
            "psnr_std": subset["psnr"].std(),
        }
    return pd.DataFrame.from_dict(rows, orient="index")
