"""Cases: a cell and an implementation turned into a prepare / run pair to time, with its work.

A kernel cell gets seeded input sets (rotated when one set is cache-sized) and calls the
implementation (its dense call, or Impl.varlen / Impl.paged for a packed batch / paged step) in
its mode (fwd under no_grad; bwd times only the backward; fwdbwd both); a
module cell builds the seed module with the implementation's factory and times its forward.
The first output of every case is checked (shape and dtype): a wrong output is an error row,
never a timing. perf/measure.py times cases; perf/prewarm.py runs each once to compile.
"""

from __future__ import annotations

import gc

import torch

from attnbench.packing import PagedInputs, PagedSpec, VarlenInputs, VarlenSpec, cu_seqlens
from attnbench.registry import Impl
from attnbench.spec import Inputs, Spec, quantize_fp8

from . import work
from .cells import Cell
from .timing import is_cuda, synchronize


class KernelCase:
    """Inputs and the prepare/run pair for a kernel cell (dense / local variants)."""

    def __init__(self, impl: Impl, cell: Cell, input_sets: list) -> None:
        self.fn, self.cell, self.sets = impl.fn, cell, input_sets
        self.cfg = cell.spec.config()
        self.n_sets = len(input_sets)
        self.checked = False

    def invoke(self, inp):
        return self.fn(inp.q, inp.k, inp.v, self.cfg, inp.key_padding_mask, inp.bias, **inp.score_kwargs())

    def out_shape(self) -> tuple[int, ...]:
        spec = self.cell.spec
        return (spec.B, spec.Hq, spec.Sq, spec.Dv)

    def call(self, inp):
        out = self.invoke(inp)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not self.checked:  # a wrong output is an error row, never a timing
            check_output(out, self.out_shape(), self.cell.spec.torch_dtype)
            self.checked = True
        return out

    def clear_grads(self, inp) -> None:
        for t in (inp.q, inp.k, inp.v, getattr(inp, "bias", None), getattr(inp, "sinks", None)):
            if t is not None:
                t.grad = None

    def prepare(self, i: int):
        inp = self.sets[i]
        if self.cell.mode == "fwd":
            return inp
        self.clear_grads(inp)
        if self.cell.mode == "bwd":  # the forward is untimed: only the backward is measured
            return self.call(inp), inp.grad_out
        return inp

    def run(self, state):
        mode = self.cell.mode
        if mode == "fwd":
            with torch.no_grad():
                return self.call(state)
        if mode == "bwd":
            out, grad = state
            out.backward(grad)
            return None
        out = self.call(state)
        out.backward(state.grad_out)
        return None

    def work(self) -> tuple[float, float]:
        spec, inp = self.cell.spec, self.sets[0]
        flops = work.attention_flops(spec, self.cell.mode, inp.key_padding_mask)
        return flops, work.attention_bytes(spec, self.cell.mode)


class VarlenCase(KernelCase):
    """A packed batch through Impl.varlen: out (total_q, Hq, Dv)."""

    def __init__(self, impl: Impl, cell: Cell, input_sets: list[VarlenInputs]) -> None:
        super().__init__(impl, cell, input_sets)
        self.fn = impl.varlen

    def invoke(self, inp: VarlenInputs):
        return self.fn(*inp.args(), self.cfg)

    def out_shape(self) -> tuple[int, ...]:
        spec = self.cell.spec
        return (sum(q for q, _ in spec.seqlens), spec.Hq, spec.Dv)

    def work(self) -> tuple[float, float]:
        return work.packed_flops(self.cell.spec, self.cell.mode), work.packed_bytes(self.cell.spec, self.cell.mode)


class PagedCase(VarlenCase):
    """A step over a paged KV cache through Impl.paged: out (B, Hq, Sq, Dv); forward only (the
    cache holds no gradients)."""

    def __init__(self, impl: Impl, cell: Cell, input_sets: list[PagedInputs]) -> None:
        super().__init__(impl, cell, input_sets)
        self.fn = impl.paged

    def out_shape(self) -> tuple[int, ...]:
        spec = self.cell.spec
        return (spec.B, spec.Hq, spec.Sq, spec.Dv)


class ModuleCaseRunner:
    """A seed module built by the impl's factory, timed forward on (B, S, dim) inputs."""

    def __init__(self, impl: Impl, cell: Cell, n_sets: int) -> None:
        m = cell.module
        self.cell = cell
        dtype = getattr(torch, m.dtype)
        self.module = impl.fn(**m.ctor).to(device=m.device, dtype=dtype).eval()
        self.xs = []
        for seed in range(n_sets):
            g = torch.Generator().manual_seed(seed)
            self.xs.append(torch.randn(m.B, m.S, m.dim, generator=g, dtype=torch.float64).to(m.device, dtype))
        self.n_sets = n_sets
        self.checked = False

    def prepare(self, i: int):
        return self.xs[i]

    def run(self, x):
        with torch.no_grad():
            out = self.module(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not self.checked:  # a wrong output is an error row, never a timing
            check_output(out, tuple(x.shape), x.dtype)
            self.checked = True
        return out

    def work(self) -> tuple[float | None, float]:
        x = self.xs[0]
        flops = work.module_flops(self.cell.variant, self.cell.module.ctor, x, self.module, self.cell.mode)
        return flops, work.module_bytes(x, self.run(x), self.module.parameters())


def check_output(out, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise ValueError unless out is a tensor of this shape and dtype."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"returned {type(out).__name__}, not a tensor")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"returned an output of shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype:
        raise ValueError(f"returned {str(out.dtype).removeprefix('torch.')} for {str(dtype).removeprefix('torch.')} "
                         "inputs")


def needs_for(cell: Cell) -> set[str]:
    return {"backward"} if cell.mode != "fwd" else set()


def why_not(impl: Impl, cell: Cell) -> str | None:
    """Why `impl` cannot run `cell`, or None."""
    if cell.spec is not None:
        return impl.why_not(cell.spec, needs_for(cell))
    if not impl.device_ok(cell.device):
        return f"device {cell.device} not supported"
    if cell.dtype not in impl.dtypes:
        return f"dtype {cell.dtype} not supported"
    missing = needs_for(cell) - impl.features
    return f"unsupported features: {', '.join(sorted(missing))}" if missing else None


def n_input_sets(cell: Cell) -> int:
    """Rotate several input sets when one set is cache-sized (a few MB on the CPU, < 64 MB on CUDA)."""
    if cell.spec is None:
        return 2
    spec = cell.spec
    nbytes = work.attention_bytes(spec, "fwd") if isinstance(spec, Spec) else work.packed_bytes(spec, "fwd")
    return 3 if nbytes < (64 << 20 if is_cuda(cell.device) else 8 << 20) else 1


def make_inputs(cell: Cell) -> list[Inputs] | list[VarlenInputs] | list[PagedInputs]:
    """The cell's rotation of input sets (seeds seed, seed + 1, ...), differentiable so every
    mode of a problem shares them (the forward is timed under no_grad)."""
    draw = {VarlenSpec: varlen_inputs, PagedSpec: paged_inputs}.get(type(cell.spec), perf_inputs)
    return [draw(cell.spec.replace(seed=cell.spec.seed + i)) for i in range(n_input_sets(cell))]


def _drawer(spec: Spec | VarlenSpec | PagedSpec):
    """A seeded N(0, 1) draw on the spec's device, in its dtype: draw(*shape, scale=, grad=)."""
    g = torch.Generator(device=spec.device).manual_seed(spec.seed)
    draw_dtype = torch.float64 if spec.dtype == "float64" else torch.float32

    def draw(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, device=spec.device, dtype=draw_dtype, generator=g) * scale
        return t.to(spec.torch_dtype).requires_grad_(grad)

    return draw


def perf_inputs(spec: Spec) -> Inputs:
    """Seeded N(0, 1) inputs drawn on the spec's device: at benchmark sizes the contract's own
    draw (float64 on the CPU, then cast) takes seconds per problem. Specs with a bias or key
    padding use Spec.make_inputs, whose masks and biases follow the spec's fields exactly."""
    if spec.bias is not None or spec.has_padding:
        return spec.make_inputs(requires_grad=not spec.fp8)
    draw = _drawer(spec)
    m = spec.magnitude
    if spec.fp8:  # quantized per tensor on the device (Spec.make_inputs' quantize_fp8); forward only
        (q, k, v), descales = quantize_fp8(*(draw(*shape, scale=s, grad=False) for shape, s in (
            ((spec.B, spec.Hq, spec.Sq, spec.D), m), ((spec.B, spec.Hkv, spec.Sk, spec.D), m),
            ((spec.B, spec.Hkv, spec.Sk, spec.Dv), 1.0))))
        return Inputs(q=q, k=k, v=v, key_padding_mask=None, bias=None,
                      grad_out=draw(spec.B, spec.Hq, spec.Sq, spec.Dv, grad=False), **descales)
    return Inputs(
        q=draw(spec.B, spec.Hq, spec.Sq, spec.D, scale=m),
        k=draw(spec.B, spec.Hkv, spec.Sk, spec.D, scale=m),
        v=draw(spec.B, spec.Hkv, spec.Sk, spec.Dv),
        key_padding_mask=None,
        bias=None,
        grad_out=draw(spec.B, spec.Hq, spec.Sq, spec.Dv, grad=False),
        alibi_slopes=spec.alibi_values().to(device=spec.device, dtype=torch.float32) if spec.alibi else None,
        sinks=spec.sink_values().to(device=spec.device, dtype=spec.torch_dtype).requires_grad_() if spec.sinks else None,
    )


def varlen_inputs(spec: VarlenSpec) -> VarlenInputs:
    """Seeded packed inputs drawn on the device (VarlenSpec.make_inputs draws in float64 on the CPU)."""
    draw, m = _drawer(spec), spec.magnitude
    tq, tk = (sum(p[i] for p in spec.seqlens) for i in (0, 1))
    return VarlenInputs(
        q=draw(tq, spec.Hq, spec.D, scale=m), k=draw(tk, spec.Hkv, spec.D, scale=m), v=draw(tk, spec.Hkv, spec.Dv),
        cu_seqlens_q=cu_seqlens([q for q, _ in spec.seqlens], spec.device),
        cu_seqlens_k=cu_seqlens([k for _, k in spec.seqlens], spec.device),
        max_seqlen_q=max(q for q, _ in spec.seqlens), max_seqlen_k=max(k for _, k in spec.seqlens),
        grad_out=draw(tq, spec.Hq, spec.Dv, grad=False),
    )


def paged_inputs(spec: PagedSpec) -> PagedInputs:
    """Seeded inputs drawn on the device: a pool of random blocks, each sequence given its own
    blocks in a seeded random order (PagedSpec.make_inputs writes block by block on the CPU: far
    too slow at 128k tokens). Every pool slot holds a finite value; forward only."""
    draw, m = _drawer(spec), spec.magnitude
    n = spec.num_blocks
    order = torch.randperm(n, generator=torch.Generator().manual_seed(spec.seed)) if spec.permute else torch.arange(n)
    table = torch.zeros(spec.B, spec.max_blocks, dtype=torch.int32)
    used = 0
    for b, count in enumerate(spec.blocks_per_seq):
        table[b, :count] = order[used : used + count].to(torch.int32)
        used += count
    return PagedInputs(
        q=draw(spec.B, spec.Hq, spec.Sq, spec.D, scale=m, grad=False),
        k_cache=draw(n, spec.block_size, spec.Hkv, spec.D, scale=m, grad=False),
        v_cache=draw(n, spec.block_size, spec.Hkv, spec.Dv, grad=False),
        block_table=table.to(spec.device),
        cache_seqlens=torch.tensor(spec.cache_seqlens, dtype=torch.int32, device=spec.device),
        grad_out=draw(spec.B, spec.Hq, spec.Sq, spec.Dv, grad=False),
    )


def make_case(impl: Impl, cell: Cell, inputs: list | None = None) -> KernelCase | ModuleCaseRunner:
    """The prepare/run pair (and work model) for one implementation on one cell."""
    if cell.spec is not None:
        kind = {VarlenSpec: VarlenCase, PagedSpec: PagedCase}.get(type(cell.spec), KernelCase)
        return kind(impl, cell, inputs if inputs is not None else make_inputs(cell))
    return ModuleCaseRunner(impl, cell, n_input_sets(cell))


def candidates(cell: Cell, impls: list[Impl]) -> list[tuple[Impl, str | None]]:
    """The implementations of the cell's variant that run on its device, with why_not reasons."""
    return [(i, why_not(i, cell)) for i in impls if i.variant == cell.variant and i.device_ok(cell.device)]


class InputCache:
    """The input sets of the last kernel cell: the implementations of a cell (and its modes
    that share inputs) reuse them; a new problem frees the old one first."""

    def __init__(self) -> None:
        self.key = None
        self.inputs: list | None = None

    def get(self, cell: Cell) -> list | None:
        if cell.spec is None:
            return None
        key = cell.spec  # every mode of a problem shares its inputs
        if key != self.key:
            device = cell.device
            self.clear(device)
            self.inputs = make_inputs(cell)
            self.key = key
        return self.inputs

    def clear(self, device: str = "cpu") -> None:
        self.key, self.inputs = None, None
        release(device)


def release(device: str) -> None:
    gc.collect()
    if is_cuda(device):
        try:
            synchronize(device)
            torch.cuda.empty_cache()
        except Exception:  # a poisoned context: the next cells will say so in their rows
            pass
