"""The float64 oracles for packed (varlen) batches and the paged KV cache (oracles/CONTRACT.md,
sections 1.1 and 1.3), by reduction to the dense oracle: each sequence is cut out of the packed
tensors (or gathered from the block pool, token by token through the block table) and run
through oracles.dense.attention on its own, with bottom-right alignment per sequence.

The slicing and gathering are written here from the definitions and share no code with any
implementation.
"""

from __future__ import annotations

import torch

from attnbench.checks import check_paged, check_varlen
from attnbench.oracles import dense
from attnbench.spec import Config


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int,
                     cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, Hq, Dv) and lse (Hq, total_q) in float64, differentiable: sequence b's
    queries q[cu_q[b]:cu_q[b+1]] attend only to its keys k[cu_k[b]:cu_k[b+1]]."""
    bounds = check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, who="oracle")
    outs, lses = [], []
    for q0, q1, k0, k1 in bounds:
        qb, kb, vb = (t.to(torch.float64).transpose(0, 1)[None] for t in (q[q0:q1], k[k0:k1], v[k0:k1]))
        out, lse = dense.attention(qb, kb, vb, cfg)
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    Hq, Dv = q.shape[1], v.shape[2]
    out = torch.cat(outs, 0) if outs else q.new_zeros(0, Hq, Dv, dtype=torch.float64)
    return out, torch.cat(lses, 1)


def gather(cache: torch.Tensor, table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens 0 .. length - 1 of one sequence from a block pool (num_blocks, block_size, H, D):
    token t lives in slot t % block_size of physical block table_row[t // block_size]. Returns
    (H, length, D)."""
    size = cache.shape[1]
    rows = [cache[int(table_row[t // size]), t % size] for t in range(length)]
    if not rows:
        return cache.new_zeros(cache.shape[2], 0, cache.shape[3])
    return torch.stack(rows, 1)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    cache_seqlens: torch.Tensor, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) in float64, differentiable in q: sequence b's
    queries attend over its first cache_seqlens[b] cached tokens, query i at position
    cache_seqlens[b] - Sq + i."""
    lengths = check_paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, who="oracle")
    table = block_table.cpu()
    outs, lses = [], []
    for b, n in enumerate(lengths):
        kb = gather(k_cache, table[b], n).to(torch.float64)[None]
        vb = gather(v_cache, table[b], n).to(torch.float64)[None]
        out, lse = dense.attention(q[b : b + 1].to(torch.float64), kb, vb, cfg)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 0), torch.cat(lses, 0)
