"""A backward-only bug: the forward is right, the hand-written backward forgets the softmax
scale in dK (dK = dS^T Q instead of scale * dS^T Q). Invisible to every forward check."""

import torch

from attnbench.zoo._base import Kernel, member


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, cfg, key_padding_mask):
        kern = Kernel()
        B, Hq, Sq, D = q.shape
        G = Hq // k.shape[1]
        ke, ve = kern.expand(k, G), kern.expand(v, G)
        s = kern.scores(q, ke, cfg.scale)
        if bias is not None:
            s = s + bias.to(s.dtype)
        p, lse = kern.softmax(s, kern.visible(cfg, B, Sq, k.shape[2], key_padding_mask, q.device))
        keep = kern.keep(p, cfg).to(p.dtype) / (1 - cfg.dropout_p) if cfg.dropout_p > 0 else torch.ones_like(p)
        out = (p * keep).to(v.dtype) @ ve
        ctx.save_for_backward(q, ke, ve, p, keep)
        ctx.cfg, ctx.group, ctx.bias_shape = cfg, G, None if bias is None else bias.shape
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, ke, ve, p, keep = ctx.saved_tensors
        f = p.dtype
        do, qf, kf, vf = dout.to(f), q.to(f), ke.to(f), ve.to(f)
        dv = (p * keep).transpose(-1, -2) @ do
        dp = (do @ vf.transpose(-1, -2)) * keep
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq = ctx.cfg.scale * (ds @ kf)
        dk = ds.transpose(-1, -2) @ qf  # BUG: the softmax scale is missing

        def grouped(t):
            B, H = t.shape[:2]
            return t.view(B, H // ctx.group, ctx.group, *t.shape[2:]).sum(2)

        dbias = None if ctx.bias_shape is None else ds.sum_to_size(ctx.bias_shape).to(dout.dtype)
        return dq.to(q.dtype), grouped(dk).to(q.dtype), grouped(dv).to(q.dtype), dbias, None, None


def attention(q, k, v, cfg, key_padding_mask=None, bias=None):
    return _Attention.apply(q, k, v, bias, cfg, key_padding_mask)


backward_dk_unscaled = member(
    "backward_dk_unscaled", attention, "backward-only: dK misses the softmax scale"
)
