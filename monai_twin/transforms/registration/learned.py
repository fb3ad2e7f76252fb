"""Learned deformable registration with VoxelMorph (voxelmorph 0.3, PyTorch API).

The network (``voxelmorph.nn.models.VxmPairwise``: a U-Net predicting a stationary velocity field,
integrated by scaling and squaring into a diffeomorphic displacement) replaces the *deformable*
stage only: run a linear :class:`~.array.Register` (``("rigid", "affine")``) first, then
:class:`RegisterVoxelMorph` on its output. One forward pass replaces tens of demons iterations.

Training (:func:`train_voxelmorph`) is unsupervised -- image similarity (MSE on normalised
intensities) plus a smoothness penalty on the displacement gradient -- with an optional
supervised term when true fields are known (the synthetic testbed provides them).
:func:`testbed_pairs` builds affinely pre-aligned training pairs from the testbed, and the module
runs as a script to train a model per modality::

    python -m monai_twin.transforms.registration.learned --kind mammo2d --out vxm_mammo2d.pt
    python -m monai_twin.transforms.registration.learned --kind mri_roi3d --out vxm_mri3d.pt

A cascade adds a :class:`ResidualRefiner` after the U-Net: a few convolutions on the
full-resolution images (space-to-depth folded) predict a residual composed with the coarse field,
trained by :func:`train_refiner` from an existing model::

    python -m monai_twin.transforms.registration.learned --kind mammo2d --init vxm_mammo2d.pt \
        --refine-features 16 16 16 --refine-scale 4 --fine-ssim 1.0 --ssim-crop 128 --out vxm_cascade.pt

Weights are saved as a plain dict (``state_dict`` + ``config``) and loaded with
``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms.inverse import InvertibleTransform
from monai.utils import TransformBackends

from .array import Register, _as_image, _spatial_affine
from .functional import resample_through

POOLINGS = ("average", "unshuffle")

__all__ = [
    "RegisterVoxelMorph",
    "ResidualRefiner",
    "ScaledVxmPairwise",
    "build_voxelmorph",
    "compose_displacements",
    "demons_fields",
    "displacement_smoothness",
    "load_voxelmorph",
    "masked_ssim_loss",
    "save_voxelmorph",
    "testbed_pairs",
    "train_refiner",
    "train_voxelmorph",
]


class _BlockMax(torch.nn.Module):
    """``MaxPool{2,3}d(2)`` (stride 2, no padding, odd sizes floored) that takes the maximum of the
    ``2 ** ndim`` strided views pairwise when no gradient is recorded: the same values in about a
    fifth of the time of ``max_pool2d``, which also computes the indices of the maxima. With autograd
    on it is ``max_pool`` itself, so training (and the gradient at ties) is unchanged."""

    def __init__(self, pool: torch.nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.pool, self.spatial_dims = pool, int(spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return self.pool(x)
        x = x[(..., *[slice(0, n - n % 2) for n in x.shape[2:]])]  # odd sizes floored, as max_pool does
        views = [x]
        for axis in range(2, 2 + self.spatial_dims):  # split every view into its even and odd planes
            views = [v[(slice(None),) * axis + (slice(k, None, 2),)] for v in views for k in (0, 1)]
        while len(views) > 1:
            views = [torch.maximum(views[i], views[i + 1]) for i in range(0, len(views), 2)]
        return views[0]


def _fast_max_pools(module: torch.nn.Module, spatial_dims: int) -> None:
    """Wrap every ``MaxPool{2,3}d(kernel_size=2)`` inside ``module`` (the stride-2, unpadded pooling
    of voxelmorph's U-Net) in :class:`_BlockMax`; other poolings are left alone."""
    pool_type = torch.nn.MaxPool2d if spatial_dims == 2 else torch.nn.MaxPool3d
    for name, child in list(module.named_children()):
        plain = (
            isinstance(child, pool_type)
            and all(v == 2 for v in np.atleast_1d(child.kernel_size))
            and all(v == 2 for v in np.atleast_1d(child.stride))
            and all(v == 0 for v in np.atleast_1d(child.padding))
            and all(v == 1 for v in np.atleast_1d(child.dilation))
            and not child.ceil_mode
            and not child.return_indices
        )
        if plain:
            setattr(module, name, _BlockMax(child, spatial_dims))
        else:
            _fast_max_pools(child, spatial_dims)


class ScaledVxmPairwise(torch.nn.Module):
    """``VxmPairwise`` run at ``1/scale`` of the input resolution, its displacement upsampled back.

    The fields left after a linear pre-alignment are smooth (acquisition warps, breathing, patient
    position), so predicting them on a coarser grid loses little and makes the forward pass about
    ``scale ** ndim`` times cheaper. Inputs are zero-padded to a multiple of
    ``scale * 2 ** levels`` (the U-Net halves the grid once per level) and the field is cropped back.

    Args:
        spatial_dims: 2 or 3.
        nb_features: U-Net features per level.
        integration_steps: scaling-and-squaring steps of the stationary velocity field (0: the
            network predicts the displacement directly, not diffeomorphic).
        scale: integer down-sampling factor of the network's grid (1: full resolution).
        pooling: how each image reaches the coarse grid: ``"average"`` (one channel, the mean of each
            ``scale``-wide block) or ``"unshuffle"`` (space-to-depth: every voxel of the block becomes a
            channel, ``scale ** ndim`` channels per image, so the network still sees the fine texture
            that locates a sub-voxel shift, at the cost of a wider first convolution only).

    Shapes: ``forward(source (B, 1, *spatial), target (B, 1, *spatial)) -> (B, ndim, *spatial)``,
    a pull-back displacement in input voxels (``warped(p) = source(p + d(p))``).
    """

    def __init__(
        self,
        spatial_dims: int,
        nb_features: Sequence[int] = (16, 16, 16, 16),
        integration_steps: int = 5,
        scale: int = 1,
        pooling: str = "average",
        refine_features: Sequence[int] = (),
        refine_scale: int = 2,
    ) -> None:
        super().__init__()
        from voxelmorph.nn.models import VxmPairwise

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if int(scale) < 1:
            raise ValueError(f"scale must be an integer >= 1, got {scale}.")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
        self.spatial_dims = int(spatial_dims)
        self.scale = int(scale)
        self.pooling = pooling
        self.nb_features = [int(f) for f in nb_features]
        self.integration_steps = int(integration_steps)
        self.multiple = self.scale * 2 ** len(nb_features)
        channels = self.scale**self.spatial_dims if pooling == "unshuffle" else 1
        self.vxm = VxmPairwise(
            ndim=spatial_dims,
            source_channels=channels,
            target_channels=channels,
            nb_features=list(nb_features),
            integration_steps=int(integration_steps),
        )
        _fast_max_pools(self.vxm, self.spatial_dims)  # holds no weights: the state_dict is unchanged
        self.refine: ResidualRefiner | None = None
        if refine_features:
            if self.multiple % int(refine_scale):
                raise ValueError(
                    f"refine_scale {refine_scale} must divide the padding multiple {self.multiple} (scale * 2**levels)."
                )
            self.refine = ResidualRefiner(self.spatial_dims, refine_features, refine_scale)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        pad: list[int] = []
        for size in reversed(x.shape[2:]):  # F.pad lists the last axis first
            pad += [0, (-size) % self.multiple]
        return F.pad(x, pad) if any(pad) else x

    def coarse(self, x: torch.Tensor) -> torch.Tensor:
        """``x (B, C, *spatial)`` zero-padded to the network's multiple and average-pooled onto its grid
        (a displacement in input voxels must also be divided by ``scale``)."""
        import torch.nn.functional as F

        x = self._pad(x)
        if self.scale > 1:
            pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
            x = pool(x, self.scale)
        return x

    def network_input(self, source: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``source``, ``target (B, 1, *spatial)`` as the U-Net sees them on the coarse grid:
        ``(B, c, *coarse)`` each, ``c`` = 1 (``"average"``) or ``scale ** ndim`` (``"unshuffle"``)."""
        if self.pooling == "average" or self.scale == 1:
            x = self.coarse(torch.cat([source, target], 1))
            return x[:, :1], x[:, 1:]
        x = self._pad(torch.cat([source, target], 1))
        b, s, nd = x.shape[0], self.scale, self.spatial_dims
        coarse_shape = [n // s for n in x.shape[2:]]
        split = [b, 2]
        for n in coarse_shape:
            split += [n, s]
        # (B, 2, n1, s, n2, s[, n3, s]) -> (B, 2, s, s[, s], n1, n2[, n3]): block offsets become channels
        order = [0, 1, *[3 + 2 * a for a in range(nd)], *[2 + 2 * a for a in range(nd)]]
        x = x.reshape(split).permute(order).reshape(b, 2 * s**nd, *coarse_shape)
        c = s**nd
        return x[:, :c], x[:, c:]

    def forward(self, source: torch.Tensor, target: torch.Tensor, refine: bool = True) -> torch.Tensor:
        """The pull-back displacement; ``refine=False`` skips a cascade's refiner (the coarse stage only)."""
        shape = source.shape[2:]
        disp = self.upsample(self.vxm(*self.network_input(source, target)))
        if refine and self.refine is not None:
            disp = self.refined(self._pad(source), self._pad(target), disp)
        crop = (slice(None), slice(None), *[slice(0, n) for n in shape])
        return disp[crop]

    def refined(self, source: torch.Tensor, target: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        """The cascade's second stage on the padded grid: ``source`` warped by the upsampled ``coarse``
        displacement, the refiner's residual ``r`` predicted from it and ``target``, and the total pull-back
        ``r + coarse o (id + r)`` (:func:`compose_displacements`: the coarse warp, then the residual)."""
        if self.refine is None:
            return coarse
        residual = self.refine(_warp(source, coarse), target)
        return compose_displacements(coarse, residual)

    def upsample(self, disp: torch.Tensor) -> torch.Tensor:
        """A displacement on the coarse grid (coarse voxels) -> the padded full-resolution grid (voxels)."""
        import torch.nn.functional as F

        if self.scale == 1:
            return disp
        # avg-pooled voxel i is centred on full-resolution voxel (i + 0.5) * scale - 0.5, which is
        # what align_corners=False assumes; displacements grow with the grid
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return F.interpolate(disp, scale_factor=self.scale, mode=mode, align_corners=False) * self.scale


class ResidualRefiner(torch.nn.Module):
    """A small convolutional head that corrects a displacement at (or near) full resolution.

    It sees the moving image already warped by the coarse field and the fixed image, both
    space-to-depth folded by ``scale`` (every voxel of a ``scale``-wide block becomes a channel, so
    no texture is pooled away), runs a few ``3 x 3`` convolutions on that ``1/scale`` grid, and
    predicts a residual pull-back displacement there, upsampled back to the input grid. Its last
    convolution starts at zero: an untrained head leaves the coarse field unchanged.

    Args:
        spatial_dims: 2 or 3.
        features: channels of each hidden convolution (``LeakyReLU(0.2)`` after each).
        scale: integer grid factor of the head (1: full resolution).

    Shapes: ``forward(warped (B, 1, *spatial), target (B, 1, *spatial)) -> (B, ndim, *spatial)`` in
    input voxels; spatial sizes must be multiples of ``scale``.
    """

    def __init__(self, spatial_dims: int, features: Sequence[int] = (16, 16, 16), scale: int = 2) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        if int(scale) < 1:
            raise ValueError(f"scale must be an integer >= 1, got {scale}.")
        if not features:
            raise ValueError("features needs at least one hidden convolution.")
        self.spatial_dims, self.scale = int(spatial_dims), int(scale)
        conv = torch.nn.Conv2d if spatial_dims == 2 else torch.nn.Conv3d
        layers: list[torch.nn.Module] = []
        channels = 2 * self.scale**self.spatial_dims
        for f in features:
            layers += [conv(channels, int(f), 3, padding=1), torch.nn.LeakyReLU(0.2)]
            channels = int(f)
        self.body = torch.nn.Sequential(*layers)
        self.head = conv(channels, self.spatial_dims, 3, padding=1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def fold(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, C * scale**ndim, *spatial / scale)`` (space-to-depth)."""
        if self.scale == 1:
            return x
        s, nd = self.scale, self.spatial_dims
        coarse = [n // s for n in x.shape[2:]]
        split = [x.shape[0], x.shape[1]]
        for n in coarse:
            split += [n, s]
        order = [0, 1, *[3 + 2 * a for a in range(nd)], *[2 + 2 * a for a in range(nd)]]
        return x.reshape(split).permute(order).reshape(x.shape[0], x.shape[1] * s**nd, *coarse)

    def forward(self, warped: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        if any(n % self.scale for n in warped.shape[2:]):
            raise ValueError(f"spatial shape {tuple(warped.shape[2:])} is not a multiple of scale {self.scale}.")
        r = self.head(self.body(self.fold(torch.cat([warped, target], 1))))
        if self.scale == 1:
            return r
        mode = "bilinear" if self.spatial_dims == 2 else "trilinear"
        return F.interpolate(r, scale_factor=self.scale, mode=mode, align_corners=False) * self.scale


def compose_displacements(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Pull-back displacement of warping by ``first`` and then by ``second`` (voxels, ``(B, ndim, *spatial)``).

    With ``w1(p) = m(p + first(p))`` and ``w2(p) = w1(p + second(p))``, ``w2(p) = m(p + d(p))`` for
    ``d = second + first o (id + second)``: ``first`` is sampled (bilinear, border values outside)
    at the points ``second`` moves to.
    """
    return second + _warp(first, second, padding_mode="border")


def build_voxelmorph(
    spatial_dims: int,
    nb_features: Sequence[int] = (16, 16, 16, 16),
    integration_steps: int = 5,
    scale: int = 1,
    pooling: str = "average",
    refine_features: Sequence[int] = (),
    refine_scale: int = 2,
) -> ScaledVxmPairwise:
    """A :class:`ScaledVxmPairwise` for single-channel pairs (voxelmorph is imported here: it is heavy);
    with ``refine_features`` it is a cascade whose :class:`ResidualRefiner` corrects the coarse field."""
    return ScaledVxmPairwise(
        spatial_dims, nb_features, integration_steps, scale, pooling, refine_features, refine_scale
    )


def displacement_smoothness(disp: torch.Tensor) -> torch.Tensor:
    """Mean squared forward difference of a displacement ``(B, ndim, *spatial)`` (voxels)."""
    ndim = disp.ndim - 2
    total = disp.new_zeros(())
    for axis in range(ndim):
        d = torch.diff(disp, dim=2 + axis)
        total = total + (d * d).mean()
    return total / ndim


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """Scale each image of a batch ``(B, 1, ...)`` to [0, 1] by its 1st-99th percentile range, so a
    model trained on one scanner's intensities sees the same range on another. The percentiles come
    from at most ~16k evenly strided voxels (a full sort of a 128^3 volume costs more than the
    network's forward pass)."""
    flat = x.flatten(1)
    flat = flat[:, :: max(1, flat.shape[1] // 16384)]
    # order statistics by partial selection, not a full sort: the k-th smallest is the last of the k
    # smallest (topk of a 1 % tail: the same values as kthvalue, in half its time; a sixth of torch.quantile's)
    n = flat.shape[1]
    k_lo, k_hi = int(round(0.01 * (n - 1))) + 1, int(round(0.99 * (n - 1))) + 1
    if flat.device.type == "cpu" and not flat.requires_grad:
        # on the CPU one introselect per image finds both order statistics (a quarter less time than
        # the two topk calls; the same values)
        part = np.partition(flat.numpy(), (k_lo - 1, k_hi - 1), axis=1)
        lo, hi = torch.from_numpy(part[:, k_lo - 1].copy()), torch.from_numpy(part[:, k_hi - 1].copy())
    else:
        lo = flat.topk(k_lo, dim=1, largest=False).values[:, -1]
        hi = flat.topk(n - k_hi + 1, dim=1).values[:, -1]
    lo, hi = (v.reshape(-1, *([1] * (x.ndim - 1))) for v in (lo, hi))
    return ((x - lo) / torch.clamp(hi - lo, min=1e-6)).clamp(-0.5, 1.5)


def masked_ssim_loss(warped: torch.Tensor, fixed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 -`` the mean SSIM of ``warped`` against ``fixed`` over ``mask``, all ``(B, 1, *spatial)``.

    The SSIM of :func:`monai_twin.metrics.ssim` (Wang et al. 2004, Gaussian window sigma 1.5
    truncated at 3.5 sigma, ``data_range=1``), differentiable. The window is MONAI's
    (:func:`monai.networks.layers.convutils.gaussian_1d`, sampled and normalised: scipy's), applied
    separably as weighted sums of shifted views over the valid region only -- on one CPU thread about
    twice as fast as :func:`monai.networks.layers.separable_filtering` and four times as fast as the
    dense window of :func:`monai.metrics.regression.compute_ssim_and_cs` (forward and backward). Like
    the metric it drops the border where the window reaches past the image, and it averages over the
    masked voxels of the whole batch: the loss rewards what the benchmark's SSIM over breast tissue
    measures.
    """
    from monai.networks.layers.convutils import gaussian_1d

    kernel = gaussian_1d(torch.tensor(1.5), truncated=3.5, approx="sampled", normalize=True).tolist()
    taps, radius = len(kernel), (len(kernel) - 1) // 2
    # the five local moments in one stack (B, 5, *spatial), each blurred axis by axis
    moments = torch.cat([warped, fixed, warped * warped, fixed * fixed, warped * fixed], 1)
    for axis in range(2, moments.ndim):
        size = moments.shape[axis] - taps + 1
        moments = sum(w * moments.narrow(axis, i, size) for i, w in enumerate(kernel))
    mu_x, mu_y, xx, yy, xy = moments.unbind(1)
    var_x, var_y, cov = xx - mu_x * mu_x, yy - mu_y * mu_y, xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    smap = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    crop = (slice(None), 0, *[slice(radius, n - radius) for n in warped.shape[2:]])
    weight = mask[crop].to(smap.dtype)
    return 1.0 - (smap * weight).sum() / weight.sum().clamp(min=1.0)


def _windowed_ssim_loss(warped: torch.Tensor, fixed: torch.Tensor, crop: int, rng: np.random.Generator) -> torch.Tensor:
    """:func:`masked_ssim_loss` over tissue (fixed image above 0.05) in a random window of side
    ``crop`` per spatial axis (``crop <= 0``: the whole grid)."""
    window: tuple[slice, ...] = (slice(None), slice(None))
    for n in warped.shape[2:]:
        side = min(n, crop) if crop > 0 else n
        first = int(rng.integers(0, n - side + 1))
        window += (slice(first, first + side),)
    w_fix = fixed[window]
    return masked_ssim_loss(warped[window], w_fix, w_fix > 0.05)


def _field_error(disp: torch.Tensor, reference: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared end-point error of ``disp`` against ``reference`` where the fixed image has
    content (above 0.05): in the air around a breast a field is arbitrary and would dominate."""
    content = (fixed > 0.05).to(disp.dtype)
    error = ((disp - reference) ** 2).sum(1, keepdim=True)
    return (error * content).sum() / content.sum().clamp(min=1.0)


def _checked_flip_axes(flip_axes: Sequence[int], spatial_dims: int, pooling: str) -> tuple[int, ...]:
    """The training flips as ints, checked against the dimension and the pooling."""
    flip_axes = tuple(int(a) for a in flip_axes)
    if any(not 0 <= a < spatial_dims for a in flip_axes):
        raise ValueError(f"flip_axes must be spatial axes in [0, {spatial_dims}), got {flip_axes}.")
    if flip_axes and pooling != "average":
        raise ValueError("flip_axes needs pooling='average' (unshuffled channels would need reordering).")
    return flip_axes


def _with_identity_pairs(pairs: Sequence[tuple], identity_fraction: float) -> tuple[list, int, int]:
    """``pairs`` plus ``identity_fraction`` times as many (fixed, fixed, zero field) pairs, their
    fixed images spread over the cohort (pairs of one subject share their fixed visit); returns
    the pairs and the numbers of changed and identity pairs."""
    n_changed = len(pairs)
    n_identity = int(round(identity_fraction * n_changed))
    pairs = list(pairs)
    if n_identity:
        picks = np.linspace(0, n_changed - 1, n_identity).round().astype(int)
        zero = None if pairs[0][2] is None else np.zeros_like(pairs[0][2])
        pairs += [(pairs[i][1], pairs[i][1], zero) for i in picks]
    return pairs, n_changed, n_identity


def _random_flips(
    rng: np.random.Generator,
    flip_axes: Sequence[int],
    images: Sequence[torch.Tensor | None],
    fields: Sequence[torch.Tensor | None],
) -> tuple[list, list]:
    """Flip a batch along each of ``flip_axes`` with probability 1/2 (one draw per axis): the
    ``images`` are mirrored, the displacement ``fields`` mirrored with that axis' component negated
    (``None`` entries stay ``None``)."""
    images, fields = list(images), list(fields)
    for axis in flip_axes:
        if rng.random() < 0.5:
            dims = [2 + axis]
            images = [None if t is None else t.flip(dims) for t in images]
            for i, field in enumerate(fields):
                if field is not None:
                    sign = torch.ones(field.shape[1], dtype=field.dtype).reshape(1, -1, *([1] * (field.ndim - 2)))
                    sign[:, axis] = -1.0
                    fields[i] = field.flip(dims) * sign
    return images, fields


def _halving_schedule(optimiser: torch.optim.Optimizer, steps: int) -> Any:
    """Learning rates halved at 60 % and 85 % of the steps."""
    return torch.optim.lr_scheduler.MultiStepLR(optimiser, milestones=[int(0.6 * steps), int(0.85 * steps)], gamma=0.5)


def _optimise(optimiser: torch.optim.Optimizer, schedule: Any, loss: torch.Tensor) -> float:
    """One optimiser and learning-rate-schedule step on ``loss``; returns its value."""
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    schedule.step()
    return loss.item()


def _log_step(step: int, steps: int, log_every: int, loss: float, start: float, callback: Any, model: Any) -> bool:
    """Print the loss every ``log_every`` steps (and at the last) and run ``callback(step, model)``
    in eval mode then; True when the caller must put its modules back in training mode."""
    if not log_every or not (step % log_every == 0 or step == steps - 1):
        return False
    print(f"step {step:5d}  loss {loss:.5f}  ({time.perf_counter() - start:.0f} s)", flush=True)
    if callback is None:
        return False
    model.eval()
    with torch.no_grad():
        callback(step, model)
    return True


_IDENTITY_GRIDS: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _identity_grid(disp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The voxel grid ``(ndim, *spatial)`` of a displacement ``(B, ndim, *spatial)`` and the divisor
    ``max(size - 1, 1)`` per axis ``(1, ndim, 1, ...)``, built once per shape, dtype and device (a few
    recent ones are kept: inference sees the same grid on every call)."""
    key = (tuple(disp.shape[2:]), disp.dtype, disp.device)
    cached = _IDENTITY_GRIDS.get(key)
    if cached is None:
        ndim = disp.shape[1]
        axes = [torch.arange(n, dtype=disp.dtype, device=disp.device) for n in disp.shape[2:]]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
        sizes = torch.tensor(disp.shape[2:], dtype=disp.dtype, device=disp.device).reshape(1, ndim, *([1] * ndim))
        cached = (grid, torch.clamp(sizes - 1.0, min=1.0))
        if len(_IDENTITY_GRIDS) >= 8:
            _IDENTITY_GRIDS.pop(next(iter(_IDENTITY_GRIDS)))
        _IDENTITY_GRIDS[key] = cached
    return cached


def _warp(image: torch.Tensor, disp: torch.Tensor, padding_mode: str = "zeros") -> torch.Tensor:
    """``image (B, C, *spatial)`` pulled back through voxel displacements ``(B, ndim, *spatial)``."""
    import torch.nn.functional as F

    ndim = disp.shape[1]
    grid, divisor = _identity_grid(disp)
    # 2 (grid + disp) / (size - 1) - 1, in place on the one new tensor (the same arithmetic, in order)
    norm = (grid + disp).mul_(2.0).div_(divisor).sub_(1.0)
    norm = norm.flip(1).permute(0, *range(2, ndim + 2), 1)
    return F.grid_sample(image, norm, mode="bilinear", padding_mode=padding_mode, align_corners=True)


def train_voxelmorph(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    spatial_dims: int,
    steps: int = 300,
    batch_size: int = 2,
    learning_rate: float = 1e-3,
    smoothness: float = 0.05,
    supervised: float = 0.0,
    nb_features: Sequence[int] = (16, 16, 16, 16),
    integration_steps: int = 5,
    scale: int = 1,
    pooling: str = "average",
    similarity: float = 1.0,
    fine_similarity: float = 0.0,
    fine_ssim: float = 0.0,
    ssim_crop: int = 0,
    teacher_fields: Sequence[np.ndarray] | np.ndarray | None = None,
    distill: float = 0.0,
    seed: int = 0,
    identity_fraction: float = 0.0,
    flip_axes: Sequence[int] = (),
    initial_state: dict[str, torch.Tensor] | None = None,
    out: str | os.PathLike | None = None,
    log_every: int = 50,
    callback: Any = None,
    config_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a :class:`ScaledVxmPairwise` on ``(moving, fixed, true_field_or_None)`` pairs.

    The loss is ``similarity`` times the mean squared difference of the normalised fixed image and the warped moving
    image, plus ``smoothness`` times :func:`displacement_smoothness`, plus ``supervised`` times the
    mean squared end-point error to the true field when it is known, averaged where the normalised
    fixed image exceeds 0.05 (the field cannot be seen in empty background). Everything is computed
    on the network's coarse grid (displacements in coarse voxels): the fields after a linear
    pre-alignment are smooth enough that pooling them by 4 changes them by ~0.01 px on the testbed. Adam, with the
    learning rate halved at 60 % and 85 % of the steps.

    Args:
        pairs: spatial arrays ``(H, W[, D])`` of one shape, pre-aligned linearly; the optional true
            field is the pull-back displacement in voxels ``(ndim, H, W[, D])``.
        spatial_dims: 2 or 3.
        steps: optimiser steps.
        batch_size: pairs per step.
        learning_rate: initial Adam learning rate.
        smoothness: weight of :func:`displacement_smoothness`.
        supervised: weight of the squared error to the true field (0 = unsupervised).
        nb_features: U-Net features per level.
        integration_steps: scaling-and-squaring steps (0 = plain displacement, not diffeomorphic).
        scale: the network works on a grid ``scale`` times coarser (see :class:`ScaledVxmPairwise`).
        pooling: how the images reach that grid, ``"average"`` or ``"unshuffle"`` (see
            :class:`ScaledVxmPairwise`); the losses always compare average-pooled images.
        similarity: weight of the image term (0: supervised only).
        fine_similarity: weight of a second image term at full resolution: the coarse displacement
            upsampled as at inference, the full-resolution moving image warped through it and compared
            with the full-resolution fixed image (mean squared difference of normalised intensities).
            The coarse term cannot see a misalignment finer than the pooling; this one can, and it is
            what SSIM over the registered image rewards.
        fine_ssim: weight of ``1 -`` SSIM between the same full-resolution warped moving and fixed
            images, over the voxels where the normalised fixed image exceeds 0.05 (see :func:`masked_ssim_loss`).
        ssim_crop: side of the square (cube) window of the full-resolution grid the SSIM term is computed
            on, at a random position each step (0: the whole grid); a 128 window of a 256^2 image is
            about four times cheaper.
        teacher_fields: one pull-back displacement in voxels ``(ndim, H, W[, D])`` per pair, e.g. the
            classical step's fields from :func:`demons_fields` (distillation); identity pairs get zero.
        distill: weight of the squared error to ``teacher_fields`` where the image has content (as the
            supervised term), on the coarse grid.
        seed: torch and numpy seed (initialisation and batch order).
        identity_fraction: adds ``round(identity_fraction * len(pairs))`` pairs of a fixed image
            against itself with a zero true field (an unchanged follow-up), so the model does not
            learn a bias towards the typical residual of the changed pairs.
        flip_axes: spatial axes along which each batch is mirrored with probability 1/2 (images and
            true field, whose component along the axis changes sign); ``"average"`` pooling only.
        initial_state: a ``state_dict`` of the same architecture to start from (fine-tuning).
        out: where to save the weights: a bare ``state_dict`` (``.pt``) and its architecture and
            training record next to it (same name, ``.json``), both written atomically.
        log_every: print the loss every so many steps (0 = silent).
        callback: called as ``callback(step, model)`` at every logged step (e.g. a validation score;
            the model is in eval mode during the call).
        config_extra: more entries for the JSON record (training command, measured figures, ...).

    Returns:
        ``{"model": the trained module, "losses": [...], "seconds": float, "path": out, "config": {...}}``.
    """
    if not pairs:
        raise ValueError("train_voxelmorph needs at least one (moving, fixed, field) pair.")
    shapes = {tuple(np.shape(p[0])) for p in pairs} | {tuple(np.shape(p[1])) for p in pairs}
    if len(shapes) != 1 or len(next(iter(shapes))) != spatial_dims:
        raise ValueError(f"all pairs must share one {spatial_dims}D shape, got {sorted(shapes)}.")
    if supervised > 0 and any(p[2] is None for p in pairs):
        raise ValueError("supervised > 0 needs a true field in every pair.")
    if distill > 0 and (teacher_fields is None or len(teacher_fields) != len(pairs)):
        raise ValueError("distill > 0 needs teacher_fields, one per pair.")
    if teacher_fields is not None and any(
        np.shape(t) != (spatial_dims, *np.shape(pairs[0][0])) for t in teacher_fields
    ):
        raise ValueError(f"teacher_fields must be ({spatial_dims}, *spatial) displacements, one per pair.")
    if identity_fraction < 0:
        raise ValueError(f"identity_fraction must be >= 0, got {identity_fraction}.")
    flip_axes = _checked_flip_axes(flip_axes, spatial_dims, pooling)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs, n_changed, n_identity = _with_identity_pairs(pairs, identity_fraction)
    if n_identity:
        if teacher_fields is not None:
            teacher_fields = [*teacher_fields, *[np.zeros_like(teacher_fields[0])] * n_identity]
    model = build_voxelmorph(spatial_dims, nb_features, integration_steps, scale, pooling)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    model.train()
    # the network only ever sees the coarse grid, so training runs there: images and true fields are
    # padded and pooled once (fields in coarse voxels), and the losses cost scale**ndim times less
    with torch.no_grad():
        moving_full = _normalise(torch.as_tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)[:, None])
        fixed_full = _normalise(torch.as_tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)[:, None])
        source, target = model.network_input(moving_full, fixed_full)
        moving, fixed = model.coarse(moving_full), model.coarse(fixed_full)
        # full-resolution images only for the fine term, padded like the network's input
        fine = fine_similarity > 0 or fine_ssim > 0
        moving_full, fixed_full = (model._pad(moving_full), model._pad(fixed_full)) if fine else (None, None)
        fields = teachers = None
        if supervised > 0:
            fields = model.coarse(torch.as_tensor(np.stack([p[2] for p in pairs]), dtype=torch.float32)) / model.scale
        if distill > 0:
            teachers = (
                torch.cat(
                    [  # pooled in chunks: the full-resolution stack of a large cohort is big
                        model.coarse(torch.as_tensor(np.stack(teacher_fields[i : i + 256]), dtype=torch.float32))
                        for i in range(0, len(pairs), 256)
                    ]
                )
                / model.scale
            )
    net = model.vxm
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate)
    schedule = _halving_schedule(optimiser, steps)
    losses = []
    start = time.perf_counter()
    for step in range(int(steps)):
        idx = torch.as_tensor(rng.choice(len(pairs), size=min(batch_size, len(pairs)), replace=False))
        b_src, b_tgt, b_mov, b_fix = source[idx], target[idx], moving[idx], fixed[idx]
        b_field = None if fields is None else fields[idx]
        b_teacher = None if teachers is None else teachers[idx]
        b_mov_full = None if moving_full is None else moving_full[idx]
        b_fix_full = None if fixed_full is None else fixed_full[idx]
        (b_src, b_tgt, b_mov, b_fix, b_mov_full, b_fix_full), (b_field, b_teacher) = _random_flips(
            rng, flip_axes, (b_src, b_tgt, b_mov, b_fix, b_mov_full, b_fix_full), (b_field, b_teacher)
        )
        disp = net(b_src, b_tgt)
        warped = _warp(b_mov, disp)
        loss = similarity * torch.mean((warped - b_fix) ** 2) + smoothness * displacement_smoothness(disp)
        if b_mov_full is not None:
            warped_full = _warp(b_mov_full, model.upsample(disp))
            if fine_similarity > 0:
                loss = loss + fine_similarity * torch.mean((warped_full - b_fix_full) ** 2)
            if fine_ssim > 0:
                loss = loss + fine_ssim * _windowed_ssim_loss(warped_full, b_fix_full, ssim_crop, rng)
        for weight, reference in ((supervised, b_field), (distill, b_teacher)):
            if reference is not None:
                loss = loss + weight * _field_error(disp, reference, b_fix)
        losses.append(_optimise(optimiser, schedule, loss))
        if _log_step(step, steps, log_every, losses[-1], start, callback, model):
            model.train()
    model.eval()
    seconds = time.perf_counter() - start
    config: dict[str, Any] = {
        "architecture": {
            "spatial_dims": int(spatial_dims),
            "nb_features": [int(f) for f in nb_features],
            "integration_steps": int(integration_steps),
            "scale": int(scale),
            "pooling": pooling,
        },
        "training": {
            "pairs": n_changed,
            "identity_pairs": n_identity,
            "steps": int(steps),
            "batch_size": int(batch_size),
            "learning_rate": float(learning_rate),
            "similarity": float(similarity),
            "fine_similarity": float(fine_similarity),
            "fine_ssim": float(fine_ssim),
            "ssim_crop": int(ssim_crop),
            "distill": float(distill),
            "smoothness": float(smoothness),
            "supervised": float(supervised),
            "seed": int(seed),
            "flip_axes": list(flip_axes),
            "fine_tuned": initial_state is not None,
            "seconds": round(seconds, 1),
            "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        },
    }
    return _training_result(model, losses, seconds, config, config_extra, out)


def train_refiner(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    model: ScaledVxmPairwise,
    steps: int = 3000,
    batch_size: int = 8,
    learning_rate: float = 1e-3,
    similarity: float = 1.0,
    ssim: float = 1.0,
    ssim_crop: int = 0,
    smoothness: float = 0.05,
    supervised: float = 0.0,
    coarse_learning_rate: float = 0.0,
    seed: int = 0,
    identity_fraction: float = 0.0,
    flip_axes: Sequence[int] = (),
    out: str | os.PathLike | None = None,
    log_every: int = 50,
    callback: Any = None,
    config_extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train the :class:`ResidualRefiner` of a cascade (``model.refine``) on full-resolution pairs.

    The coarse U-Net's displacement is upsampled as at inference, the moving image warped through it,
    the refiner's residual composed with it (:meth:`ScaledVxmPairwise.refined`) and the moving image
    warped through the total field. The loss, all on the full-resolution grid (normalised intensities):
    ``similarity`` times the mean squared difference to the fixed image, plus ``ssim`` times ``1 -``
    SSIM over tissue (:func:`masked_ssim_loss`, fixed image above 0.05), plus ``smoothness`` times
    :func:`displacement_smoothness` of the *residual*, plus ``supervised`` times the squared error of
    the total field to the true one over tissue. With ``coarse_learning_rate == 0`` the coarse
    network is frozen and its displacement is computed once per pair before training (the refiner
    then costs most of a step); otherwise it is fine-tuned with that learning rate. Adam, learning
    rates halved at 60 % and 85 % of the steps.

    Args:
        pairs: ``(moving, fixed, true_field_or_None)`` as for :func:`train_voxelmorph`.
        model: a cascade (built with ``refine_features``), its coarse stage typically trained already.
        steps, batch_size, learning_rate, seed: as for :func:`train_voxelmorph`.
        identity_fraction, flip_axes, out: as for :func:`train_voxelmorph`.
        log_every, callback, config_extra: as for :func:`train_voxelmorph`.
        similarity, ssim, smoothness, supervised: loss weights (see above).
        ssim_crop: side of the random window the SSIM term is computed on (0: the whole grid).
        coarse_learning_rate: learning rate of the coarse U-Net (0: frozen).

    Returns:
        ``{"model", "losses", "seconds", "path", "config"}`` as :func:`train_voxelmorph`; the config's
        ``"architecture"`` includes the refiner, ``"refiner_training"`` the settings above.
    """
    if model.refine is None:
        raise ValueError("train_refiner needs a cascade: build the model with refine_features.")
    if not pairs:
        raise ValueError("train_refiner needs at least one (moving, fixed, field) pair.")
    spatial_dims = model.spatial_dims
    shapes = {tuple(np.shape(p[0])) for p in pairs} | {tuple(np.shape(p[1])) for p in pairs}
    if len(shapes) != 1 or len(next(iter(shapes))) != spatial_dims:
        raise ValueError(f"all pairs must share one {spatial_dims}D shape, got {sorted(shapes)}.")
    if supervised > 0 and any(p[2] is None for p in pairs):
        raise ValueError("supervised > 0 needs a true field in every pair.")
    flip_axes = _checked_flip_axes(flip_axes, spatial_dims, model.pooling)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pairs, n_changed, n_identity = _with_identity_pairs(pairs, identity_fraction)
    frozen = coarse_learning_rate <= 0
    model.eval()
    model.refine.train()
    if frozen:
        model.vxm.requires_grad_(False)
    else:
        model.vxm.train()
    with torch.no_grad():
        moving = model._pad(_normalise(torch.as_tensor(np.stack([p[0] for p in pairs]), dtype=torch.float32)[:, None]))
        fixed = model._pad(_normalise(torch.as_tensor(np.stack([p[1] for p in pairs]), dtype=torch.float32)[:, None]))
        fields = None
        if supervised > 0:
            fields = model._pad(torch.as_tensor(np.stack([p[2] for p in pairs]), dtype=torch.float32))
        coarse = None
        if frozen:
            # the coarse network's output on its own grid, once per pair (upsampled per batch)
            coarse = torch.cat(
                [
                    model.vxm(*model.network_input(moving[i : i + 64], fixed[i : i + 64]))
                    for i in range(0, len(pairs), 64)
                ]
            )
    groups = [{"params": list(model.refine.parameters()), "lr": learning_rate}]
    if not frozen:
        groups.append({"params": list(model.vxm.parameters()), "lr": coarse_learning_rate})
    optimiser = torch.optim.Adam(groups)
    schedule = _halving_schedule(optimiser, steps)
    losses = []
    start = time.perf_counter()
    for step in range(int(steps)):
        idx = torch.as_tensor(rng.choice(len(pairs), size=min(batch_size, len(pairs)), replace=False))
        b_mov, b_fix = moving[idx], fixed[idx]
        b_field = None if fields is None else fields[idx]
        b_coarse = None if coarse is None else coarse[idx]
        (b_mov, b_fix), (b_field, b_coarse) = _random_flips(rng, flip_axes, (b_mov, b_fix), (b_field, b_coarse))
        if b_coarse is None:
            b_coarse = model.vxm(*model.network_input(b_mov, b_fix))
        up = model.upsample(b_coarse)
        residual = model.refine(_warp(b_mov, up), b_fix)
        disp = compose_displacements(up, residual)
        warped = _warp(b_mov, disp)
        loss = similarity * torch.mean((warped - b_fix) ** 2) + smoothness * displacement_smoothness(residual)
        if ssim > 0:
            loss = loss + ssim * _windowed_ssim_loss(warped, b_fix, ssim_crop, rng)
        if b_field is not None:
            loss = loss + supervised * _field_error(disp, b_field, b_fix)
        losses.append(_optimise(optimiser, schedule, loss))
        if _log_step(step, steps, log_every, losses[-1], start, callback, model):
            model.refine.train()
            if not frozen:
                model.vxm.train()
    model.vxm.requires_grad_(True)
    model.eval()
    seconds = time.perf_counter() - start
    refine = model.refine
    config: dict[str, Any] = {
        "architecture": {
            "spatial_dims": spatial_dims,
            "nb_features": [int(f) for f in model.nb_features],
            "integration_steps": int(model.integration_steps),
            "scale": model.scale,
            "pooling": model.pooling,
            "refine_features": [int(m.out_channels) for m in refine.body if hasattr(m, "out_channels")],
            "refine_scale": refine.scale,
        },
        "refiner_training": {
            "pairs": n_changed,
            "identity_pairs": n_identity,
            "steps": int(steps),
            "batch_size": int(batch_size),
            "learning_rate": float(learning_rate),
            "coarse_learning_rate": float(coarse_learning_rate),
            "similarity": float(similarity),
            "ssim": float(ssim),
            "ssim_crop": int(ssim_crop),
            "smoothness": float(smoothness),
            "supervised": float(supervised),
            "seed": int(seed),
            "flip_axes": list(flip_axes),
            "seconds": round(seconds, 1),
            "final_loss_mean_last_50": float(np.mean(losses[-50:])),
        },
    }
    return _training_result(model, losses, seconds, config, config_extra, out)


def _training_result(
    model: ScaledVxmPairwise,
    losses: list[float],
    seconds: float,
    config: dict[str, Any],
    config_extra: dict[str, Any] | None,
    out: str | os.PathLike | None,
) -> dict[str, Any]:
    """What a trainer returns: the model, its losses and record, saved to ``out`` when given."""
    config.update(config_extra or {})
    result: dict[str, Any] = {"model": model, "losses": losses, "seconds": seconds, "path": None, "config": config}
    if out is not None:
        save_voxelmorph(model, out, config)
        result["path"] = Path(out)
    return result


def save_voxelmorph(model: ScaledVxmPairwise, path: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write ``model.state_dict()`` to ``path`` and ``config`` (needs an ``"architecture"`` entry with
    :func:`build_voxelmorph`'s arguments) to the ``.json`` next to it, each atomically."""
    import json

    from monai_twin.utils.io import atomic_output_path

    if "architecture" not in config:
        raise ValueError("config needs an 'architecture' entry (build_voxelmorph's arguments).")
    path = Path(path)
    with atomic_output_path(path) as tmp:
        torch.save(model.state_dict(), tmp)
    with atomic_output_path(path.with_suffix(".json")) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2) + "\n")


def load_voxelmorph(path: str | os.PathLike) -> ScaledVxmPairwise:
    """Rebuild a model saved by :func:`train_voxelmorph` / :func:`save_voxelmorph`.

    The weights load with ``torch.load(..., weights_only=True)`` (no code is unpickled); the
    architecture comes from the ``.json`` next to them.
    """
    import json

    path = Path(path)
    meta = path.with_suffix(".json")
    if not meta.is_file():
        raise ValueError(f"{path} has no {meta.name} next to it: the architecture of the weights is unknown.")
    config = json.loads(meta.read_text())
    if "architecture" not in config:
        raise ValueError(f"{meta} is not a monai_twin VoxelMorph record (expected an 'architecture' entry).")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} is not a monai_twin VoxelMorph checkpoint (expected a state_dict of tensors).")
    arch = config["architecture"]
    model = build_voxelmorph(
        int(arch["spatial_dims"]),
        arch["nb_features"],
        int(arch["integration_steps"]),
        int(arch.get("scale", 1)),
        arch.get("pooling", "average"),
        # weights saved before the cascade have no refiner
        [int(f) for f in arch.get("refine_features", [])],
        int(arch.get("refine_scale", 2)),
    )
    model.load_state_dict(state)
    model.eval()
    return model


class RegisterVoxelMorph(InvertibleTransform):
    """Deformable registration by a trained VoxelMorph model.

    The moving image is first resampled onto the fixed grid through world coordinates (pass the
    output of a linear :class:`~.array.Register` so the residual is small), the network predicts a
    pull-back displacement in voxels, and the result is recorded like any :class:`~.array.Register`
    result (matrix = identity, displacement in mm), so :func:`~.array.registration_displacement`,
    :meth:`inverse` and :meth:`apply_recorded` work the same way.

    Args:
        model: a path saved by :func:`train_voxelmorph` or a ``VxmPairwise`` module.
        mode: interpolation of the output.
        padding_mode: padding outside the moving image.
        device: torch device for the forward pass.
        refine: run a cascade's :class:`ResidualRefiner` after the coarse U-Net (``False``: the coarse
            stage alone, a little faster and less accurate; no effect on weights without a refiner).

    Example::

        linear = Register(stages=("rigid", "affine"))
        learned = RegisterVoxelMorph("vxm_mammo2d.pt")
        registered = learned(linear(moving, fixed), fixed)
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        model: str | os.PathLike | torch.nn.Module,
        mode: str = "bilinear",
        padding_mode: str = "zeros",
        device: str | torch.device = "cpu",
        refine: bool = True,
    ) -> None:
        self.refine = bool(refine)
        self.model = load_voxelmorph(model) if isinstance(model, (str, os.PathLike)) else model
        if not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model must be a checkpoint path or a torch module, got {type(model).__name__}.")
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        # resampling and recording are Register's, so records and inverses are interchangeable
        self._applier = Register(mode=mode, padding_mode=padding_mode)

    def compute(self, img: Any, fixed: Any) -> dict[str, Any]:
        """Predict the displacement; return a record (see :func:`~.array.registration_record`)."""
        moving = _as_image(img, "moving image")
        fixed_img = _as_image(fixed, "fixed image")
        if moving.ndim != fixed_img.ndim:
            raise ValueError(
                f"moving image is {moving.ndim - 1}D but fixed image is {fixed_img.ndim - 1}D: both must match."
            )
        ndim = fixed_img.ndim - 1
        m_aff, f_aff = _spatial_affine(moving), _spatial_affine(fixed_img)
        shape = tuple(int(s) for s in fixed_img.shape[1:])
        ident = torch.eye(ndim + 1, dtype=torch.float64)
        on_grid = moving.as_tensor().float()[:1]
        if tuple(on_grid.shape[1:]) != shape or not torch.allclose(m_aff, f_aff):
            on_grid = resample_through(on_grid, m_aff, f_aff, shape, ident)
        for name, x in (("moving image", on_grid), ("fixed image", fixed_img.as_tensor())):
            # one pass: a NaN propagates to both extremes, an infinite voxel is one of them
            lo, hi = (float(v) for v in torch.aminmax(x))
            if not (np.isfinite(lo) and np.isfinite(hi)):
                raise ValueError(f"{name} has NaN/infinite voxels; clean it before the learned registration.")
            if hi == lo:
                raise ValueError(f"{name} is constant: an empty or blank image cannot be registered.")
        pair = _normalise(torch.stack([on_grid, fixed_img.as_tensor().float()[:1]]).to(self.device))
        source, target = pair[:1], pair[1:]
        with torch.inference_mode():  # no autograd bookkeeping at all (no_grad still tracks versions)
            disp = self.model(source, target) if self.refine else self.model(source, target, refine=False)
        disp_vox = disp.cpu()[0]
        # voxel pull-back on the fixed grid -> mm in RAS world: rotate/scale by the grid's linear part
        # (in float32, the field's precision: a float64 copy of the field costs more than the network's input)
        disp_mm = torch.einsum("ij,j...->i...", f_aff[:ndim, :ndim].to(disp_vox.dtype), disp_vox)
        return {
            "stages": ["voxelmorph"],
            "src_affine": m_aff,
            "dst_affine": f_aff,
            "src_shape": tuple(int(s) for s in moving.shape[1:]),
            "dst_shape": shape,
            "matrix": ident,
            "displacement": disp_mm,
            "failed": None,
            "metric_values": {},
            "iterations": {},
        }

    def apply_recorded(self, img: Any, record: dict, mode: str | None = None, padding_mode: str | None = None):
        """Send another image (a label: ``mode="nearest"``) through a computed record."""
        return self._applier.apply_recorded(img, record, mode=mode, padding_mode=padding_mode)

    def __call__(self, img: Any, fixed: Any) -> MetaTensor:
        """
        Args:
            img: moving image ``(C, H, W[, D])`` (ideally already linearly aligned to ``fixed``).
            fixed: reference ``(C', H, W[, D])``.

        Returns:
            the moving image on the fixed grid after the learned deformation.
        """
        from .array import _before_metrics

        record = self.compute(img, fixed)
        moving = _as_image(img, "moving image")
        record.update(_before_metrics(moving, _as_image(fixed, "fixed image"), record, 0))
        return self._applier.apply_recorded(moving, record)

    def inverse(self, data: MetaTensor) -> MetaTensor:
        return self._applier.inverse(data)


def testbed_pairs(
    kind: str, n_subjects: int, seed: int = 0, visits_per_subject: int = 3, linear: Sequence[str] = ("rigid", "affine")
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Training pairs from the synthetic testbed: later visits linearly pre-aligned to visit 0.

    Returns ``(moving_after_linear, fixed, residual_true_field)`` with the field in voxels: what the
    deformable stage still has to recover after the linear stages, known exactly because both
    acquisitions are.
    """
    from monai_twin.data.synthetic.acquisition import identity_grid, invert_displacement, warp
    from monai_twin.data.synthetic.cohort import resimulate, simulate_subject

    from .array import registration_record

    reg = Register(stages=tuple(linear))
    pairs = []
    for i in range(n_subjects):
        subject = simulate_subject(kind, i, seed=seed)
        visits = resimulate(subject)
        sp = subject.config.spacing
        ndim = visits.images.ndim - 1
        affine = torch.eye(4, dtype=torch.float64)
        affine[:ndim, :ndim] *= sp
        fixed = MetaTensor(torch.as_tensor(visits.images[0][None]), affine=affine)
        u0 = subject.acquisitions[0].displacement()
        grid = identity_grid(u0.shape[1:])
        p0 = grid + u0
        for k in range(1, min(visits_per_subject, len(visits.images))):
            moving = MetaTensor(torch.as_tensor(visits.images[k][None]), affine=affine)
            out = reg(moving, fixed)
            vk = invert_displacement(subject.acquisitions[k].displacement(), iterations=20)
            target = p0 + np.stack([warp(vk[a], p0) for a in range(ndim)])  # true moving voxel per fixed voxel
            # the linear stage maps fixed voxel p to moving voxel L p; the residual r solves L(p + r) = target
            world = registration_record(out)["matrix"].numpy()
            lin = np.linalg.inv(_spatial_affine(moving).numpy()) @ world @ _spatial_affine(fixed).numpy()
            inv = np.linalg.inv(lin)
            pre = np.tensordot(inv[:ndim, :ndim], target, axes=1) + inv[:ndim, ndim].reshape(-1, *([1] * ndim))
            pairs.append((out[0].numpy(), visits.images[0], (pre - grid).astype(np.float32)))
    return pairs


def _ssim_gain(registered: np.ndarray, moving: np.ndarray, fixed: np.ndarray) -> float:
    """SSIM gain over breast tissue of a registered mammogram over its pre-aligned moving image
    (as ``benchmarks/registration_accuracy.py`` measures it: raw intensities, ``data_range=1``,
    tissue where the fixed image exceeds 0.1)."""
    from monai_twin.metrics import ssim

    tissue = fixed > 0.1
    return ssim(registered, fixed, data_range=1.0, mask=tissue) - ssim(moving, fixed, data_range=1.0, mask=tissue)


def _demons_step(moving: np.ndarray, fixed: np.ndarray, spacing: float) -> MetaTensor:
    """The default fast-symmetric demons step (SimpleITK through :class:`~.array.Register`, one
    thread) on one pre-aligned pair with isotropic pixel ``spacing`` in mm, as the benchmark runs it."""
    step = Register(stages=("fast_symmetric_demons",), num_threads=1)
    affine = torch.diag(torch.tensor([spacing] * moving.ndim + [1.0] * (4 - moving.ndim), dtype=torch.float64))
    return step(
        MetaTensor(torch.as_tensor(moving)[None], affine=affine),
        MetaTensor(torch.as_tensor(fixed)[None], affine=affine),
    )


def _demons_gains(pairs: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], spacing: float) -> list[float]:
    """SSIM gain of the default fast-symmetric demons step (one thread) on each pre-aligned pair
    (isotropic pixel ``spacing`` in mm, as the benchmark passes it)."""
    return [_ssim_gain(_demons_step(moving, fixed, spacing)[0].numpy(), moving, fixed) for moving, fixed, _ in pairs]


def demons_fields(
    pairs: Sequence[tuple[np.ndarray, np.ndarray, Any]], spacing: float, log_every: int = 0
) -> np.ndarray:
    """Pull-back displacements (voxels) of the classical deformable step on each pre-aligned pair.

    The teacher of the distillation term of :func:`train_voxelmorph`: the default fast-symmetric
    demons step (SimpleITK, through :class:`~.array.Register`, one thread) run on ``(moving, fixed)``
    with isotropic pixel ``spacing`` in mm, its field read back with
    :func:`~.array.registration_displacement` (``registered(p) = moving(p + d(p))``).

    Args:
        pairs: ``(moving, fixed, anything)`` with spatial arrays ``(H, W[, D])`` of one shape.
        spacing: isotropic pixel spacing in mm (the demons step's smoothing is in physical units).
        log_every: print progress every so many pairs (0 = silent).

    Returns:
        ``(len(pairs), ndim, H, W[, D])`` float32.
    """
    from .array import registration_displacement

    start = time.perf_counter()
    fields = []
    for i, (moving, fixed, *_) in enumerate(pairs):
        out = _demons_step(np.asarray(moving, dtype=np.float32), np.asarray(fixed, dtype=np.float32), spacing)
        fields.append(registration_displacement(out, space="voxel").numpy().astype(np.float32))
        if log_every and (i + 1) % log_every == 0:
            print(f"  demons field {i + 1}/{len(pairs)} ({time.perf_counter() - start:.0f} s)", flush=True)
    return np.stack(fields)


def main(argv: Sequence[str] | None = None) -> None:
    import json
    import shlex
    import sys

    parser = argparse.ArgumentParser(description="Train a VoxelMorph model on the synthetic testbed.")
    parser.add_argument("--kind", choices=["mammo2d", "mri_roi3d"], required=True)
    parser.add_argument("--out", required=True, help="weights file to write (.pt; the record goes to .json)")
    parser.add_argument("--subjects", type=int, nargs="+", default=[12], help="subjects per cohort seed")
    parser.add_argument("--visits", type=int, default=3, help="visits per subject (visit 0 is the fixed image)")
    parser.add_argument(
        "--cohort-seed",
        type=int,
        nargs="+",
        default=[1],
        help="testbed seed(s) of the training cohorts, one per --subjects entry (benchmarks use seed 0)",
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--smoothness", type=float, default=0.05)
    parser.add_argument("--supervised", type=float, default=0.0, help="weight of the true-field term (0: unsupervised)")
    parser.add_argument("--features", type=int, nargs="+", default=[16, 16, 16, 16])
    parser.add_argument("--integration-steps", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="the network's grid is this many times coarser")
    parser.add_argument("--pooling", choices=POOLINGS, default="average", help="how images reach that grid")
    parser.add_argument("--similarity", type=float, default=1.0, help="weight of the image term")
    parser.add_argument(
        "--fine-similarity", type=float, default=0.0, help="weight of the image term at full resolution"
    )
    parser.add_argument(
        "--fine-ssim", type=float, default=0.0, help="weight of 1 - SSIM over tissue at full resolution"
    )
    parser.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="weight of the squared error to the demons step's field on each training pair (distillation)",
    )
    parser.add_argument(
        "--teacher-cache",
        nargs="*",
        default=[],
        help=".npz of the demons fields of the training pairs, one per cohort seed: written on the first run, then read",
    )
    parser.add_argument(
        "--ssim-crop", type=int, default=0, help="random window of the SSIM term, voxels per side (0: all)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0, help="torch seed")
    parser.add_argument(
        "--identity-fraction",
        type=float,
        default=0.0,
        help="add this share (of the changed pairs) of fixed-vs-itself pairs with a zero field",
    )
    parser.add_argument(
        "--cache",
        nargs="*",
        default=[],
        help=".npz of prepared pairs, one per cohort seed: written on the first run, then read",
    )
    parser.add_argument("--flip-axes", type=int, nargs="*", default=[], help="mirror batches along these axes")
    parser.add_argument("--init", default=None, help="weights of the same architecture to start from")
    parser.add_argument(
        "--refine-features",
        type=int,
        nargs="*",
        default=[],
        help="train a cascade: a ResidualRefiner with these hidden channels after the --init model "
        "(the image terms then work on the full-resolution grid: --similarity its MSE, --fine-ssim its SSIM; "
        "--smoothness applies to the residual)",
    )
    parser.add_argument("--refine-scale", type=int, default=2, help="grid factor of the refiner (space-to-depth)")
    parser.add_argument(
        "--coarse-lr",
        type=float,
        default=0.0,
        help="with --refine-features: learning rate of the coarse U-Net (0: frozen)",
    )
    parser.add_argument("--val-subjects", type=int, default=0, help="validation subjects (visit 1 -> visit 0)")
    parser.add_argument("--val-seed", type=int, default=2, help="testbed seed of the validation subjects")
    parser.add_argument("--val-every", type=int, default=1000, help="validate every so many steps")
    parser.add_argument(
        "--keep-best",
        action="store_true",
        help="save the weights of the validation step with the highest share of the demons SSIM gain "
        "among the steps whose fields fold on no validation pair",
    )
    args = parser.parse_args(argv)
    if len(args.subjects) != len(args.cohort_seed):
        parser.error("--subjects needs one count per --cohort-seed")
    if args.cache and len(args.cache) != len(args.cohort_seed):
        parser.error("--cache needs one file per --cohort-seed")
    if args.teacher_cache and len(args.teacher_cache) != len(args.cohort_seed):
        parser.error("--teacher-cache needs one file per --cohort-seed")
    if 0 in args.cohort_seed or len(set(args.cohort_seed)) != len(args.cohort_seed):
        parser.error("--cohort-seed must list distinct seeds other than the benchmark cohort's (0)")
    if args.val_subjects and args.val_seed in (0, *args.cohort_seed):
        parser.error("--val-seed must differ from the training cohorts and from the benchmark cohort (seed 0)")
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pairs, counts = [], []
    for i, (n_subjects, cohort_seed) in enumerate(zip(args.subjects, args.cohort_seed)):
        cache = Path(args.cache[i]) if args.cache else None
        if cache is not None and cache.is_file():
            with np.load(cache) as data:
                cohort = list(zip(data["moving"], data["fixed"], data["field"]))
            pairs += cohort
            counts.append(len(cohort))
            continue
        cohort = testbed_pairs(args.kind, n_subjects, seed=cohort_seed, visits_per_subject=args.visits)
        if cache is not None:
            np.savez(
                cache,
                moving=np.stack([p[0] for p in cohort]),
                fixed=np.stack([p[1] for p in cohort]),
                field=np.stack([p[2] for p in cohort]),
            )
        pairs += cohort
        counts.append(len(cohort))
    print(f"{len(pairs)} pairs prepared in {time.perf_counter() - start:.0f} s", flush=True)
    teacher_fields = None
    if args.distill > 0:
        from monai_twin.data.synthetic.cohort import simulate_subject

        # the classical deformable step on every training pair: the field whose SSIM gain is the target
        teacher_fields, offset = [], 0
        for i, (n_pairs, cohort_seed) in enumerate(zip(counts, args.cohort_seed)):
            cache = Path(args.teacher_cache[i]) if args.teacher_cache else None
            if cache is not None and cache.is_file():
                with np.load(cache) as data:
                    fields = data["field"]
            else:
                spacing = simulate_subject(args.kind, 0, seed=cohort_seed).config.spacing
                fields = demons_fields(pairs[offset : offset + n_pairs], spacing, log_every=100)
                if cache is not None:
                    np.savez(cache, field=fields)
            if len(fields) != n_pairs:
                parser.error(f"{cache} holds {len(fields)} fields for {n_pairs} pairs of cohort seed {cohort_seed}")
            teacher_fields += list(fields)
            offset += n_pairs
        print(f"demons fields of {len(teacher_fields)} pairs ready ({time.perf_counter() - start:.0f} s)", flush=True)
    callback, validation, best = None, [], {}
    if args.keep_best and not args.val_subjects:
        parser.error("--keep-best needs --val-subjects")
    if args.val_subjects:
        val = testbed_pairs(args.kind, args.val_subjects, seed=args.val_seed, visits_per_subject=2)
        # the reference of the share: the classical deformable step on the same pre-aligned pairs
        val_gains = None
        if args.kind == "mammo2d":
            from monai_twin.data.synthetic.cohort import simulate_subject

            val_gains = _demons_gains(val, simulate_subject(args.kind, 0, seed=args.val_seed).config.spacing)

        def callback(step: int, model: ScaledVxmPairwise) -> None:
            if step % args.val_every and step != args.steps - 1:
                return
            from monai_twin.metrics import folding_fraction

            errors, gains, folds = [], [], []
            for moving, fixed, field in val:
                pair = _normalise(torch.as_tensor(np.stack([moving, fixed]), dtype=torch.float32)[:, None])
                disp = model(pair[:1], pair[1:])
                content = pair[1, 0].numpy() > 0.05
                errors.append(float(np.sqrt(((disp[0].numpy() - field) ** 2).sum(0))[content].mean()))
                folds.append(folding_fraction(disp[0].numpy(), mask=content))
                if val_gains is not None:
                    warped = _warp(torch.as_tensor(moving, dtype=torch.float32)[None, None], disp)[0, 0].numpy()
                    gains.append(_ssim_gain(warped, moving, fixed))
            entry = {"step": step, "epe_median": float(np.median(errors)), "folding_max": float(max(folds))}
            text = f"EPE median {entry['epe_median']:.3f} px, folded on tissue <= {100 * entry['folding_max']:.3f} %"
            if val_gains is not None:
                entry["ssim_gain_share"] = float(np.median(gains) / np.median(val_gains))
                text += f", {100 * entry['ssim_gain_share']:.1f} % of the demons step's median SSIM gain"
                # a field that folds on any validation pair fails the quality check: never kept
                better = entry["ssim_gain_share"] > best.get("share", -np.inf)
                if args.keep_best and entry["folding_max"] == 0.0 and better:
                    best.update(share=entry["ssim_gain_share"], step=step)
                    best["state"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            validation.append(entry)
            print(f"  validation ({len(val)} pairs, seed {args.val_seed}): {text}", flush=True)

    command = "python -m monai_twin.transforms.registration.learned " + shlex.join(
        list(sys.argv[1:] if argv is None else argv)
    )
    if args.refine_features:
        if args.init is None:
            parser.error("--refine-features needs --init (the coarse model the refiner corrects)")
        base = load_voxelmorph(args.init)
        torch.manual_seed(args.seed)  # the refiner's initialisation
        model = build_voxelmorph(
            base.spatial_dims,
            base.nb_features,
            base.integration_steps,
            base.scale,
            base.pooling,
            args.refine_features,
            args.refine_scale,
        )
        if base.refine is None:
            model.vxm.load_state_dict(base.vxm.state_dict())
        else:  # a cascade of the same architecture: training goes on from its refiner too
            try:
                model.load_state_dict(base.state_dict())
            except RuntimeError:
                parser.error(f"{args.init} is a cascade with another refiner than --refine-features/--refine-scale")
        result = train_refiner(
            pairs,
            model,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            similarity=args.similarity,
            ssim=args.fine_ssim,
            ssim_crop=args.ssim_crop,
            smoothness=args.smoothness,
            supervised=args.supervised,
            coarse_learning_rate=args.coarse_lr,
            seed=args.seed,
            identity_fraction=args.identity_fraction,
            flip_axes=args.flip_axes,
            out=args.out,
            callback=callback,
            config_extra={
                "kind": args.kind,
                "cohort_seed": args.cohort_seed,
                "subjects": args.subjects,
                "coarse_model": json.loads(Path(args.init).with_suffix(".json").read_text()),
                "command": command,
            },
        )
    else:
        result = train_voxelmorph(
            pairs,
            spatial_dims=pairs[0][0].ndim,
            steps=args.steps,
            batch_size=args.batch_size,
            learning_rate=args.lr,
            smoothness=args.smoothness,
            supervised=args.supervised,
            nb_features=args.features,
            integration_steps=args.integration_steps,
            scale=args.scale,
            pooling=args.pooling,
            similarity=args.similarity,
            fine_similarity=args.fine_similarity,
            fine_ssim=args.fine_ssim,
            ssim_crop=args.ssim_crop,
            teacher_fields=teacher_fields,
            distill=args.distill,
            seed=args.seed,
            identity_fraction=args.identity_fraction,
            flip_axes=args.flip_axes,
            initial_state=None if args.init is None else torch.load(args.init, map_location="cpu", weights_only=True),
            out=args.out,
            callback=callback,
            config_extra={
                "kind": args.kind,
                "cohort_seed": args.cohort_seed,
                "subjects": args.subjects,
                "command": command,
            },
        )
    if validation:
        result["config"]["validation"] = {"seed": args.val_seed, "subjects": args.val_subjects, "curve": validation}
        if best:
            # the checkpoint with the highest validation share (the validation seed, never the benchmark's)
            result["model"].load_state_dict(best["state"])
            result["config"]["validation"]["selected_step"] = best["step"]
            print(f"kept the weights of step {best['step']} ({100 * best['share']:.1f} % on validation)")
        save_voxelmorph(result["model"], args.out, result["config"])
    size = os.path.getsize(args.out) / 1e6
    print(f"trained in {result['seconds']:.0f} s, final loss {result['losses'][-1]:.5f}, {args.out} ({size:.2f} MB)")


if __name__ == "__main__":
    main()
