"""Agreement with the float64 oracle: forward (out, lse), gradients, float64 gradcheck.

Each quantity goes through the tolerance rule (properties/tolerance.py): at most K times the
naive reference's error in the same dtype on the same device, plus what the error model allows
any correct order of operations.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.properties.harness import (
    check,
    clone_inputs,
    draw_rows,
    fresh_inputs,
    reference_impl,
    require,
    rows_of,
    run_impl,
    run_oracle,
    run_oracle_rows,
    run_reference,
    scales_of,
    scales_rows,
)
from attnbench.properties.strategies import Caps, Pinned, draw_spec, pinned
from attnbench.spec import Block, Spec

pytestmark = pytest.mark.variant("dense", "local")

# Known bug classes, pinned: each is a spec on which a public kernel once went wrong.
DECODE = Pinned(Spec(Sq=1, Sk=17, causal=True, window=(4, 0)), "KV-cache decoding: bottom-right causal, one query")
SQ_GT_SK = Pinned(Spec(Sq=9, Sk=5, causal=True, window=(2, 0)), "Sq > Sk: the first queries see no key")
GQA = Pinned(Spec(Hq=4, Hkv=2, Sq=5, window=(1, 1)), "grouped heads: interleave, not tile")
DV_SCALE = Pinned(Spec(Sq=6, D=16, Dv=32, window=(2, 2)), "Dv != D: the default scale is 1/sqrt(D)")
PARTIAL_BLOCK = Pinned(Spec(Sq=17, key_lengths=(15,), window=(16, 16)), "padding in the last partial block")
POLARITY = Pinned(Spec(B=2, Sq=6, key_lengths=(6, 2), window=(5, 5)), "key padding mask: True keeps")
OVERFLOW = Pinned(Spec(Sq=8, magnitude=8.0, window=(7, 7)), "exp() overflow without the row maximum")
SCALE0 = Pinned(Spec(Sq=5, scale=0.0, window=(4, 4)), "scale 0 is uniform attention, not 'use the default'")
BIAS_AXIS = Pinned(Spec(Sq=6, bias="per_key", window=(5, 5)), "per-key bias along the key axis")
FP16_SUM = Pinned(Spec(Sq=40, dtype="float16", window=(40, 40)), "low-precision accumulation over many keys")
BLOCKED = Pinned(Spec(Sq=11, block=Block(4, 1, 0)), "blocked window bucket edges")
STRIDED = Pinned(Spec(Hq=2, Sq=5, layout="bshd"), "(B, S, H, D) views: index by strides, not by shape")
GROUP16 = Pinned(Spec(Hq=16, Hkv=1, Sq=3), "a GQA group of 16 query heads")
LONG_DECODE = Pinned(Spec(Sq=1, Sk=2049, causal=True), "decoding over 2049 keys: split-KV paths")
GRAD_STRIDED = Pinned(Spec(Hq=2, Sq=5, grad_layout="bshd"), "a transposed grad_out")
GRAD_WIDE = Pinned(Spec(Hq=2, Sq=5, D=80, window=(4, 4)), "head dim 80: dq / dk columns past a 64-wide tile")
DBIAS_BATCH = Pinned(Spec(B=2, Hq=2, Sq=5, bias="per_head", window=(4, 4)),
                     "a bias broadcast over the batch: dbias sums every batch element")
# seed 0: a later key's logit tops the first 16, 32, 64 and 128 keys' maximum by more than 88
# (exp overflows in float32) in some row
LATE_MAX = Pinned(Spec(Hq=2, Sq=3, Sk=260, magnitude=8.0),
                  "a later key tile's logits top the first tile's maximum: the running max updates")
PINS = (DECODE, SQ_GT_SK, GQA, DV_SCALE, PARTIAL_BLOCK, POLARITY, OVERFLOW, SCALE0, BIAS_AXIS, FP16_SUM, BLOCKED,
        STRIDED, GROUP16, LONG_DECODE, LATE_MAX)


@given(data=st.data())
@pinned(*PINS)
def test_forward_matches_oracle(impl, device, measure, data):
    """out against the oracle: every row, or for a long problem sampled rows (tile edges,
    first and last, two drawn) against the row-wise float64 oracle."""
    spec = draw_spec(data, impl, device, long="all")
    if spec is None:
        return
    rows = draw_rows(data, spec)
    inputs = fresh_inputs(spec)
    with torch.no_grad():
        got = run_impl(impl, spec, inputs)
        ref = run_reference(impl, spec, inputs, rows)
        want = run_oracle_rows(spec, inputs, rows)
    check(measure, "out", rows_of(got.out, rows), want.out, ref.out, spec.dtype, scales_rows(spec, inputs, rows))


@given(data=st.data())
@pinned(DECODE, SQ_GT_SK, OVERFLOW, POLARITY, LATE_MAX)
def test_lse_matches_oracle(impl, device, measure, data):
    require(impl, "lse")
    spec = draw_spec(data, impl, device, needs=("lse",), long="all")
    if spec is None:
        return
    rows = draw_rows(data, spec)
    inputs = fresh_inputs(spec)
    with torch.no_grad():
        got = run_impl(impl, spec, inputs)
        ref = run_reference(impl, spec, inputs, rows)
        want = run_oracle_rows(spec, inputs, rows)
    if got.lse is None:
        raise AssertionError(f"{impl.key} declares 'lse' but returned None")
    check(measure, "lse", rows_of(got.lse, rows), want.lse, ref.lse, spec.dtype, scales_rows(spec, inputs, rows))


@given(data=st.data())
@pinned(DECODE, SQ_GT_SK, GQA, DV_SCALE, PARTIAL_BLOCK, BIAS_AXIS, GRAD_STRIDED, GRAD_WIDE, DBIAS_BATCH)
def test_gradients_match_oracle(impl, device, measure, data):
    require(impl, "backward")
    spec = draw_spec(data, impl, device, needs=("backward",), long="keys")
    if spec is None:
        return
    inputs = fresh_inputs(spec, impl, grad=True)
    got = run_impl(impl, spec, inputs, grad=True)
    ref = run_impl(reference_impl(impl), spec, clone_inputs(inputs), grad=True)
    want = run_oracle(spec, inputs, grad=True)
    scales = scales_of(spec, inputs)
    for name in ("dq", "dk", "dv", "dbias", "dsinks"):
        if name in want.grads:
            check(measure, name, got.grads[name], want.grads[name], ref.grads[name], spec.dtype, scales)


def _dense(t: torch.Tensor) -> torch.Tensor:
    if 0 in t.stride() and t.numel() > 1:
        return t.detach().clone().requires_grad_(t.requires_grad)
    return t


TINY = Caps(batch=2, heads=2, length=6, head_dims=(16,))


@given(data=st.data())
@pinned(Pinned(Spec(Hq=2, Hkv=1, Sq=3, Sk=5, dtype="float64", causal=True, window=(2, 0)), "tiny GQA decode"))
def test_float64_gradcheck(impl, device, data):
    require(impl, "backward")
    if "float64" not in impl.dtypes:
        pytest.skip(f"{impl.key} does not claim float64")
    spec = draw_spec(data, impl, device, needs=("backward",), caps=TINY, dtype="float64", magnitude=1.0,
                     bias_neginf=0.0)
    if spec is None:
        return
    inputs = fresh_inputs(spec, impl, grad=True)
    cfg = spec.config()
    names = [n for n in ("q", "k", "v", "bias", "sinks")
             if getattr(inputs, n) is not None and getattr(inputs, n).requires_grad]
    fixed_bias = None if "bias" in names else inputs.bias
    extra = inputs.score_kwargs()

    def fn(*tensors):
        args = dict(zip(names, tensors))
        more = {**extra, **({"sinks": args["sinks"]} if "sinks" in args else {})}
        out, _ = impl.fn(args["q"], args["k"], args["v"], cfg, key_padding_mask=inputs.key_padding_mask,
                         bias=args.get("bias", fixed_bias), **more)
        return out

    # gradcheck perturbs one element at a time, which a zero-stride ("expanded") tensor cannot
    # hold: such an input is handed over as a dense copy.
    tensors = tuple(_dense(getattr(inputs, n)) for n in names)
    nondet = 0.0 if "deterministic" in impl.features else 1e-10
    torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-6, rtol=1e-4, nondet_tol=nondet, fast_mode=True)
