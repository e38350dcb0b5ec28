"""Validated inputs: Config, the oracle and the project's kernels reject what breaks the call
convention with a one-line ValueError naming the problem, and Sk = 0 gives empty rows."""

from __future__ import annotations

import math

import pytest
import torch

from attnbench.checks import check_call
from attnbench.impls import blockwise, bucketed, flex, naive, sdpa, triton
from attnbench.oracles import dense
from attnbench.spec import Block, Config

KERNELS = {
    "oracle": dense.attention,
    "naive": naive.attention,
    "sdpa_math": sdpa.sdpa_math.fn,
    "blockwise": blockwise.attention,
    "bucketed": bucketed.attention,
    "flex_eager": flex.flex_eager.fn,
    "triton": triton.attention,
}
BACKWARD = ("oracle", "naive", "sdpa_math", "blockwise", "bucketed", "triton")
CFG = Config(scale=0.5, window=(2, 1))  # bucketed needs a bounded window


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernel on CPU tensors


@pytest.mark.parametrize(("changes", "message"), [
    (dict(window=(-1, 0)), "Config.window: left edge must be None or an int >= 0, got -1"),
    (dict(window=(0, -3)), "Config.window: right edge must be None or an int >= 0, got -3"),
    (dict(window=(1, 2, 3)), "Config.window: must be (left, right)"),
    (dict(window=(1.5, 0)), "Config.window: left edge"),
    (dict(block=Block(0)), "Config.block: window_size must be an int >= 1, got 0"),
    (dict(block=Block(2, -1, 0)), "Config.block: look_backward must be an int >= 0, got -1"),
    (dict(block=(2, 1, 0)), "Config.block: must be a Block"),
    (dict(scale=math.nan), "Config.scale: must be a finite number"),
    (dict(scale="0.5"), "Config.scale: must be a finite number"),
    (dict(causal="yes"), "Config.causal: must be a bool"),
    (dict(align="top"), "Config.align: unknown alignment 'top'"),
    (dict(dropout_p=1.0), "Config.dropout_p: must be in [0, 1)"),
    (dict(dropout_seed=0.5), "Config.dropout_seed: must be an int"),
])
def test_config_rejects_invalid_fields(changes, message):
    with pytest.raises(ValueError) as info:
        Config(**{"scale": 1.0, **changes})
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_config_keeps_valid_values():
    cfg = Config(scale=0, causal=True, window=[None, 0], block=Block(3, 0, 2), align="top_left", dropout_p=0.5)
    assert cfg.window == (None, 0) and cfg.scale == 0


def _qkv(B=1, Hq=2, Hkv=2, Sq=4, Sk=5, D=8, Dv=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, Hq, Sq, D, generator=g, dtype=dtype), torch.randn(B, Hkv, Sk, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, Sk, Dv, generator=g, dtype=dtype))


def _bad_calls():
    q, k, v = _qkv(B=2)
    q1, k1, v1 = _qkv(B=1)
    yield "batch of 1", (q, k1, v1, {}), "batch sizes differ (no silent broadcast): q 2, k 1, v 1"
    yield "mixed dtypes", (q, k.double(), v, {}), "q, k and v must share one dtype (no silent upcast)"
    yield "3-D q", (q[0], k, v, {}), "q must be 4-D (B, Hq, Sq, D), got 3-D shape (2, 4, 8)"
    yield "3-D k", (q, k[0], v, {}), "k must be 4-D"
    qh, kh, vh = _qkv(Hq=3, Hkv=2)
    yield "Hq not a multiple", (qh, kh, vh, {}), "Hq=3 is not a multiple of Hkv=2"
    yield "D mismatch", (q, k[..., :4], v, {}), "k head dim 4 != q head dim 8"
    yield "v length", (q, k, v[:, :, :3], {}), "v shape (2, 2, 3, 8) does not match k shape (2, 2, 5, 8)"
    yield "mask shape", (q, k, v, dict(key_padding_mask=torch.ones(2, 4, dtype=torch.bool))), \
        "key_padding_mask must have shape (B, Sk) = (2, 5), got (2, 4)"
    yield "mask dtype", (q, k, v, dict(key_padding_mask=torch.ones(2, 5))), \
        "key_padding_mask must be bool (True = keep), got torch.float32"
    yield "bias shape", (q, k, v, dict(bias=torch.zeros(2, 2, 4, 4))), \
        "bias shape (2, 2, 4, 4) does not broadcast to (B, Hq, Sq, Sk) = (2, 2, 4, 5)"
    yield "bias grows", (q, k, v, dict(bias=torch.zeros(3, 2, 2, 4, 5))), "bias shape (3, 2, 2, 4, 5) does not broadcast"
    yield "bias integer", (q, k, v, dict(bias=torch.zeros(1, 1, 1, 5, dtype=torch.int64))), \
        "bias must be a floating tensor"
    yield "integer q", (q.long(), k.long(), v.long(), {}), "q must be a floating tensor"


BAD = list(_bad_calls())


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize(("case", "args", "message"), BAD, ids=[c for c, _, _ in BAD])
def test_invalid_inputs_are_rejected_with_a_named_problem(name, case, args, message):
    q, k, v, kw = args
    with pytest.raises(ValueError) as info:
        KERNELS[name](q, k, v, CFG, **kw)
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_the_validator_names_its_caller():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"^mine: cfg must be an attnbench Config, got dict$"):
        check_call(q, k, v, {"scale": 1.0}, who="mine")


@pytest.mark.parametrize("name", list(KERNELS))
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "mask+bias"])
def test_no_keys_gives_empty_rows(name, extras):
    """Sk = 0: every row is empty, so out = 0, lse = -inf and every gradient is exactly 0."""
    grad = name in BACKWARD
    q, k, v = (t.requires_grad_(grad) for t in _qkv(Hq=4, Hkv=2, Sq=3, Sk=0, Dv=16))
    kw = {}
    if extras:
        kw = dict(key_padding_mask=torch.ones(1, 0, dtype=torch.bool))
        if name != "bucketed":  # takes no bias
            kw["bias"] = torch.zeros(1, 4, 3, 1).requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out, lse = KERNELS[name](q, k, v, CFG, **kw)
    assert out.shape == (1, 4, 3, 16) and out.dtype == (torch.float64 if name == "oracle" else q.dtype)
    assert torch.equal(out, torch.zeros_like(out))
    if lse is not None:
        assert lse.shape == (1, 4, 3) and bool((lse == -math.inf).all())
    if grad:
        out.backward(torch.randn_like(out))
        leaves = [q, k, v] + ([kw["bias"]] if "bias" in kw else [])
        for t in leaves:
            assert t.grad is None or torch.equal(t.grad, torch.zeros_like(t)), t.grad
        assert q.grad is not None and q.grad.shape == q.shape


SCORE_KERNELS = ("oracle", "naive", "blockwise", "flex_eager", "triton")  # those that take the score features


@pytest.mark.parametrize("name", SCORE_KERNELS)
@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(alibi_slopes=torch.ones(3, dtype=torch.float64)), "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(2, dtype=torch.float32)), "alibi_slopes must have shape (Hq,)"),
    (dict(alibi_slopes=[0.5]), "alibi_slopes must be a tensor"),
    (dict(sinks=torch.ones(3, dtype=torch.float16)), "sinks must be in q's dtype"),
    (dict(sinks=torch.ones(1, 3)), "sinks must have shape (Hq,)"),
])
def test_score_feature_arguments_are_checked(name, kwargs, message):
    q, k, v = (torch.randn(1, 3, 4, 16) for _ in range(3))
    who = {"flex_eager": "flex"}.get(name, name)
    with pytest.raises(ValueError, match=f"^{who}: {message}".replace("(", r"\(").replace(")", r"\)")):
        KERNELS[name](q, k, v, Config(scale=0.5), **kwargs)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(q_descale=torch.ones(())), "q_descale is for float8_e4m3fn inputs, got torch.float32"),
    (dict(fp8=True, k_descale=torch.ones((), dtype=torch.float64)), "k_descale must be a float32 tensor, got torch.float64"),
    (dict(fp8=True, v_descale=torch.ones(2)), "v_descale must have shape () or (B, Hkv) = (1, 2), got (2,)"),
    (dict(fp8=True, q_descale=1.0), "q_descale must be a float32 tensor, got float"),
])
def test_fp8_descales_are_checked(kwargs, message):
    """fp8's descales: float32, () or (B, Hkv), and only with float8_e4m3fn q, k, v."""
    q, k, v = _qkv()
    if kwargs.pop("fp8", False):
        q, k, v = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    with pytest.raises(ValueError) as info:
        check_call(q, k, v, CFG, **kwargs)
    assert message in str(info.value), str(info.value)
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in _qkv())
    check_call(q8, k8, v8, CFG, q_descale=torch.ones(()), k_descale=torch.ones(1, 2), v_descale=None)
