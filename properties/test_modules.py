"""Properties of attention modules (FlashAttentionTwo, MultiQueryAttention, LocalMHA,
MixtureOfAttention, MixtureOfAutoregressiveAttention), in three tiers, each usable alone:

- black-box: only the module's forward through the seed's signature. Batch independence,
  causality (the routing decisions included, seen through the outputs), masked tokens, padding,
  determinism, eval mode without dropout; the routed mixtures' null output as the outputs imply
  it, and their routing where the implementation declares a `route` hook. Any module whose
  adapter declares the variant runs these.
- decoding: for an implementation that declares a `decode` hook (a Decoder), decoding through
  the cache a prefix and then chunks equals the full causal pass.
- white-box: agreement with the float64 oracle and gradients. These read the parameters through
  the implementation's `weights` map onto the reference layout; without one they are skipped as
  unsupported, never failed.

The black-box invariances compare two runs of one module; the allowance is the tolerance rule's
with the reference implementation's own error on the same configuration and input
(modcases.noise), so no property of these two tiers touches the module's parameters.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, note
from hypothesis import strategies as st

from attnbench.oracles.routed import decision_margin, route_problem, scores64
from attnbench.properties import tolerance
from attnbench.properties.harness import check_runs, require
from attnbench.properties.modcases import (
    MAX_TOKENS,
    ModuleCase,
    build,
    forward,
    inputs,
    mapped_weights,
    module_cases,
    noise,
    oracle,
    reference,
    route,
)
from attnbench.registry import MODULE_VARIANTS

pytestmark = pytest.mark.variant(*MODULE_VARIANTS)
MIXTURES = ("MixtureOfAttention", "MixtureOfAutoregressiveAttention")
DROPOUT_ARG = {"MultiQueryAttention": "attn_pdrop", "LocalMHA": "dropout", "MixtureOfAttention": "dropout",
               "MixtureOfAutoregressiveAttention": "dropout"}


def draw_case(data, impl, device, **kwargs) -> ModuleCase:
    case = data.draw(module_cases(impl, device, **kwargs), label="case")
    note(f"case: {case.short()}")
    return case


class Allowance:
    """The black-box allowance (modcases.noise), computed on first use only: a comparison that
    must be bit-identical never pays for the reference and oracle runs behind it."""

    def __init__(self, case: ModuleCase, args: dict, out: torch.Tensor) -> None:
        self.case, self.args, self.out, self.value = case, args, out, None

    def __float__(self) -> float:
        if self.value is None:
            self.value = noise(self.case, self.args, self.out)
        return self.value


def _same(measure, impl, a, b, allowance, case: ModuleCase, what: str, exact: bool | None = None) -> None:
    """a equals b: bit for bit when `exact` (default: the impl declares "deterministic"), else
    within the tolerance rule with `allowance` (a float or an Allowance) as the reference error."""
    if exact is None:
        exact = "deterministic" in impl.features
    try:
        check_runs(measure, "out", a, b, impl, 0.0 if exact else float(allowance), case.dtype,
                   tolerance.magnitude(b.detach().double()), exact=exact)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def _crop(case: ModuleCase, args: dict, n: int) -> tuple[ModuleCase, dict]:
    """The case and inputs of the first n tokens of x alone (self-attention)."""
    short = case.replace(N=n, lengths=None if case.lengths is None else tuple(min(t, n) for t in case.lengths))
    sargs = {**args, "x": args["x"][:, :n]}
    if "mask" in args:
        sargs["mask"] = args["mask"][:, :n]
    if "bias" in args:
        sargs["bias"] = args["bias"][..., :n, :n] if args["bias"].shape[-2] > 1 else args["bias"][..., :n]
    return short, sargs


# == black-box tier ===========================================================================
@given(data=st.data())
def test_module_batch_elements_are_independent(impl, device, measure, data):
    """Batch element 0's output does not depend on the other batch element, and each element
    run alone (batch of 1) gives its output in the batch of 2."""
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
        alone = [forward(module, case.replace(B=1), {n: t[i : i + 1] if n in ("x", "context", "mask") or (
            n == "bias" and t.shape[0] == 2) else t for n, t in args.items()}) for i in range(2)]
    allowance = Allowance(case, args, a)
    _same(measure, impl, b[:1], a[:1], allowance, case, "batch element 0 after changing element 1")
    for i in range(2):
        _same(measure, impl, alone[i], a[i : i + 1], allowance, case, f"batch element {i} run alone", exact=False)


def _causal_case(data, impl, device) -> ModuleCase | None:
    if impl.variant == "MixtureOfAttention":
        pytest.skip("MixtureOfAttention is not causal")
    require(impl, "causal")
    case = draw_case(data, impl, device, use=("causal",), M=None)
    if case.ctor.get("causal") is False:
        return None
    return case if case.N >= 2 else None


@given(data=st.data())
def test_module_causal_future_has_no_influence(impl, device, measure, data):
    """Changing tokens t.. never changes outputs before t, the first t tokens run alone give the
    same outputs (so no decision, routing included, depends on later tokens or on the length),
    and gradients from outputs before t never reach tokens t..."""
    case = _causal_case(data, impl, device)
    if case is None:
        return
    cut = data.draw(st.integers(1, case.N - 1), label="cut")
    module = build(impl, case)
    args = inputs(case)
    x = args["x"].detach().clone()
    g = torch.Generator().manual_seed(case.seed + 7)
    x[:, cut:] = (3.0 * torch.randn(x[:, cut:].shape, generator=g, dtype=torch.float64)).to(x.dtype)
    short, sargs = _crop(case, args, cut)
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, case, {**args, "x": x})
        c = forward(module, short, sargs)
    allowance = Allowance(case, args, a)
    _same(measure, impl, b[:, :cut], a[:, :cut], allowance, case, f"outputs before token {cut}")
    _same(measure, impl, c, a[:, :cut], allowance, case, f"the first {cut} tokens run alone", exact=False)

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
    g = torch.Generator().manual_seed(case.seed + 9)
    t = torch.where(keep[..., None], t, (30.0 * torch.randn(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, case, {**args, source: t})
    rows = keep if source == "x" else torch.ones(case.B, case.N, dtype=torch.bool, device=keep.device)
    _same(measure, impl, b[rows], a[rows], Allowance(case, args, a), case, "kept tokens after changing masked ones")
    if impl.variant in MIXTURES and source == "x":
        masked = b[~keep]
        if masked.numel() and not bool((masked == 0).all()):
            raise AssertionError(f"masked tokens must output exactly 0, got max |out| {masked.abs().max().item():.3g}")


@given(data=st.data())
def test_module_padding_does_not_change_kept_outputs(impl, device, measure, data):
    """Appending masked-out key tokens (x, or the context) changes no output of the original tokens."""
    require(impl, "key_padding")
    case = draw_case(data, impl, device, bias=None)
    pad = data.draw(st.integers(1, 3), label="pad")
    module = build(impl, case)
    args = inputs(case)
    source = "context" if "context" in args else "x"
    if source == "context" and case.ctor.get("causal"):
        return  # causal cross-attention is bottom-right aligned: more keys move every query's window
    if case.variant == "MixtureOfAttention" and (case.N <= case.ctor["num_routed_queries"]
                                                  or case.keys <= case.ctor["num_routed_key_values"]):
        return  # SEMANTICS.md: a sequence no longer than k routes every token with weight 1, by its length
    t = args[source]
    g = torch.Generator().manual_seed(case.seed + 13)
    extra = (3.0 * torch.randn(t.shape[0], pad, t.shape[2], generator=g, dtype=torch.float64)).to(t)
    keep = args.get("mask", torch.ones(t.shape[:2], dtype=torch.bool, device=t.device))
    padded = {**args, source: torch.cat((t, extra), dim=1),
              "mask": torch.cat((keep, torch.zeros(t.shape[0], pad, dtype=torch.bool, device=t.device)), dim=1)}
    keys = case.keys + pad
    longer = case.replace(lengths=tuple(int(n) for n in keep.sum(-1)), **({"M": keys} if source == "context" else {"N": keys}))
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, longer, padded)[:, : case.N]
    rows = keep if source == "x" else torch.ones(case.B, case.N, dtype=torch.bool, device=keep.device)
    _same(measure, impl, b[rows], a[rows], Allowance(case, args, a), case,
          f"kept tokens after appending {pad} masked ones", exact=False)  # other shapes: other summation orders


@given(data=st.data())
def test_module_is_deterministic(impl, device, measure, data):
    """Two calls on the same input agree: bit for bit for an implementation that declares
    "deterministic", else within the tolerance rule."""
    case = draw_case(data, impl, device)
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        a = forward(module, case, args)
        b = forward(module, case, args)
    _same(measure, impl, b, a, Allowance(case, args, a), case, "a second call on the same input")


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
    _same(measure, impl, b, a, Allowance(case, args, a), case, f"eval mode with {arg}=0.5")


# -- routing, black-box ---------------------------------------------------------------------
def _shared_rows(out: torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """The largest number of bit-identical rows of a (n, dim) tensor, and that row."""
    if out.shape[0] == 0:
        return 0, None
    rows, counts = torch.unique(out.detach().cpu(), dim=0, return_counts=True)
    i = int(counts.argmax())
    return int(counts[i]), rows[i]


@pytest.mark.variant("MixtureOfAttention")
@given(data=st.data())
def test_moa_unrouted_tokens_share_one_output(impl, device, measure, data):
    """Without the local branch, at most num_experts * num_routed_queries kept tokens are
    routed; every other kept token outputs the null output, one vector whatever its input:
    so at least (kept - E k) kept tokens of an element share a bit-identical output, and it is
    the same vector in every batch element."""
    case = draw_case(data, impl, device, N=MAX_TOKENS[device.split(":")[0]])
    if case.ctor.get("local_attn"):
        return
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        out = forward(module, case, args)
    keep = args["mask"] if ("mask" in args and "context" not in args) else torch.ones(case.B, case.N, dtype=torch.bool)
    routed_max = case.ctor["num_experts"] * case.ctor["num_routed_queries"]
    nulls = []
    for b in range(case.B):
        kept = out[b][keep[b].to(out.device)]
        lonely = kept.shape[0] - routed_max
        if lonely <= 0:
            continue
        count, row = _shared_rows(kept)
        if count < lonely:
            raise AssertionError(f"batch {b}: {kept.shape[0]} kept tokens, at most {routed_max} routed, yet only "
                                 f"{count} share one output (at least {lonely} must: the null output)")
        nulls.append(row)
    if len(nulls) == 2 and not torch.equal(nulls[0], nulls[1]):
        raise AssertionError("the unrouted tokens' shared output differs between batch elements: it must not depend "
                             f"on the input (max difference {(nulls[0] - nulls[1]).abs().max().item():.3g})")
    measure(0.0)


def _atol(case: ModuleCase, scores: torch.Tensor) -> float:
    """Ties within the comparison tolerance may go either way: module scores are float32 (at
    least) products of the same rounded inputs, the check's are float64."""
    eps = 1e-12 if case.dtype == "float64" else 1e-5
    return eps * max(1.0, float(scores.abs().max())) if scores.numel() else 0.0


def _require_route(impl) -> None:
    if impl.route is None:
        pytest.skip(f"unsupported: {impl.key} declares no `route` hook (its routing is checked through its outputs)")


@pytest.mark.variant("MixtureOfAttention")
@given(data=st.data())
def test_moa_routing_is_a_valid_top_k(impl, device, measure, data):
    """Through the declared `route` hook: each expert routes min(k, unmasked) distinct unmasked
    queries and key/values; with the weights map too, none is left out that scores higher
    under float64 scores."""
    _require_route(impl)
    case = draw_case(data, impl, device)
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        r = route(impl, module, case, args)
    x = args["x"]
    ctx = args.get("context", x)
    qmask = args["mask"] if ("mask" in args and "context" not in args) else None
    kvmask = args.get("mask")
    E = case.ctor["num_experts"]
    shape = (case.B, E, case.N), (case.B, E, case.keys)
    sq = skv = None
    if impl.weights is not None:
        w = mapped_weights(impl, module)
        sq, skv = scores64(x, w["q_router"]), scores64(ctx, w["kv_router"])
    for b in range(case.B):
        for g in range(E):
            for what, s, index, valid, k, m, n in (
                ("queries", sq, r.q_index, r.q_valid, case.ctor["num_routed_queries"], qmask, shape[0][2]),
                ("key/values", skv, r.kv_index, r.kv_valid, case.ctor["num_routed_key_values"], kvmask, shape[1][2]),
            ):
                chosen = index[b, g][valid[b, g]]
                # without scores, all-equal ones: only the structure (count, range, mask, duplicates) is checked
                row = torch.zeros(n, dtype=torch.float64) if s is None else s[b, g]
                why = route_problem(row, chosen, k, None if m is None else m[b], _atol(case, row) if s is not None else 1.0)
                if why:
                    raise AssertionError(f"batch {b}, expert {g}, routed {what}: {why}")
    measure(0.0)


@pytest.mark.variant("MixtureOfAttention")
@given(data=st.data())
def test_moa_unrouted_tokens_get_the_null_output(impl, device, measure, data):
    """Through the declared `route` hook, without the local branch: every kept token no expert
    routed outputs one shared vector (null_routed_token where the weights map gives it), and a
    masked token outputs exactly 0."""
    _require_route(impl)
    case = draw_case(data, impl, device)
    if case.ctor.get("local_attn"):
        return
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        r = route(impl, module, case, args)
        out = forward(module, case, args)
    routed = torch.zeros(case.B, case.N, dtype=torch.bool, device=out.device)
    for b in range(case.B):
        routed[b, r.q_index[b][r.q_valid[b]].to(out.device)] = True
    keep = args["mask"] if ("mask" in args and "context" not in args) else torch.ones_like(routed)
    lonely = keep & ~routed
    if lonely.any():
        null = out[lonely][0]
        if impl.weights is not None:
            null = mapped_weights(impl, module)["null_routed_token"].detach().reshape(-1).to(out.dtype)
        if not bool((out[lonely] == null).all()):
            raise AssertionError(f"{int(lonely.sum())} unrouted tokens do not all output the null output")
    if (~keep).any() and not bool((out[~keep] == 0).all()):
        raise AssertionError("masked tokens must output exactly 0")
    measure(0.0)


# == decoding tier ============================================================================
@given(data=st.data())
def test_module_decoding_equals_the_full_causal_pass(impl, device, measure, data):
    """Through the declared `decode` hook: a prefix, then chunks of 1..3 tokens (at most the
    decoder's max_chunk), give the full causal forward's outputs."""
    decoder = impl.decode
    if decoder is None:
        pytest.skip(f"unsupported: {impl.key} declares no `decode` hook")
    require(impl, "causal")
    fixed: dict = {"bias": None, "M": None, "causal": True}
    if not decoder.mask:
        fixed["lengths"] = None
    case = draw_case(data, impl, device, use=("causal",), **fixed)
    if case.ctor.get("causal") is False:
        return
    module = build(impl, case)
    args = inputs(case)
    x, mask = args["x"], args.get("mask")
    prefix = data.draw(st.integers(0, case.N - 1), label="prefix")
    chunk = data.draw(st.integers(1, min(3, decoder.max_chunk or 3)), label="chunk")
    with torch.no_grad():
        full = forward(module, case, args)
        outs, cache, t = [], None, 0
        for hi in ([prefix] if prefix else []) + list(range(prefix + chunk, case.N + chunk, chunk)):
            hi = min(hi, case.N)
            kw = {} if mask is None else {"mask": mask[:, :hi]}
            out, cache = decoder.step(module, x[:, t:hi], cache, **kw)
            outs.append(out)
            t = hi
        decoded = torch.cat(outs, dim=1)
    _same(measure, impl, decoded, full, Allowance(case, args, full), case,
          f"decoded after a prefix of {prefix}, chunks of {chunk}", exact=False)


# == white-box tier ===========================================================================
def _routing_or_margin(impl, module, case: ModuleCase, args: dict):
    """The declared routing; without a route hook the oracle routes by itself, so the case must
    keep every decision clear of a tie (else it is not drawn)."""
    r = route(impl, module, case, args)
    if r is not None or case.variant not in MIXTURES:
        return r
    w = mapped_weights(impl, module)
    ctor = case.ctor
    window = None
    if case.variant == "MixtureOfAutoregressiveAttention":
        window = ctor.get("routed_window_size") or ctor["local_attn_window_size"]
    mask = args.get("mask") if "context" not in args else None
    margin = decision_margin(w["q_router"], w["kv_router"], args["x"], args.get("context"), mask,
                             args.get("mask") if "context" in args else None, ctor["num_routed_queries"],
                             ctor["num_routed_key_values"], window)
    eps = 1e-5 if case.dtype in ("float32", "float64") else 8 * tolerance.EPS[case.dtype]
    assume(margin > eps * max(1.0, float(args["x"].abs().max())))
    return None


@given(data=st.data())
def test_module_forward_matches_oracle(impl, device, measure, data):
    """The module's output against its float64 oracle on the module's own (mapped) weights
    (mixtures: given the declared routing, or one clear of ties)."""
    if impl.weights is None:
        pytest.skip(f"unsupported: {impl.key} declares no `weights` map onto the {impl.variant} reference layout")
    case = draw_case(data, impl, device)
    module = build(impl, case)
    args = inputs(case)
    with torch.no_grad():
        routing = _routing_or_margin(impl, module, case, args)
        got = forward(module, case, args)
        ref = reference(impl, module, case, args, routing)
        want = oracle(impl, module, case, args, routing)
    verdict = tolerance.compare("out", got, want, ref, case.dtype)
    measure(verdict.ratio)
    verdict.require()


@given(data=st.data())
def test_module_gradients_match_oracle(impl, device, measure, data):
    """Gradients with respect to the input and to every parameter of the module against the
    oracle's (through the weights map, so the oracle's gradient lands on the same parameters)."""
    if impl.weights is None:
        pytest.skip(f"unsupported: {impl.key} declares no `weights` map onto the {impl.variant} reference layout")
    require(impl, "backward")
    case = draw_case(data, impl, device)
    module = build(impl, case)
    args = inputs(case)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    with torch.no_grad():
        routing = _routing_or_margin(impl, module, case, args)

    def grads(x_dtype, run):
        x = args["x"].detach().to(x_dtype).requires_grad_(True)
        out = run({**args, "x": x})
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(case.seed + 3), dtype=torch.float64)
        params = dict(module.named_parameters())
        wrt = [x] + [params[n] for n in names]
        got = torch.autograd.grad(out, wrt, go.to(device=out.device, dtype=out.dtype), allow_unused=True)
        return [torch.zeros_like(w) if d is None else d for w, d in zip(wrt, got)]

    got = grads(case.torch_dtype, lambda a: forward(module, case, a))
    ref = grads(case.torch_dtype, lambda a: reference(impl, module, case, a, routing))
    want = grads(torch.float64, lambda a: oracle(impl, module, case, a, routing))
    # A weight's gradient sums one term per token (B x N rows) of either sign: its terms are about
    # sqrt(B x N) times the sum, and a valid order of operations rounds the terms (the error
    # model's scale; FlashAttentionTwo on blockwise with bucket size 1, float64, B=2 N=12: dw 72
    # eps off max |dw| < 1 while naive was exact, a false alarm at 64 eps of the sum alone)
    rows = math.sqrt(case.B * case.N)
    for i, (a, r, w) in enumerate(zip(got, ref, want)):
        label = "x" if i == 0 else names[i - 1]
        scale = None if i == 0 else rows * tolerance.magnitude(w)
        verdict = tolerance.compare("dx" if i == 0 else "dw", a, w, r, case.dtype, scale)
        measure(verdict.ratio)
        if not verdict.ok:
            raise AssertionError(f"gradient with respect to {label}: {verdict.message()}")
