"""Metrics: registration quality (NMI, correlation, SSIM, Jacobian folding, end-point error)."""

from __future__ import annotations

from .registration import (
    correlation,
    end_point_error,
    folding_fraction,
    jacobian_determinant,
    log_jacobian_std,
    normalized_mutual_information,
    ssim,
)

__all__ = [
    "correlation",
    "end_point_error",
    "folding_fraction",
    "jacobian_determinant",
    "log_jacobian_std",
    "normalized_mutual_information",
    "ssim",
]
