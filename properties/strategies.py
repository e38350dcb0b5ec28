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

`Pinned` lets a property pin a known bug class with `@example(data=Pinned(Spec(...)))`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from hypothesis import note
from hypothesis import strategies as st

from attnbench.registry import Impl
from attnbench.spec import Block, Spec

DTYPE_ORDER = ("float32", "float16", "bfloat16", "float64")  # the first shrinks best
LENGTH_EDGES = (1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257)
BIAS_KINDS = ("full", "per_head", "per_key", "alibi")
SCALES = (0.0, 1.0, 0.01, 2.0)  # besides the default 1/sqrt(D); 0 is uniform attention
SPEC_FIELDS = frozenset(f.name for f in dataclasses.fields(Spec))
MAGNITUDES = (1.0, 3.0, 8.0)  # 8: scaled logits reach the hundreds, exp() overflows without max


@dataclass(frozen=True)
class Caps:
    """Size limits per device: the property suite runs on small shapes on the CPU."""

    batch: int
    heads: int
    length: int
    head_dims: tuple[int, ...]  # the first is the shrink target


CAPS: dict[str, Caps] = {
    "cpu": Caps(batch=2, heads=3, length=24, head_dims=(16, 32, 24, 64)),
    "cuda": Caps(batch=3, heads=8, length=300, head_dims=(16, 32, 64, 128, 256, 24, 40, 80, 96, 160, 192)),
}


def caps_for(device: str) -> Caps:
    kind = device.split(":")[0]
    if kind not in CAPS:
        raise ValueError(f"device: no size caps for {device!r}; one of {sorted(CAPS)}")
    return CAPS[kind]


def _lengths(cap: int) -> st.SearchStrategy[int]:
    edges = [n for n in LENGTH_EDGES if n <= cap]
    return st.one_of(st.integers(1, cap), st.sampled_from(edges))


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
) -> Spec:
    features = impl.features - forbid
    has = features.__contains__
    local = impl.variant == "local"

    def pick(name: str, strategy: st.SearchStrategy):
        return fixed[name] if name in fixed else draw(strategy, label=name)

    dtypes = [d for d in DTYPE_ORDER if d in impl.dtypes]
    if not dtypes:
        raise ValueError(f"impl {impl.key}: declares no dtype the strategies know ({impl.dtypes})")
    dtype = pick("dtype", st.sampled_from(dtypes))
    B = pick("B", st.integers(min_batch, max(caps.batch, min_batch)))
    if has("gqa"):
        lo = 2 if "gqa" in use else 1
        Hkv = pick("Hkv", st.integers(1, max(caps.heads // lo, 1)))
        group = draw(st.integers(lo, max(caps.heads // Hkv, lo)), label="group")
        Hq = pick("Hq", st.just(Hkv * group))
    else:
        Hq = pick("Hq", st.integers(1, caps.heads))
        Hkv = Hq
    Sq = pick("Sq", _lengths(caps.length))
    if has("cross"):
        other = _lengths(caps.length).filter(lambda n: n != Sq)
        Sk = pick("Sk", other if "cross" in use else st.one_of(st.just(Sq), other))
    else:
        Sk = Sq
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
    if has("bias"):
        kinds = st.sampled_from(BIAS_KINDS) if "bias" in use else st.one_of(st.none(), st.sampled_from(BIAS_KINDS))
        bias = pick("bias", kinds)
        if bias is not None:
            bias_neginf = pick("bias_neginf", st.sampled_from((0.0, 0.2)))

    return Spec(
        B=B, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, Dv=Dv, dtype=dtype, device=device,
        scale=pick("scale", st.one_of(st.none(), st.sampled_from(SCALES))),
        causal=causal, window=window, block=block, key_lengths=key_lengths, key_drop=key_drop,
        bias=bias, bias_neginf=bias_neginf, align=align,
        dropout_p=fixed.get("dropout_p", 0.0),
        magnitude=pick("magnitude", st.sampled_from(MAGNITUDES)),
        seed=pick("seed", st.integers(0, 2**16)),
    )


def specs_for(
    impl: Impl,
    needs: Iterable[str] = (),
    device: str = "cpu",
    *,
    use: Iterable[str] = (),
    forbid: Iterable[str] = (),
    min_batch: int = 1,
    caps: Caps | None = None,
    **fixed,
) -> st.SearchStrategy[Spec]:
    """Specs that `impl` covers (with the extra `needs`, e.g. "backward" or "lse").

    use: features every drawn spec must exercise ("causal", "sliding_window", "key_padding",
        "gqa", "bias", "cross", "blocked_window").
    forbid: features never drawn (a permutation property forbids "causal", ...).
    fixed: Spec fields held at a value (dtype="float64", magnitude=1.0, ...).
    """
    needs = tuple(needs)
    use, forbid = frozenset(use), frozenset(forbid)
    if use - impl.features:
        raise ValueError(f"use: {impl.key} does not declare {sorted(use - impl.features)}; check first")
    if use & forbid:
        raise ValueError(f"use / forbid: both name {sorted(use & forbid)}")
    unknown = set(fixed) - SPEC_FIELDS
    if unknown:
        raise ValueError(f"fixed: {sorted(unknown)} are not Spec fields")
    strategy = _specs(impl, device, caps or caps_for(device), use, forbid, fixed, min_batch)
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


def draw_spec(data, impl: Impl, device: str, needs: Iterable[str] = (), **kwargs) -> Spec | None:
    """Draw a spec for `impl` (or take the pinned one); None when a pinned spec does not apply."""
    if isinstance(data, Pinned):
        fixed = {k: v for k, v in kwargs.items() if k not in ("use", "forbid", "min_batch", "caps")}
        spec = relax(data.spec, impl).replace(device=device, **fixed)
        if spec.B < kwargs.get("min_batch", 1) or not impl.covers(spec, needs):
            return None
        if frozenset(kwargs.get("use", ())) - spec.needs():
            return None
        if spec.needs() & frozenset(kwargs.get("forbid", ())):
            return None
    else:
        spec = data.draw(specs_for(impl, needs, device, **kwargs), label="spec")
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
    if spec.dtype not in impl.dtypes:
        changes["dtype"] = next((d for d in DTYPE_ORDER if d in impl.dtypes), spec.dtype)
    return spec.replace(**changes) if changes else spec
