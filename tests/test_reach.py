"""Layouts, the row-wise oracle and sampled-row references (properties/strategies.py,
attnbench/spec.py, oracles/dense.py, properties/harness.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import Phase, find, given, settings
from hypothesis import strategies as st

from attnbench.impls.naive import naive
from attnbench.oracles import dense
from attnbench.properties import harness
from attnbench.properties.strategies import CAPS, caps_for, draw_documents, paged_specs, specs_for, use_full_palette, varlen_specs
from attnbench.spec import GRAD_LAYOUTS, LAYOUTS, Spec

BASE = Spec(B=2, Hq=4, Hkv=2, Sq=5, Sk=7, D=8, Dv=16, bias="full", key_lengths=(3, 7), dtype="float64")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts_keep_values_and_change_strides(layout):
    base, laid = BASE.make_inputs(), BASE.replace(layout=layout).make_inputs(requires_grad=True)
    for name in "qkv":
        a, b = getattr(base, name), getattr(laid, name)
        assert a.shape == b.shape and b.is_leaf and b.requires_grad
        if layout == "expanded" and name != "q":
            assert b.stride(1) == 0 and torch.equal(b, a[:, :1].expand_as(a))
        else:
            assert torch.equal(a, b)
    if layout != "contiguous":
        assert any(not getattr(laid, n).is_contiguous() for n in "qkv")
    if layout == "offset":
        assert all(getattr(laid, n).storage_offset() > 0 for n in "qkv")
    if layout == "packed":
        assert laid.k.untyped_storage().data_ptr() == laid.v.untyped_storage().data_ptr()  # Sq != Sk: kv packed
    assert f"layout={layout!r}" in BASE.replace(layout=layout).short()


@pytest.mark.parametrize("grad_layout", GRAD_LAYOUTS)
def test_grad_layouts(grad_layout):
    g = BASE.replace(grad_layout=grad_layout).make_inputs().grad_out
    assert g.shape == (2, 4, 5, 16)
    assert g.is_contiguous() == (grad_layout == "contiguous")
    if grad_layout == "broadcast":
        assert set(g.stride()) == {0}


def test_unknown_layout_is_rejected():
    with pytest.raises(ValueError, match="Spec.layout"):
        Spec(layout="nhwc")
    with pytest.raises(ValueError, match="Spec.grad_layout"):
        Spec(grad_layout="diagonal")


def test_row_oracle_equals_the_full_oracle():
    spec = BASE.replace(Sq=37, Sk=50, causal=True, window=(9, 3), align="top_left")
    x = spec.make_inputs()
    out, lse = dense.attention(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
    rows = torch.tensor([0, 5, 36, 17])
    got_out, got_lse = dense.attention_rows(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias, rows=rows, chunk=3)
    torch.testing.assert_close(got_out, out[:, :, rows], rtol=0, atol=1e-14)
    torch.testing.assert_close(got_lse, lse[:, :, rows], rtol=0, atol=1e-14)


@pytest.mark.parametrize("spec", [
    Spec(B=2, Hq=4, Hkv=2, Sq=130, Sk=150, causal=True, window=(9, 3), bias="full", key_lengths=(20, 150),
         dtype="float16"),
    Spec(Hq=2, Sq=100, Sk=90, causal=True, bias="per_key", align="top_left", layout="bshd", block=(7, 1, 1)),
    Spec(B=2, Hq=4, Hkv=2, Sq=130, Sk=150, causal=True, window=(9, 3), key_lengths=(20, 150), dtype="float16",
         softcap=5.0, alibi=True, sinks=True, seed=3),
], ids=["fp16-window-bias", "top-left-block", "fp16-score-features"])
def test_sampled_rows_reference_and_oracle(spec):
    x = harness.fresh_inputs(spec, naive, grad=True)
    rows = harness.sample_rows(spec, (77,))
    assert rows is not None and 77 in rows.tolist() and spec.Sq - 1 in rows.tolist()
    full, part = harness.run_reference(naive, spec, x, None, grad=True), harness.run_reference(naive, spec, x, rows, grad=True)
    assert torch.equal(harness.rows_of(full.out, rows), part.out)
    assert torch.equal(harness.rows_of(full.lse, rows), part.lse)
    assert torch.equal(harness.rows_of(full.grads["dq"], rows), part.grads["dq"])
    whole, sampled = harness.run_oracle(spec, x, grad=True), harness.run_oracle_rows(spec, x, rows, grad=True)
    torch.testing.assert_close(sampled.out, harness.rows_of(whole.out, rows), rtol=0, atol=1e-13)
    torch.testing.assert_close(sampled.grads["dq"], harness.rows_of(whole.grads["dq"], rows), rtol=0, atol=1e-13)


def test_short_problems_check_every_row():
    assert harness.sample_rows(Spec(Sq=harness.ALL_ROWS)) is None


@settings(max_examples=60, database=None, deadline=None, derandomize=True)
@given(data=st.data())
def test_strategies_reach_wide_and_long(data):
    """Hq=4 / Hkv=2 and groups of 16 are drawn on the CPU, long keys only where asked, every
    draw within the device's cell budgets."""
    caps = CAPS["cpu"]
    long = data.draw(st.sampled_from((None, "keys", "all")))
    spec = data.draw(specs_for(naive, long=long))
    cells = spec.B * spec.Hq * spec.Sq * spec.Sk
    if max(spec.Sq, spec.Sk) > caps.length:
        assert long is not None and spec.Sk <= caps.long_length and cells <= caps.long_cells
        if long == "keys":
            assert spec.Sq <= caps.length
    else:
        assert cells <= caps.cells


@pytest.mark.parametrize("heads", [(4, 2), (16, 1)], ids=["Hq4-Hkv2", "group16"])
def test_strategies_draw_wide_gqa(heads):
    """Several kv heads with a group above 1, and a group of 16, are drawn by generation."""
    found = find(specs_for(naive, use=("gqa",)), lambda s: (s.Hq, s.Hkv) == heads,
                 settings=settings(max_examples=2000, database=None, derandomize=True, phases=[Phase.generate]))
    assert (found.Hq, found.Hkv) == heads


GENERATE = settings(max_examples=2000, database=None, derandomize=True, phases=[Phase.generate])


@pytest.mark.parametrize("kind", ["varlen", "paged"])
def test_packed_and_paged_draws_reach_large_groups(kind):
    """A packed batch and a paged step are drawn with a GQA group of 8 or more (a kernel that
    packs a group into a fixed-height tile, or keeps per-head state in a fixed array, shows past it)."""
    strategy = (varlen_specs if kind == "varlen" else paged_specs)(naive)
    found = find(strategy, lambda s: s.Hq // s.Hkv >= 8, settings=GENERATE)
    assert found.Hq // found.Hkv >= 8


def test_paged_draws_reach_blocks_of_several_tiles():
    """Blocks of 128 tokens with more than one 16-key tile of some cache in them are drawn."""
    found = find(paged_specs(naive), lambda s: s.block_size == 128 and max(s.cache_seqlens) > 16, settings=GENERATE)
    assert found.block_size == 128


def test_document_draws_reach_ids_past_16_bits():
    """Document ids 65536 apart are drawn (a kernel narrowing them to int8 / int16 merges documents)."""

    class Draws:  # the DataObject face draw_documents takes, over a composite's draw
        def __init__(self, draw):
            self.draw = lambda strategy, label=None: draw(strategy)

    documented = st.composite(lambda draw: draw_documents(Draws(draw), Spec(Sq=6, Sk=6)))
    found = find(documented(), lambda s: s.doc_stride == 65536 and len(s.documents[0]) > 1, settings=GENERATE)
    assert int(found.document_ids()[1].max()) >= 65536


class _Rejecting:
    """A correct contiguous-only kernel: checks its inputs."""

    def __call__(self, q, k, v, cfg, key_padding_mask=None, bias=None):
        if not all(t.is_contiguous() for t in (q, k, v)):
            raise ValueError("q, k, v: contiguous (B, H, S, D) tensors only")
        return naive.fn(q, k, v, cfg, key_padding_mask=key_padding_mask, bias=bias)


def test_a_kernel_that_rejects_undeclared_layouts_passes():
    impl = dataclasses.replace(naive, name="contiguous_only", fn=_Rejecting(), layouts=("contiguous",),
                               grad_layouts=GRAD_LAYOUTS, reference=False)
    for layout in LAYOUTS[1:]:
        harness.check_rejects(impl, Spec(B=2, Hq=2, Sq=5, layout=layout))


def test_a_kernel_that_computes_on_undeclared_layouts_fails():
    impl = dataclasses.replace(naive, name="silent", layouts=("contiguous",), reference=False)
    with pytest.raises(AssertionError, match="instead of raising"):
        harness.check_rejects(impl, Spec(B=2, Hq=2, Sq=5, layout="bshd"))


@pytest.mark.parametrize("shape", [dict(B=3, Hq=4, Sq=70, D=16), dict(B=2, Hq=5, Sq=33, D=24)])
def test_the_int32_property_body_runs_on_a_small_shape(shape):
    """The GPU-only int32 property (properties/test_long.py) checks sampled heads with this body;
    here it runs on a small CPU shape, so a mistake in the body shows without a GPU."""
    ratios = []
    harness.check_sampled_heads(naive, "cpu", shape, ratios.append)
    assert ratios and max(ratios) <= 1


def test_the_sampled_heads_body_catches_a_wrong_last_head():
    def last_head_wrong(q, k, v, cfg, key_padding_mask=None, bias=None):
        out, lse = naive.fn(q, k, v, cfg, key_padding_mask, bias)
        out = out.clone()
        out[-1, -1] += 1.0  # what an int32 offset overflow does to the last (batch, head)
        return out, lse

    broken = dataclasses.replace(naive, name="last_head_wrong", fn=last_head_wrong, reference=False)
    with pytest.raises(AssertionError, match="batch 2, head 3"):
        harness.check_sampled_heads(broken, "cpu", dict(B=3, Hq=4, Sq=40, D=16), lambda r: None)


def test_compiled_impls_draw_from_the_compile_palette():
    """On a GPU an implementation that compiles draws head dims and ordinary groups from the
    device's compile palette (a bounded set of specializations), while lengths still reach
    their edges: 1, block multiples + 1, Sq != Sk."""
    caps = CAPS["cuda"]
    compiled = dataclasses.replace(naive, devices=("cuda", "cpu"), compiles=True)
    palette = set(caps.compiled_head_dims)
    groups = {1, *caps.compiled_groups, *caps.groups}
    fast = settings(max_examples=300, database=None, derandomize=True, phases=[Phase.generate])

    @fast
    @given(specs_for(compiled, device="cuda"))
    def in_palette(spec):
        assert {spec.D, spec.Dv} <= palette and spec.Hq // spec.Hkv in groups

    in_palette()
    for edge in (lambda s: s.Sq == 1 and s.Sk > 1, lambda s: s.Sk % 16 == 1 and s.Sk > 16 and s.D == 96):
        assert find(specs_for(compiled, device="cuda"), edge, settings=fast)
    plain = dataclasses.replace(compiled, compiles=False)  # an impl that does not compile keeps every head dim
    assert find(specs_for(plain, device="cuda"), lambda s: s.D not in palette, settings=fast)


def test_the_thorough_profile_draws_every_head_dim():
    compiled = dataclasses.replace(naive, devices=("cuda", "cpu"), compiles=True)
    assert caps_for("cuda", compiled).head_dims == CAPS["cuda"].compiled_head_dims
    use_full_palette(True)
    try:
        assert caps_for("cuda", compiled).head_dims == CAPS["cuda"].head_dims
        assert caps_for("cuda", compiled).compiled_groups == ()
    finally:
        use_full_palette(False)


def test_runs_on_relaid_inputs_are_compared_within_the_rule():
    """with_tensors keeps an expanded K where the new values allow it; where they differ along the
    expand it makes a plain copy, and runs on the two are not held to bit equality (a batched
    matmul over a zero-stride batch rounds differently from one over a copy)."""
    spec = Spec(B=2, Hq=2, Sq=3, Sk=5, D=8, layout="expanded")
    inputs = spec.make_inputs()
    assert harness._expanded_dims(inputs.k) is not None
    same = harness.with_tensors(inputs, k=harness.noise(inputs.k, spec, 1))
    assert harness._expanded_dims(same.k) is not None
    assert harness.exact_between(inputs, same) is None
    other = harness.with_tensors(inputs, k=torch.randn(inputs.k.shape, dtype=inputs.k.dtype))
    assert other.k.is_contiguous()
    assert harness.exact_between(inputs, other) is False
