"""Structural identities: grouped heads, batch independence, key permutation, determinism."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.properties.harness import (
    check_runs,
    clone_inputs,
    exact_between,
    fresh_inputs,
    noise,
    quantities,
    references,
    require,
    run_impl,
    wants_grad,
    with_tensors,
)
from attnbench.properties.strategies import Pinned, draw_spec, pinned
from attnbench.spec import Spec

pytestmark = pytest.mark.variant("dense", "local")


@given(data=st.data())
@pinned(Pinned(Spec(Hq=4, Hkv=2, Sq=5, window=(2, 2)), "query head h reads kv head h // G (interleave)"))
def test_gqa_equals_mha_on_repeated_kv(impl, device, measure, data):
    """Grouped heads equal multi-head attention on repeat_interleave'd K and V; the grouped
    K / V gradients are the per-group sums."""
    require(impl, "gqa")
    spec = draw_spec(data, impl, device, use=("gqa",))
    if spec is None:
        return
    mha = spec.replace(Hkv=spec.Hq)
    if not impl.covers(mha):
        return
    G = spec.Hq // spec.Hkv
    grad = wants_grad(impl, spec, mha)
    inputs = fresh_inputs(spec, impl, grad=grad)
    wide = with_tensors(inputs, k=inputs.k.detach().repeat_interleave(G, 1), v=inputs.v.detach().repeat_interleave(G, 1))
    a = run_impl(impl, spec, inputs, grad=grad)
    b = run_impl(impl, mha, wide, grad=grad)
    errors, scales = references(spec, inputs, impl, grad=grad)
    for name in quantities(a, errors, grad):
        want = b.get(name)
        if name in ("dk", "dv"):  # the grouped K / V gradient is the sum over its query heads
            want = want.view(spec.B, spec.Hkv, G, *want.shape[2:]).sum(2)
        check_runs(measure, name, a.get(name), want, impl, errors[name], spec.dtype, scales[name], exact=False)


@given(data=st.data())
@pinned(Pinned(Spec(B=2, Sq=4, key_lengths=(4, 1), window=(3, 3)), "padding of batch 0 leaking into batch 1"))
def test_batch_elements_are_independent(impl, device, measure, data):
    """Batch element 0 gives the same result whatever the other elements hold, and the same
    as when run alone."""
    spec = draw_spec(data, impl, device, min_batch=2)
    if spec is None:
        return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    changes = {}
    for salt, name in enumerate(("q", "k", "v")):
        t = getattr(inputs, name).detach().clone()
        t[1:] = noise(t[1:], spec, 50 + salt, 3.0)
        changes[name] = t
    if inputs.bias is not None and inputs.bias.shape[0] == spec.B:
        bias = inputs.bias.detach().clone()
        bias[1:] = noise(bias[1:], spec, 60, 3.0)
        changes["bias"] = bias
    other = with_tensors(inputs, **changes)
    if inputs.key_padding_mask is not None:  # other batch elements also get other padding
        kpm = other.key_padding_mask.clone()
        kpm[1:] = ~kpm[1:]
        other.key_padding_mask = kpm
    a = run_impl(impl, spec, inputs, grad=grad)
    b = run_impl(impl, spec, other, grad=grad)
    errors, scales = references(spec, inputs, impl, grad=grad)
    names = quantities(a, errors, grad)
    exact = exact_between(inputs, other)  # elements 1.. of a batch-expanded K/V changed: no longer an expand
    for name in names:
        check_runs(measure, name, b.get(name)[:1], a.get(name)[:1], impl, errors[name], spec.dtype, scales[name],
                   exact=exact)

    alone_spec = spec.replace(B=1, key_lengths=None if spec.key_lengths is None else spec.key_lengths[:1])
    if not impl.covers(alone_spec):
        return
    alone = clone_inputs(inputs)
    for name in ("q", "k", "v"):
        t = getattr(inputs, name)
        setattr(alone, name, t.detach()[:1].clone().requires_grad_(t.requires_grad))
    if inputs.bias is not None and inputs.bias.shape[0] == spec.B:
        alone.bias = inputs.bias.detach()[:1].clone().requires_grad_(inputs.bias.requires_grad)
    if inputs.key_padding_mask is not None:
        alone.key_padding_mask = inputs.key_padding_mask[:1].clone()
    if inputs.alibi_slopes is not None and inputs.alibi_slopes.dim() == 2:  # per batch element: (B, Hq)
        alone.alibi_slopes = inputs.alibi_slopes[:1].clone()
    c = run_impl(impl, alone_spec, alone)
    for name in [n for n in names if n in ("out", "lse")]:
        check_runs(measure, name, c.get(name), a.get(name)[:1], impl, errors[name], spec.dtype, scales[name],
                   exact=False)


@given(data=st.data())
@pinned(Pinned(Spec(Sq=3, Sk=9, key_lengths=(5,)), "permuted keys with padding"))
def test_key_permutation_equivariance(impl, device, measure, data):
    """Without causality, windows or bias, permuting the keys (values and padding alike)
    changes nothing, and permutes the key gradients."""
    if impl.variant == "local":
        pytest.skip("local attention is always windowed: key order matters")
    spec = draw_spec(data, impl, device, forbid=("causal", "sliding_window", "blocked_window", "bias", "alibi"))
    if spec is None:
        return
    perm = torch.randperm(spec.Sk, generator=torch.Generator().manual_seed(spec.seed)).to(spec.device)
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    shuffled = with_tensors(inputs, k=inputs.k.detach()[:, :, perm], v=inputs.v.detach()[:, :, perm])
    if inputs.key_padding_mask is not None:
        shuffled.key_padding_mask = inputs.key_padding_mask[:, perm]
    a = run_impl(impl, spec, inputs, grad=grad)
    b = run_impl(impl, spec, shuffled, grad=grad)
    errors, scales = references(spec, inputs, impl, grad=grad)
    for name in quantities(a, errors, grad):
        want = a.get(name)[:, :, perm] if name in ("dk", "dv") else a.get(name)
        check_runs(measure, name, b.get(name), want, impl, errors[name], spec.dtype, scales[name], exact=False)


@given(data=st.data())
@pinned(Pinned(Spec(Hq=2, Hkv=1, Sq=33, window=(8, 8)), "grouped heads: dk / dv accumulation order"))
def test_deterministic_runs_are_bit_identical(impl, device, measure, data):
    """An implementation that declares "deterministic" gives bit-identical out, lse and
    gradients when run twice on the same inputs."""
    require(impl, "deterministic")
    spec = draw_spec(data, impl, device)
    if spec is None:
        return
    grad = "backward" in impl.features
    inputs = fresh_inputs(spec, impl, grad=grad)
    a = run_impl(impl, spec, inputs, grad=grad)
    b = run_impl(impl, spec, clone_inputs(inputs), grad=grad)
    pairs = [("out", a.out, b.out)] + ([("lse", a.lse, b.lse)] if a.lse is not None else [])
    pairs += [(n, a.grads[n], b.grads[n]) for n in a.grads]
    for name, x, y in pairs:
        check_runs(measure, name, y, x, impl, 0.0, spec.dtype, exact=True)
