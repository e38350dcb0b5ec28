"""Dropout, checked statistically (the oracle has none).

With q = 0 every visible probability is 1/Sk, and with V = I (Dv = Sk) the output is the
dropped probability matrix itself: out[i, j] = keep[i, j] / (Sk (1 - p)). So one call shows
the kept fraction (a binomial count), the 1/(1 - p) rescaling of every kept entry, whether
the mask differs across heads, and, through dv = P_drop^T dO, whether the backward uses the
forward's mask. (q = 0 rather than scale = 0: torch's flash and cuDNN kernels skip dropout
at scale = 0, an upstream bug those adapters declare away; this property is about dropout.)
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from attnbench.properties import tolerance
from attnbench.properties.harness import check_runs, clone_inputs, fresh_inputs, require, run_impl, scales_of, wants_grad
from attnbench.properties.strategies import DTYPE_ORDER, Pinned, draw_spec, pinned
from attnbench.spec import Inputs, Spec

pytestmark = pytest.mark.variant("dense", "local")

SIGMAS = 5.0  # a correct kernel fails the kept-fraction check with probability ~6e-7 per call


@given(data=st.data())
@pinned(Pinned(Spec(Sq=7, window=(3, 3)), "p = 0 must not touch the RNG path"))
def test_dropout_zero_is_identity(impl, device, measure, data):
    """dropout_p = 0 is the no-dropout path whatever the dropout seed: bit-identical for an
    implementation that declares "deterministic" (others differ run to run anyway, so for them
    the two runs must agree within twice the tolerance floor)."""
    require(impl, "dropout")
    spec = draw_spec(data, impl, device)
    if spec is None:
        return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    a = run_impl(impl, spec, inputs, grad=grad)
    other = dataclasses.replace(spec.config(), dropout_seed=spec.seed + 12345)
    b = run_impl(impl, spec, clone_inputs(inputs), grad=grad, cfg=other)
    pairs = [("out", a.out, b.out)] + ([("lse", a.lse, b.lse)] if a.lse is not None else [])
    pairs += [(n, a.grads[n], b.grads[n]) for n in a.grads]
    scales = scales_of(spec, inputs)
    for name, x, y in pairs:
        check_runs(measure, name, y, x, impl, 0.0, spec.dtype, scales.get(name, 1.0))


def _identity_inputs(spec: Spec) -> Inputs:
    """q = 0 (uniform attention whatever k and the scale), V = I per head, random grad_out."""
    inputs = spec.make_inputs(requires_grad=False)
    inputs.q = torch.zeros_like(inputs.q)
    eye = torch.eye(spec.Sk, dtype=torch.float64).expand(spec.B, spec.Hkv, spec.Sk, spec.Sk)
    inputs.v = eye.to(device=spec.device, dtype=spec.torch_dtype).contiguous()
    for t in (inputs.q, inputs.k, inputs.v):
        t.requires_grad_(True)
    return inputs


@given(data=st.data())
@pinned(
    Pinned(Spec(Hq=2, Sq=32, D=16, Dv=32, dropout_p=0.5), "dropout must rescale by 1/(1-p)"),
    Pinned(Spec(Hq=2, Sq=32, D=16, Dv=32, dtype="float64", dropout_p=0.1),
           "float64 backward rescaled in float32 (bool / float; blockwise)"),
)
def test_dropout_keeps_expected_fraction(impl, device, measure, data):
    """The kept fraction is binomially consistent with 1 - p, every kept probability is
    rescaled by 1/(1 - p), heads get different masks, and the backward uses the same mask."""
    require(impl, "dropout")
    if isinstance(data, Pinned):
        p, dtype = data.spec.dropout_p, data.spec.dtype
    else:
        p = data.draw(st.sampled_from((0.5, 0.1, 0.9)), label="dropout_p")
        dtype = data.draw(st.sampled_from([d for d in DTYPE_ORDER if d in impl.dtypes]), label="dtype")
    S = 32
    D = 16 if "dv" in impl.features else S
    spec = Spec(B=1, Hq=2, Sq=S, D=D, Dv=S, dtype=dtype, device=device, dropout_p=p,
                seed=0 if isinstance(data, Pinned) else data.draw(st.integers(0, 2**16), label="seed"))
    if not impl.covers(spec):
        return
    note(f"spec: {spec.short()}")
    grad = wants_grad(impl, spec)
    inputs = _identity_inputs(spec)
    run = run_impl(impl, spec, inputs, grad=grad)
    out = run.out.detach().to(device="cpu", dtype=torch.float64)
    expect = 1.0 / (S * (1.0 - p))
    kept = out != 0
    n = kept.numel()
    frac = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    z = abs(frac - (1 - p)) / sigma
    measure(z / SIGMAS)
    if z > SIGMAS:
        raise AssertionError(f"kept fraction {frac:.4f} with p={p} over {n} entries: {z:.1f} sigma from {1 - p:.4f}")
    values = out[kept]
    error = (values - expect).abs().max().item() if values.numel() else 0.0
    limit = 4 * tolerance.EPS[dtype] * expect
    measure(error / limit)
    if error > limit:
        raise AssertionError(
            f"kept probabilities must be 1/(Sk (1-p)) = {expect:.5g}; got values in "
            f"[{values.min().item():.5g}, {values.max().item():.5g}] (not rescaled by 1/(1-p)?)"
        )
    if torch.equal(kept[:, 0], kept[:, 1]):
        raise AssertionError("both heads got the same dropout mask")
    if grad:
        dv = run.grads["dv"].to(device="cpu", dtype=torch.float64)
        want = out.transpose(-1, -2) @ inputs.grad_out.to(device="cpu", dtype=torch.float64)
        ref_error = tolerance.max_error(
            (out.transpose(-1, -2).to(spec.torch_dtype) @ inputs.grad_out.cpu()).double(), want
        )[0]
        check_runs(measure, "dv", dv, want, impl, ref_error, dtype, tolerance.magnitude(want), exact=False)
