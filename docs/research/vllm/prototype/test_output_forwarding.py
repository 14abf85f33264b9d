"""Can a process other than the request's EngineCore feed that request's outputs to the frontend?

LLMEngine with the EngineCore in its own process (SyncMPClient). A request runs a few steps;
then its EngineCore drops it without telling the frontend (what a migration commit at the
source does); then a separate ZMQ PUSH socket, connected to the frontend's output address,
sends EngineCoreOutputs for it (what the destination engine would send), the last one
finished. The frontend must turn them into RequestOutputs and finish the request.

usage: python test_output_forwarding.py
"""
import time

import common

import zmq  # noqa: E402

from vllm import SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402
from vllm.v1.serial_utils import MsgpackEncoder  # noqa: E402


def main():
    # Test-only: remember the ZMQ addresses the client creates (its output PULL socket's
    # address is what the engine process connects its PUSH socket to).
    import vllm.v1.engine.core_client as cc
    seen = []
    orig = cc.get_engine_zmq_addresses

    def spy(*a, **k):
        addrs = orig(*a, **k)
        seen.append(addrs)
        return addrs
    cc.get_engine_zmq_addresses = spy
    t = time.perf_counter()
    engine = LLMEngine.from_engine_args(common.engine_args())
    print(f"LLMEngine (EngineCore in its own process): {time.perf_counter() - t:.2f}s, "
          f"client {type(engine.engine_core).__name__}")
    sp = SamplingParams(max_tokens=100, temperature=0.0, detokenize=False)
    engine.add_request("R", TokensPrompt(prompt_token_ids=list(range(10, 30))), sp)
    internal_id = engine.output_processor.external_req_ids["R"][0]
    tokens = []
    while len(tokens) < 5:
        for out in engine.step():
            tokens = list(out.outputs[0].token_ids)
    print(f"frontend id R, engine id {internal_id}, after 5 steps: {tokens}")

    # The "source commit": the EngineCore frees the request; no output reaches the frontend.
    engine.engine_core.abort_requests([internal_id])
    assert engine.output_processor.request_states.get(internal_id) is not None

    # The "destination": its own PUSH socket to the frontend's output address.
    addr = seen[0].outputs[0]
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(addr)
    enc = MsgpackEncoder()
    sent = [901, 902, 903]
    for i, tok in enumerate(sent):
        last = i == len(sent) - 1
        o = EngineCoreOutput(request_id=internal_id, new_token_ids=[tok],
                             finish_reason=FinishReason.LENGTH if last else None)
        push.send_multipart(enc.encode(EngineCoreOutputs(engine_index=0, outputs=[o])))
    finished = False
    deadline = time.time() + 10
    while not finished and time.time() < deadline:
        for out in engine.step():
            tokens = list(out.outputs[0].token_ids)
            finished = out.finished
    print(f"output address {addr}; after forwarding: {tokens}, finished={finished}")
    assert finished and tokens[-3:] == sent
    assert not engine.output_processor.has_unfinished_requests()
    push.close(0)
    ctx.term()
    print("OK")


if __name__ == "__main__":
    main()
