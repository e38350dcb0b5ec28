"""Calibrate the tolerance rule: does it pass every correct kernel?

    python -m attnbench.properties.calibrate [--cases 500] [--dtypes float32 ...] [--jobs 2]
        [--device cpu] [--seed 0] [--out evidence/tolerance_calibration.json] [--raw rows.jsonl]

With --fp8 it draws fp8 specs instead and measures the fp8 model (tolerance.fp8_scales) on the
orderings of orderings.FP8_ORDERINGS, forward only, plus one broken kernel the rule must catch
(evidence/tolerance_calibration_fp8.json: `--fp8 --cases 400`).

evidence/tolerance_calibration.json is `--cases 800 --jobs 2` (16 minutes on the shared 2-core
box under load; the default 500 cases per dtype takes a few minutes on an idle one).

For each dtype, draws `--cases` specs from the property suite's own strategy (everything naive
covers: masks, padding, bias with -inf entries, GQA, cross lengths, scales, magnitudes up to 8,
soft caps, ALiBi slopes and sinks)
and runs the float64 oracle, the naive reference and each correct ordering of
properties/orderings.py, forward and backward, on the same inputs. Every quantity of every
ordering goes through tolerance.compare exactly as the properties call it. A ratio over 1 is a
false alarm of the rule on a correct kernel; the target is none.

Writes a JSON summary (per dtype, quantity and ordering: cases, false alarms, worst ratio and
its spec, median and 99th percentile), the same counts under the rule as it was before the
error model (for comparison only), and prints a table. Exits 1 when the rule raised any false
alarm, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

DTYPES = ("float32", "float16", "bfloat16", "float64")
FP8 = "float8_e4m3fn"  # --fp8: the rule's fp8 model (tolerance.FP8), measured by measure_fp8

# The rule before the error model (K x naive's error + a per-dtype floor of the term magnitude),
# kept here only to report how often it failed the same correct orderings.
OLD_FLOOR = {"out": 1.0, "lse": 1.0, "dq": 2.0, "dk": 2.0, "dv": 2.0, "dbias": 2.0, "dsinks": 2.0}
OLD_FLOOR_ULPS = {"float64": 1024.0, "float32": 16.0, "float16": 2.0, "bfloat16": 2.0}


def old_allowed(quantity: str, reference_error: float, dtype: str, oracle_magnitude: float, terms: float) -> float:
    from attnbench.properties import tolerance

    floor = OLD_FLOOR[quantity] * OLD_FLOOR_ULPS[dtype] * tolerance.EPS[dtype]
    return tolerance.K[quantity] * reference_error + floor * max(1.0, oracle_magnitude, terms)


def measure(dtype: str, cases: int, seed: int, device: str, use: tuple[str, ...] = ()) -> list[dict]:
    """One row per (spec, ordering, quantity): the new ratio, the old ratio and what made them."""
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from attnbench.properties import harness, tolerance
    from attnbench.properties.orderings import ORDERINGS
    from attnbench.properties.strategies import specs_for
    from attnbench.registry import registry

    torch.set_num_threads(1)
    naive = registry().reference("dense")
    rows: list[dict] = []

    @hseed(seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(specs_for(naive, ("backward", "lse"), device, use=use, dtype=dtype))
    def one(spec):
        inputs = harness.fresh_inputs(spec, naive, grad=True)
        want = harness.run_oracle(spec, inputs, grad=True)
        ref = harness.run_impl(naive, spec, harness.clone_inputs(inputs), grad=True)
        scales = harness.scales_of(spec, inputs)
        terms, logits = tolerance.term_magnitudes(
            inputs.q, inputs.k, inputs.v, inputs.grad_out, spec.config(), inputs.key_padding_mask, inputs.bias,
            **inputs.score_kwargs())
        names = ["out", "lse", *sorted(want.grads)]
        for order, fn in ORDERINGS.items():
            got = harness.call(fn, harness.clone_inputs(inputs), spec.config(), grad=True)
            for name in names:
                verdict = tolerance.compare(name, got.get(name), want.get(name), ref.get(name), dtype, scales.get(name))
                ref_error = tolerance.max_error(ref.get(name), want.get(name))[0]
                old = verdict.error / old_allowed(name, ref_error, dtype, tolerance.magnitude(want.get(name)),
                                                  terms.get(name, 0.0))
                rows.append(dict(order=order, quantity=name, ratio=verdict.ratio, old_ratio=old, spec=spec.short(),
                                 error=verdict.error, reference_error=ref_error, logits=logits,
                                 terms=terms.get(name, 0.0), magnitude=tolerance.magnitude(want.get(name))))

    one()
    return rows


def measure_fp8(cases: int, seed: int, device: str) -> list[dict]:
    """measure() for fp8 specs (`--fp8`): the orderings of orderings.FP8_ORDERINGS against the
    oracle under the rule's fp8 model, forward only; and one broken kernel (the zoo's
    fp8_descale_in_p, rows marked broken=True), which the rule must catch."""
    import torch
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from attnbench.properties import harness, tolerance
    from attnbench.properties.orderings import FP8_ORDERINGS
    from attnbench.properties.strategies import caps_for, specs_for
    from attnbench.registry import registry
    from attnbench.zoo.fp8_descale_in_p import fp8_descale_in_p

    torch.set_num_threads(1)
    naive = registry().reference("dense")
    kernels = {**{name: (fn, False) for name, fn in FP8_ORDERINGS.items()}, "broken:descale_in_p": (fp8_descale_in_p.fn, True)}
    rows: list[dict] = []
    # the GPU's ordinary sizes (up to 300 keys, head dims to 256) even on the CPU, and one draw in 8
    # with up to 4097 keys (2^22 logits): the rounding of P adds up over the keys, so rows must be long
    caps = dataclasses.replace(caps_for("cuda"), long_length=4097, long_cells=2**22)

    @hseed(seed)
    @settings(max_examples=cases, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(specs_for(naive, ("lse",), device, use=("fp8",), forbid=("softcap", "alibi", "sinks", "dropout"),
                     caps=caps, long="keys"))
    def one(spec):
        inputs = harness.fresh_inputs(spec)
        want = harness.run_oracle(spec, inputs)
        ref = harness.run_impl(naive, spec, harness.clone_inputs(inputs))
        scales = harness.scales_of(spec, inputs)
        for order, (fn, broken) in kernels.items():
            got = harness.call(fn, harness.clone_inputs(inputs), spec.config())
            for name in ("out", "lse"):
                verdict = tolerance.compare(name, got.get(name), want.get(name), ref.get(name), tolerance.FP8,
                                            scales[name])
                ref_error = tolerance.max_error(ref.get(name), want.get(name))[0]
                rows.append(dict(order=order, quantity=name, ratio=verdict.ratio, old_ratio=0.0, spec=spec.short(),
                                 error=verdict.error, reference_error=ref_error, logits=scales["logits"],
                                 terms=0.0, magnitude=tolerance.magnitude(want.get(name)), broken=broken))

    one()
    return rows


def summarize(rows: list[dict]) -> dict:
    """Per quantity and ordering: cases, false alarms (new rule, old rule), ratio percentiles."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["quantity"], r["order"])].append(r)
    out = {}
    for (quantity, order), rs in sorted(groups.items()):
        ratios = sorted(r["ratio"] for r in rs)
        worst = max(rs, key=lambda r: r["ratio"])
        out[f"{quantity}/{order}"] = dict(
            cases=len(rs),
            false_alarms=sum(r["ratio"] > 1 for r in rs),
            worst_ratio=round(worst["ratio"], 4),
            median_ratio=round(ratios[len(ratios) // 2], 4),
            p99_ratio=round(ratios[min(len(ratios) - 1, int(0.99 * len(ratios)))], 4),
            worst_spec=worst["spec"],
            old_rule_false_alarms=sum(r["old_ratio"] > 1 for r in rs),
            old_rule_worst_ratio=round(max(r["old_ratio"] for r in rs), 4),
        )
    return out


def _job(args: tuple) -> tuple[str, list[dict]]:
    dtype, cases, seed, device, use = args
    if dtype == FP8:
        return dtype, measure_fp8(cases, seed, device)
    return dtype, measure(dtype, cases, seed, device, use)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnbench.properties.calibrate", description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=500, help="specs drawn per dtype (default 500)")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--jobs", type=int, default=1, help="worker processes; each dtype splits into jobs chunks")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use", nargs="+", default=[], metavar="FEATURE",
                        help="features every drawn spec uses (e.g. softcap alibi sinks; default: drawn as the suite does)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON summary here")
    parser.add_argument("--raw", type=Path, default=None, help="write every row here (JSON lines), to refit the rule")
    parser.add_argument("--fp8", action="store_true",
                        help="calibrate the fp8 model instead (fp8 specs, orderings.FP8_ORDERINGS, one broken kernel)")
    args = parser.parse_args(argv)
    if args.fp8:
        args.dtypes = [FP8]
    if args.cases < 1 or args.jobs < 1:
        print("calibrate: --cases and --jobs must be at least 1", file=sys.stderr)
        return 2
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print(f"calibrate: --device {args.device} but CUDA is not available", file=sys.stderr)
            return 2
    chunks = [(d, -(-args.cases // args.jobs), args.seed * 1000 + i, args.device, tuple(args.use))
              for d in args.dtypes for i in range(args.jobs)]
    start = time.time()
    rows: dict[str, list[dict]] = defaultdict(list)
    if args.jobs == 1:
        results = map(_job, chunks)
    else:
        # spawn, not fork: a forked worker cannot use CUDA once the parent has touched it
        results = ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")).map(_job, chunks)
    for dtype, rs in results:
        rows[dtype].extend(rs)
    report = dict(
        command="python -m attnbench.properties.calibrate " + " ".join(argv if argv is not None else sys.argv[1:]),
        device=args.device, seconds=round(time.time() - start, 1),
        dtypes={d: dict(specs=len({r["spec"] for r in rs}), rows=len(rs),
                        false_alarms=sum(r["ratio"] > 1 for r in rs if not r.get("broken")),
                        old_rule_false_alarms=sum(r["old_ratio"] > 1 for r in rs),
                        by_quantity=summarize(rs), **_broken(rs)) for d, rs in rows.items()},
    )
    _print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1) + "\n")
    if args.raw:
        args.raw.write_text("".join(json.dumps(dict(dtype=d, **r)) + "\n" for d, rs in rows.items() for r in rs))
    return 1 if any(d["false_alarms"] for d in report["dtypes"].values()) else 0


def _broken(rows: list[dict]) -> dict:
    """For the broken kernel's rows (measure_fp8): on how many specs the rule caught it."""
    broken = [r for r in rows if r.get("broken")]
    if not broken:
        return {}
    specs = {r["spec"] for r in broken}
    caught = {r["spec"] for r in broken if r["ratio"] > 1}
    return dict(broken_specs=len(specs), broken_caught_specs=len(caught))


def _print(report: dict) -> None:
    print(f"{'dtype':9} {'quantity/ordering':24} {'cases':>6} {'alarms':>6} {'worst':>7} {'p99':>7} {'old alarms':>10}")
    for dtype, d in report["dtypes"].items():
        for key, s in d["by_quantity"].items():
            print(f"{dtype:9} {key:24} {s['cases']:6d} {s['false_alarms']:6d} {s['worst_ratio']:7.3g} "
                  f"{s['p99_ratio']:7.3g} {s['old_rule_false_alarms']:10d}")
    total = sum(d["false_alarms"] for d in report["dtypes"].values())
    old = sum(d["old_rule_false_alarms"] for d in report["dtypes"].values())
    specs = sum(d["specs"] for d in report["dtypes"].values())
    print(f"{specs} specs, {total} false alarms ({old} under the old rule), {report['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
