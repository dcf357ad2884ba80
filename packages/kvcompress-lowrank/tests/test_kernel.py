"""The fused Triton kernels (decode attention from the stored form, observation, the decode-step append)
against float32 torch references. On a CUDA GPU with Triton; on a CPU under Triton's interpreter
(TRITON_INTERPRET=1, float32 only: the interpreter has no 16-bit dots)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import greedy_logits, ids, tiny_model

import kvcompress
from kvcompress.attention import decode_attention
from kvcompress.store import Accumulate
from kvcompress_lowrank import kernels
from kvcompress_lowrank.attend import attend_torch

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if kernels.INTERPRET else None)
pytestmark = pytest.mark.skipif(
    not (kernels.AVAILABLE and DEVICE), reason="needs Triton and a CUDA GPU (or TRITON_INTERPRET=1 on a CPU)"
)
GPU = DEVICE == "cuda"
# (bits, masked, biased, observe, where cos/sin come from, dtype). On a GPU: every bit width with each
# mask/bias/observation/RoPE feature on and off at least once in float32, and every feature on in float16 and
# bfloat16 (18 cases: each kernel variant compiles once, so the set is sized to stay well under a
# minute); three float32 cases under the interpreter.
FEATURES = [
    (False, False, None, "compute"),
    (True, True, "sum", "compute"),
    (True, False, "max", "table"),
    (False, True, None, "table"),
]
CASES = [(bits, *f, torch.float32) for bits in (4, 8, None) for f in FEATURES] + [
    (bits, True, True, "sum", "compute", dtype)
    for bits in (4, 8, None)
    for dtype in (torch.float16, torch.bfloat16)
]
if not GPU:
    CASES = [
        (4, True, True, "sum", "compute", torch.float32),
        (8, False, False, "max", "table", torch.float32),
        (None, True, False, None, "compute", torch.float32),
    ]


def _store(bits, dtype, n=300, k_rank=12, v_rank=20, batch=2, head_dim=32):
    """A store of a tiny model's layer 1 after a prompt of ``n`` tokens and 3 decode steps (torch ops)."""
    model = tiny_model("llama", hidden_size=4 * head_dim).to(DEVICE, dtype)
    spec = (f"lowrank(basis=random,k_rank={k_rank},v_rank={v_rank},coeff_bits={bits},sink=2,window=16,"
            "kernel=torch)")
    cache = kvcompress.make_cache(spec, model=model)
    greedy_logits(model, ids(n, batch=batch).to(DEVICE), cache, steps=3)
    return cache.layers[1].store


def _reference(store, query, mask, scaling, bias):
    """Decode-then-attend in float32: the exact function of what is stored."""
    keys, values = store._dense(torch.float32)
    n = store.length
    return decode_attention(
        query.float(), keys, values, mask, scaling, None if bias is None else bias[..., :n]
    )


@pytest.fixture(autouse=True)
def several_splits(monkeypatch):
    monkeypatch.setattr(kernels, "SPLIT_MIN", 64)


@pytest.mark.parametrize("bits,masked,biased,observe,rope,dtype", CASES)
def test_attention_and_observation_match_float32(bits, masked, biased, observe, rope, dtype, monkeypatch):
    monkeypatch.setattr(
        kernels, "ROPE_FROM", rope
    )  # cos/sin from positions in the kernel, or the cache's table
    store = _store(bits, dtype)
    n, b, h = store.length, store.b, store.h
    assert kernels.splits(store.m - store.w, b * h, torch.device(DEVICE))[0] > 1
    g = torch.Generator(device=DEVICE).manual_seed(1)
    query = torch.randn(b, 4 * h // 2, 1, 32, device=DEVICE, generator=g).to(dtype)
    bias = torch.rand(b, h, n + 8, device=DEVICE, generator=g) * math.log(8) if biased else None
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool, device=DEVICE)
        mask[1, ..., :40] = False  # left padding of row 1
    acc = torch.zeros(b, h, n + 8, device=DEVICE) if observe else None
    want, weights = _reference(store, query, mask, 32**-0.5, bias)
    got = kernels.decode_attention(
        store, query, mask, 32**-0.5, bias, Accumulate(acc, observe) if observe else None
    )
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    if observe:
        w = weights.float()[:, :, :, 0]
        expect = w.amax(2) if observe == "max" else w.sum(2)
        torch.testing.assert_close(acc[..., :n], expect, rtol=tol, atol=tol)
        assert bool((acc[..., n:] == 0).all())


@pytest.mark.parametrize("bits", [None, 8, 4] if GPU else [4])
def test_torch_and_kernel_paths_give_the_same_model(bits):
    """Append and attention through the kernels, or through torch ops: the same logits, step after step."""
    model = tiny_model("llama").to(DEVICE)
    prompt = ids(120 if GPU else 50, batch=2).to(DEVICE)
    spec = f"lowrank(basis=random,k_rank=14,v_rank=24,coeff_bits={bits},sink=2,window=8"
    fused = kvcompress.make_cache(spec + ")", model=model)
    plain = kvcompress.make_cache(spec + ",kernel=torch)", model=model)
    steps = 12 if GPU else 3
    want = greedy_logits(model, prompt, plain, steps=steps)
    got = greedy_logits(model, prompt, fused, steps=steps)
    assert fused.layers[0].store._fused and not plain.layers[0].store._fused
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_second_launch_merges_when_asked(monkeypatch):
    store = _store(4, torch.float32)
    query = torch.randn(store.b, 4, 1, 32, device=DEVICE)
    want = attend_torch(store, query, None, 32**-0.5)
    monkeypatch.setattr(kernels, "MERGE_CHUNK", 0)
    torch.testing.assert_close(
        kernels.decode_attention(store, query, None, 32**-0.5), want, rtol=1e-5, atol=1e-5
    )


def test_llama3_head_shape():
    """The GPU speed grid's shape: head_dim 128, 4 query heads per kv head, ranks 112 / 124, int4."""
    dtype = torch.bfloat16 if GPU else torch.float32
    model = tiny_model("llama", hidden_size=1024, num_attention_heads=8).to(DEVICE, dtype)
    spec = "lowrank(basis=random,k_rank=112,v_rank=124,sink=2,window=16,kernel=torch)"
    cache = kvcompress.make_cache(spec, model=model)
    greedy_logits(model, ids(200, batch=2).to(DEVICE), cache, steps=2)
    store = cache.layers[1].store
    query = torch.randn(store.b, 8, 1, 128, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(2))
    want, _ = _reference(store, query.to(dtype), None, 128**-0.5, None)
    got = kernels.decode_attention(store, query.to(dtype), None, 128**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_a_decode_step_appends_through_the_kernel(monkeypatch):
    """The model's values reach the store transposed (another stride on the step's size-1 query dim than
    the keys'): the append kernel takes them all the same, one launch per layer and step."""
    model = tiny_model("llama").to(DEVICE)
    cache = kvcompress.make_cache("lowrank(basis=random,k_rank=14,v_rank=24,sink=2,window=8)", model=model)
    taken = []
    append = kernels.append_token
    monkeypatch.setattr(kernels, "append_token", lambda *a, **k: taken.append(append(*a, **k)) or taken[-1])
    greedy_logits(model, ids(20, batch=2).to(DEVICE), cache, steps=2)
    assert taken and all(taken)


def test_a_prompt_one_token_past_the_sink():
    """The prompt's last token is the rest's first: appended by the kernel at its own position (sink 2, three
    tokens), as torch ops append it."""
    model = tiny_model("llama").to(DEVICE)
    prompt = ids(3, batch=2).to(DEVICE)
    spec = "lowrank(basis=random,k_rank=14,v_rank=24,coeff_bits=8,sink=2,window=8"
    fused = kvcompress.make_cache(spec + ")", model=model)
    plain = kvcompress.make_cache(spec + ",kernel=torch)", model=model)
    want = greedy_logits(model, prompt, plain, steps=2)
    got = greedy_logits(model, prompt, fused, steps=2)
    assert torch.equal(fused.layers[0].store.mpos[:, :, :3], plain.layers[0].store.mpos[:, :, :3])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
