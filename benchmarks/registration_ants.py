"""ANTs SyN on pairs exported by ``registration_accuracy.py`` (run in a venv of its own).

antspyx pins numpy < 2.4 and scipy < 1.16, so it lives in a separate venv; this script imports
only numpy and ants. For each ``<pair>.npz`` (``fixed``, ``moving``, ``moving_extra``,
``spacing``) it runs ``ants.registration(type_of_transform="SyN")`` -- ANTs' own rigid/affine
initialisation followed by SyN -- ``--runs`` times and writes ``<pair>_ants.npz``: the warped
image, the warped ``moving_extra``, the pull-back field in voxels ``(ndim, *fixed_shape)`` and the
median seconds of the registration call (imports and file I/O excluded, as for the SimpleITK
timings). ``registration_accuracy.py --ants-python`` calls it pair by pair, interleaved with its own
methods, so both are timed under the same machine load.

Run (by hand)::

    /tmp/venv_ants/bin/python benchmarks/registration_ants.py /tmp/regpairs/mammo_P0000.npz --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import numpy as np

RESULT_SUFFIXES = ("_ants", "_elastix")


def pull_back_field(ants, fixed, transforms, shape) -> np.ndarray:
    """Moving voxel index minus fixed voxel index per fixed voxel: each moving index coordinate is a
    linear ramp image, warped like the image (linear interpolation reproduces a ramp exactly)."""
    ndim = len(shape)
    grid = np.indices(shape, dtype=np.float32)
    field = np.empty((ndim, *fixed.shape), dtype=np.float32)
    for axis in range(ndim):
        ramp = ants.from_numpy(grid[axis], spacing=fixed.spacing)
        warped = ants.apply_transforms(fixed, ramp, transforms, interpolator="linear", defaultvalue=-1e6).numpy()
        # ANTs takes no NaN fill: points that sample outside the moving grid are marked here
        field[axis] = np.where(warped < -1.0, np.nan, warped - np.indices(fixed.shape, dtype=np.float32)[axis])
    return field


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="exported .npz pairs (or folders of them)")
    parser.add_argument("--threads", type=int, default=1, help="ITK threads (set before ants is imported)")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per pair (median)")
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import ants

    paths = []
    for p in map(Path, args.pairs):
        paths += sorted(q for q in p.glob("*.npz") if not q.stem.endswith(RESULT_SUFFIXES)) if p.is_dir() else [p]
    for path in paths:
        data = np.load(path)
        spacing = tuple(float(s) for s in data["spacing"])
        fixed = ants.from_numpy(data["fixed"].astype(np.float32), spacing=spacing)
        moving = ants.from_numpy(data["moving"].astype(np.float32), spacing=spacing)
        times = []
        for _ in range(max(1, args.runs)):
            start = time.perf_counter()
            reg = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=0)
            times.append(time.perf_counter() - start)
        extra = ants.from_numpy(data["moving_extra"].astype(np.float32), spacing=spacing)
        extra_warped = ants.apply_transforms(fixed, extra, reg["fwdtransforms"], interpolator="linear").numpy()
        field = pull_back_field(ants, fixed, reg["fwdtransforms"], data["moving"].shape)
        np.savez(
            path.with_name(path.stem + "_ants.npz"),
            warped=reg["warpedmovout"].numpy(),
            extra=extra_warped,
            field=field,
            seconds=statistics.median(times),
            times=np.asarray(times),
        )
        print(f"{path.stem}: ANTs SyN {statistics.median(times):.2f} s", flush=True)


if __name__ == "__main__":
    main()
