"""Phantoms with a known world-space truth for the registration tests.

An image is a smooth, asymmetric function ``g`` of RAS world position (a few anisotropic
Gaussian blobs) sampled on a grid given by its affine, so the same anatomy can be sampled on any
grid -- rotated, flipped, anisotropic -- and under any known transform of the world.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor

BLOBS_2D = [
    ((0.0, 0.0), (9.0, 6.0), 1.0),
    ((8.0, 5.0), (3.0, 4.0), 0.8),
    ((-7.0, 6.0), (4.0, 2.5), -0.6),
    ((-4.0, -9.0), (5.0, 3.0), 0.7),
    ((9.0, -7.0), (2.5, 2.5), 0.5),
]
BLOBS_3D = [
    ((0.0, 0.0, 0.0), (8.0, 6.0, 5.0), 1.0),
    ((6.0, 4.0, -3.0), (3.0, 4.0, 3.0), 0.8),
    ((-6.0, 5.0, 3.0), (3.5, 2.5, 3.0), -0.6),
    ((-3.0, -7.0, 4.0), (4.0, 3.0, 2.5), 0.7),
    ((7.0, -5.0, -5.0), (2.5, 2.5, 2.5), 0.5),
]


def world_function(points: np.ndarray) -> np.ndarray:
    """``g`` at world points ``(ndim, ...)`` (mm)."""
    ndim = points.shape[0]
    out = np.zeros(points.shape[1:])
    for centre, sigma, weight in BLOBS_2D if ndim == 2 else BLOBS_3D:
        r2 = sum(((points[i] - centre[i]) / sigma[i]) ** 2 for i in range(ndim))
        out += weight * np.exp(-0.5 * r2)
    return out


def grid_points(shape, affine) -> np.ndarray:
    ndim = len(shape)
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    return np.einsum("ij,j...->i...", affine[:ndim, :ndim], idx) + affine[:ndim, ndim].reshape(ndim, *([1] * ndim))


def centred_affine(shape, spacing, rotation: float = 0.0, flip: tuple[int, ...] = ()) -> np.ndarray:
    """A RAS affine (ndim+1)^2 whose grid centre sits at the world origin; rotation (radians) in-plane."""
    ndim = len(shape)
    c, s = np.cos(rotation), np.sin(rotation)
    rot = np.eye(ndim)
    rot[:2, :2] = [[c, -s], [s, c]]
    scale = np.diag(spacing).astype(float)
    for axis in flip:
        scale[axis, axis] *= -1
    linear = rot @ scale
    affine = np.eye(ndim + 1)
    affine[:ndim, :ndim] = linear
    affine[:ndim, ndim] = -linear @ ((np.asarray(shape) - 1) / 2.0)
    return affine


def to_4x4(affine: np.ndarray) -> torch.Tensor:
    ndim = affine.shape[0] - 1
    if ndim == 3:
        return torch.as_tensor(affine)
    full = np.eye(4)
    full[:2, :2] = affine[:2, :2]
    full[:2, 3] = affine[:2, 2]
    return torch.as_tensor(full)


def phantom(shape, affine, world_map=None) -> MetaTensor:
    """``g`` sampled on a grid; ``world_map(points)`` (optional) is applied to the grid's world points
    first, i.e. the image shows ``g(world_map(x))``."""
    pts = grid_points(shape, affine)
    if world_map is not None:
        pts = world_map(pts)
    img = world_function(pts).astype(np.float32)
    return MetaTensor(torch.as_tensor(img[None]), affine=to_4x4(affine))


def rotation_3d(angles) -> np.ndarray:
    ax, ay, az = angles
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def linear_map(matrix: np.ndarray):
    """``x -> matrix @ x`` on world points ``(ndim, ...)`` with a homogeneous matrix."""
    ndim = matrix.shape[0] - 1

    def apply(points):
        return np.einsum("ij,j...->i...", matrix[:ndim, :ndim], points) + matrix[:ndim, ndim].reshape(
            ndim, *([1] * ndim)
        )

    return apply
