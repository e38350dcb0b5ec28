"""The bug zoo's common kernel: naive attention cut into small steps, so that each member
overrides one step with the bug it carries and stays a few lines long.

The steps follow impls/naive.py (scores in the input dtype, softmax in float32, empty rows
guarded, seeded dropout); visibility is written out here as index arithmetic so that a
member can get one comparison wrong. Nothing here is registered: the registry scans impls/
only, and `--zoo` loads the members through attnbench.registry.load_zoo.
"""

from __future__ import annotations

import torch

import attnbench.impls.naive as _naive
from attnbench.registry import Impl
from attnbench.spec import Config

# every member claims what the correct dense kernel would; the packed / paged call conventions
# come with their own functions, declared by the members that carry those bugs
FEATURES = _naive.naive.features - {"varlen", "document", "paged_kv", "fp8"}
SCORE_FEATURES = frozenset({"softcap", "alibi", "sinks"})
# A member claims what the correct kernel would, the score features only when its bug is one of
# theirs: the others keep the draws (and so the ci examples) that catch them.
BASE_FEATURES = FEATURES - SCORE_FEATURES


class Kernel:
    """fn(q, k, v, cfg, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None)
    -> (out, lse), step by step."""

    def __call__(self, q, k, v, cfg: Config, key_padding_mask=None, bias=None, *, alibi_slopes=None, sinks=None):
        B, Hq, Sq, D = q.shape
        Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        k, v = self.expand(k, Hq // Hkv), self.expand(v, Hq // Hkv)
        s = self.scores(q, k, self.scale(cfg, D, Dv))
        ok = self.visible(cfg, B, Sq, Sk, key_padding_mask, q.device)
        s = self.softcap(s, cfg.softcap, ok)
        if bias is not None:
            s = s + self.bias(bias, Sq, Sk).to(s.dtype)
        if alibi_slopes is not None:
            s = s + self.alibi(alibi_slopes, cfg, Sq, Sk).to(s.dtype)
        sink = None if sinks is None else sinks.to(s.dtype).view(1, Hq, 1, 1)
        p, lse = self.softmax(s, ok, sink)
        p = self.dropout(p, cfg)
        return self.combine(p, v), lse

    # -- steps ---------------------------------------------------------------------------
    def expand(self, t: torch.Tensor, group: int) -> torch.Tensor:
        return t.repeat_interleave(group, dim=1)  # query head h reads kv head h // group

    def scale(self, cfg: Config, D: int, Dv: int) -> float:
        return cfg.scale

    def scores(self, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        return (q @ k.transpose(-1, -2)).to(acc) * scale

    def bias(self, bias: torch.Tensor, Sq: int, Sk: int) -> torch.Tensor:
        return bias

    def softcap(self, s: torch.Tensor, cap: float | None, ok: torch.Tensor) -> torch.Tensor:
        """cap * tanh(s / cap) on the scaled scores (before the bias and the masks)."""
        return s if cap is None else cap * torch.tanh(s / cap)

    def slopes(self, slopes: torch.Tensor) -> torch.Tensor:
        """(B or 1, Hq) ALiBi slopes."""
        return slopes.view(1, -1) if slopes.dim() == 1 else slopes

    def alibi(self, slopes: torch.Tensor, cfg: Config, Sq: int, Sk: int) -> torch.Tensor:
        """-slope * |p(i) - j|, (B or 1, Hq, Sq, Sk)."""
        i = torch.arange(Sq, device=slopes.device).view(Sq, 1) + self.offset(cfg, Sq, Sk)
        j = torch.arange(Sk, device=slopes.device).view(1, Sk)
        return -self.slopes(slopes).double()[:, :, None, None] * (i - j).abs()  # exact; rounded once by the caller

    def offset(self, cfg: Config, Sq: int, Sk: int) -> int:
        return Sk - Sq if cfg.align == "bottom_right" else 0

    def in_window(self, p: torch.Tensor, j: torch.Tensor, left, right) -> torch.Tensor:
        ok = torch.ones_like(p - j, dtype=torch.bool)
        if left is not None:
            ok = ok & (j >= p - left)
        if right is not None:
            ok = ok & (j <= p + right)
        return ok

    def padding(self, key_padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, Sk) bool, True = the key may be seen."""
        return key_padding_mask.bool()

    def visible(self, cfg: Config, B: int, Sq: int, Sk: int, key_padding_mask, device) -> torch.Tensor:
        """(B, 1, Sq, Sk) bool."""
        i = torch.arange(Sq, device=device).view(Sq, 1)
        j = torch.arange(Sk, device=device).view(1, Sk)
        p = i + self.offset(cfg, Sq, Sk)
        ok = torch.ones(Sq, Sk, dtype=torch.bool, device=device)
        if cfg.causal:
            ok = ok & (j <= p)
        if cfg.window is not None:
            ok = ok & self.in_window(p, j, *cfg.window)
        if cfg.block is not None:
            w = cfg.block.window_size
            bq, bk = torch.div(p, w, rounding_mode="floor"), torch.div(j, w, rounding_mode="floor")
            ok = ok & (bk >= bq - cfg.block.look_backward) & (bk <= bq + cfg.block.look_forward)
        ok = ok.expand(B, 1, Sq, Sk)
        if key_padding_mask is not None:
            ok = ok & self.padding(key_padding_mask).view(B, 1, 1, Sk)
        return ok

    def softmax(self, s: torch.Tensor, ok: torch.Tensor, sink: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Probabilities and lse; a sink (1, Hq, 1, 1) joins the maximum and the denominator."""
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(-1, keepdim=True) if s.shape[-1] else s.new_full((*s.shape[:-1], 1), float("-inf"))
        if sink is not None:
            m = torch.maximum(m, sink)
        empty = m == float("-inf")
        m = torch.where(empty, torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        if sink is not None:
            l = l + self.sink_term(sink, m)
        p = p / torch.where(empty, torch.ones_like(l), l)
        lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l) + m)
        return p, lse.squeeze(-1)

    def sink_term(self, sink: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The sink's share of the denominator, exp(sink - m)."""
        return torch.exp(sink - m)

    def dropout(self, p: torch.Tensor, cfg: Config) -> torch.Tensor:
        if cfg.dropout_p <= 0:
            return p
        return p * self.keep(p, cfg) / (1 - cfg.dropout_p)

    def keep(self, p: torch.Tensor, cfg: Config) -> torch.Tensor:
        gen = torch.Generator(device=p.device).manual_seed(cfg.dropout_seed)
        return torch.rand(p.shape, generator=gen, device=p.device) >= cfg.dropout_p

    def combine(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return p.to(v.dtype) @ v


def member(name: str, kernel: Kernel, bug: str, description: str = "",
           features: frozenset[str] = BASE_FEATURES) -> Impl:
    """A zoo member: the broken kernel, declared like the correct one (BASE_FEATURES, or
    FEATURES for a member whose bug is in a score feature)."""
    return Impl(
        name=name,
        variant="dense",
        fn=kernel,
        features=features,
        bug=bug,
        description=description or bug,
    )
