"""Per-modality autoencoder settings for the latent diffusion twin, built on MONAI's ``AutoencoderKL``.

MONAI provides the network (:class:`monai.networks.nets.AutoencoderKL`) and the SSIM loss
(:class:`monai.losses.SSIMLoss`); this module adds the small CPU-sized presets for the two testbed
modalities and the L1 + SSIM + KL objective used to train them (no perceptual network: nothing is
downloaded at run time). Training itself runs through MONAI's ``SupervisedTrainer``
(:func:`monai_twin.engines.train_autoencoder`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

__all__ = [
    "AUTOENCODER_CONFIGS",
    "AutoencoderConfig",
    "AutoencoderKLLoss",
    "PairedAutoencoder",
    "autoencoder_config",
    "kl_divergence",
]


@dataclass(frozen=True)
class AutoencoderConfig:
    """Settings of one modality's ``AutoencoderKL`` and of its training loss.

    Args:
        spatial_dims: 2 (mammography) or 3 (brain ROI).
        in_channels: image channels.
        channels: feature channels per level; ``len(channels) - 1`` halvings, so a 64^2 image with
            three levels gives a 16^2 latent.
        latent_channels: channels of the latent.
        num_res_blocks: residual blocks per level.
        norm_num_groups: group-norm groups (must divide every entry of ``channels``).
        l1_weight, ssim_weight, kl_weight: weights of the reconstruction L1, ``1 - SSIM`` and KL terms.
        change_weight: weight of the *change* term on (prior, target) pairs: L1 between the change of
            the reconstructions and the change of the images. A twin decodes its forecast as a change
            of the prior's reconstruction, so a lesion-boundary move the autoencoder does not carry
            cannot be forecast at all; plain reconstruction losses let that small change drown in
            the reconstruction error. Used when training on pairs (:class:`PairedAutoencoder`).
        change_pool: the change term compares the changes average-pooled over ``change_pool``
            voxels per side (mass-preserving, so a lesion's gained intensity counts in full, while
            the acquisition noise that differs between two scans -- which no autoencoder can or
            should reproduce -- is averaged down); 1 = voxelwise.
        mse_weight: weight of a squared-error reconstruction term (its optimum is the conditional
            mean, which keeps small systematic changes that L1's median can round away).
        data_range: intensity range for SSIM (images are ~[0, 1]).

    Example::

        config = autoencoder_config("mammo2d")
        autoencoder = config.build()          # monai.networks.nets.AutoencoderKL
    """

    spatial_dims: int
    in_channels: int = 1
    channels: tuple[int, ...] = (16, 32, 64)
    latent_channels: int = 4
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    l1_weight: float = 1.0
    ssim_weight: float = 0.5
    kl_weight: float = 1e-6
    change_weight: float = 0.0
    change_pool: int = 1
    mse_weight: float = 0.0
    data_range: float = 1.0

    def __post_init__(self) -> None:
        if self.spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}.")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ValueError(f"norm_num_groups={self.norm_num_groups} must divide every channel count {self.channels}.")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}.")
        if self.change_pool < 1:
            raise ValueError(f"change_pool must be >= 1, got {self.change_pool}.")

    @property
    def downsampling(self) -> int:
        """How many times smaller each latent side is than the image side."""
        return 2 ** (len(self.channels) - 1)

    def network_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`monai.networks.nets.AutoencoderKL` (for bundle configs too)."""
        return {
            "spatial_dims": self.spatial_dims,
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "channels": tuple(self.channels),
            "latent_channels": self.latent_channels,
            "num_res_blocks": self.num_res_blocks,
            "attention_levels": (False,) * len(self.channels),
            "norm_num_groups": self.norm_num_groups,
            "with_encoder_nonlocal_attn": False,
            "with_decoder_nonlocal_attn": False,
        }

    def build(self) -> nn.Module:
        """A fresh :class:`monai.networks.nets.AutoencoderKL` with these settings."""
        from monai.networks.nets import AutoencoderKL

        return AutoencoderKL(**self.network_kwargs())


#: CPU-sized presets: a 64^2 mammogram -> 4 x 16^2 latent, a 32^3 brain ROI -> 4 x 8^3 latent.
AUTOENCODER_CONFIGS: dict[str, AutoencoderConfig] = {
    "mammo2d": AutoencoderConfig(spatial_dims=2, channels=(16, 32, 64), latent_channels=4),
    "mri_roi3d": AutoencoderConfig(spatial_dims=3, channels=(8, 16, 32), latent_channels=4),
}


def autoencoder_config(kind: str, **overrides: Any) -> AutoencoderConfig:
    """The preset of a testbed modality (``"mammo2d"`` or ``"mri_roi3d"``), with optional overrides.

    Example::

        autoencoder_config("mri_roi3d", latent_channels=3)
    """
    if kind not in AUTOENCODER_CONFIGS:
        raise ValueError(f"kind must be one of {sorted(AUTOENCODER_CONFIGS)}, got {kind!r}.")
    return replace(AUTOENCODER_CONFIGS[kind], **overrides)


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL divergence of ``N(z_mu, z_sigma^2)`` from ``N(0, 1)``, summed over latent voxels, mean over the batch."""
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1.0, dim=dims)
    return kl.mean()


class PairedAutoencoder(nn.Module):
    """An ``AutoencoderKL`` applied to ``(B, 2, C, *spatial)`` (prior, target) pairs, for the change term.

    ``forward(pairs)`` runs the wrapped autoencoder on the ``2B`` images and returns its
    ``(reconstruction, z_mu, z_sigma)`` with the reconstruction reshaped back to pairs, so that
    :class:`AutoencoderKLLoss` can compare the change of the reconstructions with the change of
    the images. Only for training: the trained weights are those of ``autoencoder``.
    """

    def __init__(self, autoencoder: nn.Module) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, pairs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if pairs.ndim < 4 or pairs.shape[1] != 2:
            raise ValueError(f"PairedAutoencoder: pairs must have shape (B, 2, C, *spatial), got {tuple(pairs.shape)}.")
        recon, z_mu, z_sigma = self.autoencoder(pairs.flatten(0, 1))
        return recon.reshape(pairs.shape), z_mu, z_sigma


class AutoencoderKLLoss(nn.Module):
    """L1 + ``ssim_weight`` x (1 - SSIM) + ``kl_weight`` x KL for ``AutoencoderKL``'s ``(recon, z_mu, z_sigma)``.

    Shaped for MONAI's ``SupervisedTrainer``: ``loss(network(image), image)``, where the network
    returns the tuple ``(reconstruction, z_mu, z_sigma)``. The SSIM term is MONAI's ``SSIMLoss``.
    With (prior, target) pairs ``(B, 2, C, *spatial)`` (the network is a :class:`PairedAutoencoder`)
    the loss adds ``change_weight`` x L1 between the reconstructions' change and the images' change.

    Args:
        config: the modality's :class:`AutoencoderConfig` (weights, ``spatial_dims``, data range).
    """

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        from monai.losses import SSIMLoss

        self.config = config
        self.ssim = SSIMLoss(spatial_dims=config.spatial_dims, data_range=config.data_range, win_size=7)

    def forward(self, output: tuple[torch.Tensor, torch.Tensor, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
        if not isinstance(output, (tuple, list)) or len(output) != 3:
            raise TypeError("AutoencoderKLLoss: output must be AutoencoderKL's (reconstruction, z_mu, z_sigma) tuple.")
        recon, z_mu, z_sigma = output
        if recon.shape != image.shape:
            raise ValueError(f"AutoencoderKLLoss: reconstruction {tuple(recon.shape)} != image {tuple(image.shape)}.")
        c = self.config
        change = 0.0
        if image.ndim == c.spatial_dims + 3:  # (B, 2, C, *spatial) pairs
            if image.shape[1] != 2:
                raise ValueError(f"AutoencoderKLLoss: pairs must have 2 images each, got shape {tuple(image.shape)}.")
            if c.change_weight:
                diff = (recon[:, 1] - recon[:, 0]) - (image[:, 1] - image[:, 0])
                if c.change_pool > 1:
                    pool = nn.functional.avg_pool2d if c.spatial_dims == 2 else nn.functional.avg_pool3d
                    diff = pool(diff, c.change_pool)
                change = c.change_weight * diff.abs().mean()
            recon, image = recon.flatten(0, 1), image.flatten(0, 1)
        loss = c.l1_weight * (recon - image).abs().mean() + c.kl_weight * kl_divergence(z_mu, z_sigma) + change
        if c.mse_weight:
            loss = loss + c.mse_weight * (recon - image).pow(2).mean()
        if c.ssim_weight:
            loss = loss + c.ssim_weight * self.ssim(recon.float(), image.float())
        return loss
