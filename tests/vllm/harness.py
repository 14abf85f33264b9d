"""Real vLLM engines beside real llumlets, for the adapter's tests.

An `Instance` is a vLLM `LLMEngine` (its frontend in this process, its EngineCore in a process of
its own, as `vllm serve` runs it) with the adapter (`llumlet_vllm.make_scheduler`,
`LlumletConnector`) and the stand-in model (`llumlet_stand_in`), plus the `llumlet` binary beside
it, against a real redis-server. `migrate` calls the llumlet's gRPC `Migrate` as the Llumnix
scheduler does.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "vllm", "tiny-model")

# vLLM picks its platform at import time: these must be set first.
os.environ["LLUMLET_STAND_IN"] = "1"
os.environ["VLLM_PLUGINS"] = "llumlet_stand_in_cpu"
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llumlet_bin() -> str:
    p = os.environ.get("LLUMLET_BIN") or os.path.join(ROOT, "target", "debug", "llumlet")
    if not os.path.exists(p):
        raise FileNotFoundError(f"{p} not found: cargo build -p llumlet-tools first")
    return p


class Redis:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="llumlet-vllm-redis-")
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        self.client = redis.Redis(host="127.0.0.1", port=self.port)
        until(10, "redis-server answers", self._ping)

    def _ping(self):
        try:
            return self.client.ping()
        except Exception:
            return False

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def until(seconds: float, what: str, f, logs=lambda: ""):
    deadline = time.monotonic() + seconds
    while True:
        v = f()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds}s waiting for: {what}\n{logs()}")
        time.sleep(0.05)


_stubs = None


def protos():
    """The generated cms_pb2 and llumlet_server_pb2(_grpc) modules (tests/python/guide_client)."""
    global _stubs
    if _stubs is None:
        sys.path.insert(0, os.path.join(ROOT, "tests", "python"))
        import guide_client

        guide_client.generate(tempfile.mkdtemp(prefix="llumlet-vllm-stubs-"))
        import cms_pb2
        import llumlet_server_pb2
        import llumlet_server_pb2_grpc

        _stubs = (cms_pb2, llumlet_server_pb2, llumlet_server_pb2_grpc)
    return _stubs


def engine_args(**over):
    from vllm.engine.arg_utils import EngineArgs

    kw = dict(
        model=MODEL, skip_tokenizer_init=True,
        distributed_executor_backend="llumlet_stand_in.executor.StandInExecutor",
        max_model_len=512, block_size=16, max_num_seqs=16, max_num_batched_tokens=512,
        enforce_eager=True, enable_prefix_caching=False, dtype="float16", seed=0,
        scheduler_cls="llumlet_vllm.make_scheduler",
        kv_transfer_config={"kv_connector": "LlumletConnector",
                            "kv_connector_module_path": "llumlet_vllm.connector",
                            "kv_role": "kv_both"},
    )
    kw.update(over)
    return EngineArgs(**kw)


class Instance:
    """A vLLM engine with the adapter, and its llumlet."""

    def __init__(self, redis: Redis, name: str, step_ms: int = 20, llumlet_env=None,
                 multiprocess: bool = True, **engine_over):
        from vllm.v1.engine.llm_engine import LLMEngine

        self.id = f"vllm-{name}-{os.getpid()}"
        self.shm = f"llumlet-ctl-{self.id}"
        self.dir = tempfile.mkdtemp(prefix=f"llumlet-vllm-{name}-")
        self.events = os.path.join(self.dir, "events")
        engine_env = {
            "LLUMLET_INSTANCE_ID": self.id,
            "LLUMLET_ENGINE_SHM": self.shm,
            "STAND_IN_STEP_MS": str(step_ms),
            "STAND_IN_EVENTS": self.events,
            "VLLM_ENABLE_V1_MULTIPROCESSING": "1" if multiprocess else "0",
        }
        saved = {k: os.environ.get(k) for k in engine_env}
        os.environ.update(engine_env)
        try:  # the EngineCore process is spawned now and inherits this environment
            self.engine = LLMEngine.from_engine_args(engine_args(**engine_over))
        finally:
            if not multiprocess:
                # An EngineCore in this process froze vLLM's environment for it: thaw it, so that
                # the engines of later tests read theirs.
                import vllm.envs

                vllm.envs.disable_envs_cache()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        self._start_llumlet(redis, llumlet_env)

    def _start_llumlet(self, redis: Redis, llumlet_env=None):
        self.rpc = free_port()
        self.kvt = free_port()
        self.metrics = free_port()
        self.llumlet_env = {
            "PATH": os.environ.get("PATH", ""),
            "LLUMLET_INSTANCE_ID": self.id,
            "LLUMLET_HOST_IP": "127.0.0.1",
            "LLUMLET_ENGINE_SHM": self.shm,
            "LLUMLET_TRANSFER_PORT": str(self.kvt),
            "LLUMLET_METRICS_PORT": str(self.metrics),
            "LLUMNIX_VLLM_API_SERVER_PORT": "8000",
            "LLUMNIX_RPC_PORT": str(self.rpc),
            "LLUMNIX_CMS_REDIS_ADDRESS": "127.0.0.1",
            "LLUMNIX_CMS_REDIS_PORT": str(redis.port),
            "LLUMNIX_STATUS_PUSH_INTERVAL": "0.05",
            "LLUMNIX_METADATA_PUSH_INTERVAL": "1",
            "LLUMNIX_CMS_EXPIRED_TIME": "5",
            "LLUMNIX_MAX_REQ_MIG_OUT": "4",
            "LLUMNIX_MAX_REQ_MIG_IN": "4",
            "LLUMNIX_LOGGING_LEVEL": "DEBUG",
            **(llumlet_env or {}),
        }
        self.redis = redis
        self.llumlet = None
        self.start_llumlet()
        until(30, f"{self.id}'s status in the CMS", lambda: self.status() is not None, self.logs)

    def start_llumlet(self):
        self.runs = getattr(self, "runs", 0) + 1
        self.log = open(os.path.join(self.dir, f"llumlet-{self.runs}.log"), "ab")
        self.llumlet = subprocess.Popen([llumlet_bin()], env=self.llumlet_env, stdout=self.log,
                                        stderr=self.log)

    def restart_llumlet(self, extra=None):
        """Stops the llumlet (if it still runs) and starts it again with `extra` environment."""
        if self.llumlet is not None and self.llumlet.poll() is None:
            self.llumlet.send_signal(signal.SIGTERM)
            try:
                self.llumlet.wait(10)
            except subprocess.TimeoutExpired:
                self.llumlet.kill()
                self.llumlet.wait()
        self.log.close()
        env = {k: v for k, v in self.llumlet_env.items() if k != "LLUMLET_TEST_FAULTS"}
        self.llumlet_env = {**env, **(extra or {})}
        self.start_llumlet()
        until(30, f"{self.id}'s llumlet serving", self._serving, self.logs)

    def _serving(self) -> bool:
        try:
            self.metric("llumlet_")
            return True
        except OSError:
            return False

    def log_of_run(self, run=None) -> str:
        """What the llumlet started `run`-th (default: the latest) wrote."""
        with open(os.path.join(self.dir, f"llumlet-{run or self.runs}.log"), "rb") as f:
            return f.read().decode(errors="replace")

    def logs(self) -> str:
        out = ""
        for run in range(max(1, self.runs - 1), self.runs + 1):
            out += f"--- llumlet {self.id}, run {run} ---\n" + self.log_of_run(run)[-6000:]
        return out

    def status(self):
        cms_pb2, _, _ = protos()
        b = self.redis.client.get(f"llumnix:instance_status:{self.id}")
        if b is None:
            return None
        s = cms_pb2.InstanceStatus()
        s.ParseFromString(b)
        return s

    def arrivals(self) -> list[str]:
        if not os.path.exists(self.events):
            return []
        with open(self.events) as f:
            return [line.split()[1] for line in f if line.startswith("arrived ")]

    def metric(self, needle: str) -> float:
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in body.splitlines():
            if line.startswith(needle):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close_llumlet(self):
        if self.llumlet is not None and self.llumlet.poll() is None:
            self.llumlet.send_signal(signal.SIGTERM)
            try:
                self.llumlet.wait(5)
            except subprocess.TimeoutExpired:
                self.llumlet.kill()

    def close(self):
        self.close_llumlet()
        with contextlib.suppress(Exception):
            self.engine.engine_core.shutdown()
        shutil.rmtree(self.dir, ignore_errors=True)
        remove_shm_files(self.shm)


def remove_shm_files(prefix: str):
    """What an instance left in /dev/shm: mailboxes, migration records (a killed llumlet's)."""
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join("/dev/shm", name))


class Server(Instance):
    """vLLM's OpenAI-compatible server (`vllm serve`: its API server and its EngineCore, each a
    process of its own) with the adapter and the stand-in model, and its llumlet."""

    def __init__(self, redis: Redis, name: str, step_ms: int = 20):
        self.id = f"vllm-{name}-{os.getpid()}"
        self.shm = f"llumlet-ctl-{self.id}"
        self.dir = tempfile.mkdtemp(prefix=f"llumlet-vllm-{name}-")
        self.events = os.path.join(self.dir, "events")
        self.http = free_port()
        env = dict(os.environ, LLUMLET_INSTANCE_ID=self.id, LLUMLET_ENGINE_SHM=self.shm,
                   STAND_IN_STEP_MS=str(step_ms), STAND_IN_EVENTS=self.events)
        self.server_log = open(os.path.join(self.dir, "server.log"), "wb")
        vllm = os.path.join(os.path.dirname(sys.executable), "vllm")
        self.server = subprocess.Popen(
            [vllm, "serve", MODEL, "--port", str(self.http), "--host", "127.0.0.1",
             "--skip-tokenizer-init", "--max-model-len", "512", "--block-size", "16",
             "--enforce-eager", "--dtype", "float16", "--max-num-seqs", "16",
             "--distributed-executor-backend", "llumlet_stand_in.executor.StandInExecutor",
             "--scheduler-cls", "llumlet_vllm.make_scheduler",
             "--kv-transfer-config", '{"kv_connector": "LlumletConnector", '
             '"kv_connector_module_path": "llumlet_vllm.connector", "kv_role": "kv_both"}'],
            env=env, stdout=self.server_log, stderr=subprocess.STDOUT, start_new_session=True)
        until(120, f"{self.id}'s server answering", self._healthy, self.server_logs)
        self._start_llumlet(redis)

    def _healthy(self) -> bool:
        import urllib.request

        if self.server.poll() is not None:
            raise AssertionError(f"vllm serve exited\n{self.server_logs()}")
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{self.http}/health", timeout=2).status == 200
        except OSError:
            return False

    def server_logs(self) -> str:
        with open(os.path.join(self.dir, "server.log"), "rb") as f:
            return f.read().decode(errors="replace")[-6000:]

    def stream(self, prompt: list[int], max_tokens: int, on_token=None):
        """A streaming completion: (token ids, finish reasons seen, whether [DONE] came)."""
        import http.client
        import json

        c = http.client.HTTPConnection("127.0.0.1", self.http, timeout=120)
        c.request("POST", "/v1/completions", json.dumps({
            "model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "return_token_ids": True, "temperature": 0, "ignore_eos": True,
        }), {"Content-Type": "application/json"})
        r = c.getresponse()
        assert r.status == 200, r.read()
        toks, finishes, done = [], [], False
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            choice = json.loads(line[6:])["choices"][0]
            toks.extend(choice.get("token_ids") or [])
            if on_token is not None:
                on_token(len(toks))
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
        c.close()
        return toks, finishes, done

    def close(self):
        super().close_llumlet()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.server.pid, signal.SIGTERM)
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.server.pid, signal.SIGKILL)
            self.server.wait()
        shutil.rmtree(self.dir, ignore_errors=True)
        remove_shm_files(self.shm)


def migrate(src: Instance, dst: Instance, num_reqs: int = 1, policy: str = "SR", timeout: float = 30):
    """The scheduler's `Migrate` call: (success, message)."""
    import grpc

    _, pb, pb_grpc = protos()
    with grpc.insecure_channel(f"127.0.0.1:{src.rpc}") as ch:
        try:
            r = pb_grpc.LlumletStub(ch).Migrate(pb.MigrateRequest(
                src_engine_id=src.id, dst_engine_id=dst.id, dst_engine_ip="127.0.0.1",
                dst_engine_port=dst.kvt, migration_type="NUM_REQ", migration_req_policy=policy,
                trigger_policy="test", num_reqs=num_reqs), timeout=timeout)
        except grpc.RpcError as e:  # the llumlet died, or answered with an error status
            return False, f"{e.code()}: {e.details()}"
        return r.success, r.message


class Driver:
    """Steps an engine's frontend on a thread of its own and keeps every request's token stream
    (DELTA outputs appended, so a token missing or repeated shows) and how often it finished."""

    def __init__(self, inst: Instance):
        self.inst = inst
        self.tokens: dict[str, list[int]] = {}
        self.finished: dict[str, int] = {}
        self.error = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.thread = None

    def add(self, rid: str, prompt: list[int], max_tokens: int):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False,
                            ignore_eos=True, output_kind=RequestOutputKind.DELTA)
        with self._lock:
            self.tokens[rid] = []
            self.inst.engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), sp)

    def start(self):
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self._stop.is_set():
                if not self.inst.engine.has_unfinished_requests():
                    time.sleep(0.01)
                    continue
                for out in self.inst.engine.step():
                    with self._lock:
                        self.tokens[out.request_id].extend(out.outputs[0].token_ids)
                        if out.finished:
                            self.finished[out.request_id] = self.finished.get(out.request_id, 0) + 1
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def progress(self) -> dict[str, int]:
        with self._lock:
            return {k: len(v) for k, v in self.tokens.items()}

    def done(self) -> bool:
        with self._lock:
            return self.error is not None or len(self.finished) == len(self.tokens)

    def stop(self):
        self._stop.set()
