"""lse carries float32 precision whatever the input dtype (oracles/CONTRACT.md: lse is float32).

The general properties judge lse by the tolerance rule of the input dtype, which for bfloat16
inputs allows about 2^-8 of |lse|: bfloat16 logits are that far off. So a kernel that keeps
lse in a buffer of the input dtype (rounding it to 8 bits) passes them, and its backward, its
split-KV merges and every ring-attention step built on that lse lose those bits.

Here q and k are sign(q), sign(k): every entry -1 or +1, exact in every dtype, and with D in
(16, 64) every logit q.k * scale is an integer times 1/4 or 1/8 of at most 8 significant bits,
exact in bfloat16 and float16 too. The logits then carry no input-dtype error, and lse must
match the float64 oracle to float32 precision: within PRECISION float32 ulps of max(1, |lse|)
(room for exp2 / log2 approximations and the scale folded with log2(e)), or three times the
reference implementation's error where that is larger. lse rounded to bfloat16 is off by up to
2^-9 of |lse|, over a hundred times that. Dense, packed and paged calls alike.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.packing import PagedInputs, VarlenInputs
from attnbench.properties.harness import (
    clone_inputs,
    clone_varlen,
    fresh_inputs,
    reference_impl,
    require,
    run_impl,
    run_oracle,
    run_paged,
    run_paged_oracle,
    run_varlen,
    run_varlen_oracle,
)
from attnbench.properties.strategies import Pinned, draw_case, draw_spec, paged_specs, pinned, varlen_specs
from attnbench.spec import Spec

pytestmark = pytest.mark.variant("dense")

EXACT_HEAD_DIMS = (16, 64)  # scale 1/4 and 1/8: logits of at most 8 significant bits
PRECISION = 256  # float32 ulps of max(1, |lse|): 3e-5 relative, against bfloat16's 2^-9 = 2e-3
FLOAT32_EPS = torch.finfo(torch.float32).eps
NOT_EXACT = ("fp8", "dropout", "alibi")  # fp8 rounds on its own; dropout leaves lse alone; ALiBi adds
# slope * distance, which a kernel may round in more than one step at long distances


def _signs(*tensors: torch.Tensor) -> None:
    """Each tensor's entries replaced by their signs, in place, forward only: through the storage
    a view was cut from, so every layout stays as drawn (an expanded one too; a fused buffer's
    other slices turn to signs as well, which changes no lse)."""
    for t in tensors:
        t.requires_grad_(False)
    with torch.no_grad():
        for t in tensors:
            stored = t if t._base is None else t._base
            stored.copy_(stored.sign())


def check_lse(measure, got: torch.Tensor | None, want: torch.Tensor, ref: torch.Tensor | None) -> None:
    """lse within float32 precision of the oracle (empty rows -inf in both), or within three times
    the reference's own error."""
    if got is None:
        return
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    empty = torch.isneginf(want)
    if not torch.equal(torch.isneginf(got), empty):
        raise AssertionError("lse: -inf where the oracle's is finite, or finite on a row with no visible key")
    got, want = got[~empty], want[~empty]
    if not got.numel():
        measure(0.0)
        return
    ref_err = 0.0 if ref is None else float((ref.detach().double().cpu()[~empty] - want).abs().max())
    allowed = torch.maximum(PRECISION * FLOAT32_EPS * want.abs().clamp(min=1.0),
                            torch.full_like(want, 3 * ref_err))
    error = (got - want).abs()
    ratio = float((error / allowed).max())
    measure(ratio)
    if ratio > 1:
        at = int((error / allowed).argmax())
        raise AssertionError(f"lse: error {float(error[at]):.3g} at |lse| {float(want[at].abs()):.3g} > allowed "
                             f"{float(allowed[at]):.3g} (ratio {ratio:.3g}; allowed = {PRECISION} float32 ulps of "
                             f"max(1, |lse|), or 3 x reference error {ref_err:.3g}): lse kept below float32 precision")


@given(data=st.data())
@pinned(
    Pinned(Spec(Sq=17, D=64, dtype="bfloat16", causal=True), "bfloat16 inputs, causal: lse in float32"),
    # seed 2 draws sinks 36.7 and 30.6, exact in float32; rounded to bfloat16 they move by up to 0.06
    Pinned(Spec(Hq=2, Sq=5, D=64, dtype="bfloat16", sinks=True, sinks_float32=True, seed=2),
           "float32 sinks with bfloat16 q: the sink joins lse unrounded"),
)
def test_lse_has_float32_precision(impl, device, measure, data):
    """The dense call's lse on sign inputs against the float64 oracle, to float32 precision."""
    require(impl, "lse")
    D = 64 if isinstance(data, Pinned) else data.draw(st.sampled_from(EXACT_HEAD_DIMS), label="D")
    spec = draw_spec(data, impl, device, needs=("lse",), forbid=NOT_EXACT, D=D, scale=None)
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    _signs(inputs.q, inputs.k)
    got = run_impl(impl, spec, inputs)
    ref = run_impl(reference_impl(impl), spec, clone_inputs(inputs))
    check_lse(measure, got.lse, run_oracle(spec, inputs).lse, ref.lse)


def _check_sequences(measure, impl, spec, inputs, keys: torch.Tensor, run, run_oracle, clone) -> None:
    """A packed or paged call on sign inputs (q and `keys`) against its oracle, to float32 precision."""
    _signs(inputs.q, keys)
    got = run(impl, spec, inputs)
    ref = run(reference_impl(impl), spec, clone(inputs))
    check_lse(measure, got.lse, run_oracle(spec, inputs).lse, ref.lse)


@given(data=st.data())
def test_varlen_lse_has_float32_precision(impl, device, measure, data):
    """The packed call's lse (Hq, total_q) on sign inputs, to float32 precision."""
    require(impl, "varlen", "lse")
    D = data.draw(st.sampled_from(EXACT_HEAD_DIMS), label="D")
    spec = draw_case(data, impl, device, varlen_specs(impl, device, D=D, Dv=D, scale=None))
    if spec is not None:
        inputs: VarlenInputs = spec.make_inputs()
        _check_sequences(measure, impl, spec, inputs, inputs.k, run_varlen, run_varlen_oracle, clone_varlen)


@given(data=st.data())
def test_paged_lse_has_float32_precision(impl, device, measure, data):
    """The paged call's lse (B, Hq, Sq) on sign inputs, to float32 precision."""
    require(impl, "paged_kv", "lse")
    D = data.draw(st.sampled_from(EXACT_HEAD_DIMS), label="D")
    spec = draw_case(data, impl, device, paged_specs(impl, device, D=D, Dv=D, scale=None))
    if spec is not None:
        inputs: PagedInputs = spec.make_inputs()
        _check_sequences(measure, impl, spec, inputs, inputs.k_cache, run_paged, run_paged_oracle, lambda i: i)
