"""Cases: a cell and an implementation turned into a prepare / run pair to time, with its work.

A kernel cell gets seeded input sets (rotated when one set is cache-sized) and calls the
implementation in its mode (fwd under no_grad; bwd times only the backward; fwdbwd both); a
module cell builds the seed module with the implementation's factory and times its forward.
The first output of every case is checked (shape and dtype): a wrong output is an error row,
never a timing. perf/measure.py times cases; perf/prewarm.py runs each once to compile.
"""

from __future__ import annotations

import gc

import torch

from attnbench.registry import Impl
from attnbench.spec import Inputs, Spec

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

    def call(self, inp):
        out = self.fn(inp.q, inp.k, inp.v, self.cfg, inp.key_padding_mask, inp.bias)
        out = out[0] if isinstance(out, (tuple, list)) else out
        if not self.checked:  # a wrong output is an error row, never a timing
            spec = self.cell.spec
            check_output(out, (spec.B, spec.Hq, spec.Sq, spec.Dv), spec.torch_dtype)
            self.checked = True
        return out

    def clear_grads(self, inp) -> None:
        for t in (inp.q, inp.k, inp.v, inp.bias):
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
    nbytes = work.attention_bytes(cell.spec, "fwd")
    return 3 if nbytes < (64 << 20 if is_cuda(cell.device) else 8 << 20) else 1


def make_inputs(cell: Cell) -> list[Inputs]:
    """The cell's rotation of input sets (seeds seed, seed + 1, ...), differentiable so every
    mode of a problem shares them (the forward is timed under no_grad)."""
    return [perf_inputs(cell.spec.replace(seed=cell.spec.seed + i)) for i in range(n_input_sets(cell))]


def perf_inputs(spec: Spec) -> Inputs:
    """Seeded N(0, 1) inputs drawn on the spec's device: at benchmark sizes the contract's own
    draw (float64 on the CPU, then cast) takes seconds per problem. Specs with a bias or key
    padding use Spec.make_inputs, whose masks and biases follow the spec's fields exactly."""
    if spec.bias is not None or spec.has_padding:
        return spec.make_inputs(requires_grad=True)
    g = torch.Generator(device=spec.device).manual_seed(spec.seed)
    draw_dtype = torch.float64 if spec.dtype == "float64" else torch.float32

    def draw(*shape: int, scale: float = 1.0, grad: bool = True) -> torch.Tensor:
        t = torch.randn(*shape, device=spec.device, dtype=draw_dtype, generator=g) * scale
        return t.to(spec.torch_dtype).requires_grad_(grad)

    m = spec.magnitude
    return Inputs(
        q=draw(spec.B, spec.Hq, spec.Sq, spec.D, scale=m),
        k=draw(spec.B, spec.Hkv, spec.Sk, spec.D, scale=m),
        v=draw(spec.B, spec.Hkv, spec.Sk, spec.Dv),
        key_padding_mask=None,
        bias=None,
        grad_out=draw(spec.B, spec.Hq, spec.Sq, spec.Dv, grad=False),
    )


def make_case(impl: Impl, cell: Cell, inputs: list | None = None) -> KernelCase | ModuleCaseRunner:
    """The prepare/run pair (and work model) for one implementation on one cell."""
    if cell.spec is not None:
        return KernelCase(impl, cell, inputs if inputs is not None else make_inputs(cell))
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
