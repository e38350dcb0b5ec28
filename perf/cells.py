"""Cells: what one benchmark measurement is about (a problem, a mode), and its key.

A kernel cell is a Spec plus a mode (fwd, bwd, fwdbwd), or a packed batch (VarlenSpec) or a
paged-cache step (PagedSpec) plus a mode; a module cell is a seed module's
constructor arguments plus an input size (timed forward). perf/sweeps.py groups cells into
named sweeps; perf/cases.py turns a cell and an implementation into something to time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from attnbench.packing import PagedSpec, VarlenSpec
from attnbench.registry import MODULE_VARIANTS, VARIANTS
from attnbench.reports.tables import cell_label
from attnbench.spec import Block, Spec

from .work import check_mode

KernelSpec = Spec | VarlenSpec | PagedSpec  # a dense problem, a packed batch, a paged-cache step


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
    spec: KernelSpec | None = None
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
        if not isinstance(s, Spec):
            return packed_shape(s)
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
        return {**out, **score_features(s)}

    def key(self) -> str:
        return cell_key(self.variant, self.mode, self.shape())

    def label(self) -> str:
        return cell_label(self.variant, self.mode, self.shape())


def score_features(spec: KernelSpec) -> dict[str, Any]:
    """The score features and fp8 a spec uses (none: an empty dict, so plain cells keep their keys)."""
    out: dict[str, Any] = {}
    if spec.softcap is not None:
        out["softcap"] = spec.softcap
    for name in ("alibi", "sinks", "fp8"):
        if getattr(spec, name, False):
            out[name] = True
    return out


def packed_shape(s: VarlenSpec | PagedSpec) -> dict[str, Any]:
    """A packed batch or paged step as JSON-ready data: Sq / Sk are the total query / key tokens
    (varlen) or the new tokens and the longest cache (paged), so labels and tables read as dense."""
    out: dict[str, Any] = {"B": s.B, "Hq": s.Hq, "Hkv": s.Hkv, "D": s.D, "Dv": s.Dv, "causal": s.causal,
                           "window": _jsonable(s.window), "dtype": s.dtype}
    if isinstance(s, VarlenSpec):
        out.update(packing="varlen", seqlens=[list(p) for p in s.seqlens],
                   Sq=sum(q for q, _ in s.seqlens), Sk=sum(k for _, k in s.seqlens))
    else:
        out.update(packing="paged", block_size=s.block_size, cache_seqlens=list(s.cache_seqlens),
                   Sq=s.Sq, Sk=max(s.cache_seqlens))
    return {**out, **score_features(s)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Block):
        return [value.window_size, value.look_backward, value.look_forward]
    return value


def cell_key(variant: str, mode: str, shape: dict[str, Any]) -> str:
    """One string per cell, the same before and after a JSON round trip."""
    return f"{variant}|{mode}|{json.dumps(shape, sort_keys=True, default=str)}"


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
