"""Block-table indexing with the wrong stride: the table is read as if its rows were
max_blocks = block_table.shape[1] entries apart in memory, its row stride taken from the shape
instead of block_table.stride(0). Right for a contiguous table; a table that is a column slice
of a wider one (vLLM's preallocated table cut to the batch's longest sequence) sends every
sequence past the first to another sequence's blocks."""

import torch

import attnbench.impls.naive as _naive
from attnbench.checks import check_paged
from attnbench.registry import Impl
from attnbench.zoo._base import BASE_FEATURES, Kernel


def paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, return_lse=True):
    lengths = check_paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, who="zoo")
    B, M = block_table.shape
    rows = block_table.as_strided((B, M), (M, 1))  # the bug: row stride M, not block_table.stride(0)
    size = k_cache.shape[1]
    outs, lses = [], []
    for b, n in enumerate(lengths):
        t = torch.arange(n, device=q.device)
        blocks = rows[b].long()[t // size]
        kb, vb = (c[blocks, t % size].permute(1, 0, 2)[None] for c in (k_cache, v_cache))
        out, lse = _naive.attention(q[b : b + 1], kb, vb, cfg)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)


paged_table_stride = Impl(
    name="paged_table_stride",
    variant="dense",
    fn=Kernel(),
    features=BASE_FEATURES | {"paged_kv"},
    paged=paged,
    bug="paged KV: block-table rows read with the wrong stride (shape[1] instead of stride(0))",
)
