"""Tiny random-init models built from configs (no downloads)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

warnings.filterwarnings("ignore", category=FutureWarning)

VOCAB = 97


def tiny_model(arch: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 2,
               dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """A small decoder (hidden 64, head_dim 16) with GQA ``heads / kv_heads``, seeded, in eval mode."""
    config = (LlamaConfig if arch == "llama" else Qwen2Config)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=16384,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model.eval().to(device)


@pytest.fixture(scope="session")
def llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def qwen2():
    return tiny_model("qwen2", heads=6, kv_heads=2)


def prompt(n: int, seed: int = 0, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, n), generator=g)


def greedy_logits(model, ids: torch.Tensor, cache, steps: int = 8, attention_mask=None) -> torch.Tensor:
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
