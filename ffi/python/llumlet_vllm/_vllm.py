"""Every use the adapter makes of vLLM beyond its public extension points (`scheduler_cls`, the
KV connector), in one place, for the one vLLM version it was written against and tested with.

An unsupported vLLM stops the engine at start with one line saying which versions are
supported; nothing here is tried "just in case" on another version. Each function names the
vLLM 0.18.0 code it relies on (docs/vllm.md, "What the adapter touches in vLLM").
"""
from __future__ import annotations

import sys
import time

SUPPORTED_VLLM = ("0.18.0",)


class UnsupportedVllm(RuntimeError):
    """The installed vLLM is not one the adapter supports."""


def check_version() -> str:
    """The installed vLLM version; raises UnsupportedVllm for any other than SUPPORTED_VLLM."""
    import vllm

    v = getattr(vllm, "__version__", "unknown")
    if v not in SUPPORTED_VLLM:
        raise UnsupportedVllm(
            f"llumlet_vllm supports vLLM {', '.join(SUPPORTED_VLLM)} only; this is vLLM {v} "
            "(pip install vllm==0.18.0, or use a llumlet_vllm written for this version)")
    return v


# ------------------------------------------------------------------------------ engine core

def find_engine_core():
    """The EngineCore constructing the scheduler being built (None when built by hand).

    vLLM 0.18 `EngineCore.__init__` (v1/engine/core.py) builds the scheduler itself; for an
    `EngineCoreProc`, `input_queue`, `output_queue`, `engine_index` and `addresses` already exist
    then. There is no public handle, so the caller's frames are searched.
    """
    f = sys._getframe(1)
    while f is not None:
        obj = f.f_locals.get("self")
        if obj is not None and any(c.__name__ == "EngineCore" for c in type(obj).__mro__):
            return obj
        f = f.f_back
    return None


def wake(engine_core) -> bool:
    """Makes an idle engine loop run one step (EngineCoreProc blocks in `input_queue.get()` while
    it has no requests): the WAKEUP item vLLM's own shutdown path uses, which the loop ignores.
    False for an in-process EngineCore, whose caller drives `step()` itself."""
    q = getattr(engine_core, "input_queue", None)
    if q is None:
        return False
    from vllm.v1.engine import EngineCoreRequestType

    q.put_nowait((EngineCoreRequestType.WAKEUP, None))
    return True


def engine_index(engine_core) -> int:
    return int(getattr(engine_core, "engine_index", 0) or 0)


def output_address(engine_core, client_index: int) -> str | None:
    """The ZMQ address of the frontend that owns requests of `client_index` (its PULL socket)."""
    addresses = getattr(engine_core, "addresses", None)
    outputs = getattr(addresses, "outputs", None) or []
    return outputs[client_index] if 0 <= client_index < len(outputs) else None


def drain_outputs(engine_core, timeout_s: float = 0.02) -> bool:
    """Waits until the engine's output thread has taken every output queued so far (a suspended
    request's last tokens leave before its state does); whether it got there in time."""
    q = getattr(engine_core, "output_queue", None)
    if q is None:
        return True
    deadline = time.monotonic() + timeout_s
    while not q.empty():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def block_hasher(engine_core):
    return getattr(engine_core, "request_block_hasher", None)


# ------------------------------------------------------------------------------ scheduler

def is_decoding(req) -> bool:
    """Running, past its prompt, with the KV of every token but the last sampled one computed
    (a preempted request recomputing its outputs is past its prompt but not there yet). Under
    async scheduling the tokens in flight count as computed."""
    from vllm.v1.request import RequestStatus

    in_flight = getattr(req, "num_output_placeholders", 0)
    return (req.status == RequestStatus.RUNNING
            and req.num_computed_tokens >= req.num_prompt_tokens
            and req.num_computed_tokens == req.num_tokens + in_flight - 1)


def suspend(sched, req) -> int:
    """Takes a running request out of the batch between two steps, keeping its blocks, its
    `requests` entry and the worker's cached state (the worker drops an unscheduled request from
    its batch but keeps its state). Returns its place in `running`."""
    i = sched.running.index(req)
    sched.running.pop(i)
    return i


def resume(sched, req, index: int) -> bool:
    """Puts a suspended request back into the batch: vLLM resends a running request that was not
    scheduled in the previous step with all its tokens (`_make_cached_request_data`). If the
    batch filled up meanwhile (a waiting request took the seat), vLLM's own preemption puts it
    first in line instead: its blocks are freed and it is recomputed. False then."""
    if len(sched.running) < sched.max_num_running_reqs:
        sched.running.insert(min(index, len(sched.running)), req)
        return True
    sched._preempt_request(req, time.monotonic())
    return False


def finish_migrated(finish, request_id: str) -> None:
    """Frees a request that now runs elsewhere with `finish` (vLLM's `finish_requests`): blocks
    freed, the worker told through `finished_req_ids`, and no output emitted (the frontend keeps
    waiting for the destination's)."""
    from vllm.v1.request import RequestStatus

    finish(request_id, RequestStatus.FINISHED_ABORTED)


def finish_aborted(sched, finish, request_id: str):
    """Aborts a live request on the llumlet's word; the finished output its client must get."""
    from vllm.v1.engine import EngineCoreOutput, FinishReason
    from vllm.v1.request import RequestStatus

    req = sched.requests.get(request_id)
    client = req.client_index if req is not None else 0
    finish(request_id, RequestStatus.FINISHED_ABORTED)
    return client, EngineCoreOutput(request_id=request_id, new_token_ids=[],
                                    finish_reason=FinishReason.ABORT)


def block_ids(sched, request_id: str) -> list[int]:
    """The request's blocks (KV cache group 0: the adapter supports one group)."""
    return list(sched.kv_cache_manager.get_block_ids(request_id)[0])


def blocks_of(sched, request_id: str) -> list:
    """The request's blocks as vLLM keeps them (KVCacheBlock objects, `.block_id`), without the
    copies `get_block_ids` makes: read every step for every request."""
    return sched.kv_cache_manager.coordinator.single_type_managers[0].req_to_blocks.get(request_id) or []


def free_blocks(sched) -> int:
    return sched.kv_cache_manager.block_pool.get_num_free_blocks()


def placeholder(request_id: str):
    """A stand-in request that holds a reservation: blocks are keyed by request id, so the real
    request added under the same id at commit inherits them."""
    from vllm import SamplingParams
    from vllm.v1.request import Request

    return Request(request_id=request_id, prompt_token_ids=[0],
                   sampling_params=SamplingParams(max_tokens=1), pooling_params=None)


def reserve(sched, ph, num_blocks: int) -> bool:
    """Grows `ph`'s reservation to `num_blocks` blocks (`allocate_slots` adds only the
    difference; `delay_cache_blocks` keeps them out of the prefix cache); False if out of blocks."""
    have = len(sched.kv_cache_manager.get_block_ids(ph.request_id)[0])
    if num_blocks <= have:
        return True
    got = sched.kv_cache_manager.allocate_slots(ph, num_blocks * sched.block_size,
                                                delay_cache_blocks=True)
    return got is not None


def free_reservation(sched, ph) -> None:
    sched.kv_cache_manager.free(ph)


def admit_migrated(sched, req) -> None:
    """Adds a migrated-in request, its KV already in the blocks held under its id: WAITING with
    `num_computed_tokens` > 0 takes `schedule()`'s "KV already there" branch (no recompute, no
    prefix lookup), ahead of new prompts."""
    sched.requests[req.request_id] = req
    sched.waiting.prepend_request(req)


def rewrite_new_requests(sched, scheduler_output, request_ids: set[str]) -> None:
    """vLLM 0.18's v1 GPU model runner builds a new request's tokens from
    `NewRequestData.prompt_token_ids` alone (`output_token_ids=[]`), so a migrated-in request
    reaching it as new would resume at a position it has no token for. Hand it prompt + output
    tokens (a new list: the field is the Request's own). The V2 runner gets every token in
    `prefill_token_ids` and must not be given a longer prompt."""
    if getattr(sched, "use_v2_model_runner", False):
        request_ids.clear()
        return
    for nr in scheduler_output.scheduled_new_reqs:
        if nr.req_id in request_ids:
            nr.prompt_token_ids = list(sched.requests[nr.req_id].all_token_ids)
            request_ids.discard(nr.req_id)


def prefix_hit_tokens(sched, req) -> int:
    """Tokens of a waiting request already in the prefix cache (what upstream subtracts from a
    waiting prefill), without the statistics `get_computed_blocks` records."""
    if not sched.cache_config.enable_prefix_caching or not req.block_hashes:
        return 0
    _, hit = sched.kv_cache_manager.coordinator.find_longest_cache_hit(req.block_hashes,
                                                                       req.num_tokens - 1)
    return hit


def waiting_requests(sched) -> list:
    return list(sched.waiting) + list(getattr(sched, "skipped_waiting", ()))
