"""The copy-last-scan baseline on default synthetic cohorts: the bar every forecaster must clear.

Writes a default cohort of each kind to a temporary folder and prints MONAI SSIM/PSNR of
"visit j = visit j-1" on the *changed* and *unchanged* target visits (the cohort's stated
threshold) and on all of them -- in the aligned frame (both scans mapped back with the true
acquisition transforms, i.e. after perfect registration) and as acquired (no registration).

Usage::

    python benchmarks/copy_last_baseline.py --subjects 60 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=60, help="subjects per cohort")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("mammo2d", "mri_roi3d"), default=None)
    args = parser.parse_args()

    import pandas as pd

    from monai_twin.data.synthetic import copy_last_baseline, summarise_by_change, write_cohort

    pd.set_option("display.width", 120)
    kinds = [args.only] if args.only else ["mammo2d", "mri_roi3d"]
    for kind in kinds:
        with tempfile.TemporaryDirectory(prefix=f"copy_last_{kind}_") as tmp:
            folder = write_cohort(kind, Path(tmp) / "cohort", args.subjects, seed=args.seed, workers=args.workers)
            rule = json.loads((folder / "cohort.json").read_text())["changed"]
            print(
                f"\n== {kind}: {args.subjects} subjects, seed {args.seed}; changed = |delta {rule['column']}| "
                f">= {rule['threshold_mm']} mm since the previous visit"
            )
            for frame in ("aligned", "acquired"):
                start = time.perf_counter()
                pairs = copy_last_baseline(folder, frame=frame)
                summary = summarise_by_change(pairs)
                print(f"-- copy-last, {frame} frame ({time.perf_counter() - start:.1f} s)")
                print(summary.round({"ssim_mean": 4, "ssim_std": 4, "psnr_mean": 2, "psnr_std": 2}).to_string())


if __name__ == "__main__":
    main()
