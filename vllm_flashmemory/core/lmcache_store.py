"""Chunk objects in LMCache 0.5.6's L1 storage layer, keyed by (request, chunk).

This is the only module of the package that imports `lmcache`. It wraps one internal
LMCache class behind the small `ChunkStore` interface that `ColdPool` consumes, so an
LMCache upgrade touches this file only. LMCache's storage API is internal and moves
between releases (notes/lmcache.md, "Risks" 2), hence the exact version pin below.

Which LMCache layer, and why:

- We use `lmcache.v1.distributed.l1_manager.L1Manager`, the key-level object store
  under MP mode's `StorageManager` (whose `reserve_write` / `finish_write` /
  `delete_l1_keys` delegate to it). Its verbs are exactly ours: `reserve_write` ->
  fill -> `finish_write` is a put, `reserve_read` -> copy -> `finish_read` a get,
  `delete` a free. Keys are arbitrary bytes, not prefix-chained token hashes, so
  chunk 7 of a request is addressable without chunks 0-6.
- Not `StorageManager` itself: it starts eviction, store and prefetch controller
  threads plus a process-wide `PeriodicEventNotifier`. Eviction is the one thing a
  cold pool must never do (DESIGN.md invariant 3). L1Manager has no eviction path
  at all (LMCache evicts only from `L1EvictionController`, which we never build),
  and `ColdPool` checks capacity before every write, so LMCache is never asked for
  memory it lacks.
- Not the in-process `storage_backend.StorageManager` / `LocalCPUBackend`: importing
  it pulls `aiofile`, GDS and remote-backend modules that a CPU install lacks, and
  it wants a full `LMCacheEngineConfig` plus model metadata for a byte store.

Memory: the L1 arena is one allocation made at construction (`use_lazy=False`), via
LMCache's platform allocator: page-locked when an accelerator is present (its CUDA
op, or `torch.empty(pin_memory=True)` when that op fails to load), page-aligned
pageable memory on CPU. If pinning fails LMCache only logs a warning and carries on
pageable; transfers stay correct, only slower. (Verified on CPU; not on a GPU.)
POSIX shared memory is off (`shm_name=""`): LMCache names the segment after the
process id, so a second pool in one process would unlink the first one's segment.

Objects: each is `chunk_bytes` rounded up to
`align_bytes` (ColdPool passes a cache line: pinned-host DMA needs no page alignment,
and LMCache's 4 KiB default would waste up to 40x on the tiny model's chunks). With
equal-size objects the first-fit arena cannot fragment, so `capacity_chunks` objects
always fit in `capacity_chunks * slot_bytes` bytes; the property tests check it.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# Exact release this wrapper was written against; its L1 API is internal.
LMCACHE_VERSION = "0.5.6"
# Writer tag LMCache uses to tell concurrent stagers of one key apart; we have one.
_WRITER_TAG = "flashmemory"


def _check_version() -> None:
    try:
        installed = importlib.metadata.version("lmcache")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(
            f"ColdPool backend 'lmcache' needs lmcache=={LMCACHE_VERSION}, which is "
            "not installed; run scripts/install_lmcache.sh (it keeps your torch), "
            "or build the pool with ColdPoolConfig(backend='torch')."
        ) from None
    if installed != LMCACHE_VERSION:
        raise ImportError(
            f"lmcache=={installed} is installed but ColdPool wraps LMCache's internal "
            f"L1 API of exactly {LMCACHE_VERSION}; run scripts/install_lmcache.sh to "
            "install the pinned release, or use ColdPoolConfig(backend='torch')."
        )


_check_version()

# LMCache imports go after the version check so a wrong version fails with our
# message rather than an ImportError from deep inside a moved module.
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey  # noqa: E402
from lmcache.v1.distributed.config import (  # noqa: E402
    L1ManagerConfig,
    L1MemoryManagerConfig,
)
from lmcache.v1.distributed.error import L1Error  # noqa: E402
from lmcache.v1.distributed.l1_manager import L1Manager  # noqa: E402

ChunkKey = tuple[str, int]  # (request id, chunk index within the request)


class LMCacheChunkStore:
    """`capacity_chunks` uint8 objects of `chunk_bytes`, in one LMCache L1 arena.

    The store trusts its caller for admission: `ColdPool` never puts more chunks
    than `capacity_chunks`, so an LMCache out-of-memory here is a bug and raises.
    """

    def __init__(
        self, capacity_chunks: int, chunk_bytes: int, align_bytes: int, namespace: str
    ) -> None:
        self.capacity_chunks = capacity_chunks
        self.chunk_bytes = chunk_bytes
        self.slot_bytes = -(-chunk_bytes // align_bytes) * align_bytes
        # The key's model_name field; one namespace per pool keeps two pools in a
        # process (tests, two engines) from ever seeing each other's keys.
        self._namespace = namespace
        self._layout = MemoryLayoutDesc([torch.Size([chunk_bytes])], [torch.uint8])
        self._l1 = L1Manager(
            L1ManagerConfig(
                memory_config=L1MemoryManagerConfig(
                    size_in_bytes=capacity_chunks * self.slot_bytes,
                    use_lazy=False,
                    align_bytes=align_bytes,
                    shm_name="",
                ),
                tag="flashmemory_cold_pool",
            )
        )
        self._closed = False

    def _key(self, key: ChunkKey) -> ObjectKey:
        req_id, chunk_id = key
        req = req_id.encode("utf-8")
        # Length-prefixed, so the encoding is injective: a hash here could collide,
        # and a collision would silently hand one request another's KV.
        raw = len(req).to_bytes(4, "little") + req + chunk_id.to_bytes(8, "little")
        return ObjectKey(chunk_hash=raw, model_name=self._namespace, kv_rank=0)

    def batched_put(self, keys: Sequence[ChunkKey], data: torch.Tensor) -> None:
        """Write `data[i]` (uint8 [n, chunk_bytes]) under new keys `keys[i]`."""
        okeys = [self._key(k) for k in keys]
        reserved = self._l1.reserve_write(
            keys=okeys,
            is_temporary=[False] * len(okeys),
            layout_desc=self._layout,
            tag=_WRITER_TAG,
        )
        failed = [
            (k, reserved[o][0].name)
            for k, o in zip(keys, okeys, strict=True)
            if reserved[o][0] != L1Error.SUCCESS
        ]
        if failed:
            # Roll back the reservations that did succeed, so a failed batch leaves
            # nothing staged behind.
            self._l1.finish_write_and_delete(
                [o for o in okeys if reserved[o][0] == L1Error.SUCCESS], tag=_WRITER_TAG
            )
            raise RuntimeError(
                f"LMCache refused to stage cold-pool chunks {failed[:4]}; ColdPool's "
                "capacity check should make this impossible, so this is a bug: "
                "please report it with the pool's stats."
            )
        try:
            for i, okey in enumerate(okeys):
                reserved[okey][1].tensor.copy_(data[i])
        except BaseException:
            # A failed copy must not leave write-locked staging objects holding
            # arena memory that ColdPool does not count (until their 600 s TTL).
            self._l1.finish_write_and_delete(okeys, tag=_WRITER_TAG)
            raise
        done = self._l1.finish_write(okeys, tag=_WRITER_TAG)
        bad = [
            k for k, o in zip(keys, okeys, strict=True) if done[o] != L1Error.SUCCESS
        ]
        if bad:
            raise RuntimeError(
                f"LMCache did not admit cold-pool chunks {bad[:4]} after writing them; "
                "this is a bug: please report it."
            )

    def batched_get(self, keys: Sequence[ChunkKey], out: torch.Tensor) -> None:
        """Copy the chunks under `keys` into `out[i]` (uint8 [n, chunk_bytes])."""
        okeys = [self._key(k) for k in keys]
        got = self._l1.reserve_read(okeys)
        locked = [o for o in okeys if got[o][0] == L1Error.SUCCESS]
        try:
            missing = [
                k
                for k, o in zip(keys, okeys, strict=True)
                if got[o][0] != L1Error.SUCCESS
            ]
            if missing:
                raise LookupError(
                    f"LMCache has no object for cold-pool chunks {missing[:4]}, which "
                    "ColdPool records as stored; a chunk was lost, which is a bug."
                )
            for i, okey in enumerate(okeys):
                out[i].copy_(got[okey][1].tensor)
        finally:
            # Release even on failure: a read lock left behind makes the key
            # undeletable until its TTL expires.
            self._l1.finish_read(locked)

    def batched_delete(self, keys: Sequence[ChunkKey]) -> None:
        okeys = [self._key(k) for k in keys]
        done = self._l1.delete(okeys)
        bad = [
            (k, done[o].name)
            for k, o in zip(keys, okeys, strict=True)
            if done[o] != L1Error.SUCCESS
        ]
        if bad:
            raise RuntimeError(
                f"LMCache could not delete cold-pool chunks {bad[:4]}; ColdPool never "
                "holds a read lock across calls, so this is a bug: please report it."
            )

    def arena_used_bytes(self) -> int:
        """Bytes LMCache's allocator reports in use (for exact-accounting tests)."""
        return self._l1.get_memory_usage()[0]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._l1.close()
