"""Properties of the seed modules (FlashAttentionTwo, MultiQueryAttention, LocalMHA,
MixtureOfAttention, MixtureOfAutoregressiveAttention) against their float64 module oracles.

The routed mixtures are checked in two parts, as oracles/CONTRACT.md says: the routing decision on
its own (a valid top-k set under float64 scores), then the attention given that routing.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note
from hypothesis import strategies as st

from attnbench.oracles.routed import route_problem, scores64
from attnbench.properties import tolerance
from attnbench.properties.harness import check_runs, require
from attnbench.properties.modcases import (
    ModuleCase,
    build,
    forward,
    inputs,
    module_cases,
    oracle,
    reference_module,
    route,
)

pytestmark = pytest.mark.variant(
    "FlashAttentionTwo", "MultiQueryAttention", "LocalMHA", "MixtureOfAttention", "MixtureOfAutoregressiveAttention"
)
MIXTURES = ("MixtureOfAttention", "MixtureOfAutoregressiveAttention")
DROPOUT_ARG = {"MultiQueryAttention": "attn_pdrop", "LocalMHA": "dropout", "MixtureOfAttention": "dropout",
               "MixtureOfAutoregressiveAttention": "dropout"}


def draw_case(data, impl, device, **kwargs) -> ModuleCase:
    case = data.draw(module_cases(impl, device, **kwargs), label="case")
    note(f"case: {case.short()}")
    return case


def _agree(measure, quantity: str, got, want, ref, dtype: str) -> None:
    verdict = tolerance.compare(quantity, got, want, ref, dtype)
    measure(verdict.ratio)
    verdict.require()


def _reference_error(impl, case, module, args, routing) -> float:
    ref = forward(reference_module(impl, case, module), case, args, routing)
    error, why = tolerance.max_error(ref, oracle(module, case, args, routing))
    if why:
        raise AssertionError(f"out: the reference implementation itself fails here ({why})")
    return error


def _same(measure, impl, a, b, ref_error: float, case: ModuleCase, what: str, exact: bool | None = None) -> None:
    try:
        check_runs(measure, "out", a, b, impl, ref_error, case.dtype, tolerance.magnitude(b.detach().double()),
                   exact=exact)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


# -- agreement -----------------------------------------------------------------------------
@given(data=st.data())
def test_module_forward_matches_oracle(impl, device, measure, data):
    """The module's output against its float64 oracle (mixtures: given the module's routing)."""
    case = draw_case(data, impl, device)
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        routing = route(module, case, args)
        got = forward(module, case, args)
        ref = forward(reference_module(impl, case, module), case, args, routing)
        want = oracle(module, case, args, routing)
    _agree(measure, "out", got, want, ref, case.dtype)


@given(data=st.data())
def test_module_gradients_match_oracle(impl, device, measure, data):
    """Gradients with respect to the input and to every parameter against the oracle's."""
    require(impl, "backward")
    case = draw_case(data, impl, device)
    module = build(impl, case)
    ref_module = reference_module(impl, case, module)
    args = inputs(case)
    names = [n for n, p in module.named_parameters() if p.requires_grad]

    def grads(mod, x_dtype, routing=None, run=forward):
        x = args["x"].detach().to(x_dtype).requires_grad_(True)
        out = run(mod, case, {**args, "x": x}, routing)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 3), dtype=torch.float64)
        params = dict(mod.named_parameters())
        wrt = [x] + [params[n] for n in names]
        got = torch.autograd.grad(out, wrt, go.to(device=out.device, dtype=out.dtype), allow_unused=True)
        return [torch.zeros_like(w) if d is None else d for w, d in zip(wrt, got)]

    routing = route(module, case, args)
    got = grads(module, case.torch_dtype)
    ref = grads(ref_module, case.torch_dtype, routing)
    want = grads(module, torch.float64, routing, run=oracle)
    for i, (a, r, w) in enumerate(zip(got, ref, want)):
        label = "x" if i == 0 else names[i - 1]
        try:
            _agree(measure, "dx" if i == 0 else "dw", a, w, r, case.dtype)
        except AssertionError as exc:
            raise AssertionError(f"gradient with respect to {label}: {exc}") from None


# -- causality -----------------------------------------------------------------------------
def _causal_case(data, impl, device) -> ModuleCase | None:
    if impl.variant == "MixtureOfAttention":
        pytest.skip("MixtureOfAttention is not causal")
    require(impl, "causal")
    fixed = {"M": None} if impl.variant in ("FlashAttentionTwo",) else {}
    case = draw_case(data, impl, device, use=("causal",), **fixed)
    if case.variant == "FlashAttentionTwo" and not case.ctor["causal"]:
        return None
    if case.variant == "LocalMHA" and not case.ctor["causal"]:
        return None
    return case if case.N >= 2 else None


@given(data=st.data())
def test_module_causal_future_has_no_influence(impl, device, measure, data):
    """Changing tokens t.. never changes outputs before t (the mixtures' routing included),
    and gradients from those outputs never reach tokens t..."""
    case = _causal_case(data, impl, device)
    if case is None:
        return
    cut = data.draw(st.integers(1, case.N - 1), label="cut")
    module = build(impl, case)
    args = inputs(case)
    x = args["x"].detach().clone()
    noise = torch.randn(x[:, cut:].shape, generator=torch.Generator().manual_seed(case.seed + 7), dtype=torch.float64)
    x[:, cut:] = (3.0 * noise).to(x.dtype)
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, case, {**args, "x": x})
        ref_error = _reference_error(impl, case, module, args, route(module, case, args))
    _same(measure, impl, b[:, :cut], a[:, :cut], ref_error, case, f"outputs before token {cut}")

    if impl.variant == "MixtureOfAutoregressiveAttention":  # decisions never depend on the length
        short = case.replace(N=cut, lengths=None if case.lengths is None else tuple(min(n, cut) for n in case.lengths))
        sargs = {**args, "x": args["x"][:, :cut]}
        if "mask" in args:
            sargs["mask"] = args["mask"][:, :cut]
        with torch.no_grad():
            c = forward(module, short, sargs)
        _same(measure, impl, c, a[:, :cut], ref_error, case, f"the first {cut} tokens run alone", exact=False)

    if "backward" in impl.features:
        xg = args["x"].detach().clone().requires_grad_(True)
        out = forward(module, case, {**args, "x": xg})
        go = torch.zeros_like(out)
        go[:, :cut] = 1.0
        (dx,) = torch.autograd.grad(out, [xg], go)
        if bool(dx.isnan().any()):
            raise AssertionError(f"dx: NaN in the gradient of outputs before token {cut} (at tokens "
                                 f"{sorted(set(dx.isnan().any(-1).nonzero()[:, 1].tolist()))})")
        leak = dx[:, cut:]
        if not bool((leak == 0).all()):
            raise AssertionError(f"dx: outputs before token {cut} have a gradient on tokens >= {cut} "
                                 f"(max {leak.abs().max().item():.3g}); must be exactly 0")


# -- masking -------------------------------------------------------------------------------
@given(data=st.data())
def test_module_masked_tokens_have_no_influence(impl, device, measure, data):
    """Tokens masked out as keys do not change any kept token's output (the mixtures also
    output exactly 0 on masked tokens)."""
    require(impl, "key_padding")
    case = draw_case(data, impl, device, use=("key_padding",))
    module = build(impl, case)
    args = inputs(case)
    source = "context" if "context" in args else "x"
    keep = args["mask"]
    t = args[source].detach().clone()
    noise = torch.randn(t.shape, generator=torch.Generator().manual_seed(case.seed + 9), dtype=torch.float64)
    t = torch.where(keep[..., None], t, (30.0 * noise).to(device=t.device, dtype=t.dtype))
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, case, {**args, source: t})
        ref_error = _reference_error(impl, case, module, args, route(module, case, args))
    rows = keep if source == "x" else torch.ones(case.B, case.N, dtype=torch.bool, device=keep.device)
    _same(measure, impl, b[rows], a[rows], ref_error, case, "kept tokens after changing masked ones")
    if impl.variant in MIXTURES and source == "x":
        masked = b[~keep]
        if masked.numel() and not bool((masked == 0).all()):
            raise AssertionError(f"masked tokens must output exactly 0, got max |out| {masked.abs().max().item():.3g}")


@given(data=st.data())
def test_module_batch_elements_are_independent(impl, device, measure, data):
    """Batch element 0's output does not depend on the other batch elements."""
    case = draw_case(data, impl, device, B=2)
    if case.lengths is not None and len(case.lengths) != 2:
        case = case.replace(lengths=(case.lengths + case.lengths)[:2])
    module = build(impl, case)
    args = inputs(case)
    other = dict(args)
    g = torch.Generator().manual_seed(case.seed + 11)
    for name in ("x", "context", "bias"):
        if name in args and args[name].shape[0] == 2:
            t = args[name].detach().clone()
            t[1] = (3.0 * torch.randn(t[1].shape, generator=g, dtype=torch.float64)).to(t.dtype)
            other[name] = t
    if "mask" in args:
        m = args["mask"].clone()
        m[1] = ~m[1]
        other["mask"] = m
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, case, other)
        ref_error = _reference_error(impl, case, module, args, route(module, case, args))
    _same(measure, impl, b[:1], a[:1], ref_error, case, "batch element 0 after changing element 1")


# -- KV cache ------------------------------------------------------------------------------
@pytest.mark.variant("MultiQueryAttention")
@given(data=st.data())
def test_mqa_kv_cache_decoding_equals_full_causal(impl, device, measure, data):
    """Decoding with a KV cache (a prefix, then chunks of 1..3 tokens) gives the full causal
    forward's outputs, and the final cache equals the full pass's keys and values."""
    require(impl, "causal", "cross")
    case = draw_case(data, impl, device, causal=True)
    module = build(impl, case)
    args = inputs(case)
    x, mask, bias = args["x"], args.get("mask"), args.get("bias")
    prefix = data.draw(st.integers(0, case.N - 1), label="prefix")
    chunk = data.draw(st.integers(1, 3), label="chunk")

    def step(lo: int, hi: int, past):
        kw = {"past_key_value": past}
        if mask is not None:
            kw["mask"] = mask[:, :hi]
        if bias is not None:
            kw["bias"] = bias[:, :, lo:hi, :hi]
        return module(x[:, lo:hi], causal=True, **kw)

    with torch.no_grad():
        full, _, (fk, fv) = module(x, bias=bias, mask=mask, causal=True)
        outs, past, t = [], None, 0
        if prefix:
            out, _, past = step(0, prefix, None)
            outs.append(out)
            t = prefix
        while t < case.N:
            out, _, past = step(t, min(t + chunk, case.N), past)
            outs.append(out)
            t = min(t + chunk, case.N)
        decoded = torch.cat(outs, dim=1)
        ref_error = _reference_error(impl, case, module, args, None)
    _same(measure, impl, decoded, full, ref_error, case, f"decoded after a prefix of {prefix}, chunks of {chunk}",
          exact=False)
    for name, got, want in (("k cache", past[0], fk), ("v cache", past[1], fv)):
        scale = tolerance.magnitude(want.double())
        verdict = tolerance.compare_runs("out", got, want, 0.0, case.dtype, scale)
        measure(verdict.ratio)
        if not verdict.ok:
            raise AssertionError(f"{name}: {verdict.message()}")


# -- routing -------------------------------------------------------------------------------
def _atol(case: ModuleCase, scores: torch.Tensor) -> float:
    """Ties within the comparison tolerance may go either way: module scores are float32 (at
    least) products of the same rounded inputs, the check's are float64."""
    eps = 1e-12 if case.dtype == "float64" else 1e-5
    return eps * max(1.0, float(scores.abs().max())) if scores.numel() else 0.0


@pytest.mark.variant("MixtureOfAttention")
@given(data=st.data())
def test_moa_routing_is_a_valid_top_k(impl, device, measure, data):
    """Each expert routes a top-k set of queries and of key/values under float64 scores:
    min(k, unmasked) distinct unmasked tokens, none left out that scores higher."""
    case = draw_case(data, impl, device)
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        r = route(module, case, args)
    x = args["x"]
    ctx = args.get("context", x)
    qmask = args["mask"] if ("mask" in args and "context" not in args) else None
    kvmask = args.get("mask")
    sq, skv = scores64(x, module.q_router), scores64(ctx, module.kv_router)
    for b in range(case.B):
        for g in range(module.num_experts):
            for what, s, index, valid, k, m in (
                ("queries", sq, r.q_index, r.q_valid, module.num_routed_queries, qmask),
                ("key/values", skv, r.kv_index, r.kv_valid, module.num_routed_key_values, kvmask),
            ):
                chosen = index[b, g][valid[b, g]]
                why = route_problem(s[b, g], chosen, k, None if m is None else m[b], _atol(case, s[b, g]))
                if why:
                    raise AssertionError(f"batch {b}, expert {g}, routed {what}: {why}")
    measure(0.0)


@pytest.mark.variant("MixtureOfAttention")
@given(data=st.data())
def test_moa_unrouted_tokens_get_the_null_token(impl, device, measure, data):
    """Without the local branch, a kept token no expert routed outputs null_routed_token
    exactly, and a masked token outputs exactly 0."""
    case = draw_case(data, impl, device)
    if dict(case.kwargs).get("local_attn"):
        return
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        r = route(module, case, args)
        out = forward(module, case, args)
    routed = torch.zeros(case.B, case.N, dtype=torch.bool, device=out.device)
    for b in range(case.B):
        routed[b, r.q_index[b][r.q_valid[b]]] = True
    keep = args["mask"] if ("mask" in args and "context" not in args) else torch.ones_like(routed)
    null = module.null_routed_token.detach().to(out.dtype)
    lonely = keep & ~routed
    if lonely.any() and not bool((out[lonely] == null).all()):
        raise AssertionError(f"{int(lonely.sum())} unrouted tokens do not output null_routed_token")
    if (~keep).any() and not bool((out[~keep] == 0).all()):
        raise AssertionError("masked tokens must output exactly 0")
    measure(0.0)


# -- dropout -------------------------------------------------------------------------------
@given(data=st.data())
def test_module_eval_mode_ignores_dropout(impl, device, measure, data):
    """In eval mode a module built with dropout > 0 equals one without: bit-identical for an
    implementation that declares "deterministic"."""
    require(impl, "dropout")
    arg = DROPOUT_ARG.get(impl.variant)
    if arg is None:
        pytest.skip(f"{impl.variant} takes no dropout argument")
    case = draw_case(data, impl, device)
    plain = build(impl, case)
    dropped = build(impl, case.replace(kwargs=tuple(sorted({**case.ctor, arg: 0.5}.items()))), like=plain)
    args = inputs(case)
    with torch.no_grad():
        a = forward(plain, case, args)
        b = forward(dropped, case, args)
    _same(measure, impl, b, a, 0.0, case, f"eval mode with {arg}=0.5")
