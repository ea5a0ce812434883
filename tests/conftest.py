"""Suite-wide setup.

Without a GPU, Triton kernels (ours and the vLLM kernels our CPU overrides are checked
against) run through Triton's interpreter; it must be switched on before anything
imports triton, which any test module may do first.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
