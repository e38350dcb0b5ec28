"""The FlashAttention-4 adapter (impls/flash_attn4.py) and the FA2 adapter's availability, on the
CPU, against a stand-in `flash_attn.cute` written from FA4's interface (flash-attn-4 4.0.0b36):
keyword-only use past (q, k, v) (the fourth positional parameter is `qv`), window_size with None
for an unbounded side, causal as the window with right = 0, bottom-right alignment, grouped heads
h -> h // G, return_lse giving (B, H, Sq) natural-log float32 (-inf and a zero output for a row
with no visible key), varlen lse as (H, total_q), and a (out, lse) tuple return.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from attnbench.impls import flash_attn as fa2_mod
from attnbench.impls import flash_attn4 as fa4_mod
from attnbench.oracles.dense import attention as oracle
from attnbench.properties.harness import require
from attnbench.registry import Impl
from attnbench.spec import Spec


def _core(q, k, v, scale, causal, window):
    """FA4's semantics in (B, S, H, D), float64."""
    B, Sq, Hq, _ = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    kk = k.repeat_interleave(Hq // Hkv, dim=2).double()
    vv = v.repeat_interleave(Hq // Hkv, dim=2).double()
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), kk) * scale
    i = torch.arange(Sq).view(-1, 1) + Sk - Sq
    j = torch.arange(Sk).view(1, -1)
    left, right = window
    if causal:  # FA4's _resolve_causal_local_window: causal sets the right edge to 0
        right = 0
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    if left is not None:
        ok &= j >= i - left
    if right is not None:
        ok &= j <= i + right
    s = s.masked_fill(~ok, float("-inf"))
    lse = torch.logsumexp(s, -1)  # -inf where a row sees nothing
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vv).to(q.dtype)
    return out, lse.float()


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def fake_fa4(calls: list) -> types.ModuleType:
    cute = _module("flash_attn.cute")

    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, return_lse=False, **rest):
        calls.append(dict(kind="dense", qv=qv, scale=softmax_scale, causal=causal, window=window_size,
                          softcap=softcap, return_lse=return_lse, shape=tuple(q.shape), rest=rest))
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
        out, lse = _core(q, k, v, scale, causal, window_size)
        return out, (lse if return_lse else None)

    def flash_attn_varlen_func(q, k, v, qv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                               max_seqlen_k=None, softmax_scale=None, causal=False, window_size=(None, None),
                               softcap=0.0, return_lse=False, **rest):
        calls.append(dict(kind="varlen", qv=qv, scale=softmax_scale, causal=causal, softcap=softcap,
                          return_lse=return_lse, max_q=max_seqlen_q, max_k=max_seqlen_k, rest=rest))
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        outs, lses = [], []
        for b in range(len(cu_seqlens_q) - 1):
            qs = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            ks = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
            o, l = _core(q[None, qs], k[None, ks], v[None, ks], softmax_scale, causal, window_size)
            outs.append(o[0])
            lses.append(l[0])
        return torch.cat(outs), torch.cat(lses, dim=1)  # lse: (H, total_q)

    cute.flash_attn_func = flash_attn_func
    cute.flash_attn_varlen_func = flash_attn_varlen_func
    return cute


@pytest.fixture
def fa4(monkeypatch):
    """A stand-in FA4 in sys.modules (with FA4's namespace `flash_attn`, which has no
    flash_attn_func), the availability caches cleared around the test."""
    calls: list = []
    monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", fake_fa4(calls))
    fa4_mod.unavailable.cache_clear()
    fa2_mod.unavailable.cache_clear()
    yield calls
    fa4_mod.unavailable.cache_clear()
    fa2_mod.unavailable.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_absent():
    """absent() caches what the GPU lacks: on_gpu fakes one, so no test keeps another's answer."""
    fa4_mod.absent.cache_clear()
    yield
    fa4_mod.absent.cache_clear()


def on_gpu(monkeypatch, major: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, 0))
    fa4_mod.absent.cache_clear()


SPECS = [
    Spec(B=2, Hq=4, Hkv=2, Sq=9, Sk=14, D=8, causal=True),  # grouped heads, cross, Sq < Sk
    Spec(Hq=2, Hkv=1, Sq=14, Sk=9, D=8, causal=True),  # Sq > Sk: the first rows see no key
    Spec(Sq=12, D=8, window=(3, 2)),
    Spec(Sq=12, D=8, window=(None, 1)),
    Spec(Sq=6, Sk=12, D=8, causal=True, window=(4, None), scale=0.0),
    Spec(Sq=7, Sk=9, D=8, Dv=16, scale=0.7),
    Spec(B=3, Hq=4, Hkv=2, Sq=5, Sk=11, D=8, key_lengths=(11, 0, 4), key_drop=0.3),  # varlen, one empty batch
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.short())
def test_adapter_is_the_contract_over_fa4_semantics(spec: Spec, fa4) -> None:
    spec = spec.replace(dtype="float64")
    inp = spec.make_inputs(requires_grad=True)
    out, lse = fa4_mod.attention(inp.q, inp.k, inp.v, spec.config(), inp.key_padding_mask)
    leaf = [getattr(inp, n).detach().requires_grad_() for n in ("q", "k", "v")]
    want_out, want_lse = oracle(*leaf, spec.config(), inp.key_padding_mask)
    assert out.shape == want_out.shape and lse.shape == want_lse.shape == (spec.B, spec.Hq, spec.Sq)
    assert lse.dtype == torch.float32
    assert torch.allclose(out, want_out, atol=1e-10)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want_lse))  # empty rows: -inf, not +inf
    finite = torch.isfinite(want_lse)
    assert torch.allclose(lse[finite].double(), want_lse[finite], atol=1e-5)
    grads = torch.autograd.grad(out, [inp.q, inp.k, inp.v], inp.grad_out)
    want = torch.autograd.grad(want_out, leaf, inp.grad_out)
    for name, g, w in zip(("dq", "dk", "dv"), grads, want):
        assert torch.allclose(g, w, atol=1e-9), name


def test_arguments_reach_fa4_by_name(fa4) -> None:
    spec = Spec(Hq=4, Hkv=2, Sq=6, Sk=10, D=8, causal=True, window=(3, None), scale=0.25, dtype="float64")
    inp = spec.make_inputs()
    fa4_mod.attention(inp.q, inp.k, inp.v, spec.config())
    call = fa4[-1]
    assert call["kind"] == "dense" and call["qv"] is None and call["rest"] == {}
    assert call["shape"] == (1, 6, 4, 8)  # (B, S, H, D)
    assert call["scale"] == 0.25 and call["causal"] is True and call["window"] == (3, None)
    assert call["softcap"] == 0.0 and call["return_lse"] is True
    fa4_mod.attention(inp.q, inp.k, inp.v, spec.replace(causal=False, window=None).config())
    assert fa4[-1]["window"] == (None, None) and fa4[-1]["causal"] is False

    padded = Spec(B=2, Sq=4, Sk=8, D=8, key_lengths=(8, 3), dtype="float64")
    inp = padded.make_inputs()
    fa4_mod.attention(inp.q, inp.k, inp.v, padded.config(), inp.key_padding_mask)
    assert fa4[-1]["kind"] == "varlen" and fa4[-1]["max_q"] == 4 and fa4[-1]["max_k"] == 8


def test_declines_what_fa4_cannot_do(fa4) -> None:
    spec = Spec(Sq=8, causal=True, key_lengths=(4,), dtype="float64")
    inp = spec.make_inputs()
    with pytest.raises(ValueError, match="key_padding_mask"):
        fa4_mod.attention(inp.q, inp.k, inp.v, spec.config(), inp.key_padding_mask)
    with pytest.raises(ValueError, match="dropout"):
        fa4_mod.attention(inp.q, inp.k, inp.v, spec.replace(key_lengths=None, dropout_p=0.1).config())
    impl = fa4_mod.flash_attn4
    for bad in (dict(bias="full"), dict(causal=True, Sk=12, align="top_left"), dict(dropout_p=0.1), dict(block=(4, 1, 0))):
        assert impl.why_not(Spec(Sq=8, D=16, dtype="float16", device="cuda", **bad)) is not None, bad
    assert "dtype" in impl.why_not(Spec(Sq=8, D=16, dtype="float32", device="cuda"))
    assert "device" in impl.why_not(Spec(Sq=8, D=16, dtype="float16"))


def test_head_dim_limits_per_arch() -> None:
    hd = fa4_mod.head_dims
    assert hd(9, 256, 256, backward=False, gqa=False) is None
    assert "backward" in hd(9, 256, 256, backward=True, gqa=False)
    assert hd(9, 128, 128, backward=True, gqa=True) is None
    assert hd(9, 192, 128, backward=True, gqa=False) is None
    assert "grouped" in hd(9, 192, 128, backward=True, gqa=True)
    assert "multiples of 8" in hd(9, 12, 12, backward=False, gqa=False)
    assert hd(9, 264, 264, backward=False, gqa=False) is not None
    assert hd(10, 160, 160, backward=False, gqa=False) is not None  # Blackwell: 8..128 or listed pairs
    assert hd(10, 256, 256, backward=True, gqa=False) is None
    assert hd(10, 64, 512, backward=False, gqa=False) is None
    assert hd(10, 64, 512, backward=True, gqa=False) is not None
    # Hopper's forward with D != Dv: the pairs upstream tests; the drawn faults (D=16, Dv > D) are declined
    for D, Dv in ((16, 128), (16, 64), (16, 32), (64, 128), (64, 32)):
        assert "illegal memory access" in hd(9, D, Dv, backward=False, gqa=False), (D, Dv)
    assert hd(9, 128, 64, backward=False, gqa=True) is None
    assert hd(9, 192, 128, backward=False, gqa=True) is None
    assert hd(10, 16, 128, backward=False, gqa=False) is None  # the fault is Hopper's forward tile


def test_supports_sees_the_backward_through_the_registry(monkeypatch) -> None:
    """The registry hands `needs` to a two-argument supports(): the backward's own limits."""
    on_gpu(monkeypatch, 9)
    impl = fa4_mod.flash_attn4
    spec = Spec(Sq=8, D=256, dtype="bfloat16", device="cuda")
    assert impl.why_not(spec) is None
    assert "backward" in impl.why_not(spec, {"backward"})
    on_gpu(monkeypatch, 8)
    assert "compute capability 8" in impl.why_not(spec)
    one_arg = Impl(name="x", variant="dense", fn=lambda *a: None, features={"backward"},
                   supports=lambda s: "one" if s.D > 8 else None)
    assert one_arg.why_not(Spec(D=16), {"backward"}) == "one"


@pytest.mark.parametrize("missing", ["no flash_attn", "no flash_attn.cute"])
def test_availability_needs_flash_attn_cute_itself(missing: str, monkeypatch) -> None:
    """find_spec("flash_attn.cute") raises when flash_attn itself is missing and returns None when
    only the submodule is: both say "not installed", neither raises."""
    def find_spec(name, package=None):
        if missing == "no flash_attn":
            raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")
        return None

    monkeypatch.setattr(fa4_mod.importlib.util, "find_spec", find_spec)
    on_gpu(monkeypatch, 9)
    fa4_mod.unavailable.cache_clear()
    try:
        assert fa4_mod.flash_attn4.unavailable().startswith("flash_attn.cute not installed")
    finally:
        fa4_mod.unavailable.cache_clear()


def test_availability_with_fa4_installed(fa4, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fa4_mod.flash_attn4.unavailable() == "needs CUDA"
    fa4_mod.unavailable.cache_clear()
    on_gpu(monkeypatch, 8)
    assert "Hopper or Blackwell" in fa4_mod.flash_attn4.unavailable()
    fa4_mod.unavailable.cache_clear()
    on_gpu(monkeypatch, 9)
    assert fa4_mod.flash_attn4.unavailable() is None
    assert fa4_mod.flash_attn4_local.unavailable() is None


def test_a_broken_fa4_install_is_unavailable_with_the_reason(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", _module("flash_attn"))
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _module("flash_attn.cute"))  # found, no flash_attn_func
    on_gpu(monkeypatch, 9)
    fa4_mod.unavailable.cache_clear()
    try:
        assert "no flash_attn_func" in fa4_mod.flash_attn4.unavailable()
        fa4_mod.unavailable.cache_clear()

        def broken(name):
            raise ImportError("libcute_dsl_runtime.so: cannot open shared object file")

        monkeypatch.setattr(fa4_mod.importlib, "import_module", broken)
        reason = fa4_mod.flash_attn4.unavailable()
        assert reason.startswith("flash_attn.cute does not import: ImportError") and "libcute_dsl" in reason
    finally:
        fa4_mod.unavailable.cache_clear()


def test_fa2_adapter_is_unavailable_under_fa4s_namespace_package(fa4, monkeypatch) -> None:
    """FA4 installs `flash_attn` with only `flash_attn.cute` in it: find_spec("flash_attn") finds
    it, and the FA2 adapter must still say it cannot run, not fail on every call."""
    on_gpu(monkeypatch, 9)
    reason = fa2_mod.flash_attn.unavailable()
    assert reason is not None and "no flash_attn_func" in reason
    assert fa2_mod.flash_attn_local.unavailable() == reason
    fa2 = _module("flash_attn")
    fa2.flash_attn_func = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "flash_attn", fa2)
    fa2_mod.unavailable.cache_clear()
    assert fa2_mod.flash_attn.unavailable() is None


def test_upstream_bugs_are_declared(monkeypatch) -> None:
    """FA4 4.0.0b36's wrong answers (canaries below) are declined: scale 0 and a batch element
    whose keys are all padding (key_lengths or key_drop)."""
    on_gpu(monkeypatch, 9)
    impl = fa4_mod.flash_attn4
    assert "softmax_scale=0" in impl.why_not(Spec(Sq=5, scale=0.0, dtype="float16", device="cuda"))
    assert impl.why_not(Spec(Sq=5, scale=0.5, dtype="float16", device="cuda")) is None
    empty = Spec(B=2, Sq=2, key_lengths=(0, 2), dtype="float16", device="cuda")
    assert "no kept key" in impl.why_not(empty)
    assert impl.why_not(empty.replace(key_lengths=(1, 2))) is None
    dropped = Spec(B=2, Sq=2, Sk=2, key_drop=0.9, dtype="float16", device="cuda")
    seeds = [s for s in range(40) if not dropped.replace(seed=s).padding_keep().any(1).all()]
    assert seeds and "no kept key" in impl.why_not(dropped.replace(seed=seeds[0]))
    padded = Spec(B=2, Sq=5, key_lengths=(5, 2), dtype="float16", device="cuda")
    assert impl.why_not(padded) is None  # the forward is right
    assert "varlen backward" in impl.why_not(padded, {"backward"})


def test_local_variant_declares_no_key_padding() -> None:
    """local specs always have a window and padding with a window is declined: declaring
    key_padding there leaves the masking properties nothing to draw (a false health-check fail)."""
    assert "key_padding" in fa4_mod.flash_attn4.features
    assert "key_padding" not in fa4_mod.flash_attn4_local.features
    assert fa4_mod.flash_attn4_local.features == fa4_mod.flash_attn4.features - {"key_padding"}


FINDINGS = Path(__file__).resolve().parent.parent / "scripts" / "checks" / "fa4_findings.py"
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]
# canaries: names in FINDINGS's SUSPECTS, each declined by the adapter on an H200 (compute capability 9)
CANARIES = ("scale0-window", "scale0-lse", "zero-key-batch-grad", "varlen-grad-polarity", "hopper-dv-fault")


def _suspects() -> dict:
    spec = importlib.util.spec_from_file_location("fa4_findings", FINDINGS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUSPECTS


def test_canaries_name_declined_specs_of_the_findings_script(monkeypatch) -> None:
    """The canary below runs FINDINGS by path and names its specs: a moved script or a renamed
    spec would make every child fail to start, so this CPU test keeps both honest, and checks
    that each canary's spec is one the adapter declines on an H200."""
    assert FINDINGS.is_file(), f"{FINDINGS} is missing"
    suspects = _suspects()
    on_gpu(monkeypatch, 9)
    for name in CANARIES:
        assert name in suspects, name
        spec, grad, _ = suspects[name]
        assert fa4_mod.flash_attn4.why_not(spec, {"backward"} if grad else set()) is not None, name


@pytest.mark.parametrize("name", [pytest.param(name, marks=gpu) for name in CANARIES])
def test_fa4_declared_bugs_still_fail_upstream(name: str) -> None:
    """Canaries for upstream_bug() and the Hopper Dv != D forward limit (head_dims) in
    impls/flash_attn4.py: the spec runs past the declaration, in a process of its own
    (scripts/checks/fa4_findings.py; a CUDA fault there cannot poison this one), against the
    float64 oracle. A child that raises a CUDA error or dies of a signal counts as still broken;
    one that fails to start or ends without a row and without either fails the test. Fails once
    FA4 answers within the tolerance rule: then the declaration can go (and docs/DESIGN.md says so)."""
    if why := fa4_mod.flash_attn4.unavailable():
        pytest.skip(why)
    proc = subprocess.run([sys.executable, str(FINDINGS), "--child", name], capture_output=True, text=True,
                          timeout=300)
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    crashed = proc.returncode < 0 or "CUDA error" in proc.stderr
    assert rows or crashed, f"the check printed no row (exit {proc.returncode}): {proc.stderr[-500:]}"
    if not rows or rows[0]["status"] != "ok":
        return  # still wrong (or its process still crashes) upstream
    pytest.fail(f"FA4 answers {name} ({rows[0]['spec']}) within the tolerance rule now: drop it from "
                "upstream_bug() in impls/flash_attn4.py and update docs/DESIGN.md")


def test_fp8_is_declared_for_sm100_only_and_passes_descales_per_kv_head(fa4, monkeypatch) -> None:
    """FA4 asserts `arch // 10 == 10` for fp8: off SM100 the adapter's absent() names fp8, so
    why_not declines fp8 specs and the fp8 properties skip with that reason (on an H200 they drew
    only declined specs and failed Hypothesis' health check: evidence/h200/verify_times-fa4-2026-12-04.txt);
    key padding is declined too (its varlen path takes no descales); the call passes each
    per-tensor descale expanded to FA4's (B, Hkv) float32."""
    spec = Spec(B=2, Hq=4, Hkv=2, Sq=8, D=64, dtype="bfloat16", device="cuda", causal=True, fp8=True)
    impl = fa4_mod.flash_attn4
    assert "fp8" in impl.features
    on_gpu(monkeypatch, 9)
    assert "SM100" in impl.why_not(spec)
    assert "SM100" in impl.lacks_here({"fp8", "causal"})
    assert impl.lacks_here({"causal", "backward"}) is None
    with pytest.raises(pytest.skip.Exception, match="SM100"):
        require(impl, "fp8")
    on_gpu(monkeypatch, 10)
    assert impl.lacks_here({"fp8"}) is None
    assert impl.why_not(spec) is None
    assert "varlen" in impl.why_not(spec.replace(causal=False, key_lengths=(8, 3)))
    inputs = spec.replace(device="cpu").make_inputs()
    fa4_mod.attention(inputs.q, inputs.k, inputs.v, spec.config(), **inputs.descales())
    passed = fa4[-1]["rest"]
    for name, d in inputs.descales().items():
        assert passed[name].shape == (2, 2) and passed[name].dtype == torch.float32
        assert torch.equal(passed[name], d.expand(2, 2))
    with pytest.raises(ValueError, match="takes no fp8 descales"):
        fa4_mod.attention(inputs.q, inputs.k, inputs.v, spec.replace(causal=False).config(),
                          torch.ones(2, 8, dtype=torch.bool), **inputs.descales())
