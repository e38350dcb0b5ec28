"""What must not be seen is not seen: causality, masked keys, empty rows, window edges,
window identities, padding.

Fairness rule for overwritten masked inputs (documented in properties/README.md):
- masked keys and values are overwritten with large finite values (`big_values`: the masked
  logits land far beyond exp() overflow, V is huge), for every implementation: a kernel that
  excludes invisible logits is unaffected, one that adds a "large negative number", takes the
  row maximum over masked logits or lets masked probabilities leak is caught;
- NaN is put only into masked *keys*, and only the forward is checked: a NaN logit must be
  selected away, never added to (NaN + -inf is NaN). NaN never goes into masked values:
  0 * NaN is NaN in any P @ V, so a kernel that loads the tile may legitimately be poisoned;
  likewise dq = dS @ K meets 0 * NaN in any backward.
Comparisons are bit-exact for implementations that declare "deterministic", otherwise within
twice the tolerance rule (two runs, each within the rule of the oracle).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from attnbench.oracles.dense import visible as oracle_visible
from attnbench.properties.harness import (
    ALL_ROWS,
    big_values,
    check,
    check_runs,
    draw_rows,
    exact_between,
    fresh_inputs,
    noise,
    position,
    reference_impl,
    references,
    require,
    run_impl,
    run_oracle,
    run_oracle_rows,
    scales_of,
    visible,
    wants_grad,
    with_tensors,
)
from attnbench.properties.strategies import Pinned, draw_int, draw_spec, pinned
from attnbench.spec import Block, Inputs, Spec

pytestmark = pytest.mark.variant("dense", "local")

MASKS = ("causal", "sliding_window", "blocked_window", "key_padding")


# -- causality -----------------------------------------------------------------------------
@given(data=st.data())
@pinned(
    Pinned(Spec(Sq=4, Sk=9, causal=True, window=(8, 0)), "bottom-right: query i sits at i + Sk - Sq"),
    Pinned(Spec(Sq=7, Sk=3, causal=True, window=(6, 0)), "Sq > Sk: leading queries see nothing"),
)
def test_causal_future_has_no_influence(impl, device, measure, data):
    """Changing every input after position p(i) never changes out_i; the gradients through
    out_i with respect to those inputs are exactly zero."""
    require(impl, "causal")
    spec = draw_spec(data, impl, device, use=("causal",), long="all")
    if spec is None:
        return
    first = position(spec, 0)
    lo, hi = max(first + 1, 0), spec.Sk - 1
    if lo > hi:
        return  # no future key for any query (Sq = 1 decoding): nothing to perturb
    cut = draw_int(data, lo, hi, (lo + hi) // 2, label="cut")
    rows = [i for i in range(spec.Sq) if position(spec, i) < cut]
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    big = big_values(spec.torch_dtype)
    k, v, q = inputs.k.detach().clone(), inputs.v.detach().clone(), inputs.q.detach().clone()
    k[:, :, cut:] = noise(k[:, :, cut:], spec, 1, big)
    v[:, :, cut:] = noise(v[:, :, cut:], spec, 2, big)
    later = [i for i in range(spec.Sq) if i not in rows]
    q[:, :, later] = noise(q[:, :, later], spec, 3)
    changes = dict(q=q, k=k, v=v)
    if inputs.bias is not None:
        bias = inputs.bias.detach().clone()
        bias[..., cut:] = noise(bias[..., cut:], spec, 4, 4.0)
        changes["bias"] = bias
    changed = with_tensors(inputs, **changes)

    with torch.no_grad():
        base = run_impl(impl, spec, inputs)
        moved = run_impl(impl, spec, changed)
    errors, scales = references(spec, inputs, impl, rows=draw_rows(data, spec))
    exact = exact_between(inputs, changed)
    check_runs(measure, "out", moved.out[:, :, rows], base.out[:, :, rows], impl, errors["out"], spec.dtype,
               scales["out"], exact=exact)
    if base.lse is not None and "lse" in errors:
        check_runs(measure, "lse", moved.lse[:, :, rows], base.lse[:, :, rows], impl, errors["lse"], spec.dtype,
                   scales["lse"], exact=exact)
    if grad:
        only_rows = torch.zeros_like(changed.grad_out)
        only_rows[:, :, rows] = changed.grad_out[:, :, rows]
        changed.grad_out = only_rows
        run = run_impl(impl, spec, changed, grad=True)
        for name in ("dk", "dv"):
            leak = run.grads[name][:, :, cut:]
            _exactly_zero(name, leak, f"keys >= {cut}, which no query in rows {rows[:4]}... may see")
        if "dbias" in run.grads:
            _exactly_zero("dbias", run.grads["dbias"][..., cut:], f"keys >= {cut}")


def _exactly_zero(name: str, t: torch.Tensor, where: str) -> None:
    if t.numel() and not bool((t == 0).all()):
        nz = t.detach().abs().max().item()
        raise AssertionError(f"{name}: gradient reaches {where}: max |{name}| = {nz:.3g}, must be exactly 0")


# -- masked keys ---------------------------------------------------------------------------
def _masked_spec(data, impl, device, **kwargs) -> Spec | None:
    if not set(MASKS) & impl.features:
        pytest.skip(f"{impl.key} declares no masking feature")
    use = ("key_padding",) if "key_padding" in impl.features else ()
    return draw_spec(data, impl, device, use=use, magnitude=1.0, long="all", **kwargs)


def _dead_keys(spec: Spec, inputs: Inputs) -> torch.Tensor:
    """(B, Sk) bool: keys no query of that batch element may see (padding, out of every window)."""
    return ~visible(spec, inputs).any(dim=1)


@given(data=st.data())
@pinned(
    Pinned(Spec(B=2, Sq=5, key_lengths=(5, 2), window=(4, 4)), "padding mask polarity and batch"),
    Pinned(Spec(Sq=17, key_lengths=(13,), window=(16, 16)), "padding inside the last partial block"),
    Pinned(Spec(Sq=20, D=256, Dv=16, dtype="float16", window=(0, 0), key_lengths=(9,), bias="full"),
           "head dim 256 + bias: a kernel config that runs out of shared memory (triton, H100)"),
)
def test_masked_keys_have_no_influence(impl, device, measure, data):
    """Overwriting keys and values no query may see with huge finite values changes nothing,
    and their gradients are exactly zero."""
    spec = _masked_spec(data, impl, device)
    if spec is None:
        return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    dead = _dead_keys(spec, inputs)
    if not dead.any():
        return
    big = big_values(spec.torch_dtype)
    k, v = inputs.k.detach().clone(), inputs.v.detach().clone()
    where = dead.to(k.device)[:, None, :, None]
    # noise like the inputs' own k / v: equal along an expanded layout's dims, which then stays
    k = torch.where(where, torch.where(noise(inputs.k, spec, 5) > 0, big, -big).to(k.dtype), k)
    v = torch.where(where, torch.where(noise(inputs.v, spec, 6) > 0, big, -big).to(v.dtype), v)
    changes = dict(k=k, v=v)
    if inputs.bias is not None:  # a huge positive bias on a masked key must not matter either
        bias = inputs.bias.detach().clone()
        cols = dead if bias.shape[0] == spec.B else dead.all(0, keepdim=True)
        bias = torch.where(cols.to(bias.device)[:, None, None, :], torch.full_like(bias, big), bias)
        changes["bias"] = bias
    changed = with_tensors(inputs, **changes)

    base = run_impl(impl, spec, inputs, grad=grad)
    moved = run_impl(impl, spec, changed, grad=grad)
    errors, scales = references(spec, inputs, impl, grad=grad, rows=draw_rows(data, spec))
    for name in ["out", "lse"] + (["dq"] if grad else []):
        a, b = moved.get(name), base.get(name)
        if a is not None and name in errors:
            check_runs(measure, name, a, b, impl, errors[name], spec.dtype, scales[name], exact=exact_between(inputs, changed))
    if grad:
        for name in ("dk", "dv"):
            _exactly_zero(name, moved.grads[name][where.expand_as(moved.grads[name])], "masked keys")


@given(data=st.data())
@pinned(Pinned(Spec(Sq=6, Sk=6, key_lengths=(3,), window=(5, 5)), "NaN garbage in padded keys"))
def test_nan_in_masked_keys_is_ignored(impl, device, measure, data):
    """NaN in keys no query may see (never in values) leaves out and lse unchanged: masking
    selects invisible logits away, it does not add -inf to them."""
    spec = _masked_spec(data, impl, device)
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    dead = _dead_keys(spec, inputs)
    if not dead.any():
        return
    k = inputs.k.detach().clone()
    k[dead.to(k.device)[:, None, :, None].expand_as(k)] = float("nan")
    with torch.no_grad():
        base = run_impl(impl, spec, inputs)
        changed = with_tensors(inputs, k=k)
        moved = run_impl(impl, spec, changed)
    errors, scales = references(spec, inputs, impl, rows=draw_rows(data, spec))
    exact = exact_between(inputs, changed)
    check_runs(measure, "out", moved.out, base.out, impl, errors["out"], spec.dtype, scales["out"], exact=exact)
    if base.lse is not None and "lse" in errors:
        check_runs(measure, "lse", moved.lse, base.lse, impl, errors["lse"], spec.dtype, scales["lse"], exact=exact)


# -- empty rows ----------------------------------------------------------------------------
@given(data=st.data())
@pinned(
    Pinned(Spec(B=2, Sq=3, key_lengths=(0, 3)), "a batch element with zero keys"),
    Pinned(Spec(Sq=6, Sk=3, causal=True), "Sq > Sk bottom-right causal: leading rows are empty"),
    Pinned(Spec(Sq=4, Sk=5, window=(0, 0), key_lengths=(2,)), "window meets padding: rows with no key"),
)
def test_empty_rows_are_zero_without_nan(impl, device, measure, data):
    """A query with no visible key gets out = 0, lse = -inf, zero gradients, no NaN anywhere.
    (With a sink the lse of an empty row is the sink: test_score_features checks that.)"""
    spec = draw_spec(data, impl, device, forbid=("sinks",))
    if spec is None:
        return
    if "key_padding" in impl.features and not isinstance(data, Pinned):
        lengths = list(spec.key_lengths or (spec.Sk,) * spec.B)
        lengths[draw_int(data, 0, spec.B - 1, 0, label="empty batch")] = 0
        spec = spec.replace(key_lengths=tuple(lengths))
        if not impl.covers(spec):
            return
    grad = wants_grad(impl, spec)
    inputs = fresh_inputs(spec, impl, grad=grad)
    want = run_oracle(spec, inputs)
    empty = torch.isneginf(want.lse)  # (B, Hq, Sq): rows with no visible logit (bias -inf included)
    if not empty.any():
        return
    got = run_impl(impl, spec, inputs, grad=grad)
    _no_nan("out", got.out)
    rows_out = got.out[empty.to(got.out.device)]
    measure(0.0 if bool((rows_out == 0).all()) else float("inf"))
    if not bool((rows_out == 0).all()):
        raise AssertionError(f"out: empty rows must be exactly 0, got max |out| = {rows_out.abs().max().item():.3g}")
    if got.lse is not None and not bool(torch.isneginf(got.lse[empty.to(got.lse.device)]).all()):
        raise AssertionError(f"lse: empty rows must be -inf, got {got.lse[empty.to(got.lse.device)][:4].tolist()}")
    if grad:
        for name, g in got.grads.items():
            _no_nan(name, g)
        only_empty = with_tensors(inputs)
        only_empty.grad_out = torch.where(empty.to(inputs.grad_out.device)[..., None], inputs.grad_out,
                                          torch.zeros_like(inputs.grad_out))
        run = run_impl(impl, spec, only_empty, grad=True)
        for name, g in run.grads.items():
            _exactly_zero(name, g, "from empty rows")


def _no_nan(name: str, t: torch.Tensor) -> None:
    if bool(torch.isnan(t).any()):
        idx = tuple(int(i) for i in torch.isnan(t).nonzero()[0])
        raise AssertionError(f"{name}: NaN at {idx} ({int(torch.isnan(t).sum())} entries)")


# -- window edges --------------------------------------------------------------------------
@given(data=st.data())
@pinned(
    Pinned(Spec(Sq=9, window=(3, 2)), "sliding window (3, 2): 6 keys, edges included"),
    Pinned(Spec(Sq=5, Sk=12, window=(2, 0)), "window with bottom-right offset"),
    Pinned(Spec(Sq=10, block=Block(3, 1, 0)), "blocked window bucket edges"),
)
def test_window_edges(impl, device, measure, data):
    """The key just outside each edge of a query's visible range has no influence on it;
    the key on the edge has exactly the influence the oracle gives it."""
    windows = [f for f in ("sliding_window", "blocked_window") if f in impl.features]
    if not windows:
        pytest.skip(f"{impl.key} declares no window")
    use = (windows[draw_int(data, 0, len(windows) - 1, 0, label="window kind")],)
    spec = draw_spec(data, impl, device, use=use, magnitude=1.0, long="all")
    if spec is None:
        return
    inputs = fresh_inputs(spec)
    rows = sorted({0, spec.Sq - 1, draw_int(data, 0, spec.Sq - 1, spec.Sq // 2, label="row")})
    at = torch.tensor(rows)
    vis = oracle_visible(spec.B, spec.Sq, spec.Sk, causal=spec.causal, window=spec.window, block=spec.block,
                         align=spec.align, key_padding_mask=inputs.key_padding_mask, rows=at)
    errors, scales = references(spec, inputs, impl, rows=at if spec.Sq > ALL_ROWS else None)
    with torch.no_grad():
        base = run_impl(impl, spec, inputs)
        base_oracle = run_oracle_rows(spec, inputs, at)
    for n, i in enumerate(rows):
        keys = vis[0, n].nonzero().flatten().tolist()
        if not keys:
            continue
        first, last = keys[0], keys[-1]
        outside = [j for j in (first - 1, last + 1) if 0 <= j < spec.Sk]
        note_row = f"row {i} (position {position(spec, i)}): visible keys {first}..{last}"
        if outside:
            k, v = inputs.k.detach().clone(), inputs.v.detach().clone()
            big = big_values(spec.torch_dtype)
            k[0, :, outside] = big
            v[0, :, outside] = -big
            with torch.no_grad():
                changed = with_tensors(inputs, k=k, v=v)
                moved = run_impl(impl, spec, changed)
            try:
                check_runs(measure, "out", moved.out[0, :, i], base.out[0, :, i], impl, errors["out"], spec.dtype,
                           scales["out"], exact=exact_between(inputs, changed))
            except AssertionError as exc:
                raise AssertionError(f"{note_row}: keys {outside} just outside changed it: {exc}") from None
        v = inputs.v.detach().clone()
        v[0, :, [first, last]] += 4.0
        edged = with_tensors(inputs, v=v)
        with torch.no_grad():
            moved = run_impl(impl, spec, edged)
            moved_oracle = run_oracle_rows(spec, edged, at)
        got = moved.out[0, :, i].double() - base.out[0, :, i].double()
        want = moved_oracle.out[0, :, n] - base_oracle.out[0, :, n]
        try:
            check_runs(measure, "out", got, want, impl, errors["out"], spec.dtype, scales["out"] + 4.0, exact=False)
        except AssertionError as exc:
            raise AssertionError(f"{note_row}: the edge keys {first}, {last} do not act as the oracle says: {exc}") \
                from None


# -- window identities ---------------------------------------------------------------------
@given(data=st.data())
@pinned(Pinned(Spec(Sq=5, Sk=8), "window exactly covering the sequence"))
def test_wide_window_equals_full_attention(impl, device, measure, data):
    """A sliding window at least as wide as the sequence is full attention."""
    require(impl, "sliding_window")
    spec = draw_spec(data, impl, device, forbid=("sliding_window",))
    if spec is None:
        return
    off = position(spec, 0)
    need_left, need_right = max(off + spec.Sq - 1, 0), max(spec.Sk - 1 - off, 0)
    extra = st.sampled_from((0, 1, 1000))
    left = need_left + (0 if isinstance(data, Pinned) else data.draw(extra, label="left extra"))
    right = need_right + (0 if isinstance(data, Pinned) else data.draw(extra, label="right extra"))
    wide = spec.replace(window=(left, right))
    if not impl.covers(wide):
        return
    inputs = fresh_inputs(wide)
    with torch.no_grad():
        got = run_impl(impl, wide, inputs)
        ref = run_impl(reference_impl(impl), wide, inputs)
        want = run_oracle(spec, inputs)  # no window at all
    check(measure, "out", got.out, want.out, ref.out, spec.dtype, scales_of(spec, inputs))
    if got.lse is not None:
        check(measure, "lse", got.lse, want.lse, ref.lse, spec.dtype, scales_of(spec, inputs))


@given(data=st.data())
@pinned(Pinned(Spec(Sq=3, Sk=7), "window (None, 0) with Sq < Sk"))
def test_window_none_0_equals_causal(impl, device, measure, data):
    """window (None, 0) is causal attention (bottom-right or top-left alike)."""
    require(impl, "sliding_window", "causal")
    spec = draw_spec(data, impl, device, forbid=("sliding_window",), causal=False)
    if spec is None:
        return
    windowed = spec.replace(window=(None, 0))
    if not impl.covers(windowed):
        windowed = spec.replace(window=(spec.Sq + spec.Sk, 0))  # kernels that need a bounded edge
    causal = spec.replace(causal=True)
    if not (impl.covers(windowed) and impl.covers(causal)):
        return
    inputs = fresh_inputs(spec)
    with torch.no_grad():
        a = run_impl(impl, windowed, inputs)
        b = run_impl(impl, causal, inputs)
    errors, scales = references(causal, inputs, impl)
    check_runs(measure, "out", a.out, b.out, impl, errors["out"], spec.dtype, scales["out"], exact=False)
    if a.lse is not None and "lse" in errors:
        check_runs(measure, "lse", a.lse, b.lse, impl, errors["lse"], spec.dtype, scales["lse"], exact=False)


# -- padding -------------------------------------------------------------------------------
@given(data=st.data())
@pinned(Pinned(Spec(Sq=5, Sk=7, causal=True, window=(3, 0)), "padding must not shift bottom-right positions"))
def test_padding_appended_changes_nothing(impl, device, measure, data):
    """Appending P masked keys (and P queries, so positions keep their alignment) changes no
    real output and no real gradient; the padding's own gradients are exactly zero."""
    require(impl, "key_padding")
    spec = draw_spec(data, impl, device)
    if spec is None:
        return
    check_padding_appended(impl, spec, draw_int(data, 1, 17, 3, label="padding"), measure)


def check_padding_appended(impl, spec: Spec, P: int, measure=lambda ratio: None) -> None:
    """The body of test_padding_appended_changes_nothing for one spec and padding length P."""
    kpm_lengths = spec.key_lengths or (spec.Sk,) * spec.B
    padded = spec.replace(Sq=spec.Sq + P, Sk=spec.Sk + P, key_lengths=tuple(kpm_lengths))
    if not impl.covers(padded):
        return
    grad = wants_grad(impl, padded)
    inputs = fresh_inputs(spec, impl, grad=grad)

    def grow(t: torch.Tensor, dims: tuple[int, ...], salt: int, broadcast: bool = False) -> torch.Tensor:
        for d in dims:
            if broadcast and t.shape[d] == 1:
                continue
            shape = list(t.shape)
            shape[d] = P
            extra = noise(torch.empty(shape, dtype=t.dtype, device=t.device), spec, salt + d)
            t = torch.cat([t.detach(), extra], dim=d)
        return t

    kpm = inputs.key_padding_mask
    if kpm is None:
        kpm = torch.ones(spec.B, spec.Sk, dtype=torch.bool, device=inputs.q.device)
    big = with_tensors(inputs, q=grow(inputs.q, (2,), 10), k=grow(inputs.k, (2,), 20), v=grow(inputs.v, (2,), 30))
    big.key_padding_mask = torch.cat([kpm, torch.zeros(spec.B, P, dtype=torch.bool, device=kpm.device)], dim=1)
    if inputs.bias is not None:
        big.bias = grow(inputs.bias, (2, 3), 40, broadcast=True).detach().requires_grad_(inputs.bias.requires_grad)
    go = torch.zeros(spec.B, spec.Hq, spec.Sq + P, spec.Dv, dtype=inputs.grad_out.dtype, device=inputs.grad_out.device)
    go[:, :, : spec.Sq] = inputs.grad_out
    big.grad_out = go

    base = run_impl(impl, spec, inputs, grad=grad)
    grown = run_impl(impl, spec, big, grad=grad)
    errors, scales = references(spec, inputs, impl, grad=grad)
    S = spec.Sq
    check_runs(measure, "out", grown.out[:, :, :S], base.out, impl, errors["out"], spec.dtype, scales["out"],
               exact=False)
    if base.lse is not None and "lse" in errors:
        check_runs(measure, "lse", grown.lse[:, :, :S], base.lse, impl, errors["lse"], spec.dtype, scales["lse"],
                   exact=False)
    if grad:
        cuts = {"dq": grown.grads["dq"][:, :, :S], "dk": grown.grads["dk"][:, :, : spec.Sk],
                "dv": grown.grads["dv"][:, :, : spec.Sk]}
        for name, g in cuts.items():
            check_runs(measure, name, g, base.grads[name], impl, errors[name], spec.dtype, scales[name], exact=False)
        for name in ("dk", "dv"):
            _exactly_zero(name, grown.grads[name][:, :, spec.Sk :], "the appended padding keys")
