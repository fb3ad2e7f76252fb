"""Time and size of writing the two benchmark synthetic cohorts (issue 3).

* 2D: 200 subjects x ~6 visits of 256^2 mammograms (default ``Mammo2DConfig``)
* 3D: 100 subjects x ~5 visits of 64^3 MRI ROIs (default ``MRIROI3DConfig``)

Target: each under 2 minutes on 2 cores. Prints, per cohort, the median wall time over
``--repeats`` runs, the folder size in MB, the number of visits, and the ratio of the median time
to the 120 s target (the baseline of this benchmark). Cohorts are written to a temporary folder
and deleted.

With ``--checks`` it also prints two truth figures on default-config subjects: the SSIM of the
inverse acquisition against the noise-free aligned render (target >= 0.95) and dose monotonicity
(final growth with every dose scaled by 0, 0.5, 1, 2, 4 must never increase with the factor).

Usage::

    python benchmarks/synthetic_cohorts.py --repeats 3 --workers 2
    python benchmarks/synthetic_cohorts.py --repeats 0 --checks
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


def _truth_checks() -> None:
    import numpy as np
    import pandas as pd
    import torch
    from monai.metrics import SSIMMetric

    from monai_twin.data.synthetic import invert_acquisition, resimulate, simulate_subject, subject_truth

    for kind, n_subjects in (("mammo2d", 10), ("mri_roi3d", 6)):
        metric = SSIMMetric(spatial_dims=2 if kind == "mammo2d" else 3, data_range=1.0)
        inverted, raw = [], []
        for index in range(n_subjects):
            subject = simulate_subject(kind, index, seed=0)
            visits = resimulate(subject)
            for k in range(subject.n_visits):
                aligned = torch.from_numpy(visits.aligned[k])[None, None]
                back = torch.from_numpy(invert_acquisition(visits.images[k], subject.acquisitions[k]))[None, None]
                inverted.append(float(metric(back, aligned).item()))
                raw.append(float(metric(torch.from_numpy(visits.images[k])[None, None], aligned).item()))
        print(
            f"{kind}: inverse-transform SSIM over {len(inverted)} visits of {n_subjects} default subjects: "
            f"min {min(inverted):.4f}, median {np.median(inverted):.4f} (un-inverted median {np.median(raw):.4f})"
        )
    factors = (0.0, 0.5, 1.0, 2.0, 4.0)
    for kind, column in (("mammo2d", "lesion_area_mm2"), ("mri_roi3d", "atrophy_mm")):
        violations, strict, progressing, finals = 0, 0, 0, []
        for index in range(200):
            subject = simulate_subject(kind, index, seed=0)
            growth = []
            for factor in factors:
                s = subject.schedule.scaled(factor)
                events = pd.DataFrame({"time": s.days, "code": subject.drug_code, "numeric_value": s.doses})
                values = subject_truth(subject, events)[column].to_numpy()
                growth.append(values - values[0])
            growth = np.stack(growth)
            finals.append(growth[:, -1])
            violations += int((np.diff(growth, axis=0) > 1e-9).sum())
            if subject.schedule.doses.max(initial=0.0) > 0 and growth[0, -1] > 0:
                progressing += 1
                strict += int(np.all(np.diff(growth[:, -1]) < 0))
        medians = np.round(np.median(np.stack(finals), axis=0), 3).tolist()
        print(
            f"{kind}: dose monotonicity over 200 subjects, doses x{factors}: {violations} violations; "
            f"{strict}/{progressing} treated, progressing subjects strictly decreasing; "
            f"median final growth of {column} per factor {medians}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", choices=("mammo2d", "mri_roi3d"), default=None)
    parser.add_argument("--checks", action="store_true", help="also print inverse-transform SSIM and dose monotonicity")
    args = parser.parse_args()

    import pandas as pd

    from monai_twin.data.synthetic import write_cohort

    cohorts = {"mammo2d": 200, "mri_roi3d": 100}
    if args.only:
        cohorts = {args.only: cohorts[args.only]}
    for kind, n_subjects in cohorts.items() if args.repeats > 0 else ():
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
    if args.checks:
        _truth_checks()


if __name__ == "__main__":
    main()
