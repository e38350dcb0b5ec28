"""Document masking (oracles/CONTRACT.md 1.2): inside one padded sequence, a query sees only the
keys of its own document (document_ids=(doc_q, doc_k) on the dense call), on top of every other
mask, with positions those of the padded sequence."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.properties.harness import (
    check,
    check_runs,
    clone_inputs,
    fresh_inputs,
    noise,
    quantities,
    reference_error,
    reference_impl,
    require,
    run_impl,
    run_oracle,
    scales_of,
    wants_grad,
    with_tensors,
)
from attnbench.properties.strategies import Pinned, draw_documents, draw_int, draw_spec, pinned
from attnbench.spec import Block, Inputs, Spec

pytestmark = pytest.mark.variant("dense")

TILE = Pinned(Spec(B=2, Sq=20, causal=True, window=(19, 0)), "a document boundary at 10, off the 16-key tiles")
DECODE = Pinned(Spec(Sq=2, Sk=9, Hq=2, Hkv=1), "queries of a cache: the documents of their aligned positions")
CROSS_CAUSAL = Pinned(Spec(Sq=6, Sk=11, causal=True, documents=((8, 3),)),
                      "causal with Sq < Sk: positions are the padded sequence's, never counted from a document start")
BLOCKED = Pinned(Spec(Sq=12, block=Block(4, 1, 0), documents=((6, 6),)),
                 "a blocked window across a document boundary: buckets count from key 0, not the document start")
SCORED = Pinned(Spec(Hq=2, Sq=6, Sk=4, align="top_left", softcap=2.5, sinks=True, seed=3, documents=((2, 2),),
                     doc_stride=65536),
                "ids 65536 apart (past int16), a soft cap, sinks, and queries 4, 5 past the keys (id -1): "
                "empty rows whose lse is the sink")


def _spec(data, impl, device, **kwargs) -> Spec | None:
    spec = draw_spec(data, impl, device, needs=("document",), quiet=True, **kwargs)
    return None if spec is None else draw_documents(data, spec)


def _references(spec: Spec, inputs: Inputs, impl, grad: bool):
    ref = run_impl(reference_impl(impl), spec, clone_inputs(inputs), grad=grad)
    want = run_oracle(spec, inputs, grad=grad)
    errors = {n: reference_error(n, spec, ref, want)[0] for n in ("out", "lse", *want.grads)
              if n in ref.grads or (n in ("out", "lse") and ref.get(n) is not None)}
    return ref, want, errors


def _arbitrary_query_ids(spec: Spec, inputs: Inputs) -> None:
    """doc_q replaced by ids drawn apart from the query positions (seeded by the spec): each
    query gets one of its batch element's key documents or -1, so a kernel that derives a
    query's document from its position (doc_k[p(i)]) instead of reading doc_q is off."""
    doc_q, doc_k = inputs.document_ids
    g = torch.Generator().manual_seed(spec.seed + 1)
    count = [int(doc_k[b].max()) // spec.doc_stride + 1 for b in range(spec.B)]
    index = torch.stack([torch.randint(-1, count[b], (spec.Sq,), generator=g) for b in range(spec.B)])
    ids = torch.where(index >= 0, index * spec.doc_stride, index)
    inputs.document_ids = (ids.to(doc_q.device), doc_k)


@given(data=st.data())
@pinned(TILE, DECODE, CROSS_CAUSAL, BLOCKED, SCORED)
def test_document_mask_matches_oracle(impl, device, measure, data):
    """out, lse and the gradients with a document mask against the float64 oracle; one draw in
    three with query ids drawn apart from the positions (the contract takes any ids)."""
    require(impl, "document")
    spec = _spec(data, impl, device)
    if spec is None:
        return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    if spec.Sk and draw_int(data, 0, 2, 0, label="query ids apart from positions (1, 2)"):
        _arbitrary_query_ids(spec, inputs)
    got = run_impl(impl, spec, inputs, grad=grad)
    ref, want, _ = _references(spec, inputs, impl, grad)
    scales = scales_of(spec, inputs)
    for name in ["out", *(["lse"] if got.lse is not None else []), *sorted(got.grads)]:
        check(measure, name, got.get(name), want.get(name), ref.get(name), spec.dtype, scales)


@given(data=st.data())
@pinned(TILE)
def test_other_documents_change_nothing(impl, device, measure, data):
    """The queries of one document give the same out and lse, and its queries and keys the same
    gradients, when every token of the other documents gets other values."""
    require(impl, "document")
    spec = _spec(data, impl, device, forbid=("bias",))
    if spec is None:
        return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    doc_q, doc_k = (d.to(inputs.q.device) for d in inputs.document_ids)
    d = 0 if isinstance(data, Pinned) else data.draw(st.integers(0, len(spec.documents[0]) - 1), label="document")
    mine_q, mine_k = doc_q[0] == d * spec.doc_stride, doc_k[0] == d * spec.doc_stride
    changes = {}
    for salt, (name, mine) in enumerate((("q", mine_q), ("k", mine_k), ("v", mine_k))):
        t = getattr(inputs, name).detach().clone()
        fresh = noise(getattr(inputs, name), spec, 70 + salt, 3.0)
        keep = torch.zeros(t.shape[0], 1, t.shape[2], 1, dtype=torch.bool, device=t.device)
        keep[0, 0, :, 0] = mine
        keep[1:] = True  # other batch elements keep their values: this is about documents
        changes[name] = torch.where(keep, t, fresh)
    other = with_tensors(inputs, **changes)
    a = run_impl(impl, spec, inputs, grad=grad)
    b = run_impl(impl, spec, other, grad=grad)
    _, _, errors = _references(spec, inputs, impl, grad)
    scales = scales_of(spec, inputs)
    for name in quantities(a, errors, grad):
        rows = mine_k if name in ("dk", "dv") else mine_q
        x, y = a.get(name)[0], b.get(name)[0]
        x, y = x[:, rows.to(x.device)], y[:, rows.to(y.device)]
        check_runs(measure, name, y, x, impl, errors[name], spec.dtype, scales[name], exact=False)


@given(data=st.data())
@pinned(TILE)
def test_documents_equal_each_document_alone(impl, device, measure, data):
    """Self-attention (Sq = Sk) with documents equals the same implementation's dense call on each
    document alone: causal and sliding windows are relative, so they hold within a document."""
    require(impl, "document")
    spec = _spec(data, impl, device, forbid=("cross", "key_padding", "bias", "blocked_window", "top_left"), B=1)
    if spec is None:
        return
    inputs = fresh_inputs(spec, impl)
    whole = run_impl(impl, spec, inputs)
    _, _, errors = _references(spec, inputs, impl, False)
    scales = scales_of(spec, inputs)
    start = 0
    for length in spec.documents[0]:
        part = spec.replace(Sq=length, Sk=length, documents=None)
        if not impl.covers(part):
            return
        # the document's tokens; whatever else the inputs carry for every position stays as it is
        piece = dataclasses.replace(inputs, document_ids=None, **{
            n: getattr(inputs, n)[:, :, start : start + length].contiguous() for n in ("q", "k", "v", "grad_out")})
        alone = run_impl(impl, part, piece)
        for name in quantities(whole, errors, False):
            if alone.get(name) is None:
                continue
            got = whole.get(name)[:, :, start : start + length]
            check_runs(measure, name, got, alone.get(name), impl, errors[name], spec.dtype, scales[name], exact=False)
        start += length
