"""Memory Indexer scoring: Eq. 4 (sigmoid head-fused score), Eq. 5 (threshold), Eq. 13 (OR).

`memory_indexer_scores_ref` is the one definition of the score in this repository:
`vllm_flashmemory.core.memory_indexer` calls it on CPU, and the fused Triton kernel
in this file is tested against it.
"""

from __future__ import annotations

import torch


def dequantize_k_icomp(k: torch.Tensor, k_scale: torch.Tensor | None) -> torch.Tensor:
    """K^IComp as DeepSeek-V4 caches it (fp8 e4m3 + one fp32 scale per entry) -> fp32.

    k: [..., N, D] fp8/bf16/fp32; k_scale: [..., N] fp32 or None (k already real-valued).
    """
    kf = k.float()
    if k_scale is not None:
        kf = kf * k_scale.float().unsqueeze(-1)
    return kf


def memory_indexer_scores_ref(
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """I_{t,s} = sigmoid(sum_h w_{t,h} * ReLU(q_{t,h} . K^IComp_s)), Eq. 4.

    q: [L, T, H, D] indexer queries (L indexer layers, T query positions, H heads)
    w: [L, T, H] head weights (already scaled)
    k: [L, N, D] the layer's compressed indexer keys; k_scale: [L, N] or None
    returns: [L, T, N] float32 scores in (0, 1)
    """
    kf = dequantize_k_icomp(k, k_scale)  # [L, N, D]
    logits = torch.einsum("lthd,lnd->lthn", q.float(), kf).relu_()  # [L, T, H, N]
    fused = torch.einsum("lthn,lth->ltn", logits, w.float())  # [L, T, N]
    return torch.sigmoid(fused)


def combine_layers_ref(scores: torch.Tensor, routing: str = "or") -> torch.Tensor:
    """Cross-layer ensemble of [L, T, N] scores -> [T, N].

    "or" takes the max over layers, so thresholding it equals the union of the
    per-layer selections of Eq. 13; "mean" averages the layers.
    """
    if routing == "or":
        return scores.amax(dim=0)
    if routing == "mean":
        return scores.mean(dim=0)
    raise ValueError(f"routing={routing!r} is not a routing mode; use 'or' or 'mean'.")
