"""Normalized Walsh-Hadamard rotation: the space DeepSeek-V4's index-K cache lives in.

DeepSeek-V4 rotates indexer queries and keys by H / sqrt(d) (Sylvester order) before
quantizing them; transformers skips the rotation because, being orthonormal, it
leaves every q . k unchanged. The Memory Indexer rotates its queries and the harvest
stores keys rotated, so both sit in the space a serving engine's cache holds.
"""

from __future__ import annotations

import functools
import math

import torch


@functools.lru_cache(maxsize=8)
def hadamard_matrix(dim: int) -> torch.Tensor:
    """Sylvester Hadamard matrix scaled by dim^-0.5: [dim, dim], orthonormal, symmetric."""
    if dim < 1 or dim & (dim - 1):
        raise ValueError(
            f"Hadamard dim={dim} must be a power of two; DeepSeek-V4 uses "
            "index_head_dim 128."
        )
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < dim:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(dim)).to(torch.float32)


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., d] -> x @ H_d (= H_d x per row, H symmetric), in float32."""
    return x.float() @ hadamard_matrix(x.shape[-1])
