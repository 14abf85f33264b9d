"""vLLM's OpenAI-compatible server (`vllm serve`, unmodified: its API server and EngineCore
processes) with the adapter: HTTP streaming completions sent to one server migrate to another
mid-stream, and each HTTP client gets its whole stream, once."""
import threading

from harness import Redis, Server, migrate, until
from llumlet_stand_in.executor import expected_tokens

BLOCK = 16


def test_http_streams_of_migrated_requests_are_whole():
    redis = Redis()
    a = b = None
    try:
        a, b = Server(redis, "ha"), Server(redis, "hb")
        logs = lambda: a.logs() + b.logs()  # noqa: E731
        prompts = [[10 + (i * 29 + k * 13) % 900 for k in range(40 + 9 * i)] for i in range(3)]
        progress = [0] * 3
        results = [None] * 3

        def client(i):
            def seen(n, i=i):
                progress[i] = n
            results[i] = a.stream(prompts[i], 80, seen)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
        for t in threads:
            t.start()
        until(60, "every stream under way", lambda: min(progress) >= 5, logs)
        ok, msg = migrate(a, b, num_reqs=2)
        assert ok, msg + logs()
        for t in threads:
            t.join(120)
        assert len(b.arrivals()) == 2, logs()
        for i, (toks, finishes, done) in enumerate(results):
            assert toks == expected_tokens(prompts[i], 80), (i, toks)
            assert finishes == ["length"] and done, (i, finishes, done)

        def idle(s):
            st = s.status()
            return st is not None and st.num_running_requests == 0 and st.num_used_gpu_tokens == BLOCK

        until(10, "both engines empty", lambda: idle(a) and idle(b), logs)
    finally:
        for s in (a, b):
            if s is not None:
                s.close()
        redis.close()
