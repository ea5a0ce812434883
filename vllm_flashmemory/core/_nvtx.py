"""NVTX ranges on the fetch and evict paths, so they show up in a GPU profile."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    # torch.cuda.nvtx needs a CUDA build; on CPU the range is a no-op.
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    else:
        yield
