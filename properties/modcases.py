"""Module-level cases for the seed-module properties: constructor arguments, inputs and how to
run a module (or its float64 oracle) on them, one small table per variant.

A `ModuleCase` is plain data (its repr pastes back into Python). `module_cases(impl, device)`
draws cases the implementation declares (features, dtypes, and the constructor values its
`options` allow), small: dims 8..32, sequences up to 12 tokens on the CPU. Modules are built
with every parameter moved off its initial value (unit norm gains, zero biases and identical
heads would hide mix-ups) and put in eval mode.

Every module is called through the seed's forward signature (the adapter's job). Only the
white-box helpers (`mapped_weights`, `reference_module`, `oracle`) read parameters, and they
read them through the implementation's declared `weights` map onto the reference layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from attnbench.oracles.modules import MODULE_ORACLES
from attnbench.properties import tolerance
from attnbench.properties.harness import module_call
from attnbench.registry import Impl, registry
from attnbench.spec import DTYPES

DTYPE_ORDER = ("float32", "float64", "float16", "bfloat16")
MAX_TOKENS = {"cpu": 12, "cuda": 48}


@dataclass(frozen=True)
class ModuleCase:
    variant: str
    kwargs: tuple[tuple[str, object], ...]  # constructor arguments, sorted
    B: int = 1
    N: int = 6  # tokens of x
    M: int | None = None  # tokens of the context (FlashAttentionTwo / MixtureOfAttention cross)
    dtype: str = "float32"
    device: str = "cpu"
    lengths: tuple[int, ...] | None = None  # keep-mask over keys: token t kept iff t < length
    bias: str | None = None  # "alibi" | "random" (MultiQueryAttention, LocalMHA)
    causal: bool = True  # MultiQueryAttention's forward argument
    seed: int = 0

    @property
    def ctor(self) -> dict:
        return dict(self.kwargs)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def keys(self) -> int:
        """How many tokens the keys / values come from."""
        return self.N if self.M is None else self.M

    def replace(self, **changes) -> ModuleCase:
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        parts = [f"variant={self.variant!r}", f"kwargs={self.kwargs!r}"]
        for f in dataclasses.fields(self)[2:]:
            value = getattr(self, f.name)
            if value != f.default:
                parts.append(f"{f.name}={value!r}")
        return f"ModuleCase({', '.join(parts)})"


# -- drawing -------------------------------------------------------------------------------
def _dtype(draw, impl: Impl) -> str:
    dtypes = [d for d in DTYPE_ORDER if d in impl.dtypes]
    return draw(st.sampled_from(dtypes), label="dtype")


class _Options:
    """Draws a constructor option from the seed's candidate values that the impl's `options` allow."""

    def __init__(self, draw, impl: Impl) -> None:
        self.draw, self.impl = draw, impl

    def __call__(self, name: str, candidates) -> object:
        allowed = self.impl.options.get(name)
        values = [c for c in candidates if allowed is None or c in allowed]
        if not values:
            pytest.skip(f"{self.impl.key} declares none of {name}={list(candidates)} (options: {allowed})")
        return self.draw(st.sampled_from(values), label=name)


@st.composite
def module_cases(draw, impl: Impl, device: str = "cpu", *, use: tuple[str, ...] = (), **fixed) -> ModuleCase:
    """Cases `impl` (a module variant) declares; `use` forces features ("causal",
    "key_padding", "cross", "bias"); `fixed` holds ModuleCase fields."""
    f = impl.features
    has = f.__contains__
    opt = _Options(draw, impl)
    maxn = MAX_TOKENS[device.split(":")[0]]
    B = draw(st.integers(1, 2), label="B")
    N = draw(st.integers(1, maxn), label="N")
    kw: dict = {}
    M = None
    bias = None
    causal = True
    want = set(use)

    def flag(name: str, option: str | None = None) -> bool:
        """A feature the impl declares, forced by `use` or drawn (and, as a constructor
        option, only to values the impl allows)."""
        if not has(name):
            return False
        if option is not None:
            allowed = impl.options.get(option, (True, False))
            if name in want and True in allowed:
                return True
            return bool(opt(option, [b for b in (False, True) if b in allowed]))
        return name in want or draw(st.booleans(), label=name)

    v = impl.variant
    if v == "FlashAttentionTwo":
        kw.update(dim=opt("dim", (16, 8, 32)), heads=opt("heads", (1, 2, 3)), dim_head=opt("dim_head", (8, 16)),
                  causal=flag("causal", "causal"), q_bucket_size=opt("q_bucket_size", range(1, 9)),
                  k_bucket_size=opt("k_bucket_size", range(1, 9)))
        if flag("cross"):
            M = draw(st.integers(1, maxn), label="M")
    elif v == "MultiQueryAttention":
        heads = opt("heads", (2, 1, 4))
        kv_heads = opt("kv_heads", [d for d in (1, 2, 4) if heads % d == 0] if has("gqa") else [heads])
        kw.update(dim=heads * draw(st.sampled_from((8, 4)), label="head_dim"), heads=heads, kv_heads=kv_heads,
                  qk_ln=opt("qk_ln", (False, True)), clip_qkv=opt("clip_qkv", (None, 1.0)),
                  softmax_scale=opt("softmax_scale", (None, 0.3, 0.0)),
                  norm_type=opt("norm_type", ("low_precision_layernorm", "rmsnorm")))
        causal = flag("causal")
        if has("bias") and draw(st.booleans(), label="bias?") or "bias" in want:
            bias = draw(st.sampled_from(("alibi", "random")), label="bias")
    elif v == "LocalMHA":
        exact = [e for e, feat in ((True, "sliding_window"), (False, "blocked_window")) if has(feat)]
        kw.update(dim=opt("dim", (16, 8)), window_size=opt("window_size", range(1, 6)),
                  dim_head=opt("dim_head", (8, 16)), heads=opt("heads", (1, 2)), causal=flag("causal", "causal"),
                  exact_windowsize=opt("exact_windowsize", exact), prenorm=opt("prenorm", (False, True)),
                  qk_rmsnorm=opt("qk_rmsnorm", (False, True)), use_xpos=opt("use_xpos", (False, True)))
        if flag("bias"):
            bias = "random"
    elif v in ("MixtureOfAttention", "MixtureOfAutoregressiveAttention"):
        kw.update(dim=opt("dim", (16, 8)), num_routed_queries=opt("num_routed_queries", range(1, 9)),
                  num_routed_key_values=opt("num_routed_key_values", range(1, 9)),
                  num_experts=opt("num_experts", (1, 2, 3)), dim_head=opt("dim_head", (8,)),
                  heads=opt("heads", (1, 2)), prenorm=opt("prenorm", (False, True)),
                  average_routed=opt("average_routed", (False, True)))
        if v == "MixtureOfAttention":
            kw["router"] = opt("router", ("straight_through", "coor_descent"))
            if flag("cross"):
                M = draw(st.integers(1, maxn), label="M")
                kw["dim_context"] = opt("dim_context", (12, 16))
            elif opt("local_attn", (False, True)):
                kw.update(local_attn=True, local_attn_window_size=opt("local_attn_window_size", range(1, 5)))
        else:
            kw["local_attn_window_size"] = opt("local_attn_window_size", range(1, 5))
            kw["routed_window_size"] = opt("routed_window_size", (None, 2, 3))
    else:
        raise ValueError(f"impl {impl.key}: {v!r} is not a module variant")

    keys = N if M is None else M
    lengths = None
    if flag("key_padding"):
        lengths = tuple(draw(st.integers(0, keys), label="length") for _ in range(B))
        if "key_padding" in want and min(lengths) == keys:
            lengths = (draw(st.integers(0, keys - 1), label="length[0]"),) + lengths[1:]
    case = ModuleCase(
        variant=v, kwargs=tuple(sorted(kw.items())), B=B, N=N, M=M, dtype=_dtype(draw, impl), device=device,
        lengths=lengths, bias=bias, causal=causal, seed=draw(st.integers(0, 2**16), label="seed"),
    )
    return case.replace(**fixed) if fixed else case


# -- building and running ------------------------------------------------------------------
def build(impl: Impl, case: ModuleCase, like: torch.nn.Module | None = None) -> torch.nn.Module:
    """impl's module for the case, parameters moved off their initial values (or copied from
    `like`, so two implementations share every weight), in eval mode on the case's device."""
    torch.manual_seed(case.seed)
    module = impl.fn(**case.ctor)
    if like is not None:  # extra buffers of a third-party layout (rotary tables) are not weights
        missing, _ = module.load_state_dict(like.state_dict(), strict=False)
        if missing:
            raise ValueError(f"{impl.key}: cannot take the weights of {type(like).__name__}: missing {missing}")
    else:
        g = torch.Generator().manual_seed(case.seed + 1)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return module.to(device=case.device, dtype=case.torch_dtype).eval()


def mapped_weights(impl: Impl, module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters under the reference layout's names, through impl.weights (the
    tensors stay connected to the module's own parameters, so gradients reach them)."""
    spec = impl.weights
    if spec is None:
        pytest.skip(f"unsupported: {impl.key} declares no `weights` map onto the {impl.variant} reference layout")
    if callable(spec):
        return dict(spec(module))
    own = dict(module.named_parameters())
    out = {}
    for name, source in spec.items():
        if callable(source):
            out[name] = source(module)
        elif source in own:
            out[name] = own[source]
        else:
            raise ValueError(f"{impl.key}: weights[{name!r}] names {source!r}, which {type(module).__name__} does not have")
    return out


def _reference_shell(case: ModuleCase) -> nn.Module:
    """The variant's reference module for the case's constructor arguments: the layout and the
    settings the oracle reads; its parameters are replaced by mapped weights before any use."""
    torch.manual_seed(case.seed)
    return registry().reference(case.variant).fn(**case.ctor).to(case.device).eval()


def _check_layout(impl: Impl, shell: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    want = {n: p.shape for n, p in shell.named_parameters()}
    missing = sorted(set(want) - set(weights))
    extra = sorted(set(weights) - set(want))
    if missing or extra:
        raise ValueError(f"{impl.key}: the weights map does not match the {impl.variant} reference layout "
                         f"(missing {missing}, unknown {extra})")
    bad = [f"{n}: {tuple(weights[n].shape)} != {tuple(want[n])}" for n in want if weights[n].shape != want[n]]
    if bad:
        raise ValueError(f"{impl.key}: the weights map gives wrong shapes ({'; '.join(bad)})")


class _OnShell(nn.Module):
    """Runs fn(shell, case, args, routing) with the shell's parameters swapped by functional_call."""

    def __init__(self, shell: nn.Module, case: ModuleCase, fn: Callable) -> None:
        super().__init__()
        self.shell, self.case, self.fn = shell, case, fn

    def forward(self, args: dict, routing) -> torch.Tensor:
        return self.fn(self.shell, self.case, args, routing)


def _on_reference_layout(impl: Impl, module: nn.Module, case: ModuleCase, fn: Callable, args: dict, routing,
                         dtype: torch.dtype) -> torch.Tensor:
    weights = mapped_weights(impl, module)
    shell = _reference_shell(case).to(dtype=dtype)
    _check_layout(impl, shell, weights)
    call = _OnShell(shell, case, fn)
    return functional_call(call, {f"shell.{n}": w for n, w in weights.items()}, (args, routing))


def reference(impl: Impl, module: nn.Module, case: ModuleCase, args: dict, routing=None) -> torch.Tensor:
    """The variant's reference implementation on the module's (mapped) weights, in the case's
    dtype, differentiable in the module's parameters (mixtures: given `routing` when passed)."""
    return _on_reference_layout(impl, module, case, forward, args, routing, case.torch_dtype)


def oracle(impl: Impl, module: nn.Module, case: ModuleCase, args: dict, routing=None) -> torch.Tensor:
    """The float64 module oracle on the module's (mapped) weights, differentiable in them."""
    return _on_reference_layout(impl, module, case, seed_oracle, args, routing, torch.float64)


def noise(case: ModuleCase, args: dict, out: torch.Tensor) -> float:
    """The black-box tier's rounding allowance: the reference implementation's own error on
    this configuration, dtype and input (fresh weights, the oracle on them), relative to its
    magnitude, times the magnitude of `out`."""
    impl = registry().reference(case.variant)
    ref = build(impl, case)
    with torch.no_grad():
        routing = route(impl, ref, case, args)
        got = forward(ref, case, args)
        want = seed_oracle(ref, case, args, routing)
    error, why = tolerance.max_error(got, want)
    if why:
        raise AssertionError(f"out: the reference implementation itself fails here ({why})")
    return error / tolerance.magnitude(want) * tolerance.magnitude(out.detach().double())


def inputs(case: ModuleCase) -> dict:
    """The forward's tensors for the case: x, and context / mask / bias where it has them."""
    g = torch.Generator().manual_seed(case.seed + 2)
    dim = case.ctor["dim"]

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(device=case.device, dtype=case.torch_dtype)

    args: dict = {"x": rand(case.B, case.N, dim)}
    if case.M is not None:
        args["context"] = rand(case.B, case.M, case.ctor.get("dim_context", dim))
    if case.lengths is not None:
        keep = torch.arange(case.keys)[None, :] < torch.tensor(case.lengths)[:, None]
        args["mask"] = keep.to(case.device)
    if case.bias is not None:
        heads = case.ctor["heads"]
        if case.bias == "alibi":
            from attnbench.modules.multi_query import build_alibi_bias

            args["bias"] = build_alibi_bias(heads, case.N, case.keys, dtype=torch.float64)
        else:
            args["bias"] = torch.randn(case.B, heads, case.N, case.keys, generator=g, dtype=torch.float64)
        args["bias"] = args["bias"].to(device=case.device, dtype=case.torch_dtype)
    return args


def _mask_args(case: ModuleCase, args: dict) -> dict:
    """The module's name for the key mask (context_mask when keys come from the context)."""
    if "mask" not in args:
        return {}
    if case.variant == "MixtureOfAttention" and case.M is not None:
        return {"context_mask": args["mask"]}
    return {"mask": args["mask"]}


def forward(module: torch.nn.Module, case: ModuleCase, args: dict, routing=None) -> torch.Tensor:
    """The module's output tensor (routed mixtures: given `routing` when one is passed), its
    call contract checked (harness.module_call: output like x, inputs unchanged)."""
    return module_call(f"{type(module).__name__} module", lambda: _forward(module, case, args, routing), args)


def _forward(module: torch.nn.Module, case: ModuleCase, args: dict, routing=None) -> torch.Tensor:
    x = args["x"]
    v = case.variant
    if v == "FlashAttentionTwo":
        return module(x, context=args.get("context"), **_mask_args(case, args))
    if v == "MultiQueryAttention":
        return module(x, bias=args.get("bias"), causal=case.causal, **_mask_args(case, args))[0]
    if v == "LocalMHA":
        return module(x, attn_bias=args.get("bias"), **_mask_args(case, args))
    if v == "MixtureOfAttention":
        kw = _mask_args(case, args)
        if routing is None:
            return module(x, args.get("context"), **kw)
        return module.attend(x, args.get("context"), routing, **kw)
    if v == "MixtureOfAutoregressiveAttention":
        kw = _mask_args(case, args)
        return module(x, **kw) if routing is None else module.attend(x, routing, **kw)
    raise ValueError(f"case.variant: {v!r} is not a module variant")


def route(impl: Impl, module: nn.Module, case: ModuleCase, args: dict):
    """A routed mixture's decisions through the impl's declared `route` hook (None when it
    declares none, or for the other variants)."""
    if impl.route is None or case.variant not in ("MixtureOfAttention", "MixtureOfAutoregressiveAttention"):
        return None
    return impl.route(module, args["x"], args.get("context"), **_mask_args(case, args))


def seed_oracle(module: nn.Module, case: ModuleCase, args: dict, routing=None) -> torch.Tensor:
    """The float64 module oracle on a module in the reference layout."""
    fn: Callable = MODULE_ORACLES[case.variant]
    x = args["x"]
    v = case.variant
    if v == "FlashAttentionTwo":
        return fn(module, x, context=args.get("context"), **_mask_args(case, args))
    if v == "MultiQueryAttention":
        return fn(module, x, bias=args.get("bias"), causal=case.causal, **_mask_args(case, args))[0]
    if v == "LocalMHA":
        return fn(module, x, attn_bias=args.get("bias"), **_mask_args(case, args))
    if v == "MixtureOfAttention":
        return fn(module, x, args.get("context"), routing=routing, **_mask_args(case, args))
    return fn(module, x, routing=routing, **_mask_args(case, args))
