"""ColdPool: every historical CSA chunk of every request, in host memory, keyed by
(request, chunk).

One chunk is the bytes of one CSA chunk over all CSA layers, main KV and indexer keys
together (DESIGN.md "The chunk"); the caller computes `chunk_bytes` from its KV
geometry and treats a chunk as an opaque uint8 row. The pool never drops a chunk:

- Admission control. `reserve(req_id, n_chunks)` commits capacity for a request
  before any of its chunks is stored, and raises `ColdPoolFullError` (naming the
  need, the free space and the fix) when the pool cannot hold them. A put beyond a
  request's reservation is refused. So a request that does not fit is refused up
  front, and a request that was admitted can always store every chunk.
- No eviction. Neither backend evicts: LMCache's L1 object store is used without its
  eviction controller (see `lmcache_store.py`), and the torch backend is a slab with
  a free list. Chunks leave only through `free_request` (finish or abort).

Backends (`ColdPoolConfig.backend`): "lmcache" (default) stores each chunk as an
object in LMCache 0.5.6's L1 storage layer, the store the connector shares with
LMCache's tiers; "torch" is a pinned slab with the same interface, for machines
without LMCache and as the oracle in the property tests.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from vllm_flashmemory.core._nvtx import nvtx_range

logger = logging.getLogger(__name__)

ColdPoolBackend = Literal["lmcache", "torch"]
ChunkKey = tuple[str, int]  # (request id, chunk index within the request)

# Each chunk occupies `chunk_bytes` rounded up to a cache line in either backend, so
# the number of chunks a given `cold_pool_gib` holds does not depend on the backend.
SLOT_ALIGN_BYTES = 64
_GIB = 1 << 30
_MAX_CHUNK_ID = (1 << 63) - 1
_pool_ids = itertools.count()




class ColdPoolFullError(ValueError):
    """A request's chunks do not fit in the cold pool's free capacity."""


@dataclass(frozen=True)
class ColdPoolConfig:
    """Sizing of the cold pool; validated at construction."""

    # Host memory for chunks, in GiB ('lsa.cold_pool_gib').
    capacity_gib: float
    # Bytes of one CSA chunk over all CSA layers, main KV + indexer keys
    # (KVGeometry.chunk_bytes).
    chunk_bytes: int
    # Page-locked host memory for async H2D/D2H copies. None = pin iff CUDA is
    # available; True without CUDA is an error.
    pin_memory: bool | None = None
    # "lmcache": LMCache 0.5.6's L1 object store; "torch": a plain slab.
    backend: ColdPoolBackend = "lmcache"

    def __post_init__(self) -> None:
        if isinstance(self.chunk_bytes, bool) or not isinstance(self.chunk_bytes, int):
            raise TypeError(
                f"ColdPoolConfig.chunk_bytes={self.chunk_bytes!r} must be an int; "
                "pass KVGeometry.chunk_bytes."
            )
        if self.chunk_bytes < 1:
            raise ValueError(
                f"ColdPoolConfig.chunk_bytes={self.chunk_bytes} must be >= 1; "
                "pass KVGeometry.chunk_bytes (main KV + indexer keys of one chunk "
                "over all CSA layers)."
            )
        if isinstance(self.capacity_gib, bool) or not isinstance(
            self.capacity_gib, (int, float)
        ):
            raise TypeError(
                f"'lsa.cold_pool_gib'={self.capacity_gib!r} must be a number of GiB, "
                "e.g. 16."
            )
        if not math.isfinite(self.capacity_gib) or self.capacity_gib <= 0:
            raise ValueError(
                f"'lsa.cold_pool_gib'={self.capacity_gib!r} must be a positive finite "
                "number of GiB; every historical chunk lives in the cold pool, so "
                "size it for the concurrent contexts you serve, e.g. 16."
            )
        if self.capacity_chunks < 1:
            need_gib = self.slot_bytes / _GIB
            raise ValueError(
                f"'lsa.cold_pool_gib'={self.capacity_gib} holds no chunk of "
                f"{self.chunk_bytes} bytes; raise it to at least {need_gib:.6f}."
            )
        if self.backend not in ("lmcache", "torch"):
            raise ValueError(
                f"ColdPoolConfig.backend={self.backend!r} must be 'lmcache' or "
                "'torch'; use 'lmcache' (the default) or 'torch' without LMCache."
            )
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise TypeError(
                f"ColdPoolConfig.pin_memory={self.pin_memory!r} must be True, False "
                "or None (pin iff CUDA is available)."
            )

    @property
    def slot_bytes(self) -> int:
        """Bytes one chunk occupies in the pool: `chunk_bytes` rounded to 64."""
        return -(-self.chunk_bytes // SLOT_ALIGN_BYTES) * SLOT_ALIGN_BYTES

    @property
    def capacity_chunks(self) -> int:
        return int(self.capacity_gib * _GIB) // self.slot_bytes


@dataclass(frozen=True)
class ColdPoolStats:
    """Counts at one instant; bytes are chunks x `chunk_bytes` (payload bytes)."""

    capacity_chunks: int
    # Chunks committed to requests by reserve(); stored chunks are a subset.
    reserved_chunks: int
    stored_chunks: int
    # What reserve() can still grant: capacity - reserved.
    free_chunks: int
    num_requests: int
    chunk_bytes: int

    @property
    def capacity_bytes(self) -> int:
        return self.capacity_chunks * self.chunk_bytes

    @property
    def reserved_bytes(self) -> int:
        return self.reserved_chunks * self.chunk_bytes

    @property
    def stored_bytes(self) -> int:
        return self.stored_chunks * self.chunk_bytes

    @property
    def free_bytes(self) -> int:
        return self.free_chunks * self.chunk_bytes


class ChunkStore(Protocol):
    """What ColdPool needs from a backend; the pool does all admission and checks."""

    def batched_put(self, keys: Sequence[ChunkKey], data: torch.Tensor) -> None: ...

    def batched_get(self, keys: Sequence[ChunkKey], out: torch.Tensor) -> None: ...

    def batched_delete(self, keys: Sequence[ChunkKey]) -> None: ...

    def arena_used_bytes(self) -> int: ...

    def close(self) -> None: ...


class TorchChunkStore:
    """A preallocated [capacity_chunks, slot_bytes] uint8 slab with a free list."""

    def __init__(self, capacity_chunks: int, config: ColdPoolConfig, pin: bool) -> None:
        self.chunk_bytes = config.chunk_bytes
        self.slot_bytes = config.slot_bytes
        self._slab = torch.empty(
            (capacity_chunks, self.slot_bytes), dtype=torch.uint8, pin_memory=pin
        )  # [capacity_chunks, slot_bytes]
        # Reversed so pop() hands out the lowest slot first: deterministic layouts.
        self._free: list[int] = list(range(capacity_chunks - 1, -1, -1))
        self._slot: dict[ChunkKey, int] = {}

    def batched_put(self, keys: Sequence[ChunkKey], data: torch.Tensor) -> None:
        # ColdPool deletes before it replaces and admits only what fits.
        assert all(k not in self._slot for k in keys), keys
        assert len(keys) <= len(self._free), (len(keys), len(self._free))
        slots = [self._free.pop() for _ in keys]
        for key, slot in zip(keys, slots, strict=True):
            self._slot[key] = slot
        idx = torch.tensor(slots, dtype=torch.long)
        self._slab[:, : self.chunk_bytes].index_copy_(0, idx, data.to("cpu"))

    def batched_get(self, keys: Sequence[ChunkKey], out: torch.Tensor) -> None:
        missing = [k for k in keys if k not in self._slot]
        if missing:
            raise LookupError(
                f"torch cold store has no slot for chunks {missing[:4]}, which "
                "ColdPool records as stored; a chunk was lost, which is a bug."
            )
        idx = torch.tensor([self._slot[k] for k in keys], dtype=torch.long)
        out.copy_(self._slab[:, : self.chunk_bytes].index_select(0, idx))

    def batched_delete(self, keys: Sequence[ChunkKey]) -> None:
        for key in keys:
            self._free.append(self._slot.pop(key))

    def arena_used_bytes(self) -> int:
        return len(self._slot) * self.slot_bytes

    def close(self) -> None:
        self._slot.clear()


class ColdPool:
    """Host-memory store of every CSA chunk of every request, keyed (request, chunk).

    Lifecycle of a request: `reserve` (admission) -> `batched_put` / `batched_get`
    any number of times -> `free_request` on finish or abort. Thread-safe: one lock
    serializes the bookkeeping, because the connector's scheduler and worker
    threads may both touch the pool.
    """

    def __init__(self, config: ColdPoolConfig) -> None:
        self.config = config
        cuda = torch.cuda.is_available()
        pin = cuda if config.pin_memory is None else config.pin_memory
        if pin and not cuda:
            raise ValueError(
                "ColdPoolConfig.pin_memory=True needs CUDA to page-lock host memory, "
                "and torch.cuda.is_available() is False; use pin_memory=None (auto)."
            )
        self.capacity_chunks = config.capacity_chunks
        self._store: ChunkStore
        if config.backend == "lmcache":
            if cuda and not pin:
                raise ValueError(
                    "ColdPoolConfig.pin_memory=False with backend='lmcache': LMCache "
                    "pins its arena whenever CUDA is present; use pin_memory=None, or "
                    "backend='torch' for pageable memory."
                )
            # Imported here so that importing core never imports LMCache.
            from vllm_flashmemory.core.lmcache_store import LMCacheChunkStore

            self._store = LMCacheChunkStore(
                capacity_chunks=self.capacity_chunks,
                chunk_bytes=config.chunk_bytes,
                align_bytes=SLOT_ALIGN_BYTES,
                namespace=f"flashmemory-cold-{os.getpid()}-{next(_pool_ids)}",
            )
        else:
            self._store = TorchChunkStore(self.capacity_chunks, config, pin)
        self.pinned = pin
        # A pool dropped without close() still returns its arena, instead of
        # LMCache warning about leaked objects at interpreter exit.
        self._finalizer = weakref.finalize(self, self._store.close)
        self._lock = threading.Lock()
        self._reserved: dict[str, int] = {}  # request -> chunks committed
        self._stored: dict[str, set[int]] = {}  # request -> chunk ids with data
        self._reserved_total = 0
        self._stored_total = 0
        self._closed = False
        logger.info(
            "ColdPool: %s backend, %d chunks of %d B (%.2f GiB), pinned=%s",
            config.backend,
            self.capacity_chunks,
            config.chunk_bytes,
            config.capacity_gib,
            pin,
        )

    # -- admission -------------------------------------------------------------

    def reserve(self, req_id: str, n_chunks: int) -> int:
        """Commit room for `n_chunks` chunks of `req_id` in total; return the newly
        reserved count (0 when the request already holds that many).

        Raises ColdPoolFullError, leaving the pool unchanged, when they do not fit.
        """
        _check_req_id(req_id)
        _check_count("n_chunks", n_chunks)
        with self._lock:
            self._check_open()
            have = self._reserved.get(req_id, 0)
            need = n_chunks - have
            if need <= 0:
                self._reserved.setdefault(req_id, have)
                self._stored.setdefault(req_id, set())
                return 0
            free = self.capacity_chunks - self._reserved_total
            if need > free:
                raise ColdPoolFullError(self._full_message(req_id, need, free))
            self._reserved[req_id] = n_chunks
            self._stored.setdefault(req_id, set())
            self._reserved_total += need
            return need

    def _full_message(self, req_id: str, need: int, free: int) -> str:
        cb = self.config.slot_bytes
        # The smallest pool that would hold every reservation plus this one.
        fit_gib = _ceil_sig((self._reserved_total + need) * cb / _GIB)
        return (
            f"Cold pool cannot admit request {req_id!r}: it needs {need} more "
            f"chunks ({need * cb / _GIB:.6g} GiB) but only {free} of "
            f"{self.capacity_chunks} chunks ({free * cb / _GIB:.6g} GiB) are free; "
            f"raise 'lsa.cold_pool_gib' (now {self.config.capacity_gib:.6g}) to at "
            f"least {fit_gib:.6g}, or serve fewer or shorter requests at once."
        )

    # -- data path ---------------------------------------------------------------

    def batched_put(
        self, req_id: str, chunk_ids: Sequence[int], data: torch.Tensor
    ) -> None:
        """Store `data[i]` (uint8 [n, chunk_bytes], any device) as chunk
        `chunk_ids[i]` of `req_id`. Re-putting a stored chunk replaces its bytes
        (a chunk recomputed after preemption)."""
        ids = _check_chunk_ids(chunk_ids)
        _check_rows("data", data, len(ids), self.config.chunk_bytes)
        with nvtx_range("flashmemory.cold_pool.batched_put"), self._lock:
            self._check_open()
            stored = self._require_request(req_id)
            new = [c for c in ids if c not in stored]
            if len(stored) + len(new) > self._reserved[req_id]:
                raise ValueError(
                    f"ColdPool.batched_put of {len(new)} new chunks for request "
                    f"{req_id!r} exceeds its reservation of {self._reserved[req_id]} "
                    f"chunks ({len(stored)} stored); call reserve({req_id!r}, "
                    f"{len(stored) + len(new)}) first, so admission control can "
                    "refuse the request instead of dropping a chunk."
                )
            replaced = [c for c in ids if c in stored]
            if replaced:
                self._store.batched_delete([(req_id, c) for c in replaced])
            try:
                if ids:
                    self._store.batched_put([(req_id, c) for c in ids], data)
            except BaseException:
                # The replaced chunks are gone from the store: record that, so the
                # pool never claims bytes it no longer has.
                stored.difference_update(replaced)
                self._stored_total -= len(replaced)
                raise
            stored.update(new)
            self._stored_total += len(new)

    def batched_get(
        self,
        req_id: str,
        chunk_ids: Sequence[int],
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Copy chunks `chunk_ids` of `req_id` into `out` (uint8 [n, chunk_bytes], any
        device; allocated in host memory, pinned like the pool, when None)."""
        ids = _check_chunk_ids(chunk_ids)
        if out is None:
            out = torch.empty(
                (len(ids), self.config.chunk_bytes),
                dtype=torch.uint8,
                pin_memory=self.pinned,
            )
        else:
            _check_rows("out", out, len(ids), self.config.chunk_bytes)
        with nvtx_range("flashmemory.cold_pool.batched_get"), self._lock:
            self._check_open()
            stored = self._require_request(req_id)
            missing = [c for c in ids if c not in stored]
            if missing:
                raise LookupError(
                    f"ColdPool.batched_get: request {req_id!r} has no stored chunks "
                    f"{missing[:8]}; store them with batched_put first (stored: "
                    f"{len(stored)} chunks)."
                )
            if ids:
                self._store.batched_get([(req_id, c) for c in ids], out)
        return out

    # -- lifecycle ---------------------------------------------------------------

    def free_request(self, req_id: str) -> int:
        """Free every chunk and the reservation of `req_id` (finish or abort);
        return the number of chunks freed. Freeing twice raises."""
        with self._lock:
            self._check_open()
            stored = self._require_request(req_id)
            if stored:
                self._store.batched_delete([(req_id, c) for c in sorted(stored)])
            n = len(stored)
            self._stored_total -= n
            self._reserved_total -= self._reserved.pop(req_id)
            del self._stored[req_id]
            return n

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._finalizer()

    def __enter__(self) -> ColdPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- queries -----------------------------------------------------------------

    def contains(self, req_id: str, chunk_id: int) -> bool:
        with self._lock:
            return chunk_id in self._stored.get(req_id, ())

    def has_request(self, req_id: str) -> bool:
        with self._lock:
            return req_id in self._reserved

    def request_chunk_ids(self, req_id: str) -> frozenset[int]:
        """Chunk ids of `req_id` with data in the pool (empty if unknown)."""
        with self._lock:
            return frozenset(self._stored.get(req_id, ()))

    def reservation(self, req_id: str) -> int:
        """Chunks committed to `req_id` (0 if unknown)."""
        with self._lock:
            return self._reserved.get(req_id, 0)

    @property
    def stats(self) -> ColdPoolStats:
        with self._lock:
            return ColdPoolStats(
                capacity_chunks=self.capacity_chunks,
                reserved_chunks=self._reserved_total,
                stored_chunks=self._stored_total,
                free_chunks=self.capacity_chunks - self._reserved_total,
                num_requests=len(self._reserved),
                chunk_bytes=self.config.chunk_bytes,
            )

    def arena_used_bytes(self) -> int:
        """Bytes the backend's allocator holds: stored chunks x `slot_bytes`."""
        with self._lock:
            return self._store.arena_used_bytes()

    # -- helpers -----------------------------------------------------------------

    def _require_request(self, req_id: str) -> set[int]:
        stored = self._stored.get(req_id)
        if stored is None:
            raise ValueError(
                f"ColdPool has no request {req_id!r}: it was never reserved or was "
                "already freed; call reserve(req_id, n_chunks) when the request is "
                "admitted and free_request(req_id) exactly once when it ends."
            )
        return stored

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("ColdPool is closed; build a new pool.")


def _ceil_sig(x: float, digits: int = 6) -> float:
    """`x` rounded up at `digits` significant digits, so a suggested size fits."""
    q = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return math.ceil(x / q) * q


def _check_req_id(req_id: str) -> None:
    if not isinstance(req_id, str):
        raise TypeError(
            f"ColdPool request id {req_id!r} must be a str (vLLM's request_id)."
        )


def _check_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"ColdPool {name}={value!r} must be an int >= 0.")


def _check_chunk_ids(chunk_ids: Sequence[int]) -> list[int]:
    ids = [int(c) for c in chunk_ids]
    for c in ids:
        if not 0 <= c <= _MAX_CHUNK_ID:
            raise ValueError(
                f"ColdPool chunk id {c} must lie in [0, 2**63); chunk ids are a "
                "request's CSA chunk indices."
            )
    if len(set(ids)) != len(ids):
        dup = sorted({c for c in ids if ids.count(c) > 1})
        raise ValueError(
            f"ColdPool chunk ids {dup} appear more than once in one batch; pass each "
            "chunk once."
        )
    return ids


def _check_rows(name: str, t: torch.Tensor, n: int, chunk_bytes: int) -> None:
    if t.dtype != torch.uint8 or tuple(t.shape) != (n, chunk_bytes):
        raise ValueError(
            f"ColdPool {name} must be uint8 [{n}, {chunk_bytes}] (one row per chunk "
            f"id), got {t.dtype} {list(t.shape)}; view the chunk bytes as uint8."
        )
