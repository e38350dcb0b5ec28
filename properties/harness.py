"""Running an implementation, the oracle and the reference on one spec, and judging them.

Properties use these few helpers so that every check goes through the one tolerance rule
(properties/tolerance.py) and reports its ratio through the plugin's `measure` fixture.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from attnbench.checks import ContractError, check_result, check_varlen_result, dtype_name
from attnbench.oracles import dense as oracle_dense
from attnbench.oracles import sequences as oracle_sequences
from attnbench.packing import PagedInputs, PagedSpec, VarlenInputs, VarlenSpec
from attnbench.properties import tolerance
from attnbench.properties.strategies import draw_int
from attnbench.registry import Impl, registry
from attnbench.spec import Config, Inputs, Spec

GRAD_NAMES = ("q", "k", "v", "bias", "sinks")


@dataclass
class Run:
    out: torch.Tensor
    lse: torch.Tensor | None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # "dq", "dk", "dv", "dbias", "dsinks"

    def get(self, quantity: str) -> torch.Tensor | None:
        """"out", "lse" or a gradient name."""
        return self.out if quantity == "out" else self.lse if quantity == "lse" else self.grads[quantity]


def quantities(run: Run, errors: dict[str, float], grad: bool) -> list[str]:
    """What two runs of one implementation are compared on: out, lse where the run returns it
    and the reference has it, and dq, dk, dv with gradients."""
    lse = ["lse"] if run.lse is not None and "lse" in errors else []
    return ["out", *lse, *(["dq", "dk", "dv"] if grad else [])]


def require(impl: Impl, *features: str) -> None:
    """Skip the test for an implementation that does not declare these features, or whose
    hardware here lacks one (Impl.absent)."""
    missing = [f for f in features if f not in impl.features]
    if missing:
        pytest.skip(f"{impl.key} does not declare {', '.join(missing)}")
    if why := impl.lacks_here(features):
        pytest.skip(f"{impl.key} on this machine: {why}")


def wants_grad(impl: Impl, *specs: Spec) -> bool:
    """Whether a property checks gradients on these specs: the implementation declares a backward
    and covers the backward of every one (a spec drawn for the forward may lie outside it)."""
    return "backward" in impl.features and all(impl.covers(s, ("backward",)) for s in specs)


def reference_impl(impl: Impl) -> Impl:
    return registry().reference(impl.variant)


def fresh_inputs(spec: Spec, impl: Impl | None = None, grad: bool = False) -> Inputs:
    """The spec's inputs; with grad, q, k, v (and the bias where the impl claims its gradient)
    require grad."""
    inputs = spec.make_inputs(requires_grad=grad)
    if inputs.bias is not None and grad and (impl is None or "bias_grad" not in impl.features):
        inputs.bias.requires_grad_(False)
    return inputs


def same_layout_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides (zero strides kept as an expand), so a second run sees the
    layout the first one saw: kernels take other code paths for other layouts."""
    t = t.detach()
    if any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)):
        one = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(t.stride(), t.shape))
        return same_layout_copy(t[one]).expand(t.shape)
    out = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def clone_inputs(inputs: Inputs) -> Inputs:
    def c(t):
        return None if t is None else same_layout_copy(t).requires_grad_(t.requires_grad)

    return Inputs(
        q=c(inputs.q), k=c(inputs.k), v=c(inputs.v),
        key_padding_mask=None if inputs.key_padding_mask is None else inputs.key_padding_mask.clone(),
        bias=c(inputs.bias), grad_out=same_layout_copy(inputs.grad_out),
        document_ids=None if inputs.document_ids is None else tuple(d.clone() for d in inputs.document_ids),
        alibi_slopes=None if inputs.alibi_slopes is None else inputs.alibi_slopes.clone(), sinks=c(inputs.sinks),
        **{name: t.clone() for name, t in inputs.descales().items()},
    )


INPUT_NAMES = ("q", "k", "v", "bias", "key_padding_mask", "grad_out", "alibi_slopes", "sinks", "q_descale", "k_descale",
               "v_descale")
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """t's raw bits as integers, so equal means bit-identical (NaN included)."""
    return t if t.dtype == torch.bool else t.view(_BITS[t.element_size()])


def snapshot(tensors: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
    """Copies of the tensors an implementation must not change (one device copy each, no sync)."""
    return {n: t.detach().clone() for n, t in tensors.items() if t is not None}


def _changed(tensors: dict[str, torch.Tensor | None], before: dict[str, torch.Tensor]) -> list[tuple[str, object]]:
    """Per snapshot, a flag "changed since": a bool on the CPU (torch.equal), a device tensor
    elsewhere (no sync here; _raise_flagged reads all flags at once)."""
    flags = []
    for n, copy in before.items():
        t = tensors[n]
        what = f"mutated its input {n} in place"
        if t is None or t.shape != copy.shape or t.dtype != copy.dtype:
            flags.append((what, True))
        elif t.device.type == "cpu":
            flags.append((what, not torch.equal(_bits(t.detach()), _bits(copy))))
        else:
            flags.append((what, (_bits(t.detach()) != _bits(copy)).any()))
    return flags


def _sums(results: dict[str, torch.Tensor | None]) -> list[tuple[str, object]]:
    """One float64 sum per result: NaN or +inf in it means a NaN or an infinity somewhere (exact
    up to float64 overflow, which _non_finite re-checks), -inf only from -inf entries."""
    return [(n, t.detach().sum(dtype=torch.float64)) for n, t in results.items() if t is not None]


def _inputs_finite(inputs: Inputs) -> bool:
    """q, k, v finite and the bias free of NaN / +inf (a -inf bias is a masked key): then the
    oracle is finite everywhere but lse's empty rows, so the run must be too."""
    ok = all(bool(torch.isfinite(_finite_view(t.detach())).all()) for t in (inputs.q, inputs.k, inputs.v))
    if ok and inputs.bias is not None:
        b = inputs.bias.detach()
        ok = not bool((b.isnan() | (b == float("inf"))).any())
    for t in (inputs.alibi_slopes, inputs.sinks):
        ok = ok and (t is None or bool(torch.isfinite(t.detach()).all()))
    return ok


def _finite_view(t: torch.Tensor) -> torch.Tensor:
    """t, or t in float32 for float8 (isfinite has no float8 kernel; the values are the same)."""
    return t.float() if t.element_size() == 1 else t


def _non_finite(who: str, name: str, t: torch.Tensor) -> str | None:
    """Where `t` is not finite (lse: NaN or +inf), as a contract message; None if it is."""
    t = t.detach().cpu()
    bad = (t.isnan() | (t == float("inf"))) if name == "lse" else ~torch.isfinite(t)
    idx = bad.nonzero()
    if not len(idx):
        return None
    what = "NaN" if t.isnan().any() else "inf"
    return (f"contract: {who} returned {what} in {name} at index {tuple(int(i) for i in idx[0])} ({len(idx)} of "
            f"{t.numel()} entries) where the oracle is finite (all inputs finite)")


def _raise_flagged(who: str, flags: list[tuple[str, object]], inputs: Inputs | None = None,
                   results: dict[str, torch.Tensor | None] | None = None) -> None:
    """Read every flag and sum in one device-to-host transfer; raise ContractError naming the
    first broken clause: a mutated input, or a non-finite result while every input is finite."""
    sums = _sums(results or {})
    on_device = [f for _, f in flags + sums if isinstance(f, torch.Tensor) and f.device.type != "cpu"]
    if on_device:
        dev = on_device[0].device
        values = torch.stack([torch.as_tensor(f, dtype=torch.float64).reshape(()).to(dev)
                              for _, f in flags + sums]).tolist()
    else:  # on the CPU reading a scalar costs no synchronization
        values = [float(f) for _, f in flags + sums]
    for (what, _), hit in zip(flags, values):
        if hit:
            raise ContractError(f"contract: {who} {what}")
    suspect = [n for (n, _), total in zip(sums, values[len(flags):])
               if math.isnan(total) or total == math.inf or (n != "lse" and total == -math.inf)]
    if suspect and _inputs_finite(inputs):
        for n in suspect:
            why = _non_finite(who, n, results[n])
            if why:
                raise ContractError(why)


def call(fn: Callable, inputs: Inputs, cfg: Config, grad: bool = False, who: str | None = None) -> Run:
    """Run a kernel fn; with grad, backpropagate inputs.grad_out and collect the gradients.

    With `who` (the implementation's name) the call contract is checked around it, forward and
    backward: result types, dtypes, shapes and devices (check_result), every input (q, k, v,
    bias, key_padding_mask, grad_out, alibi_slopes, sinks) bit-identical afterwards, and out, lse and the gradients
    finite wherever the oracle is (all inputs finite). A broken clause raises ContractError
    naming it. The flags of each pass come back in one device-to-host transfer.
    """
    leaves = {n: getattr(inputs, n) for n in GRAD_NAMES}
    leaves = {n: t for n, t in leaves.items() if t is not None and t.requires_grad}
    for t in leaves.values():
        t.grad = None
    given = {n: getattr(inputs, n) for n in INPUT_NAMES}
    docs = {}  # document_ids is passed only when the spec has documents (Spec.documents)
    if inputs.document_ids is not None:
        docs = {"document_ids": inputs.document_ids}
        given.update(doc_q=inputs.document_ids[0], doc_k=inputs.document_ids[1])
    before = snapshot(given) if who else {}
    with torch.set_grad_enabled(grad):
        result = fn(inputs.q, inputs.k, inputs.v, cfg, key_padding_mask=inputs.key_padding_mask, bias=inputs.bias,
                    **docs, **inputs.score_kwargs())
    if who:
        out, lse = check_result(who, result, inputs.q, inputs.v)
        _raise_flagged(who, _changed(given, before), inputs, {"out": out, "lse": lse})
    out, lse = _pair(result, "kernel")
    run = Run(out=out.detach(), lse=None if lse is None else lse.detach())
    if grad:
        _backward(run, out, inputs.grad_out, leaves, who, given, before, inputs)
    return run


def _pair(result, what: str) -> tuple:
    """(out, lse_or_None) from a call whose result the contract check did not already read."""
    if not (isinstance(result, tuple) and len(result) == 2):
        raise TypeError(f"{what} result: expected (out, lse_or_None), got {type(result).__name__}")
    return result


def _backward(run: Run, out: torch.Tensor, grad_out: torch.Tensor, leaves: dict[str, torch.Tensor], who: str | None,
              given: dict, before: dict, finite) -> None:
    """Backpropagate grad_out from out into the leaves, their gradients into run.grads (zeros where
    none flowed); with `who`, the contract check of the backward (inputs unchanged, finite grads)."""
    if not out.requires_grad:
        if out.numel() == 0:  # an empty output (no query at all) carries no gradient: every one is zero
            run.grads.update({"d" + n: torch.zeros_like(t) for n, t in leaves.items()})
            return
        raise AssertionError("out does not require grad: the implementation is not differentiable here")
    out.backward(grad_out.to(out.dtype))
    for n, t in leaves.items():
        run.grads["d" + n] = torch.zeros_like(t) if t.grad is None else t.grad.detach().clone()
    if who:
        _raise_flagged(who, _changed(given, before), finite, run.grads)


def run_impl(impl: Impl, spec: Spec, inputs: Inputs, grad: bool = False, cfg: Config | None = None) -> Run:
    return call(impl.fn, inputs, cfg or spec.config(), grad=grad, who=impl.key)


def module_call(who: str, run: Callable[[], torch.Tensor], tensors: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """A module variant's forward `run()` under its contract: the output is a tensor of x's
    shape, dtype and device, and no input tensor (x, context, mask, bias) changes."""
    x = tensors["x"]
    before = snapshot(tensors)
    out = run()
    if not isinstance(out, torch.Tensor):
        raise ContractError(f"contract: {who} returned {type(out).__name__}, expected a tensor")
    if out.dtype != x.dtype:
        raise ContractError(f"contract: {who} returned {dtype_name(out.dtype)} output for {dtype_name(x.dtype)} input x")
    if out.shape != x.shape:
        raise ContractError(f"contract: {who} returned output of shape {tuple(out.shape)} for x of shape {tuple(x.shape)}")
    if out.device != x.device:
        raise ContractError(f"contract: {who} returned output on {out.device} for x on {x.device}")
    _raise_flagged(who, _changed(tensors, before))
    return out


def run_oracle(spec: Spec, inputs: Inputs, grad: bool = False, cfg: Config | None = None) -> Run:
    """The float64 oracle on the same (rounded) inputs, on the same device."""
    def up(t):
        if t is None:
            return None
        if t.dtype == torch.float8_e4m3fn:  # the oracle dequantizes fp8 inputs itself, with their descales
            return t.detach()
        return t.detach().to(torch.float64).requires_grad_(grad and t.requires_grad)

    f64 = Inputs(
        q=up(inputs.q), k=up(inputs.k), v=up(inputs.v), key_padding_mask=inputs.key_padding_mask,
        bias=up(inputs.bias), grad_out=inputs.grad_out.detach().to(torch.float64), document_ids=inputs.document_ids,
        alibi_slopes=inputs.alibi_slopes, sinks=up(inputs.sinks), **inputs.descales(),
    )
    return call(oracle_dense.attention, f64, cfg or spec.config(), grad=grad)


def check(measure, quantity: str, actual: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor,
          dtype: str, scales: dict[str, float] | None = None) -> float:
    """The tolerance rule for one quantity: record the ratio, fail with the numbers."""
    scale = (scales or {}).get(quantity)
    verdict = tolerance.compare(quantity, actual, oracle, reference, dtype, scale)
    measure(verdict.ratio)
    return verdict.require()


def verdicts(impl: Impl, spec: Spec, grad: bool = False, fn: Callable | None = None) -> dict[str, tolerance.Verdict]:
    """One spec against the float64 oracle under the tolerance rule, quantity by quantity (out,
    lse where returned, dq/dk/dv with grad), without raising: for diagnostics and canaries.
    `fn` replaces impl.fn (a kernel called past its adapter's declarations)."""
    inputs = fresh_inputs(spec, impl, grad=grad)
    got = call(fn or impl.fn, inputs, spec.config(), grad=grad)
    want = run_oracle(spec, inputs, grad=grad)
    reference = reference_impl(impl)
    ref = run_impl(reference, spec, fresh_inputs(spec, reference, grad=grad), grad=grad)
    scales = scales_of(spec, inputs)
    names = ["out"] + (["lse"] if got.lse is not None and ref.lse is not None else []) + sorted(got.grads)
    return {n: tolerance.compare(n, got.get(n), want.get(n), ref.get(n), rule_dtype(spec), scales.get(n))
            for n in names}


def check_runs(measure, quantity: str, actual: torch.Tensor, expected: torch.Tensor, impl: Impl,
               reference_error: float, dtype: str, scale: float = 1.0, exact: bool | None = None) -> float:
    """Two runs that must agree: bit for bit when `exact` (default: the impl declares
    "deterministic"), else within twice the tolerance rule's allowance."""
    if exact is None:
        exact = "deterministic" in impl.features
    if exact:
        a, e = actual.detach().cpu(), expected.detach().cpu()
        same = a.shape == e.shape and torch.equal(torch.nan_to_num(a, nan=0.5), torch.nan_to_num(e, nan=0.5))
        same = same and bool((a.isnan() == e.isnan()).all()) and not bool(a.isnan().any())
        measure(0.0 if same else float("inf"))
        if not same:
            error, why = tolerance.max_error(a, e)
            raise AssertionError(f"{quantity}: not bit-identical (max difference {error:.3g}{'; ' + why if why else ''})")
        return 0.0
    verdict = tolerance.compare_runs(quantity, actual, expected, reference_error, dtype, scale)
    measure(verdict.ratio)
    return verdict.require()


def reference_error(quantity: str, spec: Spec, ref: Run, oracle: Run) -> tuple[float, float]:
    """The reference's own error on `quantity` and the oracle's magnitude, for check_runs."""
    actual, expected = ref.get(quantity), oracle.get(quantity)
    error, why = tolerance.max_error(actual, expected)
    if why:
        raise AssertionError(f"{quantity}: the reference implementation itself fails here ({why})")
    return error, tolerance.magnitude(expected)


def rule_dtype(spec: Spec) -> str:
    """The dtype the tolerance rule judges a spec in: its own, tolerance.FP8 for an fp8 spec."""
    return tolerance.FP8 if spec.fp8 else spec.dtype


def scales_of(spec: Spec, inputs: Inputs, cfg: Config | None = None) -> dict[str, float]:
    """The tolerance error model's scale per quantity for this call (tolerance.term_scales; for
    an fp8 spec tolerance.fp8_scales, the allowance itself)."""
    if spec.fp8:
        return tolerance.fp8_scales(inputs.q, inputs.k, inputs.v, cfg or spec.config(), inputs.key_padding_mask,
                                    **inputs.descales())
    return tolerance.term_scales(
        inputs.q, inputs.k, inputs.v, inputs.grad_out, cfg or spec.config(), inputs.key_padding_mask, inputs.bias,
        **inputs.score_kwargs(),
    )


def visible(spec: Spec, inputs: Inputs) -> torch.Tensor:
    """The oracle's (B, Sq, Sk) visibility (structure and padding; not the bias)."""
    return oracle_dense.visible(
        spec.B, spec.Sq, spec.Sk, causal=spec.causal, window=spec.window, block=spec.block, align=spec.align,
        key_padding_mask=inputs.key_padding_mask,
    )


def position(spec: Spec, i: int) -> int:
    """The absolute position p(i) of query i."""
    return i + (spec.Sk - spec.Sq) if spec.align == "bottom_right" else i


def big_values(dtype: torch.dtype) -> float:
    """A large finite value for overwriting masked inputs: far beyond exp() overflow once
    multiplied out, yet safely representable (q.k stays finite) in the dtype."""
    return 256.0 if dtype == torch.float16 else 1e4


# -- long problems: sampled query rows ---------------------------------------------------------
ALL_ROWS = 64  # a problem with at most this many query rows is checked on every row
ROW_EDGES = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)  # tile boundaries: the rows around them


def sample_rows(spec: Spec, extra: tuple[int, ...] = ()) -> torch.Tensor | None:
    """The query rows a property checks: None (every row) up to ALL_ROWS rows; else the first
    and last two, the rows around each tile boundary below Sq, the middle one and `extra`
    (rows a property drew), sorted and distinct."""
    Sq = spec.Sq
    if Sq <= ALL_ROWS:
        return None
    rows = {0, 1, Sq // 2, Sq - 2, Sq - 1, *(r for r in extra if 0 <= r < Sq)}
    rows |= {m + d for m in ROW_EDGES if m < Sq for d in (-1, 0, 1) if m + d < Sq}
    return torch.tensor(sorted(rows))


def rows_of(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    """out / lse / dq restricted to query `rows` (dim 2); everything when rows is None."""
    return t if t is None or rows is None else t[:, :, rows.to(t.device)]


def rows_problem(spec: Spec, inputs: Inputs, rows: torch.Tensor, cfg: Config | None = None) -> tuple[Inputs, Config]:
    """The problem restricted to query `rows`, for an implementation: q and grad_out rows, the
    structure (causal, windows, blocks, alignment) folded into an additive bias that is -inf on
    the keys each row may not see (the spec's bias, plus the ALiBi bias of the rows' positions
    when the spec has alibi_slopes, on the others), and a config without structure (the soft
    cap kept: it applies before any bias). Key padding stays a mask, the sinks stay sinks. Only
    q requires grad (dq of a row is exact from the row alone; dk and dv are sums over every row)."""
    cfg = cfg or spec.config()
    dev = inputs.q.device
    vis = oracle_dense.visible(spec.B, spec.Sq, spec.Sk, causal=cfg.causal, window=cfg.window, block=cfg.block,
                               align=cfg.align, rows=rows)[:, None].to(dev)  # (B, 1, R, Sk)
    # an ALiBi bias (up to slope * Sk) is kept in float32 at least: the kernel computes it so
    dtype = inputs.q.dtype if inputs.alibi_slopes is None else torch.promote_types(inputs.q.dtype, torch.float32)
    bias = torch.zeros((), dtype=dtype, device=dev)
    if inputs.bias is not None:
        bias = inputs.bias.detach()
        if bias.dim() >= 2 and bias.shape[-2] == spec.Sq:
            bias = bias[..., rows.to(dev), :]
    if inputs.alibi_slopes is not None:
        alibi = oracle_dense.alibi_bias(inputs.alibi_slopes, spec.Sq, spec.Sk, cfg.align, rows)
        bias = bias.to(dtype) + alibi.to(device=dev, dtype=dtype)
    bias = torch.where(vis, bias, torch.full((), float("-inf"), dtype=bias.dtype, device=dev))
    q = inputs.q.detach()[:, :, rows.to(dev)].clone().requires_grad_(inputs.q.requires_grad)
    sinks = None if inputs.sinks is None else inputs.sinks.detach()
    flat = Inputs(q=q, k=inputs.k.detach(), v=inputs.v.detach(), key_padding_mask=inputs.key_padding_mask,
                  bias=bias.contiguous(), grad_out=inputs.grad_out[:, :, rows.to(dev)].contiguous(), sinks=sinks)
    plain = Config(scale=cfg.scale, dropout_p=cfg.dropout_p, dropout_seed=cfg.dropout_seed, softcap=cfg.softcap)
    return flat, plain


def run_reference(impl: Impl, spec: Spec, inputs: Inputs, rows: torch.Tensor | None = None, grad: bool = False,
                  cfg: Config | None = None) -> Run:
    """The variant's reference on every row (rows None), or on `rows` only (`rows_problem`: its
    memory and time are O(len(rows) * Sk), so a long problem's reference stays cheap). With
    rows and grad, only dq (of those rows) comes back."""
    ref = reference_impl(impl)
    if rows is None:
        return run_impl(ref, spec, clone_inputs(inputs), grad=grad, cfg=cfg)
    if "bias" not in ref.features:
        raise ValueError(f"{ref.key}: the reference needs 'bias' to run sampled rows")
    flat, plain = rows_problem(spec, inputs, rows, cfg)
    run = call(ref.fn, flat, plain, grad=grad)
    run.grads = {n: g for n, g in run.grads.items() if n == "dq"}
    return run


def run_oracle_rows(spec: Spec, inputs: Inputs, rows: torch.Tensor | None, grad: bool = False,
                    cfg: Config | None = None) -> Run:
    """The float64 oracle on query `rows` (every row when None), chunked over rows on the
    inputs' device; with grad, dq of those rows (and, for every row, dk, dv, dbias too)."""
    if rows is None:
        return run_oracle(spec, inputs, grad=grad, cfg=cfg)
    q = inputs.q.detach().to(torch.float64).requires_grad_(grad)
    k, v = (t.detach().to(torch.float64) for t in (inputs.k, inputs.v))
    bias = None if inputs.bias is None else inputs.bias.detach().to(torch.float64)
    sinks = None if inputs.sinks is None else inputs.sinks.detach().to(torch.float64)
    with torch.set_grad_enabled(grad):
        out, lse = oracle_dense.attention_rows(q, k, v, cfg or spec.config(), inputs.key_padding_mask, bias, rows=rows,
                                               alibi_slopes=inputs.alibi_slopes, sinks=sinks)
    run = Run(out=out.detach(), lse=lse.detach())
    if grad:
        out.backward(inputs.grad_out.detach()[:, :, rows.to(out.device)].to(torch.float64))
        run.grads["dq"] = q.grad[:, :, rows.to(q.device)]
    return run


def scales_rows(spec: Spec, inputs: Inputs, rows: torch.Tensor | None, cfg: Config | None = None) -> dict[str, float]:
    """`scales_of` for query `rows` (every row when None); on rows, out, lse and dq only."""
    if rows is None:
        return scales_of(spec, inputs, cfg)
    flat, plain = rows_problem(spec, inputs, rows, cfg)
    scales = scales_of(spec, flat, plain)
    return {n: scales[n] for n in ("out", "lse", "dq")}


def draw_rows(data, spec: Spec) -> torch.Tensor | None:
    """`sample_rows` plus two rows drawn by Hypothesis (a pinned example takes the last row)."""
    if spec.Sq <= ALL_ROWS:
        return None
    extra = tuple(draw_int(data, 0, spec.Sq - 1, spec.Sq - 1, label=f"row {n}") for n in range(2))
    return sample_rows(spec, extra)


# -- packed (varlen) batches and the paged KV cache (attnbench.packing) -----------------------
def _finite(*tensors: torch.Tensor) -> SimpleNamespace:
    """What _raise_flagged reads to decide whether every input is finite (no bias here)."""
    q, *kv = tensors
    return SimpleNamespace(q=q, k=kv[0] if kv else q, v=kv[1] if len(kv) > 1 else q, bias=None, alibi_slopes=None,
                           sinks=None)


def call_varlen(fn: Callable, inputs: VarlenInputs, cfg: Config, grad: bool = False, who: str | None = None,
                return_lse: bool = True) -> Run:
    """Run a varlen fn (the packing convention); with grad, backpropagate inputs.grad_out into
    q, k, v; return_lse=False is passed as such (the inference call). With `who`, the varlen
    contract is checked as `call` checks the dense one: result types and shapes (out (total_q,
    Hq, Dv), lse (Hq, total_q)), inputs unchanged, results finite for finite inputs."""
    leaves = {n: getattr(inputs, n) for n in ("q", "k", "v")}
    leaves = {n: t for n, t in leaves.items() if t.requires_grad}
    for t in leaves.values():
        t.grad = None
    given = {n: getattr(inputs, n) for n in ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "grad_out")}
    before = snapshot(given) if who else {}
    with torch.set_grad_enabled(grad):
        result = fn(*inputs.args(), cfg) if return_lse else fn(*inputs.args(), cfg, return_lse=False)
    finite = _finite(inputs.q, inputs.k, inputs.v)
    if who:
        out, lse = check_varlen_result(who, result, inputs.q, inputs.v)
        _raise_flagged(who, _changed(given, before), finite, {"out": out, "lse": lse})
    out, lse = _pair(result, "varlen")
    run = Run(out=out.detach(), lse=None if lse is None else lse.detach())
    if grad:
        _backward(run, out, inputs.grad_out, leaves, who, given, before, finite)
    return run


def run_varlen(impl: Impl, spec: VarlenSpec, inputs: VarlenInputs, grad: bool = False, return_lse: bool = True) -> Run:
    return call_varlen(impl.varlen, inputs, spec.config(), grad=grad, who=impl.key, return_lse=return_lse)


def run_varlen_oracle(spec: VarlenSpec, inputs: VarlenInputs, grad: bool = False) -> Run:
    """The float64 varlen oracle on the same (rounded) inputs."""
    f64 = dataclasses.replace(inputs, **{n: getattr(inputs, n).detach().to(torch.float64).requires_grad_(
        grad and getattr(inputs, n).requires_grad) for n in ("q", "k", "v")},
        grad_out=inputs.grad_out.detach().to(torch.float64))
    return call_varlen(oracle_sequences.varlen_attention, f64, spec.config(), grad=grad)


def clone_varlen(inputs: VarlenInputs) -> VarlenInputs:
    def c(t):
        return t.detach().clone().requires_grad_(t.requires_grad)

    return dataclasses.replace(inputs, q=c(inputs.q), k=c(inputs.k), v=c(inputs.v),
                               cu_seqlens_q=inputs.cu_seqlens_q.clone(), cu_seqlens_k=inputs.cu_seqlens_k.clone(),
                               grad_out=inputs.grad_out.clone())


def _sequence_scales(parts: list[tuple]) -> dict[str, float]:
    """The tolerance error model's scale per quantity over several dense calls: the largest.
    parts: (q, k, v, grad_out, cfg) of each sequence in the dense layout."""
    scales: dict[str, float] = {}
    for q, k, v, grad_out, cfg in parts:
        for name, value in tolerance.term_scales(q, k, v, grad_out, cfg, None, None).items():
            scales[name] = max(scales.get(name, 0.0), value)
    return scales


def varlen_scales(spec: VarlenSpec, inputs: VarlenInputs) -> dict[str, float]:
    """`scales_of` for a packed batch: the largest over its sequences."""
    cq, ck = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    parts = []
    for b in range(spec.B):
        if cq[b + 1] > cq[b] and ck[b + 1] > ck[b]:
            q, go = (t.detach()[cq[b] : cq[b + 1]].transpose(0, 1)[None] for t in (inputs.q, inputs.grad_out))
            k, v = (t.detach()[ck[b] : ck[b + 1]].transpose(0, 1)[None] for t in (inputs.k, inputs.v))
            parts.append((q, k, v, go, spec.config()))
    return _sequence_scales(parts)


def call_paged(fn: Callable, inputs: PagedInputs, cfg: Config, who: str | None = None, return_lse: bool = True) -> Run:
    """Run a paged fn (forward only); return_lse=False is passed as such. With `who`, the paged
    contract: out (B, Hq, Sq, Dv) and lse (B, Hq, Sq) as the dense call's, inputs (the pool, poison
    included, the table, the lengths) unchanged, results finite when q and every cached token
    below cache_seqlens are."""
    given = {n: getattr(inputs, n) for n in ("q", "k_cache", "v_cache", "block_table", "cache_seqlens", "grad_out")}
    before = snapshot(given) if who else {}
    with torch.no_grad():
        result = fn(*inputs.args(), cfg) if return_lse else fn(*inputs.args(), cfg, return_lse=False)
    if who:
        out, lse = check_result(who, result, inputs.q, inputs.v_cache)
        k, v = paged_contiguous(inputs)
        finite = _finite(inputs.q, torch.cat([t.flatten() for t in k] + [inputs.q.new_zeros(1)]),
                         torch.cat([t.flatten() for t in v] + [inputs.q.new_zeros(1)]))
        _raise_flagged(who, _changed(given, before), finite, {"out": out, "lse": lse})
    out, lse = _pair(result, "paged")
    return Run(out=out.detach(), lse=None if lse is None else lse.detach())


def run_paged(impl: Impl, spec: PagedSpec, inputs: PagedInputs, return_lse: bool = True) -> Run:
    return call_paged(impl.paged, inputs, spec.config(), who=impl.key, return_lse=return_lse)


def run_paged_oracle(spec: PagedSpec, inputs: PagedInputs) -> Run:
    return call_paged(oracle_sequences.paged_attention, inputs, spec.config())


def paged_contiguous(inputs: PagedInputs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each sequence's cached keys and values, contiguous (1, Hkv, cache_seqlens[b], D), gathered
    by the oracle's index arithmetic."""
    table = inputs.block_table.cpu()
    ks, vs = [], []
    for b, n in enumerate(inputs.cache_seqlens.tolist()):
        ks.append(oracle_sequences.gather(inputs.k_cache, table[b], n)[None])
        vs.append(oracle_sequences.gather(inputs.v_cache, table[b], n)[None])
    return ks, vs


def paged_scales(spec: PagedSpec, inputs: PagedInputs) -> dict[str, float]:
    """`scales_of` for a paged call: the largest over its sequences (over their cached tokens)."""
    ks, vs = paged_contiguous(inputs)
    parts = [(inputs.q[b : b + 1].detach(), k, v, inputs.grad_out[b : b + 1], spec.config())
             for b, (k, v) in enumerate(zip(ks, vs)) if k.shape[2]]
    return _sequence_scales(parts)


def check_sampled_heads(impl, device: str, shape: dict, measure) -> None:
    """One call on `shape`, then sampled rows of the first, a middle and the last (batch, head)
    against the row-wise oracle (tests/test_reach.py runs it on a small shape on the CPU)."""
    dtype = next((d for d in ("bfloat16", "float16") if d in impl.dtypes), None)
    spec = Spec(**shape, dtype=dtype or "float32", device=device, causal="causal" in impl.features)
    if dtype is None or not impl.covers(spec):
        pytest.skip(f"{impl.key} does not cover {spec.short()}")
    g = torch.Generator(device=device).manual_seed(0)  # drawn on the GPU: a CPU float64 draw would need 69 GB
    q, k, v = (torch.randn(spec.B, spec.Hq, spec.Sq, spec.D, dtype=spec.torch_dtype, device=device, generator=g)
               for _ in range(3))
    try:
        with torch.no_grad():
            out, _ = impl.fn(q, k, v, spec.config())
    except torch.cuda.OutOfMemoryError:
        del q, k, v
        pytest.skip(f"{impl.key}: out of GPU memory at {spec.short()} (materialized scores: B*H*S^2 = 2^36)")
    rows = sample_rows(spec)
    for b, h in ((0, 0), (spec.B // 2, spec.Hq // 2), (spec.B - 1, spec.Hq - 1)):
        one = spec.replace(B=1, Hq=1, Hkv=1)
        sub = Inputs(q=q[b : b + 1, h : h + 1], k=k[b : b + 1, h : h + 1], v=v[b : b + 1, h : h + 1],
                     key_padding_mask=None, bias=None, grad_out=torch.zeros_like(q[:1, :1]))
        with torch.no_grad():
            ref = run_reference(impl, one, sub, rows)
            want = run_oracle_rows(one, sub, rows)
        got = rows_of(out[b : b + 1, h : h + 1], rows)
        try:
            check(measure, "out", got, want.out, ref.out, spec.dtype, scales_rows(one, sub, rows))
        except AssertionError as exc:
            raise AssertionError(f"batch {b}, head {h}: {exc}") from None


# -- changed inputs and the reference's own error, for the metamorphic properties ---------
def _generator(spec: Spec, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(spec.seed * 7919 + salt)


def _expanded_dims(like: torch.Tensor) -> tuple[slice, ...] | None:
    """The index of one slice along `like`'s expanded (zero-stride) dims; None without any."""
    if not any(st == 0 and n > 1 for st, n in zip(like.stride(), like.shape)):
        return None
    return tuple(slice(0, 1) if st == 0 and n > 1 else slice(None) for st, n in zip(like.stride(), like.shape))


def noise(like: torch.Tensor, spec: Spec, salt: int, scale: float = 1.0) -> torch.Tensor:
    """Fresh values shaped like `like` (drawn in float64 on the CPU, then cast and moved); equal
    along `like`'s expanded dims, so a tensor made from them can keep its layout (with_tensors)."""
    t = scale * torch.randn(like.shape, dtype=torch.float64, generator=_generator(spec, salt))
    one = _expanded_dims(like)
    if one is not None:
        t = t[one].expand(like.shape)
    return t.to(device=like.device, dtype=like.dtype)


def _in_layout(t: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    """A copy of t in `like`'s layout (its strides, its expanded dims kept as an expand where t is
    equal along them), else a plain copy: kernels take other code paths for other layouts, so two
    runs that must agree bit for bit see the same one."""
    t = t.detach()
    if like is None or t.shape != like.shape:
        return t.clone()
    one = _expanded_dims(like)
    if one is None:
        return same_layout_copy(like).copy_(t)
    base = t[one].expand(t.shape)
    same = (t == base) | (t.isnan() & base.isnan())
    return same_layout_copy(like[one]).copy_(t[one]).expand(t.shape) if bool(same.all()) else t.clone()


def with_tensors(inputs: Inputs, **tensors: torch.Tensor) -> Inputs:
    """A copy of `inputs` with these tensors replaced (each a fresh leaf in the layout of the one it
    replaces where its values allow, requiring grad as that one does)."""
    new = clone_inputs(inputs)
    for name, t in tensors.items():
        leaf = getattr(inputs, name)
        setattr(new, name, _in_layout(t, leaf).requires_grad_(leaf.requires_grad if leaf is not None else False))
    return new


def exact_between(a: Inputs, b: Inputs) -> bool | None:
    """check_runs' `exact` for a run on `a` against one on `b`: None (bit for bit where the impl
    declares "deterministic") when q, k, v and bias have the same expanded (zero-stride) dims in
    both, False when not (with_tensors could not keep an expand whose new values differ along
    it): the same values read through an expand and through a plain copy may round differently
    (a batched matmul over a zero-stride batch does), which determinism does not promise."""
    for name in ("q", "k", "v", "bias"):
        x, y = getattr(a, name), getattr(b, name)
        if x is not None and y is not None and _expanded_dims(x) != _expanded_dims(y):
            return False
    return None


def references(spec: Spec, inputs: Inputs, impl: Impl, grad: bool = False, cfg: Config | None = None,
               rows: torch.Tensor | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """The naive reference's own error per quantity and the floor scales, for check_runs; on
    every row, or measured on sampled `rows` (out, lse and dq only) for a long problem."""
    ref = run_reference(impl, spec, inputs, rows, grad=grad, cfg=cfg)
    want = run_oracle_rows(spec, inputs, rows, grad=grad, cfg=cfg)
    scales = scales_rows(spec, inputs, rows, cfg)
    names = ["out"] + (["lse"] if ref.lse is not None else []) + sorted(n for n in want.grads if n in ref.grads)
    errors = {n: reference_error(n, spec, ref, want)[0] for n in names}
    return errors, scales


# -- layouts ---------------------------------------------------------------------------------
def _strided(*tensors: torch.Tensor) -> bool:
    """Whether any tensor is really not contiguous (a (B, S, 1, D) view transposed is)."""
    return any(not t.is_contiguous() for t in tensors)


def check_rejects(impl: Impl, spec: Spec) -> None:
    """One spec in a layout the implementation does not declare: the call (with a grad layout,
    the backward) must raise (test_layouts.test_undeclared_layouts_are_rejected)."""
    grad = spec.grad_layout not in impl.grad_layouts
    inputs = fresh_inputs(spec, impl, grad=grad)
    strided = _strided(inputs.grad_out) if grad else _strided(inputs.q, inputs.k, inputs.v)
    if not strided:
        return  # at this shape the layout is the contiguous one: nothing to reject
    what = f"grad_layout {spec.grad_layout!r}" if grad else f"layout {spec.layout!r}"
    try:
        run_impl(impl, spec, inputs, grad=grad)
    except Exception:
        return
    raise AssertionError(
        f"{impl.key} declares layouts {impl.layouts} / grad_layouts {impl.grad_layouts} but computed on "
        f"{what} instead of raising"
    )
