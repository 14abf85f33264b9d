"""llumlet-rs for vLLM v1: plugs an unmodified vLLM engine into a llumlet through vLLM's own
extension points.

    vllm serve MODEL \
        --scheduler-cls llumlet_vllm.make_scheduler \
        --kv-transfer-config '{"kv_connector": "LlumletConnector",
                               "kv_connector_module_path": "llumlet_vllm.connector",
                               "kv_role": "kv_both"}'

with LLUMLET_INSTANCE_ID (and optionally LLUMLET_ENGINE_SHM) set as for the llumlet beside it.

* `make_scheduler` (scheduler.py): vLLM's scheduler plus the adapter: status into the ring,
  the request table, and the llumlet's commands served between steps.
* `LlumletConnector` (connector.py): a KV connector whose only work is telling the llumlet where
  vLLM's KV cache tensors are (`register_kv_caches`).
* state.py: the migrated request's state, versioned.
* _vllm.py: every use of vLLM beyond those extension points, checked against the vLLM version it
  was written for (docs/vllm.md).
"""
from llumlet_vllm._vllm import SUPPORTED_VLLM, check_version


def make_scheduler(*args, **kwargs):
    """The `scheduler_cls` vLLM loads: the scheduler vLLM would have picked, with the adapter."""
    from llumlet_vllm.scheduler import make_scheduler as make

    return make(*args, **kwargs)


__all__ = ["SUPPORTED_VLLM", "check_version", "make_scheduler"]
