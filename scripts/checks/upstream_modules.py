"""Re-checks the declared findings on lucidrains' mixture-of-attention and local-attention modules
(impls/third_party_moa.py, impls/third_party_local.py, docs/DESIGN.md "Known broken"): minimal
counterexamples on the CPU in float32, each printing its numbers against what the contract
(SEMANTICS.md, the seed documents) says. The module properties (properties/test_modules.py)
find all of them.

    python scripts/checks/upstream_modules.py      (needs the third-party extra)
"""

from __future__ import annotations

import itertools
import math

import torch

from attnbench.impls.third_party_local import local_mha
from attnbench.oracles.modules import local_mha_reference


def moa(**kw):
    from mixture_of_attention import MixtureOfAttention

    base = dict(dim=16, num_routed_queries=1, num_routed_key_values=1, num_experts=2, dim_head=8, heads=1,
                prenorm=False, use_triton=False, flash_attn=False)
    torch.manual_seed(0)
    return MixtureOfAttention(**{**base, **kw}).eval()


def batch_routing() -> None:
    """Element 1 of a batch of 2 differs from the same element run alone."""
    m = moa()
    x = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        both, alone = m(x), m(x[1:])
    print(f"[moa batch] B=2, N=2, 2 experts, k=1: |out[1] - out(x[1] alone)| = {(both[1] - alone[0]).abs().max():.3g}"
          f" (element 0: {(both[0] - m(x[:1])[0]).abs().max():.3g})")


def kv_groups() -> None:
    """Expert 0's attention output changes when only expert 1's key/value projection changes:
    to_kv (a grouped conv, channels [k0 v0 | k1 v1]) is split with chunk(2) into k = [k0 v0] and
    v = [k1 v1], so experts read each other's keys and values."""
    m = moa(num_routed_queries=2, num_routed_key_values=2)
    attn = m.attn
    q = torch.randn(1, 2, 3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = attn(q)
        half = attn.to_kv.weight.shape[0] // 2
        attn.to_kv.weight[half:] = 0  # expert 1's k and v projection only
        after = attn(q)
    d0, d1 = ((before[:, g] - after[:, g]).abs().max() for g in (0, 1))
    print(f"[moa kv groups] zeroing expert 1's to_kv rows changes expert 0's output by {d0:.3g} (must be 0); "
          f"expert 1's by {d1:.3g}")


def autoregressive() -> None:
    from mixture_of_attention import MixtureOfAutoregressiveAttention

    crashes = []
    for w, kq, kk, n in itertools.product((1, 2, 3, 4), (1, 2, 3), (1, 2, 3), (4, 7, 8, 12)):
        torch.manual_seed(0)
        m = MixtureOfAutoregressiveAttention(dim=16, num_routed_queries=kq, num_routed_key_values=kk, num_experts=1,
                                             dim_head=8, heads=1, local_attn_window_size=w, use_triton=False,
                                             flash_attn=False)
        try:
            with torch.no_grad():
                m(torch.randn(1, n, 16))
        except RuntimeError as exc:
            crashes.append((w, kq, kk, n, str(exc)[:60]))
    print(f"[moa ar crash] {len(crashes)} of {4 * 3 * 3 * 4} (window, kq, kk, N) configs raise; first: {crashes[:3]}")
    torch.manual_seed(0)
    m = MixtureOfAutoregressiveAttention(dim=16, num_routed_queries=2, num_routed_key_values=3, num_experts=2,
                                         dim_head=8, heads=2, local_attn_window_size=4, use_triton=False,
                                         flash_attn=False).eval()
    x = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(0))
    y = x.clone()
    y[:, 5:8] = 20 * m.query_router.routing_token.detach().sum(0)
    with torch.no_grad():
        diff = (m(y)[:, :5] - m(x)[:, :5]).abs().max()
    print(f"[moa ar causal] changing x[5:8] changes out[:5] by {diff:.3g} (must be 0)")


def local_cache() -> None:
    """Decoding through local-attention's LocalMHA cache (one token a step after a prefix of 1)
    against the float64 oracle of the full causal pass."""
    rows = {}
    for qk_rmsnorm, exact, w, seed in itertools.product((True, False), (True, False), (1, 2, 3), range(3)):
        torch.manual_seed(seed)
        m = local_mha(dim=16, window_size=w, dim_head=8, heads=1, causal=True, qk_rmsnorm=qk_rmsnorm,
                      exact_windowsize=exact).eval()
        x = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(seed + 10))
        with torch.no_grad():
            want = local_mha_reference(_settings(m, w, qk_rmsnorm, exact), x)
            out, cache = m(x[:, :1], return_cache=True)
            outs = [out]
            for t in range(1, 8):
                out, cache = m(x[:, t : t + 1], cache=cache, return_cache=True)
                outs.append(out)
        err = float((torch.cat(outs, 1).double() - want).abs().max())
        rows.setdefault((qk_rmsnorm, exact), []).append(err)
    for (qk, exact), errs in rows.items():
        print(f"[local cache] qk_rmsnorm={qk}, exact_windowsize={exact}: max error vs oracle "
              f"{min(errs):.3g} .. {max(errs):.3g} over windows 1-3, 3 seeds")


def _settings(m, w, qk_rmsnorm, exact):
    """The library module with the seed attributes the oracle reads."""
    m.dim, m.dim_head, m.qk_scale, m.use_xpos, m.xpos_scale_base = 16, 8, 8, False, math.sqrt(16)
    return m


if __name__ == "__main__":
    batch_routing()
    kv_groups()
    autoregressive()
    local_cache()
