"""Batched kernel primitives between a batch of queries and a negation bank.

Queries are (B, D) and the bank is (N, D). Every function here keeps memory at
O(B·N + N·D): squared distances are expanded as ‖q‖² + ‖z‖² − 2 q·zᵀ, so no (B, N, D)
tensor and no per-query copy of the bank is ever built. With ``accumulate_float64`` the
bank is cast in chunks of ``chunk_size`` rows, so the float64 copy is bounded as well.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "squared_distances",
    "log_gaussian_kernel",
    "log_mean_exp",
    "softmax_weighted_mean",
]


def _check_pair(queries: Tensor, bank: Tensor) -> None:
    if queries.ndim != 2 or bank.ndim != 2:
        raise ValueError(
            f"expected queries (B, D) and bank (N, D), got shapes {tuple(queries.shape)} and "
            f"{tuple(bank.shape)}; flatten each sample to one row first"
        )
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(
            f"queries have D={queries.shape[1]} features but the bank has D={bank.shape[1]}; "
            "build the bank in the same space (and at the same resolution) as the samples"
        )


def squared_distances(
    queries: Tensor,
    bank: Tensor,
    *,
    bank_scale: float = 1.0,
    bank_sq_norms: Tensor | None = None,
    accumulate_float64: bool = False,
    chunk_size: int = 1024,
) -> Tensor:
    """Compute ‖q_b − c·z_n‖² for every query and bank row.

    Args:
        queries: (B, D) query rows.
        bank: (N, D) bank rows z_n.
        bank_scale: the factor c applied to every bank row (α_t for a noised bank).
        bank_sq_norms: optional precomputed (N,) ‖z_n‖² (unscaled), to skip recomputing them.
        accumulate_float64: compute in float64; the bank is cast chunk by chunk.
        chunk_size: bank rows processed per matrix product.

    Returns:
        (B, N) squared distances, clamped at 0 (the expansion can round slightly below 0),
        in float64 when ``accumulate_float64`` and otherwise in the queries' dtype.
    """
    _check_pair(queries, bank)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")

    dtype = torch.float64 if accumulate_float64 else queries.dtype
    q = queries.to(dtype)
    q_sq = (q * q).sum(dim=1, keepdim=True)  # (B, 1)

    pieces = []
    for start in range(0, bank.shape[0], chunk_size):
        z = bank[start : start + chunk_size].to(device=q.device, dtype=dtype)
        if bank_sq_norms is None:
            z_sq = (z * z).sum(dim=1)
        else:
            z_sq = bank_sq_norms[start : start + chunk_size].to(device=q.device, dtype=dtype)
        cross = q @ z.T  # (B, chunk)
        pieces.append(q_sq + (bank_scale * bank_scale) * z_sq.unsqueeze(0) - (2.0 * bank_scale) * cross)
    distances = torch.cat(pieces, dim=1) if pieces else q.new_zeros((q.shape[0], 0))
    return distances.clamp_min_(0.0)


def log_gaussian_kernel(sq_distances: Tensor, std: float, dim: int) -> Tensor:
    """Return log N(x; μ, std² I) from squared distances ‖x − μ‖², with the full normaliser.

    Args:
        sq_distances: (B, N) squared distances.
        std: the kernel's standard deviation, in the same units as the samples.
        dim: D, the dimension of each sample; it sets the normaliser −(D/2)·log(2π·std²).

    Returns:
        (B, N) log densities.
    """
    if not std > 0.0:
        raise ValueError(f"the kernel standard deviation must be positive, got {std}")
    variance = std * std
    log_normaliser = -0.5 * dim * math.log(2.0 * math.pi * variance)
    return -sq_distances / (2.0 * variance) + log_normaliser


def log_mean_exp(log_values: Tensor, dim: int = -1) -> Tensor:
    """Return log((1/N) Σ_n exp(v_n)) along ``dim``, computed by log-sum-exp."""
    count = log_values.shape[dim]
    if count == 0:
        raise ValueError("log_mean_exp needs at least one value along the reduced dimension")
    return torch.logsumexp(log_values, dim=dim) - math.log(count)


def softmax_weighted_mean(log_weights: Tensor, bank: Tensor, *, chunk_size: int = 1024) -> Tensor:
    """Return Σ_n softmax_n(log_weights)_n · z_n for every query.

    Args:
        log_weights: (B, N) unnormalised log weights (any additive constant per row cancels).
        bank: (N, D) bank rows.
        chunk_size: bank rows per matrix product, which bounds the cast copy of the bank.

    Returns:
        (B, D) weighted means, in the dtype of ``log_weights``.
    """
    if log_weights.ndim != 2 or bank.ndim != 2 or log_weights.shape[1] != bank.shape[0]:
        raise ValueError(
            f"expected log_weights (B, N) and bank (N, D) with matching N, got "
            f"{tuple(log_weights.shape)} and {tuple(bank.shape)}"
        )
    weights = torch.softmax(log_weights, dim=1)
    out = log_weights.new_zeros((log_weights.shape[0], bank.shape[1]))
    for start in range(0, bank.shape[0], chunk_size):
        z = bank[start : start + chunk_size].to(device=weights.device, dtype=weights.dtype)
        out += weights[:, start : start + chunk_size] @ z
    return out
