"""On the real SmolLM2-135M: sink(budget=128) does exactly what StreamingLLM says."""

from __future__ import annotations

import math

import torch
from real_model import load_smollm2, wikitext_ids
from transformers import DynamicCache

import kvcompress

N, BUDGET, SINK = 512, 128, 4  # 384 decode steps each for the policy and the reference


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                             reduction="sum")


def _streaming_ppl(model, ids, step_fn) -> float:
    """Prefill the first BUDGET tokens (nothing is evicted before that), then one token at a time."""
    total = _nll(step_fn(ids[:, :BUDGET], None)[:, :-1], ids[:, 1:BUDGET])
    last = None
    for t in range(BUDGET, N - 1):
        logits = step_fn(ids[:, t : t + 1], t)
        total += _nll(logits, ids[:, t + 1 : t + 2])
        last = logits
    assert last is not None
    return math.exp(total.item() / (N - 1))


def test_sink_matches_plain_streaming_reference():
    model, tok = load_smollm2()
    ids = wikitext_ids(tok, N)
    cache = kvcompress.make_cache(f"sink(budget={BUDGET})", model=model)

    def policy_step(chunk, t):
        with torch.no_grad():
            return model(chunk, past_key_values=cache, use_cache=True).logits

    ref = DynamicCache()

    def reference_step(chunk, t):
        position_ids = None if t is None else torch.tensor([[t]])
        with torch.no_grad():
            logits = model(chunk, position_ids=position_ids, past_key_values=ref, use_cache=True).logits
        for layer in ref.layers:  # cut to exactly the first SINK and last BUDGET-SINK entries
            if layer.keys.shape[2] > BUDGET:
                keep = lambda x: torch.cat([x[:, :, :SINK], x[:, :, -(BUDGET - SINK):]], dim=2)  # noqa: E731
                layer.keys, layer.values = keep(layer.keys), keep(layer.values)
        return logits

    ppl = _streaming_ppl(model, ids, policy_step)
    ref_ppl = _streaming_ppl(model, ids, reference_step)
    assert all(layer.slots.length <= BUDGET + 1 for layer in cache.layers)
    assert cache.get_seq_length() == N - 1
    assert abs(ppl - ref_ppl) / ref_ppl < 0.01, (ppl, ref_ppl)
    # the policy really discards context: a wrong implementation keeping everything would score far lower
    assert ppl > 1.2 * _full_ppl(model, ids)


def _full_ppl(model, ids) -> float:
    with torch.no_grad():
        logits = model(ids[:, : N - 1]).logits
    return math.exp(_nll(logits, ids[:, 1:N]).item() / (N - 1))
