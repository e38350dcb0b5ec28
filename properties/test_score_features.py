"""The score features (oracles/CONTRACT.md, "Score features"): soft cap, ALiBi slopes, sinks.

Agreement with the oracle on specs that use every feature the impl declares (the general
agreement properties draw each one only now and then), and metamorphic relations between runs
of the implementation itself: a soft cap far above every logit, zero ALiBi slopes and very
negative sinks change nothing; a sink shrinks each row's output by its share of the
denominator; ALiBi slopes equal the same bias materialized. Small problems only: the features
act per logit and per row, and every run of the Triton interpreter costs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.masks import alibi_bias
from attnbench.properties.harness import (
    check,
    check_runs,
    clone_inputs,
    fresh_inputs,
    quantities,
    reference_impl,
    references,
    require,
    run_impl,
    run_oracle,
    scales_of,
    wants_grad,
    with_tensors,
)
from attnbench.properties.strategies import Caps, Pinned, draw_spec, pinned
from attnbench.spec import Inputs, Spec

pytestmark = pytest.mark.variant("dense")  # the local variants run the same kernels

SCORE_FEATURES = ("softcap", "alibi", "sinks")
# Small problems: the features act per logit and per row; sizes are the general properties' job.
# One 16-row tile in the Triton interpreter: tests/test_impls_triton.py has multi-tile cases with them.
SMALL = Caps(batch=2, heads=4, length=17, head_dims=(16, 32, 24, 8), kv_heads=2)
NO_SINK = -1e4  # exp(-1e4 - m) is 0 in every dtype: no share of any denominator


def neutral_cap(spec: Spec, inputs: Inputs) -> float:
    """A soft cap that changes no logit beyond the dtype's rounding, and no more than that:
    cap * tanh(s / cap) = s (1 - s^2 / (3 cap^2) + ...), so cap = 4 max|s| / sqrt(eps) keeps the
    change under eps / 48. A larger cap (1e12) would fail kernels whose tanh is accurate to eps
    absolute, such as 2 sigmoid(2y) - 1 (vLLM's Triton kernels write it so): their logits carry
    cap x eps, which at any cap a model uses is far inside the tolerance. max|s| is bounded by
    scale x max |q_i| x max |k_j| (x the fp8 descales); fp8 takes bfloat16's eps, its output's."""
    q, k = inputs.q.double(), inputs.k.double()
    if q.numel() == 0 or k.numel() == 0:
        return 1.0
    bound = abs(spec.config().scale) * float(q.norm(dim=-1).max()) * float(k.norm(dim=-1).max())
    for descale in (inputs.q_descale, inputs.k_descale):
        if descale is not None:
            bound *= float(descale.double().abs().max())
    eps = torch.finfo(torch.bfloat16 if spec.fp8 else spec.torch_dtype).eps
    return max(1.0, 4.0 * bound / eps**0.5)


def _declared(impl) -> tuple[str, ...]:
    return tuple(f for f in SCORE_FEATURES if f in impl.features)


@given(data=st.data())
@pinned(
    Pinned(Spec(Sq=6, causal=True, softcap=2.5, magnitude=3.0), "softcap saturates; masked keys stay masked"),
    Pinned(Spec(B=2, Sq=4, key_lengths=(4, 1), softcap=1.0), "softcap with padding: never a logit of -cap"),
    Pinned(Spec(Hq=4, Sq=6, Sk=9, causal=True, alibi=True), "ALiBi: bottom-right distances, per-head slopes"),
    Pinned(Spec(Hq=3, Sq=5, align="top_left", alibi=True, seed=2), "ALiBi top-left: |i - j|"),
    Pinned(Spec(Hq=2, Sq=4, Sk=700, alibi=True, seed=1),
           "ALiBi past distance 256, where bfloat16 holds only even integers; the standard slopes"),
    Pinned(Spec(Hq=12, Hkv=3, Sq=3, Sk=9, alibi=True, sinks=True, seed=1),
           "12 query heads: slopes and sinks per query head past a fixed 8-entry array"),
    Pinned(Spec(Hq=2, Sq=2, Sk=1030, D=16, alibi=True, softcap=2.5, seed=1),
           "1030 keys: a long-context path (forward and backward) keeps ALiBi and the cap"),
    Pinned(Spec(B=2, Hq=2, Sq=3, key_lengths=(0, 3), sinks=True), "an empty row with a sink: out 0, lse = sink"),
    Pinned(Spec(Hq=2, Sq=5, causal=True, sinks=True, seed=3), "sinks: the denominator only, dsink"),
    Pinned(Spec(Hq=2, Sq=20, Sk=20, sinks=True, seed=0), "dsink sums every query row, past a 16-row tile"),
    Pinned(Spec(Hq=2, Sq=5, dtype="bfloat16", sinks=True, sinks_float32=True, seed=2),
           "float32 sinks with bfloat16 q: the call takes both dtypes, dsinks in float32"),
)
def test_score_features_match_oracle(impl, device, measure, data):
    """Every score feature the impl declares, on every spec (the general agreement properties
    draw each only now and then): out, lse and the gradients (the sinks' included) against the
    oracle."""
    features = _declared(impl)
    if not features:
        pytest.skip(f"{impl.key} declares none of {', '.join(SCORE_FEATURES)}")
    use = () if isinstance(data, Pinned) else features  # a pin names the features it pins
    spec = draw_spec(data, impl, device, use=use, caps=SMALL)
    if spec is None:
        return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    got = run_impl(impl, spec, inputs, grad=grad)
    ref = run_impl(reference_impl(impl), spec, clone_inputs(inputs), grad=grad)
    want = run_oracle(spec, inputs, grad=grad)
    scales = scales_of(spec, inputs)
    check(measure, "out", got.out, want.out, ref.out, spec.dtype, scales)
    if got.lse is not None and ref.lse is not None:
        check(measure, "lse", got.lse, want.lse, ref.lse, spec.dtype, scales)
    for name in sorted(want.grads):
        check(measure, name, got.grads[name], want.grads[name], ref.grads[name], spec.dtype, scales)


def _compare(measure, impl, spec, inputs, a, b, grad: bool, names=None) -> None:
    """Run a against run b of the same impl: within twice the rule's allowance of each other."""
    errors, scales = references(spec, inputs, impl, grad=grad)
    for name in names or quantities(a, errors, grad):
        check_runs(measure, name, a.get(name), b.get(name), impl, errors[name], spec.dtype, scales[name], exact=False)


@given(data=st.data())
def test_neutral_score_features_change_nothing(impl, device, measure, data):
    """A soft cap far above every logit (neutral_cap), ALiBi slopes of 0 and sinks of -1e4 (each
    that the impl declares) give what none of them gives; the sinks' gradient is exactly 0."""
    features = _declared(impl)
    if not features:
        pytest.skip(f"{impl.key} declares none of {', '.join(SCORE_FEATURES)}")
    spec = draw_spec(data, impl, device, forbid=SCORE_FEATURES, caps=SMALL)
    if spec is None:
        return
    # the neutral cap comes from the inputs, which come after grad: coverage never depends on its value
    grad = wants_grad(impl, spec, spec.replace(softcap=1.0) if "softcap" in features else spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    neutral = spec.replace(softcap=neutral_cap(spec, inputs)) if "softcap" in features else spec
    if not impl.covers(neutral):
        return
    moved = clone_inputs(inputs)
    if "alibi" in features:
        moved.alibi_slopes = torch.zeros(spec.Hq, dtype=torch.float32, device=inputs.q.device)
    if "sinks" in features:
        moved.sinks = torch.full((spec.Hq,), NO_SINK, dtype=spec.torch_dtype, device=inputs.q.device)
        moved.sinks.requires_grad_(grad)
    a = run_impl(impl, neutral, moved, grad=grad)
    b = run_impl(impl, spec, inputs, grad=grad)
    if b.lse is not None and moved.sinks is not None:  # an empty row's lse is its sink (CONTRACT.md)
        sink = moved.sinks.detach().to(b.lse.dtype).view(1, -1, 1)  # NO_SINK rounded to the input dtype
        b.lse = torch.where(torch.isneginf(b.lse), sink, b.lse)
    _compare(measure, impl, spec, inputs, a, b, grad)
    if grad and "dsinks" in a.grads and bool(a.grads["dsinks"].ne(0).any()):
        raise AssertionError(f"dsinks: a sink of {NO_SINK} has no share, its gradient must be 0, got "
                             f"{a.grads['dsinks'].tolist()}")


@given(data=st.data())
@pinned(Pinned(Spec(Hq=2, Sq=4, Sk=6, causal=True, sinks=True, seed=5), "the sink's share per row"))
def test_sink_scales_each_row_by_its_share(impl, device, measure, data):
    """With a sink, out_i = out_i(no sink) / (1 + exp(sink - lse_i(no sink))) and
    lse_i = log(exp(lse_i(no sink)) + exp(sink)): the sink touches nothing but the denominator."""
    require(impl, "sinks", "lse")
    spec = draw_spec(data, impl, device, needs=("lse",), use=("sinks",), caps=SMALL)
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    plain = with_tensors(inputs)
    plain.sinks = None
    with torch.no_grad():
        a = run_impl(impl, spec, inputs)
        b = run_impl(impl, spec.replace(sinks=False), plain)
    if a.lse is None or b.lse is None:
        raise AssertionError(f"{impl.key} declares 'lse' but returned None")
    sink = inputs.sinks.detach().to(device="cpu", dtype=torch.float64).view(1, -1, 1)
    lse0 = b.lse.detach().cpu().double()
    lse = torch.logaddexp(lse0, sink.expand_as(lse0))
    share = torch.where(torch.isneginf(lse0), 0.0, torch.exp(lse0 - lse))  # the visible keys' share
    out = b.out.detach().cpu().double() * share[..., None]
    errors, scales = references(spec, inputs, impl)
    for name, got, want in (("out", a.out, out), ("lse", a.lse, lse)):
        if name in errors:
            check_runs(measure, name, got.detach().cpu().double(), want, impl, errors[name], spec.dtype,
                       scales[name], exact=False)


@given(data=st.data())
@pinned(Pinned(Spec(Hq=3, Sq=5, Sk=8, causal=True, alibi=True, seed=1), "slopes = the bias they stand for"))
def test_alibi_slopes_equal_the_materialized_bias(impl, device, measure, data):
    """ALiBi through alibi_slopes equals the same -slope * |p(i) - j| passed as a bias."""
    require(impl, "alibi", "bias")
    spec = draw_spec(data, impl, device, use=("alibi",), forbid=("bias",), caps=SMALL)
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    slopes = inputs.alibi_slopes
    exact = alibi_bias(slopes, spec.Sq, spec.Sk, spec.align, torch.float64)
    bias = exact.to(spec.torch_dtype)
    if not bool(bias.double().eq(exact).all()):
        return  # the bias would round in the input dtype: not the same logits
    as_bias = with_tensors(inputs)
    as_bias.alibi_slopes = None
    as_bias.bias = bias.contiguous()
    with torch.no_grad():
        a = run_impl(impl, spec, inputs)
        b = run_impl(impl, spec.replace(alibi=False, bias="full"), as_bias)
    _compare(measure, impl, spec, inputs, a, b, grad=False)

