"""FlashAttentionTwo: multi-head attention on the kernel it is given (impls/blockwise.py binds the
bucketed FlashAttention-2 kernel). Any kernel with the call convention of docs/DESIGN.md works; bucket
sizes are passed only to kernels that take them, and never change the result."""

from __future__ import annotations

import torch
from torch import nn

from attnbench.modules.common import (
    Kernel,
    accepts,
    check_input,
    check_kernel,
    keep_mask,
    merge_heads,
    positive_int,
    split_heads,
)
from attnbench.spec import Config

NAME = "FlashAttentionTwo"


def low_precision_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


class FlashAttentionTwo(nn.Module):
    """Multi-head attention, self or cross (`context`), optionally causal (bottom-right aligned).

    mask: (batch, context_len) keep-mask, True (or 1) = keep.
    parallel=True splits the batch across the visible CUDA devices (`parallel_devices` overrides
    the list); with fewer than two it does nothing.
    mixed_precision=True runs the attention call in bfloat16 (float16 where bf16 is unsupported)
    under autocast, on CPU and CUDA alike; softmax statistics stay in float32 in kernels that
    follow the convention. Projections stay in the input dtype.
    """

    def __init__(
        self,
        *,
        dim: int,
        heads: int = 8,
        dim_head: int = 64,
        causal: bool = False,
        q_bucket_size: int = 512,
        k_bucket_size: int = 1024,
        parallel: bool = False,
        mixed_precision: bool = False,
        kernel: Kernel,
    ) -> None:
        super().__init__()
        for name, value in (("dim", dim), ("heads", heads), ("dim_head", dim_head)):
            positive_int(value, name, NAME)
        self.q_bucket_size = positive_int(q_bucket_size, "q_bucket_size", NAME)
        self.k_bucket_size = positive_int(k_bucket_size, "k_bucket_size", NAME)
        self.kernel = check_kernel(kernel, NAME)
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.causal = bool(causal)
        self.parallel = bool(parallel)
        self.mixed_precision = bool(mixed_precision)
        self.parallel_devices: list[torch.device | str] | None = None
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, context=None, mask=None, q_bucket_size=None, k_bucket_size=None) -> torch.Tensor:
        x = check_input(x, "x", self.dim, NAME)
        context = x if context is None else check_input(context, "context", self.dim, NAME)
        if context.shape[0] != x.shape[0]:
            raise ValueError(f"{NAME}: context batch {context.shape[0]} != x batch {x.shape[0]}")
        qb = positive_int(self.q_bucket_size if q_bucket_size is None else q_bucket_size, "q_bucket_size", NAME)
        kb = positive_int(self.k_bucket_size if k_bucket_size is None else k_bucket_size, "k_bucket_size", NAME)
        mask = keep_mask(mask, context.shape[0], context.shape[1], "mask", NAME)

        q = split_heads(self.to_q(x), self.heads)
        k, v = (split_heads(t, self.heads) for t in self.to_kv(context).chunk(2, dim=-1))
        cfg = Config(scale=self.scale, causal=self.causal)
        out = self._attend(q, k, v, cfg, mask, qb, kb)
        return self.to_out(merge_heads(out))

    def _attend(self, q, k, v, cfg, mask, qb, kb) -> torch.Tensor:
        kernel = self.kernel
        extra = {"q_bucket_size": qb, "k_bucket_size": kb} if accepts(kernel, "q_bucket_size") else {}

        def call(q, k, v, mask):
            if not self.mixed_precision:
                return kernel(q, k, v, cfg, key_padding_mask=mask, **extra)[0]
            low = low_precision_dtype(q.device)
            with torch.autocast(device_type=q.device.type, dtype=low):
                out = kernel(q.to(low), k.to(low), v.to(low), cfg, key_padding_mask=mask, **extra)[0]
            return out.to(q.dtype)

        devices = self._devices(q)
        if len(devices) < 2:
            return call(q, k, v, mask)
        outs = []
        for dev, idx in zip(devices, torch.arange(q.shape[0]).tensor_split(len(devices))):
            if idx.numel() == 0:
                continue
            sl = slice(int(idx[0]), int(idx[-1]) + 1)
            part_mask = None if mask is None else mask[sl].to(dev)
            out = call(q[sl].to(dev), k[sl].to(dev), v[sl].to(dev), part_mask)
            outs.append(out.to(q.device))
        return torch.cat(outs, dim=0)

    def _devices(self, q: torch.Tensor) -> list:
        if not self.parallel:
            return []
        if self.parallel_devices is not None:
            return list(self.parallel_devices)
        if q.is_cuda:
            return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        return []
