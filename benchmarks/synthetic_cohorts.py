"""Time and size of writing the two benchmark synthetic cohorts (issue 3).

* 2D: 200 subjects x ~6 visits of 256^2 mammograms (default ``Mammo2DConfig``)
* 3D: 100 subjects x ~5 visits of 64^3 MRI ROIs (default ``MRIROI3DConfig``)

Target: each under 2 minutes on 2 cores. Prints, per cohort, the median wall time over
``--repeats`` runs, the folder size in MB, the number of visits, and the ratio of the median time
to the 120 s target (the baseline of this benchmark). Cohorts are written to a temporary folder
and deleted.

Usage::

    python benchmarks/synthetic_cohorts.py --repeats 3 --workers 2
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per worker process: the cores are shared

TARGET_SECONDS = 120.0


def _size_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("mammo2d", "mri_roi3d"), default=None)
    args = parser.parse_args()

    import pandas as pd

    from monai_twin.data.synthetic import write_cohort

    cohorts = {"mammo2d": 200, "mri_roi3d": 100}
    if args.only:
        cohorts = {args.only: cohorts[args.only]}
    for kind, n_subjects in cohorts.items():
        times, sizes, visits = [], [], 0
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory(prefix=f"bench_{kind}_") as tmp:
                out = Path(tmp) / "cohort"
                start = time.perf_counter()
                write_cohort(kind, out, n_subjects, seed=0, workers=args.workers)
                times.append(time.perf_counter() - start)
                sizes.append(_size_mb(out))
                visits = len(pd.read_parquet(out / "visits.parquet"))
                shutil.rmtree(out)
        median = statistics.median(times)
        print(
            f"{kind}: {n_subjects} subjects, {visits} visits ({visits / n_subjects:.1f}/subject), "
            f"workers={args.workers}: median {median:.1f} s over {len(times)} run(s) "
            f"(runs: {', '.join(f'{t:.1f}' for t in times)}), {statistics.median(sizes):.0f} MB, "
            f"{median / TARGET_SECONDS:.2f} x the {TARGET_SECONDS:.0f} s target"
        )


if __name__ == "__main__":
    main()
