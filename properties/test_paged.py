"""The paged KV cache (oracles/CONTRACT.md 1.3): attention through a block table equals attention
over the contiguous cache; where the blocks sit, what unused blocks and slots hold, and block
sizes that divide nothing change nothing; decoding and chunked prefill step by step, appending
each step's keys and values to the pool (attnbench.packing.append_kv), equal the full pass."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.oracles import dense
from attnbench.packing import PagedInputs, PagedSpec, append_kv
from attnbench.properties import tolerance
from attnbench.properties.harness import (
    Run,
    check,
    check_runs,
    paged_contiguous,
    paged_scales,
    reference_impl,
    require,
    run_impl,
    run_paged,
    run_paged_oracle,
)
from attnbench.properties.strategies import Pinned, draw_case, paged_specs, pinned
from attnbench.spec import Inputs

pytestmark = pytest.mark.variant("dense")

STRIDE = Pinned(PagedSpec(cache_seqlens=(5, 7), block_size=4, table_pad=2, Hq=2, Hkv=1),
                "a block table cut from a wider one: index rows by stride(0)")
DIVIDE = Pinned(PagedSpec(cache_seqlens=(17, 1, 0), Sq=1, block_size=5, poison=True, causal=True, window=(6, 0)),
                "block size 5 dividing nothing, one-token and empty caches, NaN in unused slots")
DECODE = Pinned(PagedSpec(cache_seqlens=(7, 20, 3, 1, 12), Sq=1, block_size=4, Hq=4, Hkv=2, D=80, scale=0.3,
                          window=(5, None), layout="packed"),
                "decoding 5 sequences, D = 80, a scale other than 1/sqrt(D), K and V in one pool")
LONG = Pinned(PagedSpec(cache_seqlens=(130, 65), Sq=2, block_size=16, window=(70, 1), poison=True),
              "caches across 64- and 128-token tiles and 16-token blocks; a window reaching one new token ahead")
EMPTY_POOL = Pinned(PagedSpec(cache_seqlens=(0, 0), Sq=1, spare_blocks=0), "no token cached at all: a pool of 0 blocks")
CHUNK = Pinned(PagedSpec(cache_seqlens=(9, 4), Sq=4, block_size=3, Hq=4, Hkv=2, causal=True, spare_blocks=2,
                         window=(5, 0), softcap=2.5), "a chunk of 4 new tokens, GQA, a window and a soft cap")
BIG_BLOCKS = Pinned(PagedSpec(cache_seqlens=(150, 40), Sq=2, block_size=128, Hq=8, Hkv=1, causal=True, poison=True),
                    "128-token blocks, each several 16-key tiles, the last partly used; a GQA group of 8")
BIG_POOL = Pinned(PagedSpec(cache_seqlens=(300, 2), Sq=1, block_size=1, spare_blocks=33000, D=16),
                  "a cache of 300 tokens (past 8 bits) in a pool of 33302 blocks, ids past int16, permuted")
SHORT_CACHE = Pinned(PagedSpec(cache_seqlens=(2, 6), Sq=4, Hq=2, Hkv=1, causal=True),
                     "a cache holding fewer tokens than the new queries: the first ones sit before token 0 "
                     "and see nothing")


def _names(run: Run) -> list[str]:
    return ["out", *(["lse"] if run.lse is not None else [])]


def _errors(impl, spec: PagedSpec, inputs: PagedInputs) -> tuple[Run, Run, dict[str, float]]:
    ref = run_paged(reference_impl(impl), spec, inputs)
    want = run_paged_oracle(spec, inputs)
    return ref, want, {n: tolerance.max_error(ref.get(n), want.get(n))[0] for n in _names(ref)}


@given(data=st.data())
@pinned(STRIDE, DIVIDE, CHUNK, DECODE, LONG, EMPTY_POOL, BIG_BLOCKS, BIG_POOL, SHORT_CACHE)
def test_paged_matches_oracle(impl, device, measure, data):
    """out and lse of the paged call against the float64 oracle over each sequence's gathered
    cache, query i of sequence b at position cache_seqlens[b] - Sq + i; and out of the inference
    call (return_lse=False), which may take its own path."""
    require(impl, "paged_kv")
    spec = draw_case(data, impl, device, paged_specs(impl, device))
    if spec is None:
        return
    inputs = spec.make_inputs()
    got = run_paged(impl, spec, inputs)
    ref, want, _ = _errors(impl, spec, inputs)
    if "lse" in impl.features and got.lse is None:
        raise AssertionError(f"{impl.key} declares 'lse' but its paged call returned None")
    scales = paged_scales(spec, inputs)
    for name in _names(got):
        check(measure, name, got.get(name), want.get(name), ref.get(name), spec.dtype, scales)
    inference = run_paged(impl, spec, inputs, return_lse=False)
    check(measure, "out", inference.out, want.out, ref.out, spec.dtype, scales)


@given(data=st.data())
@pinned(STRIDE, CHUNK)
def test_paged_equals_contiguous_cache(impl, device, measure, data):
    """The paged call equals the same implementation's dense call on each sequence's contiguous
    cache (B = 1, Sk = cache_seqlens[b])."""
    require(impl, "paged_kv")
    spec = draw_case(data, impl, device, paged_specs(impl, device))
    if spec is None:
        return
    dense = spec.dense_specs()
    if not all(impl.covers(s) for s in dense):
        return
    inputs = spec.make_inputs()
    paged = run_paged(impl, spec, inputs)
    _, _, errors = _errors(impl, spec, inputs)
    scales = paged_scales(spec, inputs)
    ks, vs = paged_contiguous(inputs)
    shapes = iter(dense)
    for b, (k, v) in enumerate(zip(ks, vs)):
        if not k.shape[2]:
            continue
        one = Inputs(q=inputs.q[b : b + 1].clone(), k=k.contiguous(), v=v.contiguous(), key_padding_mask=None,
                     bias=None, grad_out=inputs.grad_out[b : b + 1])
        alone = run_impl(impl, next(shapes), one, cfg=spec.config())
        for name in _names(paged):
            if alone.get(name) is None:
                continue
            check_runs(measure, name, paged.get(name)[b : b + 1], alone.get(name), impl, errors[name], spec.dtype,
                       scales.get(name, 1.0), exact=False)


@given(data=st.data())
@pinned(STRIDE, DIVIDE)
def test_block_placement_and_poison_change_nothing(impl, device, measure, data):
    """The same sequences with the physical blocks in another order, other spare blocks, a table
    cut from a wider one, and NaN in every unused block, slot past cache_seqlens and table
    entry past a sequence's last block: the same result (bit for bit for a deterministic impl)."""
    require(impl, "paged_kv")
    spec = draw_case(data, impl, device, paged_specs(impl, device))
    if spec is None:
        return
    other = spec.replace(permute=not spec.permute, poison=not spec.poison, spare_blocks=(spec.spare_blocks + 1) % 3,
                         table_pad=2 - spec.table_pad)
    a_in, b_in = spec.make_inputs(), _same_tokens(spec, other)
    a = run_paged(impl, spec, a_in)
    b = run_paged(impl, other, b_in)
    _, _, errors = _errors(impl, spec, a_in)
    scales = paged_scales(spec, a_in)
    for name in _names(a):
        check_runs(measure, name, b.get(name), a.get(name), impl, errors[name], spec.dtype, scales.get(name, 1.0))


def _same_tokens(spec: PagedSpec, other: PagedSpec) -> PagedInputs:
    """`other`'s pool and table holding `spec`'s tokens: every sequence's cached keys and values
    rewritten, token by token, into the blocks other's table names."""
    src, dst = spec.make_inputs(), other.make_inputs()
    ks, vs = paged_contiguous(src)
    table = dst.block_table.cpu().long()
    size = other.block_size
    for b, (k, v) in enumerate(zip(ks, vs)):
        for t in range(k.shape[2]):
            dst.k_cache[table[b, t // size], t % size] = k[0, :, t]
            dst.v_cache[table[b, t // size], t % size] = v[0, :, t]
    dst.q = src.q.clone()
    dst.grad_out = src.grad_out.clone()
    return dst


@given(data=st.data())
@pinned(Pinned(PagedSpec(cache_seqlens=(6, 11), Sq=1, block_size=4, Hq=2, Hkv=1, causal=True, window=(4, 0)),
               "decoding one token at a time across block edges"))
def test_decoding_step_by_step(impl, device, measure, data):
    """A cache that grows step by step: a prompt written and attended in one chunked-prefill call,
    then steps of Sq new tokens (1: decoding, or a chunk), each appended to the pool with
    append_kv before the call. Every step equals the oracle over the contiguous cache so far."""
    require(impl, "paged_kv")
    spec = draw_case(data, impl, device, paged_specs(impl, device))
    if spec is None:
        return
    step = spec.Sq
    total = max(spec.cache_seqlens)
    if "cross" not in impl.features or total == 0:
        return  # a growing cache has more keys than new queries
    prompt = 0 if isinstance(data, Pinned) else data.draw(st.integers(0, total), label="prompt")
    g = torch.Generator().manual_seed(spec.seed)
    B, Hkv, dt = spec.B, spec.Hkv, spec.torch_dtype
    k_all = spec.magnitude * torch.randn(B, total, Hkv, spec.D, dtype=torch.float64, generator=g)
    v_all = torch.randn(B, total, Hkv, spec.Dv, dtype=torch.float64, generator=g)
    q_all = spec.magnitude * torch.randn(B, spec.Hq, total, spec.D, dtype=torch.float64, generator=g)
    k_all, v_all, q_all = (t.to(device=device, dtype=dt) for t in (k_all, v_all, q_all))
    pool = spec.replace(cache_seqlens=(total,) * B).make_inputs()  # its table; every slot starts as NaN
    k_cache, v_cache = (torch.full_like(c, float("nan")) for c in (pool.k_cache, pool.v_cache))
    lengths = torch.zeros(B, dtype=torch.int32, device=device)
    cuts = sorted({prompt, *range(prompt + step, total, step), total} - {0})
    done = 0
    for cut in cuts:
        n = cut - done
        lengths = append_kv(k_cache, v_cache, pool.block_table, lengths, k_all[:, done:cut], v_all[:, done:cut])
        inputs = PagedInputs(q=q_all[:, :, done:cut].contiguous(), k_cache=k_cache.clone(), v_cache=v_cache.clone(),
                             block_table=pool.block_table, cache_seqlens=lengths.clone(),
                             grad_out=torch.zeros(B, spec.Hq, n, spec.Dv, dtype=dt, device=device))
        now = spec.replace(cache_seqlens=(cut,) * B, Sq=n)
        if not impl.covers(now):
            return
        got = run_paged(impl, now, inputs)
        ref = run_paged(reference_impl(impl), now, inputs)
        k, v = (t[:, :cut].permute(0, 2, 1, 3).to(torch.float64) for t in (k_all, v_all))
        out, lse = dense.attention(q_all[:, :, done:cut].to(torch.float64), k, v, now.config())
        want = Run(out=out, lse=lse)  # the dense oracle over the contiguous cache so far
        scales = paged_scales(now, inputs)
        for name in _names(got):
            check(measure, name, got.get(name), want.get(name), ref.get(name), spec.dtype, scales)
        done = cut


def test_paged_rejects_a_short_table(impl, device):
    """cache_seqlens beyond what the block table can hold (max_blocks * block_size) is refused."""
    require(impl, "paged_kv")
    spec = PagedSpec(cache_seqlens=(5,), block_size=4, device=device)
    if not impl.covers(spec):
        pytest.skip(f"{impl.key} does not cover {spec.short()}")
    inputs = spec.make_inputs()
    too_long = torch.tensor([9], dtype=torch.int32, device=device)
    with pytest.raises(ValueError):
        impl.paged(inputs.q, inputs.k_cache, inputs.v_cache, inputs.block_table, too_long, spec.config())
