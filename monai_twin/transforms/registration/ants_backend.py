"""Optional ANTsPy engine (``Register(backend="ants")``): ANTs' own rigid/affine and SyN.

antspyx pins numpy < 2.4 and scipy < 1.16, so it is an extra (``pip install monai_twin[ants]``)
and is imported inside the function. Like :func:`~.sitk_backend.sitk_register` it returns the
registration in MONAI's RAS world millimetres, so :class:`~.array.Register` resamples, records
and inverts it with the same code whatever the engine.

ANTs works in ITK's LPS physical space (see :func:`~.sitk_backend.ras_to_lps`); its images are
indexed ``(x, y[, z])`` like MONAI's arrays, so no transpose is needed. The forward transforms of
``ants.registration`` are ``[warp, affine]``: a fixed point ``p`` samples the moving image at
``A(p + w(p))`` -- the SyN field ``w`` lives on the fixed grid, the affine ``A`` is applied after it,
which is exactly the ``matrix @ (x + displacement(x))`` form of a registration record.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from .sitk_backend import SitkRegistrationResult, _check_affine, ras_to_lps

__all__ = ["ANTS_STAGES", "ants_register", "ants_transform_type"]

ANTS_STAGES = ("translation", "rigid", "similarity", "affine", "syn")
_LINEAR_TYPES = {"translation": "Translation", "rigid": "Rigid", "similarity": "Similarity", "affine": "Affine"}


def ants_transform_type(stages: Sequence[str]) -> str:
    """The ``type_of_transform`` of ``ants.registration`` for a chain of stages.

    ANTs initialises and chains its own linear stages, so only the last linear stage matters:
    ``("rigid", "affine", "syn")`` and ``("affine", "syn")`` are ``"SyN"`` (affine then SyN),
    ``("syn",)`` is ``"SyNOnly"``, ``("rigid",)`` is ``"Rigid"``.
    """
    stages = tuple(stages)
    unknown = [s for s in stages if s not in ANTS_STAGES]
    if unknown:
        raise ValueError(f"the ants backend runs stages {ANTS_STAGES}, got {unknown} in {stages}.")
    if stages[-1] == "syn":
        linear = stages[:-1]
        if not linear:
            return "SyNOnly"
        if linear[-1] != "affine":
            raise ValueError(f"ANTs SyN starts from an affine stage: use ('rigid', 'affine', 'syn'), got {stages}.")
        return "SyN"
    return _LINEAR_TYPES[stages[-1]]


@contextlib.contextmanager
def _itk_threads(num_threads: int | None) -> Iterator[None]:
    """ANTs reads its thread count from the environment at each call."""
    key = "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"
    previous = os.environ.get(key)
    if num_threads is None:
        try:
            from torch.utils.data import get_worker_info

            num_threads = 1 if get_worker_info() is not None else None
        except ImportError:  # pragma: no cover - torch is a hard dependency
            num_threads = None
    if num_threads is not None:
        os.environ[key] = str(int(num_threads))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


def _to_ants(ants, array: np.ndarray, affine: np.ndarray):
    ndim = array.ndim
    spacing, direction, origin = _check_affine(affine, ndim)
    flip = ras_to_lps(ndim)
    return ants.from_numpy(
        np.ascontiguousarray(array, dtype=np.float32),
        origin=[float(o) for o in flip @ origin],
        spacing=[float(s) for s in spacing],
        direction=flip @ direction,
    )


def _linear_lps(ants, path: str, ndim: int) -> np.ndarray:
    """An ANTs ``.mat`` (fixed LPS point -> moving LPS point) as a homogeneous matrix."""
    tx = ants.read_transform(path)
    params = np.asarray(tx.parameters, dtype=np.float64)
    center = np.asarray(tx.fixed_parameters, dtype=np.float64)[:ndim]
    if params.size == ndim:  # a translation transform has only the offset
        matrix, translation = np.eye(ndim), params
    else:
        matrix, translation = params[: ndim * ndim].reshape(ndim, ndim), params[ndim * ndim :]
    h = np.eye(ndim + 1)
    h[:ndim, :ndim] = matrix
    h[:ndim, ndim] = -matrix @ center + center + translation
    return h


def ants_register(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    stages: Sequence[str],
    options: dict[str, Any],
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
) -> SitkRegistrationResult:
    """Register with ``ants.registration``; same arguments and result as :func:`~.sitk_backend.sitk_register`.

    ANTs' own defaults are used for its metrics (Mattes mutual information), pyramids and
    iterations; ``options`` provides ``seed`` and ``num_threads`` only.
    """
    try:
        import ants
    except ImportError as err:
        raise ImportError(
            "Register(backend='ants') needs antspyx: pip install 'monai_twin[ants]' (it pins numpy < 2.4 and "
            "scipy < 1.16, so a separate environment may be needed)."
        ) from err

    ndim = fixed.ndim
    kind = ants_transform_type(stages)
    f_img = _to_ants(ants, fixed, fixed_affine)
    m_img = _to_ants(ants, moving, moving_affine)
    kwargs: dict[str, Any] = {}
    if fixed_mask is not None:
        kwargs["mask"] = _to_ants(ants, (fixed_mask > 0).astype(np.float32), fixed_affine)
    if moving_mask is not None:
        kwargs["moving_mask"] = _to_ants(ants, (moving_mask > 0).astype(np.float32), moving_affine)
    with _itk_threads(options.get("num_threads")):
        reg = ants.registration(f_img, m_img, type_of_transform=kind, random_seed=int(options["seed"]), **kwargs)
    flip = np.eye(ndim + 1)
    flip[:ndim, :ndim] = ras_to_lps(ndim)
    matrix_lps = np.eye(ndim + 1)
    displacement = None
    for path in reg["fwdtransforms"]:
        if path.endswith(".mat"):
            matrix_lps = _linear_lps(ants, path, ndim)
        else:  # the SyN warp: a displacement image (LPS mm) on the fixed grid, indexed like MONAI
            vectors = np.asarray(ants.image_read(path).numpy(), dtype=np.float32)  # (*spatial, ndim)
            vectors = np.moveaxis(vectors, -1, 0)
            displacement = np.ascontiguousarray(vectors * np.diag(ras_to_lps(ndim)).reshape(-1, *([1] * ndim)))
    return SitkRegistrationResult(
        matrix=flip @ matrix_lps @ flip,
        displacement=displacement,
        metric_values={},
        iterations={},
    )
