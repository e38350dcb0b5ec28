"""Long sequences, checked cheaply: relations between runs of the implementation itself need
no oracle over all rows, and the row-wise oracle (oracles/dense.attention_rows) checks sampled
rows of problems with tens of thousands of keys exactly.

- splitting the keys into two chunks and merging the chunk results with their lse gives the
  whole (the identity split-KV and ring attention rest on);
- one dedicated GPU property crosses int32 element offsets (more than 2^31 elements per
  tensor) and checks sampled rows of the first and last batch element and head.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from attnbench.properties.harness import (
    check_runs,
    check_sampled_heads,
    draw_rows,
    fresh_inputs,
    references,
    require,
    run_impl,
)
from attnbench.properties.strategies import Pinned, draw_int, draw_spec
from attnbench.spec import Inputs, Spec

pytestmark = pytest.mark.variant("dense")

# positions would shift with the keys (ALiBi too); a sink would be counted once per chunk
STRUCTURE = ("causal", "sliding_window", "blocked_window", "alibi", "sinks")


def merge(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor):
    """Two key chunks' (out, lse) merged in float64: lse = log(e^lse1 + e^lse2), out = the
    chunk outputs weighted by e^(lse_c - lse); a row empty in both stays (0, -inf)."""
    l1, l2 = lse1.double(), lse2.double()
    lse = torch.logaddexp(l1, l2)
    empty = torch.isneginf(lse)
    safe = torch.where(empty, torch.zeros_like(lse), lse)
    w1 = torch.where(empty, 0.0, torch.exp(l1 - safe))[..., None]
    w2 = torch.where(empty, 0.0, torch.exp(l2 - safe))[..., None]
    return w1 * out1.double() + w2 * out2.double(), lse


def _keys(spec: Spec, inputs: Inputs, keys: slice) -> Inputs:
    """The inputs with only the keys in `keys` (k, v, padding mask and the bias's key axis):
    views of the spec's layout, or contiguous copies for a contiguous spec (an impl may accept
    contiguous inputs only)."""
    def cut(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()[..., keys, :]
        return t.contiguous() if spec.layout == "contiguous" else t

    bias = inputs.bias
    if bias is not None and bias.shape[-1] > 1:
        bias = bias.detach()[..., keys].contiguous()
    kpm = None if inputs.key_padding_mask is None else inputs.key_padding_mask[:, keys]
    return Inputs(q=inputs.q.detach(), k=cut(inputs.k), v=cut(inputs.v), key_padding_mask=kpm, bias=bias,
                  grad_out=inputs.grad_out)


@given(data=st.data())
@example(data=Pinned(Spec(Sq=3, Sk=2049, key_lengths=(1500,)), "long keys cut at a tile edge, padding in one chunk"))
def test_key_chunks_merge_to_the_whole(impl, device, measure, data):
    """Attention over keys [0, c) and [c, Sk), merged with the chunks' lse, equals attention
    over all keys (out and lse), for cuts anywhere, empty chunks (all padding) included."""
    require(impl, "lse", "cross")
    spec = draw_spec(data, impl, device, needs=("lse",), forbid=STRUCTURE, long="all")
    if spec is None or spec.Sk < 2:
        return
    cut = draw_int(data, 1, spec.Sk - 1, 1024 if spec.Sk > 1024 else spec.Sk // 2, label="cut")
    lengths = spec.key_lengths
    first = spec.replace(Sk=cut, key_lengths=None if lengths is None else tuple(min(n, cut) for n in lengths))
    second = spec.replace(Sk=spec.Sk - cut,
                          key_lengths=None if lengths is None else tuple(max(n - cut, 0) for n in lengths))
    if not (impl.covers(first, ("lse",)) and impl.covers(second, ("lse",))):
        return
    inputs = fresh_inputs(spec)
    with torch.no_grad():
        whole = run_impl(impl, spec, inputs)
        a = run_impl(impl, first, _keys(spec, inputs, slice(0, cut)))
        b = run_impl(impl, second, _keys(spec, inputs, slice(cut, spec.Sk)))
    out, lse = merge(a.out, a.lse, b.out, b.lse)
    errors, scales = references(spec, inputs, impl, rows=draw_rows(data, spec))
    check_runs(measure, "out", out, whole.out.double(), impl, errors["out"], spec.dtype, scales["out"], exact=False)
    check_runs(measure, "lse", lse, whole.lse.double(), impl, errors["lse"], spec.dtype, scales["lse"], exact=False)


# -- int32 offsets ----------------------------------------------------------------------------
INT32_SHAPE = dict(B=128, Hq=32, Sq=4097, D=128)  # 2,148,007,936 elements per tensor: past 2^31


@pytest.mark.gpu
def test_int32_offsets_sampled_rows(impl, device, measure):
    """B * H * S * D past 2^31 elements per tensor (4.3 GB each in 16 bits): sampled rows of
    the first, a middle and the last (batch, head) against the row-wise oracle. A kernel that
    computes element offsets in int32 reads the wrong memory for the last heads."""
    if not device.startswith("cuda"):
        pytest.skip("needs --device cuda (tensors of 2^31 elements)")
    check_sampled_heads(impl, device, INT32_SHAPE, measure)
