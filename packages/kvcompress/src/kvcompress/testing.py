"""Tiny random-init decoder models for tests, ours and plugin authors': real architectures built from configs
(seeded, no download). ``import kvcompress.testing`` imports torch and transformers; ``import kvcompress`` does not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .policy import SelectionPolicy

VOCAB = 97


ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gpt2")


def tiny_model(arch: str = "llama", heads: int = 4, kv_heads: int | None = None, layers: int = 2, vocab: int = VOCAB,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0,
               **config: Any):
    """A seeded decoder (hidden 64, head_dim ``64 / heads``) with GQA ``heads / kv_heads`` (``kv_heads``:
    ``heads // 2`` by default; gpt2 has no grouped heads), sdpa attention unless ``attn_implementation`` says
    otherwise, in eval mode. ``arch``: one of :data:`ARCHITECTURES`; ``config`` overrides any config field."""
    import transformers

    if arch not in ARCHITECTURES:
        raise ValueError(f"tiny_model: parameter 'arch' is {arch!r}; allowed: {', '.join(ARCHITECTURES)}")
    attn = config.pop("attn_implementation", "sdpa")
    if arch == "gpt2":
        if kv_heads not in (None, heads):
            raise ValueError(f"tiny_model: parameter 'kv_heads' is {kv_heads} for gpt2; allowed: {heads} (= heads: "
                             "gpt2 has no grouped kv heads)")
        fields = dict(vocab_size=vocab, n_embd=64, n_layer=layers, n_head=heads, n_positions=16384,
                      pad_token_id=0, bos_token_id=1, eos_token_id=None)
        made = transformers.GPT2Config(**{**fields, **config})
    else:
        fields = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads // 2 if kv_heads is None else kv_heads,
                      max_position_embeddings=16384, pad_token_id=0, bos_token_id=1, eos_token_id=None,
                      tie_word_embeddings=False)
        if arch == "qwen3":
            fields["head_dim"] = 64 // heads
        if arch == "mistral":
            fields["sliding_window"] = None
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "qwen3": transformers.Qwen3Config, "mistral": transformers.MistralConfig,
               "phi3": transformers.Phi3Config}[arch]
        made = cls(**{**fields, **config})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(made, attn_implementation=attn, dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval().to(device)


def random_ids(n: int, seed: int = 0, batch: int = 1, vocab: int = VOCAB) -> torch.Tensor:
    """``[batch, n]`` seeded token ids in ``2 .. vocab-1`` (no pad or bos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, vocab, (batch, n), generator=g)


def greedy_logits(model: Any, ids: torch.Tensor, cache: Any, steps: int = 32,
                  attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill ``ids`` then ``steps`` greedy decode steps through ``cache``; the last-position logits of every
    forward, ``[steps + 1, B, V]`` (compare a policy whose budget covers the sequence with ``full``'s)."""
    with torch.no_grad():
        out = model(ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask, torch.ones_like(token)], dim=-1)
            out = model(token, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def eager_generate(model: Any, spec: str, ids: torch.Tensor, new: int,
                   attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """The reference :func:`kvcompress.static_generate` is checked against: ``model.generate`` greedy through a
    fresh ``spec`` cache, exactly ``new`` tokens (``min_new_tokens``: the end id is suppressed until then).
    Returns the new tokens ``[B, new]``, the cache and each step's logits ``[new, B, V]``."""
    from .cache import make_cache

    cache = make_cache(spec, model=model)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], cache, torch.stack(out.logits)


def static_generate_logits(model: Any, cache: Any, ids: torch.Tensor, new: int, **kwargs: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kvcompress.static_generate` with the last-position logits of every forward it runs
    ``[forwards, B, V]`` (on the CPU one per new token; on a GPU a replayed step runs no forward to read)."""
    from .static import static_generate

    seen: list[torch.Tensor] = []
    handle = model.register_forward_hook(lambda _m, _a, out: seen.append(out.logits[:, -1].clone()))
    try:
        tokens = static_generate(model, cache, ids, new, **kwargs)
    finally:
        handle.remove()
    return tokens, torch.stack(seen)


def reachable_tensors(obj: Any, skip: tuple[str, ...] = ("selection", "representation", "cache")
                      ) -> dict[int, torch.Tensor]:
    """Every tensor reachable from ``obj`` through attributes, dicts, lists and tuples, by storage pointer: what
    a layer really holds, found independently of its ``tensors()`` lists, to check ``kvcompress.kv_bytes``
    against. Attributes named in ``skip`` (the policies, the layer's cache) are not followed."""
    seen: dict[int, torch.Tensor] = {}
    stack, visited = [obj], set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            seen[item.untyped_storage().data_ptr()] = item
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "__dict__") and not isinstance(item, type) and not callable(item):
            stack.extend(v for k, v in vars(item).items() if k not in skip)
    return seen



@dataclass
class ObserveAll(SelectionPolicy):
    """``observe-all``: each slot's attention summed over every query through ``observe()`` only, the highest
    sums kept. It declares nothing a fused kernel could compute (no ``accumulated_attention()``): what a decode
    path that needs one (``static_generate``) refuses. Register it under ``name`` to use it by spec."""

    name: ClassVar[str] = "observe-all"
    needs_attention: ClassVar[bool] = True
    slot_states: ClassVar[dict[str, str]] = {"mass": "float32"}

    def observe(self, ctx, weights, query_positions):
        ctx.state["mass"].add_(weights.float().sum((2, 3)))

    def score(self, ctx):
        return ctx.state["mass"]
