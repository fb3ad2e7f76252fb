"""MetaTensor <-> SimpleITK conversion and the SimpleITK registration engine.

MONAI stores a voxel-to-world affine in RAS+ world coordinates (+x towards the patient's right,
+y anterior, +z superior) while ITK's physical space is LPS+ (+x left, +y posterior): a world
point ``(x, y, z)`` in MONAI's convention is ``(-x, -y, z)`` in ITK's. Every conversion here goes
through :func:`ras_to_lps` so the sign flip is done once, on purpose, and is tested with
non-identity affines.

Arrays are indexed ``(i, j[, k])`` as MONAI stores them (channel first, then the spatial axes in
the order the affine's columns describe). ``SimpleITK.GetImageFromArray`` expects the reverse
order (``[k, ]j, i``), hence the transposes.

The engine (:func:`sitk_register`) returns what it found as a linear map and an optional dense
displacement, both in MONAI's RAS world millimetres, so the transforms resample with one torch
code path whatever the backend.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "DEFORMABLE_STAGES",
    "LINEAR_STAGES",
    "METRICS",
    "STAGES",
    "SitkRegistrationResult",
    "array_to_sitk",
    "ras_to_lps",
    "sitk_field_to_ras",
    "sitk_linear_to_ras",
    "sitk_register",
    "sitk_thread_cap",
    "sitk_to_array",
]

LINEAR_STAGES = ("translation", "rigid", "similarity", "affine")
DEFORMABLE_STAGES = ("demons", "diffeomorphic_demons", "fast_symmetric_demons", "bspline")
STAGES = LINEAR_STAGES + DEFORMABLE_STAGES
METRICS = ("mattes", "mean_squares", "correlation", "ants_correlation")


def ras_to_lps(ndim: int) -> np.ndarray:
    """Diagonal sign flip between MONAI (RAS) and ITK (LPS) world coordinates, ``(ndim, ndim)``.

    It is its own inverse; a 2D image lies in the x-y plane, so both of its axes flip.
    """
    flip = np.ones(ndim)
    flip[: min(ndim, 2)] = -1.0
    return np.diag(flip)


def _check_affine(affine: np.ndarray, ndim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (ndim + 1, ndim + 1):
        raise ValueError(f"affine must be ({ndim + 1}, {ndim + 1}) for a {ndim}D image, got {affine.shape}.")
    linear = affine[:ndim, :ndim]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(np.isfinite(affine)) or np.any(spacing <= 0):
        raise ValueError(f"affine must be finite with non-zero spacing, got\n{affine}.")
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(ndim), atol=1e-4):
        raise ValueError(
            "affine has shear (its columns are not orthogonal); ITK images need an orthonormal direction, "
            f"resample the image to an orthogonal grid first. Got\n{affine}."
        )
    return spacing, direction, affine[:ndim, ndim]


def array_to_sitk(array: np.ndarray, affine: np.ndarray):
    """A spatial array ``(i, j[, k])`` with a RAS affine ``(ndim+1, ndim+1)`` as a float32 ``sitk.Image``.

    A trailing vector axis is not supported here; displacement fields go through
    :func:`sitk_field_to_ras` in the other direction only.
    """
    import SimpleITK as sitk

    array = np.asarray(array)
    ndim = array.ndim
    if ndim not in (2, 3):
        raise ValueError(f"expected a 2D or 3D spatial array, got shape {array.shape}.")
    spacing, direction, origin = _check_affine(affine, ndim)
    flip = ras_to_lps(ndim)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.astype(np.float32, copy=False).T))
    image.SetSpacing([float(s) for s in spacing])
    image.SetOrigin([float(o) for o in flip @ origin])
    image.SetDirection([float(d) for d in (flip @ direction).ravel()])
    return image


def sitk_to_array(image) -> tuple[np.ndarray, np.ndarray]:
    """A scalar ``sitk.Image`` as ``(array (i, j[, k]), RAS affine (ndim+1, ndim+1))``."""
    import SimpleITK as sitk

    ndim = image.GetDimension()
    array = sitk.GetArrayFromImage(image).T.copy()
    flip = ras_to_lps(ndim)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(ndim, ndim)
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = flip @ direction @ np.diag(image.GetSpacing())
    affine[:ndim, ndim] = flip @ np.asarray(image.GetOrigin(), dtype=np.float64)
    return array, affine


def sitk_linear_to_ras(transform, ndim: int) -> np.ndarray:
    """A SimpleITK linear transform (fixed LPS point -> moving LPS point) as a RAS homogeneous matrix.

    ITK writes ``T(p) = M (p - c) + c + t``; in RAS the same map is ``F T(F x)`` with ``F`` the
    sign flip of :func:`ras_to_lps`.
    """
    import SimpleITK as sitk

    if transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    tx = transform.Downcast() if hasattr(transform, "Downcast") else transform
    if tx.GetName() == "TranslationTransform":
        h_lps = np.eye(ndim + 1)
        h_lps[:ndim, ndim] = np.asarray(tx.GetOffset(), dtype=np.float64)
        flip = np.eye(ndim + 1)
        flip[:ndim, :ndim] = ras_to_lps(ndim)
        return flip @ h_lps @ flip
    matrix = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(ndim, ndim)
    center = np.asarray(tx.GetCenter(), dtype=np.float64)
    translation = np.asarray(tx.GetTranslation(), dtype=np.float64)
    h_lps = np.eye(ndim + 1)
    h_lps[:ndim, :ndim] = matrix
    h_lps[:ndim, ndim] = -matrix @ center + center + translation
    flip = np.eye(ndim + 1)
    flip[:ndim, :ndim] = ras_to_lps(ndim)
    return flip @ h_lps @ flip


def sitk_field_to_ras(field) -> np.ndarray:
    """A SimpleITK displacement field image (LPS mm) as a RAS array ``(ndim, i, j[, k])`` in mm.

    The field lives on the same voxel grid as the fixed image, so only the vector components
    change sign; the grid itself is already MONAI's once transposed.
    """
    import SimpleITK as sitk

    ndim = field.GetDimension()
    vectors = sitk.GetArrayFromImage(field)  # ([k,] j, i, ndim)
    vectors = np.moveaxis(vectors, -1, 0)  # (ndim, [k,] j, i)
    vectors = vectors.transpose(0, *range(ndim, 0, -1))  # (ndim, i, j[, k])
    flip = np.diag(ras_to_lps(ndim)).reshape(ndim, *([1] * ndim))
    return np.ascontiguousarray(vectors * flip, dtype=np.float32)


@contextlib.contextmanager
def sitk_thread_cap(num_threads: int | None) -> Iterator[int | None]:
    """Cap SimpleITK's threads for the duration of a call.

    ``None`` means: one thread inside a ``torch`` DataLoader worker (the workers already run in
    parallel; ITK using every core in each of them oversubscribes the machine), ITK's default
    elsewhere. The previous global default is restored on exit.
    """
    import SimpleITK as sitk

    if num_threads is None:
        try:
            from torch.utils.data import get_worker_info

            num_threads = 1 if get_worker_info() is not None else None
        except ImportError:  # pragma: no cover - torch is a hard dependency
            num_threads = None
    if num_threads is not None and int(num_threads) < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}.")
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if num_threads is not None:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(num_threads))
    try:
        yield num_threads
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


@dataclass
class SitkRegistrationResult:
    """What :func:`sitk_register` found, in MONAI's RAS world millimetres.

    Attributes:
        matrix: ``(ndim+1, ndim+1)`` homogeneous map from a fixed-image world point to the
            moving-image world point it samples (a pull-back, like ITK's and MONAI's resampling).
        displacement: ``(ndim, *fixed_spatial)`` float32 mm or ``None``. When present the mapping is
            ``x -> matrix @ (x + displacement(x))``: the deformable part acts in the fixed frame
            after the linear part has been applied.
        metric_values: final metric value per stage (lower is better for ITK's metrics).
        iterations: optimiser iterations per stage.
    """

    matrix: np.ndarray
    displacement: np.ndarray | None
    metric_values: dict[str, float]
    iterations: dict[str, int]


def _sampling_fraction(sampling: float | str, n_voxels: int, max_samples: int) -> float:
    if sampling == "auto":
        # enough points for a stable MI histogram, few enough to keep a 128^3 B-spline far below 4 GB
        return float(min(1.0, max_samples / max(n_voxels, 1)))
    value = float(sampling)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"sampling_percentage must be in (0, 1] or 'auto', got {sampling!r}.")
    return value


def _set_metric(method, metric: str, bins: int) -> None:
    if metric == "mattes":
        method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    elif metric == "mean_squares":
        method.SetMetricAsMeanSquares()
    elif metric == "correlation":
        method.SetMetricAsCorrelation()
    elif metric == "ants_correlation":
        method.SetMetricAsANTSNeighborhoodCorrelation(radius=2)
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")


def _pyramid(levels: Sequence[int], sigmas: Sequence[float] | None) -> tuple[list[int], list[float]]:
    shrink = [int(s) for s in levels]
    if not shrink or any(s < 1 for s in shrink):
        raise ValueError(f"levels must be shrink factors >= 1 (coarse to fine), got {levels}.")
    if sigmas is None:
        sigmas = [max(0.0, (s - 1) / 2.0) for s in shrink]
    if len(sigmas) != len(shrink):
        raise ValueError(f"smoothing_sigmas needs one value per level ({len(shrink)}), got {sigmas}.")
    return shrink, [float(s) for s in sigmas]


def _linear_initial(stage: str, ndim: int, previous, fixed, moving, init: str):
    import SimpleITK as sitk

    if stage == "translation":
        tx = sitk.TranslationTransform(ndim)
    elif stage == "rigid":
        tx = sitk.Euler2DTransform() if ndim == 2 else sitk.VersorRigid3DTransform()
    elif stage == "similarity":
        tx = sitk.Similarity2DTransform() if ndim == 2 else sitk.Similarity3DTransform()
    else:
        tx = sitk.AffineTransform(ndim)
    if previous is None:
        if init == "none" or stage == "translation":
            if init != "none" and stage == "translation":
                # a translation has no centre: start from the shift between the image centres of mass
                helper = sitk.CenteredTransformInitializer(
                    fixed, moving, sitk.Euler2DTransform() if ndim == 2 else sitk.Euler3DTransform(), _init_mode(init)
                )
                tx.SetOffset(helper.GetTranslation())
            return tx
        return sitk.CenteredTransformInitializer(fixed, moving, tx, _init_mode(init))
    # chain: start this stage where the previous linear stage ended
    prev = previous
    matrix = np.asarray(prev.GetMatrix()).reshape(ndim, ndim) if hasattr(prev, "GetMatrix") else np.eye(ndim)
    center = np.asarray(prev.GetCenter()) if hasattr(prev, "GetCenter") else np.zeros(ndim)
    translation = np.asarray(prev.GetTranslation() if hasattr(prev, "GetTranslation") else prev.GetOffset())
    if stage == "translation":
        tx.SetOffset(translation.tolist())
        return tx
    tx.SetCenter(center.tolist())
    tx.SetTranslation(translation.tolist())
    if stage == "affine":
        tx.SetMatrix(matrix.ravel().tolist())
    elif stage in ("rigid", "similarity"):
        # a rigid/similarity stage after an affine keeps only the rotation part (polar decomposition)
        u, s, vt = np.linalg.svd(matrix)
        rotation = u @ vt
        if ndim == 2:
            tx.SetAngle(float(math.atan2(rotation[1, 0], rotation[0, 0])))
        else:
            tx.SetMatrix(rotation.ravel().tolist())
        if stage == "similarity":
            tx.SetScale(float(np.mean(s)))
    return tx


def _init_mode(init: str):
    import SimpleITK as sitk

    modes = {
        "moments": sitk.CenteredTransformInitializerFilter.MOMENTS,
        "geometry": sitk.CenteredTransformInitializerFilter.GEOMETRY,
    }
    if init not in modes:
        raise ValueError(f"init must be one of ('moments', 'geometry', 'none'), got {init!r}.")
    return modes[init]


def _metric_method(fixed, options: dict[str, Any], fixed_mask, moving_mask):
    """An ``ImageRegistrationMethod`` with the metric, its sampling, the interpolator and the masks set."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    _set_metric(method, options["metric"], options["bins"])
    fraction = _sampling_fraction(options["sampling_percentage"], fixed.GetNumberOfPixels(), options["max_samples"])
    if fraction < 1.0:
        method.SetMetricSamplingStrategy(method.RANDOM)
        method.SetMetricSamplingPercentage(fraction, seed=int(options["seed"]))
    method.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    return method


def _run_linear(stage, fixed, moving, previous, options: dict[str, Any], fixed_mask, moving_mask):

    ndim = fixed.GetDimension()
    method = _metric_method(fixed, options, fixed_mask, moving_mask)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=int(options["iterations"]),
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    # one voxel of shift and the rotation that moves the image edge by one voxel weigh the same
    method.SetOptimizerScalesFromPhysicalShift()
    shrink, sigmas = _pyramid(options["levels"], options["smoothing_sigmas"])
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if options["num_threads"] is not None:
        method.SetNumberOfThreads(int(options["num_threads"]))
    initial = _linear_initial(stage, ndim, previous, fixed, moving, options["init"])
    method.SetInitialTransform(initial, inPlace=True)
    method.Execute(fixed, moving)
    return initial, float(method.GetMetricValue()), int(method.GetOptimizerIteration())


def _run_bspline(fixed, moving, options: dict[str, Any], fixed_mask, moving_mask):
    import SimpleITK as sitk

    spacing_vox = float(options["bspline_spacing"])
    if spacing_vox <= 0:
        raise ValueError(f"bspline_spacing must be > 0 voxels, got {spacing_vox}.")
    mesh = [max(1, int(round(n / spacing_vox))) for n in fixed.GetSize()]
    tx = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    method = _metric_method(fixed, options, fixed_mask, moving_mask)
    method.SetOptimizerAsLBFGSB(
        gradientConvergenceTolerance=1e-6,
        numberOfIterations=int(options["bspline_iterations"]),
        maximumNumberOfCorrections=5,
        maximumNumberOfFunctionEvaluations=4 * int(options["bspline_iterations"]),
        costFunctionConvergenceFactor=1e7,
    )
    shrink, sigmas = _pyramid(options["levels"], options["smoothing_sigmas"])
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(sigmas)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    if options["num_threads"] is not None:
        method.SetNumberOfThreads(int(options["num_threads"]))
    method.SetInitialTransform(tx, inPlace=True)
    method.Execute(fixed, moving)
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, fixed.GetSize(), fixed.GetOrigin(), fixed.GetSpacing(), fixed.GetDirection()
    )
    return field, float(method.GetMetricValue()), int(method.GetOptimizerIteration())


def _run_demons(stage, fixed, moving, options: dict[str, Any]):
    """Multi-resolution demons: ITK's demons filters work on one grid, so the pyramid is built here."""
    import SimpleITK as sitk

    filters = {
        "demons": sitk.DemonsRegistrationFilter,
        "diffeomorphic_demons": sitk.DiffeomorphicDemonsRegistrationFilter,
        "fast_symmetric_demons": sitk.FastSymmetricForcesDemonsRegistrationFilter,
    }
    shrink, sigmas = _pyramid(options["levels"], options["smoothing_sigmas"])
    iterations = options["demons_iterations"]
    if isinstance(iterations, int):
        iterations = [iterations] * len(shrink)
    if len(iterations) != len(shrink):
        raise ValueError(f"demons_iterations needs one value per level ({len(shrink)}), got {iterations}.")
    field = None
    for factor, sigma, n_iter in zip(shrink, sigmas, iterations):
        if factor > 1:
            f_level = sitk.Shrink(
                sitk.SmoothingRecursiveGaussian(fixed, sigma * min(fixed.GetSpacing())), [factor] * fixed.GetDimension()
            )
            m_level = sitk.Shrink(
                sitk.SmoothingRecursiveGaussian(moving, sigma * min(moving.GetSpacing())),
                [factor] * moving.GetDimension(),
            )
        else:
            f_level, m_level = fixed, moving
        # displacements are in mm, so a coarse field carries over to a finer grid unchanged
        if field is None:
            initial = sitk.Image(f_level.GetSize(), sitk.sitkVectorFloat64, f_level.GetDimension())
            initial.CopyInformation(f_level)
        else:
            initial = sitk.Resample(field, f_level, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
        demons = filters[stage]()
        demons.SetNumberOfIterations(int(n_iter))
        demons.SetSmoothDisplacementField(True)
        demons.SetStandardDeviations(float(options["demons_sigma"]))
        demons.SetMaximumRMSError(1e-4)
        if options["num_threads"] is not None:
            demons.SetNumberOfThreads(int(options["num_threads"]))
        field = demons.Execute(f_level, m_level, initial)
        metric = float(demons.GetMetric())
        done = int(demons.GetElapsedIterations())
    if shrink[-1] > 1:
        # a pyramid that stops above full resolution still returns a field on the fixed grid
        field = sitk.Resample(field, fixed, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkVectorFloat64)
    return field, metric, done


def sitk_register(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    fixed: np.ndarray,
    fixed_affine: np.ndarray,
    stages: Sequence[str],
    options: dict[str, Any],
    fixed_mask: np.ndarray | None = None,
    moving_mask: np.ndarray | None = None,
) -> SitkRegistrationResult:
    """Register ``moving`` to ``fixed`` with SimpleITK, stage after stage.

    Args:
        moving: spatial array ``(i, j[, k])`` (no channel axis).
        moving_affine: RAS voxel-to-world affine of ``moving``, ``(ndim+1, ndim+1)``, mm.
        fixed: spatial array of the reference.
        fixed_affine: RAS affine of ``fixed``.
        stages: names from :data:`STAGES`; linear stages first, at most one deformable stage last.
        options: the engine settings chosen by :class:`~monai_twin.transforms.registration.Register`.
        fixed_mask: optional spatial mask on the fixed grid (non-zero = use for the metric).
        moving_mask: optional spatial mask on the moving grid.

    Returns:
        :class:`SitkRegistrationResult` in RAS world millimetres.
    """
    import SimpleITK as sitk

    ndim = fixed.ndim
    f_img = array_to_sitk(fixed, fixed_affine)
    m_img = array_to_sitk(moving, moving_affine)
    f_mask = None if fixed_mask is None else sitk.Cast(array_to_sitk(fixed_mask > 0, fixed_affine), sitk.sitkUInt8)
    m_mask = None if moving_mask is None else sitk.Cast(array_to_sitk(moving_mask > 0, moving_affine), sitk.sitkUInt8)
    values: dict[str, float] = {}
    iterations: dict[str, int] = {}
    linear = None
    field = None
    with sitk_thread_cap(options["num_threads"]):
        for stage in stages:
            if stage in LINEAR_STAGES:
                linear, values[stage], iterations[stage] = _run_linear(
                    stage, f_img, m_img, linear, options, f_mask, m_mask
                )
                continue
            # deformable: work between the fixed image and the moving image brought onto the fixed
            # grid by the linear stages, so the field is a displacement in the fixed frame
            warped = sitk.Resample(
                m_img, f_img, linear if linear is not None else sitk.Transform(), sitk.sitkLinear, 0.0
            )
            if stage == "bspline":
                warped_mask = None
                if m_mask is not None:
                    warped_mask = sitk.Resample(
                        m_mask, f_img, linear if linear is not None else sitk.Transform(), sitk.sitkNearestNeighbor, 0
                    )
                field, values[stage], iterations[stage] = _run_bspline(f_img, warped, options, f_mask, warped_mask)
            else:
                f_use, m_use = f_img, warped
                if f_mask is not None:
                    # ITK's demons filters take no mask: outside the mask both images are flattened to
                    # zero there, so no force (intensity difference times gradient) is generated
                    f_use = sitk.Mask(f_img, f_mask)
                    m_use = sitk.Mask(warped, f_mask)
                if options["match_histograms"]:
                    m_use = sitk.HistogramMatching(m_use, f_use, 256, 7, True)
                field, values[stage], iterations[stage] = _run_demons(stage, f_use, m_use, options)
    matrix = sitk_linear_to_ras(linear, ndim) if linear is not None else np.eye(ndim + 1)
    displacement = sitk_field_to_ras(field) if field is not None else None
    return SitkRegistrationResult(matrix=matrix, displacement=displacement, metric_values=values, iterations=iterations)
