"""Bad parameters fail at construction with the parameter, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch

import kvcompress
from kvcompress_quant import Quant, kernels


@pytest.mark.parametrize("spec,pattern", [
    ("quant(bits=3)", r"quant: parameter 'bits' got 3; allowed: one of 8, 4, 2"),
    ("quant(window=-1)", r"quant: parameter 'window' got -1; allowed: int >= 0"),
    ("quant(sink=-2)", r"quant: parameter 'sink' got -2; allowed: int >= 0"),
    ("quant(group_size=0)", r"quant: parameter 'group_size' got 0; allowed: int >= 1"),
    ("quant(key_axis=rows)", r"quant: parameter 'key_axis' got 'rows'; allowed: one of 'channel', 'token'"),
    ("quant(group_size=-4)", r"quant: parameter 'group_size' got -4; allowed: int >= 1 \(or None\)"),
    ("quant(channel_group=0)", r"quant: parameter 'channel_group' got 0; allowed: int >= 1 \(or None\)"),
    ("quant(nbits=4)", r"quant: unknown parameter 'nbits'; allowed parameters: bits, group_size"),
])
def test_bad_parameters(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        kvcompress.make_cache(spec)


def test_bits_must_be_int():
    with pytest.raises(TypeError, match=r"parameter 'bits' got '4' of type str"):
        Quant(bits="4")


@pytest.mark.parametrize(("spec", "name", "value"), [
    ("quant(group_size=12)", "group_size", 12),
    ("quant(group_size=8,channel_group=6)", "channel_group", 6),
])
def test_channel_groups_not_dividing_head_dim_fail_on_first_use(spec, name, value):
    from conftest import tiny_model

    model = tiny_model()  # head_dim 16
    cache = kvcompress.make_cache(spec, model=model)
    with pytest.raises(ValueError, match=rf"'{name}' is {value}, which does not divide head_dim 16; allowed: "
                                         r"a divisor of 16 \(1, 2, 4, 8, 16\) or a multiple of 16"):
        model(torch.tensor([[1, 2, 3]]), past_key_values=cache)


def test_rotate_must_be_bool():
    with pytest.raises(TypeError, match=r"quant: parameter 'rotate' got 'random' of type str; allowed: bool"):
        kvcompress.make_cache("quant(rotate=random)")


@pytest.mark.skipif(kernels.AVAILABLE, reason="Triton is installed here")
def test_kernel_triton_without_triton_is_a_clear_error():
    with pytest.raises(ValueError, match=r"parameter 'kernel' is 'triton' but Triton cannot be used here"):
        Quant(kernel="triton")
