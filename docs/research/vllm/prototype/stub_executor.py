"""A stand-in vLLM v1 Executor: no model, no worker process, deterministic "tokens" that depend on
the KV cache contents.

It plays the worker's part of the scheduler <-> worker contract the way vLLM 0.18's GPU model
runner does (`GPUModelRunner._update_states`): new requests start from
`NewRequestData.prompt_token_ids` only (the runner sets `output_token_ids=[]`), cached requests
keep their own token list, `resumed_req_ids` replace the block table, other cached requests
append `new_block_ids`, `finished_req_ids` drop the state.

KV cache: one tensor per layer in FlashAttention's layout, shape
`[2, num_blocks, block_size, num_kv_heads, head_size]` (K = index 0, V = index 1), float32,
allocated from `KVCacheConfig.kv_cache_tensors` like `_allocate_kv_cache_tensors` does (raw
int8 buffer of `size` bytes, then a view). So block `b` of layer `l` is, in the raw buffer,
K at byte `b * block_bytes` and V at `num_blocks * block_bytes + b * block_bytes`, with
`block_bytes = block_size * num_kv_heads * head_size * 4`.

Every token slot written at position `p` holding token `t` gets K = t * 1000 + p + layer and
V = -(K). The sampled token after position `p` is derived from the sum of K over every position
of the request, read back through the block table: a wrong block table or a wrong KV copy
changes the token stream.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import Future

import torch

from vllm.v1.executor.abstract import Executor
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.outputs import ModelRunnerOutput

NUM_LAYERS = int(os.environ.get("STUB_LAYERS", "2"))
NUM_KV_HEADS = 2
HEAD_SIZE = 16
KV_DTYPE = torch.float32
VOCAB = 1000
FIRST_TOKEN = 3  # never produces 0..2 (2 is the tiny model's eos)
STUB_MEMORY_BYTES = int(os.environ.get("STUB_KV_BYTES", str(64 << 20)))

# Every StubExecutor built in this process, so that a test can reach "its worker's" KV cache.
INSTANCES: list["StubExecutor"] = []


def layer_name(i: int) -> str:
    return f"model.layers.{i}.self_attn.attn"


class _ReqState:
    __slots__ = ("tokens", "num_prompt", "block_ids", "num_computed")

    def __init__(self, tokens, num_prompt, block_ids, num_computed):
        self.tokens = tokens
        self.num_prompt = num_prompt
        self.block_ids = block_ids
        self.num_computed = num_computed


class StubExecutor(Executor):
    uses_ray = False
    supports_pp = False

    def _init_executor(self) -> None:
        self.block_size = self.cache_config.block_size
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.kv_raw: dict[str, torch.Tensor] = {}
        self.num_blocks = 0
        self.states: dict[str, _ReqState] = {}
        self.in_batch: set[str] = set()
        self.steps = 0
        self.last_step_s = 0.0
        INSTANCES.append(self)

    # ---- start-up: what EngineCore._initialize_kv_caches asks -------------------------------
    def get_kv_cache_specs(self):
        spec = FullAttentionSpec(
            block_size=self.cache_config.block_size,
            num_kv_heads=NUM_KV_HEADS,
            head_size=HEAD_SIZE,
            dtype=KV_DTYPE,
        )
        return [{layer_name(i): spec for i in range(NUM_LAYERS)}]

    def determine_available_memory(self):
        return [STUB_MEMORY_BYTES]

    def initialize_from_config(self, kv_cache_configs) -> None:
        (cfg,) = kv_cache_configs
        self.num_blocks = cfg.num_blocks
        group = cfg.kv_cache_groups[0]
        spec = group.kv_cache_spec
        self.block_size = spec.block_size
        for t in cfg.kv_cache_tensors:
            raw = torch.zeros(t.size, dtype=torch.int8)
            n = t.size // spec.page_size_bytes
            view = raw.view(KV_DTYPE).view(2, n, spec.block_size, spec.num_kv_heads, spec.head_size)
            for name in t.shared_by:
                self.kv_raw[name] = raw
                self.kv_caches[name] = view

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None, non_block=False):
        # Only what EngineCore calls on an executor of this kind.
        if method == "get_supported_tasks":
            result = [("generate",)]
        elif method in ("shutdown", "reset_mm_cache", "reset_encoder_cache"):
            result = [None]
        else:
            raise NotImplementedError(f"StubExecutor.collective_rpc({method!r})")
        if non_block:
            f: Future = Future()
            f.set_result(result)
            return f
        return result

    def check_health(self) -> None:
        return

    def shutdown(self) -> None:
        return

    # ---- the step ---------------------------------------------------------------------------
    def _slot(self, st: _ReqState, pos: int) -> tuple[int, int]:
        return st.block_ids[0][pos // self.block_size], pos % self.block_size

    def _write_kv(self, st: _ReqState, pos: int, token: int) -> None:
        blk, off = self._slot(st, pos)
        for i in range(NUM_LAYERS):
            kv = self.kv_caches[layer_name(i)]
            val = float(token * 1000 + pos + i)
            kv[0, blk, off].fill_(val)
            kv[1, blk, off].fill_(-val)

    def _sample(self, st: _ReqState, upto: int) -> int:
        kv = self.kv_caches[layer_name(0)]
        total = 0
        for p in range(upto):
            blk, off = self._slot(st, p)
            total += int(kv[0, blk, off, 0, 0].item())
        return FIRST_TOKEN + total % (VOCAB - FIRST_TOKEN)

    def execute_model(self, scheduler_output, non_block=False):
        t0 = time.perf_counter()
        so = scheduler_output
        for rid in so.finished_req_ids:
            self.states.pop(rid, None)
            self.in_batch.discard(rid)
        scheduled = set(so.num_scheduled_tokens)
        cached = so.scheduled_cached_reqs
        self.in_batch -= self.in_batch - (scheduled - cached.resumed_req_ids)

        for nr in so.scheduled_new_reqs:
            self.states[nr.req_id] = _ReqState(
                tokens=list(nr.prompt_token_ids),  # the GPU runner keeps no output tokens here
                num_prompt=len(nr.prompt_token_ids),
                block_ids=[list(b) for b in nr.block_ids],
                num_computed=nr.num_computed_tokens,
            )
        for i, rid in enumerate(cached.req_ids):
            st = self.states[rid]  # KeyError here = the real runner's KeyError
            st.num_computed = cached.num_computed_tokens[i]
            nb = cached.new_block_ids[i]
            if rid in cached.resumed_req_ids:
                st.block_ids = [list(b) for b in nb]
            elif nb is not None:
                for have, new in zip(st.block_ids, nb):
                    have.extend(new)

        req_ids = list(so.num_scheduled_tokens)
        sampled: list[list[int]] = []
        for rid in req_ids:
            st = self.states[rid]
            n = so.num_scheduled_tokens[rid]
            start = st.num_computed
            for p in range(start, start + n):
                if p >= len(st.tokens):
                    raise RuntimeError(
                        f"stub worker: request {rid} scheduled position {p} but it knows only "
                        f"{len(st.tokens)} tokens (the real GPU runner would read a stale "
                        "token id here)")
                self._write_kv(st, p, st.tokens[p])
            self.in_batch.add(rid)
            if start + n >= len(st.tokens):
                tok = self._sample(st, start + n)
                st.tokens.append(tok)
                sampled.append([tok])
            else:
                sampled.append([])  # partial prefill: no token
        out = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=sampled,
        )
        self.steps += 1
        self.last_step_s = time.perf_counter() - t0
        if non_block:
            f: Future = Future()
            f.set_result(out)
            return f
        return out

    def sample_tokens(self, grammar_output, non_block=False):
        raise RuntimeError("StubExecutor returns its tokens from execute_model")

    def take_draft_token_ids(self):
        return None

    # ---- for the tests: a region description of the KV cache ------------------------------
    def region_layout(self) -> list[dict]:
        """One entry per layer and K/V: which buffer, offset of block 0, bytes per block."""
        block_bytes = self.block_size * NUM_KV_HEADS * HEAD_SIZE * torch.tensor([], dtype=KV_DTYPE).element_size()
        regions = []
        for i in range(NUM_LAYERS):
            name = layer_name(i)
            for kv in (0, 1):
                regions.append({"layer": i, "kv": kv, "buffer": name,
                                "offset": kv * self.num_blocks * block_bytes,
                                "block_bytes": block_bytes, "blocks": self.num_blocks})
        return regions
