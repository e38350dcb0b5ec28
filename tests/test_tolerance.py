"""The tolerance rule itself (properties/tolerance.py)."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.properties import tolerance as T
from attnbench.spec import Config


def _oracle(n: int = 8) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64)


def test_identical_result_has_ratio_zero():
    o = _oracle().float().double()
    v = T.compare("out", o.float(), o, o.float(), "float32")
    assert v.ok and v.ratio == 0.0


def test_ratio_is_error_over_k_times_reference_error_plus_floor():
    o = _oracle()
    ref = o + 1e-3
    floor = T.FLOOR["out"] * T.FLOOR_ULPS["float16"] * T.EPS["float16"] * 1.0
    allowed = T.K["out"] * 1e-3 + floor
    just_in = o + 0.99 * allowed
    just_out = o + 1.01 * allowed
    assert T.compare("out", just_in, o, ref, "float16").ok
    v = T.compare("out", just_out, o, ref, "float16")
    assert not v.ok and v.ratio == pytest.approx(1.01, rel=1e-6)
    assert v.allowed == pytest.approx(allowed)


def test_floor_alone_when_the_reference_is_exact():
    o = _oracle()
    floor = T.FLOOR["dq"] * T.FLOOR_ULPS["float64"] * T.EPS["float64"]
    assert T.compare("dq", o + 0.5 * floor, o, o, "float64").ok
    assert not T.compare("dq", o + 2 * floor, o, o, "float64").ok


def test_floor_scales_with_magnitude_and_dtype():
    assert T.allowed("out", 0.0, "float32", 1000.0) == pytest.approx(1000 * T.allowed("out", 0.0, "float32", 1.0))
    assert T.allowed("out", 0.0, "float32", 0.001) == T.allowed("out", 0.0, "float32", 1.0)  # never below 1
    assert T.allowed("out", 0.0, "bfloat16") > T.allowed("out", 0.0, "float16") > T.allowed("out", 0.0, "float32")
    big = _oracle() * 1000
    err = big + 0.5 * T.allowed("out", 0.0, "float32", 1000.0)
    assert T.compare("out", err, big, big, "float32").ok  # magnitude from the oracle itself


def test_scale_argument_widens_only_upwards():
    o = _oracle()
    wide = T.compare("dq", o + 1e-3, o, o, "float16", scale=100.0)
    narrow = T.compare("dq", o + 1e-3, o, o, "float16", scale=1e-9)
    assert wide.allowed > narrow.allowed == T.allowed("dq", 0.0, "float16", 1.0)


def test_nan_always_fails():
    o = _oracle()
    bad = o.clone()
    bad[3] = math.nan
    v = T.compare("out", bad, o, o, "float32")
    assert not v.ok and v.ratio == math.inf
    assert "NaN" in v.message()
    with pytest.raises(AssertionError, match="NaN"):
        v.require()


def test_nan_fails_even_where_the_oracle_is_nan():
    o = _oracle()
    o[0] = math.nan
    error, why = T.max_error(o.clone(), o)
    assert error == math.inf and "NaN" in why


def test_infinities_must_match_exactly():
    o = _oracle()
    o[2] = -math.inf  # an empty row's lse
    assert T.compare("lse", o.clone(), o, o, "float32").ok
    finite_there = o.clone()
    finite_there[2] = -1e30
    assert not T.compare("lse", finite_there, o, o, "float32").ok
    wrong_sign = o.clone()
    wrong_sign[2] = math.inf
    assert not T.compare("lse", wrong_sign, o, o, "float32").ok
    inf_where_finite = o.clone()
    inf_where_finite[5] = math.inf
    v = T.compare("lse", inf_where_finite, o, o, "float32")
    assert not v.ok and "non-finite" in v.detail


def test_shape_mismatch_fails():
    o = _oracle()
    v = T.compare("out", o[:-1], o, o, "float32")
    assert not v.ok and "shape" in v.detail


def test_reference_that_is_itself_non_finite_is_out_of_domain():
    o = _oracle()
    ref = o.clone()
    ref[1] = math.nan
    with pytest.raises(AssertionError, match="reference implementation itself"):
        T.compare("out", o, o, ref, "float32")


def test_bad_arguments_name_the_field():
    o = _oracle()
    with pytest.raises(ValueError, match="quantity"):
        T.compare("dz", o, o, o, "float32")
    with pytest.raises(ValueError, match="dtype"):
        T.compare("out", o, o, o, "float8")
    with pytest.raises(ValueError, match="reference_error"):
        T.allowed("out", -1.0, "float32")
    with pytest.raises(TypeError, match="actual"):
        T.compare("out", [0.0], o, o, "float32")


def test_compare_runs_allows_twice_the_rule():
    a = _oracle()
    limit = 2 * T.allowed("out", 1e-3, "float16", 1.0)
    assert T.compare_runs("out", a + 0.99 * limit, a, 1e-3, "float16").ok
    assert not T.compare_runs("out", a + 1.01 * limit, a, 1e-3, "float16").ok
    nan = a.clone()
    nan[0] = math.nan
    assert not T.compare_runs("out", a, nan, 1e-3, "float16").ok


def test_every_quantity_has_k_and_floor_and_every_dtype_a_floor():
    assert set(T.K) == set(T.FLOOR) == {"out", "lse", "dq", "dk", "dv", "dbias", "dx", "dw"}
    assert set(T.FLOOR_ULPS) == set(T.EPS) == {"float64", "float32", "float16", "bfloat16"}
    assert all(k >= 1 for k in T.K.values())


def test_term_scales_see_through_cancellation():
    # One visible key: softmax is exactly 1, dq cancels to 0, yet its terms are not small.
    q = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    k = 10 * torch.ones(1, 1, 1, 4, dtype=torch.float64)
    v = torch.tensor([[[[3.0, -5.0]]]], dtype=torch.float64)
    go = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    s = T.term_scales(q, k, v, go, Config(scale=0.5), None, None)
    assert s["out"] == pytest.approx(5.0)  # P |V| with P = 1
    assert s["dv"] == pytest.approx(1.0)  # P^T |dO|
    # A = P (|dP| + |D|) = 2 |dO . v| = 4; dq terms: scale * A * |k| = 0.5 * 4 * 10
    assert s["dq"] == pytest.approx(20.0)
    assert "dbias" not in s


def test_term_scales_ignore_masked_keys_and_sum_bias_to_its_shape():
    q = torch.ones(1, 2, 3, 4, dtype=torch.float64)
    k = torch.ones(1, 1, 5, 4, dtype=torch.float64)
    v = torch.ones(1, 1, 5, 2, dtype=torch.float64)
    v[0, 0, 4] = 1e6  # masked below: must not enter out's scale
    go = torch.ones(1, 2, 3, 2, dtype=torch.float64)
    kpm = torch.tensor([[True, True, True, True, False]])
    bias = torch.zeros(1, 1, 1, 5, dtype=torch.float64)
    s = T.term_scales(q, k, v, go, Config(scale=1.0), kpm, bias)
    assert s["out"] == pytest.approx(1.0)
    assert s["dbias"] > 0
