"""Prototype of the engine side of a vLLM 0.18 adapter: a `Scheduler` subclass loaded through
`SchedulerConfig.scheduler_cls` that

* runs code once per engine step (before and after `Scheduler.schedule`, after
  `Scheduler.update_from_output`),
* computes the Llumnix status fields from the scheduler and the KV cache manager and publishes
  them (and the request table) through the llumlet Python binding when LLUMLET_ADAPTER_SHM is
  set (LLUMLET_FFI_LIB names the library),
* implements the migration primitives the llumlet's commands need, on vLLM's own structures:
  suspend / resume / commit at the source; reserve / commit / abort at the destination.

Research code: not the adapter. Everything here runs on the engine thread between two steps.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field

import msgspec

from vllm import SamplingParams
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.request import Request, RequestStatus
from vllm.v1.serial_utils import MsgpackDecoder, MsgpackEncoder

# request-table states of the llumlet binding (ffi/python/llumlet_engine.py)
REQ_WAITING, REQ_PREFILL, REQ_RUNNING, REQ_SUSPENDED, REQ_MIGRATING_IN = 1, 2, 3, 4, 5


def _find_engine_core():
    """The EngineCore whose __init__ is constructing this scheduler (None when built by hand).

    EngineCore.__init__ calls `Scheduler(vllm_config=..., ...)`; for EngineCoreProc,
    `input_queue`, `output_queue` and `engine_index` already exist at that point.
    """
    f = sys._getframe(2)
    while f is not None:
        obj = f.f_locals.get("self")
        if obj is not None and type(obj).__name__ in ("EngineCore", "EngineCoreProc", "DPEngineCoreProc"):
            return obj
        f = f.f_back
    return None


@dataclass
class _Out:
    """A request this engine is migrating out."""
    suspended: bool = False
    index: int = 0  # its place in `running` when it was taken out


@dataclass
class _In:
    """A reservation (and later a committed request) migrating in."""
    placeholder: Request
    committed: bool = False
    origin: dict = field(default_factory=dict)


class LlumletScheduler(Scheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.engine_core = _find_engine_core()
        self._pending = threading.Event()
        self.idle_kicks_handled = 0
        if os.environ.get("LLUMLET_ADAPTER_TEST_KICK"):
            def kicker():
                for _ in range(3):
                    time.sleep(0.5)
                    self.kick()
            threading.Thread(target=kicker, daemon=True).start()
        if os.environ.get("LLUMLET_ADAPTER_DEBUG"):
            ec = self.engine_core
            print(f"[LlumletScheduler pid={os.getpid()}] engine core: {type(ec).__name__}, "
                  f"engine_index={getattr(ec, 'engine_index', None)}, "
                  f"input_queue={'yes' if hasattr(ec, 'input_queue') else 'no'}", flush=True)
        self.step_id = 0
        self.update_id = 0
        self.update_steps = int(os.environ.get("LLUMNIX_INSTANCE_UPDATE_STEPS", "1"))
        self.num_total_tokens = self.cache_config.num_gpu_blocks * self.block_size
        self.migrating_out: dict[str, _Out] = {}
        self.migrating_in: dict[str, _In] = {}
        self.rewrite_new: set[str] = set()
        self.forwarded: list = []  # (origin, EngineCoreOutput) of migrated-in requests
        self.migration_failed: set[str] = set()
        self.last_status: dict = {}
        self._t_schedule = 0.0
        self._last_sched_out = None
        self._table: dict[str, tuple[int, int]] = {}  # rid -> (slot, blocks reported)
        self._encoder = MsgpackEncoder()
        self._decoder = MsgpackDecoder(EngineCoreRequest)
        self.binding = None
        shm = os.environ.get("LLUMLET_ADAPTER_SHM")
        if shm:
            sys.path.append(os.environ["LLUMLET_BINDING_DIR"])
            import llumlet_engine

            self.binding = llumlet_engine.Engine(os.environ.get("LLUMLET_INSTANCE_ID", shm), shm=shm)
            import ctypes
            lib = llumlet_engine._lib
            lib.llumlet_engine_request_progress.argtypes = [
                ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t]
            self._lib = lib

    # ------------------------------------------------------------------ per-step hooks
    def schedule(self):
        self._poll_commands()
        # Keep requests that are migrating out away from preemption: with FCFS the victim is
        # `running.pop()`, so move them to the front (priority policy: not protected).
        if self.migrating_out and len(self.running) > 1:
            marked = [r for r in self.running if r.request_id in self.migrating_out]
            if marked:
                rest = [r for r in self.running if r.request_id not in self.migrating_out]
                self.running = marked + rest
        out = super().schedule()
        for rid in out.preempted_req_ids & self.migrating_out.keys():
            self.migration_failed.add(rid)  # its blocks are gone: the migration must abort
        # A request committed here from another engine reaches the worker as a *new* request,
        # and vLLM's GPU runner starts a new request's token list from prompt_token_ids only.
        # Hand it prompt + output tokens so the position it resumes at has a token.
        # (The V2 runner, VLLM_USE_V2_MODEL_RUNNER=1, gets every token in prefill_token_ids
        # and must not be given a longer prompt.)
        for nr in out.scheduled_new_reqs:
            if nr.req_id in self.rewrite_new:
                if not self.use_v2_model_runner:
                    nr.prompt_token_ids = list(self.requests[nr.req_id].all_token_ids)
                self.rewrite_new.discard(nr.req_id)
        self._t_schedule = time.perf_counter()
        self._last_sched_out = out
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        step_s = time.perf_counter() - self._t_schedule
        outs = super().update_from_output(scheduler_output, model_runner_output)
        self.step_id += 1
        # Outputs of requests that migrated in belong to the frontend that sent them.
        if self.migrating_in:
            for ci, eco in list(outs.items()):
                keep = []
                for o in eco.outputs:
                    mi = self.migrating_in.get(o.request_id)
                    if mi is not None and mi.committed:
                        self.forwarded.append((mi.origin, o))
                        if o.finished:
                            del self.migrating_in[o.request_id]
                    else:
                        keep.append(o)
                eco.outputs = keep
        if self.step_id % self.update_steps == 0:
            self.publish_status(scheduler_output, step_s)
        return outs

    def has_requests(self) -> bool:
        # True while llumlet commands are pending, so that an idle EngineCoreProc (blocked in
        # input_queue.get) runs a step after a WAKEUP and schedule() gets to handle them.
        return self._pending.is_set() or super().has_requests()

    def kick(self) -> bool:
        """From any thread: make the engine loop run a step soon, even when it is idle."""
        self._pending.set()
        q = getattr(self.engine_core, "input_queue", None)
        if q is None:
            return False  # in-process EngineCore: whoever calls step() drives it
        from vllm.v1.engine import EngineCoreRequestType
        q.put_nowait((EngineCoreRequestType.WAKEUP, None))
        return True

    def _poll_commands(self):
        """Engine thread, before each schedule(): where llumlet commands would be handled."""
        if self._pending.is_set():
            self._pending.clear()
            self.idle_kicks_handled += 1
            if os.environ.get("LLUMLET_ADAPTER_DEBUG"):
                print(f"[LlumletScheduler] step {self.step_id}: handled a kick "
                      f"(running={len(self.running)}, waiting={len(self.waiting)})", flush=True)

    def shutdown(self) -> None:
        super().shutdown()
        if self.binding is not None:
            self.binding.close()  # removes the control segment
            self.binding = None

    # ------------------------------------------------------------------ status
    def collect_status(self, scheduler_output=None, step_s: float = 0.0) -> dict:
        bs = self.block_size
        free_blocks = self.kv_cache_manager.block_pool.get_num_free_blocks()
        waiting = list(self.waiting) + list(self.skipped_waiting)
        s = dict(step_id=self.step_id, update_id=self.update_id,
                 num_total_gpu_tokens=self.num_total_tokens,
                 num_used_gpu_tokens=self.num_total_tokens - free_blocks * bs,
                 num_running_requests=len(self.running),
                 num_waiting_requests=len(waiting),
                 num_loading_requests=0, profiling_id=-1)
        w2d_n = w2d_t = wpre = 0
        for r in waiting:
            left = r.num_tokens - r.num_computed_tokens
            mt = r.sampling_params.max_tokens if r.sampling_params is not None else 1
            if mt > 1 or left == 1:
                w2d_n += 1
                w2d_t += r.num_tokens
            if left > 1:
                # upstream asks get_computed_blocks (prefix-cache hit) here; it has side effects
                # on the prefix-cache stats when log_stats is on, so a real adapter should use
                # coordinator.find_longest_cache_hit directly or accept the stat noise.
                wpre += r.num_tokens - r.num_computed_tokens
        r2d_n = r2d_t = rpre_unalloc = rpre_uncomp = 0
        sched = scheduler_output.num_scheduled_tokens if scheduler_output is not None else {}
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                left = r.num_tokens - r.num_computed_tokens
                rpre_unalloc += left
                rpre_uncomp += left
            mt = r.sampling_params.max_tokens if r.sampling_params is not None else 1
            if mt > 1 and r.request_id not in self.migrating_out:
                r2d_n += 1
                r2d_t += r.num_tokens
        s.update(scheduler_waiting_to_decode_requests_num=w2d_n,
                 scheduler_waiting_to_decode_tokens_num=w2d_t,
                 num_uncomputed_tokens_scheduler_waiting_prefills=wpre,
                 num_uncomputed_tokens_all_waiting_prefills=wpre,
                 scheduler_running_to_decode_requests_num=r2d_n,
                 scheduler_running_to_decode_tokens_num=r2d_t,
                 num_unallocated_tokens_scheduler_running_prefills=rpre_unalloc,
                 num_uncomputed_tokens_scheduler_running_prefills=rpre_uncomp,
                 num_migrate_out_reqs=len(self.migrating_out),
                 num_migrate_in_reqs=len(self.migrating_in))
        prefill_tokens = sum(n for n in sched.values() if n > 1)
        s.update(num_scheduled_prefill_tokens=prefill_tokens, step_duration=step_s * 1000.0)
        s["waiting_requests"] = [r.request_id for r in waiting]
        return s

    def publish_status(self, scheduler_output=None, step_s: float = 0.0):
        self.update_id += 1
        s = self.collect_status(scheduler_output, step_s)
        self.last_status = s
        if self.binding is None:
            return
        ids = s.pop("waiting_requests")
        self.binding.set_waiting_ids(ids)
        self.binding.publish(**s)
        self._sync_table()

    def _sync_table(self):
        """Request table: add new requests, record progress and blocks gained, drop finished."""
        import ctypes
        live = {}
        for r in self.running:
            live[r.request_id] = (r, REQ_PREFILL if r.num_computed_tokens < r.num_prompt_tokens else REQ_RUNNING)
        for r in list(self.waiting) + list(self.skipped_waiting):
            live[r.request_id] = (r, REQ_WAITING)
        for rid, mo in self.migrating_out.items():
            if mo.suspended and rid in self.requests:
                live[rid] = (self.requests[rid], REQ_SUSPENDED)
        for rid in [k for k in self._table if k not in live and k not in self.migrating_in]:
            slot, _ = self._table.pop(rid)
            self._lib.llumlet_engine_remove_request(self.binding._h, slot)
        for rid, (r, state) in live.items():
            blocks = self.kv_cache_manager.get_block_ids(rid)[0] if rid in self.requests else []
            if rid not in self._table:
                slot = self.binding.add_request(rid, state, int(r.arrival_time * 1000),
                                                r.num_prompt_tokens, r.num_output_tokens, list(blocks))
                self._table[rid] = (slot, len(blocks))
            else:
                slot, have = self._table[rid]
                new = list(blocks[have:])
                arr = (ctypes.c_uint32 * len(new))(*new)
                rc = self._lib.llumlet_engine_request_progress(self.binding._h, slot, state,
                                                                 r.num_output_tokens, arr, len(new))
                assert rc == 0, rc
                self._table[rid] = (slot, len(blocks))

    # ------------------------------------------------------------------ source side
    def migrate_out_begin(self, rid: str) -> bool:
        r = self.requests.get(rid)
        if r is None or r.status != RequestStatus.RUNNING:
            return False
        self.migrating_out[rid] = _Out()
        return True

    def migrate_out_suspend(self, rid: str) -> bytes | None:
        """Take the request out of the batch, keep its blocks, return its state."""
        mo = self.migrating_out.get(rid)
        r = self.requests.get(rid)
        if mo is None or r is None or rid in self.migration_failed or r.status != RequestStatus.RUNNING:
            return None
        if r.num_output_placeholders:  # async scheduling: a token is still in flight
            return None
        if not mo.suspended:
            mo.index = self.running.index(r)
            self.running.remove(r)
            mo.suspended = True
        return self.serialize(r)

    def migrate_out_abort(self, rid: str) -> bool:
        mo = self.migrating_out.pop(rid, None)
        if mo is None:
            return False
        r = self.requests.get(rid)
        if mo.suspended and r is not None and not r.is_finished():
            self.running.insert(min(mo.index, len(self.running)), r)
        self.migration_failed.discard(rid)
        return True

    def migrate_out_commit(self, rid: str) -> bool:
        if self.migrating_out.pop(rid, None) is None:
            return False
        # Frees the blocks, tells the worker (finished_req_ids) and emits no output.
        self.finish_requests(rid, RequestStatus.FINISHED_ABORTED)
        return True

    def serialize(self, r: Request) -> bytes:
        ecr = EngineCoreRequest(
            request_id=r.request_id, prompt_token_ids=list(r.prompt_token_ids),
            mm_features=None, sampling_params=r.sampling_params, pooling_params=r.pooling_params,
            arrival_time=r.arrival_time, lora_request=r.lora_request, cache_salt=r.cache_salt,
            data_parallel_rank=None, client_index=r.client_index, priority=r.priority,
            trace_headers=r.trace_headers)
        bufs = self._encoder.encode(ecr)
        assert len(bufs) == 1, "tensors (prompt_embeds, mm) are not carried by this prototype"
        origin = {"engine_index": getattr(self.engine_core, "engine_index", 0),
                  "client_index": r.client_index}
        return msgspec.msgpack.encode({
            "ecr": bytes(bufs[0]), "output_token_ids": list(r.output_token_ids),
            "num_computed_tokens": r.num_computed_tokens, "num_cached_tokens": r.num_cached_tokens,
            "num_preemptions": r.num_preemptions, "origin": origin,
        })

    # ------------------------------------------------------------------ destination side
    def reserve_blocks(self, rid: str, num_blocks: int) -> list[int] | None:
        """Allocate (or grow to) `num_blocks` blocks for `rid`; their ids, or None."""
        mi = self.migrating_in.get(rid)
        if mi is None:
            if rid in self.requests:
                return None
            ph = Request(request_id=rid, prompt_token_ids=[0], sampling_params=SamplingParams(max_tokens=1),
                         pooling_params=None)
            mi = _In(placeholder=ph)
        have = len(self.kv_cache_manager.get_block_ids(rid)[0])
        if num_blocks > have:
            got = self.kv_cache_manager.allocate_slots(mi.placeholder, num_blocks * self.block_size,
                                                       delay_cache_blocks=True)
            if got is None:
                if rid not in self.migrating_in:
                    self.kv_cache_manager.free(mi.placeholder)
                return None
        self.migrating_in[rid] = mi
        return list(self.kv_cache_manager.get_block_ids(rid)[0])

    def migrate_in_abort(self, rid: str) -> bool:
        mi = self.migrating_in.get(rid)
        if mi is None or mi.committed:
            return False
        self.kv_cache_manager.free(mi.placeholder)
        del self.migrating_in[rid]
        return True

    def migrate_in_commit(self, rid: str, state: bytes, block_hasher=None) -> bool:
        mi = self.migrating_in.get(rid)
        if mi is None:
            return False
        if mi.committed:
            return True  # a repeated commit answers ok again
        st = msgspec.msgpack.decode(state)
        ecr = self._decoder.decode(st["ecr"])
        if ecr.request_id != rid:
            return False
        if block_hasher is None and self.engine_core is not None:
            block_hasher = self.engine_core.request_block_hasher
        req = Request.from_engine_core_request(ecr, block_hasher)
        req.append_output_token_ids(st["output_token_ids"])
        if req.num_tokens > len(self.kv_cache_manager.get_block_ids(rid)[0]) * self.block_size + self.block_size:
            return False
        # The KV of every token but the last sampled one is in the reserved blocks.
        req.num_computed_tokens = req.num_tokens - 1
        req.num_cached_tokens = st["num_cached_tokens"]
        req.num_preemptions = st["num_preemptions"]
        # WAITING with num_computed_tokens > 0: schedule() takes the "KV already there" branch,
        # and allocate_slots finds the reserved blocks under the same request id.
        self.requests[rid] = req
        self.waiting.prepend_request(req)
        self.rewrite_new.add(rid)
        mi.committed = True
        mi.origin = st["origin"]
        return True


def make_scheduler(*args, **kwargs):
    """`scheduler_cls` may name a callable: EngineCore only calls it with the Scheduler's keyword
    arguments. This one picks the base vLLM would have picked: with async scheduling on, vLLM's
    default is AsyncScheduler (output placeholders), and a custom class replaces it entirely."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    vllm_config = kwargs["vllm_config"]
    if vllm_config.scheduler_config.async_scheduling:
        cls = type("AsyncLlumletScheduler", (LlumletScheduler, AsyncScheduler), {})
    else:
        cls = LlumletScheduler
    return cls(*args, **kwargs)
