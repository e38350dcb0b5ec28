"""Packed (variable-length) batches (oracles/CONTRACT.md 1.1): the varlen call equals dense
attention on each sequence alone, and no sequence sees another, whatever its length (0 and 1
tokens, boundaries off the 16-token tiles)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.packing import VarlenInputs, VarlenSpec
from attnbench.properties import tolerance
from attnbench.properties.harness import (
    Run,
    check,
    check_runs,
    clone_varlen,
    reference_impl,
    require,
    run_impl,
    run_varlen,
    run_varlen_oracle,
    varlen_scales,
)
from attnbench.properties.strategies import Pinned, draw_case, pinned, varlen_specs
from attnbench.spec import Inputs

pytestmark = pytest.mark.variant("dense")

BOUNDARY = Pinned(VarlenSpec(seqlens=((3, 3), (2, 2), (17, 17))), "a sequence's last query next to another's first key")
EMPTY = Pinned(VarlenSpec(seqlens=((0, 0), (1, 1), (2, 0), (0, 3), (5, 5)), causal=True),
               "zero-length sequences and a single token")
DECODE = Pinned(VarlenSpec(seqlens=((1, 9), (1, 16), (1, 1)), Hq=4, Hkv=2, causal=True, window=(3, 0), softcap=5.0,
                           scale=0.3), "one query per sequence against its own cache, GQA, windowed, soft-capped, "
                "a scale other than 1/sqrt(D) (a decode fast path must not drop it)")
SAME_TOTALS = Pinned(VarlenSpec(seqlens=((2, 3), (3, 2)), causal=True),
                     "equal totals and maxima of queries and keys, different boundaries: cu_seqlens_k is not cu_seqlens_q")
LONG = Pinned(VarlenSpec(seqlens=((65, 129), (2, 2), (257, 257), (1, 64)), Hq=2, D=80, causal=True, layout="packed",
                         softcap=2.5),
              "sequences across 64- and 128-token tiles, D = 80 (not a power of two), fused qkv, a soft cap "
              "that bites (the long sequences' multi-tile paths, forward and backward)")


def _grad(impl, spec: VarlenSpec) -> bool:
    return "backward" in impl.features and impl.covers(spec, ("backward",))


def _names(run: Run, grad: bool) -> list[str]:
    return ["out", *(["lse"] if run.lse is not None else []), *(["dq", "dk", "dv"] if grad else [])]


def _reference(impl, spec: VarlenSpec, inputs: VarlenInputs, grad: bool) -> tuple[Run, Run]:
    ref = reference_impl(impl)
    return run_varlen(ref, spec, clone_varlen(inputs), grad=grad), run_varlen_oracle(spec, inputs, grad=grad)


@given(data=st.data())
@pinned(BOUNDARY, EMPTY, DECODE, LONG, SAME_TOTALS)
def test_varlen_matches_oracle(impl, device, measure, data):
    """out, lse (Hq, total_q) and dq, dk, dv of the packed call against the float64 oracle:
    dense attention on each sequence alone, bottom-right aligned within it; and out of the
    inference call (return_lse=False), which may take its own path."""
    require(impl, "varlen")
    spec = draw_case(data, impl, device, varlen_specs(impl, device))
    if spec is None:
        return
    grad = _grad(impl, spec)
    inputs = spec.make_inputs(requires_grad=grad)
    got = run_varlen(impl, spec, inputs, grad=grad)
    ref, want = _reference(impl, spec, inputs, grad)
    scales = varlen_scales(spec, inputs)
    if "lse" in impl.features and got.lse is None:
        raise AssertionError(f"{impl.key} declares 'lse' but its varlen call returned None")
    for name in _names(got, grad):
        check(measure, name, got.get(name), want.get(name), ref.get(name), spec.dtype, scales)
    inference = run_varlen(impl, spec, spec.make_inputs(), return_lse=False)
    check(measure, "out", inference.out, want.out, ref.out, spec.dtype, scales)


def _dense_inputs(inputs: VarlenInputs, bounds: tuple[int, int, int, int]) -> Inputs:
    """One sequence of a packed batch as dense inputs (1, H, S, D)."""
    q0, q1, k0, k1 = bounds

    def cut(t, a, b):
        return t.detach()[a:b].transpose(0, 1)[None].contiguous()

    return Inputs(q=cut(inputs.q, q0, q1), k=cut(inputs.k, k0, k1), v=cut(inputs.v, k0, k1), key_padding_mask=None,
                  bias=None, grad_out=inputs.grad_out.detach()[q0:q1].transpose(0, 1)[None].contiguous())


def _bounds(inputs: VarlenInputs) -> list[tuple[int, int, int, int]]:
    cq, ck = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    return [(cq[b], cq[b + 1], ck[b], ck[b + 1]) for b in range(len(cq) - 1)]


@given(data=st.data())
@pinned(BOUNDARY, DECODE)
def test_varlen_equals_dense_per_sequence(impl, device, measure, data):
    """The packed call equals the same implementation's dense call on each sequence alone (B = 1,
    (1, H, S, D)): out and lse per sequence (the gradients are checked against the oracle, which
    is this per-sequence reduction, by test_varlen_matches_oracle)."""
    require(impl, "varlen")
    spec = draw_case(data, impl, device, varlen_specs(impl, device))
    if spec is None:
        return
    dense = [s for s in spec.dense_specs() if impl.covers(s)]
    if len(dense) < len(spec.dense_specs()):
        return
    inputs = spec.make_inputs()
    packed = run_varlen(impl, spec, inputs)
    ref, want = _reference(impl, spec, inputs, False)
    scales = varlen_scales(spec, inputs)
    errors = {n: tolerance.max_error(ref.get(n), want.get(n))[0] for n in _names(packed, False)}
    shapes = iter(dense)
    for q0, q1, k0, k1 in _bounds(inputs):
        if q1 == q0 or k1 == k0:
            continue
        alone = run_impl(impl, next(shapes), _dense_inputs(inputs, (q0, q1, k0, k1)), cfg=spec.config())
        pairs = [("out", packed.out[q0:q1], alone.out[0].transpose(0, 1))]
        if packed.lse is not None and alone.lse is not None:
            pairs.append(("lse", packed.lse[:, q0:q1], alone.lse[0]))
        for name, a, b in pairs:
            check_runs(measure, name, a, b, impl, errors[name], spec.dtype, scales.get(name, 1.0), exact=False)


@given(data=st.data())
@pinned(BOUNDARY, EMPTY)
def test_other_sequences_change_nothing(impl, device, measure, data):
    """Sequence b's out, lse and the gradients of its tokens stay the same when every other
    sequence gets other values and other lengths (0 included)."""
    require(impl, "varlen")
    spec = draw_case(data, impl, device, varlen_specs(impl, device))
    if spec is None:
        return
    b = 0 if isinstance(data, Pinned) else data.draw(st.integers(0, spec.B - 1), label="kept sequence")
    cross = "cross" in impl.features
    others = tuple(spec.seqlens[c] if c == b else ((sk + 3) % 5, (sk + 3) % 5 if not cross else (sq + 2) % 6)
                   for c, (sq, sk) in enumerate(spec.seqlens))
    other = spec.replace(seqlens=others, seed=spec.seed + 1)
    if not impl.covers(other):
        return
    grad = _grad(impl, spec) and _grad(impl, other)
    a_in = spec.make_inputs(requires_grad=grad)
    b_in = _splice(other.make_inputs(), a_in, b, grad)
    a = run_varlen(impl, spec, a_in, grad=grad)
    c = run_varlen(impl, other, b_in, grad=grad)
    ref, want = _reference(impl, spec, a_in, grad)
    scales = varlen_scales(spec, a_in)
    (qa0, qa1, ka0, ka1), (qb0, qb1, kb0, kb1) = _bounds(a_in)[b], _bounds(b_in)[b]
    for name in _names(a, grad):
        errors = tolerance.max_error(ref.get(name), want.get(name))[0]
        x, y = a.get(name), c.get(name)
        if name == "lse":
            x, y = x[:, qa0:qa1], y[:, qb0:qb1]
        elif name in ("dk", "dv"):
            x, y = x[ka0:ka1], y[kb0:kb1]
        else:
            x, y = x[qa0:qa1], y[qb0:qb1]
        check_runs(measure, name, y, x, impl, errors, spec.dtype, scales.get(name, 1.0), exact=False)


def _splice(into: VarlenInputs, source: VarlenInputs, b: int, grad: bool) -> VarlenInputs:
    """`into` with sequence b's tokens (q, k, v, grad_out) copied from `source` (same lengths)."""
    (sq0, sq1, sk0, sk1), (iq0, iq1, ik0, ik1) = _bounds(source)[b], _bounds(into)[b]
    parts = {}
    for name, (s0, s1, i0, i1) in (("q", (sq0, sq1, iq0, iq1)), ("grad_out", (sq0, sq1, iq0, iq1)),
                                   ("k", (sk0, sk1, ik0, ik1)), ("v", (sk0, sk1, ik0, ik1))):
        t = getattr(into, name).detach().clone()
        t[i0:i1] = getattr(source, name).detach()[s0:s1]
        parts[name] = t.requires_grad_(grad and name != "grad_out")
    return VarlenInputs(q=parts["q"], k=parts["k"], v=parts["v"], cu_seqlens_q=into.cu_seqlens_q.clone(),
                        cu_seqlens_k=into.cu_seqlens_k.clone(), max_seqlen_q=into.max_seqlen_q,
                        max_seqlen_k=into.max_seqlen_k, grad_out=parts["grad_out"])


@given(data=st.data())
def test_varlen_max_seqlen_above_the_longest_changes_nothing(impl, device, measure, data):
    """max_seqlen_q / max_seqlen_k are upper bounds (flash-attn sizes its grid by them): larger
    values than the longest sequence give the same result."""
    require(impl, "varlen")
    spec = draw_case(data, impl, device, varlen_specs(impl, device))
    if spec is None:
        return
    inputs = spec.make_inputs()
    roomy = clone_varlen(inputs)
    roomy.max_seqlen_q, roomy.max_seqlen_k = inputs.max_seqlen_q + 5, inputs.max_seqlen_k + 17
    a = run_varlen(impl, spec, inputs)
    c = run_varlen(impl, spec, roomy)
    ref, want = _reference(impl, spec, inputs, False)
    scales = varlen_scales(spec, inputs)
    for name in _names(a, False):
        errors = tolerance.max_error(ref.get(name), want.get(name))[0]
        check_runs(measure, name, c.get(name), a.get(name), impl, errors, spec.dtype, scales.get(name, 1.0), exact=False)


def test_varlen_rejects_bad_offsets(impl, device):
    """cu_seqlens that do not rise from 0 to the token count are refused with a ValueError."""
    require(impl, "varlen")
    spec = VarlenSpec(seqlens=((2, 2), (3, 3)), device=device)
    if not impl.covers(spec):
        pytest.skip(f"{impl.key} does not cover {spec.short()}")
    inputs = spec.make_inputs()
    bad = torch.tensor([0, 3, 4], dtype=torch.int32, device=device)
    with pytest.raises(ValueError):
        impl.varlen(inputs.q, inputs.k, inputs.v, bad, inputs.cu_seqlens_k, 3, 3, spec.config())
