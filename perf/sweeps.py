"""What the benchmark measures: named sweeps, each a function that returns cells.

A sweep is one decorated function here: `@sweep("name", devices=...)` above a function
`(device, quick) -> list[Cell]`; its docstring's first line is the description `attnbench bench
--list-sweeps` prints. `attnbench bench --sweep NAME` (repeatable) runs the named sweeps; without
it the default sweeps of the device run, in the order they are registered below (a sweep that
runs out of time budget skips the tail, so the most telling come first).

GPU sweeps vary one axis at a time around a base shape (bf16, 16 heads, head dim 128, 16k tokens:
the shapes of the anchor figures); the CPU sweep interleaves small float32 shapes so that every
variant is covered even on a busy 2-core machine. The sweeps that are not in the default
selection reproduce focused studies (the anchors' shapes, a local-attention memory curve,
mixture-of-attention routing against dense attention) with the same timer and rows as the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from attnbench.packing import PagedSpec, VarlenSpec
from attnbench.registry import VARIANTS
from attnbench.spec import Block, Spec

from .cells import Cell, ModuleCase, dedupe
from .timing import is_cuda
from .work import attention_flops

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class Sweep:
    name: str
    description: str
    devices: tuple[str, ...]  # device kinds it has shapes for: "cpu", "cuda"
    default: tuple[str, ...]  # device kinds whose sweep (no --sweep given) includes it
    build: Callable[[str, bool], list[Cell]]  # (device, quick) -> cells

    def cells(self, device: str, quick: bool) -> list[Cell]:
        return self.build(device, quick)


SWEEPS: dict[str, Sweep] = {}


def sweep(name: str, devices: Iterable[str] = ("cuda",), default: Iterable[str] | None = None):
    """Register the decorated `(device, quick) -> list[Cell]` function as the sweep `name`, with
    shapes for `devices` and part of the default selection on `default` (default: all of devices)."""
    devices = tuple(devices)
    default = devices if default is None else tuple(default)
    if set(devices) - set(DEVICES) or set(default) - set(devices):
        raise ValueError(f"sweep {name!r}: devices must be among {DEVICES} and default among them, "
                         f"got {devices} and {default}")

    def register(fn: Callable[[str, bool], list[Cell]]) -> Callable[[str, bool], list[Cell]]:
        if name in SWEEPS:
            raise ValueError(f"sweep {name!r} is registered twice")
        description = (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else ""
        SWEEPS[name] = Sweep(name, description, devices, default, fn)
        return fn

    return register


def device_kind(device: str) -> str:
    return "cuda" if is_cuda(device) else "cpu"


def default_sweeps(device: str) -> list[str]:
    kind = device_kind(device)
    return [s.name for s in SWEEPS.values() if kind in s.default]


def check_sweeps(names: Iterable[str], device: str) -> list[str]:
    """The names, checked: ValueError (one line) for an unknown sweep or one without shapes for the device."""
    names = list(names)
    unknown = [n for n in names if n not in SWEEPS]
    if unknown:
        raise ValueError(f"sweep: unknown sweep(s) {unknown}; one of {sorted(SWEEPS)}")
    kind = device_kind(device)
    elsewhere = [n for n in names if kind not in SWEEPS[n].devices]
    if elsewhere:
        raise ValueError(f"sweep: {elsewhere} have no shapes for {kind}; sweeps for {kind}: "
                         f"{sorted(n for n, s in SWEEPS.items() if kind in s.devices)}")
    return names


def sweep_cells(quick: bool, device: str, variants=None, names: Iterable[str] | None = None) -> list[Cell]:
    """The cells of the named sweeps (default: the device's default sweeps), quick or full,
    optionally for some variants only."""
    names = check_sweeps(names, device) if names else default_sweeps(device)
    cells = dedupe([c for n in names for c in SWEEPS[n].cells(device, quick)])
    if variants:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"variants: unknown {sorted(unknown)}; one of {sorted(VARIANTS)}")
        cells = [c for c in cells if c.variant in set(variants)]
    return cells


# -- building blocks ---------------------------------------------------------------------------


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


def kernel_cells(variant: str, spec: Spec, modes, tag: str, graph: bool = False) -> list[Cell]:
    """One cell per mode; small CUDA forwards (and any forward when graph=True) as graph replays."""
    cost = attention_flops(spec, "fwd") * (16 if spec.dtype == "float32" else 1)
    small = is_cuda(spec.device) and cost < GRAPH_BELOW_FLOPS
    return [Cell(variant, m, spec=spec, graph=(graph or small) and m == "fwd", tags=(tag,)) for m in modes]


def _gpu_base(device: str) -> _Base:
    return _Base(B=4, Hq=16, Sq=4096, D=128, dtype="bfloat16", device=device)


FWD, BOTH = ("fwd",), ("fwd", "fwdbwd")


# -- the default GPU sweeps, in priority order ---------------------------------------------------


@sweep("seq")
def seq(device: str, quick: bool) -> list[Cell]:
    """Sequence length at 16k tokens (the anchors' shapes), causal and not."""
    base = _gpu_base(device)
    if quick:
        return [c for causal in (False, True) for c in kernel_cells("dense", base.replace(Sq=1024, causal=causal),
                                                                     BOTH, "seq")]
    return [c for S, B in ((4096, 4), (1024, 16), (16384, 1)) for causal in (True, False)
            for c in kernel_cells("dense", base.replace(B=B, Sq=S, causal=causal), BOTH, "seq")]


@sweep("window")
def window(device: str, quick: bool) -> list[Cell]:
    """Sliding windows (the anchors' S=8192, W=512) in dense and local, and LocalMHA's blocked window."""
    base = _gpu_base(device)
    if quick:
        win = base.replace(B=2, Sq=2048, causal=True, window=(256, 0))
        return kernel_cells("dense", win, FWD, "window") + kernel_cells("local", win, FWD, "window")
    win = base.replace(B=2, Sq=8192, causal=True, window=(512, 0))
    blocked = base.replace(B=2, Sq=8192, causal=True, block=Block(512, 1, 0))
    return (kernel_cells("dense", win, BOTH, "window") + kernel_cells("local", win, BOTH, "window")
            + kernel_cells("local", blocked, BOTH, "window"))


@sweep("decode")
def decode(device: str, quick: bool) -> list[Cell]:
    """KV-cache decoding and chunked prefill (Sq != Sk, bottom-right): launch-bound, so graphs."""
    base = _gpu_base(device)
    if quick:
        return kernel_cells("dense", base.replace(B=8, Hq=32, Hkv=8, Sq=1, Sk=4096), FWD, "decode", graph=True)
    return (kernel_cells("dense", base.replace(B=16, Hq=32, Hkv=8, Sq=1, Sk=8192), FWD, "decode", graph=True)
            + kernel_cells("dense", base.replace(B=2, Sq=512, Sk=8192, causal=True), FWD, "decode"))


@sweep("gqa")
def gqa(device: str, quick: bool) -> list[Cell]:
    """Grouped-query and multi-query heads (full sweep only)."""
    if quick:
        return []
    base = _gpu_base(device)
    return (kernel_cells("dense", base.replace(B=2, Hq=32, Hkv=8, causal=True), BOTH, "gqa")
            + kernel_cells("dense", base.replace(B=2, Hq=32, Hkv=1, causal=True), FWD, "gqa"))


@sweep("module", devices=("cpu", "cuda"), default=("cuda",))
def module(device: str, quick: bool) -> list[Cell]:
    """One forward cell per seed module, constructor arguments from the seed documents."""
    return module_cells(device)


@sweep("memory")
def memory(device: str, quick: bool) -> list[Cell]:
    """Memory against S at fixed batch: a slope per implementation (S=16384 is in seq)."""
    base = _gpu_base(device)
    sizes = (1024, 2048, 4096) if quick else (1024, 2048, 4096, 8192)
    cells = [c for S in sizes for c in kernel_cells("dense", base.replace(B=1, Sq=S, causal=True), FWD, "memory")]
    if not quick:
        cells += [c for S in (2048, 8192)
                  for c in kernel_cells("dense", base.replace(B=1, Sq=S, causal=True), ("fwdbwd",), "memory")]
    return cells


@sweep("bwd")
def bwd(device: str, quick: bool) -> list[Cell]:
    """The backward alone (full sweep only)."""
    base = _gpu_base(device)
    return [] if quick else [c for causal in (True, False)
                             for c in kernel_cells("dense", base.replace(causal=causal), ("bwd",), "bwd")]


@sweep("head_dim")
def head_dim(device: str, quick: bool) -> list[Cell]:
    """Head dim 64 and 256 (full sweep only)."""
    if quick:
        return []
    base = _gpu_base(device)
    return (kernel_cells("dense", base.replace(D=64, causal=True), BOTH, "head_dim")
            + kernel_cells("dense", base.replace(D=256, causal=True), FWD, "head_dim"))


@sweep("batch_heads")
def batch_heads(device: str, quick: bool) -> list[Cell]:
    """Many sequences of few heads (full sweep only)."""
    return [] if quick else kernel_cells("dense", _gpu_base(device).replace(B=16, Hq=4, causal=True), FWD,
                                         "batch_heads")


@sweep("dtype")
def dtype(device: str, quick: bool) -> list[Cell]:
    """float16 and float32 (full sweep only)."""
    if quick:
        return []
    base = _gpu_base(device)
    return (kernel_cells("dense", base.replace(dtype="float16", causal=True), BOTH, "dtype")
            + kernel_cells("dense", base.replace(B=2, Sq=2048, D=64, dtype="float32", causal=True), FWD, "dtype"))


# -- the default CPU sweep -----------------------------------------------------------------------


@sweep("cpu", devices=("cpu",))
def cpu(device: str, quick: bool) -> list[Cell]:
    """Small float32 shapes, one cell per variant and axis, most telling first."""
    base = _Base(B=1, Hq=2, Sq=128, D=32, dtype="float32", device=device)
    modes = BOTH if quick else ("fwd", "bwd", "fwdbwd")
    cells = kernel_cells("dense", base.replace(causal=True), modes, "seq")
    cells += kernel_cells("local", base.replace(Sq=256, causal=True, window=(32, 0)), FWD, "window")
    cells += kernel_cells("local", base.replace(Sq=256, causal=True, block=Block(32, 1, 0)), FWD, "window")
    cells += module_cells(device)
    cells += kernel_cells("dense", base.replace(causal=False), modes, "seq")
    cells += kernel_cells("dense", base.replace(Hq=4, Hkv=2, causal=True), FWD, "gqa")
    cells += kernel_cells("dense", base.replace(Sq=1, Sk=256), FWD, "decode")
    cells += kernel_cells("dense", base.replace(Sq=256, causal=True, window=(32, 0)), FWD, "window")
    if not quick:
        for S in (64, 256, 512):
            for causal in (False, True):
                cells += kernel_cells("dense", base.replace(Sq=S, causal=causal), modes, "seq")
        cells += kernel_cells("dense", base.replace(D=64, dtype="float64"), FWD, "dtype")
    return cells


# -- focused studies (not in the default selection) ----------------------------------------------


@sweep("anchors", devices=("cpu", "cuda"), default=())
def anchors(device: str, quick: bool) -> list[Cell]:
    """The anchor figures' shapes: 16k tokens causal and not, and the sliding window W=512 at S=8192."""
    if is_cuda(device):
        base, win = _gpu_base(device), dict(B=2, Sq=8192, window=(512, 0))
    else:
        base, win = _Base(B=1, Hq=2, Sq=128, D=32, dtype="float32", device=device), dict(B=1, Sq=256, window=(32, 0))
    cells = [c for causal in (False, True) for c in kernel_cells("dense", base.replace(causal=causal), BOTH,
                                                                  "anchors")]
    win = base.replace(causal=True, **win)
    return cells + kernel_cells("dense", win, BOTH, "anchors") + kernel_cells("local", win, BOTH, "anchors")


@sweep("local_memory", devices=("cpu", "cuda"), default=())
def local_memory(device: str, quick: bool) -> list[Cell]:
    """Local attention (causal window W=512) from S=1024 to 16384: linear memory for windowed kernels."""
    if is_cuda(device):
        base = _gpu_base(device).replace(B=2, causal=True, window=(512, 0))
        sizes = (1024, 2048, 4096, 8192, 16384)
    else:
        base = _Base(B=1, Hq=2, Sq=128, D=32, dtype="float32", device=device).replace(causal=True, window=(32, 0))
        sizes = (128, 256)
    if quick:
        sizes = sizes[:3]
    return [c for S in sizes for c in kernel_cells("local", base.replace(Sq=S, Sk=None), BOTH, "local_memory")]


@sweep("moa", devices=("cpu", "cuda"), default=())
def moa(device: str, quick: bool) -> list[Cell]:
    """Mixture-of-attention routing half the tokens against dense attention on the same input."""
    cuda = is_cuda(device)
    H, dh, dim = (16, 64, 1024) if cuda else (2, 32, 64)
    lengths = ((4096,) if quick else (4096, 16384)) if cuda else (128,)
    dtype = "bfloat16" if cuda else "float32"
    cells: list[Cell] = []
    for N in lengths:
        dense = Spec(B=1, Hq=H, Sq=N, D=dh, dtype=dtype, device=device)
        cells += kernel_cells("dense", dense, BOTH, "moa")
        for E in (1, 2):  # routed: N/2 queries, N/2 keys plus the null key, per expert; with the module's mask
            routed = dense.replace(B=E, Sq=N // 2, Sk=N // 2 + 1)
            cells += kernel_cells("dense", routed, BOTH, "moa")
            cells += kernel_cells("dense", routed.replace(key_lengths=(N // 2 + 1,) * E), BOTH, "moa")
            kwargs = dict(dim=dim, num_routed_queries=N // 2, num_routed_key_values=N // 2, num_experts=E,
                          heads=H, dim_head=dh)
            case = ModuleCase(tuple(sorted(kwargs.items())), B=1, S=N, dtype=dtype, device=device)
            cells.append(Cell("MixtureOfAttention", "fwd", module=case, tags=("moa",)))
        block = dict(dim=dim, heads=H, dim_head=dh, causal=False)
        case = ModuleCase(tuple(sorted(block.items())), B=1, S=N, dtype=dtype, device=device)
        cells.append(Cell("FlashAttentionTwo", "fwd", module=case, tags=("moa",)))
    return cells


def varlen_lengths(short: tuple[int, int, int], long: tuple[int, int, int], seed: int = 0) -> tuple[int, ...]:
    """A fixed, seeded length mix: short = (count, lo, hi) and long = (count, lo, hi), each length
    drawn uniformly in [lo, hi], the long ones spread among the short ones."""
    g = torch.Generator().manual_seed(seed)
    lengths = [int(n) for count, lo, hi in (short, long) for n in torch.randint(lo, hi + 1, (count,), generator=g)]
    return tuple(lengths[int(i)] for i in torch.randperm(len(lengths), generator=g))


@sweep("varlen", devices=("cpu", "cuda"), default=())
def varlen(device: str, quick: bool) -> list[Cell]:
    """Packed batches (Impl.varlen): 64 sequences of 128-512 tokens and 4 of 4096-8192, causal and not."""
    if is_cuda(device):
        lengths = varlen_lengths((64, 128, 512), (4, 4096, 8192))
        base = VarlenSpec(seqlens=tuple((n, n) for n in lengths), Hq=16, D=128, dtype="bfloat16", device=device)
    else:
        lengths = varlen_lengths((3, 8, 32), (1, 64, 96))
        base = VarlenSpec(seqlens=tuple((n, n) for n in lengths), Hq=2, D=32, device=device)
    return [Cell("dense", m, spec=base.replace(causal=causal), tags=("varlen",)) for causal in (False, True)
            for m in BOTH]


@sweep("paged_decode", devices=("cpu", "cuda"), default=())
def paged_decode(device: str, quick: bool) -> list[Cell]:
    """Decoding (Sq=1) over a paged KV cache (Impl.paged), Sk 4k-128k, blocks of 16 and 256 tokens."""
    if is_cuda(device):
        fields = dict(Hq=32, Hkv=8, D=128, dtype="bfloat16")
        B, lengths, sizes = 8, (4096, 16384) if quick else (4096, 16384, 65536, 131072), (16, 256)
    else:
        fields, B, lengths, sizes = dict(Hq=4, Hkv=2, D=32), 2, (256,), (16, 256)
    return [Cell("dense", "fwd", spec=PagedSpec(cache_seqlens=(n,) * B, block_size=size, device=device, **fields),
                 graph=is_cuda(device), tags=("paged_decode",)) for n in lengths for size in sizes]


@sweep("score_features", devices=("cpu", "cuda"), default=())
def score_features(device: str, quick: bool) -> list[Cell]:
    """Soft cap (30), ALiBi slopes and attention sinks beside the plain kernel on one dense shape."""
    if is_cuda(device):
        base = _gpu_base(device)
    else:
        base = _Base(B=1, Hq=2, Sq=128, D=32, dtype="float32", device=device)
    cells = []
    for causal in (False, True):
        for extra in ({}, dict(softcap=30.0), dict(alibi=True), dict(sinks=True)):
            cells += kernel_cells("dense", base.replace(causal=causal, **extra), BOTH, "score_features")
    return cells


@sweep("fp8", devices=("cpu", "cuda"), default=())
def fp8(device: str, quick: bool) -> list[Cell]:
    """fp8 (e4m3 q, k, v with descales, bfloat16 out) beside bfloat16 on the same shapes, forward only."""
    if is_cuda(device):
        base = _gpu_base(device)
        shapes = [dict(causal=False), dict(causal=True)] + ([] if quick else [dict(D=64, causal=True),
                                                                               dict(B=1, Sq=16384, causal=True)])
    else:
        base = _Base(B=1, Hq=2, Sq=128, D=32, dtype="bfloat16", device=device)
        shapes = [dict(causal=False), dict(causal=True)]
    return [c for shape in shapes for fp8 in (False, True)
            for c in kernel_cells("dense", base.replace(fp8=fp8, **shape), FWD, "fp8")]


def module_cells(device: str) -> list[Cell]:
    """One forward cell per seed module, constructor arguments from the seed documents."""
    cuda = is_cuda(device)
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
