"""HotPool: a fixed arena of device slots holding the resident CSA chunks.

The arena is one preallocated uint8 buffer [num_slots, chunk_bytes] on the device,
static in shape like gpt-fast's KV cache, so the gather kernel and CUDA graphs see
one tensor for the life of the engine. The pool only does bookkeeping: which
(request, chunk) owns which slot. Moving bytes in and out is the gather kernel's job
(triton_ops), addressed through `slots_for`.

Under pressure `allocate` returns None and `batched_allocate` is all-or-nothing, so
the planner can fall back (keep the request fully resident or defer the fetch)
without undoing half a batch. Freeing a chunk that holds no slot raises: a double
free means two owners think they hold the slot, which would corrupt KV silently.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vllm_flashmemory.core._nvtx import nvtx_range

logger = logging.getLogger(__name__)




@dataclass(frozen=True)
class HotPoolConfig:
    """Shape and placement of the slot arena; validated at construction."""

    # Chunks the device can hold at once, over all requests.
    num_slots: int
    # Bytes of one CSA chunk over all CSA layers, main KV + indexer keys
    # (KVGeometry.chunk_bytes); must equal the cold pool's.
    chunk_bytes: int
    # Device of the arena: "cuda", "cuda:1", or "cpu" for tests and the CPU engine.
    device: str | torch.device

    def __post_init__(self) -> None:
        for name in ("num_slots", "chunk_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"HotPoolConfig.{name}={value!r} must be an int >= 1; size the "
                    "arena from the GPU memory left for resident chunks divided by "
                    "KVGeometry.chunk_bytes."
                )
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(
                f"HotPoolConfig.device={self.device!r} is not a torch device ({e}); "
                "use 'cuda', 'cuda:<index>' or 'cpu'."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"HotPoolConfig.device={self.device!r} but torch.cuda.is_available() "
                "is False; use device='cpu' on a machine without a GPU."
            )
        object.__setattr__(self, "device", device)

    @property
    def arena_bytes(self) -> int:
        return self.num_slots * self.chunk_bytes


@dataclass(frozen=True)
class HotPoolStats:
    num_slots: int
    used_slots: int
    free_slots: int
    num_requests: int


class HotPool:
    """Slot arena for resident chunks: (request, chunk) -> slot of `buffer`.

    Not locked: one thread (the residency planner's) owns allocation, and a lock
    per call would cost more than the dict updates it guards.
    """

    def __init__(self, config: HotPoolConfig) -> None:
        self.config = config
        # Zeroed, not empty: a slot read before its first fill gives zeros, not
        # leftovers of another process, which keeps failures reproducible.
        self.buffer = torch.zeros(
            (config.num_slots, config.chunk_bytes),
            dtype=torch.uint8,
            device=config.device,
        )  # [num_slots, chunk_bytes]
        # Min-heap: the lowest free slot goes first, so layouts are deterministic.
        self._free: list[int] = list(range(config.num_slots))
        self._slot: dict[tuple[str, int], int] = {}
        self._by_request: dict[str, dict[int, int]] = {}  # req -> chunk -> slot
        logger.info(
            "HotPool: %d slots of %d B (%.3f GiB) on %s",
            config.num_slots,
            config.chunk_bytes,
            config.arena_bytes / (1 << 30),
            config.device,
        )

    @property
    def num_free(self) -> int:
        return len(self._free)

    def allocate(self, req_id: str, chunk_id: int) -> int | None:
        """A free slot for chunk `chunk_id` of `req_id`, or None when none is free."""
        slots = self.batched_allocate(req_id, [chunk_id])
        return None if slots is None else slots[0]

    def batched_allocate(
        self, req_id: str, chunk_ids: Sequence[int]
    ) -> list[int] | None:
        """Slots for all of `chunk_ids`, or None (and nothing allocated) when fewer
        than `len(chunk_ids)` are free."""
        ids = [int(c) for c in chunk_ids]
        with nvtx_range("flashmemory.hot_pool.batched_allocate"):
            if len(set(ids)) != len(ids):
                dup = sorted({c for c in ids if ids.count(c) > 1})
                raise ValueError(
                    f"HotPool.batched_allocate: chunk ids {dup} of request {req_id!r} "
                    "appear more than once; pass each chunk once."
                )
            held = [c for c in ids if (req_id, c) in self._slot]
            if held:
                raise ValueError(
                    f"HotPool: chunks {held[:8]} of request {req_id!r} already hold "
                    f"slots {[self._slot[(req_id, c)] for c in held[:8]]}; look them "
                    "up with slot_of() instead of allocating again."
                )
            if len(ids) > len(self._free):
                return None
            if not ids:
                # No entry for a request that holds nothing: stats count holders.
                return []
            slots = [heapq.heappop(self._free) for _ in ids]
            per_req = self._by_request.setdefault(req_id, {})
            for c, s in zip(ids, slots, strict=True):
                self._slot[(req_id, c)] = s
                per_req[c] = s
            return slots

    def free(self, req_id: str, chunk_id: int) -> int:
        """Release the slot of chunk `chunk_id` of `req_id`; return it."""
        return self.batched_free(req_id, [chunk_id])[0]

    def batched_free(self, req_id: str, chunk_ids: Sequence[int]) -> list[int]:
        """Release the slots of `chunk_ids`; all must hold one (else nothing is
        freed and ValueError names the ones that do not)."""
        ids = [int(c) for c in chunk_ids]
        with nvtx_range("flashmemory.hot_pool.batched_free"):
            missing = [c for c in ids if (req_id, c) not in self._slot]
            if missing or len(set(ids)) != len(ids):
                raise ValueError(
                    f"HotPool: double free: chunks {missing or ids} of request "
                    f"{req_id!r} hold no slot (never allocated, already freed, or "
                    "listed twice); free each resident chunk exactly once."
                )
            return self._release(req_id, ids)

    def free_request(self, req_id: str) -> int:
        """Release every slot of `req_id` (finish, abort, or fallback to full
        residency elsewhere); return how many. A request with none returns 0."""
        per_req = self._by_request.get(req_id)
        if not per_req:
            self._by_request.pop(req_id, None)
            return 0
        return len(self._release(req_id, list(per_req)))

    def _release(self, req_id: str, ids: list[int]) -> list[int]:
        if not ids:
            return []
        per_req = self._by_request[req_id]
        slots = []
        for c in ids:
            s = self._slot.pop((req_id, c))
            del per_req[c]
            heapq.heappush(self._free, s)
            slots.append(s)
        if not per_req:
            del self._by_request[req_id]
        return slots

    def slot_of(self, req_id: str, chunk_id: int) -> int | None:
        return self._slot.get((req_id, int(chunk_id)))

    def contains(self, req_id: str, chunk_id: int) -> bool:
        return (req_id, int(chunk_id)) in self._slot

    def resident_chunk_ids(self, req_id: str) -> frozenset[int]:
        return frozenset(self._by_request.get(req_id, ()))

    def slots_for(
        self, req_id: str, chunk_ids: Sequence[int], device: torch.device | None = None
    ) -> torch.Tensor:
        """Slot indices of `chunk_ids` as int64 [n] on `device` (default: the
        arena's), for the gather kernel. Every chunk must be resident."""
        ids = [int(c) for c in chunk_ids]
        missing = [c for c in ids if (req_id, c) not in self._slot]
        if missing:
            raise LookupError(
                f"HotPool.slots_for: chunks {missing[:8]} of request {req_id!r} are "
                "not resident; allocate (and fill) them before addressing them."
            )
        slots = [self._slot[(req_id, c)] for c in ids]
        target = self.config.device if device is None else device
        return torch.tensor(slots, dtype=torch.long, device=target)  # [n]

    @property
    def stats(self) -> HotPoolStats:
        used = len(self._slot)
        return HotPoolStats(
            num_slots=self.config.num_slots,
            used_slots=used,
            free_slots=self.config.num_slots - used,
            num_requests=len(self._by_request),
        )
