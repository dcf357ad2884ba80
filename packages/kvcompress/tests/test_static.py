"""Decoding over a static slot layout (kvcompress.static_generate): the same tokens and cache contents as eager
decoding; on a GPU the step is a replayed CUDA graph (the same check runs there), and so is each eviction's
rebuild once it repeats; on the CPU the same captures are checked with emulated graphs ("emulated")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import pytest
import torch
from conftest import tiny_model

import kvcompress
from kvcompress.store import DenseStore
from kvcompress.testing import (
    ObserveAll,
    eager_generate,
    emulated_graphs,
    static_devices,
    static_generate_logits,
    static_generate_on,
    torch_device,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SPECS = ["dense", "sink(budget=24,step=8)", "window(budget=16,step=4)", "keydiff(budget=20,step=6)",
         "random(budget=18,step=5)", "sink(ratio=0.4,step=4)", "window(ratio=0.5,step=8,sink=2)"]


def _observing_specs() -> list[str]:
    reg = kvcompress.get_registry().policies
    return [s for s in ("h2o(budget=20,step=8)", "tova(budget=20,step=4)", "snapkv(budget=24,votes=8,step=8)",
                        "lru(budget=20,step=4)", "lru(budget=20,step=4,threshold=0.05)", "h2o(ratio=0.4,step=4)")
            if s.split("(")[0] in reg]


@pytest.mark.parametrize("device", static_devices())
@pytest.mark.parametrize("spec", SPECS + _observing_specs())
def test_static_decoding_equals_eager(spec, device):
    model = tiny_model("llama").to(torch_device(device))
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(0)).to(model.device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    ids[1, :5] = 0
    want, eager, _ = eager_generate(model, spec, ids, 40, mask)
    cache = kvcompress.make_cache(spec, model=model)
    got, graphs = static_generate_on(device, model, cache, ids, 40, attention_mask=mask)
    if graphs is not None:
        assert graphs.captures["step"] == 1 and graphs.replays["step"] == 40 - 4  # 2 warm-up steps, the capture's
        if "budget" in spec:  # a fixed budget: every layer's rebuild repeats from its second decode eviction on
            assert graphs.captures["rebuild"] == len(cache.layers) and graphs.replays["rebuild"] > 0
    assert torch.equal(got, want)
    for a, b in zip(cache.layers, eager.layers, strict=True):
        assert a.static is None and a.slots.length == b.slots.length
        assert torch.equal(a.slots.view("positions"), b.slots.view("positions"))
        torch.testing.assert_close(a.keys, b.keys)


@pytest.mark.parametrize("spec", ["dense", "sink(budget=24,step=8)", "keydiff(budget=20,step=6)"]
                         + [s for s in _observing_specs() if s.startswith(("h2o(budget", "lru(budget=20,step=4)"))])
def test_static_logits_equal_eager_logits(spec):
    """Not only the argmax: each static step's logits are eager decoding's (on the CPU, where the static step
    runs eagerly and its logits can be read; on a GPU the replayed steps' tokens and caches are compared)."""
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    ids[1, :4] = 0
    new = 24
    want, _, want_logits = eager_generate(model, spec, ids, new, mask)
    got, logits = static_generate_logits(model, kvcompress.make_cache(spec, model=model), ids, new,
                                         attention_mask=mask)
    assert torch.equal(got, want)
    assert logits.shape == want_logits.shape
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)


def test_static_decoding_refuses_what_it_cannot_hold():
    model = tiny_model("llama")
    ids = torch.ones(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="parameter 'cache' is a FullCache; allowed: a kvcompress cache"):
        kvcompress.static_generate(model, kvcompress.make_cache("full", model=model), ids, 4)
    kvcompress.attach(model)
    cache = kvcompress.CompressedCache(ObserveAll(budget=8), model=model)
    with pytest.raises(ValueError, match="'observe-all' observes attention decode steps cannot fuse"):
        kvcompress.static_generate(model, cache, ids, 4)
    assert cache.get_seq_length() == 0
    with pytest.raises(ValueError, match="parameter 'cuda_graph' is True but the model is not on a CUDA device"):
        kvcompress.static_generate(model, kvcompress.make_cache("dense", model=model), ids, 4, cuda_graph=True)


def test_cuda_graph_false_captures_nothing_even_where_graphs_are_emulated():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 20), generator=torch.Generator().manual_seed(3))
    want = kvcompress.static_generate(model, kvcompress.make_cache("sink(budget=8,step=2)", model=model), ids, 30)
    with emulated_graphs() as graphs:
        got = kvcompress.static_generate(model, kvcompress.make_cache("sink(budget=8,step=2)", model=model), ids, 30,
                                         cuda_graph=False)
    assert torch.equal(got, want) and graphs.captures == {"step": 0, "rebuild": 0}


@dataclass
class _OwnStore(kvcompress.Representation):
    """A representation that does not say its store has a static layout (the default)."""

    name: ClassVar[str] = "own-store"

    def make_store(self, layer):
        return DenseStore(layer)


@dataclass
class _Counting(kvcompress.SelectionPolicy):
    """on_tokens() with host-side work: it keeps each call's queries in a Python list."""

    name: ClassVar[str] = "counting"
    seen_queries: list = field(default_factory=list)

    def on_tokens(self, ctx):
        if ctx.layer_idx == 0:
            self.seen_queries.append((ctx.new, ctx.seen, ctx.queries[..., -1, :].clone()))

    def score(self, ctx):
        return ctx.positions.float()


def test_host_side_on_tokens_runs_between_steps_on_the_step_queries():
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 12), generator=torch.Generator().manual_seed(7))
    kvcompress.attach(model)
    eager, static = _Counting(budget=10, step=4), _Counting(budget=10, step=4)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=9, min_new_tokens=9, do_sample=False,
                   pad_token_id=0, past_key_values=kvcompress.CompressedCache(eager, model=model))
    kvcompress.static_generate(model, kvcompress.CompressedCache(static, model=model), ids, 9)
    assert len(static.seen_queries) == len(eager.seen_queries) == 9  # the prompt, then 8 decode steps
    for (n_a, seen_a, q_a), (n_b, seen_b, q_b) in zip(static.seen_queries, eager.seen_queries, strict=True):
        assert (n_a, seen_a) == (n_b, seen_b)
        torch.testing.assert_close(q_a, q_b)
    assert len({q.data_ptr() for _, _, q in static.seen_queries}) == 9  # each its own copy


def test_a_store_without_a_static_layout_is_refused():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("sink(budget=8)", model=model) | _OwnStore()
    with pytest.raises(ValueError, match="stores tokens as own-store.*: its store's layout is not static; allowed"):
        kvcompress.static_generate(model, cache, torch.ones(1, 4, dtype=torch.long), 4)
    assert cache.get_seq_length() == 0  # refused before the prompt


@pytest.mark.parametrize("device", DEVICES)
def test_timings_split_the_call_and_change_nothing(device):
    model = tiny_model("llama").to(device)
    ids = torch.randint(1, 96, (1, 24), generator=torch.Generator().manual_seed(1)).to(device)
    plain = kvcompress.static_generate(model, kvcompress.make_cache("sink(budget=16,step=4)", model=model), ids, 12)
    timings = {"stale": 1.0}
    timed = kvcompress.static_generate(model, kvcompress.make_cache("sink(budget=16,step=4)", model=model), ids, 12,
                                       timings=timings)
    assert torch.equal(plain, timed)
    assert set(timings) == {"prefill_s", "setup_s", "steady_s", "steady_steps"}
    assert all(v >= 0 for v in timings.values())
    # on a GPU two of the 11 decode forwards are warm-up steps (in setup_s); eagerly every one is steady
    assert timings["steady_steps"] == (9 if device == "cuda" else 11)


@pytest.mark.parametrize("spec", ["dense", "sink(budget=24,step=8)", "h2o(budget=20,step=4)"])
def test_a_chunked_prefill_decodes_as_eager_decoding_after_the_same_chunks(spec):
    if spec.startswith("h2o") and "h2o" not in kvcompress.get_registry().policies:
        pytest.skip("kvcompress-h2o is not installed")
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (2, 50), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :6] = 0  # left padding
    ids[1, :6] = 0
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = kvcompress.make_cache(spec, model=model)
    want = []
    with torch.no_grad():  # the same chunks of 16 fed by hand, then eager greedy steps
        for start in range(0, 50, 16):
            end = min(50, start + 16)
            out = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end],
                        position_ids=position[:, start:end], past_key_values=cache, use_cache=True)
        pos = position[:, -1:]
        for _ in range(10):
            token = out.logits[:, -1:].argmax(-1)
            want.append(token)
            mask, pos = torch.cat([mask, torch.ones_like(token)], -1), pos + 1
            out = model(input_ids=token, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True)
    chunked = kvcompress.make_cache(spec, model=model)
    got = kvcompress.static_generate(model, chunked, ids, 10, attention_mask=mask[:, :50], prefill_chunk=16)
    assert torch.equal(got, torch.cat(want, -1))
    whole = kvcompress.make_cache(spec, model=model)
    kvcompress.static_generate(model, whole, ids, 10, attention_mask=mask[:, :50])
    if spec != "dense":  # compressed while streaming: it evicted between the chunks
        assert sum(x.evictions for x in chunked.layers) > sum(x.evictions for x in whole.layers)


def test_prefill_chunk_is_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="parameter 'prefill_chunk' is 0; allowed: None"):
        kvcompress.static_generate(model, kvcompress.make_cache("dense", model=model),
                                   torch.ones(1, 4, dtype=torch.long), 2, prefill_chunk=0)


@pytest.mark.parametrize("spec", ["dense", "sink(budget=24,step=8)"])
def test_a_prefilled_and_repeated_cache_is_continued(spec):
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 40), generator=torch.Generator().manual_seed(5))

    def prefilled():  # one row fed up to its last token
        cache = kvcompress.make_cache(spec, model=model)
        with torch.no_grad():
            model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True)
        return cache

    want = kvcompress.static_generate(model, prefilled(), ids, 12)
    if spec == "dense":  # nothing evicted: the same as the whole prompt at once
        assert torch.equal(want, kvcompress.static_generate(model, kvcompress.make_cache(spec, model=model), ids, 12))
    cache = prefilled()
    cache.batch_repeat_interleave(3)
    got = kvcompress.static_generate(model, cache, ids.expand(3, -1), 12)
    assert torch.equal(got, want.expand(3, -1))
    assert cache.get_seq_length() == 40 + 11


def test_a_cache_holding_the_whole_input_is_refused():
    model = tiny_model("llama")
    cache = kvcompress.make_cache("dense", model=model)
    ids = torch.ones(1, 4, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids, past_key_values=cache, use_cache=True)
    with pytest.raises(ValueError, match="already holds 4 tokens and 'input_ids' has 4"):
        kvcompress.static_generate(model, cache, ids, 2)


def test_no_autograd_graph_is_recorded():
    model = tiny_model("llama")
    assert any(p.requires_grad for p in model.parameters())  # as a model comes from from_pretrained
    cache = kvcompress.make_cache("sink(budget=24,step=8)", model=model)
    kvcompress.static_generate(model, cache, torch.randint(1, 96, (1, 30)), 4)
    for layer in cache.layers:  # a recorded graph would keep every layer's activations alive
        assert layer.keys.grad_fn is None and not layer.keys.requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pick", ["one row", "both rows", "two ids"])
def test_end_ids_stop_and_pad_as_generate_does(device, pick):
    model = tiny_model("llama").to(device)
    ids = torch.randint(1, 96, (2, 20), generator=torch.Generator().manual_seed(6)).to(device)
    plain = kvcompress.static_generate(model, kvcompress.make_cache("sink(budget=24,step=8)", model=model), ids, 40)
    if pick == "one row":  # a token row 0 emits and row 1 never does
        eos = next(int(t) for t in plain[0, 3:] if t not in plain[1])
    elif pick == "both rows":
        eos = next(int(t) for t in plain[0, 3:] if t in plain[1])
    else:
        eos = [int(plain[0, 12]), int(plain[1, 20])]
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                          eos_token_id=eos, pad_token_id=95,
                          past_key_values=kvcompress.make_cache("sink(budget=24,step=8)", model=model))
    want = want[:, ids.shape[1]:]
    got = kvcompress.static_generate(model, kvcompress.make_cache("sink(budget=24,step=8)", model=model), ids, 40,
                                     eos_token_id=eos, pad_token_id=95)
    assert torch.equal(got, want)
    assert (got.shape[1] < 40) == (pick != "one row")
    assert (got == 95).any()  # a row that ended was padded


def test_end_ids_are_checked():
    model = tiny_model("llama")
    ids = torch.ones(1, 4, dtype=torch.long)
    for kwargs, words in (({"eos_token_id": -1}, "parameter 'eos_token_id' is -1"),
                          ({"eos_token_id": []}, "parameter 'eos_token_id' is \\[\\]"),
                          ({"pad_token_id": 0}, "parameter 'pad_token_id' is 0 without 'eos_token_id'"),
                          ({"eos_token_id": 2, "pad_token_id": "x"}, "parameter 'pad_token_id' is 'x'")):
        with pytest.raises(ValueError, match=words):
            kvcompress.static_generate(model, kvcompress.make_cache("dense", model=model), ids, 4, **kwargs)


def test_a_compressed_then_frozen_context_keeps_every_new_token():
    """kvpress' setting: the context compressed once, the cache frozen, then the question and the answer."""
    model = tiny_model("llama")
    ids = torch.randint(1, 96, (1, 48), generator=torch.Generator().manual_seed(9))

    def frozen_context():
        cache = kvcompress.make_cache("sink(budget=16,step=4)", model=model)
        with torch.no_grad():
            model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True)
        cache.compress()
        cache.freeze()
        return cache

    eager = frozen_context()
    want = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=eager, max_new_tokens=20,
                          min_new_tokens=20, do_sample=False, pad_token_id=0)[:, 48:]
    cache = frozen_context()
    got = kvcompress.static_generate(model, cache, ids, 20)
    assert torch.equal(got, want)
    assert cache.layers[0].slots.length == eager.layers[0].slots.length == 16 + 8 + 19  # nothing evicted after
