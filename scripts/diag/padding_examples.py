"""The padding property's ci examples for one implementation, one process each (sixth session:
the dense/flex row never finished inside a 10-minute call; twice it sat in one ptxas run of a
flex forward for minutes). Lists the examples the derandomized ci profile draws with this
machine's Hypothesis, or runs one of them through the property's body and says how long it took.

    python3 scripts/diag/padding_examples.py dense/flex --list
    python3 scripts/diag/padding_examples.py dense/flex --run 5 [--device cuda]

A run prints "example I: pass|skip|FAIL ... in T s"; SIGUSR1 dumps every thread's stack.
"""

from __future__ import annotations

import argparse
import faulthandler
import signal
import time

from hypothesis import settings

import properties.profiles  # noqa: F401  (registers the profiles)
from attnbench.registry import registry

settings.load_profile("ci")  # before the property module is imported, as properties/conftest.py does
import properties.test_masking as tm  # noqa: E402


def examples(impl, device: str) -> list:
    """(spec, P) of every example the ci profile draws, in order (the body is not run)."""
    seen = []
    body = tm.check_padding_appended
    tm.check_padding_appended = lambda impl_, spec, P, measure=None: seen.append((spec, P))
    try:
        tm.test_padding_appended_changes_nothing(impl=impl, device=device, measure=lambda r: None)
    finally:
        tm.check_padding_appended = body
    return seen


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("impl")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--run", type=int, default=None)
    args = ap.parse_args()
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    impl = registry().get(args.impl)
    drawn = examples(impl, args.device)
    if args.list or args.run is None:
        for i, (spec, P) in enumerate(drawn):
            print(f"{i} P={P} {spec.short()}", flush=True)
        return
    spec, P = drawn[args.run]
    padded = spec.replace(Sq=spec.Sq + P, Sk=spec.Sk + P, key_lengths=spec.key_lengths or (spec.Sk,) * spec.B)
    t0 = time.perf_counter()
    if not impl.covers(padded):
        print(f"example {args.run}: skip (padded spec not covered: {impl.why_not(padded)}) {spec.short()} P={P}")
        return
    print(f"example {args.run}: start P={P} {spec.short()}", flush=True)
    try:
        tm.check_padding_appended(impl, spec, P)
        print(f"example {args.run}: pass in {time.perf_counter() - t0:.1f} s", flush=True)
    except Exception as exc:  # noqa: BLE001 - reported, the diagnosis goes on
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"example {args.run}: FAIL in {time.perf_counter() - t0:.1f} s: {type(exc).__name__}: {first[:600]}",
              flush=True)


if __name__ == "__main__":
    main()
