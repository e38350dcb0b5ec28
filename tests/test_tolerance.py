"""The tolerance rule itself (properties/tolerance.py)."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.impls.naive import naive as NAIVE  # the dense reference, without loading the registry
from attnbench.properties import harness as H
from attnbench.properties import tolerance as T
from attnbench.properties.calibrate import old_allowed
from attnbench.properties.orderings import ORDERINGS
from attnbench.spec import Config, Spec


def _oracle(n: int = 8) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, n, dtype=torch.float64)


def test_identical_result_has_ratio_zero():
    o = _oracle().float().double()
    v = T.compare("out", o.float(), o, o.float(), "float32")
    assert v.ok and v.ratio == 0.0


def test_ratio_is_error_over_k_times_reference_error_plus_model():
    o = _oracle()
    ref = o + 1e-3
    floor = T.ULPS["out"] * T.EPS["float16"] * 1.0
    allowed = T.K["out"] * 1e-3 + floor
    just_in = o + 0.99 * allowed
    just_out = o + 1.01 * allowed
    assert T.compare("out", just_in, o, ref, "float16").ok
    v = T.compare("out", just_out, o, ref, "float16")
    assert not v.ok and v.ratio == pytest.approx(1.01, rel=1e-6)
    assert v.allowed == pytest.approx(allowed)


def test_model_alone_when_the_reference_is_exact():
    o = _oracle()
    floor = T.ULPS["dq"] * T.EPS["float64"]
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


def test_every_quantity_has_k_and_ulps_and_every_kernel_quantity_a_logit_gain():
    assert set(T.K) == set(T.ULPS) == {"out", "lse", "dq", "dk", "dv", "dbias", "dsinks", "dx", "dw"}
    assert set(T.LOGIT_GAIN) == {"out", "lse", "dq", "dk", "dv", "dbias", "dsinks"}
    assert set(T.EPS) == {"float64", "float32", "float16", "bfloat16", T.FP8} and T.EPS[T.FP8] == 2.0**-3
    assert all(k >= 1 for k in T.K.values())


def test_term_scales_see_through_cancellation():
    # One visible key: softmax is exactly 1, dq cancels to 0, yet its terms are not small.
    q = torch.randn(1, 1, 1, 4, dtype=torch.float64)
    k = 10 * torch.ones(1, 1, 1, 4, dtype=torch.float64)
    v = torch.tensor([[[[3.0, -5.0]]]], dtype=torch.float64)
    go = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    t, logits = T.term_magnitudes(q, k, v, go, Config(scale=0.5), None, None)
    assert t["out"] == pytest.approx(5.0)  # P |V| with P = 1
    assert t["dv"] == pytest.approx(1.0)  # P^T |dO|
    # A = P (|dP| + |D|) = 2 |dO . v| = 4; dq terms: scale * A * |k| = 0.5 * 4 * 10
    assert t["dq"] == pytest.approx(20.0)
    assert logits == pytest.approx(0.5 * 10 * float(q.abs().sum()))
    assert "dbias" not in t


def test_term_scales_ignore_masked_keys_and_sum_bias_to_its_shape():
    q = torch.ones(1, 2, 3, 4, dtype=torch.float64)
    k = torch.ones(1, 1, 5, 4, dtype=torch.float64)
    v = torch.ones(1, 1, 5, 2, dtype=torch.float64)
    v[0, 0, 4] = 1e6  # masked below: must not enter out's scale
    go = torch.ones(1, 2, 3, 2, dtype=torch.float64)
    kpm = torch.tensor([[True, True, True, True, False]])
    bias = torch.zeros(1, 1, 1, 5, dtype=torch.float64)
    t, logits = T.term_magnitudes(q, k, v, go, Config(scale=1.0), kpm, bias)
    assert t["out"] == pytest.approx(1.0)
    assert t["dbias"] > 0
    assert logits == pytest.approx(4.0)  # sum_d |q_d k_d|; the masked key and the zero bias add nothing


def test_logits_magnitude_counts_finite_bias_and_skips_masked_entries():
    q = torch.ones(1, 1, 2, 4, dtype=torch.float64)
    k = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    v = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    go = torch.ones(1, 1, 2, 2, dtype=torch.float64)
    bias = torch.tensor([[[[1.0, -math.inf, -3.0], [0.5, 0.5, 0.5]]]], dtype=torch.float64)
    _, logits = T.term_magnitudes(q, k, v, go, Config(scale=-0.25), None, bias)
    assert logits == pytest.approx(0.25 * 4 + 3.0)  # |scale| sum |q k| + |bias|; -inf is masked, not counted
    _, causal = T.term_magnitudes(q, k, v, go, Config(scale=-0.25, causal=True), None, bias)
    assert causal == pytest.approx(0.25 * 4 + 1.0)  # bottom-right causal hides key 2 from query 0


def test_scale_adds_the_logits_term_through_the_softmax_gain():
    # out, dv, dq, dk, dbias: a logit error eps * L moves each term by LOGIT_GAIN * eps * L
    for name in ("out", "dv", "dq", "dk", "dbias"):
        assert T.scale_of(name, 3.0, 100.0) == pytest.approx(3.0 + T.LOGIT_GAIN[name] / T.ULPS[name] * 100.0 * 3.0)
        assert T.scale_of(name, 3.0, 0.0) == 3.0
    # lse moves by the logit error itself, not by its terms' magnitude
    assert T.scale_of("lse", 50.0, 100.0) == pytest.approx(50.0 + T.LOGIT_GAIN["lse"] / T.ULPS["lse"] * 100.0)
    assert T.scale_of("out", 0.01, 0.0) == 1.0  # never below 1


SCALE_FIRST_ALARM = Spec(B=2, Hq=2, Hkv=1, Sq=14, D=32, magnitude=8.0, seed=66)


def test_scale_first_is_no_false_alarm_though_the_old_rule_raised_one():
    """Issue #16: a correct kernel computing (q * scale) @ k^T failed the old rule (3x naive's
    error + 16 eps of the terms) with error 3.05e-5 > 2.78e-5 allowed; the error model's logit
    term covers any order of the logit's roundings."""
    spec = SCALE_FIRST_ALARM
    inputs = H.fresh_inputs(spec)
    with torch.no_grad():
        got = H.call(ORDERINGS["scale_first"], inputs, spec.config())
        ref = H.run_impl(NAIVE, spec, inputs)
        want = H.run_oracle(spec, inputs)
    terms, _ = T.term_magnitudes(inputs.q, inputs.k, inputs.v, inputs.grad_out, spec.config(), None, None)
    error, ref_error = T.max_error(got.out, want.out)[0], T.max_error(ref.out, want.out)[0]
    assert error == pytest.approx(3.05e-5, rel=0.02) and ref_error == pytest.approx(7.44e-6, rel=0.02)
    assert error > old_allowed("out", ref_error, "float32", T.magnitude(want.out), terms["out"])  # the old alarm
    verdict = T.compare("out", got.out, want.out, ref.out, "float32", H.scales_of(spec, inputs)["out"])
    assert verdict.ok, verdict.message()


def test_the_model_alone_passes_a_correct_ordering_against_an_exact_reference():
    """The allowance does not rest on naive's luck: with a reference that happens to be exact
    (error 0), the error model alone passes every correct ordering on a peaked softmax."""
    spec = SCALE_FIRST_ALARM
    inputs = H.fresh_inputs(spec, grad=True)
    want = H.run_oracle(spec, inputs, grad=True)
    scales = H.scales_of(spec, inputs)
    for name, fn in ORDERINGS.items():
        got = H.call(fn, H.clone_inputs(inputs), spec.config(), grad=True)
        for q in ("out", "lse", "dq", "dk", "dv"):
            verdict = T.compare(q, got.get(q), want.get(q), want.get(q), "float32", scales[q])
            assert verdict.ok, f"{name}: {verdict.message()}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_every_correct_ordering_passes_pinned_edge_specs(dtype):
    """A few edges per dtype (the calibration draws thousands: properties/calibrate.py)."""
    specs = [
        Spec(Sq=9, Sk=5, causal=True, window=(2, 0), magnitude=8.0),
        Spec(B=2, Hq=4, Hkv=2, Sq=17, key_lengths=(17, 0), bias="full", bias_neginf=0.2, magnitude=3.0),
        Spec(Sq=1, Sk=24, D=64, scale=2.0, magnitude=8.0),
    ]
    for spec in (s.replace(dtype=dtype) for s in specs):
        inputs = H.fresh_inputs(spec, NAIVE, grad=True)
        want = H.run_oracle(spec, inputs, grad=True)
        ref = H.run_impl(NAIVE, spec, H.clone_inputs(inputs), grad=True)
        scales = H.scales_of(spec, inputs)
        for name, fn in ORDERINGS.items():
            got = H.call(fn, H.clone_inputs(inputs), spec.config(), grad=True)
            for q in ["out", "lse", *sorted(want.grads)]:
                verdict = T.compare(q, got.get(q), want.get(q), ref.get(q), dtype, scales.get(q))
                assert verdict.ok, f"{name} on {spec.short()}: {verdict.message()}"


def test_the_model_still_catches_a_wrong_scale():
    """Loose enough for every order of operations, yet a kernel that uses 1/sqrt(Dv) for the
    default scale is far outside it."""
    spec = Spec(Sq=12, D=16, Dv=32, magnitude=3.0)
    inputs = H.fresh_inputs(spec)
    cfg = spec.config()
    with torch.no_grad():
        wrong = ORDERINGS["scale_first"](inputs.q, inputs.k, inputs.v, Config(scale=32**-0.5))
        ref = H.run_impl(NAIVE, spec, inputs)
        want = H.run_oracle(spec, inputs)
    assert cfg.scale == pytest.approx(16**-0.5)
    verdict = T.compare("out", wrong[0], want.out, ref.out, "float32", H.scales_of(spec, inputs)["out"])
    assert verdict.ratio > 10


def test_fp8_orderings_pass_and_the_descale_in_p_bug_is_caught():
    """fp8's model (tolerance.fp8_scales): every fp8 ordering passes pinned edges (the calibration
    draws hundreds: calibrate --fp8), and v_descale folded into P before its e4m3 rounding does not."""
    from attnbench.properties.orderings import FP8_ORDERINGS
    from attnbench.zoo.fp8_descale_in_p import fp8_descale_in_p

    specs = [
        Spec(B=2, Hq=4, Hkv=2, Sq=9, Sk=40, D=32, causal=True, key_lengths=(40, 0), magnitude=8.0),
        Spec(Sq=1, Sk=300, D=64, scale=0.0),  # uniform over 300 keys: every probability e4m3-subnormal
        Spec(Sq=24, D=64, Dv=16, magnitude=3.0, seed=5),
        # logits of magnitude ~1: the fp8 accumulation term (fp8_logit_eps) stays small next to
        # the broken kernel's error (at magnitude 3 and 8 it covers it: the property's exact
        # v_descale doubling catches the member there)
        Spec(Sq=24, Sk=256, D=64, seed=5),
    ]
    caught = 0
    for spec in (s.replace(dtype="bfloat16", fp8=True) for s in specs):
        inputs = H.fresh_inputs(spec)
        want = H.run_oracle(spec, inputs)
        ref = H.run_impl(NAIVE, spec, H.clone_inputs(inputs))
        scales = H.scales_of(spec, inputs)
        for name, fn in FP8_ORDERINGS.items():
            got = H.call(fn, H.clone_inputs(inputs), spec.config())
            for q in ("out", "lse"):
                verdict = T.compare(q, got.get(q), want.get(q), ref.get(q), T.FP8, scales[q])
                assert verdict.ok, f"{name} on {spec.short()}: {verdict.message()}"
        bad = H.call(fp8_descale_in_p.fn, H.clone_inputs(inputs), spec.config())
        caught += not T.compare("out", bad.out, want.out, ref.out, T.FP8, scales["out"]).ok
    assert caught >= 2
    with pytest.raises(ValueError, match="fp8 comparison needs"):
        T.compare("out", want.out, want.out, ref.out, T.FP8)
