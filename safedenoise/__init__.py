"""Training-free safe denoiser (Kim et al., arXiv 2502.08011): negation bank, kernels, both
forms of the correction, and a hook that applies it inside any diffusers pipeline."""

from .denoiser import (
    GateCalibration,
    PaperSafeDenoiser,
    ReferenceSafeDenoiser,
    SafeDenoiser,
    SafeDenoiserOutput,
    calibrate_reference_gate,
    safe_posterior_mean,
)
from .hook import SafeDenoiserHook, StepRecord
from .negation_bank import NegationBank, channel_l2_normalise
from .schedules import SUPPORTED_SCHEDULERS, NoiseLevel, noise_level

__all__ = [
    "GateCalibration",
    "NegationBank",
    "NoiseLevel",
    "PaperSafeDenoiser",
    "ReferenceSafeDenoiser",
    "SUPPORTED_SCHEDULERS",
    "SafeDenoiser",
    "SafeDenoiserHook",
    "SafeDenoiserOutput",
    "StepRecord",
    "calibrate_reference_gate",
    "channel_l2_normalise",
    "noise_level",
    "safe_posterior_mean",
]
