"""How much does importing monai_twin add on top of importing MONAI?

Target (issue "Foundation"): ``import monai_twin`` adds < 2 s on top of ``import monai``.
Each measurement is a fresh interpreter; the runs of the baseline and of each variant alternate so
that machine noise hits all of them alike, and medians are reported.

Usage::

    python benchmarks/import_time.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "baseline: import monai": "import monai",
    "import monai; import monai_twin": "import monai; import monai_twin",
    "import monai; import monai_twin.data": "import monai; import monai_twin.data",
    "import monai_twin (alone)": "import monai_twin",
}


def _time(statement: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    for statement in VARIANTS.values():  # warm the OS file cache once
        _time(statement)
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):
        for name, statement in VARIANTS.items():
            samples[name].append(_time(statement))
    base = statistics.median(samples["baseline: import monai"])
    print(f"median of {args.repeats} fresh interpreters (seconds, includes interpreter start-up)")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"{name:40s} {med:6.2f} s   ratio to baseline {med / base:5.2f}   added {med - base:+6.2f} s")
    added = statistics.median(samples["import monai; import monai_twin"]) - base
    print(
        f"\nimport monai_twin adds {added:+.2f} s on top of import monai (target < 2 s): {'PASS' if added < 2 else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
