"""``monai-twin synth``: write a synthetic longitudinal cohort with known truth.

Examples::

    monai-twin synth mammo2d --subjects 200 --out cohort_mammo/ --seed 0
    monai-twin synth mri_roi3d --subjects 100 --out cohort_mri/ --seed 0 --workers 2 --size 64

Only :mod:`argparse` is imported here; the simulators load when the command runs.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser"]


def _cmd_synth(args: argparse.Namespace) -> int:
    import dataclasses
    import json
    import sys
    import time

    from monai_twin.data.synthetic import Mammo2DConfig, MRIROI3DConfig, write_cohort

    config = Mammo2DConfig() if args.kind == "mammo2d" else MRIROI3DConfig()
    overrides = {}
    if args.size is not None:
        overrides["size"] = args.size
    if args.visits is not None:
        overrides["visits"] = tuple(args.visits)
    try:
        config = dataclasses.replace(config, **overrides)
        start = time.perf_counter()
        folder = write_cohort(
            args.kind,
            args.out,
            args.subjects,
            seed=args.seed,
            config=config,
            workers=args.workers,
            progress=not args.quiet,
            save_aligned=args.save_aligned,
        )
    except ValueError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6
    print(
        json.dumps(
            {"folder": str(folder), "seconds": round(time.perf_counter() - start, 2), "megabytes": round(size_mb, 1)}
        )
    )
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``synth`` sub-command to the ``monai-twin`` parser."""
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic longitudinal cohort (manifest + truth) with known dynamics",
        description="Simulate a cohort whose growth/atrophy follows explicit EHR-driven equations and write it "
        "as a manifest folder (visits/events/static, NIfTI images and masks) with truth.parquet.",
    )
    p.add_argument("kind", choices=("mammo2d", "mri_roi3d"), help="2D mammography or 3D brain-MRI ROI")
    p.add_argument("--subjects", type=int, required=True, help="number of subjects")
    p.add_argument("--out", required=True, help="new (or empty) output folder")
    p.add_argument("--seed", type=int, default=0, help="cohort seed: same seed, same bytes")
    p.add_argument("--size", type=int, default=None, help="image side in voxels (default 256 for 2D, 64 for 3D)")
    p.add_argument("--visits", type=int, nargs=2, default=None, metavar=("MIN", "MAX"), help="visits per subject")
    p.add_argument("--workers", type=int, default=1, help="processes (the output does not depend on it)")
    p.add_argument("--save-aligned", action="store_true", help="also write the noise-free aligned renders")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)
    return p
