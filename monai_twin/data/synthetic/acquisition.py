"""Acquisition variability with a known, invertible transform per visit.

A scanner never images the same patient twice in the same pose. The simulators render each visit
*aligned* (in the subject's own reference frame) and then "acquire" it through a transform whose
parameters are recorded, so registration and intensity correction can be scored against truth.

Convention (voxel units, array-index order, as nibabel returns the array)::

    acquired(p) = gain(p) * aligned(p + u(p)) + noise(p)

``u`` is the dense displacement of shape ``(ndim, *spatial)``: for every voxel ``p`` of the
acquired image it says where in the aligned image the scanner sampled (a pull-back field, the
convention of ITK's and MONAI's resampling). ``gain`` is a scalar (2D) or a smooth multiplicative
bias field (3D). :func:`invert_acquisition` undoes both: it inverts ``u`` by fixed-point iteration
and divides the gain out.

* 2D (mammography): rotation about the image centre, shift, a compression-like smooth deformation
  (a stretch across the compression direction that grows towards the nipple, plus a smooth random
  field), a scalar gain and quantum-like Gaussian noise (standard deviation ~ sqrt(signal)).
* 3D (MRI): rigid misalignment (three rotations and a shift), a log-polynomial bias field and
  Rician noise (the magnitude of complex Gaussian noise, as in MR magnitude images).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "AcquisitionTransform",
    "apply_acquisition",
    "identity_grid",
    "invert_acquisition",
    "invert_displacement",
    "sample_acquisition",
    "smooth_random_field",
    "warp",
]

_BIAS_TERMS_3D = 9  # x, y, z, x^2, y^2, z^2, xy, xz, yz


def identity_grid(shape: Sequence[int]) -> np.ndarray:
    """Voxel coordinates of a grid, shape ``(ndim, *shape)`` float32."""
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))


@functools.lru_cache(maxsize=64)
def _spline_weights(n_control: int, size: int) -> np.ndarray:
    """``(size, n_control)`` matrix of 1D cubic-spline interpolation from ``n_control`` knots to ``size`` points."""
    from scipy.ndimage import map_coordinates

    positions = np.linspace(0.0, n_control - 1.0, size)[None]
    # interpolation is linear in the knot values: interpolating each unit vector gives one column
    return np.stack(
        [map_coordinates(np.eye(n_control)[j], positions, order=3, mode="nearest") for j in range(n_control)], axis=1
    )


def smooth_random_field(rng: np.random.Generator, shape: Sequence[int], n_control: int = 6) -> np.ndarray:
    """A smooth zero-mean random field with unit standard deviation, shape ``shape`` float32.

    White noise on a coarse grid of ``n_control`` points per axis, upsampled with cubic
    B-splines. The spline is separable, so the upsampling is one small matrix product per axis --
    far cheaper than interpolating every voxel or a large Gaussian filter, and just as smooth.
    """
    if n_control < 2:
        raise ValueError(f"n_control must be >= 2, got {n_control}.")
    field = rng.standard_normal((n_control,) * len(shape))
    for axis, size in enumerate(shape):
        field = np.moveaxis(np.tensordot(_spline_weights(n_control, int(size)), field, axes=(1, axis)), 0, axis)
    field = field.astype(np.float32)
    field -= field.mean()
    std = float(field.std())
    return field / std if std > 0 else field


def warp(image: np.ndarray, positions: np.ndarray, order: int = 1, mode: str = "nearest") -> np.ndarray:
    """Sample ``image`` (``*spatial``) at ``positions`` (``(ndim, *out_spatial)``, voxels)."""
    from scipy.ndimage import map_coordinates

    return map_coordinates(image, positions, order=order, mode=mode).astype(np.float32, copy=False)


@dataclass(frozen=True)
class AcquisitionTransform:
    """The parameters of one simulated acquisition; every dense field is rebuilt from them.

    Attributes:
        spatial_shape: shape of the image, ``(H, W)`` or ``(H, W, D)``.
        rotation_deg: ``(angle,)`` in 2D; ``(about axis 0, about axis 1, about axis 2)`` in 3D,
            degrees, about the image centre.
        shift: translation in voxels, one per axis.
        compression: 2D only: fractional stretch across axis 1 at the far end of axis 0 (the
            nipple side), growing linearly from 0 at the chest wall.
        deform_amplitude: 2D only: standard deviation of the smooth random displacement, voxels.
        gain: global intensity gain (dimensionless).
        bias_coefficients: 3D only: coefficients of the log bias field over the normalised
            coordinates ``x, y, z, x^2, y^2, z^2, xy, xz, yz`` (each in ``[-1, 1]``).
        noise_sigma: noise standard deviation in units of the image's intensity range.
        noise: ``"gaussian"`` (2D: quantum-like, the standard deviation scales with the square root
            of the signal, so air stays clean) or ``"rician"`` (3D: magnitude of complex Gaussian).
        seed: seeds the smooth random field and the noise, so the same acquisition is
            reproduced exactly whatever the anatomy it images.
    """

    spatial_shape: tuple[int, ...]
    rotation_deg: tuple[float, ...]
    shift: tuple[float, ...]
    compression: float = 0.0
    deform_amplitude: float = 0.0
    gain: float = 1.0
    bias_coefficients: tuple[float, ...] = ()
    noise_sigma: float = 0.0
    noise: str = "gaussian"
    seed: int = 0

    def __post_init__(self) -> None:
        ndim = len(self.spatial_shape)
        if ndim not in (2, 3):
            raise ValueError(f"spatial_shape must have 2 or 3 entries, got {self.spatial_shape}.")
        if len(self.rotation_deg) != (1 if ndim == 2 else 3):
            raise ValueError(
                f"rotation_deg needs {1 if ndim == 2 else 3} angle(s) in {ndim}D, got {self.rotation_deg}."
            )
        if len(self.shift) != ndim:
            raise ValueError(f"shift needs {ndim} entries, got {self.shift}.")
        if self.bias_coefficients and len(self.bias_coefficients) != _BIAS_TERMS_3D:
            raise ValueError(f"bias_coefficients needs {_BIAS_TERMS_3D} entries, got {len(self.bias_coefficients)}.")
        if self.noise not in ("gaussian", "rician"):
            raise ValueError(f"noise must be 'gaussian' or 'rician', got {self.noise!r}.")
        if self.gain <= 0:
            raise ValueError(f"gain must be > 0, got {self.gain}.")

    @property
    def ndim(self) -> int:
        return len(self.spatial_shape)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able parameters (lists instead of tuples)."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def to_json(self) -> str:
        """Parameters as canonical JSON (sorted keys), e.g. for a truth-table column."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, params: Mapping[str, Any] | str) -> AcquisitionTransform:
        """Rebuild from :meth:`to_dict` output or its JSON string."""
        if isinstance(params, str):
            params = json.loads(params)
        values = dict(params)
        for key in ("spatial_shape", "rotation_deg", "shift", "bias_coefficients"):
            if key in values:
                values[key] = tuple(values[key])
        values["spatial_shape"] = tuple(int(s) for s in values["spatial_shape"])
        return cls(**values)

    # -- dense fields ----------------------------------------------------------------------------
    def _rotation_matrix(self) -> np.ndarray:
        if self.ndim == 2:
            a = np.deg2rad(self.rotation_deg[0])
            return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
        ax, ay, az = np.deg2rad(self.rotation_deg)
        rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
        ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
        rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
        return rz @ ry @ rx

    def displacement(self) -> np.ndarray:
        """The dense pull-back displacement ``u``, shape ``(ndim, *spatial_shape)`` float32, voxels."""
        shape = self.spatial_shape
        grid = identity_grid(shape)
        centre = (np.asarray(shape, dtype=np.float32) - 1.0) / 2.0
        rel = grid - centre.reshape((-1,) + (1,) * self.ndim)
        if self.ndim == 2 and (self.compression or self.deform_amplitude):
            # Compression spreads tissue across axis 1, more so far from the chest wall (axis 0 = 0):
            # sampling closer to the centre line stretches the image.
            depth = grid[0] / max(shape[0] - 1, 1)
            stretch = self.compression * depth
            rel = rel.copy()
            rel[1] = rel[1] / (1.0 + stretch)
            if self.deform_amplitude:
                rng = np.random.default_rng([self.seed, 0])
                for axis in range(2):
                    rel[axis] = rel[axis] + self.deform_amplitude * smooth_random_field(rng, shape, 5)
        rot = self._rotation_matrix().astype(np.float32)
        moved = np.tensordot(rot, rel, axes=1)
        moved += (centre + np.asarray(self.shift, dtype=np.float32)).reshape((-1,) + (1,) * self.ndim)
        return (moved - grid).astype(np.float32)

    def inverse_displacement(self) -> np.ndarray:
        """The push-forward ``v`` with ``aligned(q) = acquired(q + v(q)) / gain``, shape ``(ndim, *spatial_shape)``.

        Exact for rigid acquisitions (all 3D ones, and 2D ones without compression or smooth
        deformation); otherwise the fixed-point inverse of :meth:`displacement`.
        """
        if self.compression or self.deform_amplitude:
            return invert_displacement(self.displacement())
        shape = self.spatial_shape
        grid = identity_grid(shape)
        expand = (-1,) + (1,) * self.ndim
        centre = ((np.asarray(shape, dtype=np.float32) - 1.0) / 2.0).reshape(expand)
        shift = np.asarray(self.shift, dtype=np.float32).reshape(expand)
        # acquired p samples aligned R (p - c) + c + t, so aligned q is seen at R^T (q - c - t) + c
        rot_t = self._rotation_matrix().T.astype(np.float32)
        source = np.tensordot(rot_t, grid - centre - shift, axes=1) + centre
        return (source - grid).astype(np.float32)

    def gain_field(self) -> np.ndarray:
        """The multiplicative gain, shape ``spatial_shape`` float32 (constant in 2D)."""
        shape = self.spatial_shape
        if not self.bias_coefficients:
            return np.full(shape, self.gain, dtype=np.float32)
        axes = [np.linspace(-1.0, 1.0, s, dtype=np.float32) for s in shape]
        x, y, z = np.meshgrid(*axes, indexing="ij")
        terms = (x, y, z, x * x, y * y, z * z, x * y, x * z, y * z)
        log_bias = sum(c * t for c, t in zip(self.bias_coefficients, terms))
        return (self.gain * np.exp(log_bias)).astype(np.float32)

    def noise_field(self, intensity_range: float = 1.0) -> tuple[np.ndarray, np.ndarray | None]:
        """The noise draws (real part, imaginary part or ``None``), scaled to ``noise_sigma * intensity_range``."""
        rng = np.random.default_rng([self.seed, 1])
        sigma = self.noise_sigma * intensity_range
        real = (sigma * rng.standard_normal(self.spatial_shape)).astype(np.float32)
        imag = (sigma * rng.standard_normal(self.spatial_shape)).astype(np.float32) if self.noise == "rician" else None
        return real, imag


def sample_acquisition(
    rng: np.random.Generator,
    spatial_shape: Sequence[int],
    *,
    max_rotation_deg: float,
    max_shift: float,
    noise_sigma: float,
    compression: tuple[float, float] = (0.0, 0.0),
    deform_amplitude: float = 0.0,
    gain_range: tuple[float, float] = (1.0, 1.0),
    bias_strength: float = 0.0,
) -> AcquisitionTransform:
    """Draw one acquisition: uniform rotations/shifts within the bounds, the 2D or 3D extras.

    Args:
        rng: the generator to draw from.
        spatial_shape: ``(H, W)`` or ``(H, W, D)``.
        max_rotation_deg: rotations are uniform in ``[-max, max]`` degrees.
        max_shift: shifts are uniform in ``[-max, max]`` voxels per axis.
        noise_sigma: noise standard deviation, fraction of the intensity range.
        compression: 2D: ``(low, high)`` range of the compression stretch.
        deform_amplitude: 2D: standard deviation (voxels) of the smooth random deformation.
        gain_range: ``(low, high)`` range of the global gain.
        bias_strength: 3D: standard deviation of each log-bias coefficient (0 disables the bias).
    """
    shape = tuple(int(s) for s in spatial_shape)
    ndim = len(shape)
    if ndim not in (2, 3):
        raise ValueError(f"spatial_shape must have 2 or 3 entries, got {spatial_shape}.")
    n_angles = 1 if ndim == 2 else 3
    rotation = tuple(float(a) for a in rng.uniform(-max_rotation_deg, max_rotation_deg, n_angles))
    shift = tuple(float(s) for s in rng.uniform(-max_shift, max_shift, ndim))
    comp = float(rng.uniform(*compression)) if ndim == 2 else 0.0
    gain = float(rng.uniform(*gain_range))
    bias = (
        tuple(float(c) for c in rng.normal(0.0, bias_strength, _BIAS_TERMS_3D)) if ndim == 3 and bias_strength else ()
    )
    seed = int(rng.integers(0, 2**31 - 1))
    return AcquisitionTransform(
        spatial_shape=shape,
        rotation_deg=rotation,
        shift=shift,
        compression=comp,
        deform_amplitude=float(deform_amplitude) if ndim == 2 else 0.0,
        gain=gain,
        bias_coefficients=bias,
        noise_sigma=float(noise_sigma),
        noise="gaussian" if ndim == 2 else "rician",
        seed=seed,
    )


def apply_acquisition(
    aligned: np.ndarray,
    transform: AcquisitionTransform,
    intensity_range: float = 1.0,
    noise: bool = True,
    displacement: np.ndarray | None = None,
) -> np.ndarray:
    """Acquire an aligned render: warp by the displacement, multiply by the gain, add noise.

    Args:
        aligned: the noise-free aligned image, shape ``transform.spatial_shape``.
        transform: the acquisition.
        intensity_range: the image's intensity range, which the noise level is a fraction of.
        noise: add the transform's noise (``False`` gives the noise-free acquired image).
        displacement: the transform's dense displacement, when already computed (saves rebuilding it).

    Returns:
        the acquired image, float32, same shape (Rician noise keeps it non-negative).
    """
    aligned = np.asarray(aligned, dtype=np.float32)
    if aligned.shape != transform.spatial_shape:
        raise ValueError(f"aligned has shape {aligned.shape}, the transform expects {transform.spatial_shape}.")
    u = transform.displacement() if displacement is None else displacement
    positions = identity_grid(aligned.shape) + u
    image = warp(aligned, positions, order=3) * transform.gain_field()
    if noise and transform.noise_sigma > 0:
        real, imag = transform.noise_field(intensity_range)
        if imag is not None:
            image = np.sqrt((image + real) ** 2 + imag**2)
        else:
            image = image + real * np.sqrt(np.clip(image / intensity_range, 0.0, None))
    return image.astype(np.float32)


def invert_displacement(displacement: np.ndarray, iterations: int = 30, tolerance: float = 1e-4) -> np.ndarray:
    """The inverse of a pull-back displacement by fixed-point iteration ``v(q) = -u(q + v(q))``.

    Converges when the field's Jacobian stays well away from singular (small rotations, smooth
    deformations), which the simulated acquisitions guarantee; each step shrinks the error by
    about the field's largest gradient, so a handful of steps reach the tolerance.

    Args:
        displacement: ``u``, shape ``(ndim, *spatial)``, voxels.
        iterations: most fixed-point steps.
        tolerance: stop once no voxel's estimate moves by more than this (voxels).

    Returns:
        ``v`` with ``(p + u(p)) + v(p + u(p)) = p``, same shape, float32.
    """
    u = np.asarray(displacement, dtype=np.float32)
    ndim = u.shape[0]
    if u.ndim != ndim + 1:
        raise ValueError(f"displacement must have shape (ndim, *spatial), got {u.shape}.")
    if iterations < 1 or tolerance <= 0:
        raise ValueError(f"need iterations >= 1 and tolerance > 0, got {iterations} and {tolerance}.")
    grid = identity_grid(u.shape[1:])
    v = -u
    for _ in range(iterations):
        positions = grid + v
        updated = -np.stack([warp(u[axis], positions) for axis in range(ndim)])
        step = float(np.abs(updated - v).max())
        v = updated
        if step < tolerance:
            break
    return v


def invert_acquisition(
    acquired: np.ndarray, transform: AcquisitionTransform, displacement: np.ndarray | None = None
) -> np.ndarray:
    """Map an acquired image back into the aligned frame and divide out the gain.

    Args:
        acquired: the acquired image, shape ``transform.spatial_shape``.
        transform: the acquisition that produced it.
        displacement: the saved dense displacement (``(ndim, *spatial)``), inverted numerically;
            when ``None`` the inverse comes from the parameters (exact for rigid acquisitions).

    Returns:
        the estimate of the aligned image, float32 (noise is not removed).

    Example::

        t = AcquisitionTransform.from_dict(truth.loc[0, "acquisition"])
        aligned = invert_acquisition(acquired, t)
    """
    acquired = np.asarray(acquired, dtype=np.float32)
    if acquired.shape != transform.spatial_shape:
        raise ValueError(f"acquired has shape {acquired.shape}, the transform expects {transform.spatial_shape}.")
    if displacement is None:
        inverse = transform.inverse_displacement()
    else:
        inverse = invert_displacement(np.asarray(displacement, dtype=np.float32))
    corrected = acquired / transform.gain_field()
    positions = identity_grid(acquired.shape) + inverse
    return warp(corrected, positions, order=3)
