"""How the connector describes vLLM's KV tensors to the llumlet: block N of a region must be
exactly the bytes of vLLM's block N, in the shared file the tensor lives in."""
import os

import pytest
import torch

from llumlet_vllm.connector import KEY_ONLY, TOGETHER, VALUE_ONLY, LayoutError, describe

NB, BS, H, D = 8, 16, 2, 4


@pytest.fixture
def shm_tensor():
    made = []

    def make(nbytes):
        path = f"/dev/shm/llumlet-test-connector-{os.getpid()}-{len(made)}"
        with open(path, "wb") as f:
            f.truncate(4096 + nbytes)
        made.append(path)
        raw = torch.from_file(path, shared=True, size=4096 + nbytes, dtype=torch.int8)
        return raw[4096:], os.path.basename(path)  # a view 4 KiB into the file

    yield make
    for p in made:
        os.unlink(p)


def test_flash_attention_layout_is_a_k_and_a_v_region_per_layer(shm_tensor):
    nbytes = 2 * NB * BS * H * D * 4
    raw0, name0 = shm_tensor(nbytes)
    raw1, name1 = shm_tensor(nbytes)
    kv = {"model.layers.1.self_attn.attn": raw1.view(torch.float32).view(2, NB, BS, H, D),
          "model.layers.0.self_attn.attn": raw0.view(torch.float32).view(2, NB, BS, H, D)}
    regions = describe(kv, NB, BS)
    block = BS * H * D * 4
    assert [(r.layer, r.layout) for r in regions] == [
        (0, KEY_ONLY), (0, VALUE_ONLY), (1, KEY_ONLY), (1, VALUE_ONLY)]
    k0, v0 = regions[0], regions[1]
    assert k0.handle == name0.encode() and k0.offset == 4096 and v0.offset == 4096 + NB * block
    assert k0.block_size_bytes == block and k0.token_size_bytes == H * D * 4
    assert k0.num_blocks == NB
    # Block 5's bytes in the file are vLLM's block 5 of V.
    t = kv["model.layers.0.self_attn.attn"]
    t[1, 5].fill_(7.0)
    with open(f"/dev/shm/{name0}", "rb") as f:
        f.seek(v0.offset + 5 * block)
        got = torch.frombuffer(bytearray(f.read(block)), dtype=torch.float32)
    assert bool((got == 7.0).all())


def test_flashinfer_layout_is_one_region_per_layer(shm_tensor):
    raw, name = shm_tensor(NB * 2 * BS * H * D * 2)
    kv = {"model.layers.0.self_attn.attn": raw.view(torch.float16).view(NB, 2, BS, H, D)}
    (r,) = describe(kv, NB, BS)
    assert r.layout == TOGETHER and r.block_size_bytes == 2 * BS * H * D * 2 and r.offset == 4096


def test_kernel_blocks_smaller_than_the_managers_are_grouped(shm_tensor):
    raw, _ = shm_tensor(2 * NB * BS * H * D * 4)
    # The attention kernel's block is half the manager's: twice as many, half the size.
    kv = {"model.layers.0.a": raw.view(torch.float32).view(2, 2 * NB, BS // 2, H, D)}
    k, v = describe(kv, NB, BS)
    assert k.num_blocks == NB and k.block_size_bytes == BS * H * D * 4


def test_private_memory_and_unknown_shapes_are_refused_with_the_reason(shm_tensor):
    with pytest.raises(LayoutError, match="layer 0 .*private memory"):
        describe({"model.layers.0.a": torch.zeros(2, NB, BS, H, D)}, NB, BS)
    raw, _ = shm_tensor(3 * 5 * 4)
    with pytest.raises(LayoutError, match=r"shape \(3, 5\) has no dimension of 8 blocks"):
        describe({"model.layers.0.a": raw.view(torch.float32).view(3, 5)}, NB, BS)
