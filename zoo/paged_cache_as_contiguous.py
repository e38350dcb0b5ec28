"""The paged pool read through strides computed from its shape, as if it were contiguous: right
for a pool allocated on its own, wrong for K and V interleaved per block in one pool
(FlashInfer's (num_blocks, 2, block_size, Hkv, D) layout), whose block stride is twice a block."""

import attnbench.impls.naive as _naive
from attnbench.registry import Impl
from attnbench.zoo._base import BASE_FEATURES, Kernel
from attnbench.zoo.strided_as_contiguous import as_contiguous


def paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg, return_lse=True):
    k_cache, v_cache = as_contiguous(k_cache), as_contiguous(v_cache)  # BUG: the strides given are ignored
    return _naive.paged(q, k_cache, v_cache, block_table, cache_seqlens, cfg)


paged_cache_as_contiguous = Impl(
    name="paged_cache_as_contiguous",
    variant="dense",
    fn=Kernel(),
    features=BASE_FEATURES | {"paged_kv"},
    paged=paged,
    bug="paged KV: the pool read with contiguous strides (an interleaved K/V pool reads the wrong blocks)",
)
