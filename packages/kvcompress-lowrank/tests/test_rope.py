"""Keys before RoPE: the true positions read off the model's cos/sin, the un-rotate/rotate round trip, and the
coefficients of a full-rank basis giving back exactly the keys the model computed before rotating them."""

from __future__ import annotations

import pytest
import torch
from conftest import full_rank, ids, tiny_model

import kvcompress
from kvcompress_lowrank.positions import PositionDecoder
from kvcompress_lowrank.store import rotate, unrotate


@pytest.mark.parametrize(
    "rope",
    [
        None,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "original_max_position_embeddings": 8192,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_positions_decoded_from_cos_sin_are_exact(rope, dtype):
    extra = {} if rope is None else {"rope_parameters": {"rope_theta": 500000.0, **rope}}
    model = tiny_model("llama", **extra)
    info = kvcompress.ModelInfo.from_model(model)
    positions = torch.cat(
        (torch.arange(0, 300), torch.randint(0, 131072, (500,), generator=torch.Generator().manual_seed(0)))
    )
    cos, sin = info.rope(positions)
    decoder = PositionDecoder(info.rope, info.head_dim)
    got = decoder.decode(cos.to(dtype)[None], sin.to(dtype)[None], positions[None] + 300)  # 300 of padding
    assert torch.equal(got[0].long(), positions)


def test_unrotate_inverts_rotate():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 50, 32, generator=g)
    angle = torch.rand(50, 16, generator=g) * 100
    cos, sin = 1.3 * angle.cos(), 1.3 * angle.sin()  # a RoPE with an attention scale
    torch.testing.assert_close(unrotate(rotate(x, cos, sin), cos, sin), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: keys normalised (k_norm) before RoPE
def test_full_rank_coefficients_give_back_the_keys_before_rope(arch):
    model = tiny_model(arch)
    raw = {}

    def keep(module, args, kwargs, out):  # the attention's keys before RoPE: k_proj, then k_norm if any
        hidden = kwargs["hidden_states"]
        k = module.k_proj(hidden).view(*hidden.shape[:-1], -1, module.head_dim)
        if hasattr(module, "k_norm"):
            k = module.k_norm(k)
        raw[module.layer_idx] = k.transpose(1, 2).detach()

    handles = [m.self_attn.register_forward_hook(keep, with_kwargs=True) for m in model.model.layers]
    cache = kvcompress.make_cache(full_rank(), model=model)
    with torch.no_grad():
        model(ids(40, batch=2), past_key_values=cache, use_cache=True)
    for handle in handles:
        handle.remove()
    for i, layer in enumerate(cache.layers):
        store = layer.store
        bs = store.basis
        back = torch.matmul(store.ck[:, :, : store.m].float(), bs.k_basis[None]) + bs.k_mean[None, :, None]
        torch.testing.assert_close(back, raw[i][:, :, store.s :], rtol=1e-4, atol=1e-4)
        assert torch.equal(store.positions()[0, 0].long(), torch.arange(40))
        # and rotated again at their positions they are the keys the model attended with
        torch.testing.assert_close(
            store.mid_keys(torch.float32, store.m - store.w),
            layer.keys[:, :, store.s : store.s + store.m - store.w].float(),
            rtol=1e-4,
            atol=1e-4,
        )
