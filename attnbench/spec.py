"""The problem spec: everything the contract (oracles/CONTRACT.md) lets an attention call vary.

A Spec is plain data. It validates itself (an impossible spec raises ValueError naming the
field), says which features an implementation needs to answer it, and makes its own seeded
inputs. Inputs are drawn in float64 on the CPU and then cast, so the same spec gives the same
values (up to rounding) in every dtype and on every device.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Self

import torch

DTYPES = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
ALIGNS = ("bottom_right", "top_left")
# How q, k, v sit in memory (Spec.layout); the values are the same in every layout except
# "expanded", where K and V share one stored head. The first is the default and shrink target.
LAYOUTS = (
    "contiguous",  # (B, H, S, D) contiguous
    "bshd",  # (B, S, H, D) storage viewed as (B, H, S, D): a projection's output, transposed
    "packed",  # slices of one packed projection: (B, S, Hq*D + Hkv*D + Hkv*Dv), or q + packed kv when Sq != Sk
    "offset",  # windows of a larger buffer (a KV cache): non-zero storage offset, padded S stride
    "expanded",  # K and V zero-stride across kv heads (across the batch when Hkv = 1): expand(), not repeat
)
# How the gradient of the output sits in memory (Spec.grad_layout).
GRAD_LAYOUTS = (
    "contiguous",
    "bshd",  # a (B, S, H, Dv) tensor transposed: non-contiguous
    "broadcast",  # one value expanded to the whole shape, every stride 0 (what out.sum().backward() passes)
)
BIAS_KINDS = (None, "full", "per_head", "per_key", "alibi")

# Feature names an implementation may declare. A spec needs some of them (Spec.needs);
# a property asks for a few more (backward, lse, ...).
FEATURES = frozenset(
    {
        "causal",  # causal masking
        "sliding_window",  # window=(left, right)
        "blocked_window",  # block=(window_size, look_backward, look_forward)
        "gqa",  # Hkv < Hq (grouped-query and multi-query)
        "cross",  # Sq != Sk
        "key_padding",  # key_padding_mask
        "bias",  # additive bias
        "bias_grad",  # gradient with respect to the bias
        "dropout",  # dropout_p > 0 in training
        "top_left",  # align="top_left"
        "dv",  # value head dim Dv != D
        "backward",  # differentiable in q, k, v
        "lse",  # returns the logsumexp
        "deterministic",  # bit-identical results run to run
        "varlen",  # packed variable-length batches (Impl.varlen, attnbench.packing)
        "document",  # document masking: the dense call's document_ids=(doc_q, doc_k) (Spec.documents)
        "paged_kv",  # a paged KV cache with a block table (Impl.paged, attnbench.packing)
        "softcap",  # Config.softcap: logits soft-capped, cap * tanh(logit / cap)
        "alibi",  # alibi_slopes=: ALiBi bias computed in the kernel, never materialized
        "sinks",  # sinks=: one learnable logit per head in the softmax denominator only
        "fp8",  # float8_e4m3fn q, k, v with float32 descales (Spec.fp8); bfloat16 out, forward only
    }
)


@dataclass(frozen=True)
class Block:
    """LocalMHA's blocked window: bucket(t) = t // window_size; a query in bucket b sees
    buckets b - look_backward ... b + look_forward."""

    window_size: int
    look_backward: int = 1
    look_forward: int = 0


@dataclass(frozen=True)
class Config:
    """The non-tensor part of one attention call, as implementations receive it."""

    scale: float
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    block: Block | None = None
    align: str = "bottom_right"
    dropout_p: float = 0.0
    dropout_seed: int = 0
    softcap: float | None = None  # logit soft cap: cap * tanh(scaled logit / cap), before bias and masks

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> None:
            raise ValueError(f"Config.{name}: {why}")

        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale):
            bad("scale", f"must be a finite number, got {self.scale!r}")
        if not isinstance(self.causal, (bool, int)) or self.causal not in (0, 1):
            bad("causal", f"must be a bool, got {self.causal!r}")
        if self.window is not None:
            if isinstance(self.window, list):
                object.__setattr__(self, "window", tuple(self.window))
            why = window_problem(self.window)
            if why:
                bad("window", why)
        if self.block is not None:
            why = block_problem(self.block)
            if why:
                bad("block", why)
        if self.align not in ALIGNS:
            bad("align", f"unknown alignment {self.align!r}; one of {ALIGNS}")
        if isinstance(self.dropout_p, bool) or not isinstance(self.dropout_p, (int, float)) or not 0 <= self.dropout_p < 1:
            bad("dropout_p", f"must be in [0, 1), got {self.dropout_p!r}")
        if isinstance(self.dropout_seed, bool) or not isinstance(self.dropout_seed, int):
            bad("dropout_seed", f"must be an int, got {self.dropout_seed!r}")
        why = softcap_problem(self.softcap)
        if why:
            bad("softcap", why)


def softcap_problem(softcap: object) -> str | None:
    """What is wrong with a logit soft cap (None, or a finite number > 0); None if fine."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not (math.isfinite(softcap) and softcap > 0):
        return f"must be None or a finite number > 0, got {softcap!r}"
    return None


def window_problem(window: object) -> str | None:
    """What is wrong with a sliding window (left, right), each None or an int >= 0; None if fine."""
    if not isinstance(window, tuple) or len(window) != 2:
        return f"must be (left, right), got {window!r}"
    for side, w in zip(("left", "right"), window):
        if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w < 0):
            return f"{side} edge must be None or an int >= 0, got {w!r}"
    return None


def block_problem(block: object) -> str | None:
    """What is wrong with a blocked window; None if fine."""
    if not isinstance(block, Block):
        return f"must be a Block(window_size, look_backward, look_forward), got {block!r}"
    if isinstance(block.window_size, bool) or not isinstance(block.window_size, int) or block.window_size < 1:
        return f"window_size must be an int >= 1, got {block.window_size!r}"
    for name in ("look_backward", "look_forward"):
        value = getattr(block, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be an int >= 0, got {value!r}"
    return None


def positive_problem(value: object) -> str | None:
    """What is wrong with a size (an int >= 1, not a bool); None if fine."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def _dtype_problem(dtype: object) -> str | None:
    return None if dtype in DTYPES else f"unknown dtype {dtype!r}; one of {sorted(DTYPES)}"


def _device_problem(device: str) -> str | None:
    return None if device.split(":")[0] in ("cpu", "cuda") else f"unknown device {device!r}; 'cpu' or 'cuda[:n]'"


def _scale_problem(scale: float | None) -> str | None:
    return None if scale is None or math.isfinite(scale) else f"must be finite, got {scale!r}"


def _magnitude_problem(magnitude: float) -> str | None:
    return None if magnitude > 0 and math.isfinite(magnitude) else f"must be positive and finite, got {magnitude!r}"


# The checks of the fields every spec kind has (SpecBase.SHARED): field -> what is wrong with its value
FIELD_CHECKS = {
    "dtype": _dtype_problem,
    "device": _device_problem,
    "scale": _scale_problem,
    "window": lambda window: None if window is None else window_problem(window),
    "magnitude": _magnitude_problem,
    "softcap": softcap_problem,
}


class SpecBase:
    """What every spec kind (Spec; VarlenSpec and PagedSpec in attnbench.packing) does alike with
    the fields they share (SHARED): defaults, checks, printing, replace, the call's Config and
    the features it needs. A subclass is a frozen dataclass with those fields; it lists its own
    checks in _problems, its own features in _own_needs and its own Config fields in _own_config."""

    # the fields every spec kind has, with one meaning
    SHARED = ("Hq", "Hkv", "D", "Dv", "dtype", "device", "scale", "causal", "window", "magnitude", "seed", "softcap")
    FOLLOWS = {"Hkv": "Hq", "Dv": "D"}  # field -> the field whose value it takes when None
    UNPRINTED: tuple[str, ...] = ()  # fields short() leaves out
    ALWAYS_PRINTED: tuple[str, ...] = ()  # fields short() names even at their default

    def _fill_defaults(self) -> None:
        """The None fields of FOLLOWS take their values; a window becomes a tuple, (None, None) None."""
        for name, source in self.FOLLOWS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(self, source))
        if self.window is not None:
            object.__setattr__(self, "window", tuple(self.window))
            if self.window == (None, None):
                object.__setattr__(self, "window", None)

    def validate(self) -> None:
        """Raise ValueError "Kind.field: why" for the first bad field."""
        for name, why in self._problems():
            raise ValueError(f"{type(self).__name__}.{name}: {why}")

    def _problems(self) -> Iterator[tuple[str, str]]:
        """(field, why) for each bad field, in order; a check may rely on the fields before it."""
        raise NotImplementedError

    def _size_problems(self, *names: str) -> Iterator[tuple[str, str]]:
        """The named sizes must be positive integers; with Hkv among them, Hq a multiple of Hkv."""
        bad = False
        for name in names:
            why = positive_problem(getattr(self, name))
            if why:
                bad = True
                yield name, why
        if not bad and "Hkv" in names and self.Hq % self.Hkv:
            yield "Hkv", f"Hq={self.Hq} is not divisible by Hkv={self.Hkv}"

    def _field_problems(self, *names: str) -> Iterator[tuple[str, str]]:
        """The FIELD_CHECKS of the named fields, in order."""
        for name in names:
            why = FIELD_CHECKS[name](getattr(self, name))
            if why:
                yield name, why

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def softmax_scale(self) -> float:
        return 1.0 / math.sqrt(self.D) if self.scale is None else float(self.scale)

    def config(self) -> Config:
        return Config(scale=self.softmax_scale, causal=self.causal, window=self.window, softcap=self.softcap,
                      **self._own_config())

    def _own_config(self) -> dict[str, object]:
        """The Config fields of this kind's own fields."""
        return {}

    def needs(self) -> frozenset[str]:
        """Features an implementation must declare to answer this spec."""
        flags = {"causal": self.causal, "sliding_window": self.window is not None, "gqa": self.Hkv != self.Hq,
                 "dv": self.Dv != self.D, "softcap": self.softcap is not None, **self._own_needs()}
        return frozenset(name for name, needed in flags.items() if needed)

    def _own_needs(self) -> dict[str, bool]:
        """Feature -> whether this spec needs it, for the features of this kind's own fields."""
        raise NotImplementedError

    def replace(self, **changes) -> Self:
        return dataclasses.replace(self, **changes)

    def short(self) -> str:
        """The fields that differ from their defaults, as Python: paste into the class."""
        parts = []
        for f in dataclasses.fields(self):
            if f.name in self.UNPRINTED:
                continue
            value = getattr(self, f.name)
            default = getattr(self, self.FOLLOWS[f.name]) if f.name in self.FOLLOWS else f.default
            if value != default or f.name in self.ALWAYS_PRINTED:
                parts.append(f"{f.name}={value!r}")
        return f"{type(self).__name__}({', '.join(parts)})"


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    key_padding_mask: torch.Tensor | None  # (B, Sk) bool, True = keep
    bias: torch.Tensor | None  # broadcastable to (B, Hq, Sq, Sk)
    grad_out: torch.Tensor  # (B, Hq, Sq, Dv), for gradient checks
    document_ids: tuple[torch.Tensor, torch.Tensor] | None = None  # (doc_q (B, Sq), doc_k (B, Sk)) int64
    alibi_slopes: torch.Tensor | None = None  # (Hq,) or (B, Hq) float32, positive: the kernel's ALiBi
    sinks: torch.Tensor | None = None  # (Hq,) one logit per head in the softmax denominator
    # fp8 (Spec.fp8): float32 descales of the float8_e4m3fn q, k, v, shape () or (B, Hkv)
    q_descale: torch.Tensor | None = None
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None

    def score_kwargs(self) -> dict[str, torch.Tensor]:
        """The keyword arguments of a kernel call beyond the plain signature (the score features'
        alibi_slopes and sinks, fp8's descales): only those the spec uses, so an implementation
        that declares none of them is called with its plain signature."""
        extra = {"alibi_slopes": self.alibi_slopes, "sinks": self.sinks, **self.descales()}
        return {name: t for name, t in extra.items() if t is not None}

    def descales(self) -> dict[str, torch.Tensor]:
        """q_descale, k_descale, v_descale where set (fp8 inputs), else empty."""
        named = {"q_descale": self.q_descale, "k_descale": self.k_descale, "v_descale": self.v_descale}
        return {name: t for name, t in named.items() if t is not None}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


@dataclass(frozen=True)
class Spec(SpecBase):
    B: int = 1
    Hq: int = 1
    Hkv: int | None = None  # default: Hq
    Sq: int = 16
    Sk: int | None = None  # default: Sq
    D: int = 16
    Dv: int | None = None  # default: D
    dtype: str = "float32"
    device: str = "cpu"
    scale: float | None = None  # default 1/sqrt(D); 0 is a real value
    causal: bool = False
    window: tuple[int | None, int | None] | None = None
    block: Block | None = None
    key_lengths: tuple[int, ...] | None = None  # per batch: keys >= length are padding
    key_drop: float = 0.0  # fraction of the remaining keys also masked, at random
    bias: str | None = None
    bias_neginf: float = 0.0  # fraction of bias entries set to -inf
    align: str = "bottom_right"
    dropout_p: float = 0.0
    magnitude: float = 1.0  # inputs are magnitude * N(0, 1)
    seed: int = 0
    layout: str = "contiguous"  # how q, k, v sit in memory (LAYOUTS)
    grad_layout: str = "contiguous"  # how grad_out sits in memory (GRAD_LAYOUTS)
    # per batch element, the lengths of consecutive documents along the keys (summing to Sk);
    # a query belongs to the document of its aligned position p(i) (see document_ids)
    documents: tuple[tuple[int, ...], ...] | None = None
    # document d's id is d * doc_stride: 65536 puts ids past 16 bits, where a kernel that narrows
    # them to int8 / int16 merges documents (the contract takes any ids)
    doc_stride: int = 1
    softcap: float | None = None  # logit soft cap (Config.softcap)
    alibi: bool = False  # the kernel's ALiBi: alibi_slopes drawn per spec (Spec.alibi_values)
    sinks: bool = False  # attention sinks: one logit per head drawn per spec (Spec.sink_values)
    # the sinks passed in float32 rather than q's dtype (CONTRACT.md allows both): a kernel that
    # rounds them to q's dtype is off by up to half a bfloat16 step of the sink in lse. Without
    # sinks it is inert and reads False.
    sinks_float32: bool = False
    # fp8 attention: q, k, v quantized to float8_e4m3fn with per-tensor float32 descales
    # (make_inputs); dtype is then the output's, bfloat16. Forward only.
    fp8: bool = False
    extra: tuple = field(default=(), compare=False)

    FOLLOWS = {"Hkv": "Hq", "Sk": "Sq", "Dv": "D"}
    UNPRINTED = ("extra",)
    ALWAYS_PRINTED = ("layout",)  # a counterexample says how its inputs sat in memory

    def __post_init__(self) -> None:
        self._fill_defaults()
        if isinstance(self.block, tuple):
            object.__setattr__(self, "block", Block(*self.block))
        if self.key_lengths is not None:
            object.__setattr__(self, "key_lengths", tuple(int(n) for n in self.key_lengths))
        if self.documents is not None:
            object.__setattr__(self, "documents", tuple(tuple(int(n) for n in doc) for doc in self.documents))
        if self.sinks_float32 is True and self.sinks is False:
            object.__setattr__(self, "sinks_float32", False)
        self.validate()

    # -- validation ------------------------------------------------------------------
    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from self._size_problems("B", "Hq", "Hkv", "Sq", "Sk", "D", "Dv")
        yield from self._field_problems("dtype", "device", "scale", "window")
        why = None if self.block is None else block_problem(self.block)
        if why:
            yield "block", why
        if self.key_lengths is not None:
            if len(self.key_lengths) != self.B:
                yield "key_lengths", f"needs one length per batch element ({self.B}), got {len(self.key_lengths)}"
            for n in self.key_lengths:
                if not 0 <= n <= self.Sk:
                    yield "key_lengths", f"each length must be in [0, Sk={self.Sk}], got {n}"
        if not 0.0 <= self.key_drop < 1.0:
            yield "key_drop", f"must be in [0, 1), got {self.key_drop!r}"
        if self.bias not in BIAS_KINDS:
            yield "bias", f"unknown bias kind {self.bias!r}; one of {BIAS_KINDS}"
        if not 0.0 <= self.bias_neginf < 1.0:
            yield "bias_neginf", f"must be in [0, 1), got {self.bias_neginf!r}"
        if self.bias_neginf and self.bias is None:
            yield "bias_neginf", "needs a bias"
        if self.align not in ALIGNS:
            yield "align", f"unknown alignment {self.align!r}; one of {ALIGNS}"
        if not 0.0 <= self.dropout_p < 1.0:
            yield "dropout_p", f"must be in [0, 1), got {self.dropout_p!r}"
        yield from self._field_problems("magnitude")
        if self.layout not in LAYOUTS:
            yield "layout", f"unknown layout {self.layout!r}; one of {LAYOUTS}"
        if self.grad_layout not in GRAD_LAYOUTS:
            yield "grad_layout", f"unknown grad layout {self.grad_layout!r}; one of {GRAD_LAYOUTS}"
        if self.documents is not None:
            if len(self.documents) != self.B:
                yield "documents", (f"needs one tuple of document lengths per batch element ({self.B}), "
                                    f"got {len(self.documents)}")
            for doc in self.documents:
                if min(doc, default=0) < 1 or sum(doc) != self.Sk:
                    yield "documents", f"document lengths must be >= 1 and sum to Sk={self.Sk}, got {doc!r}"
        if not isinstance(self.doc_stride, int) or isinstance(self.doc_stride, bool) or not 1 <= self.doc_stride <= 2**40:
            yield "doc_stride", f"must be an integer in [1, 2**40], got {self.doc_stride!r}"
        yield from self._field_problems("softcap")
        for name in ("alibi", "sinks", "sinks_float32", "fp8"):
            if not isinstance(getattr(self, name), bool):
                yield name, f"must be a bool, got {getattr(self, name)!r}"
        if self.fp8 and self.dtype != "bfloat16":
            yield "dtype", f"an fp8 spec's output dtype is 'bfloat16' (what FA3 / FA4 return), got {self.dtype!r}"
        if self.fp8 and self.bias is not None:
            yield "bias", "fp8 attention takes no bias (FA3 / FA4 have none)"

    # -- derived -------------------------------------------------------------------
    @property
    def has_padding(self) -> bool:
        return self.key_lengths is not None or self.key_drop > 0

    def _own_config(self) -> dict[str, object]:
        return {"block": self.block, "align": self.align, "dropout_p": self.dropout_p, "dropout_seed": self.seed}

    def _own_needs(self) -> dict[str, bool]:
        return {
            "blocked_window": self.block is not None,
            "cross": self.Sq != self.Sk,
            "key_padding": self.has_padding,
            "bias": self.bias is not None,
            "dropout": self.dropout_p > 0,
            "top_left": self.align != "bottom_right",
            "document": self.documents is not None,
            "alibi": self.alibi,
            "sinks": self.sinks,
            "fp8": self.fp8,
        }

    # -- inputs --------------------------------------------------------------------
    def make_inputs(self, requires_grad: bool = False) -> Inputs:
        """Seeded inputs in this spec's dtype, device and layouts (see `laid_out`)."""
        g = torch.Generator().manual_seed(self.seed)
        q, k, v, grad_out = (torch.randn(*shape, dtype=torch.float64, generator=g) for shape in self._normal_shapes())
        q, k = self.magnitude * q, self.magnitude * k
        kpm = self._key_padding_mask(g)
        bias = self._bias(g)
        descales = {}
        if self.fp8:
            if requires_grad:
                raise ValueError("Spec.fp8: fp8 attention is forward only (no gradients)")
            (q, k, v), descales = quantize_fp8(q, k, v)
            descales = {name: t.to(self.device) for name, t in descales.items()}
        q, k, v = laid_out(self.layout, *(t.to(device=self.device, dtype=t.dtype if self.fp8 else self.torch_dtype)
                                          for t in (q, k, v)))
        return Inputs(
            q=q.requires_grad_(requires_grad),
            k=k.requires_grad_(requires_grad),
            v=v.requires_grad_(requires_grad),
            key_padding_mask=None if kpm is None else kpm.to(self.device),
            bias=None if bias is None else bias.to(device=self.device, dtype=self.torch_dtype).requires_grad_(requires_grad),
            grad_out=grad_laid_out(self.grad_layout, grad_out.to(device=self.device, dtype=self.torch_dtype)),
            alibi_slopes=None if not self.alibi else self.alibi_values().to(device=self.device, dtype=torch.float32),
            sinks=None if not self.sinks else self.sink_values()
            .to(device=self.device, dtype=torch.float32 if self.sinks_float32 else self.torch_dtype)
            .requires_grad_(requires_grad),
            document_ids=self.document_ids(),
            **descales,
        )

    # Salts of the score features' own generators: drawn apart from make_inputs' stream, so a
    # spec without them keeps exactly the inputs it had before they existed.
    ALIBI_SALT = 0xA11B1
    SINK_SALT = 0x51AC

    def alibi_values(self) -> torch.Tensor:
        """This spec's ALiBi slopes, float64 on the cpu: positive and distinct per head. One of
        four kinds, chosen by the seed: the standard geometric slopes (alibi_slopes(Hq)), random
        slopes per head (Hq,), random slopes per batch element and head (B, Hq), or large random
        slopes (up to 8: a bias that dominates the logits)."""
        g = torch.Generator().manual_seed(self.seed * 131 + self.ALIBI_SALT)
        kind = int(torch.randint(4, (1,), generator=g))
        if kind == 0:
            return alibi_slopes(self.Hq)
        shape = (self.B, self.Hq) if kind == 2 else (self.Hq,)
        top = 8.0 if kind == 3 else 1.0
        # distinct per head: a sorted grid of Hq steps, each jittered within its own cell, shuffled
        cells = torch.rand(shape, dtype=torch.float64, generator=g)
        steps = (torch.arange(self.Hq, dtype=torch.float64) + 0.05 + 0.9 * cells) / self.Hq
        order = torch.randperm(self.Hq, generator=g)
        return (top * steps[..., order]).contiguous()

    def sink_values(self) -> torch.Tensor:
        """This spec's sink logits (Hq,), float64 on the cpu, of a kind chosen by the seed: N(0, 1)
        per head (3 in 8); scaled like the logits, magnitude^2 * N(0, 1) (2 in 8); log(Sk) + N(0, 1),
        a share of each row comparable to the keys' (1 in 8); large positive, 20 to 40 (1 in 8: the
        sink dominates every row and the output shrinks by e^-20 or more); very negative, -40 to
        -20 (1 in 8: the sink changes nothing visible)."""
        g = torch.Generator().manual_seed(self.seed * 131 + self.SINK_SALT)
        kind = int(torch.randint(8, (1,), generator=g))
        z = torch.randn(self.Hq, dtype=torch.float64, generator=g)
        if kind < 3:
            return z
        if kind < 5:
            return self.magnitude**2 * z
        if kind == 5:
            return math.log(max(self.Sk, 1)) + z
        u = 20.0 + 20.0 * torch.rand(self.Hq, dtype=torch.float64, generator=g)
        return u if kind == 6 else -u

    def document_ids(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(doc_q (B, Sq), doc_k (B, Sk)) int64 on the spec's device, None without documents.
        Key j's id is doc_stride times the index of the document holding it; query i's id is that
        of its aligned position p(i), or -1 where p(i) lies outside [0, Sk) (such a query sees no key)."""
        if self.documents is None:
            return None
        doc_k = torch.stack([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in self.documents])
        doc_k = doc_k * self.doc_stride
        p = torch.arange(self.Sq) + (self.Sk - self.Sq if self.align == "bottom_right" else 0)
        inside = (p >= 0) & (p < self.Sk)
        doc_q = torch.where(inside, doc_k[:, p.clamp(0, self.Sk - 1)], torch.full((), -1, dtype=torch.long))
        return doc_q.to(self.device), doc_k.to(self.device)

    def _normal_shapes(self) -> list[tuple[int, ...]]:
        """q, k, v, grad_out: what make_inputs draws first, in this order."""
        B, Hq, Hkv, Sq, Sk = self.B, self.Hq, self.Hkv, self.Sq, self.Sk
        return [(B, Hq, Sq, self.D), (B, Hkv, Sk, self.D), (B, Hkv, Sk, self.Dv), (B, Hq, Sq, self.Dv)]

    def padding_keep(self) -> torch.Tensor | None:
        """The (B, Sk) bool key padding mask make_inputs gives (True = keep), on the cpu; None
        without padding. With key_drop it replays make_inputs' draws, so mind the cost at large sizes."""
        if not self.has_padding:
            return None
        g = torch.Generator().manual_seed(self.seed)
        if self.key_drop > 0:
            for shape in self._normal_shapes():
                torch.randn(*shape, dtype=torch.float64, generator=g)
        return self._key_padding_mask(g)

    def _key_padding_mask(self, g: torch.Generator) -> torch.Tensor | None:
        if not self.has_padding:
            return None
        keep = torch.ones(self.B, self.Sk, dtype=torch.bool)
        if self.key_lengths is not None:
            j = torch.arange(self.Sk)
            keep &= j[None, :] < torch.tensor(self.key_lengths)[:, None]
        if self.key_drop > 0:
            keep &= torch.rand(self.B, self.Sk, generator=g) >= self.key_drop
        return keep

    def _bias(self, g: torch.Generator) -> torch.Tensor | None:
        if self.bias is None:
            return None
        B, H, Sq, Sk = self.B, self.Hq, self.Sq, self.Sk
        if self.bias == "alibi":
            slopes = alibi_slopes(H)
            dist = torch.arange(Sk, dtype=torch.float64)[None, :] - (
                torch.arange(Sq, dtype=torch.float64)[:, None] + (Sk - Sq)
            )
            bias = (slopes[:, None, None] * -dist.abs())[None]
        else:
            shape = {"full": (B, H, Sq, Sk), "per_head": (1, H, Sq, Sk), "per_key": (B, 1, 1, Sk)}[self.bias]
            bias = torch.randn(*shape, dtype=torch.float64, generator=g)
        if self.bias_neginf > 0:
            hit = torch.rand(bias.shape, generator=g) < self.bias_neginf
            bias = bias.masked_fill(hit, -math.inf)
        return bias.contiguous()


FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # the largest finite float8_e4m3fn


def quantize_fp8(*tensors: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    """q, k, v (any floating dtype and device) quantized to float8_e4m3fn the way fp8 pipelines
    do it, per tensor: descale = amax / 448 (float32), t8 = round(t / descale) in e4m3, so
    t8 * descale ~ t; and {"q_descale", "k_descale", "v_descale"} as float32 tensors of shape ()
    on t's device. An all-zero (or empty) tensor gets descale 1."""
    out, descales = [], {}
    for name, t in zip(("q", "k", "v"), tensors):
        amax = t.abs().amax() if t.numel() else t.new_zeros(())
        descale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(torch.float32)
        out.append((t / descale.to(t.dtype)).clamp(-FP8_MAX, FP8_MAX).to(FP8))
        descales[f"{name}_descale"] = descale
    return tuple(out), descales


def laid_out(layout: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """q, k, v (contiguous (B, H, S, D)) rebuilt in `layout` (LAYOUTS), as views of new
    storage: the same values (K and V of "expanded" excepted), other strides and offsets."""
    if layout == "contiguous":
        return q, k, v
    if layout == "bshd":
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if layout == "packed":
        return _packed(q, k, v)
    if layout == "offset":
        return tuple(_in_cache(t, 16 * (n + 1)) for n, t in enumerate((q, k, v)))
    if layout == "expanded":
        B, Hkv = k.shape[:2]
        keep = (B, 1) if Hkv > 1 else (1, 1)  # one stored kv head (one stored batch element when Hkv = 1)
        return (q, *(t[: keep[0], : keep[1]].expand(t.shape) for t in (k, v)))
    raise ValueError(f"layout: unknown layout {layout!r}; one of {LAYOUTS}")


def _packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Slices of one packed projection output (B, S, Hq*D + Hkv*D + Hkv*Dv), viewed per head
    as (B, H, S, D); with Sq != Sk, q alone and k, v packed as (B, Sk, Hkv*D + Hkv*Dv)."""
    group = (q, k, v) if q.shape[2] == k.shape[2] else (k, v)
    B, S = k.shape[0], k.shape[2]
    buf = torch.cat([t.transpose(1, 2).reshape(B, S, -1) for t in group], dim=-1)
    views, start = [], 0
    for t in group:
        H, D = t.shape[1], t.shape[3]
        views.append(buf[..., start : start + H * D].unflatten(-1, (H, D)).transpose(1, 2))
        start += H * D
    if len(group) == 2:
        views.insert(0, q.transpose(1, 2).contiguous().transpose(1, 2))
    return tuple(views)


def _in_cache(t: torch.Tensor, start: int) -> torch.Tensor:
    """t as positions start .. start + S of a longer (B, H, S + start + 16, D) buffer."""
    B, H, S, D = t.shape
    cache = torch.zeros(B, H, start + S + 16, D, dtype=t.dtype, device=t.device)
    cache[:, :, start : start + S] = t
    return cache[:, :, start : start + S]


def grad_laid_out(layout: str, grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out (contiguous (B, H, Sq, Dv)) rebuilt in `layout` (GRAD_LAYOUTS); "broadcast"
    keeps one value, expanded with every stride 0."""
    if layout == "contiguous":
        return grad_out
    if layout == "bshd":
        return grad_out.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "broadcast":
        return torch.ones((), dtype=grad_out.dtype, device=grad_out.device).expand(grad_out.shape)
    raise ValueError(f"grad_layout: unknown grad layout {layout!r}; one of {GRAD_LAYOUTS}")


def alibi_slopes(heads: int) -> torch.Tensor:
    """ALiBi head slopes (Press et al.), geometric in 2^(-8/n), for any head count."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    closest = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(closest)
    if closest < heads:
        slopes += power_of_two(2 * closest)[0::2][: heads - closest]
    return torch.tensor(slopes, dtype=torch.float64)
