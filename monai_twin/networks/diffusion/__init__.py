"""The latent diffusion twin's networks, on MONAI's generative stack.

* :mod:`.autoencoder` -- per-modality ``AutoencoderKL`` presets and their L1 + SSIM + KL loss;
* :mod:`.condition` -- prior-latent, timed-EHR, static and gap tokens fused by a cross-attention adapter;
* :mod:`.latent_twin` -- :class:`LatentDiffusionTwin`, MONAI's ``DiffusionModelUNet`` conditioned on both.

Sampling lives in :mod:`monai_twin.inferers.diffusion`, training in :mod:`monai_twin.engines.diffusion`.
"""

from __future__ import annotations

from .autoencoder import (
    AUTOENCODER_CONFIGS,
    AutoencoderConfig,
    AutoencoderKLLoss,
    PairedAutoencoder,
    autoencoder_config,
    kl_divergence,
)
from .condition import EHRTokenEncoder, FusionAdapter, ImageTokenEncoder, TwinConditionEncoder, fourier_features
from .latent_twin import INTERVAL_CONDITION_KEYS, LatentDiffusionTwin

__all__ = [
    "AUTOENCODER_CONFIGS",
    "AutoencoderConfig",
    "AutoencoderKLLoss",
    "EHRTokenEncoder",
    "FusionAdapter",
    "INTERVAL_CONDITION_KEYS",
    "ImageTokenEncoder",
    "LatentDiffusionTwin",
    "PairedAutoencoder",
    "TwinConditionEncoder",
    "autoencoder_config",
    "fourier_features",
    "kl_divergence",
]
