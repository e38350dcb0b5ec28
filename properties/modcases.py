"""Module-level cases for the seed-module properties: constructor arguments, inputs and how to
run a module (or its float64 oracle) on them, one small table per variant.

A `ModuleCase` is plain data (its repr pastes back into Python). `module_cases(impl, device)`
draws cases the implementation declares, small: dims 8..32, sequences up to 12 tokens on the
CPU. Modules are built with every parameter moved off its initial value (unit norm gains,
zero biases and identical heads would hide mix-ups) and put in eval mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from attnbench.oracles.modules import MODULE_ORACLES
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


@st.composite
def module_cases(draw, impl: Impl, device: str = "cpu", *, use: tuple[str, ...] = (), **fixed) -> ModuleCase:
    """Cases `impl` (a module variant) declares; `use` forces features ("causal",
    "key_padding", "cross", "bias"); `fixed` holds ModuleCase fields."""
    f = impl.features
    has = f.__contains__
    maxn = MAX_TOKENS[device.split(":")[0]]
    B = draw(st.integers(1, 2), label="B")
    N = draw(st.integers(1, maxn), label="N")
    kw: dict = {}
    M = None
    bias = None
    causal = True
    want = set(use)

    def flag(name: str) -> bool:
        return has(name) and (name in want or draw(st.booleans(), label=name))

    v = impl.variant
    if v == "FlashAttentionTwo":
        kw.update(dim=draw(st.sampled_from((16, 8, 32))), heads=draw(st.integers(1, 3)),
                  dim_head=draw(st.sampled_from((8, 16))), causal=flag("causal"),
                  q_bucket_size=draw(st.integers(1, 8)), k_bucket_size=draw(st.integers(1, 8)))
        if flag("cross"):
            M = draw(st.integers(1, maxn), label="M")
    elif v == "MultiQueryAttention":
        heads = draw(st.sampled_from((2, 1, 4)), label="heads")
        kv_heads = draw(st.sampled_from([d for d in (1, 2, 4) if heads % d == 0])) if has("gqa") else heads
        kw.update(dim=heads * draw(st.sampled_from((8, 4))), heads=heads, kv_heads=kv_heads,
                  qk_ln=draw(st.booleans()), clip_qkv=draw(st.sampled_from((None, 1.0))),
                  softmax_scale=draw(st.sampled_from((None, 0.3, 0.0))),
                  norm_type=draw(st.sampled_from(("low_precision_layernorm", "rmsnorm"))))
        causal = flag("causal")
        if has("bias") and draw(st.booleans(), label="bias?") or "bias" in want:
            bias = draw(st.sampled_from(("alibi", "random")), label="bias")
    elif v == "LocalMHA":
        exact = [e for e, feat in ((True, "sliding_window"), (False, "blocked_window")) if has(feat)]
        kw.update(dim=draw(st.sampled_from((16, 8))), window_size=draw(st.integers(1, 5)),
                  dim_head=draw(st.sampled_from((8, 16))), heads=draw(st.integers(1, 2)), causal=flag("causal"),
                  exact_windowsize=draw(st.sampled_from(exact)), prenorm=draw(st.booleans()),
                  qk_rmsnorm=draw(st.booleans()), use_xpos=draw(st.booleans()))
        if flag("bias"):
            bias = "random"
    elif v in ("MixtureOfAttention", "MixtureOfAutoregressiveAttention"):
        kw.update(dim=draw(st.sampled_from((16, 8))), num_routed_queries=draw(st.integers(1, 8)),
                  num_routed_key_values=draw(st.integers(1, 8)), num_experts=draw(st.integers(1, 3)),
                  dim_head=8, heads=draw(st.integers(1, 2)), prenorm=draw(st.booleans()),
                  average_routed=draw(st.booleans()))
        if v == "MixtureOfAttention":
            kw["router"] = draw(st.sampled_from(("straight_through", "coor_descent")))
            if flag("cross"):
                M = draw(st.integers(1, maxn), label="M")
                kw["dim_context"] = draw(st.sampled_from((12, 16)))
            elif draw(st.booleans(), label="local_attn"):
                kw.update(local_attn=True, local_attn_window_size=draw(st.integers(1, 4)))
        else:
            kw["local_attn_window_size"] = draw(st.integers(1, 4))
            kw["routed_window_size"] = draw(st.sampled_from((None, 2, 3)))
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


def reference_module(impl: Impl, case: ModuleCase, module: torch.nn.Module) -> torch.nn.Module:
    """The variant's reference implementation with the same weights."""
    return build(registry().reference(impl.variant), case, like=module)


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


def route(module: torch.nn.Module, case: ModuleCase, args: dict):
    """A routed mixture's routing for these inputs (None for the other modules)."""
    if case.variant == "MixtureOfAttention":
        return module.route(args["x"], args.get("context"), **_mask_args(case, args))
    if case.variant == "MixtureOfAutoregressiveAttention":
        return module.route(args["x"], **_mask_args(case, args))
    return None


def oracle(module: torch.nn.Module, case: ModuleCase, args: dict, routing=None) -> torch.Tensor:
    """The float64 module oracle on the same module and inputs."""
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
