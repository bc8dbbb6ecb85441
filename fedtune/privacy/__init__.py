"""Differential-privacy accounting (Opacus accountants) for local DP-SGD."""

from fedtune.privacy.accounting import (
    AccountantHistory,
    PrivacySpend,
    calibrate_noise_multiplier,
    compute_epsilon,
)

__all__ = ["AccountantHistory", "PrivacySpend", "calibrate_noise_multiplier", "compute_epsilon"]
