"""The adapter's scheduler: vLLM's own scheduler (the one vLLM would have picked) plus

* the status: every LLUMNIX_INSTANCE_UPDATE_STEPS steps, and on the llumlet's request, the
  instance status computed from the scheduler and its KV cache manager, into the status ring;
* the request table: each live request's id, state, token counts and block table, every step;
* the llumlet's commands, served on the engine thread between two steps (never blocking one):
  Abort, migrate-out begin / suspend / commit / abort, reserve / migrate-in commit / abort;
* output forwarding: a request that migrated in sends its outputs to the frontend that owns it.

A poller thread moves commands from the control segment to the engine thread and wakes an idle
engine loop. Field meanings and the protocol: docs/vllm.md, docs/engine-interface.md.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import socket
import threading
import time
from dataclasses import dataclass

import llumlet_engine as le

from llumlet_vllm import _vllm, connector, state

log = logging.getLogger("vllm.llumlet_vllm")
_HOST = socket.gethostname()

# Migration ids committed in, remembered so that a repeated commit (a restarted llumlet's
# recovery) answers ok again.
COMMITTED_REMEMBERED = 1024


def _env_int(name: str, default: int, lo: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be an integer") from None
    if v < lo:
        raise ValueError(f"{name}={raw!r}: must be at least {lo}")
    return v


def _env_float(name: str, default: float, lo: float) -> float:
    raw = os.environ.get(name, str(default))
    try:
        v = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be a number") from None
    if not math.isfinite(v) or v < lo:
        raise ValueError(f"{name}={raw!r}: must be a finite number of at least {lo}")
    return v


@dataclass
class _Out:
    """A request migrating out."""
    migration: int
    request_id: str
    suspended: bool = False
    index: int = 0  # its place in `running` when suspended
    preempted: bool = False  # its blocks were taken: the migration must fail
    aborted: object = None  # vLLM's finish status of an abort that came while it was suspended
    handed: bool = False  # its state is in the mailbox and the suspend was answered


@dataclass
class _In:
    """A reservation for a request migrating in."""
    migration: int
    request_id: str
    placeholder: object
    slot: int


@dataclass
class _Row:
    """A request's slot in the table and what the table already has."""
    slot: int
    blocks: int
    preemptions: int


class LlumletAdapter:
    """Mixed into vLLM's scheduler class by `make_scheduler`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._llumlet_start()

    # ------------------------------------------------------------------ start and stop
    def _llumlet_start(self):
        self._vllm_version = _vllm.check_version()
        self._update_steps = _env_int("LLUMNIX_INSTANCE_UPDATE_STEPS", 1, 1)
        self._staleness_s = _env_float("LLUMNIX_RECENT_WAITINGS_STALENESS_SECONDS", 10.0, 0.0)
        instance = os.environ.get("LLUMLET_INSTANCE_ID", "")
        shm = os.environ.get("LLUMLET_ENGINE_SHM") or None
        if not instance and not shm:
            raise ValueError("LLUMLET_INSTANCE_ID is not set: the adapter names its control segment "
                             "after the instance id of the llumlet beside it")
        if self.kv_cache_config is not None and len(self.kv_cache_config.kv_cache_groups) != 1:
            raise ValueError("llumlet_vllm supports models with one KV cache group; this one has "
                             f"{len(self.kv_cache_config.kv_cache_groups)}")
        self.engine_core = _vllm.find_engine_core()
        self._ep = le.Engine(instance, shm=shm)
        # Commands are read on a thread of their own, which waits inside the binding (without
        # the interpreter lock) and wakes the engine loop when one comes; everything else on
        # the endpoint is done on the engine thread.
        self._reader = self._ep.command_reader()
        self.step_id = 0
        self.update_id = 0
        self._num_total_tokens = self.cache_config.num_gpu_blocks * self.block_size
        self._rows: dict[str, _Row] = {}
        self._slot_rid: dict[int, str] = {}
        self._out: dict[int, _Out] = {}  # by migration id
        self._out_rid: dict[str, _Out] = {}
        self._in: dict[int, _In] = {}  # by migration id
        self._in_rid: dict[str, _In] = {}
        self._committed = collections.OrderedDict()
        self._rewrite: set[str] = set()
        self._forward: dict[str, state.Origin] = {}
        self._abort_outputs: list = []
        self._replies: list[tuple[int, bool, int]] = []
        self._commands = collections.deque()
        self._deferred: list = []
        self._recent: dict[str, float] = {}
        self._t_schedule = time.perf_counter()
        self._last_output = None
        self._last_step_s = 0.0
        self._zmq = None
        self._sockets: dict[str, object] = {}
        self._skipped_ids: set[str] = set()
        self._logged_ids: set[str] = set()
        self._regions_key = connector.engine_key(self.vllm_config)
        n = connector.attach_sink(self._regions_key, self._register_region)
        if n == 0:
            log.warning("llumlet_vllm: no KV regions registered (is --kv-transfer-config set to "
                        "LlumletConnector?); the llumlet will refuse migrations")
        self._publish(None, 0.0)
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll_loop, name="llumlet-commands", daemon=True)
        self._poller.start()
        log.info("llumlet_vllm: control segment ready (instance %r, vLLM %s, %d blocks of %d tokens)",
                 instance or shm, self._vllm_version, self.cache_config.num_gpu_blocks, self.block_size)

    def _register_region(self, r: connector.Region) -> None:
        self._ep.register_kv_region(r.memory, r.layout, r.layer, r.handle, r.offset, r.num_blocks,
                                    r.block_size_bytes, r.token_size_bytes)

    def shutdown(self) -> None:
        super().shutdown()
        stop = getattr(self, "_stop", None)
        if stop is None:
            return
        stop.set()
        self._poller.join(timeout=1.0)
        self._reader.close()
        connector.detach_sink(self._regions_key)
        for s in self._sockets.values():
            s.close(linger=1000)
        self._sockets.clear()
        if self._zmq is not None:
            self._zmq.term()
        self._ep.close()

    def _poll_loop(self):
        """Moves the llumlet's commands to the engine thread and wakes an idle engine."""
        while not self._stop.is_set():
            try:
                cmd = self._reader.wait(0.1)
            except le.LlumletError as e:
                log.error("llumlet_vllm: command queue: %s", e)
                time.sleep(0.1)
                continue
            if cmd is not None:
                self._commands.append(cmd)
                _vllm.wake(self.engine_core)

    # ------------------------------------------------------------------ the step
    def has_requests(self) -> bool:
        return bool(self._commands or self._deferred or self._abort_outputs
                    or super().has_requests())

    def finish_requests(self, request_ids, finished_status):
        """vLLM's abort path (a client gone, a stop string the frontend saw, `abort_requests`):
        a request suspended for migration keeps its blocks, which the llumlet may still be
        copying, until its migration ends; the abort is applied then (docs/vllm.md)."""
        if self._out_rid:
            if request_ids is None:
                ids = list(self.requests)
            elif isinstance(request_ids, str):
                ids = [request_ids]
            else:
                ids = list(request_ids)
            now = []
            for rid in ids:
                mo = self._out_rid.get(rid)
                if mo is not None and mo.suspended:
                    mo.aborted = finished_status
                else:
                    now.append(rid)
            request_ids = now
        return super().finish_requests(request_ids, finished_status)

    def _finish_now(self, request_ids, finished_status):
        return super().finish_requests(request_ids, finished_status)

    def schedule(self):
        self._serve_commands()
        self._note_recent_waiting()
        if self._out_rid and len(self.running) > 1:
            # FCFS preemption takes `running.pop()`: keep requests migrating out at the front.
            marked = [r for r in self.running if r.request_id in self._out_rid]
            if marked:
                self.running = marked + [r for r in self.running if r.request_id not in self._out_rid]
        out = super().schedule()
        for rid in out.preempted_req_ids:
            mo = self._out_rid.get(rid)
            if mo is not None:
                mo.preempted = True
        if self._rewrite:
            _vllm.rewrite_new_requests(self, out, self._rewrite)
        self._t_schedule = time.perf_counter()
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        step_s = time.perf_counter() - self._t_schedule
        outs = super().update_from_output(scheduler_output, model_runner_output)
        self.step_id += 1
        if self._forward:
            self._forward_outputs(outs)
        for client, o in self._abort_outputs:
            outs.setdefault(client, _engine_outputs()).outputs.append(o)
        self._abort_outputs.clear()
        self._sync_table()
        self._last_output = scheduler_output
        self._last_step_s = step_s
        if self.step_id % self._update_steps == 0:
            self._publish(scheduler_output, step_s)
        return outs

    # ------------------------------------------------------------------ status
    def _collect(self, so, step_s: float) -> tuple[dict, list[str], list[str]]:
        bs = self.block_size
        waiting = _vllm.waiting_requests(self)
        now = time.time()
        w2d_n = w2d_t = wpre = 0
        for r in waiting:
            left = r.num_tokens - r.num_computed_tokens
            if r.max_tokens > 1 or left == 1:
                w2d_n += 1
                w2d_t += r.num_tokens
            if left > 1:
                wpre += left - _vllm.prefix_hit_tokens(self, r)
        r2d_n = r2d_t = rpre = 0
        for r in self.running:
            if r.num_computed_tokens < r.num_prompt_tokens:
                rpre += r.num_tokens - r.num_computed_tokens
            if r.max_tokens > 1 and r.request_id not in self._out_rid:
                r2d_n += 1
                r2d_t += r.num_tokens
        scheduled = so.num_scheduled_tokens if so is not None else {}
        out_tokens = sum(self.requests[m.request_id].num_tokens for m in self._out.values()
                         if m.request_id in self.requests)
        in_tokens = sum(len(_vllm.block_ids(self, m.request_id)) * bs for m in self._in.values())
        total = max(self._num_total_tokens, 1)
        s = dict(
            step_id=self.step_id, update_id=self.update_id,
            num_total_gpu_tokens=self._num_total_tokens,
            num_used_gpu_tokens=self._num_total_tokens - _vllm.free_blocks(self) * bs,
            num_running_requests=len(self.running), num_waiting_requests=len(waiting),
            num_loading_requests=0, num_tokens_loading_requests=0,
            scheduler_waiting_to_decode_requests_num=w2d_n,
            scheduler_waiting_to_decode_tokens_num=w2d_t,
            num_uncomputed_tokens_scheduler_waiting_prefills=wpre,
            num_uncomputed_tokens_all_waiting_prefills=wpre,
            scheduler_running_to_decode_requests_num=r2d_n,
            scheduler_running_to_decode_tokens_num=r2d_t,
            num_unallocated_tokens_scheduler_running_prefills=rpre,
            # Taken after the step: what it computed is computed (upstream, taking it before the
            # step, adds the tokens scheduled in it).
            num_uncomputed_tokens_scheduler_running_prefills=rpre,
            num_migrate_out_reqs=len(self._out), num_migrate_in_reqs=len(self._in),
            num_migrate_out_tokens=out_tokens, num_migrate_in_tokens=in_tokens,
            kv_cache_usage_ratio_migrate_out=round(out_tokens / total, 4),
            kv_cache_usage_ratio_migrate_in=round(in_tokens / total, 4),
            profiling_id=-1,
            num_scheduled_prefill_tokens=sum(n for n in scheduled.values() if n > 1),
            step_duration=step_s * 1000.0,
        )
        ids = [r.request_id for r in waiting]
        recent = [rid for rid, t in self._recent.items() if now - t <= self._staleness_s]
        return s, ids, recent

    def _note_recent_waiting(self) -> None:
        """At the start of a step (upstream's STEP_BEGIN): every request waiting now is recorded,
        and kept until it arrived longer than the staleness ago, waiting or not by then."""
        now = time.time()
        for r in _vllm.waiting_requests(self):
            self._recent.setdefault(r.request_id, r.arrival_time)
        for rid, t in list(self._recent.items()):
            if now - t > self._staleness_s:
                del self._recent[rid]

    def _publish(self, so, step_s: float) -> None:
        self.update_id += 1
        s, ids, recent = self._collect(so, step_s)
        try:
            self._ep.set_waiting_ids([i for i in ids if len(i.encode()) <= 63])
            self._ep.set_waiting_ids([i for i in recent if len(i.encode()) <= 63], recent=True)
            self._ep.publish(**s)
        except le.LlumletError as e:
            log.error("llumlet_vllm: publishing the status: %s", e)

    # ------------------------------------------------------------------ request table
    def _live(self):
        for r in self.running:
            yield r, le.REQ_PREFILL if r.num_computed_tokens < r.num_prompt_tokens else le.REQ_RUNNING
        for r in _vllm.waiting_requests(self):
            yield r, le.REQ_WAITING
        for mo in self._out_rid.values():
            r = self.requests.get(mo.request_id)
            if mo.suspended and r is not None:
                yield r, le.REQ_SUSPENDED

    def _sync_table(self) -> None:
        live = {}
        for r, st in self._live():
            live[r.request_id] = (r, st)
        for rid in [k for k in self._rows if k not in live and k not in self._in_rid]:
            self._drop_row(rid)
        for rid, (r, st) in live.items():
            row = self._rows.get(rid)
            blocks = _vllm.blocks_of(self, rid)
            try:
                if row is None:
                    if rid in self._skipped_ids:
                        continue
                    slot = self._ep.add_request(rid, st, int(r.arrival_time * 1000), r.num_prompt_tokens,
                                                r.num_output_tokens, [b.block_id for b in blocks])
                    self._rows[rid] = _Row(slot, len(blocks), r.num_preemptions)
                    self._slot_rid[slot] = rid
                elif row.preemptions != r.num_preemptions or len(blocks) < row.blocks:
                    self._ep.set_request_blocks(row.slot, [b.block_id for b in blocks])
                    self._ep.request_progress(row.slot, st, r.num_output_tokens)
                    row.blocks, row.preemptions = len(blocks), r.num_preemptions
                else:
                    new = [b.block_id for b in blocks[row.blocks:]] if len(blocks) > row.blocks else ()
                    self._ep.request_progress(row.slot, st, r.num_output_tokens, new)
                    row.blocks = len(blocks)
            except le.LlumletError as e:
                # An id longer than the ring takes (for good), or a full table (tried again next
                # step): the request runs, but the llumlet cannot see it, so never selects or
                # aborts it. Said once.
                if e.code != le.ERR_FULL:
                    self._skipped_ids.add(rid)
                if rid not in self._logged_ids:
                    log.warning("llumlet_vllm: request %s is not in the request table: %s", rid, e)
                    self._logged_ids.add(rid)
        self._skipped_ids &= live.keys()
        self._logged_ids &= live.keys()

    def _drop_row(self, rid: str) -> None:
        row = self._rows.pop(rid, None)
        if row is not None:
            self._slot_rid.pop(row.slot, None)
            try:
                self._ep.remove_request(row.slot)
            except le.LlumletError as e:
                log.error("llumlet_vllm: removing %s from the request table: %s", rid, e)

    # ------------------------------------------------------------------ commands
    def _serve_commands(self) -> None:
        pending, self._deferred = self._deferred, []
        while self._commands:
            pending.append(self._commands.popleft())
        for i, cmd in enumerate(pending):
            kind, _ok, cid, a = cmd
            try:
                answer = self._handle(kind, cid, a)
            except Exception:  # a bug here must not take the engine down: refuse the command
                log.exception("llumlet_vllm: command %d for %d failed", kind, cid)
                answer = (False, 0)
            if answer is None:
                # Not yet (a suspend waiting for its token in flight): it and every command
                # after it wait for the next step, so replies keep the commands' order.
                self._deferred = pending[i:]
                break
            if answer is not _NO_REPLY:
                self._replies.append((cid, answer[0], answer[1]))
        while self._replies:
            cid, ok, value = self._replies[0]
            try:
                self._ep.reply(cid, ok, value)
            except le.LlumletError as e:
                if e.code != le.ERR_FULL:
                    log.error("llumlet_vllm: reply to %d: %s", cid, e)
                    self._replies.pop(0)
                    continue
                break  # the queue is full: the rest go next step, in order
            self._replies.pop(0)

    def _handle(self, kind: int, cid: int, a: int):
        if kind == le.CMD_STATUS_REQUEST:
            self._publish(self._last_output, self._last_step_s)
            self._ep.answer_status_request(cid)
            return _NO_REPLY
        if kind == le.CMD_MIGRATE_OUT_BEGIN:
            return self._out_begin(cid, a)
        if kind == le.CMD_MIGRATE_OUT_SUSPEND:
            return self._out_suspend(cid)
        if kind == le.CMD_MIGRATE_OUT_COMMIT:
            return self._out_commit(cid)
        if kind == le.CMD_MIGRATE_OUT_ABORT:
            return self._out_abort(cid)
        if kind == le.CMD_RESERVE_BLOCKS:
            return self._reserve(cid, a)
        if kind == le.CMD_MIGRATE_IN_COMMIT:
            return self._in_commit(cid)
        if kind == le.CMD_MIGRATE_IN_ABORT:
            return self._in_abort(cid)
        if kind == le.CMD_ABORT:
            return self._abort(a)
        log.warning("llumlet_vllm: unknown command kind %d ignored", kind)
        return _NO_REPLY

    # source ---------------------------------------------------------------------------------
    def _out_begin(self, migration: int, slot: int):
        rid = self._slot_rid.get(slot)
        r = self.requests.get(rid) if rid is not None else None
        if r is None or rid in self._out_rid or r not in self.running or not _vllm.is_decoding(r):
            return False, 0
        why = state.refusal(r)
        if why is not None:
            log.info("llumlet_vllm: %s cannot migrate: %s", rid, why)
            return False, 0
        mo = _Out(migration, rid)
        self._out[migration] = mo
        self._out_rid[rid] = mo
        return True, r.num_tokens

    def _out_suspend(self, migration: int):
        mo = self._out.get(migration)
        r = self.requests.get(mo.request_id) if mo is not None else None
        if mo is None or r is None or r.is_finished():
            return False, 0
        if mo.handed:
            return True, r.num_tokens  # a repeated suspend
        if mo.preempted:
            return False, 0
        if not mo.suspended:
            mo.index = _vllm.suspend(self, r)
            mo.suspended = True
        if getattr(r, "num_output_placeholders", 0):
            # Async scheduling: out of the batch now, but a token is in flight; answer once it
            # landed (the next update_from_output), when the KV and the outputs are whole.
            return None
        if mo.aborted is not None or not _vllm.is_decoding(r):
            self._unpark(mo, r)
            return False, 0
        _vllm.drain_outputs(self.engine_core)
        try:
            b = state.encode(r, self._origin(r), self._vllm_version)
            self._ep.mailbox_write(migration, r.request_id, b)
        except (state.StateError, le.LlumletError) as e:
            log.error("llumlet_vllm: cannot hand over %s: %s", r.request_id, e)
            self._unpark(mo, r)
            return False, 0
        mo.handed = True
        row = self._rows.get(r.request_id)
        if row is not None:
            self._ep.request_progress(row.slot, le.REQ_SUSPENDED, r.num_output_tokens)
        return True, r.num_tokens

    def _unpark(self, mo: _Out, r) -> None:
        """A suspended request whose migration ended without moving it: aborted if its client
        aborted it meanwhile, else back into the batch (or first in line, preempted, if the
        batch filled up)."""
        mo.suspended = mo.handed = False
        if r is None or r.is_finished():
            return
        if mo.aborted is not None:
            self._finish_now(r.request_id, mo.aborted)
            return
        running = _vllm.resume(self, r, mo.index)
        row = self._rows.get(r.request_id)
        if row is not None:
            self._ep.request_progress(row.slot, le.REQ_RUNNING if running else le.REQ_WAITING,
                                      r.num_output_tokens)

    def _origin(self, r) -> state.Origin:
        o = self._forward.get(r.request_id)
        if o is not None:
            return o
        return state.Origin(_vllm.engine_index(self.engine_core), r.client_index,
                            _vllm.output_address(self.engine_core, r.client_index), _HOST)

    def _forget_out(self, mo: _Out) -> None:
        self._out.pop(mo.migration, None)
        self._out_rid.pop(mo.request_id, None)

    def _out_commit(self, migration: int):
        mo = self._out.get(migration)
        if mo is None or not mo.handed:
            return False, 0
        self._forget_out(mo)
        _vllm.finish_migrated(self._finish_now, mo.request_id)
        self._forward.pop(mo.request_id, None)
        self._drop_row(mo.request_id)
        self._ep.mailbox_remove(migration)
        return True, 0

    def _out_abort(self, migration: int):
        self._ep.mailbox_remove(migration)
        mo = self._out.get(migration)
        if mo is None:
            return False, 0
        self._forget_out(mo)
        if mo.suspended:
            self._unpark(mo, self.requests.get(mo.request_id))
        return True, 0

    # destination ----------------------------------------------------------------------------
    def _reserve(self, migration: int, blocks: int):
        inc = self._in.get(migration)
        if inc is None:
            mail = self._ep.mailbox_read(migration)
            if mail is None:
                return False, 0
            rid = mail[0]
            if rid in self.requests or rid in self._in_rid:
                return False, 0  # the same request twice on one instance
            ph = _vllm.placeholder(rid)
            if not _vllm.reserve(self, ph, blocks):
                _vllm.free_reservation(self, ph)
                return False, 0
            try:
                slot = self._ep.add_request(rid, le.REQ_MIGRATING_IN, int(time.time() * 1000), 0, 0,
                                            _vllm.block_ids(self, rid))
            except le.LlumletError as e:
                log.warning("llumlet_vllm: reservation for %s refused: %s", rid, e)
                _vllm.free_reservation(self, ph)
                return False, 0
            inc = _In(migration, rid, ph, slot)
            self._in[migration] = inc
            self._in_rid[rid] = inc
            self._rows[rid] = _Row(slot, 0, 0)
            self._slot_rid[slot] = rid
            return True, slot
        if not _vllm.reserve(self, inc.placeholder, blocks):
            return False, len(_vllm.block_ids(self, inc.request_id))
        self._ep.set_request_blocks(inc.slot, _vllm.block_ids(self, inc.request_id))
        return True, inc.slot

    def _forget_in(self, inc: _In) -> None:
        self._in.pop(inc.migration, None)
        self._in_rid.pop(inc.request_id, None)

    def _in_commit(self, migration: int):
        if migration in self._committed:
            return True, 0
        inc = self._in.get(migration)
        if inc is None:
            return False, 0
        mail = self._ep.mailbox_read(migration)
        if mail is None or mail[0] != inc.request_id:
            return False, 0
        try:
            st = state.decode(mail[1], self._vllm_version)
        except state.StateError as e:
            log.error("llumlet_vllm: migration %d: %s", migration, e)
            return False, 0
        if st.request_id != inc.request_id:
            return False, 0
        from vllm.v1.request import Request

        req = Request.from_engine_core_request(st.request, _vllm.block_hasher(self.engine_core))
        req.append_output_token_ids(st.output_token_ids)
        held = len(_vllm.block_ids(self, inc.request_id))
        why = None
        if st.num_computed_tokens != req.num_tokens - 1:
            why = f"its source computed {st.num_computed_tokens} of {req.num_tokens} tokens"
        elif held * self.block_size < req.num_tokens - 1:
            why = f"{req.num_tokens} tokens arrived in {held} blocks"
        elif req.num_tokens >= self.max_model_len:
            why = f"{req.num_tokens} tokens reach this engine's max_model_len {self.max_model_len}"
        elif st.origin.output_address and not st.origin.reachable_from(_HOST):
            why = (f"its frontend {st.origin.output_address} is on host {st.origin.host!r}, "
                   "not reachable from here (ipc://)")
        if why is not None:
            log.error("llumlet_vllm: migration %d of %s refused: %s", migration, req.request_id, why)
            return False, 0
        # Every token but the last sampled one has its KV in the reserved blocks.
        req.num_computed_tokens = req.num_tokens - 1
        req.num_cached_tokens = st.num_cached_tokens
        req.num_preemptions = st.num_preemptions
        self._forget_in(inc)
        _vllm.admit_migrated(self, req)
        # From here on the request is this engine's: whatever fails below is logged, and the
        # answer is ok (a refusal would make the source resume it too).
        self._committed[migration] = req.request_id
        try:
            self._rewrite.add(req.request_id)
            mine = (st.origin.engine_index == _vllm.engine_index(self.engine_core)
                    and st.origin.output_address
                    == _vllm.output_address(self.engine_core, st.origin.client_index))
            if st.origin.output_address and not mine:
                self._forward[req.request_id] = st.origin
            # The reservation's table entry becomes the request's.
            self._drop_row(inc.request_id)
            self._remember_committed()
            self._ep.mailbox_remove(migration)
            self._sync_table()
        except Exception:
            log.exception("llumlet_vllm: migration %d committed; then", migration)
        return True, 0

    def _remember_committed(self) -> None:
        """Keeps the last COMMITTED_REMEMBERED commits, and any whose request still runs here."""
        while len(self._committed) > COMMITTED_REMEMBERED:
            migration, rid = next(iter(self._committed.items()))
            if rid in self.requests:
                self._committed.move_to_end(migration)
                if all(r in self.requests for r in self._committed.values()):
                    break
                continue
            self._committed.popitem(last=False)

    def _in_abort(self, migration: int):
        self._ep.mailbox_remove(migration)
        if migration in self._committed:
            return False, 0
        inc = self._in.get(migration)
        if inc is not None:
            self._forget_in(inc)
            _vllm.free_reservation(self, inc.placeholder)
            self._drop_row(inc.request_id)
        return True, 0

    def _abort(self, slot: int):
        rid = self._slot_rid.get(slot)
        if rid is None:
            return False, 0
        inc = self._in_rid.get(rid)
        if inc is not None:
            self._forget_in(inc)
            _vllm.free_reservation(self, inc.placeholder)
            self._drop_row(rid)
            self._ep.mailbox_remove(inc.migration)
            return True, 0
        if rid not in self.requests:
            return False, 0
        mo = self._out_rid.get(rid)
        if mo is not None:
            self._forget_out(mo)
            self._ep.mailbox_remove(mo.migration)
        client, out = _vllm.finish_aborted(self, self._finish_now, rid)
        origin = self._forward.pop(rid, None)
        if origin is not None:
            self._send(origin, [out])
        else:
            self._abort_outputs.append((client, out))
        self._drop_row(rid)
        return True, 0

    # ------------------------------------------------------------------ output forwarding
    def _forward_outputs(self, outs: dict) -> None:
        local = len(getattr(getattr(self.engine_core, "addresses", None), "outputs", None) or [1])
        by_origin: dict[tuple, list] = {}
        for ci, eco in list(outs.items()):
            keep = []
            for o in eco.outputs:
                origin = self._forward.get(o.request_id)
                if origin is None:
                    keep.append(o)
                    continue
                by_origin.setdefault((origin.output_address, origin.engine_index), []).append(o)
                if o.finished:
                    del self._forward[o.request_id]
            eco.outputs = keep
            if not keep and ci >= local:
                del outs[ci]
                if eco.scheduler_stats is not None:
                    home = outs.setdefault(0, _engine_outputs())
                    home.scheduler_stats = home.scheduler_stats or eco.scheduler_stats
        for (address, index), items in by_origin.items():
            self._send(state.Origin(index, 0, address), items)

    def _send(self, origin: state.Origin, items: list) -> None:
        """Sends outputs to the frontend that owns them, as its own engine would."""
        import zmq
        from vllm.v1.serial_utils import MsgpackEncoder

        if self._zmq is None:
            self._zmq = zmq.Context()
            self._encoder = MsgpackEncoder()
        s = self._sockets.get(origin.output_address)
        if s is None:
            s = self._zmq.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 4000)
            s.setsockopt(zmq.SNDHWM, 0)  # queue rather than block the engine thread
            s.connect(origin.output_address)
            self._sockets[origin.output_address] = s
        msg = _engine_outputs(engine_index=origin.engine_index, outputs=items)
        try:
            s.send_multipart(self._encoder.encode(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            log.error("llumlet_vllm: outputs for %s could not be sent to %s: %s",
                      [o.request_id for o in items], origin.output_address, e)


_NO_REPLY = object()


def _engine_outputs(**kw):
    from vllm.v1.engine import EngineCoreOutputs

    return EngineCoreOutputs(**kw)


_classes: dict[type, type] = {}


def make_scheduler(*args, **kwargs):
    """`SchedulerConfig.scheduler_cls` may name a callable; EngineCore calls it with the
    scheduler's keyword arguments. vLLM's own choice is AsyncScheduler under async scheduling and
    Scheduler otherwise, and a custom class replaces that choice: keep it."""
    _vllm.check_version()
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    cfg = kwargs["vllm_config"]
    base = AsyncScheduler if cfg.scheduler_config.async_scheduling else Scheduler
    cls = _classes.get(base)
    if cls is None:
        cls = type(f"Llumlet{base.__name__}", (LlumletAdapter, base), {})
        _classes[base] = cls
    return cls(*args, **kwargs)
