"""Pure functions behind the registration transforms: resampling through a registration result,
inverting it, and reading the displacement back.

A registration result maps a point ``x`` of the *fixed* (reference) world to the point of the
*moving* world it samples (a pull-back, as in ITK's and MONAI's resampling)::

    y = matrix @ (x + displacement(x))        # RAS world, millimetres

``matrix`` is ``(ndim+1, ndim+1)`` homogeneous; ``displacement`` is ``(ndim, *fixed_spatial)`` in
mm on the fixed voxel grid, or ``None`` for a purely linear result. Everything resamples with
``torch.nn.functional.grid_sample`` so images, masks and labels follow one code path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "compose_displacement",
    "grid_world_points",
    "invert_displacement_field",
    "resample_through",
    "sample_at_voxels",
    "total_displacement",
]


def _as_matrix(value, ndim: int) -> torch.Tensor:
    from monai.data.utils import to_affine_nd

    matrix = torch.as_tensor(np.asarray(value, dtype=np.float64) if not torch.is_tensor(value) else value)
    matrix = matrix.to(torch.float64)
    if matrix.shape != (ndim + 1, ndim + 1):
        matrix = torch.as_tensor(to_affine_nd(ndim, matrix.numpy()), dtype=torch.float64)
    return matrix


def grid_world_points(shape: Sequence[int], affine) -> torch.Tensor:
    """World coordinates (mm, RAS) of every voxel of a grid, ``(ndim, *shape)`` float64."""
    ndim = len(shape)
    affine = _as_matrix(affine, ndim)
    axes = [torch.arange(int(s), dtype=torch.float64) for s in shape]
    voxels = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return torch.einsum("ij,j...->i...", affine[:ndim, :ndim], voxels) + affine[:ndim, ndim].reshape(
        ndim, *([1] * ndim)
    )


def sample_at_voxels(
    image: torch.Tensor, voxels: torch.Tensor, mode: str = "bilinear", padding_mode: str = "zeros"
) -> torch.Tensor:
    """Sample ``image`` ``(C, *spatial)`` at continuous voxel positions ``(ndim, *out_spatial)``.

    Args:
        image: channel-first image.
        voxels: positions in the image's voxel index order, in voxels.
        mode: ``"bilinear"`` (trilinear in 3D), ``"nearest"`` or ``"bicubic"`` (2D only).
        padding_mode: ``"zeros"``, ``"border"`` or ``"reflection"`` for points outside the image.

    Returns:
        ``(C, *out_spatial)`` in ``image``'s floating dtype (float32 for integer inputs).
    """
    ndim = image.ndim - 1
    if voxels.shape[0] != ndim:
        raise ValueError(f"voxels must be ({ndim}, ...) for a {ndim}D image, got {tuple(voxels.shape)}.")
    norm = voxels.to(torch.float64) * _voxel_to_unit_scale(image).reshape(ndim, *([1] * ndim)) - 1.0
    grid = norm.flip(0).permute(*range(1, ndim + 1), 0).unsqueeze(0)
    return _grid_sample(image, grid, mode, padding_mode)


def _voxel_to_unit_scale(image: torch.Tensor) -> torch.Tensor:
    """Per spatial axis of ``image`` ``(C, *spatial)``, the factor taking a voxel index to
    ``grid_sample``'s unit coordinate (minus 1): with ``align_corners=True``, -1 and +1 are the
    centres of the first and last voxel."""
    sizes = torch.tensor(image.shape[1:], dtype=torch.float64)
    return 2.0 / torch.clamp(sizes - 1.0, min=1.0)


def _grid_sample(image: torch.Tensor, grid: torch.Tensor, mode: str, padding_mode: str) -> torch.Tensor:
    """``grid_sample`` of a channel-first ``image`` at a ``(1, *out_spatial, ndim)`` unit grid (last
    axis first), in the image's floating dtype (float32 for integer images)."""
    dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    return F.grid_sample(
        image.unsqueeze(0).to(dtype), grid.to(dtype), mode=mode, padding_mode=padding_mode, align_corners=True
    ).squeeze(0)


def resample_through(
    image: torch.Tensor,
    image_affine,
    out_affine,
    out_shape: Sequence[int],
    matrix,
    displacement: torch.Tensor | None = None,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Resample ``image`` onto the output grid through a registration result.

    Args:
        image: ``(C, *spatial)`` moving image.
        image_affine: its RAS voxel-to-world affine.
        out_affine: RAS affine of the output (fixed) grid.
        out_shape: spatial shape of the output grid.
        matrix: ``(ndim+1, ndim+1)`` fixed-world -> moving-world map (mm).
        displacement: ``(ndim, *out_shape)`` mm on the output grid, applied before ``matrix``.
        mode: interpolation; ``"nearest"`` for labels and masks.
        padding_mode: value for points that fall outside ``image``.

    Returns:
        ``(C, *out_shape)`` tensor.
    """
    ndim = image.ndim - 1
    image_affine = _as_matrix(image_affine, ndim)
    matrix = _as_matrix(matrix, ndim)
    out_shape = [int(n) for n in out_shape]
    # output voxel -> moving voxel -> grid_sample's [-1, 1] (align_corners=True) in one affine map,
    # applied axis by axis with broadcasting (no dense world grid, no einsum over it): the sample
    # points of ``sample_at_voxels(image, inv(image_affine) @ matrix @ (world + displacement))``
    to_unit = torch.eye(ndim + 1, dtype=torch.float64)
    to_unit[:ndim, :ndim] = torch.diag(_voxel_to_unit_scale(image))
    to_unit[:ndim, ndim] = -1.0
    world_to_unit = to_unit @ torch.linalg.inv(image_affine) @ matrix
    index_to_unit = world_to_unit @ _as_matrix(out_affine, ndim)
    axes = [
        torch.arange(n, dtype=torch.float64).reshape([n if a == b else 1 for b in range(ndim)])
        for a, n in enumerate(out_shape)
    ]
    disp = None if displacement is None else torch.as_tensor(displacement, dtype=torch.float64)
    dtype = image.dtype if image.dtype.is_floating_point else torch.float32
    # in place, one float64 buffer per axis (fresh full-size temporaries cost more than the arithmetic)
    grid = torch.empty(1, *out_shape, ndim, dtype=dtype)
    coord = torch.empty(out_shape, dtype=torch.float64)
    for i in range(ndim):
        coord.fill_(float(index_to_unit[i, ndim]))
        for j in range(ndim):
            coord.add_(axes[j] * index_to_unit[i, j])
            if disp is not None:
                coord.add_(disp[j], alpha=float(world_to_unit[i, j]))
        grid[..., ndim - 1 - i] = coord  # grid_sample lists the last axis first
    return _grid_sample(image, grid, mode, padding_mode)


def invert_displacement_field(displacement: torch.Tensor, affine, iterations: int = 30) -> torch.Tensor:
    """Inverse of ``x -> x + u(x)`` on the same grid, by fixed-point iteration ``v(x) = -u(x + v(x))``.

    Args:
        displacement: ``u``, ``(ndim, *spatial)`` in mm.
        affine: RAS affine of the grid ``u`` lives on.
        iterations: fixed-point iterations; the iteration converges for fields whose Jacobian has
            no folding (``|grad u| < 1``), which is what the demons smoothing and B-splines give.

    Returns:
        ``v``, ``(ndim, *spatial)`` in mm, such that ``x + v(x) + u(x + v(x)) ~= x``.
    """
    u = torch.as_tensor(displacement, dtype=torch.float64)
    ndim = u.shape[0]
    affine = _as_matrix(affine, ndim)
    to_voxel = torch.linalg.inv(affine)[:ndim, :ndim]
    axes = [torch.arange(int(s), dtype=torch.float64) for s in u.shape[1:]]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    v = -u.clone()
    for _ in range(int(iterations)):
        shift = torch.einsum("ij,j...->i...", to_voxel, v)
        v = -sample_at_voxels(u, base + shift, mode="bilinear", padding_mode="border")
    return v.to(torch.float32)


def compose_displacement(matrix, displacement: torch.Tensor | None, shape: Sequence[int], affine) -> torch.Tensor:
    """The whole mapping as one world displacement ``y(x) - x``, ``(ndim, *shape)`` float32 mm."""
    ndim = len(shape)
    matrix = _as_matrix(matrix, ndim)
    world = grid_world_points(shape, affine)
    moved = world if displacement is None else world + torch.as_tensor(displacement, dtype=torch.float64)
    target = torch.einsum("ij,j...->i...", matrix[:ndim, :ndim], moved) + matrix[:ndim, ndim].reshape(
        ndim, *([1] * ndim)
    )
    return (target - world).to(torch.float32)


def total_displacement(
    matrix,
    displacement: torch.Tensor | None,
    shape: Sequence[int],
    fixed_affine,
    moving_affine=None,
    space: str = "world",
) -> torch.Tensor:
    """Read a registration result back as a dense displacement on the fixed grid.

    Args:
        matrix: fixed-world -> moving-world map.
        displacement: deformable part (mm) or ``None``.
        shape: fixed spatial shape.
        fixed_affine: fixed RAS affine.
        moving_affine: moving RAS affine (needed for ``space="voxel"``).
        space: ``"world"`` -> ``y(x) - x`` in mm (RAS); ``"voxel"`` -> moving voxel index minus fixed
            voxel index, the convention of a pull-back field ``moved(p) = moving(p + d(p))`` when
            both images share a grid.

    Returns:
        ``(ndim, *shape)`` float32.
    """
    if space == "world":
        return compose_displacement(matrix, displacement, shape, fixed_affine)
    if space != "voxel":
        raise ValueError(f"space must be 'world' or 'voxel', got {space!r}.")
    if moving_affine is None:
        raise ValueError("space='voxel' needs moving_affine.")
    ndim = len(shape)
    world = grid_world_points(shape, fixed_affine)
    target = world + compose_displacement(matrix, displacement, shape, fixed_affine).to(torch.float64)
    inv = torch.linalg.inv(_as_matrix(moving_affine, ndim))
    target_vox = torch.einsum("ij,j...->i...", inv[:ndim, :ndim], target) + inv[:ndim, ndim].reshape(
        ndim, *([1] * ndim)
    )
    axes = [torch.arange(int(s), dtype=torch.float64) for s in shape]
    base = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return (target_vox - base).to(torch.float32)
