"""attnbench's fused Triton kernel (impls/triton.py) against the float64 oracle.

CPU tests run the kernels in the Triton interpreter (TRITON_INTERPRET=1, set per test by a
fixture: impls/triton.py reads it at call time and loads the kernels once per mode) on tiny
shapes whose lengths straddle the interpreter's 16-wide blocks. GPU tests (`-m gpu`) run the
compiled, autotuned kernels in float16, bfloat16 and float32 at realistic sizes.

Accuracy rule (flash-attention's): max |triton - oracle| <= K * max |naive - oracle| + floor,
with naive (impls/naive.py) in the same dtype on the same inputs.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from attnbench.impls import naive
from attnbench.impls import triton as tri
from attnbench.oracles.dense import reference, visible
from attnbench.packing import PagedSpec
from attnbench.registry import registry
from attnbench.spec import Config, Spec

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

EPS = {"float32": 1.2e-7, "float16": 9.8e-4, "bfloat16": 7.8e-3}
K = {"out": 3.0, "lse": 3.0, "grad": 4.0}


@pytest.fixture
def interp(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def compiled(monkeypatch):
    """Compiled kernels with the first fitting config (autotuning every spec x dtype would
    compile ~18 configs each); test_gpu_autotuned and `attnbench bench --sweep anchors`
    cover the tuner."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ATTNBENCH_TRITON_AUTOTUNE", "0")


# -- helpers ----------------------------------------------------------------------------------
def _run(fn, spec: Spec, inputs, lse_weight=None):
    """out, lse and the gradients of <out, grad_out> (+ <lse, w> on finite rows) w.r.t. the leaves."""
    leaves = [inputs.q, inputs.k, inputs.v] + ([inputs.bias] if inputs.bias is not None else [])
    out, lse = fn(inputs.q, inputs.k, inputs.v, spec.config(), inputs.key_padding_mask, inputs.bias)
    loss = (out.double() * inputs.grad_out.double()).sum()
    if lse_weight is not None:
        loss = loss + (torch.where(torch.isfinite(lse), lse, 0).double() * lse_weight).sum()
    grads = torch.autograd.grad(loss, leaves)
    return out.detach(), lse.detach(), [g.detach() for g in grads]


def _err(a: torch.Tensor, e: torch.Tensor) -> float:
    a, e = a.double().cpu(), e.double().cpu()
    assert not torch.isnan(a).any(), "NaN in result"
    fin = torch.isfinite(e)
    assert torch.equal(torch.isfinite(a), fin), "non-finite pattern differs from the oracle"
    assert torch.equal(a[~fin], e[~fin]), "infinities differ from the oracle"
    return float((a - e)[fin].abs().max()) if fin.any() else 0.0


def _close(name: str, got, ref, oracle, dtype: str, k: float) -> None:
    scale = max(1.0, float(oracle[torch.isfinite(oracle)].abs().max())) if torch.isfinite(oracle).any() else 1.0
    allowed = k * _err(ref, oracle) + 8 * EPS[dtype] * scale
    error = _err(got, oracle)
    assert error <= allowed, f"{name}: max error {error:.3g} > allowed {allowed:.3g}"


def check(spec: Spec, lse_grad: bool = False) -> None:
    """Forward, lse and gradients of the Triton kernel within the naive-relative tolerance."""
    w = None
    if lse_grad:
        w = torch.randn(spec.B, spec.Hq, spec.Sq, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        w = w.to(spec.device)
    got = _run(tri.attention, spec, spec.make_inputs(requires_grad=True), w)
    ref = _run(naive.attention, spec, spec.make_inputs(requires_grad=True), w)
    oracle_in = spec.make_inputs(requires_grad=True)
    for name in ("q", "k", "v", "bias", "grad_out"):
        t = getattr(oracle_in, name)
        if t is not None:
            setattr(oracle_in, name, t.detach().double().requires_grad_(name != "grad_out"))
    oracle = _run(lambda q, k, v, cfg, m, b: reference(spec, oracle_in), spec, oracle_in, w)
    _close("out", got[0], ref[0], oracle[0], spec.dtype, K["out"])
    _close("lse", got[1], ref[1].float(), oracle[1], spec.dtype, K["lse"])
    names = ["dq", "dk", "dv", "dbias"]
    for name, g, r, o in zip(names, got[2], ref[2], oracle[2]):
        _close(name, g, r, o, spec.dtype, K["grad"])


# -- interpreter: pinned specs ----------------------------------------------------------------
SPECS = {
    "causal_sq_lt_sk": Spec(Hq=2, Sq=20, Sk=37, causal=True),
    "causal_sq_gt_sk": Spec(Hq=2, Sq=37, Sk=20, causal=True),  # first rows see nothing
    "causal_top_left": Spec(Hq=2, Sq=37, Sk=20, causal=True, align="top_left"),
    "cross_odd_dims": Spec(Sq=19, Sk=35, D=24, Dv=40),
    "tiny_head_dim": Spec(Hq=2, Sq=17, D=8, causal=True),
    "window_0_0": Spec(Sq=33, window=(0, 0)),
    "window_cross": Spec(Hq=2, Sq=21, Sk=40, window=(4, 2)),
    "window_left_only": Spec(Sq=35, window=(5, None)),
    "window_beyond_s": Spec(Sq=18, Sk=30, window=(100, 100), causal=True),
    "window_right_top_left": Spec(Sq=40, Sk=23, window=(2, 7), align="top_left"),
    "blocked": Spec(Hq=2, Sq=40, Sk=45, block=(8, 1, 0)),
    "blocked_forward_top_left": Spec(Sq=33, block=(5, 0, 1), align="top_left"),
    "blocked_sq_gt_sk": Spec(Sq=47, Sk=21, block=(7, 2, 2)),  # negative positions fall in buckets < 0
    "blocked_causal_window": Spec(Sq=35, block=(6, 1, 1), causal=True, window=(4, None)),
    "gqa": Spec(B=2, Hq=4, Hkv=2, Sq=37, Sk=20, causal=True),
    "mqa": Spec(Hq=3, Hkv=1, Sq=23, window=(3, 0)),
    "padding_zero_length": Spec(B=3, Sq=18, Sk=33, key_lengths=(0, 17, 33), key_drop=0.3),
    "bias_full_neginf": Spec(B=2, Hq=2, Sq=19, Sk=35, bias="full", bias_neginf=0.3),
    "bias_kills_rows": Spec(Sq=20, Sk=5, bias="full", bias_neginf=0.8),
    "bias_per_head_causal": Spec(Hq=2, Sq=21, bias="per_head", causal=True),
    "bias_per_key_padding": Spec(B=2, Sq=17, Sk=19, bias="per_key", key_lengths=(0, 9)),
    "alibi_gqa": Spec(Hq=4, Hkv=1, Sq=20, bias="alibi", causal=True),
    "scale_zero": Spec(Sq=18, scale=0.0, causal=True),
    "large_logits": Spec(Sq=20, magnitude=6.0),
    "fp16_gqa_causal": Spec(Hq=4, Hkv=2, Sq=35, Sk=20, dtype="float16", causal=True),
    "fp16_window_bias": Spec(Hq=2, Sq=33, dtype="float16", window=(3, 3), bias="full", bias_neginf=0.1),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_matches_oracle(interp, name):
    spec = SPECS[name]
    assert tri.supports(spec) is None
    check(spec)


def test_specs_have_empty_rows_where_claimed(interp):
    # the specs meant to exercise empty rows really have some (so the -inf / zero checks bite)
    for name in ("causal_sq_gt_sk", "padding_zero_length", "bias_kills_rows", "blocked_sq_gt_sk"):
        spec = SPECS[name]
        inputs = spec.make_inputs()
        _, lse = reference(spec, inputs)
        assert torch.isinf(lse).any(), name


def test_lse_gradient(interp):
    check(Spec(B=2, Hq=2, Hkv=1, Sq=21, Sk=34, causal=True, key_lengths=(0, 30)), lse_grad=True)


def test_skips_key_blocks_outside_the_window(interp):
    """Keys in blocks no query block may see are never loaded: NaN there cannot leak."""
    block = tri.kernels(True).INTERPRET_CONFIG["BLOCK_N"]
    spec = Spec(Hq=2, Sq=16, Sk=8 * block, window=(3, 2))  # one query block: p in [Sk-16, Sk)
    inputs = spec.make_inputs(requires_grad=True)
    out_clean, lse_clean, grads_clean = _run(tri.attention, spec, inputs)
    first_loaded = ((spec.Sk - spec.Sq - 3) // block) * block
    with torch.no_grad():
        inputs.k[:, :, :first_loaded] = math.nan
        inputs.v[:, :, :first_loaded] = math.nan
    out, lse, grads = _run(tri.attention, spec, inputs)
    assert torch.equal(out, out_clean) and torch.equal(lse, lse_clean)
    assert torch.equal(grads[0], grads_clean[0])
    for g, clean in zip(grads[1:], grads_clean[1:]):
        assert torch.equal(g[:, :, first_loaded:], clean[:, :, first_loaded:])
        assert not g[:, :, :first_loaded].any()


def test_non_contiguous_layout(interp):
    # (B, S, H, D) storage viewed as (B, H, S, D), the layout most models hold
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 19, 3, 16, generator=g).transpose(1, 2) for _ in range(3))
    cfg = Config(scale=0.25, causal=True)
    out, lse = tri.attention(q, k, v, cfg)
    ref_out, ref_lse = naive.attention(q, k, v, cfg)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_no_keys_and_no_queries(interp):
    q = torch.randn(1, 2, 5, 16, requires_grad=True)
    k = torch.randn(1, 2, 0, 16, requires_grad=True)
    v = torch.randn(1, 2, 0, 8, requires_grad=True)
    out, lse = tri.attention(q, k, v, Config(scale=0.25))
    assert out.shape == (1, 2, 5, 8) and not out.any()
    assert torch.isneginf(lse).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert not q.grad.any()
    q0 = torch.randn(1, 2, 0, 16)
    out, lse = tri.attention(q0, torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), Config(scale=0.25))
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


@pytest.mark.parametrize("D", [16, 64])
def test_float32_lone_key_dv_is_exact(interp, D):
    """With window (0, 0) every query sees one key, so p is exactly 1 and dv must equal dO bit
    for bit. The dk/dv kernel computed its logits as k @ q^T while the forward computed q @ k^T;
    numpy's OpenBLAS (the interpreter's dot) sums the two in different orders off its micro-tile
    diagonal (Sk = Sq + 7 puts query i's key there), and the recomputed p = exp2(s - m2) was off
    by |s| eps (dv 37x naive's error at logits ~100)."""
    spec = Spec(Sq=16, Sk=23, D=D, window=(0, 0), scale=1.0, magnitude=8.0, dtype="float32")
    inputs = spec.make_inputs(requires_grad=True)
    out, _ = tri.attention(inputs.q, inputs.k, inputs.v, spec.config())
    dv, = torch.autograd.grad(out, [inputs.v], inputs.grad_out)
    assert torch.equal(out, inputs.v.detach()[:, :, 7:])
    assert torch.equal(dv[:, :, 7:], inputs.grad_out)


def test_deterministic(interp):
    spec = Spec(Hq=2, Hkv=1, Sq=18, Sk=20, causal=True, bias="per_head")
    first = _run(tri.attention, spec, spec.make_inputs(requires_grad=True))
    second = _run(tri.attention, spec, spec.make_inputs(requires_grad=True))
    for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]]):
        assert torch.equal(a, b)


def test_visibility_oracle_agrees_on_a_blocked_case():
    # guards the interval form used by the kernels against the oracle's own visibility
    spec = SPECS["blocked_sq_gt_sk"]
    ok = visible(1, spec.Sq, spec.Sk, block=spec.block)[0]
    args, _ = tri._mask_args(spec.config(), spec.Sq, spec.Sk)
    W, lb, lf, off = args["W"], args["LB"], args["LF"], args["off"]
    for i in range(spec.Sq):
        p = i + off
        lo, hi = max((p // W - lb) * W, 0), min((p // W + lf + 1) * W - 1, spec.Sk - 1)
        expected = [lo <= j <= hi for j in range(spec.Sk)]
        assert ok[i].tolist() == expected


# -- errors and declarations ------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors(interp):
    q = torch.randn(1, 2, 8, 16)
    cfg = Config(scale=0.25)
    with pytest.raises(ValueError, match="q must be 4-D"):
        tri.attention(q[0], q, q, cfg)
    with pytest.raises(TypeError, match="dtype"):
        tri.attention(q.double(), q.double(), q.double(), cfg)
    with pytest.raises(ValueError, match="share one dtype"):
        tri.attention(q, q.half(), q, cfg)
    with pytest.raises(ValueError, match="not a multiple"):
        tri.attention(torch.randn(1, 3, 8, 16), q, q, cfg)
    with pytest.raises(ValueError, match="head dim"):
        tri.attention(q, torch.randn(1, 2, 8, 32), q, cfg)
    with pytest.raises(ValueError, match="key_padding_mask"):
        tri.attention(q, q, q, cfg, key_padding_mask=torch.ones(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must be bool"):
        tri.attention(q, q, q, cfg, key_padding_mask=torch.ones(1, 8))
    with pytest.raises(ValueError, match="bias"):
        tri.attention(q, q, q, cfg, bias=torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="dropout"):
        tri.attention(q, q, q, Config(scale=0.25, dropout_p=0.1))
    with pytest.raises(ValueError, match="head dims up to"):
        big = torch.randn(1, 1, 4, 512)
        tri.attention(big, big, big, cfg)


def test_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert tri.supports(Spec()) == "cpu needs TRITON_INTERPRET=1"
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        tri.attention(q, q, q, Config(scale=0.25))


def test_supports_declares_limits(interp):
    assert "bf16" in tri.supports(Spec(dtype="bfloat16"))
    assert tri.supports(Spec(dtype="bfloat16", device="cuda")) is None
    assert "head dims" in tri.supports(Spec(D=512))
    assert tri.supports(Spec(D=24, Dv=256)) is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [16, 96, 128, 256])
def test_configs_fit_shared_memory(dtype, head_dim):
    ker = tri.kernels(False)  # the compiled-mode module loads without a GPU
    args = dict(Q=torch.empty(1, dtype=dtype), BLOCK_D=head_dim, BLOCK_DV=head_dim)
    for kind, configs in ker.CONFIGS.items():
        kept = ker.PRUNE[kind](configs, {}, **args)
        assert kept and all(ker.smem_estimate(kind, c, args) <= ker.SMEM_BUDGET for c in kept), kind
        if dtype == torch.float32:  # one small tile, no tuning (see FP32_CONFIGS)
            assert len(kept) == 1 and kept[0] in ker.FP32_CONFIGS[kind]


def test_kernels_loaded_per_mode(interp):
    assert tri.kernels(True).INTERPRET is True
    assert tri.kernels() is tri.kernels(True)


class _CountLaunches:
    """Stands in for a kernel object: records the grid of every `kernel[grid](...)` launch."""

    def __init__(self, kernel, grids: list):
        self.kernel, self.grids = kernel, grids

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


def test_varlen_is_one_launch_per_kernel(interp, monkeypatch):
    """A packed batch of three sequences (one of them without queries) is one launch of each
    kernel, over cdiv(max_seqlen, 16) blocks x sequences * heads, forward and backward."""
    from attnbench.packing import cu_seqlens

    ker = tri.kernels(True)
    grids = {kind: [] for kind in ("fwd", "preprocess", "dkdv", "dq")}
    for kind in ("fwd", "dkdv", "dq"):
        monkeypatch.setitem(ker.RAW, kind, _CountLaunches(ker.RAW[kind], grids[kind]))
    monkeypatch.setattr(ker, "bwd_preprocess", _CountLaunches(ker.bwd_preprocess, grids["preprocess"]))
    lengths_q, lengths_k = (5, 0, 17), (5, 3, 18)
    q = torch.randn(sum(lengths_q), 2, 16, requires_grad=True)
    k, v = (torch.randn(sum(lengths_k), 1, 16, requires_grad=True) for _ in range(2))
    out, lse = tri.varlen(q, k, v, cu_seqlens(lengths_q), cu_seqlens(lengths_k), 17, 18, Config(scale=0.25, causal=True))
    (out.sum() + lse[:, :5].sum()).backward()
    assert grids == {"fwd": [(2, 6)], "preprocess": [(2, 2)], "dkdv": [(2, 3)], "dq": [(2, 6)]}
    assert torch.all(k.grad[5:8] == 0) and torch.isfinite(q.grad).all()


def test_varlen_past_the_grid_limit_launches_per_group_of_sequences(interp, monkeypatch):
    """When sequences * heads pass CUDA's grid limit (lowered here to 5), the packed call launches
    each kernel once per group of sequences that fits, with the same results, gradients included."""
    from attnbench.packing import cu_seqlens

    lengths = (3, 0, 17, 2, 1)
    q, k, v = (torch.randn(sum(lengths), 2, 16) for _ in range(3))
    cu = cu_seqlens(lengths)
    runs = []
    for limit in (tri.MAX_GRID_Y, 5):
        monkeypatch.setattr(tri, "MAX_GRID_Y", limit)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = tri.varlen(*leaves, cu, cu, 17, 17, Config(scale=0.25, causal=True))
        (out.sum() + lse[:, :3].sum()).backward()
        runs.append([out, lse, *(t.grad for t in leaves)])
    launches = []
    monkeypatch.setitem(tri.kernels(True).RAW, "fwd", _CountLaunches(tri.kernels(True).RAW["fwd"], launches))
    tri.varlen(q, k, v, cu, cu, 17, 17, Config(scale=0.25))
    assert launches == [(2, 4), (2, 4), (2, 2)]  # 2, 2 and 1 sequences of 2 heads
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_registered_for_dense_and_local():
    reg = registry()
    for key in ("dense/triton", "local/triton"):
        impl = reg.get(key)
        assert impl.fn is tri.attention
        assert {"causal", "sliding_window", "blocked_window", "gqa", "backward", "lse", "bias_grad"} <= impl.features
        assert "dropout" not in impl.features and "float64" not in impl.dtypes


# -- GPU: compiled, autotuned kernels at realistic sizes --------------------------------------
GPU_SPECS = {
    "causal_1024_d128": Spec(B=2, Hq=8, Sq=1024, D=128, causal=True),
    "cross_gqa_window_d96": Spec(B=2, Hq=8, Hkv=2, Sq=1000, Sk=1500, D=96, window=(256, 0)),
    "padding_bias_d64": Spec(B=2, Hq=4, Sq=777, D=64, key_lengths=(777, 0), bias="per_head", bias_neginf=0.05),
    "blocked_d256": Spec(Hq=4, Sq=700, D=256, block=(64, 1, 0)),
    "causal_sq_gt_sk_mqa_dv": Spec(B=2, Hq=4, Hkv=1, Sq=600, Sk=333, D=64, Dv=32, causal=True),
    # out of shared memory on the first config without the autotuner: the adapter falls back to a smaller one
    "window0_bias_d256_dv16": Spec(Sq=160, D=256, Dv=16, window=(0, 0), key_lengths=(90,), bias="full"),
    # bias + key padding + lengths not a multiple of 16: the dk/dv kernel must compile (Triton 3.6
    # "operand does not dominate this use" on a naive formulation)
    "bias_padding_unaligned_d256": Spec(Sq=20, D=256, Dv=16, window=(0, 0), key_lengths=(9,), bias="full"),
    "bias_padding_one_query": Spec(Sq=1, Sk=7, D=128, window=(1, 0), key_lengths=(3,), bias="full"),
}


GPU_CASES = [(name, dtype) for name in GPU_SPECS for dtype in ("float16", "bfloat16")] + [
    ("causal_1024_d128", "float32"), ("padding_bias_d64", "float32"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_CASES)
def test_gpu_matches_oracle(compiled, name, dtype):
    spec = GPU_SPECS[name].replace(device="cuda", dtype=dtype)
    assert tri.supports(spec) is None
    check(spec, lse_grad=name == "padding_bias_d64")

@pytest.mark.gpu
@pytest.mark.parametrize("Sq", [1, 37])
def test_gpu_float32_lone_key_dv_is_exact(compiled, Sq):
    """Pinned (H100 property run): with one visible key p is exactly 1, so dv must equal dO
    bit for bit; the backward's recomputed logits rounded differently from the forward's (FMA
    contraction) and gave dv off by |s| eps (1.3e-5 at logits ~100)."""
    spec = Spec(Hq=2, Sq=Sq, Sk=1, D=64, scale=2.0, magnitude=3.0, dtype="float32", device="cuda")
    inputs = spec.make_inputs(requires_grad=True)
    out, _ = tri.attention(inputs.q, inputs.k, inputs.v, spec.config())
    dv, = torch.autograd.grad(out, [inputs.v], inputs.grad_out)
    assert torch.equal(out, inputs.v.detach().expand_as(out))
    if Sq == 1:
        assert torch.equal(dv, inputs.grad_out)
    else:  # a sum of Sq rows of dO: only the summation order may differ
        want = inputs.grad_out.double().sum(dim=2, keepdim=True)
        assert (dv.double() - want).abs().max() <= Sq * 1.2e-7 * inputs.grad_out.abs().sum(dim=2).max()


@pytest.mark.gpu
def test_gpu_autotuned(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("ATTNBENCH_TRITON_AUTOTUNE", "1")
    spec = Spec(B=2, Hq=4, Hkv=2, Sq=1000, Sk=1000, D=64, causal=True, dtype="bfloat16", device="cuda")
    check(spec)  # tunes
    check(spec)  # launches the kept pick directly


def test_without_autotuning_a_config_out_of_shared_memory_falls_back(monkeypatch):
    """Pinned (H100): D=256 with a bias in float16 needed 234 KB of shared memory for the config
    the estimate chose; without the autotuner the launch must move on to a config that fits."""
    import types

    from triton.runtime.errors import OutOfResources

    ker = tri.kernels(interpret=True)  # the same configs and pruner; loading the compiled module would switch Triton's mode
    tried = []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(**kw):
                tried.append((kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]))
                if len(tried) < 3:
                    raise OutOfResources(239616, 232448, "shared memory")

            return launch

    fake = types.SimpleNamespace(PRUNE=ker.PRUNE, CONFIGS=ker.CONFIGS, FP32_CONFIGS=ker.FP32_CONFIGS,
                                 smem_estimate=ker.smem_estimate, RAW={"fwd": FakeKernel()})
    q = torch.empty(1, 1, 160, 256, dtype=torch.float16)
    args = dict(Q=q, BLOCK_D=256, BLOCK_DV=16, HAS_BIAS=True)
    tri._launch_first_that_fits(fake, "fwd", 160, "BLOCK_M", 1, args)
    assert len(tried) == 3 and len(set(tried)) == 3  # two refused, the third ran

    tried.clear()

    class Never(FakeKernel):
        def __getitem__(self, grid):
            def launch(**kw):
                tried.append(kw["BLOCK_M"])
                raise OutOfResources(1, 0, "shared memory")

            return launch

    fake.RAW["fwd"] = Never()
    with pytest.raises(OutOfResources):
        tri._launch_first_that_fits(fake, "fwd", 160, "BLOCK_M", 1, args)
    assert len(tried) == len(ker.CONFIGS["fwd"])  # every config was tried before giving up


def test_autotuned_launch_keeps_the_pick_and_launches_it_directly(monkeypatch):
    """The autotuner runs once per tuning key; repeat calls launch its pick on the raw kernel
    (skipping the Autotuner's per-call dispatch), with the pick's block sizes in the grid."""
    import types

    import triton

    calls = []
    pick = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3)

    class FakeTuner:
        best_config = None

        def __getitem__(self, grid):
            def launch(**kw):
                calls.append(("tuner", grid({"BLOCK_M": 64}), kw["Sq"]))
                FakeTuner.best_config = pick

            return launch

    class FakeRaw:
        def __getitem__(self, grid):
            def launch(**kw):
                calls.append(("raw", grid, kw["BLOCK_M"], kw["num_warps"], kw["num_stages"]))

            return launch

    fake = types.SimpleNamespace(TUNE_KEY=["Sq", "Sk"], TUNED={"fwd": FakeTuner()}, RAW={"fwd": FakeRaw()})
    monkeypatch.setattr(tri, "kernels", lambda interpret=None: fake)
    monkeypatch.setattr(tri, "_PICKS", {})
    monkeypatch.setenv("ATTNBENCH_TRITON_AUTOTUNE", "1")
    q = torch.empty(1, 2, 200, 16, dtype=torch.float16)
    args = dict(Q=q, Bias=q, KPM=q, Sq=200, Sk=300, DOT_PREC="tf32")
    for _ in range(3):
        tri._launch("fwd", 200, "BLOCK_M", 2, False, **args)
    tri._launch("fwd", 200, "BLOCK_M", 2, False, **{**args, "Sk": 301})  # a new key tunes again
    assert calls == [("tuner", (4, 2), 200), ("raw", (4, 2), 64, 4, 3), ("raw", (4, 2), 64, 4, 3), ("tuner", (4, 2), 200)]


def test_launch_plans_call_the_compiled_kernel_per_specialization(monkeypatch):
    """The first launch of a specialization goes through Triton's JIT (which returns the compiled
    kernel); repeats call that kernel with every argument in signature order; a new int value, a
    new dtype or a tensor address of another 16-byte alignment goes through the JIT again."""
    import types

    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("plan", grid, args))

    class Raw:
        arg_names = ["Q", "Sq", "BLOCK_M"]

        def __getitem__(self, grid):
            def launch(**kw):
                calls.append(("jit", grid, kw["Sq"], kw["num_warps"]))
                return Compiled()

            return launch

    fake = types.SimpleNamespace(RAW={"fwd": Raw()})
    monkeypatch.setattr(tri, "_PLANS", {})
    monkeypatch.setenv("ATTNBENCH_TRITON_PLANS", "1")
    buf = torch.zeros(64, dtype=torch.float16)
    q, q_odd = buf[:16], buf[1:17]  # q_odd's address is 2 bytes past a 16-byte boundary
    meta = {"BLOCK_M": 64, "num_warps": 4}
    tri._run(fake, "fwd", (4, 2), {"Q": q, "Sq": 200}, meta)
    tri._run(fake, "fwd", (4, 2), {"Q": q, "Sq": 200}, meta)
    tri._run(fake, "fwd", (5, 2), {"Q": q.clone(), "Sq": 200}, meta)  # new data and grid, same plan
    assert calls[0] == ("jit", (4, 2), 200, 4)
    assert calls[1] == ("plan", (4, 2, 1), (q, 200, 64))
    assert calls[2][0] == "plan" and calls[2][1] == (5, 2, 1)
    calls.clear()
    tri._run(fake, "fwd", (4, 2), {"Q": q, "Sq": 201}, meta)  # another int value
    tri._run(fake, "fwd", (4, 2), {"Q": q_odd, "Sq": 200}, meta)  # another alignment
    tri._run(fake, "fwd", (4, 2), {"Q": q.float(), "Sq": 200}, meta)  # another dtype
    tri._run(fake, "fwd", (4, 2), {"Q": q, "Sq": 200}, {**meta, "num_warps": 8})  # another config
    assert [c[0] for c in calls] == ["jit"] * 4
    calls.clear()
    monkeypatch.setenv("ATTNBENCH_TRITON_PLANS", "0")
    tri._run(fake, "fwd", (4, 2), {"Q": q, "Sq": 200}, meta)
    assert [c[0] for c in calls] == ["jit"]


@pytest.mark.gpu
def test_gpu_plan_launches_equal_jit_launches(monkeypatch):
    """The compiled-kernel launches give bit-identical forward and backward results to Triton's
    JIT launches, over masks, grouped heads, padding, bias and a misaligned view (another plan)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name in ("causal_1024_d128", "cross_gqa_window_d96", "padding_bias_d64"):
        spec = GPU_SPECS[name].replace(device="cuda", dtype="bfloat16")
        x = spec.make_inputs(requires_grad=True)

        def run(q=x.q, spec=spec, x=x):
            out, lse = tri.attention(q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
            return (out, lse, *torch.autograd.grad(out, [q, x.k, x.v], x.grad_out))

        monkeypatch.setenv("ATTNBENCH_TRITON_PLANS", "0")
        want = run()
        monkeypatch.setenv("ATTNBENCH_TRITON_PLANS", "1")
        hits = tri.PLAN_STATS["hits"]
        for _ in range(3):  # the first builds the plans, the next two launch them
            assert all(torch.equal(a, b) for a, b in zip(run(), want)), name
        assert tri.PLAN_STATS["hits"] >= hits + 6, "the plans were not used"
        if name != "causal_1024_d128":
            continue
        # a view 2 bytes off a 16-byte boundary: another specialization, its own plan
        buf = torch.empty(x.q.numel() + 1, dtype=x.q.dtype, device="cuda")
        q_odd = buf[1:].view_as(x.q).copy_(x.q.detach()).requires_grad_()
        monkeypatch.setenv("ATTNBENCH_TRITON_PLANS", "0")
        want = run(q_odd)
        monkeypatch.setenv("ATTNBENCH_TRITON_PLANS", "1")
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(run(q_odd), want)), f"{name}, misaligned q"


# -- the score features (soft cap, ALiBi slopes, sinks), interpreter ---------------------------
SCORE_SPECS = {
    "all_three_multiblock_gqa": Spec(B=2, Hq=4, Hkv=2, Sq=37, Sk=50, causal=True, softcap=2.5, alibi=True, sinks=True,
                                     seed=2),
    "saturated_cap_window_fp16": Spec(Hq=2, Sq=33, Sk=20, window=(6, 3), softcap=1.0, magnitude=8.0, alibi=True,
                                      dtype="float16", seed=5),
    "empty_rows_with_sinks": Spec(B=2, Hq=2, Sq=18, key_lengths=(0, 11), sinks=True, bias="full", seed=1),
}


@pytest.mark.parametrize("name", list(SCORE_SPECS))
def test_score_features_match_oracle(interp, name):
    """out, lse, dq, dk, dv (dbias, dsinks) against the oracle under the suite's tolerance rule."""
    from attnbench.properties import harness

    spec = SCORE_SPECS[name]
    verdicts = harness.verdicts(registry().impls["dense/triton"], spec, grad=True)
    assert "dsinks" in verdicts or not spec.sinks
    bad = [v.message() for v in verdicts.values() if not v.ok]
    assert not bad, bad


def test_spread_picks_one_config_per_specialization(monkeypatch):
    """ATTNBENCH_TRITON_AUTOTUNE=spread (verify's mode): the config index depends on what
    compiles (kernel, dtype, flags, tile dims), never on the lengths or window sizes, so a
    property run compiles each specialization once; different specializations spread over the
    configs."""
    monkeypatch.setenv("ATTNBENCH_TRITON_AUTOTUNE", "spread")
    assert tri.tune_mode() == "spread" and not tri.autotune_enabled()

    class Ker:
        TUNE_KEY = ["Sq", "Sk", "BLOCK_D", "BLOCK_DV", "left", "right", "HAS_BIAS"]

    def args(**over):
        base = dict(Q=torch.empty(1, dtype=torch.float16), Sq=17, Sk=33, BLOCK_D=64, BLOCK_DV=64, left=3, right=0,
                    HAS_BIAS=False)
        return {**base, **over}

    one = tri.spread_index(Ker, "fwd", args(), 5)
    assert all(tri.spread_index(Ker, "fwd", args(**o), 5) == one
               for o in ({"Sq": 1}, {"Sk": 4097}, {"left": 0, "right": 9}))
    picks = {tri.spread_index(Ker, kind, args(BLOCK_D=d, HAS_BIAS=b), 5)
             for kind in ("fwd", "dq") for d in (16, 32, 64, 128, 256) for b in (False, True)}
    assert len(picks) >= 3
    for value, mode in (("0", "first"), ("1", "tune"), ("off", "first"), ("", "tune")):
        monkeypatch.setenv("ATTNBENCH_TRITON_AUTOTUNE", value)
        assert tri.tune_mode() == mode


# -- the paged cache with split-KV, interpreter -------------------------------------------------
PAGED_SPLIT_SPECS = {
    # GQA; an empty cache (row out 0, lse -inf); a 3-block cache over 3 splits; a one-block cache
    # (splits 2 and 3 see no key)
    "gqa_empty_and_short": (PagedSpec(cache_seqlens=(40, 0, 5), Sq=1, block_size=5, Hq=4, Hkv=2, seed=3), 3),
    # a window of 5 over a 4-token chunk: the second split holds key 32 only, which rows 0-2 of
    # the chunk do not see; block size 4 against 33 and 26 tokens; the soft cap
    "window_chunk_softcap": (PagedSpec(cache_seqlens=(33, 26), Sq=4, block_size=4, Hq=2, Hkv=1, causal=True,
                                       window=(5, 0), softcap=2.5, seed=4), 2),
    # chunked prefill across two query blocks, each with its own key range cut in three
    "causal_prefill_two_query_blocks": (PagedSpec(cache_seqlens=(52,), Sq=20, block_size=3, Hq=2, Hkv=2,
                                                  causal=True, seed=5), 3),
}


@pytest.mark.parametrize("name", list(PAGED_SPLIT_SPECS))
def test_paged_split_kv_matches_unsplit_and_oracle(interp, name):
    """Split-KV (num_splits > 1) and one split against the float64 oracle, within the naive-relative
    rule; -inf exactly where the oracle's rows are empty; sequences whose keys fit one split come
    back bit for bit (splits that see nothing add exact zeros in the combine)."""
    from attnbench.properties.harness import run_paged_oracle

    spec, splits = PAGED_SPLIT_SPECS[name]
    x = spec.make_inputs()
    args = (x.q, x.k_cache, x.v_cache, x.block_table, x.cache_seqlens, spec.config())
    want = run_paged_oracle(spec, x)
    ref_out, ref_lse = registry().get("dense/naive").paged(*args)
    one = tri.paged(*args, num_splits=1)
    split = tri.paged(*args, num_splits=splits)
    for out, lse in (one, split):
        _close("out", out, ref_out, want.out, spec.dtype, K["out"])
        _close("lse", lse, ref_lse.float(), want.lse, spec.dtype, K["lse"])
    assert not torch.equal(one[0], split[0]), "no row was merged from several splits"
    for b, n in enumerate(spec.cache_seqlens):
        if n <= 16 and spec.Sq == 1:  # one key block: one split sees every key
            assert torch.equal(one[0][b], split[0][b]) and torch.equal(one[1][b], split[1][b])


def test_paged_splits_forced_by_env_and_checked(interp, monkeypatch):
    """ATTNBENCH_TRITON_SPLITS forces the split count (the num_splits keyword wins over it); a
    bad value is a one-line ValueError."""
    spec = PagedSpec(cache_seqlens=(40,), Sq=1, block_size=8)
    x = spec.make_inputs()
    args = (x.q, x.k_cache, x.v_cache, x.block_table, x.cache_seqlens, spec.config())
    monkeypatch.setenv(tri.SPLITS_ENV, "3")
    by_env = tri.paged(*args)
    assert torch.equal(by_env[0], tri.paged(*args, num_splits=3)[0])
    assert not torch.equal(by_env[0], tri.paged(*args, num_splits=1)[0])
    for bad in ("0", "two", "-1", str(tri.MAX_SPLITS + 1)):
        monkeypatch.setenv(tri.SPLITS_ENV, bad)
        with pytest.raises(ValueError, match="ATTNBENCH_TRITON_SPLITS|num_splits"):
            tri.paged(*args)
    monkeypatch.delenv(tri.SPLITS_ENV)
    with pytest.raises(ValueError, match="num_splits"):
        tri.paged(*args, num_splits=0)


def test_split_heuristic():
    """Enough programs to give each SM SPLIT_PROGRAMS_PER_SM, no split shorter than
    SPLIT_MIN_BLOCKS key blocks, at most MAX_SPLITS; 1 without SMs (the interpreter)."""
    per_sm, min_blocks = tri.SPLIT_PROGRAMS_PER_SM, tri.SPLIT_MIN_BLOCKS
    assert tri.split_heuristic(programs=256, key_blocks=2048, sms=132) == -(-per_sm * 132 // 256)
    assert tri.split_heuristic(programs=8, key_blocks=2048, sms=132) == tri.MAX_SPLITS
    assert tri.split_heuristic(programs=8, key_blocks=3 * min_blocks, sms=132) == 3
    assert tri.split_heuristic(programs=8, key_blocks=min_blocks - 1, sms=132) == 1
    assert tri.split_heuristic(programs=per_sm * 132, key_blocks=2048, sms=132) == 1
    assert tri.split_heuristic(programs=1, key_blocks=2048, sms=0) == 1


@pytest.mark.gpu
def test_gpu_paged_decode_splits(compiled):
    """A decoding step over a 4000-token cache: the heuristic splits it on a GPU, and the split
    result matches one split and the oracle."""
    from attnbench.properties.harness import run_paged_oracle

    spec = PagedSpec(cache_seqlens=(4000, 1, 0), Sq=1, block_size=16, Hq=8, Hkv=2, D=128, dtype="float16",
                     device="cuda")
    x = spec.make_inputs()
    args = (x.q, x.k_cache, x.v_cache, x.block_table, x.cache_seqlens, spec.config())
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert tri.split_heuristic(spec.B * spec.Hkv, 4000 // 64, sms) > 1  # one row block per kv head
    want = run_paged_oracle(spec, x)
    ref_out, ref_lse = registry().get("dense/naive").paged(*args)
    for out, lse in (tri.paged(*args), tri.paged(*args, num_splits=1)):
        _close("out", out, ref_out, want.out, spec.dtype, K["out"])
        _close("lse", lse, ref_lse.float(), want.lse, spec.dtype, K["lse"])


@pytest.mark.gpu
def test_gpu_paged_decode_captures_in_a_cuda_graph(compiled):
    """A decoding step captured in a CUDA graph (check_paged reads no lengths there; the split
    heuristic takes the table's room for the longest cache) replays to the eager result, and
    follows new lengths and queries written into the captured tensors."""
    spec = PagedSpec(cache_seqlens=(4000, 1, 0), Sq=1, block_size=16, Hq=8, Hkv=2, D=128, dtype="float16",
                     device="cuda")
    x = spec.make_inputs()
    args = (x.q, x.k_cache, x.v_cache, x.block_table, x.cache_seqlens, spec.config())
    eager = [t.clone() for t in tri.paged(*args)]  # also compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = tri.paged(*args)
    graph.replay()
    for name, got, want in zip(("out", "lse"), captured, eager):
        _close(name, got, want, want.double(), spec.dtype, K[name])
    x.cache_seqlens.copy_(torch.tensor([2000, 1, 0], dtype=torch.int32))  # within each sequence's blocks
    x.q.copy_(torch.randn_like(x.q))
    graph.replay()
    for name, got, want in zip(("out", "lse"), captured, tri.paged(*args)):
        _close(name, got, want, want.double(), spec.dtype, K[name])


# -- fp8 (the forward kernel's IS_FP8 path; properties/test_fp8.py runs it in the interpreter) --
FP8_GPU_SPECS = [
    Spec(B=2, Hq=8, Hkv=2, Sq=1000, Sk=1000, D=128, causal=True),
    Spec(B=1, Hq=4, Sq=1, Sk=4097, D=64),  # decoding over a long cache
    Spec(B=2, Hq=4, Sq=300, Sk=700, D=256, window=(128, 0), key_lengths=(700, 333)),
    Spec(Hq=2, Sq=257, D=64, Dv=32, magnitude=8.0, scale=0.5),
]


def _fp8_verdicts(spec: Spec) -> dict:
    from attnbench.properties.harness import verdicts

    impl = registry().get("dense/triton")
    assert impl.covers(spec), impl.why_not(spec)
    return verdicts(impl, spec)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", FP8_GPU_SPECS, ids=lambda s: s.short())
def test_gpu_fp8_matches_oracle(compiled, spec):
    """The compiled IS_FP8 path (Hopper's tl.dot on fp8e4nv operands) under the fp8 rule."""
    spec = spec.replace(device="cuda", dtype="bfloat16", fp8=True)
    for v in _fp8_verdicts(spec).values():
        assert v.ok, v.message()
