"""The call contract checked around every implementation call (properties/harness.py): each
kind of faulty implementation fails with the broken clause named, correct ones pass."""

from __future__ import annotations

import textwrap

import pytest
import torch

from attnbench.app import verify
from attnbench.impls import naive
from attnbench.impls.sdpa import sdpa_math
from attnbench.properties.harness import ContractError, clone_inputs, fresh_inputs, module_call, run_impl
from attnbench.registry import Impl
from attnbench.spec import Spec


def _impl(name: str, fn) -> Impl:
    return Impl(name=name, variant="dense", fn=fn, features=naive.naive.features - {"varlen", "paged_kv"})


def float64_out(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    return out.double(), lse


def wrong_shape(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    return out.transpose(1, 2), lse


def float16_lse(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    return out, lse.half()


def mutates_v(q, k, v, cfg, key_padding_mask=None, bias=None):
    result = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    v.data[..., 0] += 1.0  # writes into the caller's v after using it
    return result


def scales_q(q, k, v, cfg, key_padding_mask=None, bias=None):
    q.data.mul_(2.0)
    return naive.attention(q, k, v, cfg, key_padding_mask, bias)


def nan_out(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    return out.masked_fill(torch.zeros_like(out, dtype=torch.bool).index_fill(2, torch.tensor([0]), True),
                           float("nan")), lse


class _WritesInBackward(torch.autograd.Function):
    """Identity on out whose backward scribbles over k (which it was handed) and grad_out."""

    @staticmethod
    def forward(ctx, out, k):
        ctx.k = k
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        ctx.k.data.zero_()
        grad.data.mul_(3.0)
        return grad.clone(), None


def mutates_in_backward(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    return _WritesInBackward.apply(out, k), lse


class _NanIntoQ(torch.autograd.Function):
    """Identity on out whose backward hands q a NaN gradient."""

    @staticmethod
    def forward(ctx, out, q):
        ctx.shape = q.shape
        return out.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad.clone(), torch.full(ctx.shape, float("nan"), dtype=grad.dtype)


def nan_gradient(q, k, v, cfg, key_padding_mask=None, bias=None):
    out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
    return _NanIntoQ.apply(out, q), lse


FAULTS = [
    (float64_out, False, "float16", "returned float64 out for float16 inputs"),
    (float64_out, False, "float32", "returned float64 out for float32 inputs"),
    (wrong_shape, False, "float32", "returned out of shape (1, 5, 2, 8), expected (B, Hq, Sq, Dv) = (1, 2, 5, 8)"),
    (float16_lse, False, "float32", "returned float16 lse for float32 inputs"),
    (mutates_v, False, "float32", "mutated its input v in place"),
    (mutates_v, True, "float32", "mutated its input v in place"),
    (scales_q, False, "float32", "mutated its input q in place"),
    (nan_out, False, "float32", "returned NaN in out at index (0, 0, 0, 0)"),
    (mutates_in_backward, True, "float32", "mutated its input k in place"),
    (nan_gradient, True, "float32", "returned NaN in dq"),
]


@pytest.mark.parametrize(("fn", "grad", "dtype", "reason"), FAULTS, ids=lambda x: getattr(x, "__name__", None))
def test_faulty_implementation_fails_with_the_named_contract(fn, grad, dtype, reason):
    spec = Spec(Hq=2, Sq=5, D=8, dtype=dtype)
    inputs = fresh_inputs(spec, grad=grad)
    with pytest.raises(ContractError) as info:
        run_impl(_impl("faulty", fn), spec, inputs, grad=grad)
    assert str(info.value).startswith(f"contract: dense/faulty {reason}"), str(info.value)
    assert "\n" not in str(info.value)


def test_grad_out_written_by_the_backward_is_named():
    def writes_grad_out(q, k, v, cfg, key_padding_mask=None, bias=None):
        out, lse = naive.attention(q, k, v, cfg, key_padding_mask, bias)
        return _WritesInBackward.apply(out, k.detach().clone()), lse

    spec = Spec(Sq=4, D=8)
    with pytest.raises(ContractError, match="mutated its input grad_out in place"):
        run_impl(_impl("faulty", writes_grad_out), spec, fresh_inputs(spec, grad=True), grad=True)


CORRECT_SPECS = [
    Spec(Hq=4, Hkv=2, Sq=5, Sk=7, D=8, Dv=16, dtype="float16", causal=True, key_lengths=(7,)),
    Spec(B=2, Sq=6, D=8, bias="full", bias_neginf=0.3, window=(2, 1), key_lengths=(6, 0)),  # empty rows, -inf bias
    Spec(Sq=9, Sk=3, D=8, dtype="float64", causal=True),  # leading queries see nothing
]


@pytest.mark.parametrize("kernel", [naive.naive, sdpa_math], ids=lambda i: i.key)
@pytest.mark.parametrize("spec", CORRECT_SPECS, ids=lambda s: s.short())
def test_correct_implementations_pass_the_contract(kernel, spec):
    inputs = fresh_inputs(spec, kernel, grad=True)
    run_impl(kernel, spec, inputs, grad=True)
    run_impl(kernel, spec, clone_inputs(inputs))


def test_nan_in_masked_keys_is_not_a_contract_breach():
    """With a non-finite input the oracle itself may be non-finite: finiteness is then left to
    the property's comparison with the oracle."""
    spec = Spec(Sq=4, D=8, key_lengths=(2,))
    inputs = fresh_inputs(spec)
    inputs.k[0, 0, 3] = float("nan")
    run_impl(naive.naive, spec, inputs)


# -- modules --------------------------------------------------------------------------------
def test_module_output_dtype_shape_and_unchanged_inputs():
    x = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert module_call("M", lambda: x * 2, {"x": x, "mask": mask}).shape == x.shape
    with pytest.raises(ContractError, match="^contract: M returned float64 output for float32 input x$"):
        module_call("M", lambda: x.double(), {"x": x})
    with pytest.raises(ContractError, match=r"returned output of shape \(2, 3, 2\) for x of shape \(2, 3, 4\)"):
        module_call("M", lambda: x[..., :2], {"x": x})
    with pytest.raises(ContractError, match="mutated its input x in place"):
        module_call("M", lambda: x.mul_(2), {"x": x})
    with pytest.raises(ContractError, match="mutated its input mask in place"):
        module_call("M", lambda: (mask.fill_(False), x.clone())[1], {"x": x, "mask": mask})


# -- through verify: the verdict's reason names the contract --------------------------------
FAULTY_MODULE = textwrap.dedent("""
    from attnbench.impls.naive import attention, naive
    from attnbench.registry import Impl

    def float64_out(q, k, v, cfg, key_padding_mask=None, bias=None):
        out, lse = attention(q, k, v, cfg, key_padding_mask, bias)
        return out.double(), lse.double()

    def writes_v(q, k, v, cfg, key_padding_mask=None, bias=None):
        result = attention(q, k, v, cfg, key_padding_mask, bias)
        v.data.zero_()
        return result

    wide = Impl(name="wide", variant="dense", fn=float64_out, features=naive.features - {"varlen", "paged_kv"})
    writer = Impl(name="writer", variant="dense", fn=writes_v, features=naive.features - {"varlen", "paged_kv"})
""")


def test_verify_names_the_broken_contract(tmp_path, monkeypatch):
    (tmp_path / "faulty_kernels.py").write_text(FAULTY_MODULE)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    prop = str(verify.PROPERTIES_DIR / "test_agreement.py")
    outcome = verify.run(impls=("faulty_kernels:wide", "faulty_kernels:writer"), paths=[prop],
                         properties=("test_forward_matches_oracle", "test_gradients_match_oracle"), profile="ci")
    rows = {(r.impl, r.property): r for r in outcome.results.correctness}
    for prop_name in ("test_forward_matches_oracle", "test_gradients_match_oracle"):
        wide = rows[("wide", prop_name)]
        assert wide.status == "fail" and "contract: dense/wide returned float64 out for" in wide.reason, wide.reason
        writer = rows[("writer", prop_name)]
        assert writer.status == "fail" and "contract: dense/writer mutated its input v in place" in writer.reason
