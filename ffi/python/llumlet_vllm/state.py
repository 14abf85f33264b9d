"""The state of a request migrating between two vLLM engines: what the source writes into the
migration's mailbox on `MigrateOutSuspend` and the destination turns back into a running
`Request` on `MigrateInCommit`. Format (docs/vllm.md, "Request state"), msgpack map:

    format   "llumlet-vllm-request"
    version  1
    vllm     the vLLM version of the writer (the reader refuses another: `request` is vLLM's own
             msgpack encoding, which is only stable within a version)
    request  bytes: vLLM's `EngineCoreRequest` as its MsgpackEncoder writes it, the frontend →
             engine wire message: request id, prompt token ids, sampling parameters (seed, stop
             strings and token ids, max/min tokens, ignore_eos, ...), arrival time, LoRA request,
             priority, cache salt, client index, external request id
    output_token_ids    the tokens generated so far
    num_computed_tokens the tokens whose KV the source computed (all but the last sampled one)
    num_cached_tokens, num_preemptions    vLLM's counters, carried for its statistics
    origin   where the request's outputs go: {"engine_index", "client_index", "output_address",
             "host"} (the ZMQ address of the frontend that owns the request, None = nobody to
             forward to; the host it was seen from, since an ipc:// address is only reachable there)

Not carried: multimodal inputs and prompt embeddings (tensors), structured-output grammar
state, a seeded sampler's generator state. A request that has them, streams its input, or asks
for prompt logprobs is not migrated (`refusal`).
"""
from __future__ import annotations

from dataclasses import dataclass

import msgspec

FORMAT = "llumlet-vllm-request"
VERSION = 1


class StateError(ValueError):
    """A state this adapter cannot take (another format, version or vLLM; malformed)."""


@dataclass
class Origin:
    engine_index: int
    client_index: int
    output_address: str | None
    host: str = ""

    def as_dict(self) -> dict:
        return {"engine_index": self.engine_index, "client_index": self.client_index,
                "output_address": self.output_address, "host": self.host}

    def reachable_from(self, host: str) -> bool:
        """Whether outputs can be sent to the frontend from `host` (ipc:// is host-local)."""
        return not (self.output_address or "").startswith("ipc://") or self.host == host


@dataclass
class RequestState:
    request_id: str
    request: object  # vllm.v1.engine.EngineCoreRequest
    output_token_ids: list[int]
    num_computed_tokens: int
    num_cached_tokens: int
    num_preemptions: int
    origin: Origin


def refusal(req) -> str | None:
    """Why `req` cannot migrate (None if it can)."""
    if getattr(req, "mm_features", None):
        return "multimodal inputs are not carried"
    if getattr(req, "prompt_embeds", None) is not None:
        return "prompt embeddings are not carried"
    if getattr(req, "structured_output_request", None) is not None:
        return "structured output (grammar state) is not carried"
    if getattr(req, "pooling_params", None) is not None:
        return "pooling requests do not decode"
    if getattr(req, "resumable", False):
        return "streaming input goes on arriving at the origin"
    sp = getattr(req, "sampling_params", None)
    if sp is not None and sp.prompt_logprobs is not None:
        return "prompt logprobs would be computed again at the destination"
    return None


def encode(req, origin: Origin, vllm_version: str) -> bytes:
    """The state of `req` (a vllm.v1.request.Request)."""
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.serial_utils import MsgpackEncoder

    ecr = EngineCoreRequest(
        request_id=req.request_id, prompt_token_ids=list(req.prompt_token_ids),
        mm_features=None, sampling_params=req.sampling_params, pooling_params=None,
        arrival_time=req.arrival_time, lora_request=req.lora_request, cache_salt=req.cache_salt,
        data_parallel_rank=None, client_index=req.client_index, priority=req.priority,
        trace_headers=req.trace_headers, resumable=getattr(req, "resumable", False),
        external_req_id=getattr(req, "external_req_id", None))
    bufs = MsgpackEncoder().encode(ecr)
    if len(bufs) != 1:
        raise StateError("the request carries tensors, which the state does not")
    return msgspec.msgpack.encode({
        "format": FORMAT, "version": VERSION, "vllm": vllm_version,
        "request": bytes(bufs[0]), "output_token_ids": list(req.output_token_ids),
        "num_computed_tokens": int(req.num_computed_tokens),
        "num_cached_tokens": int(req.num_cached_tokens), "num_preemptions": int(req.num_preemptions),
        "origin": origin.as_dict(),
    })


def decode(b: bytes, vllm_version: str) -> RequestState:
    from vllm.v1.engine import EngineCoreRequest
    from vllm.v1.serial_utils import MsgpackDecoder

    try:
        m = msgspec.msgpack.decode(b)
    except msgspec.DecodeError as e:
        raise StateError(f"request state is not msgpack: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise StateError("not a llumlet-vllm request state")
    if m.get("version") != VERSION:
        raise StateError(f"request state version {m.get('version')!r}; this adapter reads {VERSION}")
    if m.get("vllm") != vllm_version:
        raise StateError(f"request state written by vLLM {m.get('vllm')!r}; this engine is vLLM "
                         f"{vllm_version} (both ends of a migration must run the same vLLM)")
    try:
        ecr = MsgpackDecoder(EngineCoreRequest).decode(m["request"])
        o = m["origin"]
        origin = Origin(int(o["engine_index"]), int(o["client_index"]), o.get("output_address"),
                        str(o.get("host", "")))
        outs = [int(t) for t in m["output_token_ids"]]
        return RequestState(ecr.request_id, ecr, outs, int(m["num_computed_tokens"]),
                            int(m["num_cached_tokens"]), int(m["num_preemptions"]), origin)
    except (KeyError, TypeError, ValueError, msgspec.DecodeError) as e:
        raise StateError(f"request state is malformed: {e}") from None
