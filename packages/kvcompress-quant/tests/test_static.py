"""quant under kvcompress.static_generate: the same tokens and store contents as eager decoding (CPU: the
static layout decoded by torch; GPU: the fused kernel reading its lengths from the device, steps as CUDA
graphs, an eviction's rebuild captured once it repeats; "emulated": those rebuilds as emulated graphs on the
CPU)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import tiny_model

import kvcompress
from kvcompress.testing import eager_generate, static_devices, static_generate_on, torch_device
from kvcompress_quant import QuantStore, kernels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPECS = [
    "quant(bits=4,group_size=16,window=16)",
    "quant(bits=4,window=16)",  # groups of 64 (the kernel's folded path on a GPU)
    "quant(bits=8,group_size=16,window=20,sink=2)",
    "quant(bits=2,window=16)",  # rotated, groups of 16
    "sink(budget=48,step=8)+quant(bits=4,group_size=16,window=16)",
    "window(ratio=0.6,step=8,sink=2)+quant(bits=8,group_size=16,window=16)",  # a ratio: its final size
    "sink(budget=48,step=8)+quant(bits=2,window=16)",  # a rotated store rebuilt at each eviction
] + (["h2o(budget=48,step=8)+quant(bits=4,group_size=16,window=16)",  # observed inside the kernel on a GPU
      "h2o(budget=40,step=8)+quant(bits=8,group_size=16,window=8,sink=2,key_axis=token,value_axis=channel)"]
     if "h2o" in kvcompress.get_registry().policies else [])


@pytest.mark.parametrize("device", static_devices())
@pytest.mark.parametrize("spec", SPECS)
def test_static_decoding_equals_eager(spec, device):
    model = tiny_model("llama").to(torch_device(device))
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(0)).to(model.device)
    want, eager, _ = eager_generate(model, spec, ids, 60)
    cache = kvcompress.make_cache(spec, model=model)
    # emulated: decode steps eager (the fused kernel is what a GPU captures), rebuilds captured and replayed
    got, graphs = static_generate_on(device, model, cache, ids, 60, decode_steps=False)
    assert graphs is None or graphs.replays["rebuild"] > 0 or "budget" not in spec
    assert torch.equal(got, want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        sa, sb = a.store, b.store
        assert a.static is None and not sa.pinned
        assert (sa.s, sa.m, sa.w) == (sb.s, sb.m, sb.w) and sa.m > 0  # the same split; groups were packed
        assert torch.equal(sa.ck[:, :, : sa.m], sb.ck[:, :, : sb.m])  # the same codes
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))


def test_no_window_packs_a_group_one_step_later():
    """window=0: eager append quantizes a group with the token that completes it before that step attends; a
    static step cannot, so that token attends in full precision once, then its group is packed."""
    model = tiny_model("llama")
    spec = "quant(bits=4,group_size=16,window=0,sink=0)"
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(0))
    want, eager, _ = eager_generate(model, spec, ids, 60)
    cache = kvcompress.make_cache(spec, model=model)
    assert torch.equal(kvcompress.static_generate(model, cache, ids, 60), want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert (a.store.s, a.store.m, a.store.w) == (b.store.s, b.store.m, b.store.w)
        torch.testing.assert_close(a.keys, b.keys, atol=0.05, rtol=0.05)


def test_the_held_tensors_never_move():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("sink(budget=48,step=8)+quant(bits=4,group_size=16,window=16)", model=model)
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(1))
    seen: dict[int, set] = {}

    def record(*_):
        for i, lay in enumerate(cache.layers):
            st = lay.store
            ptrs = tuple(t.data_ptr() for t in (st.fk, st.fv, st.ck, st.cv, st.ks, st.vs))
            seen.setdefault(i, set()).add(ptrs)
        return None

    handle = model.register_forward_hook(record)
    try:
        kvcompress.static_generate(model, cache, ids, 40)
    finally:
        handle.remove()
    layer = cache.layers[0]
    assert layer.evictions > 0
    assert all(len(ptrs) <= 2 for ptrs in seen.values())  # the prompt's, then the held ones at every step


def test_torch_kernel_is_refused_under_cuda_graphs_only():
    model = tiny_model("llama")
    spec = "quant(bits=4,kernel=torch)"
    ids = torch.randint(1, 96, (1, 10), generator=torch.Generator().manual_seed(2))
    assert kvcompress.make_cache(spec).representation.static_refusal(False) is None
    assert "kernel='torch'" in kvcompress.make_cache(spec).representation.static_refusal(True)
    kvcompress.static_generate(model, kvcompress.make_cache(spec, model=model), ids, 4)  # eager static: fine


@pytest.mark.skipif(not (kernels.AVAILABLE and (torch.cuda.is_available() or kernels.INTERPRET)),
                    reason="the fused kernel runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("spec", ["quant(bits=4,group_size=16,window=16)",
                                  "sink(budget=48,step=8)+quant(bits=2,window=16)"]
                         + (["h2o(budget=48,step=8)+quant(bits=4,group_size=16,window=16)"]  # observed too
                            if "h2o" in kvcompress.get_registry().policies else []))
def test_the_fused_kernel_decodes_static_steps_from_device_lengths(spec, monkeypatch):
    """Eager steps launch the kernel with the host's lengths, static ones with ``[at, m]`` read on the device
    and splits over the middle's whole capacity: the same tokens and store (no graph: interpretable)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(QuantStore, "_fused_enabled", lambda self: True)  # on the CPU: the interpreted kernel
    model = tiny_model("llama").to(device)
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(3)).to(device)
    want, eager, _ = eager_generate(model, spec, ids, 50)
    cache = kvcompress.make_cache(spec, model=model)
    got = kvcompress.static_generate(model, cache, ids, 50, cuda_graph=False)
    assert torch.equal(got, want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert (a.store.s, a.store.m, a.store.w) == (b.store.s, b.store.m, b.store.w) and a.store.m > 0
        torch.testing.assert_close(a.keys, b.keys)


@pytest.mark.skipif(not (kernels.AVAILABLE and (torch.cuda.is_available() or kernels.INTERPRET)),
                    reason="the fused kernel runs on a CUDA GPU, or on the CPU under TRITON_INTERPRET=1")
def test_a_layout_that_grows_the_middle_keeps_no_old_copy(monkeypatch):
    """The kernel's cached launch plan holds the store's tensors: a layout that reallocates the middle must
    not leave the old one alive through it (every layer at once: twice the cache at its largest batch)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(QuantStore, "_fused_enabled", lambda self: True)
    model = tiny_model("llama").to(device)
    cache = kvcompress.make_cache("quant(bits=4,group_size=16,window=16)", model=model)
    ids = torch.randint(1, 96, (1, 41), generator=torch.Generator().manual_seed(4)).to(device)
    with torch.no_grad():
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True)  # one fused step: a plan cached
    store = cache.layers[0].store
    assert "plan" in store.launch_cache
    old = weakref.ref(store.ck)
    store.static_layout(store.length + 10 * store.cap_m, cuda_graph=False)
    gc.collect()
    assert old() is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_prompt_shorter_than_the_sink(device):
    """The sink fills first (device-side ``at`` runs on into the tail): a 3-token prompt, sink 8."""
    model = tiny_model("llama").to(device)
    spec = "quant(bits=4,group_size=16,window=16,sink=8)"
    ids = torch.randint(1, 96, (1, 3), generator=torch.Generator().manual_seed(5)).to(device)
    want, eager, _ = eager_generate(model, spec, ids, 50)
    cache = kvcompress.make_cache(spec, model=model)
    assert torch.equal(kvcompress.static_generate(model, cache, ids, 50), want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert (a.store.s, a.store.m, a.store.w) == (b.store.s, b.store.m, b.store.w) == (8, 16, 28)
        torch.testing.assert_close(a.keys, b.keys)


@pytest.mark.parametrize("spec", ["quant(bits=4,group_size=16,window=16)",
                                  "sink(budget=48,step=8)+quant(bits=4,group_size=16,window=16)"])
def test_a_left_padded_batch(spec):
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    want, eager, _ = eager_generate(model, spec, ids, 40, mask)
    cache = kvcompress.make_cache(spec, model=model)
    assert torch.equal(kvcompress.static_generate(model, cache, ids, 40, attention_mask=mask), want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert (a.store.s, a.store.m, a.store.w) == (b.store.s, b.store.m, b.store.w)
        torch.testing.assert_close(a.keys, b.keys)


def test_a_prefilled_cache_repeated_over_a_batch():
    """The harness's max_batch.replicate path: one row prefilled but its last token, repeated, continued."""
    model = tiny_model("llama")
    spec = "h2o(budget=48,step=8)+quant(bits=4,group_size=16,window=16)"
    if "h2o" not in kvcompress.get_registry().policies:
        spec = "sink(budget=48,step=8)+quant(bits=4,group_size=16,window=16)"
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(10))

    def prefilled():
        cache = kvcompress.make_cache(spec, model=model)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        return cache

    want = kvcompress.static_generate(model, prefilled(), ids, 30)
    cache = prefilled()
    cache.batch_repeat_interleave(3)
    assert torch.equal(kvcompress.static_generate(model, cache, ids.expand(3, -1), 30), want.expand(3, -1))
    assert cache.layers[0].store.b == 3 and cache.layers[0].store.m > 0
