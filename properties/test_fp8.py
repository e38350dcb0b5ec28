"""fp8 attention (oracles/CONTRACT.md, section 1.4): float8_e4m3fn q, k, v with float32 descales.

Agreement with the oracle (float64 attention on the dequantized values) under the tolerance
rule's fp8 model, with descales per tensor or differing per (batch, kv head), and relations
between runs of the implementation itself that hold exactly or nearly: v_descale times 2 doubles
the output bit for bit (a power of two scales exactly), with the descales given per (batch, kv
head), the shape FA3 / FA4 take; q_descale and k_descale swapped, one times c, is cfg.scale times
c (only their product enters the logits). Fully masked rows stay zero with lse -inf. Forward only: fp8 has no backward.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.properties.harness import (
    check,
    check_runs,
    clone_inputs,
    fresh_inputs,
    reference_impl,
    references,
    require,
    rule_dtype,
    run_impl,
    run_oracle,
    scales_of,
)
from attnbench.properties.strategies import Caps, Pinned, draw_int, draw_spec, pinned
from attnbench.spec import Spec

pytestmark = pytest.mark.variant("dense")

# fp8 changes the arithmetic of each logit and each row, not the structure: small problems
# (one 16-row tile in the Triton interpreter), structure and sizes are the general properties' job.
SMALL = Caps(batch=2, heads=2, length=16, head_dims=(16, 32, 64), kv_heads=2)
NOT_WITH_FP8 = ("softcap", "alibi", "sinks", "dropout")  # not part of the fp8 call (CONTRACT.md)


def _draw(data, impl, device, **kwargs) -> Spec | None:
    require(impl, "fp8")
    return draw_spec(data, impl, device, use=("fp8",), forbid=NOT_WITH_FP8, caps=SMALL, **kwargs)


@given(data=st.data())
@pinned(
    Pinned(Spec(B=2, Hq=4, Hkv=2, Sq=5, Sk=9, D=32, dtype="bfloat16", causal=True, key_lengths=(0, 7), fp8=True),
           "an empty row (out 0, lse -inf), grouped heads, causal with Sq < Sk"),
    Pinned(Spec(Sq=17, D=64, dtype="bfloat16", magnitude=8.0, fp8=True), "large logits: e4m3's full range"),
)
def test_fp8_matches_oracle(impl, device, measure, data):
    """out and lse against float64 attention on the dequantized values, under the fp8 rule; one
    draw in two (and the pins) with descales of shape (B, Hkv) that differ per batch element and
    kv head, so a kernel that reads them by query head or by batch alone is off."""
    spec = _draw(data, impl, device)
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    if draw_int(data, 0, 1, 1, label="descales per (batch, kv head)"):
        g = torch.Generator().manual_seed(spec.seed)
        for name, d in inputs.descales().items():
            factors = 0.5 + 1.5 * torch.rand(spec.B, spec.Hkv, generator=g)  # within [0.5, 2): no overflow
            setattr(inputs, name, (d.cpu() * factors).to(device=d.device, dtype=torch.float32))
    got = run_impl(impl, spec, inputs)
    ref = run_impl(reference_impl(impl), spec, clone_inputs(inputs))
    want = run_oracle(spec, inputs)
    scales = scales_of(spec, inputs)
    check(measure, "out", got.out, want.out, ref.out, rule_dtype(spec), scales)
    if got.lse is not None:
        check(measure, "lse", got.lse, want.lse, ref.lse, rule_dtype(spec), scales)
    empty = torch.isneginf(want.lse).to(got.out.device)
    if bool(empty.any()) and bool(got.out[empty].ne(0).any()):
        raise AssertionError("out: a row with no visible key must be exactly 0")


@given(data=st.data())
def test_v_descale_doubled_doubles_out_exactly(impl, device, measure, data):
    """v_descale * 2 gives out * 2 and the same lse, bit for bit for a deterministic impl: the
    value descale scales the output only, and a power of two scales exactly. The doubled run
    takes its descales per (batch, kv head), FA3 / FA4's shape, the other per tensor: the same
    values, so the same result."""
    spec = _draw(data, impl, device)
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    doubled = clone_inputs(inputs)
    for name, t in inputs.descales().items():
        setattr(doubled, name, (t * (2 if name == "v_descale" else 1)).expand(spec.B, spec.Hkv).contiguous())
    with torch.no_grad():
        a = run_impl(impl, spec, inputs)
        b = run_impl(impl, spec, doubled)
    errors, scales = references(spec, inputs, impl)
    check_runs(measure, "out", b.out, a.out * 2, impl, 2 * errors["out"], rule_dtype(spec), 2 * scales["out"])
    if a.lse is not None:
        check_runs(measure, "lse", b.lse, a.lse, impl, errors["lse"], rule_dtype(spec), scales["lse"])


@given(data=st.data())
def test_descales_enter_the_logits_as_a_product(impl, device, measure, data):
    """Only scale * q_descale * k_descale reaches the logits: q_descale and k_descale swapped and
    q's times c equal cfg.scale times c (within twice the rule's allowance: the kernel may fold
    the factors in another order)."""
    spec = _draw(data, impl, device)
    if spec is None:
        return
    c = 3.0 if isinstance(data, Pinned) else data.draw(st.sampled_from((0.5, 3.0, 0.1)), label="c")
    inputs = fresh_inputs(spec)
    moved = clone_inputs(inputs)
    moved.q_descale, moved.k_descale = inputs.k_descale * c, inputs.q_descale.clone()
    scaled = spec.replace(scale=spec.softmax_scale * c)
    with torch.no_grad():
        a = run_impl(impl, spec, moved)
        b = run_impl(impl, scaled, inputs)
    errors, scales = references(scaled, inputs, impl)
    for name in ("out", "lse"):
        if a.get(name) is not None and name in errors:
            check_runs(measure, name, a.get(name), b.get(name), impl, errors[name], rule_dtype(spec), scales[name],
                       exact=False)
