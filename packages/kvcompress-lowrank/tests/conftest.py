"""Tiny random-init models built from configs (no download), and a greedy decode loop."""

from __future__ import annotations

import functools
import warnings

import torch
import transformers

from kvcompress import testing

warnings.filterwarnings("ignore", category=FutureWarning)

COMMON = dict(
    vocab_size=96,
    hidden_size=128,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)  # head_dim 32: the kernel's smallest
ARCHITECTURES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, COMMON),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, COMMON),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {**COMMON, "head_dim": 32}),
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM, {**COMMON, "pad_token_id": 0}),
    "gpt2": (
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(vocab_size=96, n_embd=128, n_layer=2, n_head=4, n_positions=1024),
    ),
}
HEAD_DIM = 32


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A 2-layer random-init model of ``arch`` (head_dim 32, 4 query / 2 kv heads), eval mode, float32."""
    config_cls, model_cls, kwargs = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    return model_cls(config_cls(**{**kwargs, **overrides})).eval()


def ids(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 96, (batch, n), generator=torch.Generator().manual_seed(seed))


greedy_logits = functools.partial(testing.greedy_logits, steps=24)  # prefill + greedy steps' logits


def full_rank(**extra) -> str:
    """A ``lowrank`` spec that keeps every dimension (a random orthonormal basis of full rank)."""
    params = {
        **dict(basis="random", k_rank=HEAD_DIM, v_rank=HEAD_DIM, coeff_bits=None, sink=2, window=8),
        **extra,
    }
    return "lowrank(" + ",".join(f"{k}={v}" for k, v in params.items()) + ")"
