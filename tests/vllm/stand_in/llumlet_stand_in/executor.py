"""A stand-in for vLLM's model: an `Executor` (`distributed_executor_backend=
"llumlet_stand_in.executor.StandInExecutor"`) with no worker process and no weights, written to the
worker's side of vLLM 0.18's scheduler contract as its GPU model runner keeps it
(`GPUModelRunner._update_states`): a new request starts from `NewRequestData.prompt_token_ids`
only, a cached one keeps its own tokens, `resumed_req_ids` replace the block table, others append
`new_block_ids`, `finished_req_ids` drop the state.

KV cache: one float32 tensor per layer in FlashAttention's layout `[2, num_blocks, block_size,
kv_heads, head_size]`, allocated in a shared-memory file (so that the llumlet can map it, as it
maps GPU memory through CUDA IPC), and registered with the KV connector vLLM was configured with,
exactly as the GPU model runner does (`register_kv_caches`).

The model: the token at position p is t → every element of layer l's K slot at p is
`t*1000 + p + l` and of its V slot the negation. The next token is
`FIRST + (Σ_p K_layer0[p]) mod (VOCAB - FIRST)` summed over every position of the request, read
back through the block table: a wrong block table or a wrong KV byte changes every later token.
`expected_tokens` is the same function on plain token lists, for the tests.

A request that arrives with `num_computed_tokens` > 0 (migrated in) is checked before its first
step: every K and V element of every layer at every computed position must hold what the model
wrote there; a mismatch raises (the engine dies, the test fails) and a match is recorded in
`$STAND_IN_EVENTS` ("arrived <id> <tokens>").

Environment: STAND_IN_STEP_MS (a step's duration, default 0), STAND_IN_KV_BYTES (the memory
reported for the KV cache, default 4 MiB), STAND_IN_EVENTS (a file to append events to).
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future

import torch
from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput

NUM_LAYERS = 2
NUM_KV_HEADS = 2
HEAD_SIZE = 16
KV_DTYPE = torch.float32
VOCAB = 1000
FIRST = 3  # never 0..2 (2 is the tiny model's eos)


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


def next_token(tokens: list[int]) -> int:
    """The model on a plain token list (layer 0's K summed over every position)."""
    total = sum(t * 1000 + p for p, t in enumerate(tokens))
    return FIRST + total % (VOCAB - FIRST)


def expected_tokens(prompt: list[int], n: int) -> list[int]:
    """The n tokens the model generates after `prompt`."""
    seq = list(prompt)
    out = []
    for _ in range(n):
        t = next_token(seq)
        seq.append(t)
        out.append(t)
    return out


class _Req:
    __slots__ = ("tokens", "blocks", "computed")

    def __init__(self, tokens, blocks, computed):
        self.tokens = tokens
        self.blocks = blocks
        self.computed = computed


class StandInExecutor(Executor):
    uses_ray = False
    supports_pp = False

    def _init_executor(self) -> None:
        self.step_s = float(os.environ.get("STAND_IN_STEP_MS", "0")) / 1000.0
        self.events = os.environ.get("STAND_IN_EVENTS")
        self.kv: dict[str, torch.Tensor] = {}
        self.reqs: dict[str, _Req] = {}
        self.num_blocks = 0
        self.block_size = self.cache_config.block_size
        self.path = None

    # ---- start-up: what EngineCore._initialize_kv_caches asks ---------------------------------
    def get_kv_cache_specs(self):
        spec = FullAttentionSpec(block_size=self.cache_config.block_size, num_kv_heads=NUM_KV_HEADS,
                                 head_size=HEAD_SIZE, dtype=KV_DTYPE)
        return [{layer_name(i): spec for i in range(NUM_LAYERS)}]

    def determine_available_memory(self):
        return [int(os.environ.get("STAND_IN_KV_BYTES", str(4 << 20)))]

    def initialize_from_config(self, kv_cache_configs) -> None:
        (cfg,) = kv_cache_configs
        self.num_blocks = cfg.num_blocks
        spec = cfg.kv_cache_groups[0].kv_cache_spec
        self.block_size = spec.block_size
        total = sum(t.size for t in cfg.kv_cache_tensors)
        self.path = f"/dev/shm/llumlet-stand-in-kv-{os.getpid()}-{id(self):x}"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, total)
        os.close(fd)
        raw = torch.from_file(self.path, shared=True, size=total, dtype=torch.int8)
        at = 0
        for t in cfg.kv_cache_tensors:
            n = t.size // spec.page_size_bytes
            view = raw[at:at + t.size].view(KV_DTYPE).view(2, n, spec.block_size, NUM_KV_HEADS,
                                                          HEAD_SIZE)
            at += t.size
            for name in t.shared_by:
                self.kv[name] = view
        # What GPUModelRunner.initialize_kv_cache does with a KV connector configured.
        from vllm.distributed.kv_transfer import kv_transfer_state as kts

        kts.ensure_kv_transfer_initialized(self.vllm_config, cfg)
        if kts.has_kv_transfer_group():
            kts.get_kv_transfer_group().register_kv_caches(dict(self.kv))

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        if method == "get_supported_tasks":
            result = [("generate",)]
        elif method in ("shutdown", "reset_mm_cache", "reset_encoder_cache"):
            result = [None]
        elif method == "get_kv_connector_handshake_metadata":
            # The GPU worker's answer for a connector without handshake metadata.
            result = [None]
        else:
            raise NotImplementedError(f"StandInExecutor.collective_rpc({method!r})")
        if non_block:
            f: Future = Future()
            f.set_result(result)
            return f
        return result

    def check_health(self) -> None:
        return

    def shutdown(self) -> None:
        from vllm.distributed.kv_transfer import kv_transfer_state as kts

        kts.ensure_kv_transfer_shutdown()  # as the GPU worker does
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None

    # ---- the step -------------------------------------------------------------------------------
    def _slots(self, r: _Req, start: int, end: int):
        pos = torch.arange(start, end)
        blocks = torch.tensor(r.blocks, dtype=torch.long)[pos // self.block_size]
        return pos, blocks, pos % self.block_size

    def _write(self, r: _Req, start: int, end: int) -> None:
        pos, blk, off = self._slots(r, start, end)
        toks = torch.tensor(r.tokens[start:end], dtype=torch.float64)
        for i in range(NUM_LAYERS):
            kv = self.kv[layer_name(i)]
            val = (toks * 1000 + pos + i).to(KV_DTYPE)[:, None, None]
            kv[0, blk, off] = val.expand(-1, NUM_KV_HEADS, HEAD_SIZE)
            kv[1, blk, off] = -val.expand(-1, NUM_KV_HEADS, HEAD_SIZE)

    def _sample(self, r: _Req, upto: int) -> int:
        _, blk, off = self._slots(r, 0, upto)
        total = int(self.kv[layer_name(0)][0, blk, off, 0, 0].to(torch.float64).sum().item())
        return FIRST + total % (VOCAB - FIRST)

    def _check_arrival(self, rid: str, r: _Req) -> None:
        n = r.computed
        pos, blk, off = self._slots(r, 0, n)
        toks = torch.tensor(r.tokens[:n], dtype=torch.float64)
        for i in range(NUM_LAYERS):
            kv = self.kv[layer_name(i)]
            want = (toks * 1000 + pos + i).to(KV_DTYPE)[:, None, None].expand(-1, NUM_KV_HEADS,
                                                                             HEAD_SIZE)
            if not (torch.equal(kv[0, blk, off], want) and torch.equal(kv[1, blk, off], -want)):
                bad = (kv[0, blk, off] != want).any(dim=(1, 2)).nonzero().flatten().tolist()
                raise RuntimeError(f"stand-in: request {rid} arrived with wrong KV in layer {i} "
                                   f"at positions {bad[:8]} of {n}")
        if self.events:
            with open(self.events, "a") as f:
                f.write(f"arrived {rid} {n}\n")

    def execute_model(self, scheduler_output, non_block=False):
        t0 = time.perf_counter()
        so = scheduler_output
        for rid in so.finished_req_ids:
            self.reqs.pop(rid, None)
        for nr in so.scheduled_new_reqs:
            r = _Req(list(nr.prompt_token_ids), list(nr.block_ids[0]), nr.num_computed_tokens)
            self.reqs[nr.req_id] = r
            if nr.num_computed_tokens > 0:
                self._check_arrival(nr.req_id, r)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            r = self.reqs[rid]  # a KeyError here is the GPU runner's KeyError
            r.computed = cached.num_computed_tokens[i]
            nb = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                r.blocks = list(nb[0])
            elif nb is not None:
                r.blocks.extend(nb[0])
        req_ids = list(so.num_scheduled_tokens)
        sampled: list[list[int]] = []
        for rid in req_ids:
            r = self.reqs[rid]
            n = so.num_scheduled_tokens[rid]
            start, end = r.computed, r.computed + n
            if end > len(r.tokens):
                raise RuntimeError(f"stand-in: request {rid} scheduled up to position {end} but "
                                   f"knows {len(r.tokens)} tokens (the GPU runner would read a "
                                   "stale token id here)")
            self._write(r, start, end)
            if end == len(r.tokens):
                t = self._sample(r, end)
                r.tokens.append(t)
                sampled.append([t])
            else:
                sampled.append([])  # a partial prefill samples nothing
        out = ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                sampled_token_ids=sampled)
        if self.step_s and req_ids:
            time.sleep(max(0.0, self.step_s - (time.perf_counter() - t0)))
        if non_block:
            f: Future = Future()
            f.set_result(out)
            return f
        return out

    def sample_tokens(self, grammar_output, non_block=False):
        raise RuntimeError("StandInExecutor returns its tokens from execute_model")

    def take_draft_token_ids(self):
        return None
