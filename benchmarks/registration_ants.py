"""ANTs SyN on the pairs exported by ``registration_accuracy.py --sections export``.

antspyx pins numpy < 2.4 and scipy < 1.16, so it lives in a venv of its own; this script imports
only numpy and ants. It writes ``<name>_ants.npz`` (warped image, warped grey matter / tissue,
seconds) next to each exported pair; ``registration_accuracy.py --sections ants`` scores them with
the same metrics as the SimpleITK methods.

Run::

    /tmp/venv_probe/bin/python benchmarks/registration_accuracy.py --sections export --export-dir /tmp/regpairs
    /tmp/venv_ants/bin/python benchmarks/registration_ants.py /tmp/regpairs
    /tmp/venv_probe/bin/python benchmarks/registration_accuracy.py --sections ants --export-dir /tmp/regpairs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np


def main(folder: str) -> None:
    import ants

    for path in sorted(Path(folder).glob("*.npz")):
        if path.stem.endswith("_ants"):
            continue
        data = np.load(path)
        spacing = tuple(float(s) for s in data["spacing"])
        fixed = ants.from_numpy(data["fixed"].astype(np.float32), spacing=spacing)
        moving = ants.from_numpy(data["moving"].astype(np.float32), spacing=spacing)
        start = time.perf_counter()
        reg = ants.registration(fixed, moving, type_of_transform="SyN", random_seed=0)
        seconds = time.perf_counter() - start
        warped = reg["warpedmovout"].numpy()
        extra = ants.from_numpy(data["moving_extra"].astype(np.float32), spacing=spacing)
        extra_warped = ants.apply_transforms(fixed, extra, reg["fwdtransforms"], interpolator="linear").numpy()
        np.savez(path.with_name(path.stem + "_ants.npz"), warped=warped, extra=extra_warped, seconds=seconds)
        print(f"{path.stem}: {seconds:.1f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
