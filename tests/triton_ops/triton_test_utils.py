"""Shared helpers of the Triton op tests: device choice and the one comparison helper.

(A module of its own, not conftest.py: `from conftest import ...` would find the
suite-wide tests/conftest.py first.)

Tests pick CUDA when it exists; otherwise they run the kernels on CPU through
Triton's interpreter, which this file switches on when no GPU is present (Triton
3.9 reads TRITON_INTERPRET at launch, so it also holds when core imported
triton_ops first; checked 2026-11-23).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Fixed tolerances by the dtype of K^IComp. Every path accumulates in fp32 (the GPU
# bf16 MMA multiplies fp8/bf16 values exactly), so only the summation order differs
# from the reference; never loosen these for CI.
TOLERANCE = {
    torch.float8_e4m3fn: (1e-5, 1e-4),  # (rtol, atol) on scores in (0, 1) / logits
    torch.bfloat16: (1e-5, 1e-4),
    torch.float16: (1e-5, 1e-4),
    torch.float32: (1e-5, 1e-5),
}


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, k_dtype: torch.dtype):
    """Named fp32 comparison at the fixed tolerance of `k_dtype`; NaN never passes."""
    rtol, atol = TOLERANCE[k_dtype]
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {ref.shape}"
    assert not torch.isnan(out).any(), f"{name}: NaN in kernel output"
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out)), f"{name}: inf pattern differs"
    ref_f, out_f = ref[finite].double(), out[finite].double()
    err = (out_f - ref_f).abs()
    bound = atol + rtol * ref_f.abs()
    if err.numel():
        worst = int((err - bound).argmax())
        assert bool((err <= bound).all()), (
            f"{name}: max |out - ref| = {float(err.max()):.3g} exceeds atol={atol} + "
            f"rtol={rtol} * |ref| at flat index {worst}"
        )


def make_k_icomp(shape, k_dtype, generator=None, device=DEVICE):
    """Random K^IComp as DeepSeek-V4 stores it: fp8 e4m3 + an absmax/448 scale."""
    x = torch.randn(*shape, generator=generator)
    if k_dtype == torch.float8_e4m3fn:
        scale = x.abs().amax(dim=-1).clamp_min(1e-6) / 448.0  # [..., N]
        k = (x / scale.unsqueeze(-1)).to(torch.float8_e4m3fn)
        return k.to(device), scale.float().to(device)
    return x.to(k_dtype).to(device), None


