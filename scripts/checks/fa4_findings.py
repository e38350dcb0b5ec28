"""Re-checks FlashAttention-4's declared limits (impls/flash_attn4.py's module docstring and
its `supports`): each suspect spec against the float64 oracle through the suite's own harness and
tolerance rule (properties.harness.verdicts), the adapter's kernel called directly so its
declarations do not hide the kernel's answer.

An illegal memory access poisons the CUDA context of its process, so every crash suspect runs
in a process of its own; the others share one process per group (FA4's import takes ~8 s).
Processes run side by side on the one GPU. One line per spec (ok / NaN / error ratio / the
error or signal that ended it, and what the adapter declares), and JSON to argv[1].

    source scripts/gpu/env.sh && python3 scripts/checks/fa4_findings.py "$OUT/fa4_findings.json"

Run by scripts/gpu/findings.sh. Evidence: evidence/h200/fa4_findings-2026-12-03.json (the
specs before "hopper-dv-fault", which has not run here yet: its fault is in
evidence/h200/verify_times-fa4-palette-2026-12-03.txt).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from attnbench.spec import Spec


def _s(**kw) -> Spec:
    return Spec(dtype="float16", device="cuda", **kw)


# name -> (spec, with gradients, crash suspect: a process of its own)
SUSPECTS: dict[str, tuple[Spec, bool, bool]] = {
    # (1)/(2) scale 0: NaN out and lse (test_forward / test_lse / local gradients)
    "scale0-window": (_s(Sq=5, scale=0.0, window=(4, 4)), False, False),
    "scale0-lse": (_s(Sq=1, scale=0.0), False, False),
    "scale0-grad-local": (_s(Sq=1, scale=0.0, window=(0, None)), True, False),
    "scale0.5-control": (_s(Sq=5, scale=0.5, window=(4, 4)), True, False),
    # (4) a batch element with no kept key (varlen with an empty key sequence)
    "zero-key-batch-grad": (_s(B=2, Sq=2, key_lengths=(0, 2)), True, True),
    "zero-key-batch-fwd": (_s(B=2, Sq=2, key_lengths=(0, 2)), False, True),
    "zero-key-single-fwd": (_s(Sq=1, key_lengths=(0,)), False, True),
    "zero-key-single-grad": (_s(Sq=1, key_lengths=(0,)), True, True),
    # (5) where the illegal memory access may come from: varlen backward, rows with no key
    "varlen-grad-polarity": (_s(B=2, Sq=5, key_lengths=(5, 2)), True, True),
    "varlen-grad-partial": (_s(Sq=17, key_lengths=(13,)), True, True),
    "varlen-grad-keydrop": (_s(B=2, Sq=16, key_drop=0.25, seed=3), True, True),
    "varlen-fwd-sk9": (_s(Sq=3, Sk=9, key_lengths=(5,)), False, True),
    "sq>sk-causal-grad": (_s(Sq=6, Sk=3, causal=True), True, True),
    "sq>sk-causal-fwd": (_s(Sq=6, Sk=3, causal=True), False, True),
    "sq>sk-window-grad": (_s(Sq=9, Sk=5, causal=True, window=(2, 0)), True, True),
    "sq>sk-window-fwd": (_s(Sq=9, Sk=5, causal=True, window=(2, 0)), False, True),
    "sq>sk-window6-grad": (_s(Sq=7, Sk=3, causal=True, window=(6, 0)), True, True),
    # (3) GQA with D != Dv in the backward: FA4's own assertion (declared by head_dims)
    "gqa-dv-grad": (_s(Hq=2, Hkv=1, Sq=8, D=64, Dv=32), True, False),
    # the pinned specs the cascade failed on, gradients included
    "decode-grad": (_s(Sq=1, Sk=17, causal=True, window=(4, 0)), True, False),
    "bottom-right-grad": (_s(Sq=4, Sk=9, causal=True, window=(8, 0)), True, False),
    "window-edges-grad": (_s(Sq=9, window=(3, 2)), True, False),
    "sq<sk-grad": (_s(Sq=5, Sk=8), True, False),
    "window-none0-grad": (_s(Sq=3, Sk=7, window=(None, 0)), True, False),
    "gqa-window-grad": (_s(Hq=4, Hkv=2, Sq=5, window=(2, 2)), True, False),
    "dv-window-grad": (_s(Sq=6, D=16, Dv=32, window=(2, 2)), True, False),
    "overflow-grad": (_s(Sq=8, magnitude=8.0, window=(7, 7)), True, False),
    "batch2-grad": (_s(B=2, Sq=1), True, False),
    "d160-window-fwd": (_s(B=3, Hq=5, Sq=98, D=160, window=(0, None), seed=1), False, False),
    # Hopper forward with Dv > D: an illegal memory access (evidence/h200/verify_times-fa4-palette-2026-12-03.txt)
    "hopper-dv-fault": (_s(B=3, Hq=16, Hkv=8, Sq=129, Sk=31, D=16, Dv=128, causal=True, window=(0, 85),
                           layout="bshd", magnitude=3.0, seed=65535), False, True),
}
BATCH = 4  # non-suspects per process
WORKERS = 10  # processes side by side: two rounds on a 16-core host
TIMEOUT_S = 110  # per process: two rounds stay under four minutes


def _summary(verdicts: dict) -> tuple[str, dict]:
    worst = max(verdicts.values(), key=lambda v: v.ratio if not math.isnan(v.ratio) else math.inf)
    status = "ok" if all(v.ok for v in verdicts.values()) else (
        "NaN" if "NaN" in worst.detail else "non-finite" if not math.isfinite(worst.error) else "error")
    return status, {n: {"ok": v.ok, "error": v.error, "allowed": v.allowed, "ratio": v.ratio, "detail": v.detail}
                    for n, v in verdicts.items()}


def run_here(names: list[str]) -> None:
    """Child: each spec through the harness, one JSON line per spec on stdout."""
    import torch

    from attnbench.impls.flash_attn4 import flash_attn4, flash_attn4_local
    from attnbench.properties.harness import verdicts

    for name in names:
        spec, grad, _ = SUSPECTS[name]
        impl = flash_attn4_local if spec.window is not None and not spec.has_padding else flash_attn4
        row = {"name": name, "spec": spec.short(), "grad": grad,
               "declared": impl.why_not(spec, ("backward",) if grad else ())}
        t = time.perf_counter()
        try:
            status, detail = _summary(verdicts(impl, spec, grad=grad))
            torch.cuda.synchronize()
            row.update(status=status, quantities=detail)
        except Exception as exc:  # the finding itself: FA4's assertion, a CUDA error
            row.update(status="raised", error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        row["seconds"] = round(time.perf_counter() - t, 1)
        print("ROW " + json.dumps(row), flush=True)
        if "illegal" in row.get("error", "") or "CUDA error" in row.get("error", ""):
            return  # the context is poisoned: later specs here would only repeat it


def _child(names: list[str]) -> list[dict]:
    try:
        proc = subprocess.run([sys.executable, __file__, "--child", ",".join(names)], capture_output=True,
                              text=True, timeout=TIMEOUT_S)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, rc = exc.stdout or "", exc.stderr or "", "timeout"
        out, err = (s.decode() if isinstance(s, bytes) else s for s in (out, err))
    rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
    done = {r["name"] for r in rows}
    tail = " | ".join(err.strip().splitlines()[-3:])[:300]
    for name in names:
        if name not in done:
            spec, grad, _ = SUSPECTS[name]
            how = f"signal {-rc}" if isinstance(rc, int) and rc < 0 else f"exit {rc}"
            rows.append({"name": name, "spec": spec.short(), "grad": grad, "status": "crash",
                         "error": f"process ended ({how}) before this spec: {tail}"})
    return rows


def _line(row: dict) -> str:
    what = row.get("error", "")
    if row["status"] in ("ok", "NaN", "error", "non-finite"):
        worst = max(row["quantities"].items(), key=lambda kv: kv[1]["ratio"])
        what = f"worst {worst[0]} ratio {worst[1]['ratio']:.3g} ({worst[1]['detail']})"
    declared = row.get("declared") or "covered"
    return (f"{row['name']:<22} {row['status']:<9} {'fwd+bwd' if row['grad'] else 'fwd':<7} {row['spec']}\n"
            f"{'':<22} {what}\n{'':<22} adapter: {declared}")


def main(path: str) -> int:
    suspects = [[n] for n, (_, _, crash) in SUSPECTS.items() if crash]
    rest = [n for n, (_, _, crash) in SUSPECTS.items() if not crash]
    groups = [rest[i:i + BATCH] for i in range(0, len(rest), BATCH)] + suspects
    start = time.perf_counter()
    with ThreadPoolExecutor(WORKERS) as pool:
        rows = [row for found in pool.map(_child, groups) for row in found]
    rows.sort(key=lambda r: list(SUSPECTS).index(r["name"]))
    for row in rows:
        print(_line(row))
    seconds = round(time.perf_counter() - start, 1)
    print(f"{len(rows)} specs in {seconds} s: " + ", ".join(
        f"{s} {sum(r['status'] == s for r in rows)}" for s in sorted({r['status'] for r in rows})))
    with open(path, "w") as f:
        json.dump({"seconds": seconds, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        run_here(sys.argv[2].split(","))
    elif len(sys.argv) == 2 and not sys.argv[1].startswith("-"):
        sys.exit(main(sys.argv[1]))
    else:
        sys.exit("usage: fa4_findings.py OUT.json")
