"""elastix (itk-elastix) rigid -> affine -> B-spline on pairs exported by ``registration_accuracy.py``.

itk-elastix brings the ``itk`` wrapping (hundreds of MB), so it runs from a venv of its own, like
``registration_ants.py`` and with the same protocol: for each ``<pair>.npz`` it runs elastix with
its default ``rigid``, ``affine`` and ``bspline`` parameter maps ``--runs`` times and writes
``<pair>_elastix.npz`` (warped image, warped ``moving_extra``, pull-back field in voxels
``(ndim, *fixed_shape)``, median seconds of the registration call).

Run (by hand)::

    /tmp/venv_elastix/bin/python benchmarks/registration_elastix.py /tmp/regpairs/mammo_P0000.npz --threads 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULT_SUFFIXES = ("_ants", "_elastix")


def _image(itk, array: np.ndarray, spacing):
    # numpy order (i, j[, k]) is kept as ITK's (x, y[, z]) by transposing: ITK views arrays backwards
    image = itk.image_from_array(np.ascontiguousarray(array.T.astype(np.float32)))
    image.SetSpacing([float(s) for s in spacing])
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", help="exported .npz pairs (or folders of them)")
    parser.add_argument("--threads", type=int, default=1, help="ITK threads")
    parser.add_argument("--runs", type=int, default=1, help="timed runs per pair (median)")
    args = parser.parse_args()
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(args.threads)
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(args.threads)
    paths = []
    for p in map(Path, args.pairs):
        paths += sorted(q for q in p.glob("*.npz") if not q.stem.endswith(RESULT_SUFFIXES)) if p.is_dir() else [p]
    params = itk.ParameterObject.New()
    for name in ("rigid", "affine", "bspline"):
        params.AddParameterMap(params.GetDefaultParameterMap(name))
    for path in paths:
        data = np.load(path)
        spacing = [float(s) for s in data["spacing"]]
        fixed = _image(itk, data["fixed"], spacing)
        moving = _image(itk, data["moving"], spacing)
        times = []
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(max(1, args.runs)):
                start = time.perf_counter()
                warped, result = itk.elastix_registration_method(
                    fixed, moving, parameter_object=params, log_to_console=False, output_directory=tmp
                )
                times.append(time.perf_counter() - start)
            extra = itk.transformix_filter(_image(itk, data["moving_extra"], spacing), result, output_directory=tmp)
            field_img = itk.transformix_deformation_field(moving, result, output_directory=tmp)
        # ITK vector components are (x, y[, z]) = numpy axes (i, j[, k]) here; mm -> voxels
        vectors = itk.array_from_image(field_img).T  # (ndim, i, j[, k]) after the transpose
        field = (vectors / np.asarray(spacing).reshape(-1, *([1] * len(spacing)))).astype(np.float32)
        np.savez(
            path.with_name(path.stem + "_elastix.npz"),
            warped=itk.array_from_image(warped).T,
            extra=itk.array_from_image(extra).T,
            field=field,
            seconds=statistics.median(times),
            times=np.asarray(times),
        )
        print(f"{path.stem}: elastix rigid+affine+bspline {statistics.median(times):.2f} s", flush=True)


if __name__ == "__main__":
    main()
