"""`LlumletConnector`: a vLLM v1 KV connector whose one job is `register_kv_caches`: telling the
llumlet exactly where each of vLLM's KV cache tensors keeps block N, so that copying block N of a
region copies exactly the bytes of vLLM's block N. It moves no KV itself (the llumlet does,
between steps, on the adapter's commands); every other connector hook is a no-op.

Layouts (per layer tensor, `nb` = the manager's blocks, `k` kernel blocks per manager block):
* `(2, nb·k, ...)`: FlashAttention and most backends, K then V: two regions per layer,
  `KeyOnly` and `ValueOnly`;
* `(nb·k, ...)`: FlashInfer, Triton (K and V inside each block): one `KvTogether` region.
A block must be one contiguous run of bytes in its region (checked from the strides); anything
else (MLA with another first dimension, cross-layer blocks) is refused at start with the shape.

Memory:
* CUDA tensors: a CUDA IPC handle of the allocation and the offset inside it. **Not yet run on a
  GPU** (docs/vllm.md).
* host tensors: the shared-memory file the tensor lives in, found in /proc/self/maps; a tensor in
  private memory (plain `torch.zeros`, as vLLM's CPU worker allocates) cannot be reached by
  another process and is refused with that reason.
"""
from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

log = logging.getLogger("vllm.llumlet_vllm")

HOST_SHM, CUDA_IPC = 1, 2
TOGETHER, KEY_ONLY, VALUE_ONLY = 1, 2, 3


@dataclass(frozen=True)
class Region:
    """One entry of the llumlet's KV region registry."""
    memory: int
    layout: int
    layer: int
    handle: bytes
    offset: int
    num_blocks: int
    block_size_bytes: int
    token_size_bytes: int


class LayoutError(RuntimeError):
    """A KV cache the llumlet cannot address block by block."""


# Regions travel from the worker's connector to the scheduler of the same engine, keyed by the
# engine's KV transfer id (with world size 1 both live in the EngineCore process; the worker's
# connector is created first).
_lock = threading.Lock()
_pending: dict[str, list[Region]] = {}
_sinks: dict[str, object] = {}


def engine_key(vllm_config) -> str | None:
    ktc = vllm_config.kv_transfer_config
    return None if ktc is None else str(ktc.engine_id)


def publish(key: str, regions: list[Region]) -> None:
    """Hands regions to the adapter of engine `key` (now, or when its endpoint is created)."""
    with _lock:
        sink = _sinks.get(key)
        if sink is not None:
            for r in regions:
                sink(r)
        else:
            _pending.setdefault(key, []).extend(regions)


def attach_sink(key: str | None, sink) -> int:
    """Engine `key`'s adapter registers its regions from now on; returns how many were pending."""
    if key is None:
        return 0
    with _lock:
        _sinks[key] = sink
        pending = _pending.pop(key, [])
        for r in pending:
            sink(r)
        return len(pending)


def detach_sink(key: str | None) -> None:
    with _lock:
        _sinks.pop(key, None)


def _layer_index(name: str) -> int:
    m = re.findall(r"\.(\d+)\.", "." + name + ".")
    if not m:
        raise LayoutError(f"cannot tell the layer of KV cache tensor {name!r}")
    return int(m[0])


def _shared_file(ptr: int, length: int) -> tuple[str, int]:
    """The shared file mapping bytes [ptr, ptr+length) of this process, and the file offset of ptr."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            if not start <= ptr < end:
                continue
            path = parts[5].strip() if len(parts) > 5 else ""
            if "s" not in parts[1] or not path.startswith("/"):
                raise LayoutError("private memory (not a shared file mapping): another process "
                                  "cannot reach it")
            if ptr + length > end:
                raise LayoutError(f"spans more than one mapping of {path}")
            return path, int(parts[2], 16) + (ptr - start)
    raise LayoutError(f"address {ptr:#x} is not mapped")


def _handle(t, length: int) -> tuple[int, bytes, int]:
    """(memory kind, handle, offset of t's first byte in the memory the handle names)."""
    if t.is_cuda:
        # The caching allocator hands out views into larger cudaMalloc segments: the IPC handle
        # names the segment, and the offset is the storage's offset in it plus the view's.
        storage = t.untyped_storage()
        shared = storage._share_cuda_()
        handle, storage_offset = shared[1], int(shared[3])
        view = t.data_ptr() - storage.data_ptr()
        if len(handle) != 64:
            raise LayoutError(f"a CUDA IPC handle of {len(handle)} bytes")
        return CUDA_IPC, bytes(handle), storage_offset + view
    path, offset = _shared_file(t.data_ptr(), length)
    name = path[len("/dev/shm/"):] if path.startswith("/dev/shm/") else path
    if len(name.encode()) > 64:
        raise LayoutError(f"shared file name {name!r} is longer than 64 bytes")
    return HOST_SHM, name.encode(), offset


def describe(kv_caches: dict, num_blocks: int, block_size: int) -> list[Region]:
    """The regions of vLLM's per-layer KV cache tensors, ordered by layer (K before V)."""
    regions = []
    for name, t in sorted(kv_caches.items(), key=lambda kv: _layer_index(kv[0])):
        layer = _layer_index(name)
        try:
            if (t.dim() >= 2 and t.shape[0] == 2 and t.shape[1] >= num_blocks
                    and t.shape[1] % num_blocks == 0):
                parts = [(KEY_ONLY, t[0]), (VALUE_ONLY, t[1])]
            elif t.shape[0] % num_blocks == 0:
                parts = [(TOGETHER, t)]
            else:
                raise LayoutError(f"shape {tuple(t.shape)} has no dimension of {num_blocks} blocks")
            for layout, part in parts:
                k = part.shape[0] // num_blocks  # kernel blocks per manager block
                elems = part.stride(0) * k
                per_block = part[:k].numel() if k > 0 else 0
                if per_block != elems:
                    raise LayoutError(f"a block of shape {tuple(part.shape[1:])} is not one "
                                      f"contiguous run (strides {part.stride()})")
                block_bytes = elems * part.element_size()
                if block_bytes % block_size:
                    raise LayoutError(f"{block_bytes}-byte blocks of {block_size} tokens")
                memory, handle, offset = _handle(part, num_blocks * block_bytes)
                regions.append(Region(memory, layout, layer, handle, offset, num_blocks,
                                      block_bytes, block_bytes // block_size))
        except LayoutError as e:
            raise LayoutError(f"KV cache of layer {layer} ({name}): {e}") from None
    return regions


class LlumletMetadata(KVConnectorMetadata):
    """Nothing travels from the scheduler's connector to the worker's."""


class LlumletConnector(KVConnectorBase_V1):
    """Registers vLLM's KV cache with the llumlet; moves nothing itself."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._num_blocks = (kv_cache_config.num_blocks if kv_cache_config is not None
                            else vllm_config.cache_config.num_gpu_blocks)
        self._block_size = vllm_config.cache_config.block_size
        self._key = engine_key(vllm_config)

    # worker side ----------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches):
        regions = describe(kv_caches, self._num_blocks, self._block_size)
        log.info("llumlet_vllm: %d KV regions of %d blocks (%d bytes each)", len(regions),
                 self._num_blocks, regions[0].block_size_bytes if regions else 0)
        publish(self._key, regions)

    def start_load_kv(self, forward_context, **kwargs):
        return None

    def wait_for_layer_load(self, layer_name):
        return None

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        return None

    def wait_for_save(self):
        return None

    # scheduler side -------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def build_connector_meta(self, scheduler_output):
        return LlumletMetadata()

    def request_finished(self, request, block_ids):
        return False, None


__all__ = ["LlumletConnector", "KVConnectorRole", "Region", "LayoutError", "describe"]
