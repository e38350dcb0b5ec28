"""Where a GPU property row's time goes, per implementation: the first call of a new compiled
specialization (forward, then forward + backward), a repeat call, a call at a new length with
the same specialization, the float64 oracle of the same spec, and (Triton) the autotuner's first
call against one spread config. Process start-up is timed by the caller (`time python3 -c ...`).

Usage: python3 scripts/gpu/where_time_goes.py OUT.json [IMPL ...]   (default: dense/triton
dense/flash_attn4). Prints one table; each measurement runs once (compile times are the point).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time

import torch

from attnbench.oracles.dense import reference
from attnbench.registry import registry
from attnbench.spec import Spec


def timed(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def call(impl, spec: Spec, backward: bool) -> None:
    x = spec.make_inputs(requires_grad=backward)
    out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
    if backward:
        out.float().sum().backward()


def measure(impl, D: int, causal: bool) -> dict:
    base = Spec(B=2, Hq=8, Hkv=2, Sq=300, Sk=300, D=D, dtype="bfloat16", causal=causal, device="cuda")
    other = base.replace(Sq=517, Sk=517)
    row = {"impl": impl.key, "D": D, "causal": causal}
    row["fwd_first_s"] = timed(lambda: call(impl, base, False))
    row["fwd_repeat_s"] = timed(lambda: call(impl, base, False))
    row["fwd_new_length_s"] = timed(lambda: call(impl, other, False))
    row["bwd_first_s"] = timed(lambda: call(impl, base, True))
    row["bwd_repeat_s"] = timed(lambda: call(impl, base, True))
    row["bwd_new_length_s"] = timed(lambda: call(impl, other.replace(Sq=771, Sk=771), True))
    x = base.make_inputs()
    row["oracle_f64_s"] = timed(lambda: reference(base, x))
    return row


def main(out: str, keys: list[str]) -> None:
    reg = registry()
    rows = []
    for key in keys:
        impl = reg.get(key)
        if impl.unavailable():
            rows.append({"impl": key, "unavailable": impl.unavailable()})
            continue
        for D, causal in ((128, True), (64, False)):
            rows.append(measure(impl, D, causal))
        if impl.name == "triton":  # the autotuner's first call at a fresh specialization vs spread
            for mode in ("spread", "1"):
                os.environ["ATTNBENCH_TRITON_AUTOTUNE"] = mode
                spec = Spec(B=2, Hq=8, Sq=333 + len(mode), Sk=333 + len(mode), D=96, dtype="float16",
                            window=(17, 3), device="cuda")
                rows.append({"impl": key, "autotune": mode, "fwd_bwd_first_s": timed(functools.partial(call, impl, spec, True))})
            os.environ["ATTNBENCH_TRITON_AUTOTUNE"] = "spread"
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)
    for row in rows:
        print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:] or ["dense/triton", "dense/flash_attn4"])
