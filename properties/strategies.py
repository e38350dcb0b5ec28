"""Hypothesis strategies for attention specs, shaped by what an implementation declares.

`specs_for(impl, needs, device)` draws only what `impl` covers: features it does not declare
are never drawn (not drawn-then-filtered), sizes are capped per device (small on the CPU,
where Triton runs in its interpreter), and `impl.covers(spec, needs)` filters the rest (its
`supports` limits). Every draw shrinks towards the simplest case: one batch, one head, short
sequences, head dim 16, float32, no masks.

The strategies go for the edges: Sq != Sk both ways (Sq = 1 decoding, Sq > Sk), lengths at and
around block multiples and 1, grouped heads from Hkv = 1 to Hq, windows of 0, 1, S - 1, S and
beyond S, unbounded and asymmetric, blocked windows, zero-length keys and fully masked rows,
-inf bias entries, scale 0 and unusual scales, large magnitudes that overflow exp() when the
row maximum is not subtracted.

They also go where real kernels switch code paths: every spec draws the memory layout of q, k,
v (and of grad_out for a differentiable impl) among those the impl accepts (Spec.layout,
shrinking to "contiguous"); one draw in four has wide heads (groups of 4 to 32, up to 16 heads
on the CPU, 32 on the GPU; sequence lengths shrink to keep B * Hq * Sq * Sk within the device's
budget); and a property that checks sampled rows (`long=`) gets one draw in eight with long keys:
powers of two and tile multiples +- 1, up to 4097 keys on the CPU (impls that run interpreted or
compiled there excepted) and 32769 on the GPU.

`Pinned` lets a property pin a known bug class with `@example(data=Pinned(Spec(...)))`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass

from hypothesis import example, note
from hypothesis import strategies as st

from attnbench.packing import PAGED_LAYOUTS, VARLEN_LAYOUTS, PagedSpec, VarlenSpec
from attnbench.registry import Impl
from attnbench.spec import LAYOUTS, Block, Spec

DTYPE_ORDER = ("float32", "float16", "bfloat16", "float64")  # the first shrinks best
LENGTH_EDGES = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
# Long lengths: powers of two and multiples of 64 / 128 / 512 / 1024-key tiles, each +- 1.
LONG_EDGES = tuple(sorted({n + d for n in (512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576,
                                           32768) for d in (-1, 0, 1)}))
BIAS_KINDS = ("full", "per_head", "per_key", "alibi")
SCALES = (0.0, 1.0, 0.01, 2.0)  # besides the default 1/sqrt(D); 0 is uniform attention
SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(Spec))
LONG_ONE_IN = 8  # one draw in 8 is long, where a property asks (the cost of the CPU ci profile)
MAGNITUDES = (1.0, 3.0, 8.0)  # 8: scaled logits reach the hundreds, exp() overflows without max
# Logit soft caps: 1 to 5 saturate tanh at the logits magnitude 3 and 8 draw; 30 and 50 (Gemma 2's
# attention and final caps) leave most logits in tanh's linear part.
SOFTCAPS = (1.0, 2.5, 5.0, 30.0, 50.0, 7.3)  # 7.3: held by neither bfloat16 (7.3125) nor float16 (7.30078)
SCORE_FEATURE_ONE_IN = 6  # each score feature (softcap, alibi, sinks) is drawn one draw in 6


@dataclass(frozen=True)
class Caps:
    """Size limits per device: the property suite runs on small shapes on the CPU."""

    batch: int
    heads: int  # query heads of an ordinary draw
    length: int  # sequence length of an ordinary draw
    head_dims: tuple[int, ...]  # the first is the shrink target
    kv_heads: int = 2  # kv heads of a grouped draw
    groups: tuple[int, ...] = ()  # the large GQA groups of a wide draw
    wide_heads: int = 0  # query heads of a wide draw (0: no wide draws)
    cells: int = 0  # B * Hq * Sq * Sk of an ordinary draw (0: no limit beyond the others)
    long_length: int = 0  # the longest key sequence of a long draw (0: no long draws)
    long_cells: int = 0  # B * Hq * Sq * Sk of a long draw
    long_cells_linear: int = 0  # the same for an impl declaring memory="linear" (on the GPU)
    slow_heads: int = 0  # B * Hq of a wide draw for an impl that is slow here (long_ok False; 0: no limit)
    # The compile palette: head dims and ordinary GQA groups of an impl that compiles a kernel per
    # value here (Triton, FlashAttention-4's CuTe DSL and Inductor specialize on them; lengths are
    # runtime values or only specialize on divisibility). () draws from head_dims / every group.
    compiled_head_dims: tuple[int, ...] = ()
    compiled_groups: tuple[int, ...] = ()


CAPS: dict[str, Caps] = {
    "cpu": Caps(batch=2, heads=3, length=24, head_dims=(16, 32, 24, 64, 8, 40, 80), kv_heads=2, groups=(4, 8, 16),
                wide_heads=16, cells=2 * 3 * 24 * 24, long_length=4097, long_cells=2**18, long_cells_linear=2**18,
                slow_heads=8),
    "cuda": Caps(batch=3, heads=8, length=300,
                 head_dims=(16, 32, 64, 128, 256, 24, 40, 80, 96, 160, 192, 8, 48, 72, 112), kv_heads=8,
                 groups=(4, 8, 16, 32), wide_heads=32, cells=3 * 8 * 300 * 300, long_length=32769,
                 long_cells=2**28, long_cells_linear=2**32,
                 compiled_head_dims=(16, 64, 128, 96, 256), compiled_groups=(2, 3, 4, 8)),
}


# Whether the compile palette is off: the thorough profile (nightly runs) draws every head dim and
# group, the fast profiles the palette (the plugin sets it from --hypothesis-profile).
_FULL_PALETTE = [False]


def use_full_palette(on: bool) -> None:
    _FULL_PALETTE[0] = bool(on)


def caps_for(device: str, impl: Impl | None = None) -> Caps:
    """The size caps of `device`; for an `impl` that compiles, its head dims and groups narrowed
    to the device's compile palette, so that a property run reuses a bounded set of compiled
    specializations (each new one costs seconds to a minute on a GPU) while lengths, masks and
    layouts still reach every edge. Under the thorough profile (use_full_palette) every impl
    draws from the full lists."""
    kind = device.split(":")[0]
    if kind not in CAPS:
        raise ValueError(f"device: no size caps for {device!r}; one of {sorted(CAPS)}")
    caps = CAPS[kind]
    if _FULL_PALETTE[0]:
        return dataclasses.replace(caps, compiled_groups=())
    if impl is not None and impl.compiles and caps.compiled_head_dims:
        caps = dataclasses.replace(caps, head_dims=caps.compiled_head_dims)
    return caps


def _lengths(cap: int) -> st.SearchStrategy[int]:
    edges = [n for n in LENGTH_EDGES if n <= cap]
    return st.one_of(st.integers(1, cap), st.sampled_from(edges))


def _rare(draw, label: str, one_in: int = 4) -> bool:
    """True one draw in `one_in`; shrinks to False."""
    return draw(st.sampled_from((False,) * (one_in - 1) + (True,)), label=label)


def long_ok(impl: Impl, device: str) -> bool:
    """Whether long draws suit `impl` on `device`: not on the CPU for an impl that compiles
    (Triton runs in its interpreter there, thousands of times slower than a GPU)."""
    return not (device.split(":")[0] == "cpu" and impl.compiles)


def _heads(draw, pick, impl: Impl, device: str, caps: Caps, use: frozenset[str], has, B: int) -> tuple[int, int]:
    """(Hq, Hkv): ordinary draws up to caps.heads (Hkv up to caps.kv_heads with a group of 2 or
    more), one in four wide: Hq up to caps.wide_heads, GQA groups from caps.groups. An impl
    that is slow here (the Triton interpreter) gets wide draws up to B * Hq = caps.slow_heads:
    its time grows with the number of programs, one per (batch, head, query block)."""
    wide_heads = caps.wide_heads
    if caps.slow_heads and not long_ok(impl, device):
        wide_heads = min(wide_heads, caps.slow_heads // B)
    caps = dataclasses.replace(caps, wide_heads=wide_heads)
    wide = caps.wide_heads > caps.heads and _rare(draw, "wide heads")
    if has("gqa"):
        lo = 2 if "gqa" in use else 1
        Hkv = pick("Hkv", st.integers(1, caps.kv_heads))
        small = list(range(lo, max(caps.heads // Hkv, 2) + 1))
        if impl.compiles and caps.compiled_groups:
            small = [g for g in small if g == 1 or g in caps.compiled_groups] or small
        large = [g for g in caps.groups if Hkv * g <= caps.wide_heads]
        group = draw(st.sampled_from(large if wide and large else small), label="group")
        return pick("Hq", st.just(Hkv * group)), Hkv
    large = [h for h in (4, 8, 16, 32) if caps.heads < h <= caps.wide_heads]
    Hq = pick("Hq", st.sampled_from(large) if wide and large else st.integers(1, caps.heads))
    return Hq, Hq


def _sequence(draw, pick, impl: Impl, device: str, caps: Caps, use, has, long: str | None, B: int, Hq: int):
    """(Sq, Sk, long?): ordinary lengths within caps.length and caps.cells, or with `long` one
    draw in LONG_ONE_IN long: Sk from LONG_EDGES (or any length past caps.length), Sq short (long="keys"),
    or short, equal to Sk or long too ("all"), within the long cell budget."""
    heads = B * Hq
    cap = caps.length
    if caps.cells:
        cap = max(1, min(cap, math.isqrt(caps.cells // heads)))
    budget = caps.long_cells_linear if impl.memory == "linear" and device.startswith("cuda") else caps.long_cells
    if long and caps.long_length and long_ok(impl, device) and _rare(draw, "long", LONG_ONE_IN):
        most = min(caps.long_length, budget // heads if has("cross") else math.isqrt(budget // heads))
        edges = [n for n in LONG_EDGES if caps.length < n <= most]
        if edges:
            Sk = pick("Sk", st.one_of(st.sampled_from(edges), st.integers(caps.length + 1, most)))
            if not has("cross"):
                return pick("Sq", st.just(Sk)), Sk, True
            short = _lengths(max(1, min(cap, budget // (heads * Sk))))
            if long == "keys":
                return pick("Sq", short), Sk, True
            fit = [n for n in LONG_EDGES if caps.length < n and heads * n * Sk <= budget and n != Sk]
            others = [short] + ([st.sampled_from(fit)] if fit else [])
            if "cross" not in use and heads * Sk * Sk <= budget:
                others.insert(1, st.just(Sk))
            return pick("Sq", st.one_of(*others)), Sk, True
    Sq = pick("Sq", _lengths(cap))
    if has("cross"):
        other = _lengths(cap).filter(lambda n: n != Sq)
        Sk = pick("Sk", other if "cross" in use else st.one_of(st.just(Sq), other))
    else:
        Sk = Sq
    return Sq, Sk, False


def _window_side(span: int, bounded_first: bool) -> st.SearchStrategy[int | None]:
    ints = st.one_of(st.sampled_from(sorted({0, 1, max(span - 1, 0), span, span + 3})), st.integers(0, span + 2))
    return st.one_of(ints, st.none()) if bounded_first else st.one_of(st.none(), ints)


@st.composite
def _specs(
    draw,
    impl: Impl,
    device: str,
    caps: Caps,
    use: frozenset[str],
    forbid: frozenset[str],
    fixed: dict,
    min_batch: int,
    long: str | None,
) -> Spec:
    features = impl.features - forbid
    has = features.__contains__
    local = impl.variant == "local"

    def pick(name: str, strategy: st.SearchStrategy):
        return fixed[name] if name in fixed else draw(strategy, label=name)

    dtypes = [d for d in DTYPE_ORDER if d in impl.dtypes]
    if not dtypes:
        raise ValueError(f"impl {impl.key}: declares no dtype the strategies know ({impl.dtypes})")
    fp8 = "fp8" in use  # fp8 is drawn only where a property asks for it: its output is bfloat16, forward only
    dtype = pick("dtype", st.just("bfloat16") if fp8 else st.sampled_from(dtypes))
    B = pick("B", st.integers(min_batch, max(caps.batch, min_batch)))
    Hq, Hkv = _heads(draw, pick, impl, device, caps, use, has, B)
    Sq, Sk, is_long = _sequence(draw, pick, impl, device, caps, use, has, long, B, Hq)
    D = pick("D", st.sampled_from(caps.head_dims))
    Dv = pick("Dv", st.one_of(st.just(D), st.sampled_from(caps.head_dims))) if has("dv") else D

    causal = pick("causal", st.just(True) if "causal" in use else st.booleans()) if has("causal") else False
    align = pick("align", st.sampled_from(("bottom_right", "top_left"))) if has("top_left") else "bottom_right"

    span = max(Sq, Sk)
    window = block = None
    want_window = has("sliding_window") and ("sliding_window" in use or draw(st.booleans(), label="windowed"))
    if has("blocked_window") and ("blocked_window" in use or draw(st.booleans(), label="blocked")):
        size = st.one_of(st.integers(1, 8), st.sampled_from((span, span + 1)))
        block = Block(draw(size, label="block.window_size"), draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    if local and block is None and has("sliding_window"):
        want_window = True
    if want_window:
        left = draw(_window_side(span, bounded_first=True), label="window.left")
        right = draw(_window_side(span, bounded_first=local), label="window.right")
        if left is None and right is None:
            left = 0 if local else None
        window = (left, right) if (left, right) != (None, None) else None
    window = fixed.get("window", window)
    block = fixed.get("block", block)

    key_lengths, key_drop = None, 0.0
    if has("key_padding") and ("key_padding" in use or draw(st.booleans(), label="padded")):
        edge = st.sampled_from(sorted({0, 1, max(Sk - 1, 0), Sk}))
        length = st.one_of(st.integers(0, Sk), edge)
        lengths = [draw(length, label="key_length") for _ in range(B)]
        if "key_padding" in use and min(lengths) == Sk:
            lengths[0] = draw(st.integers(0, Sk - 1), label="key_length[0]")
        key_lengths = tuple(lengths)
        key_drop = draw(st.sampled_from((0.0, 0.25)), label="key_drop")
    key_lengths = fixed.get("key_lengths", key_lengths)
    key_drop = fixed.get("key_drop", key_drop)

    bias, bias_neginf = None, 0.0
    if has("bias") and not fp8:
        kinds = BIAS_KINDS if not is_long else ("per_key",)  # a long case's (Sq, Sk) bias would dwarf it
        kinds = st.sampled_from(kinds) if "bias" in use else st.one_of(st.none(), st.sampled_from(kinds))
        bias = pick("bias", kinds)
        if bias is not None:
            bias_neginf = pick("bias_neginf", st.sampled_from((0.0, 0.2)))

    return Spec(
        B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, Dv=Dv, dtype=dtype, device=device,
        scale=pick("scale", st.one_of(st.none(), st.sampled_from(SCALES))),
        causal=causal, window=window, block=block, key_lengths=key_lengths, key_drop=key_drop,
        bias=bias, bias_neginf=bias_neginf, align=align, **_score_features(draw, pick, has, use, dtype), fp8=fp8,
        dropout_p=fixed.get("dropout_p", 0.0),
        magnitude=pick("magnitude", st.sampled_from(MAGNITUDES)),
        seed=pick("seed", st.integers(0, 2**16)),
        layout=pick("layout", st.sampled_from(_layouts(impl, B, Hkv))),
        grad_layout=pick("grad_layout", st.sampled_from(impl.grad_layouts)) if has("backward") else "contiguous",
    )


def _score_features(draw, pick, has, use: frozenset[str], dtype: str) -> dict:
    """softcap, alibi and sinks for an impl that declares them: each one draw in
    SCORE_FEATURE_ONE_IN (always when `use` names it); each shrinks to off. With float16 /
    bfloat16 inputs the sinks come in float32 one draw in two (a float64 call keeps float64
    sinks: gradcheck differentiates in float64 only)."""
    out: dict = {}
    if has("softcap"):
        on = "softcap" in use or _rare(draw, "softcapped", SCORE_FEATURE_ONE_IN)
        out["softcap"] = pick("softcap", st.sampled_from(SOFTCAPS) if on else st.none())
    for name in ("alibi", "sinks"):
        if has(name):
            out[name] = pick(name, st.just(name in use or _rare(draw, name, SCORE_FEATURE_ONE_IN)))
    if out.get("sinks") and dtype in ("float16", "bfloat16"):  # the contract takes q's dtype or float32
        out["sinks_float32"] = pick("sinks_float32", st.booleans())
    return out


def _layouts(impl: Impl, B: int, Hkv: int) -> list[str]:
    """The layouts `impl` accepts, "contiguous" first; "expanded" only where there is a batch
    or kv head axis to expand along (with B = Hkv = 1 it is the contiguous layout)."""
    order = [name for name in LAYOUTS if name in impl.layouts]
    if B * Hkv == 1 and "expanded" in order:
        order.remove("expanded")
    return order or ["contiguous"]


def specs_for(
    impl: Impl,
    needs: Iterable[str] = (),
    device: str = "cpu",
    *,
    use: Iterable[str] = (),
    forbid: Iterable[str] = (),
    min_batch: int = 1,
    caps: Caps | None = None,
    long: str | None = None,
    **fixed,
) -> st.SearchStrategy[Spec]:
    """Specs that `impl` covers (with the extra `needs`, e.g. "backward" or "lse").

    use: features every drawn spec must exercise ("causal", "sliding_window", "key_padding",
        "gqa", "bias", "cross", "blocked_window", "softcap", "alibi", "sinks", "fp8"; fp8 is
        drawn only when named here, with the output dtype bfloat16 and no bias).
    forbid: features never drawn (a permutation property forbids "causal", ...).
    long: None (ordinary lengths), "keys" (one draw in eight with long keys and short queries)
        or "all" (long keys, and queries short, as long, or long too): for properties that
        check sampled rows (harness.sample_rows) instead of every row against the oracle.
    fixed: Spec fields held at a value (dtype="float64", magnitude=1.0, ...).
    """
    needs = tuple(needs)
    use, forbid = frozenset(use), frozenset(forbid)
    if use - impl.features:
        raise ValueError(f"use: {impl.key} does not declare {sorted(use - impl.features)}; check first")
    if use & forbid:
        raise ValueError(f"use / forbid: both name {sorted(use & forbid)}")
    if long not in (None, "keys", "all"):
        raise ValueError(f"long: None, 'keys' or 'all', got {long!r}")
    unknown = set(fixed) - SPEC_FIELDS
    if unknown:
        raise ValueError(f"fixed: {sorted(unknown)} are not Spec fields")
    strategy = _specs(impl, device, caps or caps_for(device, impl), use, forbid, fixed, min_batch, long)
    return strategy.filter(lambda s: impl.covers(s, needs))


class Pinned:
    """A known bug class, pinned with `@example(data=Pinned(Spec(...)))`: stands in for
    Hypothesis' data object, and `draw_spec` hands out its spec (on the test's device)."""

    def __init__(self, spec: Spec, why: str = "") -> None:
        self.spec = spec
        self.why = why

    def draw(self, strategy, label=None):
        raise TypeError("Pinned example: use draw_spec / draw_int, not data.draw")

    def __repr__(self) -> str:
        return f"Pinned({self.spec.short()})"


def pinned(*pins: Pinned):
    """Decorator: each pin becomes an explicit Hypothesis example of a `@given(data=st.data())`
    property, in the order given."""
    def wrap(test):
        for pin in reversed(pins):
            test = example(data=pin)(test)
        return test

    return wrap


# The case the running example drew last (draw_spec, draw_case): what the test process reports
# when the example loses the CUDA context and it must end before Hypothesis shrinks (the plugin).
_DRAWN: list = []


def forget_drawn() -> None:
    _DRAWN.clear()


def drawn_case():
    """The newest case drawn by the running example, or None."""
    return _DRAWN[-1] if _DRAWN else None


def draw_spec(data, impl: Impl, device: str, needs: Iterable[str] = (), quiet: bool = False, **kwargs) -> Spec | None:
    """Draw a spec for `impl` (or take the pinned one); None when a pinned spec does not apply.
    quiet: do not note the spec (the caller notes what it makes of it, e.g. draw_documents)."""
    if isinstance(data, Pinned):
        fixed = {k: v for k, v in kwargs.items() if k not in ("use", "forbid", "min_batch", "caps", "long")}
        spec = relax(data.spec, impl).replace(device=device, **fixed)
        if spec.B < kwargs.get("min_batch", 1) or not impl.covers(spec, needs):
            return None
        if frozenset(kwargs.get("use", ())) - spec.needs():
            return None
        if spec.needs() & frozenset(kwargs.get("forbid", ())):
            return None
        if max(spec.Sq, spec.Sk) > caps_for(device).length and not long_ok(impl, device):
            return None  # a long pinned case, for an impl that is slow here: as long draws are
    else:
        spec = data.draw(specs_for(impl, needs, device, **kwargs), label="spec")
    _DRAWN.append(spec)
    if not quiet:
        note(f"spec: {spec.short()}")
    return spec


def draw_int(data, lo: int, hi: int, default: int, label: str) -> int:
    """An extra integer draw (a row, a cut position); a pinned example takes `default`."""
    if isinstance(data, Pinned):
        return max(lo, min(hi, default))
    return data.draw(st.integers(lo, hi), label=label)


def relax(spec: Spec, impl: Impl) -> Spec:
    """A pinned spec with what `impl` does not declare taken out (a dense kernel without
    windows still gets the pinned decode shape, without the window)."""
    f = impl.features
    changes: dict = {}
    if spec.window is not None and "sliding_window" not in f:
        changes["window"] = None
    if spec.block is not None and "blocked_window" not in f:
        changes["block"] = None
    if spec.causal and "causal" not in f:
        changes["causal"] = False
    if spec.has_padding and "key_padding" not in f:
        changes.update(key_lengths=None, key_drop=0.0)
    if spec.bias is not None and "bias" not in f:
        changes.update(bias=None, bias_neginf=0.0)
    if spec.Hkv != spec.Hq and "gqa" not in f:
        changes["Hkv"] = spec.Hq
    if spec.Sq != spec.Sk and "cross" not in f:
        changes["Sk"] = spec.Sq
        if spec.key_lengths is not None and "key_lengths" not in changes:
            changes["key_lengths"] = tuple(min(n, spec.Sq) for n in spec.key_lengths)
    if spec.align != "bottom_right" and "top_left" not in f:
        changes["align"] = "bottom_right"
    if spec.Dv != spec.D and "dv" not in f:
        changes["Dv"] = spec.D
    if spec.softcap is not None and "softcap" not in f:
        changes["softcap"] = None
    for name in ("alibi", "sinks", "fp8"):
        if getattr(spec, name) and name not in f:
            changes[name] = False
    if spec.dtype not in impl.dtypes:
        changes["dtype"] = next((d for d in DTYPE_ORDER if d in impl.dtypes), spec.dtype)
    if spec.layout not in impl.layouts:
        changes["layout"] = "contiguous"
    if spec.grad_layout not in impl.grad_layouts or "backward" not in f:
        changes["grad_layout"] = "contiguous"
    return spec.replace(**changes) if changes else spec


# -- packed (varlen) batches, document masks and the paged KV cache ---------------------------
# Per-sequence lengths: 0 and 1, and boundaries on both sides of the 16-token tiles.
SEQ_EDGES = (0, 1, 2, 15, 16, 17)
SEQ_CAP = {"cpu": 20, "cuda": 300}  # the longest sequence of an ordinary packed or paged draw
SEQ_CAP_SLOW = 10  # the same on the CPU for an impl that runs interpreted there (long_ok False)
# One packed or paged draw in LONG_ONE_IN (for an impl that long draws suit) has one long sequence:
# a length on either side of the 32- to 256-token tiles kernels loop over, or any up to the cap.
LONG_SEQ_EDGES = (31, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
LONG_SEQ_CAP = {"cpu": 300, "cuda": 2100}
MANY_SEQS = {"varlen": 9, "paged": 7}  # the most sequences of a rare wide draw (per-sequence state indexed past 4)
# paged block sizes: 16 first (shrinks to it), then ones that divide nothing, then blocks holding
# several 16-key tiles (a kernel that walks a block tile by tile must stay in it)
BLOCK_SIZES = (16, 1, 3, 4, 5, 8, 32, 128)


def _seq_cap(impl: Impl, device: str) -> int:
    kind = device.split(":")[0]
    return SEQ_CAP_SLOW if not long_ok(impl, device) else SEQ_CAP.get(kind, SEQ_CAP["cpu"])


def _seq_length(cap: int, lo: int = 0) -> st.SearchStrategy[int]:
    edges = [n for n in SEQ_EDGES if lo <= n <= cap]
    return st.one_of(st.integers(lo, cap), st.sampled_from(edges))


def _long_seq(draw, impl: Impl, device: str) -> int | None:
    """One packed / paged draw in LONG_ONE_IN, for an impl long draws suit: the length of its one
    long sequence (LONG_SEQ_EDGES, or any past the ordinary cap); else None."""
    if not long_ok(impl, device) or not _rare(draw, "long sequence", LONG_ONE_IN):
        return None
    kind = device.split(":")[0]
    cap = LONG_SEQ_CAP.get(kind, LONG_SEQ_CAP["cpu"])
    return draw(st.one_of(st.sampled_from(LONG_SEQ_EDGES), st.integers(_seq_cap(impl, device) + 1, cap)),
                label="long seqlen")


def _seq_count(draw, impl: Impl, device: str, min_seqs: int, most: int, kind: str) -> int:
    """How many sequences: min_seqs to `most`, or one draw in eight (an impl long draws suit) up to
    MANY_SEQS[kind]: state kept per sequence in a fixed-size array shows past its size."""
    if long_ok(impl, device) and _rare(draw, "many sequences", 8):
        return draw(st.integers(max(min_seqs, most + 1), max(min_seqs, MANY_SEQS[kind])), label="sequences")
    return draw(st.integers(min_seqs, max(min_seqs, most)), label="sequences")


def _seq_layout(draw, impl: Impl, layouts: tuple[str, ...], fixed: dict) -> str:
    """A memory layout of the call's tensors among those `impl` declares (Impl.layouts)."""
    if "layout" in fixed:
        return fixed["layout"]
    return draw(st.sampled_from([name for name in layouts if name in impl.layouts]), label="layout")


def _seq_common(draw, impl: Impl, device: str, use: frozenset[str], fixed: dict) -> dict:
    """The fields VarlenSpec and PagedSpec share: dtype, heads, head dims, causal, window, scale."""
    has = impl.features.__contains__

    def pick(name: str, strategy: st.SearchStrategy):
        return fixed[name] if name in fixed else draw(strategy, label=name)

    dtypes = [d for d in DTYPE_ORDER if d in impl.dtypes]
    caps = caps_for(device, impl)
    Hkv = pick("Hkv", st.integers(1, 2)) if has("gqa") else None
    # groups of 2 or 3, one draw in four a large one (caps.groups, up to 8 for an interpreted
    # impl, whose time grows with the heads): a kernel that packs a group into a tile of fixed
    # height, or keeps per-head state in a fixed array, shows past it
    large = [g for g in caps.groups if g <= 8 or long_ok(impl, device)]
    wide = Hkv is not None and bool(large) and "group" not in fixed and _rare(draw, "wide group")
    groups = st.sampled_from(large) if wide else st.integers(2 if "gqa" in use else 1, 3)
    group = pick("group", groups) if Hkv else 1
    Hq = Hkv * group if Hkv else pick("Hq", st.integers(1, 2))
    D = pick("D", st.sampled_from(caps.head_dims))
    window = None
    if has("sliding_window") and ("sliding_window" in use or draw(st.booleans(), label="windowed")):
        side = st.one_of(st.none(), st.integers(0, 6))
        window = (draw(side, label="window.left"), draw(side, label="window.right"))
        window = None if window == (None, None) else window
    return dict(
        dtype=pick("dtype", st.sampled_from(dtypes)), device=device, Hq=Hq, Hkv=Hkv or Hq, D=D,
        Dv=pick("Dv", st.one_of(st.just(D), st.sampled_from(caps.head_dims))) if has("dv") else D,
        causal=pick("causal", st.just(True) if "causal" in use else st.booleans()) if has("causal") else False,
        window=fixed.get("window", window), scale=pick("scale", st.one_of(st.none(), st.sampled_from(SCALES))),
        magnitude=pick("magnitude", st.sampled_from(MAGNITUDES)), seed=pick("seed", st.integers(0, 2**16)),
        softcap=pick("softcap", st.one_of(st.none(), st.sampled_from(SOFTCAPS))) if has("softcap") else None,
    )


@st.composite
def _varlen_specs(draw, impl: Impl, device: str, use: frozenset[str], fixed: dict, min_seqs: int) -> VarlenSpec:
    common = _seq_common(draw, impl, device, use, fixed)
    cap = _seq_cap(impl, device)
    if "seqlens" in fixed:
        return VarlenSpec(seqlens=fixed["seqlens"], **common)
    most = 4 if long_ok(impl, device) else 3  # an interpreted impl pays per launch: one per sequence at worst
    count = _seq_count(draw, impl, device, min_seqs, most, "varlen")
    cross = "cross" in impl.features
    seqlens = []
    for _ in range(count):
        sk = draw(_seq_length(cap), label="seqlen_k")
        sq = draw(st.one_of(st.just(sk), _seq_length(cap)), label="seqlen_q") if cross else sk
        seqlens.append((sq, sk))
    long = _long_seq(draw, impl, device)
    if long is not None:  # one sequence long on the key side, its queries as many, or few (decoding)
        at = draw(st.integers(0, count - 1), label="long sequence index")
        sq = draw(st.one_of(st.just(long), _seq_length(SEQ_EDGES[-1], lo=1)), label="long seqlen_q") if cross else long
        seqlens[at] = (sq, long)
    layout = _seq_layout(draw, impl, VARLEN_LAYOUTS, fixed)
    return VarlenSpec(seqlens=tuple(seqlens), layout=layout, **common)


def varlen_specs(impl: Impl, device: str = "cpu", needs: Iterable[str] = (), *, use: Iterable[str] = (),
                 min_seqs: int = 1, **fixed) -> st.SearchStrategy[VarlenSpec]:
    """Packed batches `impl` covers: 1 to 4 sequences (at least min_seqs; rarely up to MANY_SEQS)
    of 0 to SEQ_CAP tokens each, the SEQ_EDGES among them (0, 1, tile boundaries +- 1), one draw in
    LONG_ONE_IN with one long sequence across the larger tiles (LONG_SEQ_EDGES), queries as many
    as keys or (with "cross") not; every head dim of the device's caps, grouped heads, Dv, causal,
    windows where declared; q, k, v contiguous, fused ("packed") or rows of larger buffers
    ("offset") as the impl's layouts allow. fixed: VarlenSpec fields held at a value (and
    "group": the GQA group)."""
    use = frozenset(use)
    if use - impl.features:
        raise ValueError(f"use: {impl.key} does not declare {sorted(use - impl.features)}; check first")
    return _varlen_specs(impl, device, use, fixed, min_seqs).filter(lambda s: impl.covers(s, needs))


@st.composite
def _paged_specs(draw, impl: Impl, device: str, use: frozenset[str], fixed: dict, min_seqs: int) -> PagedSpec:
    common = _seq_common(draw, impl, device, use, fixed)
    cap = _seq_cap(impl, device)

    def pick(name: str, strategy: st.SearchStrategy):
        return fixed[name] if name in fixed else draw(strategy, label=name)

    Sq = pick("Sq", st.one_of(st.integers(1, 4), st.integers(1, cap))) if "cross" in impl.features else None
    count = _seq_count(draw, impl, device, min_seqs, 3, "paged")
    if Sq is None:  # without "cross" every sequence holds exactly its Sq new tokens
        Sq = pick("Sq", st.integers(1, cap))
        lengths = (Sq,) * count
    else:
        lengths = [draw(st.one_of(st.integers(Sq, max(Sq, cap)), _seq_length(cap)), label="cache_seqlen")
                   for _ in range(count)]
        long = _long_seq(draw, impl, device)
        if long is not None:  # one long cache: decoding across many key tiles and blocks
            lengths[draw(st.integers(0, count - 1), label="long sequence index")] = max(long, Sq)
        lengths = tuple(lengths)
    return PagedSpec(
        cache_seqlens=fixed.get("cache_seqlens", lengths), Sq=Sq, block_size=pick("block_size", st.sampled_from(BLOCK_SIZES)),
        spare_blocks=pick("spare_blocks", st.integers(0, 2)), table_pad=pick("table_pad", st.sampled_from((0, 2))),
        permute=pick("permute", st.booleans()), poison=pick("poison", st.booleans()),
        layout=_seq_layout(draw, impl, PAGED_LAYOUTS, fixed), **common,
    )


def paged_specs(impl: Impl, device: str = "cpu", needs: Iterable[str] = (), *, use: Iterable[str] = (),
                min_seqs: int = 1, **fixed) -> st.SearchStrategy[PagedSpec]:
    """Paged decoding / chunked-prefill steps `impl` covers: 1 to 3 sequences (at least
    min_seqs; rarely up to MANY_SEQS), Sq new tokens (1 to 4 mostly: decoding), cache lengths from
    0 up with the SEQ_EDGES and one draw in LONG_ONE_IN a long cache, block sizes that divide
    nothing (BLOCK_SIZES), spare blocks, a block table that is a column slice of a wider one,
    physical blocks permuted, NaN in every unused slot; q and the pool contiguous, q transposed
    ("bshd") or K and V interleaved in one pool ("packed") as the impl's layouts allow."""
    use = frozenset(use)
    if use - impl.features:
        raise ValueError(f"use: {impl.key} does not declare {sorted(use - impl.features)}; check first")
    return _paged_specs(impl, device, use, fixed, min_seqs).filter(lambda s: impl.covers(s, needs))


def relax_case(case: VarlenSpec | PagedSpec, impl: Impl) -> VarlenSpec | PagedSpec:
    """A pinned packed / paged case with what `impl` does not declare taken out, as `relax` does
    for a dense spec: the pin's lengths and edges stay, its window, soft cap, grouped heads, Dv,
    queries differing from keys, dtype and layout fall back to what the impl runs."""
    f = impl.features
    changes: dict = {}
    if case.window is not None and "sliding_window" not in f:
        changes["window"] = None
    if case.causal and "causal" not in f:
        changes["causal"] = False
    if case.softcap is not None and "softcap" not in f:
        changes["softcap"] = None
    if case.Hkv != case.Hq and "gqa" not in f:
        changes["Hkv"] = case.Hq
    if case.Dv != case.D and "dv" not in f:
        changes["Dv"] = case.D
    if case.dtype not in impl.dtypes:
        changes["dtype"] = next((d for d in DTYPE_ORDER if d in impl.dtypes), case.dtype)
    if case.layout not in impl.layouts:
        changes["layout"] = "contiguous"
    if "cross" not in f and case.needs() & {"cross"}:
        if isinstance(case, VarlenSpec):
            changes["seqlens"] = tuple((sk, sk) for _, sk in case.seqlens)
        else:
            changes["cache_seqlens"] = (case.Sq,) * case.B
    return case.replace(**changes) if changes else case


def draw_case(data, impl: Impl, device: str, strategy: st.SearchStrategy, needs: Iterable[str] = ()):
    """A drawn VarlenSpec / PagedSpec, or a pinned one (Pinned(VarlenSpec(...))) on the test's
    device; None when the pinned one is not covered."""
    if isinstance(data, Pinned):
        case = relax_case(data.spec.replace(device=device), impl)
        if not impl.covers(case, needs):
            return None
        if case.longest > _seq_cap(impl, device) and not long_ok(impl, device):
            return None  # a long pinned case, for an impl that is slow here: as long draws are
    else:
        case = data.draw(strategy, label="spec")
    _DRAWN.append(case)
    note(f"spec: {case.short()}")
    return case


def draw_documents(data, spec: Spec, default: tuple[tuple[int, ...], ...] | None = None) -> Spec:
    """`spec` with documents along its keys: per batch element, cut points drawn at random and at
    the 16-token tile boundaries +- 1 (documents of one token too); ids 0, 1, 2, ... or, one draw
    in two, 65536 apart (Spec.doc_stride). A pinned example takes `default` (or two documents
    split in the middle)."""
    if isinstance(data, Pinned):
        if spec.documents is not None:  # the pin names its documents
            note(f"spec: {spec.short()}")
            return spec
        if default is None:
            half = max(1, spec.Sk // 2)
            default = tuple((half, spec.Sk - half) if spec.Sk > 1 else (spec.Sk,) for _ in range(spec.B))
        spec = spec.replace(documents=default)
        note(f"spec: {spec.short()}")
        return spec
    docs = []
    for _ in range(spec.B):
        edges = sorted({n for n in (1, 15, 16, 17) if 0 < n < spec.Sk})
        cut = st.one_of(st.integers(1, max(1, spec.Sk - 1)), st.sampled_from(edges)) if edges else st.just(spec.Sk)
        cuts = data.draw(st.lists(cut, max_size=3), label="document cuts")
        points = sorted({c for c in cuts if 0 < c < spec.Sk} | {0, spec.Sk})
        docs.append(tuple(b - a for a, b in zip(points, points[1:])))
    stride = data.draw(st.sampled_from((1, 65536)), label="document id stride")
    spec = spec.replace(documents=tuple(docs), doc_stride=stride)
    note(f"spec: {spec.short()}")
    return spec
