"""A backward that reads the output gradient with contiguous strides: right when grad_out is
contiguous, garbage (or an out-of-bounds read) for a transposed or zero-stride one, such as
the gradient out.sum().backward() passes. The forward is right."""

import torch

from attnbench.zoo._base import Kernel, member
from attnbench.zoo.strided_as_contiguous import as_contiguous


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, cfg, key_padding_mask):
        ctx.save_for_backward(q, k, v, bias)
        ctx.cfg, ctx.kpm = cfg, key_padding_mask
        out, lse = Kernel()(q, k, v, cfg, key_padding_mask, bias)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, bias = ctx.saved_tensors
        leaves = [t.detach().requires_grad_(t.requires_grad) for t in (q, k, v)]
        b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
        with torch.enable_grad():
            out, _ = Kernel()(*leaves, ctx.cfg, ctx.kpm, b)
            wrt = [t for t in (*leaves, b) if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, as_contiguous(dout)))  # BUG: dout's strides ignored
        return (*(next(grads) if t is not None and t.requires_grad else None for t in (*leaves, b)), None, None)


def attention(q, k, v, cfg, key_padding_mask=None, bias=None):
    return _Attention.apply(q, k, v, bias, cfg, key_padding_mask)


grad_out_strided = member(
    "grad_out_strided", attention, "backward reads a non-contiguous grad_out with contiguous strides"
)
