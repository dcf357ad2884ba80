"""Shared fixtures: tiny random-init models of real architectures, built from configs (no download)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, COMMON),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, COMMON),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {**COMMON, "head_dim": 16}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {**COMMON, "sliding_window": None}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {**COMMON, "pad_token_id": 0}),
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random-init model of ``arch`` with a few layers, in eval mode, float32."""
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**kwargs, **overrides}))
    return model.eval()


@pytest.fixture(params=sorted(ARCHITECTURES))
def arch(request) -> str:
    return request.param


def greedy_logits(model, ids: torch.Tensor, cache, steps: int = 32, attention_mask=None) -> torch.Tensor:
    """Prefill ``ids`` then ``steps`` greedy decode steps; the logits of every step, ``[steps+1, B, V]``."""
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
