"""A tiny property file for the fault-set tests: a few small forward checks against the float64
oracle (the real suite takes minutes per implementation on a CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnbench.oracles.dense import reference
from attnbench.spec import Spec

pytestmark = pytest.mark.variant("dense")


@settings(max_examples=3, deadline=None, derandomize=True, database=None)
@given(S=st.integers(2, 5))
def test_forward_matches_oracle(impl, device, measure, S):
    spec = Spec(Sq=S, Sk=S, causal=True, dtype="float32", device=device)
    x = spec.make_inputs()
    q = x.q.clone()
    out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
    assert isinstance(out, torch.Tensor) and out.shape == (spec.B, spec.Hq, spec.Sq, spec.Dv), "wrong output shape"
    assert out.dtype == torch.float32, f"returned {out.dtype} for float32 inputs"
    assert torch.equal(x.q, q), "mutated its input q"
    err = (out.double() - reference(spec, x)[0]).abs().max().item()
    measure(err / 1e-4)
    assert err < 1e-4, f"max error {err:.3g}"


def test_second_property(impl):
    assert impl.name
