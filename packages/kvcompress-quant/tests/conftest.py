"""Tiny random-init models built from configs (no download)."""

from __future__ import annotations

import functools
import warnings

import torch
import transformers

from kvcompress import testing

warnings.filterwarnings("ignore", category=FutureWarning)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A 2-layer random-init model (head_dim 16, 4 query / 2 kv heads), eval mode, float32."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=512)
        return transformers.GPT2LMHeadModel(config).eval()
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[arch]
    kwargs = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
    return cls[1](cls[0](**{**kwargs, **overrides})).eval()


decode_logits = functools.partial(testing.greedy_logits, steps=24)  # prefill + greedy steps' logits
