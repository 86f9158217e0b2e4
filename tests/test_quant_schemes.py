"""Schemes: validation, defaults that are the fast portable CPU path, round trips, byte estimates."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.errors import EdgeMoEError
from edgemoe.quant.schemes import TOLERANCES, Precision, QuantError, Scheme, Tolerance, bytes_for


def test_defaults_are_the_fast_cpu_formats() -> None:
    int4 = Scheme.default("int4")
    assert (int4.block_size, int4.symmetric, int4.accuracy_level, int4.target) == (128, True, 4, "cpu")
    assert int4.label == "int4-b128-sym-acc4@cpu" and Scheme.default("int8").label == "int8-pc-rr@cpu"
    assert QuantError.__mro__[1] is EdgeMoEError


def test_compute_dtype() -> None:
    assert Scheme.default("fp16").compute_dtype == np.float16
    assert Scheme.default("int4").compute_dtype == np.float32
    assert Scheme.default("int4", target="cuda").compute_dtype == np.float16  # fp16 activations for CUDA


def test_invalid_schemes_are_errors() -> None:
    with pytest.raises(QuantError, match="no CUDA kernel"):
        Scheme.default("int8", target="cuda")
    with pytest.raises(QuantError, match="block_size"):
        Scheme(Precision.INT4, block_size=100)
    with pytest.raises(QuantError, match="unknown target"):
        Scheme.default("fp32", target="tpu")
    with pytest.raises(QuantError, match="unknown precision 'int2'"):
        Scheme.default("int2")


@pytest.mark.parametrize("scheme", [Scheme.default(p) for p in Precision] + [Scheme(Precision.INT4, symmetric=False)])
def test_dict_round_trip(scheme: Scheme) -> None:
    assert Scheme.from_dict(scheme.to_dict()) == scheme
    assert isinstance(scheme.to_dict()["precision"], str)


def test_bytes_for_stablelm_expert_weight() -> None:
    shape = (5632, 2048)  # up_proj [out, in]
    assert bytes_for(shape, Scheme.default("fp32")) == 5632 * 2048 * 4
    assert bytes_for(shape, Scheme.default("fp16")) == 5632 * 2048 * 2
    assert bytes_for(shape, Scheme.default("int8")) == 5632 * 2048 + 5632 * 5
    assert bytes_for(shape, Scheme(Precision.INT8, per_channel=False)) == 5632 * 2048 + 5
    # 16 blocks of 128 per column: 64 B packed + a 4 B scale each -> 4.25 bits per weight.
    assert bytes_for(shape, Scheme.default("int4")) == 5632 * 16 * (64 + 4)
    assert bytes_for(shape, Scheme(Precision.INT4, symmetric=False)) == 5632 * 16 * 68 + 5632 * 8
    assert bytes_for((5632,), Scheme.default("int4")) == 5632 * 4  # biases stay in the compute dtype


def test_tolerance_reports_relative_errors() -> None:
    ref = np.array([[1.0, -2.0], [3.0, 4.0]])
    rms, mx = Tolerance(0.1, 0.1).errors(ref * 1.01, ref)
    assert rms == pytest.approx(0.01) and mx == pytest.approx(0.01)
    Tolerance(0.02, 0.02).check(ref * 1.01, ref)
    with pytest.raises(QuantError, match="relative rms"):
        Tolerance(0.005, 0.5).check(ref * 1.01, ref, what="x")
    assert list(TOLERANCES) == list(Precision)  # every precision declares one
    assert [TOLERANCES[p].rel_rms for p in Precision] == sorted(TOLERANCES[p].rel_rms for p in Precision)
