"""Argument checks shared by the indexer ops (run before any launch)."""

from __future__ import annotations

import torch

# K^IComp as DeepSeek-V4 caches it (fp8 + a per-entry scale) or real-valued.
K_DTYPES = (torch.float8_e4m3fn, torch.bfloat16, torch.float16, torch.float32)
Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_qwk_dtypes(
    op: str,
    q: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    k_scale: torch.Tensor | None,
) -> None:
    if q.dtype not in Q_DTYPES or w.dtype not in Q_DTYPES:
        raise TypeError(
            f"{op}: q ({q.dtype}) and w ({w.dtype}) must be bf16, fp16 or fp32."
        )
    if k.dtype not in K_DTYPES:
        raise TypeError(
            f"{op}: k has dtype {k.dtype}; use float8_e4m3fn (with k_scale), bf16, "
            "fp16 or fp32."
        )
    if k_scale is not None and k_scale.dtype != torch.float32:
        raise TypeError(f"{op}: k_scale must be float32; got {k_scale.dtype}.")
