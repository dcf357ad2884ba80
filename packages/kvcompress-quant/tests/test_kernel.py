"""The fused Triton decode kernel against dequantize-then-sdpa (GPU only)."""

from __future__ import annotations

import pytest
import torch

from kvcompress._kernels import resident_programs
from kvcompress_quant import QuantStore, kernels

pytestmark = pytest.mark.skipif(
    not (kernels.AVAILABLE and torch.cuda.is_available()),
    reason="the fused decode kernel needs Triton and a CUDA GPU "
    + ("(no CUDA device here)" if kernels.AVAILABLE else f"({kernels.UNAVAILABLE_REASON})"),
)


def _store(bits, key_axis, value_axis, b=2, h=4, d=128, n=3000, dtype=torch.bfloat16, group=64,
           rotate=False, channel_group=None):
    store = QuantStore(bits, group, sink=4, window=128, key_axis=key_axis, value_axis=value_axis,
                       rotate=rotate, channel_group=channel_group)
    g = torch.Generator(device="cuda").manual_seed(bits)
    for q in (n - 70, 1, 1, 68):
        k = torch.randn(b, h, q, d, device="cuda", generator=g, dtype=dtype)
        k[..., 7] *= 8  # an outlier channel
        store.append(k, torch.randn(b, h, q, d, device="cuda", generator=g, dtype=dtype))
    store._fresh = None
    return store


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("axes", [("channel", "token"), ("token", "token"), ("token", "channel")])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_kernel_matches_dequantize_then_sdpa(bits, axes, mask_kind):
    store = _store(bits, *axes)
    b, n = store.b, store.length
    query = torch.randn(b, 16, 1, 128, device="cuda", dtype=torch.bfloat16)
    mask = None
    if mask_kind:
        valid = torch.ones(b, n, dtype=torch.bool, device="cuda")
        valid[1, :1000] = False  # left padding of row 1
        valid[0, 2500] = False
        mask = valid[:, None, None, :]
        if mask_kind == "float":
            mask = torch.zeros(mask.shape, dtype=torch.bfloat16, device="cuda").masked_fill(
                ~mask, torch.finfo(torch.bfloat16).min)
    out = kernels.decode_attention(store, query, mask, 128**-0.5)
    ref = kernels.reference_attention(store, query, mask, 128**-0.5)
    assert out.shape == (b, 1, 16, 128)
    assert torch.isfinite(out).all()
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, rel


@pytest.mark.parametrize("merge_chunk", [0, 16, 4])
@pytest.mark.parametrize("conv", [0, 2])
def test_merge_and_code_conversion_modes_agree(monkeypatch, merge_chunk, conv):
    """The merge in the last split (chunks of any size) or as a second launch, and either decode of the
    packed codes: the same output, over more splits than one merge chunk."""
    monkeypatch.setattr(kernels, "MERGE_CHUNK", merge_chunk)
    monkeypatch.setattr(kernels, "CONV", conv)
    store = _store(4, "channel", "token", b=1, h=2, n=20000)
    query = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the second launch reuses the arrival counts the first reset
        out = kernels.decode_attention(store, query, None, 128**-0.5)
        ref = kernels.reference_attention(store, query, None, 128**-0.5)
        assert float((out.float() - ref).norm() / ref.norm()) < 1e-2
        assert store.launch_cache["plan"][1].n_mid > max(merge_chunk, 1)


@pytest.mark.parametrize("rotate", [True, False])
def test_int2_defaults_take_the_folded_path_in_tiles_of_one_group(rotate):
    """int2's defaults (keys in groups of 16 tokens, values in groups of 64 channels): the folded path runs
    16-token tiles, each holding one key group, and matches dequantize-then-sdpa."""
    store = _store(2, "channel", "token", group=16, channel_group=64, rotate=rotate)
    query = torch.randn(store.b, 16, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = store.attend(query, None, 128**-0.5)
    plan = store.launch_cache["plan"][1]
    assert plan.consts["PIECES"] and plan.consts["BLOCK_N"] == 16 and plan.per % 16 == 0
    ref = kernels.reference_attention(store, query, None, 128**-0.5)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, rel


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 64), (2, 32), (2, 16)])
@pytest.mark.parametrize("axes", [("channel", "token"), ("token", "channel")])
def test_rotated_store_attends_in_the_rotated_basis(bits, group, axes):
    """attend() rotates the query and the full-precision slots in, and the output back out."""
    store = _store(bits, *axes, group=group, rotate=True)
    query = torch.randn(store.b, 16, 1, 128, device="cuda", dtype=torch.bfloat16)
    out = store.attend(query, None, 128**-0.5)
    ref = kernels.reference_attention(store, query, None, 128**-0.5)
    assert out.shape == (store.b, 1, 16, 128)
    rel = float((out.float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, rel


def test_kernel_inside_a_model_matches_torch_path():
    from conftest import tiny_model

    import kvcompress

    model = tiny_model(hidden_size=256, num_attention_heads=4, num_key_value_heads=2)
    model = model.cuda().to(torch.bfloat16)
    ids = torch.randint(1, 96, (2, 300), device="cuda")
    logits = []
    for kernel in ("triton", "torch"):
        cache = kvcompress.make_cache(f"quant(bits=4,kernel={kernel})", model=model)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        logits.append(torch.stack(out.logits).float())
    rel = float((logits[0] - logits[1]).norm() / logits[1].norm())
    assert rel < 2e-2, rel


def test_splits_fill_what_the_compiled_kernel_runs_at_once():
    store = _store(4, "channel", "token", b=1, h=2, n=20000)
    query = torch.randn(1, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):  # the first call compiles; the second plans with the compiled kernel's occupancy
        kernels.decode_attention(store, query, None, 128**-0.5)
    plan = store.launch_cache["plan"][1]
    resident = resident_programs(plan.key, store.device)
    assert resident is not None and resident >= 1
    assert plan.n_mid == kernels._splits(store.m, 2, resident * kernels._sm_count(store.device))[0]


@pytest.mark.parametrize("observe", [False, True])
def test_lengths_read_from_the_device_over_a_larger_held_middle(observe):
    """A static layout's launch: lengths from a device tensor, splits over the middle's whole capacity (the
    programs past its length add nothing); the same output and observation as the launch from host counts,
    also replayed as a CUDA graph after the store grew."""
    from kvcompress.store import Accumulate

    store = _store(4, "channel", "token", b=2, h=4, n=3000)
    store._alloc_mid(store.m + 4096)  # room the layout holds for tokens still to come
    query = torch.randn(store.b, 16, 1, 128, device="cuda", dtype=torch.bfloat16)
    n = store.length
    bias = torch.zeros(store.b, store.h, n + 64, device="cuda")
    lens = torch.tensor([store.sink + store.w, store.m], device="cuda")

    def run(lens_arg):
        acc = torch.zeros(store.b, store.h, n + 64, device="cuda") if observe else None
        out = kernels.decode_attention(store, query, None, 128**-0.5, bias,
                                       Accumulate(acc, "sum") if observe else None, lens=lens_arg)
        return out, acc

    want, want_acc = run(None)
    got, got_acc = run(lens)
    torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-2)
    if observe:
        torch.testing.assert_close(got_acc, want_acc, atol=1e-4, rtol=1e-3)
    graph = torch.cuda.CUDAGraph()
    static_out = {}
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(lens)
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        static_out["out"] = kernels.decode_attention(store, query, None, 128**-0.5, bias, None, lens=lens)
    k = torch.randn(store.b, store.h, 1, 128, device="cuda", dtype=torch.bfloat16)
    store.fk[:, :, store.sink + store.w] = k[:, :, 0]  # one more tail token, as a layout's append writes it
    store.fv[:, :, store.sink + store.w] = k[:, :, 0]
    store.w += 1
    lens[0] += 1
    graph.replay()
    ref = kernels.reference_attention(store, query, None, 128**-0.5)
    rel = float((static_out["out"].float() - ref.float()).norm() / ref.float().norm())
    assert rel < 1e-2, rel
