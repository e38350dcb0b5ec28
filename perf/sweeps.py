"""What the benchmark measures: cells (a problem, a mode) grouped into named sweeps.

A kernel cell is a Spec plus a mode (fwd, bwd, fwdbwd); a module cell is a seed module's
constructor arguments plus an input size (timed forward). Sweeps vary one axis at a time
around a base shape (bf16, 16 heads, head dim 128, 16k tokens on the GPU: the shapes of the
anchor figures), and a memory sweep grows S at fixed batch so memory-vs-S slopes can be fit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from attnbench.registry import MODULE_VARIANTS, VARIANTS
from attnbench.spec import Block, Spec

from .timing import is_cuda
from .work import attention_flops, check_mode


@dataclass(frozen=True)
class ModuleCase:
    """A seed module: constructor kwargs (as sorted items), batch, sequence length, dtype."""

    kwargs: tuple[tuple[str, Any], ...]
    B: int
    S: int
    dtype: str = "bfloat16"
    device: str = "cuda"

    @property
    def ctor(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def dim(self) -> int:
        return self.ctor["dim"]


@dataclass(frozen=True)
class Cell:
    variant: str
    mode: str
    spec: Spec | None = None
    module: ModuleCase | None = None
    graph: bool = False  # time with CUDA graphs (small, launch-bound shapes)
    tags: tuple[str, ...] = field(default=(), compare=False)  # which sweeps asked for it

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Cell.variant: unknown variant {self.variant!r}; one of {sorted(VARIANTS)}")
        check_mode(self.mode)
        is_module = self.variant in MODULE_VARIANTS
        if is_module and (self.module is None or self.spec is not None):
            raise ValueError(f"Cell.module: module variant {self.variant!r} needs a ModuleCase and no spec")
        if not is_module and (self.spec is None or self.module is not None):
            raise ValueError(f"Cell.spec: kernel variant {self.variant!r} needs a Spec and no module")

    @property
    def device(self) -> str:
        return self.spec.device if self.spec is not None else self.module.device

    @property
    def dtype(self) -> str:
        return self.spec.dtype if self.spec is not None else self.module.dtype

    def shape(self) -> dict[str, Any]:
        """The cell as JSON-ready data (PerfRow.shape); with variant and mode it names the cell."""
        if self.module is not None:
            m = self.module
            return {"B": m.B, "S": m.S, "dtype": m.dtype, **{k: _jsonable(v) for k, v in m.kwargs}}
        s = self.spec
        out: dict[str, Any] = {
            "B": s.B, "Hq": s.Hq, "Hkv": s.Hkv, "Sq": s.Sq, "Sk": s.Sk, "D": s.D, "Dv": s.Dv,
            "causal": s.causal, "window": _jsonable(s.window), "dtype": s.dtype,
        }
        if s.block is not None:
            out["block"] = [s.block.window_size, s.block.look_backward, s.block.look_forward]
        if s.align != "bottom_right":
            out["align"] = s.align
        if s.bias is not None:
            out["bias"] = s.bias
        if s.key_lengths is not None:
            out["key_lengths"] = list(s.key_lengths)
        if s.key_drop:
            out["key_drop"] = s.key_drop
        return out

    def key(self) -> str:
        return cell_key(self.variant, self.mode, self.shape())

    def label(self) -> str:
        sh = self.shape()
        if self.module is not None:
            return f"{self.variant} B{sh['B']} S{sh['S']} {sh['dtype']} {self.mode}"
        parts = [f"B{sh['B']}", f"H{sh['Hq']}" + (f"/{sh['Hkv']}" if sh["Hkv"] != sh["Hq"] else "")]
        parts.append(f"S{sh['Sq']}" if sh["Sq"] == sh["Sk"] else f"S{sh['Sq']}x{sh['Sk']}")
        parts.append(f"D{sh['D']}")
        if sh["causal"]:
            parts.append("causal")
        if sh["window"] is not None:
            parts.append(f"win{tuple(sh['window'])}")
        if "block" in sh:
            parts.append(f"block{tuple(sh['block'])}")
        parts += [sh["dtype"], self.mode]
        return f"{self.variant} " + " ".join(parts)


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Block):
        return [value.window_size, value.look_backward, value.look_forward]
    return value


def cell_key(variant: str, mode: str, shape: dict[str, Any]) -> str:
    """One string per cell, the same before and after a JSON round trip."""
    return f"{variant}|{mode}|{json.dumps(shape, sort_keys=True, default=str)}"


# -- the sweeps -------------------------------------------------------------------------------


class _Base:
    """Spec fields that a sweep varies one at a time; `replace` builds a fresh Spec, so the
    derived fields (Sk from Sq, Hkv from Hq, Dv from D) follow unless given."""

    def __init__(self, **fields) -> None:
        self.fields = fields

    def replace(self, **changes) -> Spec:
        return Spec(**{**self.fields, **changes})


# A forward this small (tens of microseconds on an H100) is launch-bound: timed eagerly, the B=1
# S=1024 causal cell moved 2-4x between machines of the same GPU model (host speed, not the kernel),
# so such forwards are timed as CUDA graph replays, like the decoding cells. float32 counts 16x:
# it runs on the FMA units, about 16x slower than bf16 / fp16 on the tensor cores.
GRAPH_BELOW_FLOPS = 20e9


def _kernel_cells(variant: str, spec: Spec, modes, tag: str, graph: bool = False) -> list[Cell]:
    cost = attention_flops(spec, "fwd") * (16 if spec.dtype == "float32" else 1)
    small = is_cuda(spec.device) and cost < GRAPH_BELOW_FLOPS
    return [Cell(variant, m, spec=spec, graph=(graph or small) and m == "fwd", tags=(tag,)) for m in modes]


def gpu_cells(quick: bool, device: str = "cuda") -> list[Cell]:
    base = _Base(B=4, Hq=16, Sq=4096, D=128, dtype="bfloat16", device=device)
    cells: list[Cell] = []
    add = cells.extend
    if quick:
        for causal in (False, True):
            add(_kernel_cells("dense", base.replace(B=4, Sq=1024, causal=causal), ("fwd", "fwdbwd"), "seq"))
        add(_kernel_cells("dense", base.replace(B=2, Sq=2048, causal=True, window=(256, 0)), ("fwd",), "window"))
        add(_kernel_cells("local", base.replace(B=2, Sq=2048, causal=True, window=(256, 0)), ("fwd",), "window"))
        decode = base.replace(B=8, Hq=32, Hkv=8, Sq=1, Sk=4096)
        add(_kernel_cells("dense", decode, ("fwd",), "decode", graph=True))
        for S in (1024, 2048, 4096):
            add(_kernel_cells("dense", base.replace(B=1, Sq=S, causal=True), ("fwd",), "memory"))
        add(module_cells(quick=True, device=device))
        return dedupe(cells)
    # In priority order: a sweep that runs out of time budget skips the tail.
    # 1. sequence length at 16k tokens (the anchors' shapes).
    for S, B in ((4096, 4), (1024, 16), (16384, 1)):
        for causal in (True, False):
            add(_kernel_cells("dense", base.replace(B=B, Sq=S, causal=causal), ("fwd", "fwdbwd"), "seq"))
    # 2. windows: sliding (the anchors' S=8192, W=512) in both variants, and LocalMHA's blocked window.
    win = base.replace(B=2, Sq=8192, causal=True, window=(512, 0))
    add(_kernel_cells("dense", win, ("fwd", "fwdbwd"), "window"))
    add(_kernel_cells("local", win, ("fwd", "fwdbwd"), "window"))
    add(_kernel_cells("local", base.replace(B=2, Sq=8192, causal=True, block=Block(512, 1, 0)), ("fwd", "fwdbwd"),
                      "window"))
    # 3. KV-cache decoding and chunked prefill (Sq != Sk, bottom-right): launch-bound, so graphs.
    add(_kernel_cells("dense", base.replace(B=16, Hq=32, Hkv=8, Sq=1, Sk=8192), ("fwd",), "decode", graph=True))
    add(_kernel_cells("dense", base.replace(B=2, Sq=512, Sk=8192, causal=True), ("fwd",), "decode"))
    # 4. grouped-query and multi-query heads.
    add(_kernel_cells("dense", base.replace(B=2, Hq=32, Hkv=8, causal=True), ("fwd", "fwdbwd"), "gqa"))
    add(_kernel_cells("dense", base.replace(B=2, Hq=32, Hkv=1, causal=True), ("fwd",), "gqa"))
    # 5. the seed modules.
    add(module_cells(quick=False, device=device))
    # 6. memory against S at fixed batch (fits a slope per implementation; S=16384 is in 1.).
    for S in (1024, 2048, 4096, 8192):
        add(_kernel_cells("dense", base.replace(B=1, Sq=S, causal=True), ("fwd",), "memory"))
    for S in (2048, 8192):
        add(_kernel_cells("dense", base.replace(B=1, Sq=S, causal=True), ("fwdbwd",), "memory"))
    # 7. the backward alone.
    for causal in (True, False):
        add(_kernel_cells("dense", base.replace(causal=causal), ("bwd",), "bwd"))
    # 8. head dim, batch x heads, dtype.
    add(_kernel_cells("dense", base.replace(D=64, causal=True), ("fwd", "fwdbwd"), "head_dim"))
    add(_kernel_cells("dense", base.replace(D=256, causal=True), ("fwd",), "head_dim"))
    add(_kernel_cells("dense", base.replace(B=16, Hq=4, causal=True), ("fwd",), "batch_heads"))
    add(_kernel_cells("dense", base.replace(dtype="float16", causal=True), ("fwd", "fwdbwd"), "dtype"))
    add(_kernel_cells("dense", base.replace(B=2, Sq=2048, D=64, dtype="float32", causal=True), ("fwd",), "dtype"))
    return dedupe(cells)



def cpu_cells(quick: bool, device: str = "cpu") -> list[Cell]:
    """Small float32 shapes. Quick: one cell per variant and axis, most telling first (a spent
    time budget skips the tail), so every variant is covered even on a busy 2-core machine."""
    base = _Base(B=1, Hq=2, Sq=128, D=32, dtype="float32", device=device)
    cells: list[Cell] = []
    add = cells.extend
    modes = ("fwd", "fwdbwd") if quick else ("fwd", "bwd", "fwdbwd")
    add(_kernel_cells("dense", base.replace(causal=True), modes, "seq"))
    add(_kernel_cells("local", base.replace(Sq=256, causal=True, window=(32, 0)), ("fwd",), "window"))
    add(_kernel_cells("local", base.replace(Sq=256, causal=True, block=Block(32, 1, 0)), ("fwd",), "window"))
    add(module_cells(quick=True, device=device))
    add(_kernel_cells("dense", base.replace(causal=False), modes, "seq"))
    add(_kernel_cells("dense", base.replace(Hq=4, Hkv=2, causal=True), ("fwd",), "gqa"))
    add(_kernel_cells("dense", base.replace(Sq=1, Sk=256), ("fwd",), "decode"))
    add(_kernel_cells("dense", base.replace(Sq=256, causal=True, window=(32, 0)), ("fwd",), "window"))
    if not quick:
        for S in (64, 256, 512):
            for causal in (False, True):
                add(_kernel_cells("dense", base.replace(Sq=S, causal=causal), modes, "seq"))
        add(_kernel_cells("dense", base.replace(D=64, dtype="float64"), ("fwd",), "dtype"))
    return dedupe(cells)


def module_cells(quick: bool, device: str) -> list[Cell]:
    """One forward cell per seed module, constructor arguments from the seed documents."""
    cuda = device.split(":")[0] == "cuda"
    dtype = "bfloat16" if cuda else "float32"
    if cuda:
        dim, heads, dim_head, B, S = 1024, 16, 64, 4, 2048
        window, routed = 256, 1024
    else:
        dim, heads, dim_head, B, S = 64, 2, 32, 1, 64
        window, routed = 16, 32
    configs = {
        "FlashAttentionTwo": dict(dim=dim, heads=heads, dim_head=dim_head, causal=True),
        "MultiQueryAttention": dict(dim=dim, heads=heads),
        "LocalMHA": dict(dim=dim, window_size=window, heads=heads, dim_head=dim_head, causal=True),
        "MixtureOfAttention": dict(dim=dim, num_routed_queries=routed, num_routed_key_values=routed,
                                   num_experts=2, heads=heads, dim_head=dim_head),
        "MixtureOfAutoregressiveAttention": dict(dim=dim, num_routed_queries=routed // 4,
                                                 num_routed_key_values=routed // 4,
                                                 local_attn_window_size=window, num_experts=2,
                                                 heads=heads, dim_head=dim_head),
    }
    cells = []
    for variant, kwargs in configs.items():
        case = ModuleCase(tuple(sorted(kwargs.items())), B=B, S=S, dtype=dtype, device=device)
        cells.append(Cell(variant, "fwd", module=case, tags=("module",)))
    return cells


def dedupe(cells: list[Cell]) -> list[Cell]:
    """Drop repeated cells (the same problem asked for by two sweeps), keeping all tags."""
    seen: dict[str, Cell] = {}
    for c in cells:
        k = c.key()
        if k in seen:
            old = seen[k]
            seen[k] = Cell(old.variant, old.mode, old.spec, old.module, old.graph, old.tags + c.tags)
        else:
            seen[k] = c
    return list(seen.values())


def sweep_cells(quick: bool, device: str, variants=None) -> list[Cell]:
    """The cells of the quick or full sweep on this device, optionally for some variants only."""
    cells = gpu_cells(quick, device) if device.split(":")[0] == "cuda" else cpu_cells(quick, device)
    if variants:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"variants: unknown {sorted(unknown)}; one of {sorted(VARIANTS)}")
        cells = [c for c in cells if c.variant in set(variants)]
    return cells
