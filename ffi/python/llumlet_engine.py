"""Python binding of the llumlet engine interface (ctypes over libllumlet_ffi).

    from llumlet_engine import Engine
    with Engine("instance-0") as e:
        e.publish(num_running_requests=3, num_total_gpu_tokens=4096)

The library is found through LLUMLET_FFI_LIB, else next to this file's repository build
(target/release, then target/debug).
"""
import ctypes
import os

_HERE = os.path.dirname(os.path.abspath(__file__))

OK = 0
ERR_NULL, ERR_INVALID, ERR_SEGMENT, ERR_FULL, ERR_CORRUPT, ERR_NOT_FOUND, ERR_TOO_SMALL = -1, -2, -3, -4, -5, -6, -7
CMD_STATUS_REQUEST = 1
CMD_STATUS_PUBLISHED = 2
CMD_ABORT = 3
CMD_MIGRATE_OUT_BEGIN, CMD_MIGRATE_OUT_SUSPEND, CMD_MIGRATE_OUT_COMMIT, CMD_MIGRATE_OUT_ABORT = 10, 11, 12, 13
CMD_RESERVE_BLOCKS, CMD_MIGRATE_IN_COMMIT, CMD_MIGRATE_IN_ABORT = 20, 21, 22
CMD_REPLY = 30
REQ_WAITING, REQ_PREFILL, REQ_RUNNING, REQ_SUSPENDED, REQ_MIGRATING_IN = 1, 2, 3, 4, 5
KV_HOST_SHM, KV_CUDA_IPC = 1, 2
KV_TOGETHER, KV_KEY_ONLY, KV_VALUE_ONLY = 1, 2, 3
KV_HANDLE_BYTES = 64
MAILBOX_ID_BYTES = 64

_INT_FIELDS = [
    "step_id", "update_id", "hybrid_scheduler_waiting_to_decode_requests_num",
    "scheduler_waiting_to_decode_requests_num", "num_waiting_requests",
    "scheduler_running_to_decode_requests_num", "num_running_requests", "num_loading_requests",
    "num_total_gpu_tokens", "num_used_gpu_tokens",
    "num_uncomputed_tokens_hybrid_scheduler_waiting_prefills",
    "num_unallocated_tokens_hybrid_scheduler_waiting_decodes",
    "hybrid_scheduler_waiting_to_decode_tokens_num",
    "num_uncomputed_tokens_scheduler_waiting_prefills", "scheduler_waiting_to_decode_tokens_num",
    "num_uncomputed_tokens_scheduler_running_prefills",
    "num_unallocated_tokens_scheduler_running_prefills", "scheduler_running_to_decode_tokens_num",
    "num_tokens_loading_requests", "num_uncomputed_tokens_all_waiting_prefills",
    "num_migrate_in_reqs", "num_migrate_out_reqs", "num_migrate_in_tokens", "num_migrate_out_tokens",
    "profiling_id", "num_scheduled_prefill_tokens",
]
_FLOAT_FIELDS = ["kv_cache_usage_ratio_migrate_in", "kv_cache_usage_ratio_migrate_out", "step_duration"]


class Status(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in _INT_FIELDS] + [(n, ctypes.c_double) for n in _FLOAT_FIELDS]


class Command(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_uint32), ("ok", ctypes.c_uint32), ("id", ctypes.c_uint64), ("a", ctypes.c_uint64)]


class KvRegion(ctypes.Structure):
    _fields_ = [("memory", ctypes.c_uint32), ("layout", ctypes.c_uint32), ("layer", ctypes.c_uint32),
                ("handle_len", ctypes.c_uint32), ("offset", ctypes.c_uint64), ("num_blocks", ctypes.c_uint64),
                ("block_size_bytes", ctypes.c_uint64), ("token_size_bytes", ctypes.c_uint64),
                ("handle", ctypes.c_uint8 * KV_HANDLE_BYTES)]


class CommandReader:
    """Reads an engine's commands on a thread of its own (see `Engine.command_reader`)."""

    def __init__(self, handle):
        self._h = handle

    def wait(self, timeout_s):
        """The next command as (kind, ok, id, a), or None if none came within `timeout_s`."""
        c = Command()
        if _check(_lib.llumlet_reader_wait(self._h, ctypes.byref(c), int(timeout_s * 1e6))) == 0:
            return None
        return (c.kind, c.ok, c.id, c.a)

    def close(self):
        if self._h:
            _lib.llumlet_reader_destroy(self._h)
            self._h = _P()


class LlumletError(RuntimeError):
    def __init__(self, code, message):
        super().__init__(f"{message} (code {code})")
        self.code = code


def _find_library():
    env = os.environ.get("LLUMLET_FFI_LIB")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(_HERE))
    for profile in ("release", "debug"):
        p = os.path.join(root, "target", profile, "libllumlet_ffi.so")
        if os.path.exists(p):
            return p
    raise FileNotFoundError("libllumlet_ffi.so not found: build it (cargo build -p llumlet-ffi) or set LLUMLET_FFI_LIB")


_lib = ctypes.CDLL(_find_library())
_lib.llumlet_last_error.restype = ctypes.c_char_p
_P = ctypes.c_void_p
_lib.llumlet_engine_create.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(_P)]
_lib.llumlet_engine_destroy.argtypes = [_P]
_lib.llumlet_engine_destroy.restype = None
_lib.llumlet_engine_publish.argtypes = [_P, ctypes.POINTER(Status)]
_lib.llumlet_engine_set_waiting_ids.argtypes = [_P, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t, ctypes.c_bool]
_lib.llumlet_engine_add_request.argtypes = [_P, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32,
                                            ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t,
                                            ctypes.POINTER(ctypes.c_uint32)]
_lib.llumlet_engine_remove_request.argtypes = [_P, ctypes.c_uint32]
_lib.llumlet_engine_request_progress.argtypes = [_P, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32,
                                                 ctypes.POINTER(ctypes.c_uint32), ctypes.c_size_t]
_lib.llumlet_engine_set_request_blocks.argtypes = [_P, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32),
                                                   ctypes.c_size_t]
_lib.llumlet_engine_register_kv_region.argtypes = [_P, ctypes.POINTER(KvRegion)]
_lib.llumlet_engine_mailbox_write.argtypes = [_P, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t]
_lib.llumlet_engine_mailbox_read.argtypes = [_P, ctypes.c_uint64, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                             ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t)]
_lib.llumlet_engine_mailbox_remove.argtypes = [_P, ctypes.c_uint64]
_lib.llumlet_engine_command_reader.argtypes = [_P, ctypes.POINTER(_P)]
_lib.llumlet_reader_wait.argtypes = [_P, ctypes.POINTER(Command), ctypes.c_uint64]
_lib.llumlet_reader_destroy.argtypes = [_P]
_lib.llumlet_reader_destroy.restype = None
_lib.llumlet_engine_poll_command.argtypes = [_P, ctypes.POINTER(Command)]
_lib.llumlet_engine_send.argtypes = [_P, ctypes.POINTER(Command)]
_lib.llumlet_engine_published.argtypes = [_P, ctypes.POINTER(ctypes.c_uint64)]


def _check(rc):
    if rc < 0:
        raise LlumletError(rc, _lib.llumlet_last_error().decode())
    return rc


class Engine:
    """An engine's endpoint: its control segment, status ring, request table and queues."""

    def __init__(self, instance_id, shm=None):
        self._h = _P()
        _check(_lib.llumlet_engine_create(instance_id.encode(), shm.encode() if shm else None, ctypes.byref(self._h)))
        self._status = Status()

    def publish(self, **fields):
        """Publishes a status; fields not given keep their previous value."""
        for k, v in fields.items():
            setattr(self._status, k, v)
        _check(_lib.llumlet_engine_publish(self._h, ctypes.byref(self._status)))

    def set_waiting_ids(self, ids, recent=False):
        arr = (ctypes.c_char_p * len(ids))(*[i.encode() for i in ids])
        _check(_lib.llumlet_engine_set_waiting_ids(self._h, arr, len(ids), recent))

    def add_request(self, request_id, state, arrival, prompt_tokens, output_tokens, blocks):
        arr = (ctypes.c_uint32 * len(blocks))(*blocks)
        slot = ctypes.c_uint32()
        _check(_lib.llumlet_engine_add_request(self._h, request_id.encode(), state, arrival, prompt_tokens,
                                               output_tokens, arr, len(blocks), ctypes.byref(slot)))
        return slot.value

    def request_progress(self, slot, state, output_tokens, new_blocks=()):
        """Records a request's state, output tokens and the blocks it gained since the last call."""
        arr = (ctypes.c_uint32 * len(new_blocks))(*new_blocks) if new_blocks else None
        rc = _lib.llumlet_engine_request_progress(self._h, slot, state, output_tokens, arr, len(new_blocks))
        if rc < 0:
            _check(rc)

    def set_request_blocks(self, slot, blocks):
        """Replaces a request's block table."""
        arr = (ctypes.c_uint32 * len(blocks))(*blocks)
        _check(_lib.llumlet_engine_set_request_blocks(self._h, slot, arr, len(blocks)))

    def remove_request(self, slot):
        _check(_lib.llumlet_engine_remove_request(self._h, slot))

    def register_kv_region(self, memory, layout, layer, handle, offset, num_blocks, block_size_bytes,
                           token_size_bytes):
        """Registers where part of the KV cache lives; `handle` is a segment name or path (host)
        or the IPC handle bytes (GPU). Returns the region's index."""
        h = handle.encode() if isinstance(handle, str) else bytes(handle)
        if not 0 < len(h) <= KV_HANDLE_BYTES:
            raise LlumletError(ERR_INVALID, f"a KV region handle is 1..{KV_HANDLE_BYTES} bytes, got {len(h)}")
        r = KvRegion(memory, layout, layer, len(h), offset, num_blocks, block_size_bytes, token_size_bytes)
        ctypes.memmove(r.handle, h, len(h))
        return _check(_lib.llumlet_engine_register_kv_region(self._h, ctypes.byref(r)))

    def mailbox_write(self, migration, request_id, state=b""):
        """Writes migration `migration`'s mailbox: the request id and its serialized state."""
        _check(_lib.llumlet_engine_mailbox_write(self._h, migration, request_id.encode(), state, len(state)))

    def mailbox_read(self, migration):
        """Migration `migration`'s mailbox as (request id, state bytes), or None if there is none."""
        idb = ctypes.create_string_buffer(MAILBOX_ID_BYTES)
        n = ctypes.c_size_t(0)
        cap = 1 << 16
        while True:
            buf = ctypes.create_string_buffer(cap)
            rc = _lib.llumlet_engine_mailbox_read(self._h, migration, idb, MAILBOX_ID_BYTES, buf, cap, ctypes.byref(n))
            if rc == ERR_NOT_FOUND:
                return None
            if rc == ERR_TOO_SMALL and n.value > cap:
                cap = n.value
                continue
            _check(rc)
            return idb.value.decode(), buf.raw[:n.value]

    def mailbox_remove(self, migration):
        _check(_lib.llumlet_engine_mailbox_remove(self._h, migration))

    def reply(self, id, ok, value=0):
        """Answers the command `id` (a migration id or an abort's correlation id)."""
        c = Command(CMD_REPLY, 1 if ok else 0, id, value)
        _check(_lib.llumlet_engine_send(self._h, ctypes.byref(c)))

    def published(self):
        """The sequence number of the newest published status."""
        seq = ctypes.c_uint64()
        _check(_lib.llumlet_engine_published(self._h, ctypes.byref(seq)))
        return seq.value

    def answer_status_request(self, seq):
        """Tells the llumlet the status it asked for (request `seq`) is the newest one published."""
        reply = Command(CMD_STATUS_PUBLISHED, 0, seq, self.published())
        _check(_lib.llumlet_engine_send(self._h, ctypes.byref(reply)))

    def command_reader(self):
        """The command queue's reader, for a thread of its own (once per engine; `poll_command`
        refuses afterwards). Its `wait` holds neither this handle nor the interpreter."""
        h = _P()
        _check(_lib.llumlet_engine_command_reader(self._h, ctypes.byref(h)))
        return CommandReader(h)

    def poll_command(self):
        """The next command from the llumlet as (kind, ok, id, a), or None."""
        c = Command()
        if _check(_lib.llumlet_engine_poll_command(self._h, ctypes.byref(c))) == 0:
            return None
        return (c.kind, c.ok, c.id, c.a)

    def serve_status_requests(self):
        """Answers pending status requests by publishing the current status."""
        while (cmd := self.poll_command()) is not None:
            if cmd[0] == CMD_STATUS_REQUEST:
                self.publish()
                self.answer_status_request(cmd[2])

    def close(self):
        if self._h:
            _lib.llumlet_engine_destroy(self._h)
            self._h = _P()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
