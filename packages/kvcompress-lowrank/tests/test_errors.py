"""Bad input gets a clear one-line error naming the parameter, its value and what is allowed."""

from __future__ import annotations

import pytest
from conftest import HEAD_DIM, ids, tiny_model

import kvcompress
from kvcompress import _kernels


@pytest.mark.parametrize(
    "spec,match",
    [
        ("lowrank(k_rank=0)", r"parameter 'k_rank' got 0; allowed: int >= 1"),
        ("lowrank(energy=0)", r"parameter 'energy' got 0.0; allowed: float > 0.0 and <= 1.0"),
        ("lowrank(v_energy=1.5)", r"parameter 'v_energy' got 1.5; allowed: float > 0.0 and <= 1.0"),
        ("lowrank(coeff_bits=2)", r"parameter 'coeff_bits' got 2; allowed: one of 4, 8 \(or None\)"),
        ("lowrank(basis=svd)", r"parameter 'basis' got 'svd'; allowed: one of 'pca', 'random'"),
        ("lowrank(window=-1)", r"parameter 'window' got -1; allowed: int >= 0"),
        ("lowrank(rank=3)", r"unknown parameter 'rank'"),
        ("lowrank+quant(bits=4)", r"at most one representation policy, got 'lowrank' and 'quant'"),
    ],
)
def test_parameters_are_checked_when_the_spec_is_read(spec, match):
    if "quant" in spec and "quant" not in kvcompress.get_registry().policies:
        pytest.skip("kvcompress-quant is not installed")
    with pytest.raises((ValueError, TypeError), match=match):
        kvcompress.validate_spec(spec)


def test_a_rank_above_head_dim_is_refused_at_setup():
    with pytest.raises(ValueError, match=rf"parameter 'k_rank' is 40; allowed: 1..head_dim \({HEAD_DIM}\)"):
        kvcompress.make_cache("lowrank(basis=random,k_rank=40,v_rank=8)", model=tiny_model("llama"))


def test_no_calibration_for_the_model_says_how_to_get_one():
    with pytest.raises(
        kvcompress.WeightsError, match="no calibration ships for this model .*kvcompress-lowrank calibrate"
    ):
        kvcompress.make_cache("lowrank", model=tiny_model("llama"))
    with pytest.raises(
        ValueError, match="basis='random' without a calibration needs parameters 'k_rank' and 'v_rank'"
    ):
        kvcompress.make_cache("lowrank(basis=random,k_rank=8)", model=tiny_model("llama"))


def test_a_missing_file_and_a_missing_model():
    with pytest.raises(kvcompress.WeightsError, match="parameter 'calibration'.*does not exist"):
        kvcompress.make_cache("lowrank(calibration='/no/such.safetensors')", model=tiny_model("llama"))
    with pytest.raises(kvcompress.ModelRequiredError, match="pass the model"):
        kvcompress.make_cache("lowrank(basis=random,k_rank=8,v_rank=8)")


@pytest.mark.skipif(_kernels.AVAILABLE, reason="Triton is installed here: kernel='triton' is allowed")
def test_kernel_triton_without_triton():
    with pytest.raises(ValueError, match="parameter 'kernel' is 'triton' but Triton is not installed"):
        kvcompress.validate_spec("lowrank(kernel=triton)")


def test_partial_rotary_is_refused():
    model = tiny_model("phi3", partial_rotary_factor=0.5)
    cache = kvcompress.make_cache("lowrank(basis=random,k_rank=8,v_rank=8)", model=model)
    with pytest.raises(ValueError, match="partial rotary"):
        model(ids(8), past_key_values=cache, use_cache=True)
