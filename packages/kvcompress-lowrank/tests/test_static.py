"""lowrank under kvcompress.static_generate: the same tokens and store contents as eager decoding (CPU: the
store's own append and torch attention from the host counters; the fused kernels, on a GPU as CUDA graphs or
on a CPU under TRITON_INTERPRET=1, reading the lengths and positions from the device)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import kvcompress
from kvcompress.testing import eager_generate, static_generate_logits
from kvcompress_lowrank import kernels
from kvcompress_lowrank.attend import attend_torch
from kvcompress_lowrank.static import LowRankLayout

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FUSED = kernels.AVAILABLE and (torch.cuda.is_available() or kernels.INTERPRET)
needs_fused = pytest.mark.skipif(not FUSED, reason="the fused kernels run on a CUDA GPU, or on the CPU under "
                                                   "TRITON_INTERPRET=1 with Triton installed")
HAS_H2O = "h2o" in kvcompress.get_registry().policies


def lowrank(**extra) -> str:
    """A small ``lowrank`` spec: random basis, ranks 20 / 24 of 32, int4, sink 2, window 6."""
    params = {**dict(basis="random", k_rank=20, v_rank=24, sink=2, window=6), **extra}
    return "lowrank(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"


SPECS = [
    lowrank(),
    lowrank(coeff_bits=8),
    lowrank(coeff_bits=None),
    lowrank(window=0),
    "sink(budget=32,step=8)+" + lowrank(),  # evictions: the store rebuilt eagerly, copied back
    "window(ratio=0.6,step=8,sink=2)+" + lowrank(coeff_bits=8),  # a ratio: the capacity it reaches
] + (["h2o(budget=32,step=8)+" + lowrank(),  # a sum of attention, observed by the kernel or torch
      "lru(budget=32,step=8)+" + lowrank()] if HAS_H2O else [])  # a last use: the core's scratch, replaced


def _ids(batch: int, n: int, seed: int, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``[batch, n]`` prompt ids and their mask; row 1 left-padded by ``pad``."""
    ids = torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, :pad], ids[1, :pad] = 0, 0
    return ids, mask


def _same_stores(cache, eager) -> None:
    """The same split, codes, exact entries and true positions as eager decoding, layer by layer."""
    for a, b in zip(cache.layers, eager.layers, strict=True):
        sa, sb = a.store, b.store
        assert a.static is None
        assert (sa.s, sa.m, sa.seen, sa.head_open) == (sb.s, sb.m, sb.seen, sb.head_open) and sa.m > 0
        for name in ("ck", "cv", "mpos") + (("ks", "vs") if sa.quantized else ()):
            assert torch.equal(getattr(sa, name)[:, :, : sa.m], getattr(sb, name)[:, :, : sb.m]), name
        assert torch.equal(sa.positions(), sb.positions())
        torch.testing.assert_close(a.keys, b.keys)
        torch.testing.assert_close(a.values, b.values)
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("spec", SPECS)
def test_static_decoding_equals_eager(spec, device):
    """A left-padded batch (row 1: 5 of padding), 40 new tokens: on a GPU the steps are CUDA graphs."""
    model = tiny_model("llama").to(device)
    ids, mask = (t.to(device) for t in _ids(2, 30, seed=0, pad=5))
    want, eager, _ = eager_generate(model, spec, ids, 40, mask)
    cache = kvcompress.make_cache(spec, model=model)
    got = kvcompress.static_generate(model, cache, ids, 40, attention_mask=mask)
    assert torch.equal(got, want)
    _same_stores(cache, eager)
    if "budget" in spec or "ratio" in spec:
        assert cache.layers[0].evictions > 0


@pytest.mark.parametrize("device", DEVICES)
def test_logits_equal_eager(device):
    """Not only the argmax: each static step's logits are eager decoding's."""
    model = tiny_model("llama").to(device)
    spec = "sink(budget=32,step=8)+" + lowrank()
    ids, mask = (t.to(device) for t in _ids(2, 30, seed=4, pad=3))
    new = 20
    want, _, want_logits = eager_generate(model, spec, ids, new, mask)
    got, logits = static_generate_logits(model, kvcompress.make_cache(spec, model=model), ids, new,
                                         attention_mask=mask)
    assert torch.equal(got, want)
    if device == "cpu":  # on a GPU the replayed steps run no forward to read (the capture's is one more)
        assert logits.shape == want_logits.shape
        torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_the_held_tensors_never_move():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("sink(budget=32,step=8)+" + lowrank(), model=model)
    ids, _ = _ids(1, 30, seed=1)
    seen: dict[int, set] = {}

    def record(*_):
        for i, layer in enumerate(cache.layers):
            st = layer.store
            names = ("fk", "fv", "hpos", "ck", "cv", "ks", "vs", "mpos")
            seen.setdefault(i, set()).add(tuple(getattr(st, n).data_ptr() for n in names))

    handle = model.register_forward_hook(record)
    try:
        kvcompress.static_generate(model, cache, ids, 40)
    finally:
        handle.remove()
    assert cache.layers[0].evictions > 0
    assert all(len(ptrs) <= 2 for ptrs in seen.values())  # the prompt's, then the held ones at every step


@pytest.mark.parametrize("device", DEVICES)
def test_a_prompt_shorter_than_the_sink(device):
    """The head still open: the first decode tokens join it (sink 8, a 3-token prompt)."""
    model = tiny_model("llama").to(device)
    spec = lowrank(sink=8)
    ids, mask = (t.to(device) for t in _ids(1, 3, seed=5))
    want, eager, _ = eager_generate(model, spec, ids, 30, mask)
    cache = kvcompress.make_cache(spec, model=model)
    assert torch.equal(kvcompress.static_generate(model, cache, ids, 30), want)
    _same_stores(cache, eager)
    assert cache.layers[0].store.s == 8


@pytest.mark.parametrize("device", DEVICES)
def test_a_prefilled_cache_repeated_over_a_batch(device):
    """The harness's max_batch.replicate path: one row prefilled but its last token, repeated, continued; as
    generate continues the same prefilled cache."""
    model = tiny_model("llama").to(device)
    spec = ("h2o(budget=32,step=8)+" if HAS_H2O else "sink(budget=32,step=8)+") + lowrank()
    ids, _ = _ids(1, 40, seed=10)
    ids = ids.to(device)

    def prefilled():
        cache = kvcompress.make_cache(spec, model=model)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        return cache

    eager = prefilled()
    want = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=eager, max_new_tokens=30,
                          min_new_tokens=30, do_sample=False, pad_token_id=0)[:, ids.shape[1]:]
    single = prefilled()
    assert torch.equal(kvcompress.static_generate(model, single, ids, 30), want)
    _same_stores(single, eager)
    cache = prefilled()
    cache.batch_repeat_interleave(3)
    assert torch.equal(kvcompress.static_generate(model, cache, ids.expand(3, -1), 30), want.expand(3, -1))
    assert cache.layers[0].store.b == 3


def test_cuda_graphs_need_the_fused_kernels():
    model = tiny_model("llama")
    rep = kvcompress.make_cache(lowrank(kernel="torch"), model=model).representation
    assert rep.static_refusal(False) is None
    assert "kernel='torch'" in rep.static_refusal(True)
    if not kernels.AVAILABLE:
        assert "Triton" in kvcompress.make_cache(lowrank(), model=model).representation.static_refusal(True)
    ids, _ = _ids(1, 10, seed=2)
    with pytest.raises(ValueError, match="lowrank stores replay as CUDA graphs through the fused"):
        LowRankLayout(_prefilled_store(model, lowrank(kernel="torch"), ids), 16, cuda_graph=True)


def _prefilled_store(model, spec, ids):
    cache = kvcompress.make_cache(spec, model=model)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    return cache.layers[1].store


@needs_fused
@pytest.mark.parametrize("spec,pad,n", [(lowrank(), 5, 30), ("h2o(budget=32,step=8)+" + lowrank(), 0, 30),
                                        (lowrank(sink=8, window=0), 0, 3)])
def test_the_fused_kernels_decode_static_steps_from_device_lengths(spec, pad, n):
    """The append and attention kernels with ``[s, m]`` and the true positions read on the device, splits over
    the rest's whole capacity (no graph: interpretable): the same tokens and store as eager decoding, whose
    kernels take the host's counters; the last case joins the open head (window 0)."""
    if "h2o" in spec and not HAS_H2O:
        pytest.skip("kvcompress-h2o is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama").to(device)
    ids, mask = (t.to(device) for t in _ids(2, n, seed=3, pad=pad))
    want, eager, _ = eager_generate(model, spec, ids, 24, mask)
    cache = kvcompress.make_cache(spec, model=model)
    got = kvcompress.static_generate(model, cache, ids, 24, attention_mask=mask, cuda_graph=False)
    assert cache.layers[0].store._fused
    assert torch.equal(got, want)
    _same_stores(cache, eager)


@needs_fused
def test_the_fused_kernels_read_the_lengths_from_the_device():
    """One static step by hand: the kernels write and attend at ``lens``, not at the host's counters (one
    slot behind until ``advance``); with ``lens`` one slot short the output changes."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = tiny_model("llama").to(device)
    ids, _ = _ids(2, 20, seed=6)
    store = _prefilled_store(model, lowrank(), ids.to(device))
    n, b, h, d = store.length, store.b, store.h, store.d
    layout = LowRankLayout(store, n + 8, cuda_graph=False)
    g = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(b, 2 * h, 1, d, device=device, generator=g)
    bias = torch.zeros(b, h, n + 8, device=device)
    bias[:, :, n + 1 :] = float("-inf")
    before = attend_torch(store, query, None, d**-0.5, bias)  # the stored slots only
    keys, values = (torch.randn(b, h, 1, d, device=device, generator=g) for _ in range(2))
    layout.append(keys, values, torch.tensor([n], device=device))
    got = layout.attend(query, d**-0.5, bias, None)
    assert store.m == n - store.s  # the host's counters have not moved yet
    layout.advance()
    torch.testing.assert_close(got, attend_torch(store, query, None, d**-0.5, bias), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, before, rtol=1e-3, atol=1e-3)
    layout.lens[1].sub_(1)  # one slot short
    assert not torch.allclose(layout.attend(query, d**-0.5, bias, None), got, rtol=1e-3, atol=1e-3)
