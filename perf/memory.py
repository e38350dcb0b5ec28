"""Peak memory against sequence length: fit the growth exponent of each implementation.

Rows that agree on everything but the sequence length (same variant, implementation, mode,
batch, heads, head dim, masking, dtype) form a series; the slope of log(memory) against
log(S) is the exponent: about 1 for blockwise and fused kernels (O(S) extra memory: the
output and the softmax statistics), about 2 for anything that materializes the S x S scores.
An implementation that declares `memory="linear"` in its Impl must fit an exponent <= 1.3.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import asdict, dataclass

from attnbench.results import PerfRow, Results

LINEAR_MAX = 1.3  # exponent allowed for a linear-memory implementation (constant overheads bend small S)
QUADRATIC_MIN = 1.7


@dataclass
class MemoryFit:
    variant: str
    impl: str
    mode: str
    series: str  # the fixed part of the shape
    S: list[int]
    mem_bytes: list[int]
    exponent: float
    verdict: str  # linear | quadratic | between
    expected: str = ""  # the Impl's declared memory model ("linear" or "")
    ok: bool = True  # False when declared linear but measured worse


def fit_exponent(S: list[float], mem: list[float]) -> float:
    """Least-squares slope of log(mem) against log(S)."""
    if len(S) != len(mem) or len(S) < 2:
        raise ValueError(f"S, mem: need two or more paired points, got {len(S)} and {len(mem)}")
    if min(S) <= 0 or min(mem) <= 0:
        raise ValueError("S, mem: need positive values to fit in log space")
    if len(set(S)) < 2:
        raise ValueError("S: need at least two distinct sequence lengths")
    xs, ys = [math.log(s) for s in S], [math.log(m) for m in mem]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def verdict(exponent: float) -> str:
    if exponent <= LINEAR_MAX:
        return "linear"
    if exponent >= QUADRATIC_MIN:
        return "quadratic"
    return "between"


def _series_key(r: PerfRow) -> str:
    fixed = {k: v for k, v in r.shape.items() if k not in ("Sq", "Sk", "S")}
    return json.dumps(fixed, sort_keys=True, default=str)


def _length(r: PerfRow) -> int | None:
    s = r.shape
    if "Sq" in s:
        return s["Sk"] if s["Sq"] == s["Sk"] else None  # self-attention series only
    return s.get("S")


def memory_fits(rows: list[PerfRow], min_points: int = 3, declared: dict[str, str] | None = None) -> list[MemoryFit]:
    """One fit per (variant, impl, mode, fixed shape) series with >= min_points lengths.

    declared: {"variant/impl": "linear"}; default: read from the registry (Impl.memory)."""
    series: dict[tuple, dict[int, int]] = defaultdict(dict)
    for r in rows:
        S = _length(r)
        if r.status == "ok" and r.mem_bytes and S:
            series[(r.variant, r.impl, r.mode, _series_key(r))][S] = r.mem_bytes
    declared = _declared() if declared is None else declared
    fits = []
    for (variant, impl, mode, key), points in sorted(series.items()):
        if len(points) < min_points:
            continue
        S = sorted(points)
        mem = [points[s] for s in S]
        exp = fit_exponent(S, mem)
        expected = declared.get(f"{variant}/{impl}", "")
        ok = not (expected == "linear" and exp > LINEAR_MAX)
        fits.append(MemoryFit(variant, impl, mode, key, S, mem, round(exp, 3), verdict(exp), expected, ok))
    return fits


def _declared() -> dict[str, str]:
    try:
        from attnbench.registry import registry

        return {k: getattr(i, "memory", "") for k, i in registry().impls.items() if getattr(i, "memory", "")}
    except Exception:  # reading stored results without the implementations
        return {}


def attach(results: Results) -> list[MemoryFit]:
    """Fit the results' memory series and record them in results.env["memory_fits"]."""
    fits = memory_fits(results.perf)
    results.env["memory_fits"] = [asdict(f) for f in fits]
    return fits


def table(fits: list[MemoryFit]) -> str:
    lines = [f"{'variant/impl':32} {'mode':6} {'S':>18} {'exponent':>8}  verdict"]
    for f in fits:
        flag = "" if f.ok else f"  FAIL: declared {f.expected}"
        lines.append(f"{f.variant + '/' + f.impl:32} {f.mode:6} {f'{f.S[0]}..{f.S[-1]}':>18} {f.exponent:8.2f}  "
                     f"{f.verdict}{flag}")
    return "\n".join(lines)
