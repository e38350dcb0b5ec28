"""Packed and paged specs (attnbench.packing): validation, printing, inputs, append_kv; and
document masks on the dense Spec."""

from __future__ import annotations

import pytest
import torch

from attnbench.packing import PagedSpec, VarlenSpec, append_kv
from attnbench.spec import Spec


@pytest.mark.parametrize("bad, field", [
    (dict(seqlens=()), "seqlens"), (dict(seqlens=((1, -1),)), "seqlens"), (dict(Hq=3, Hkv=2), "Hkv"),
    (dict(window=(-1, 0)), "window"), (dict(dtype="int8"), "dtype"),
])
def test_varlen_spec_names_the_bad_field(bad, field):
    with pytest.raises(ValueError, match=f"VarlenSpec.{field}:"):
        VarlenSpec(**bad)


@pytest.mark.parametrize("bad, field", [
    (dict(cache_seqlens=(-1,)), "cache_seqlens"), (dict(Sq=0), "Sq"), (dict(block_size=0), "block_size"),
    (dict(table_pad=-1), "table_pad"),
])
def test_paged_spec_names_the_bad_field(bad, field):
    with pytest.raises(ValueError, match=f"PagedSpec.{field}:"):
        PagedSpec(**bad)


def test_specs_print_as_python_that_pastes_back():
    for spec in (VarlenSpec(seqlens=((0, 3), (1, 1)), Hq=4, Hkv=2, causal=True, window=(2, None)),
                 PagedSpec(cache_seqlens=(5, 0), Sq=2, block_size=3, poison=True, table_pad=2),
                 Spec(B=2, Sq=4, documents=((1, 3), (4,)))):
        assert eval(spec.short()) == spec, spec.short()


def test_document_masks_leave_other_inputs_bit_identical():
    plain = Spec(B=2, Sq=5, Sk=7, causal=True, seed=3)
    docs = plain.replace(documents=((2, 5), (7,)))
    a, b = plain.make_inputs(), docs.make_inputs()
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("q", "k", "v", "grad_out"))
    doc_q, doc_k = b.document_ids
    assert doc_k.tolist() == [[0, 0, 1, 1, 1, 1, 1], [0] * 7]
    assert doc_q.tolist() == [[1] * 5, [0] * 5]  # query i takes the document of key i + 2
    with pytest.raises(ValueError, match="Spec.documents:"):
        plain.replace(documents=((3, 3), (7,)))


def test_paged_inputs_hold_each_sequence_in_its_blocks():
    spec = PagedSpec(cache_seqlens=(7, 0, 4), block_size=3, table_pad=2, spare_blocks=2, poison=True)
    inputs = spec.make_inputs()
    table = inputs.block_table
    assert tuple(table.shape) == (3, 3) and table.stride(0) == 5  # a column slice of a wider table
    used = {int(table[0, n]) for n in range(3)} | {int(table[2, n]) for n in range(2)}
    assert len(used) == 5 and spec.num_blocks == 7
    spare = set(range(7)) - used
    assert all(torch.isnan(inputs.k_cache[b]).all() for b in spare)
    assert torch.isnan(inputs.k_cache[int(table[0, 2]), 1:]).all()  # slots past 7 tokens
    assert torch.isfinite(inputs.k_cache[int(table[0, 2]), :1]).all()


def test_append_kv_fills_the_named_slots():
    """Token t of sequence b goes to slot t % block_size of block table[b, t // block_size]."""
    pool = PagedSpec(cache_seqlens=(7, 5), block_size=3, spare_blocks=0).make_inputs()
    k_cache, v_cache = torch.zeros_like(pool.k_cache), torch.zeros_like(pool.v_cache)
    k_new = torch.arange(8, dtype=torch.float32).view(2, 4, 1, 1).expand(2, 4, 1, 16)
    lengths = append_kv(k_cache, v_cache, pool.block_table, torch.zeros(2, dtype=torch.int32), k_new, k_new)
    lengths = append_kv(k_cache, v_cache, pool.block_table, lengths, k_new[:, :1] + 100, k_new[:, :1] + 100)
    assert lengths.tolist() == [5, 5]
    table = pool.block_table.long()
    for b in range(2):
        for t in range(5):
            want = 100 + 4 * b if t == 4 else 4 * b + t
            assert k_cache[table[b, t // 3], t % 3, 0, 0] == want, (b, t)
    five = torch.cat([k_new, k_new[:, :1]], 1)
    with pytest.raises(ValueError, match="append_kv"):
        append_kv(k_cache, v_cache, pool.block_table, lengths, five, five)  # 10 tokens > the table's 3 blocks of 3


def test_impl_declares_a_call_convention_with_its_function():
    from attnbench.impls import naive
    from attnbench.registry import Impl

    dense = naive.naive.features - {"varlen", "paged_kv"}
    with pytest.raises(ValueError, match="'varlen' and the varlen function come together"):
        Impl(name="x", variant="dense", fn=naive.attention, features=dense | {"varlen"})
    with pytest.raises(ValueError, match="'paged_kv' and the paged function come together"):
        Impl(name="x", variant="dense", fn=naive.attention, features=dense, paged=naive.paged)
    impl = Impl(name="x", variant="dense", fn=naive.attention, features=dense | {"varlen"}, varlen=naive.varlen)
    assert impl.covers(VarlenSpec(seqlens=((0, 2), (3, 3)), causal=True))
    no_gqa = Impl(name="y", variant="dense", fn=naive.attention, features=dense - {"gqa"} | {"varlen"},
                  varlen=naive.varlen)
    assert no_gqa.why_not(VarlenSpec(seqlens=((1, 1),), Hq=2, Hkv=1)) == "unsupported features: gqa"
    assert impl.why_not(PagedSpec()) == "unsupported features: paged_kv"


def test_varlen_contract_is_checked_around_the_call():
    from attnbench.checks import ContractError
    from attnbench.impls import naive
    from attnbench.properties.harness import call_varlen

    spec = VarlenSpec(seqlens=((2, 3), (0, 1)), Hq=3)
    inputs = spec.make_inputs()

    def flat_lse(*args):
        out, lse = naive.varlen(*args)
        return out, lse.t()

    def writes_k(*args):
        result = naive.varlen(*args)
        args[1].data.add_(1.0)
        return result

    with pytest.raises(ContractError, match="lse"):
        call_varlen(flat_lse, inputs, spec.config(), who="flat")
    with pytest.raises(ContractError, match="mutated its input k"):
        call_varlen(writes_k, spec.make_inputs(), spec.config(), who="writer")
    run = call_varlen(naive.varlen, inputs, spec.config(), who="naive")
    assert run.out.shape == (2, 3, 16) and run.lse.shape == (3, 2)


@pytest.mark.parametrize("cfg_change, why", [(dict(align="top_left"), "bottom-right"), (dict(dropout_p=0.1), "dropout")])
def test_packed_calls_refuse_what_they_do_not_take(cfg_change, why):
    import dataclasses

    from attnbench.impls import naive

    spec = VarlenSpec(seqlens=((2, 2),))
    inputs = spec.make_inputs()
    cfg = dataclasses.replace(spec.config(), **cfg_change)
    with pytest.raises(ValueError, match=why):
        naive.varlen(*inputs.args(), cfg)
