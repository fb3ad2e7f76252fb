"""Optional itk-elastix engine (``Register(backend="elastix")``): elastix parameter maps in a chain.

itk-elastix brings the ``itk`` Python wrapping (hundreds of MB, seconds to load its registration
classes), so it is an extra (``pip install monai_twin[elastix]``) imported inside the function.
Each stage is elastix's default parameter map of that name (``translation``, ``rigid``,
``affine``, ``bspline``: Mattes mutual information, adaptive stochastic gradient descent, random
sampling); elastix chains them itself. The result is read back as one dense displacement on the
fixed grid (``transformix``'s deformation field), recorded with an identity matrix, so
:class:`~.array.Register` resamples, records and inverts it like any other result.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from .sitk_backend import SitkRegistrationResult, _check_affine, ras_to_lps

__all__ = ["ELASTIX_STAGES", "elastix_register"]

ELASTIX_STAGES = ("translation", "rigid", "affine", "bspline")


def _to_itk(itk, array: np.ndarray, affine: np.ndarray):
    ndim = array.ndim
    spacing, direction, origin = _check_affine(affine, ndim)
    flip = ras_to_lps(ndim)
    # ITK views numpy arrays backwards ([k,] j, i): transpose so index (i, j[, k]) stays MONAI's
    image = itk.image_from_array(np.ascontiguousarray(np.asarray(array, dtype=np.float32).T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in flip @ origin])
    image.SetDirection(itk.matrix_from_array(np.ascontiguousarray(flip @ direction)))
    return image


def elastix_register(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    stages: Sequence[str],
    options: dict[str, Any],
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
) -> SitkRegistrationResult:
    """Register with elastix; same arguments and result as :func:`~.sitk_backend.sitk_register`.

    ``options`` provides ``seed`` and ``num_threads``; everything else is elastix's defaults.
    """
    try:
        import itk
    except ImportError as err:
        raise ImportError("Register(backend='elastix') needs itk-elastix: pip install 'monai_twin[elastix]'.") from err
    if not hasattr(itk, "ParameterObject"):
        raise ImportError("itk is installed without elastix: pip install itk-elastix.")
    unknown = [s for s in stages if s not in ELASTIX_STAGES]
    if unknown:
        raise ValueError(f"the elastix backend runs stages {ELASTIX_STAGES}, got {unknown}.")
    ndim = fixed.ndim
    params = itk.ParameterObject.New()
    for stage in stages:
        params_map = params.GetDefaultParameterMap(stage)
        params_map["RandomSeed"] = [str(int(options["seed"]))]
        params.AddParameterMap(params_map)
    f_img = _to_itk(itk, fixed, fixed_affine)
    m_img = _to_itk(itk, moving, moving_affine)
    kwargs: dict[str, Any] = {"parameter_object": params, "log_to_console": False}
    if options.get("num_threads") is not None:
        kwargs["number_of_threads"] = int(options["num_threads"])
    if fixed_mask is not None:
        kwargs["fixed_mask"] = _to_itk(itk, (fixed_mask > 0).astype(np.uint8), fixed_affine).astype(itk.UC)
    if moving_mask is not None:
        kwargs["moving_mask"] = _to_itk(itk, (moving_mask > 0).astype(np.uint8), moving_affine).astype(itk.UC)
    # elastix and transformix write their logs and a deformationField.nii to an output folder
    # (the working directory by default): keep them in a temporary one
    with tempfile.TemporaryDirectory() as tmp:
        _, result = itk.elastix_registration_method(f_img, m_img, output_directory=tmp, **kwargs)
        field = itk.transformix_deformation_field(m_img, result, output_directory=tmp)
    vectors = np.asarray(itk.array_from_image(field), dtype=np.float32).T  # (ndim, i, j[, k]), LPS mm
    displacement = np.ascontiguousarray(vectors * np.diag(ras_to_lps(ndim)).reshape(-1, *([1] * ndim)))
    return SitkRegistrationResult(matrix=np.eye(ndim + 1), displacement=displacement, metric_values={}, iterations={})
