"""Packed (variable-length) batches and the paged KV cache: their specs, inputs and helpers.

Two call conventions beyond the dense one (oracles/CONTRACT.md, sections 1.1 and 1.3):

- varlen: fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg,
  return_lse=True) -> (out, lse), with q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv)
  packed along the token axis, cu_seqlens int32 (B + 1,) prefix sums of the lengths, out
  (total_q, Hq, Dv) and lse (Hq, total_q) or None: flash-attn's varlen convention.
- paged: fn(q, k_cache, v_cache, block_table, cache_seqlens, cfg, return_lse=True) -> (out, lse),
  with q (B, Hq, Sq, D) the newest Sq tokens of each sequence, k_cache / v_cache (num_blocks,
  block_size, Hkv, D / Dv) the block pool, block_table int32 (B, max_blocks) and cache_seqlens
  int32 (B,) the tokens in the cache, the Sq new ones included (already appended, as vLLM's
  reshape_and_cache does); out (B, Hq, Sq, Dv), lse (B, Hq, Sq) or None.

A VarlenSpec / PagedSpec is plain data like attnbench.spec.Spec, and shares its fields, checks,
printing and features through attnbench.spec.SpecBase: it validates itself, says which features it
needs, makes seeded inputs and prints as Python that pastes back. `dense_specs()`
gives the dense Spec of each sequence, which carries an implementation's size limits.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attnbench.spec import Spec, SpecBase


class _PackedBase(SpecBase):
    """What VarlenSpec and PagedSpec share beyond SpecBase: the checks of their shared fields
    (before their own) and the dense Spec of one sequence."""

    def _shared_problems(self) -> Iterator[tuple[str, str]]:
        yield from self._size_problems("Hq", "Hkv", "D", "Dv")
        yield from self._field_problems("dtype", "device", "scale", "window", "magnitude", "softcap")

    def _dense_spec(self, Sq: int, Sk: int) -> Spec:
        return Spec(Sq=Sq, Sk=Sk, **{name: getattr(self, name) for name in self.SHARED})


def cu_seqlens(lengths: list[int] | tuple[int, ...], device: str | torch.device = "cpu") -> torch.Tensor:
    """int32 (B + 1,) prefix sums of the lengths, starting at 0."""
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + n)
    return torch.tensor(offsets, dtype=torch.int32, device=device)


# How the packed and paged tensors sit in memory (VarlenSpec.layout, PagedSpec.layout): names of
# attnbench.spec.LAYOUTS, so one Impl.layouts declaration covers every call convention. The values
# are the same in every layout; the first is the default and shrink target.
VARLEN_LAYOUTS = ("contiguous", "packed", "offset")
PAGED_LAYOUTS = ("contiguous", "packed", "bshd")


def _layout_problem(layout: str, allowed: tuple[str, ...]) -> str | None:
    return None if layout in allowed else f"unknown layout {layout!r}; one of {allowed}"


def packed_tokens(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """(total, H, D) tensors with one token count as column slices of one (total, sum H*D) buffer
    (a fused projection's output: token stride sum H*D, head stride D), the same values."""
    total = tensors[0].shape[0]
    buf = torch.cat([t.reshape(total, t.shape[1] * t.shape[2]) for t in tensors], dim=-1)
    views, start = [], 0
    for t in tensors:
        width = t.shape[1] * t.shape[2]
        views.append(buf[:, start : start + width].unflatten(-1, tuple(t.shape[1:])))
        start += width
    return views


def offset_tokens(t: torch.Tensor, start: int) -> torch.Tensor:
    """(total, H, D) as rows start .. start + total of a wider, longer buffer: a storage offset,
    and a token stride of H * D + 16 (rows of a larger cache), the same values."""
    total, H, D = t.shape
    buf = torch.zeros(start + total + 4, H * D + 16, dtype=t.dtype, device=t.device)
    buf[start : start + total, : H * D] = t.reshape(total, H * D)
    return buf[start : start + total, : H * D].unflatten(-1, (H, D))


# -- varlen ------------------------------------------------------------------------------------
@dataclass
class VarlenInputs:
    q: torch.Tensor  # (total_q, Hq, D)
    k: torch.Tensor  # (total_k, Hkv, D)
    v: torch.Tensor  # (total_k, Hkv, Dv)
    cu_seqlens_q: torch.Tensor  # int32 (B + 1,)
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    grad_out: torch.Tensor  # (total_q, Hq, Dv)

    def args(self) -> tuple:
        """The varlen call's tensor and length arguments, in call order (cfg follows)."""
        return (self.q, self.k, self.v, self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q, self.max_seqlen_k)


@dataclass(frozen=True)
class VarlenSpec(_PackedBase):
    """A packed batch: sequence b has seqlens[b] = (queries, keys) tokens, 0 allowed."""

    seqlens: tuple[tuple[int, int], ...] = ((16, 16),)
    Hq: int = 1
    Hkv: int | None = None  # default: Hq
    D: int = 16
    Dv: int | None = None  # default: D
    dtype: str = "float32"
    device: str = "cpu"
    scale: float | None = None  # default 1/sqrt(D)
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    magnitude: float = 1.0
    seed: int = 0
    softcap: float | None = None  # logit soft cap (Config.softcap)
    layout: str = "contiguous"  # how q, k, v sit in memory (VARLEN_LAYOUTS)

    def __post_init__(self) -> None:
        self._fill_defaults()
        object.__setattr__(self, "seqlens", tuple(tuple(int(n) for n in pair) for pair in self.seqlens))
        self.validate()

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from self._shared_problems()
        if not self.seqlens:
            yield "seqlens", "needs at least one sequence"
        for pair in self.seqlens:
            if len(pair) != 2 or min(pair) < 0:
                yield "seqlens", f"each entry is (queries, keys) with both >= 0, got {pair!r}"
                break
        why = _layout_problem(self.layout, VARLEN_LAYOUTS)
        if why:
            yield "layout", why

    @property
    def B(self) -> int:
        return len(self.seqlens)

    @property
    def longest(self) -> int:
        """The longest sequence, queries or keys."""
        return max(max(pair) for pair in self.seqlens)

    def _own_needs(self) -> dict[str, bool]:
        return {"cross": any(sq != sk for sq, sk in self.seqlens), "varlen": True}

    def dense_specs(self) -> list[Spec]:
        """The dense Spec of each sequence with at least one query and one key."""
        return [self._dense_spec(sq, sk) for sq, sk in self.seqlens if sq and sk]

    def make_inputs(self, requires_grad: bool = False) -> VarlenInputs:
        """Seeded packed inputs: q, k, v, grad_out drawn in float64 and cast."""
        g = torch.Generator().manual_seed(self.seed)
        tq = sum(sq for sq, _ in self.seqlens)
        tk = sum(sk for _, sk in self.seqlens)
        shapes = [(tq, self.Hq, self.D), (tk, self.Hkv, self.D), (tk, self.Hkv, self.Dv), (tq, self.Hq, self.Dv)]
        q, k, v, grad_out = (torch.randn(*s, dtype=torch.float64, generator=g) for s in shapes)
        q, k = self.magnitude * q, self.magnitude * k
        q, k, v, grad_out = (t.to(device=self.device, dtype=self.torch_dtype) for t in (q, k, v, grad_out))
        q, k, v = self._laid_out(q, k, v)
        return VarlenInputs(
            q=q.requires_grad_(requires_grad), k=k.requires_grad_(requires_grad), v=v.requires_grad_(requires_grad),
            cu_seqlens_q=cu_seqlens([sq for sq, _ in self.seqlens], self.device),
            cu_seqlens_k=cu_seqlens([sk for _, sk in self.seqlens], self.device),
            max_seqlen_q=max(sq for sq, _ in self.seqlens), max_seqlen_k=max(sk for _, sk in self.seqlens),
            grad_out=grad_out,
        )

    def _laid_out(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q, k, v in this spec's layout: "packed", slices of one fused qkv projection (q apart and
        k, v fused when total_q != total_k); "offset", rows of wider, longer buffers."""
        if self.layout == "packed":
            if q.shape[0] == k.shape[0]:
                return tuple(packed_tokens([q, k, v]))
            return (q, *packed_tokens([k, v]))
        if self.layout == "offset":
            return tuple(offset_tokens(t, 8 * (n + 1)) for n, t in enumerate((q, k, v)))
        return q, k, v


# -- paged KV cache ----------------------------------------------------------------------------
@dataclass
class PagedInputs:
    q: torch.Tensor  # (B, Hq, Sq, D)
    k_cache: torch.Tensor  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor  # (num_blocks, block_size, Hkv, Dv)
    block_table: torch.Tensor  # int32 (B, max_blocks)
    cache_seqlens: torch.Tensor  # int32 (B,)
    grad_out: torch.Tensor  # (B, Hq, Sq, Dv)

    def args(self) -> tuple:
        return (self.q, self.k_cache, self.v_cache, self.block_table, self.cache_seqlens)


@dataclass(frozen=True)
class PagedSpec(_PackedBase):
    """A decoding / chunked-prefill step over a paged cache: sequence b holds cache_seqlens[b]
    tokens (its Sq newest are the queries' own), stored in blocks of block_size tokens."""

    cache_seqlens: tuple[int, ...] = (16,)
    Sq: int = 1  # new tokens per sequence (the queries)
    block_size: int = 16
    spare_blocks: int = 1  # pool blocks no sequence uses
    table_pad: int = 0  # the block table is a column slice of a table this much wider
    permute: bool = True  # physical blocks in a seeded random order (else in sequence order)
    poison: bool = False  # unused blocks, slots past cache_seqlens and unused table entries hold NaN / spare ids
    Hq: int = 1
    Hkv: int | None = None
    D: int = 16
    Dv: int | None = None
    dtype: str = "float32"
    device: str = "cpu"
    scale: float | None = None
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    magnitude: float = 1.0
    seed: int = 0
    softcap: float | None = None  # logit soft cap (Config.softcap)
    layout: str = "contiguous"  # how q and the pool sit in memory (PAGED_LAYOUTS)

    def __post_init__(self) -> None:
        self._fill_defaults()
        object.__setattr__(self, "cache_seqlens", tuple(int(n) for n in self.cache_seqlens))
        self.validate()

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from self._shared_problems()
        if not self.cache_seqlens or min(self.cache_seqlens) < 0:
            yield "cache_seqlens", f"needs one length >= 0 per sequence, got {self.cache_seqlens!r}"
        yield from self._size_problems("Sq", "block_size")
        for name in ("spare_blocks", "table_pad"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                yield name, f"must be an int >= 0, got {value!r}"
        why = _layout_problem(self.layout, PAGED_LAYOUTS)
        if why:
            yield "layout", why

    @property
    def B(self) -> int:
        return len(self.cache_seqlens)

    @property
    def longest(self) -> int:
        """The longest cache (or Sq, when longer)."""
        return max(self.Sq, *self.cache_seqlens)

    @property
    def blocks_per_seq(self) -> list[int]:
        return [-(-n // self.block_size) for n in self.cache_seqlens]

    @property
    def max_blocks(self) -> int:
        return max(1, *self.blocks_per_seq)

    @property
    def num_blocks(self) -> int:
        return sum(self.blocks_per_seq) + self.spare_blocks

    def _own_needs(self) -> dict[str, bool]:
        return {"cross": any(n != self.Sq for n in self.cache_seqlens), "paged_kv": True}

    def dense_specs(self) -> list[Spec]:
        """The dense Spec of each sequence holding at least one token."""
        return [self._dense_spec(self.Sq, n) for n in self.cache_seqlens if n]

    def make_inputs(self, requires_grad: bool = False) -> PagedInputs:
        """Seeded inputs: q and grad_out, and each sequence's keys and values (drawn contiguous in
        float64, cast) written into the pool through a seeded block table."""
        g = torch.Generator().manual_seed(self.seed)
        B, Hkv = self.B, self.Hkv
        q = self.magnitude * torch.randn(B, self.Hq, self.Sq, self.D, dtype=torch.float64, generator=g)
        grad_out = torch.randn(B, self.Hq, self.Sq, self.Dv, dtype=torch.float64, generator=g)
        order = torch.randperm(self.num_blocks, generator=g) if self.permute else torch.arange(self.num_blocks)
        fill = math.nan if self.poison else 0.0
        k_cache = torch.full((self.num_blocks, self.block_size, Hkv, self.D), fill, dtype=torch.float64)
        v_cache = torch.full((self.num_blocks, self.block_size, Hkv, self.Dv), fill, dtype=torch.float64)
        spare = int(order[-1]) if self.spare_blocks else 0  # what unused table entries name
        table = torch.full((B, self.max_blocks + self.table_pad), spare if self.poison else 0, dtype=torch.int32)
        used = 0
        for b, n in enumerate(self.cache_seqlens):
            k = self.magnitude * torch.randn(n, Hkv, self.D, dtype=torch.float64, generator=g)
            v = torch.randn(n, Hkv, self.Dv, dtype=torch.float64, generator=g)
            blocks = order[used : used + self.blocks_per_seq[b]]
            used += len(blocks)
            table[b, : len(blocks)] = blocks.to(torch.int32)
            for t in range(0, n, self.block_size):
                stop = min(n, t + self.block_size)
                block = int(blocks[t // self.block_size])
                k_cache[block, : stop - t] = k[t:stop]
                v_cache[block, : stop - t] = v[t:stop]
        dev, dt = self.device, self.torch_dtype
        q, k_cache, v_cache = self._laid_out(*(t.to(device=dev, dtype=dt) for t in (q, k_cache, v_cache)))
        return PagedInputs(
            q=q.requires_grad_(requires_grad),
            k_cache=k_cache,
            v_cache=v_cache,
            block_table=table.to(dev)[:, : self.max_blocks],
            cache_seqlens=torch.tensor(self.cache_seqlens, dtype=torch.int32, device=dev),
            grad_out=grad_out.to(device=dev, dtype=dt),
        )

    def _laid_out(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """q and the pool in this spec's layout: "bshd", q a (B, Sq, Hq, D) tensor transposed;
        "packed", that q and K and V interleaved per block in one pool (num_blocks, 2,
        block_size, Hkv, max(D, Dv)), FlashInfer's paged layout: block stride twice a block's."""
        if self.layout == "contiguous":
            return q, k_cache, v_cache
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        if self.layout == "bshd":
            return q, k_cache, v_cache
        width = max(self.D, self.Dv)
        pool = torch.zeros(self.num_blocks, 2, self.block_size, self.Hkv, width, dtype=k_cache.dtype,
                           device=k_cache.device)
        pool[:, 0, ..., : self.D] = k_cache
        pool[:, 1, ..., : self.Dv] = v_cache
        return q, pool[:, 0, ..., : self.D], pool[:, 1, ..., : self.Dv]


def append_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, cache_seqlens: torch.Tensor,
              k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
    """Write k_new / v_new (B, n, Hkv, D / Dv) after each sequence's cache_seqlens[b] tokens, in
    place (the pool must have the blocks the table names), and return the new cache_seqlens."""
    B, n = k_new.shape[:2]
    if tuple(v_new.shape[:2]) != (B, n) or cache_seqlens.shape != (B,) or block_table.shape[0] != B:
        raise ValueError(f"append_kv: k_new {tuple(k_new.shape)}, v_new {tuple(v_new.shape)}, cache_seqlens "
                         f"{tuple(cache_seqlens.shape)} and block_table {tuple(block_table.shape)} disagree on B")
    size = k_cache.shape[1]
    lengths = cache_seqlens.detach().cpu().tolist()
    for b, start in enumerate(lengths):
        t = torch.arange(start, start + n)
        if len(t) and int(t[-1]) // size >= block_table.shape[1]:
            raise ValueError(f"append_kv: sequence {b} needs {int(t[-1]) // size + 1} blocks, the table has "
                             f"{block_table.shape[1]}")
        blocks = block_table[b].detach().cpu().long()[t // size]
        k_cache[blocks.to(k_cache.device), (t % size).to(k_cache.device)] = k_new[b].to(k_cache.dtype)
        v_cache[blocks.to(v_cache.device), (t % size).to(v_cache.device)] = v_new[b].to(v_cache.dtype)
    return cache_seqlens + n
