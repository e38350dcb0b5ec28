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
FEATURES = _naive.naive.features - {"varlen", "document", "paged_kv"}


class Kernel:
    """fn(q, k, v, cfg, key_padding_mask=None, bias=None) -> (out, lse), step by step."""

    def __call__(self, q, k, v, cfg: Config, key_padding_mask=None, bias=None):
        B, Hq, Sq, D = q.shape
        Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[3]
        k, v = self.expand(k, Hq // Hkv), self.expand(v, Hq // Hkv)
        s = self.scores(q, k, self.scale(cfg, D, Dv))
        if bias is not None:
            s = s + self.bias(bias, Sq, Sk).to(s.dtype)
        ok = self.visible(cfg, B, Sq, Sk, key_padding_mask, q.device)
        p, lse = self.softmax(s, ok)
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

    def softmax(self, s: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = s.masked_fill(~ok, float("-inf"))
        m = s.amax(-1, keepdim=True)
        empty = m == float("-inf")
        m = torch.where(empty, torch.zeros_like(m), m)
        p = torch.exp(s - m)
        l = p.sum(-1, keepdim=True)
        p = p / torch.where(empty, torch.ones_like(l), l)
        lse = torch.where(empty, torch.full_like(l, float("-inf")), torch.log(l) + m)
        return p, lse.squeeze(-1)

    def dropout(self, p: torch.Tensor, cfg: Config) -> torch.Tensor:
        if cfg.dropout_p <= 0:
            return p
        return p * self.keep(p, cfg) / (1 - cfg.dropout_p)

    def keep(self, p: torch.Tensor, cfg: Config) -> torch.Tensor:
        gen = torch.Generator(device=p.device).manual_seed(cfg.dropout_seed)
        return torch.rand(p.shape, generator=gen, device=p.device) >= cfg.dropout_p

    def combine(self, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return p.to(v.dtype) @ v


def member(name: str, kernel: Kernel, bug: str, description: str = "") -> Impl:
    """A zoo member: the broken kernel, declared exactly like the correct one."""
    return Impl(
        name=name,
        variant="dense",
        fn=kernel,
        features=FEATURES,
        bug=bug,
        description=description or bug,
    )
