"""A deliberately slowed implementation, to show that the gate catches a regression.

Never active by default. `ATTNBENCH_SLOWDOWN="dense/sdpa_efficient=2"` makes the benchmark
wrap that implementation so each call does its work N times (the output of the last call is
returned, so results stay right; only time grows). Runs made this way record the setting in
Results.env["slowdown"].
"""

from __future__ import annotations

import dataclasses
import os

from attnbench.registry import MODULE_VARIANTS, Impl

ENV = "ATTNBENCH_SLOWDOWN"


def parse(value: str) -> dict[str, int]:
    """"variant/name=N,..." -> {"variant/name": N}; N >= 1 repetitions of the work."""
    out: dict[str, int] = {}
    for item in filter(None, (p.strip() for p in value.split(","))):
        key, sep, times = item.partition("=")
        if not sep or "/" not in key:
            raise ValueError(f"{ENV}: expected 'variant/impl=N', got {item!r}")
        try:
            n = int(times)
        except ValueError:
            raise ValueError(f"{ENV}: repetitions must be an integer, got {times!r} in {item!r}") from None
        if n < 1:
            raise ValueError(f"{ENV}: repetitions must be >= 1, got {n} in {item!r}")
        out[key.strip()] = n
    return out


def active() -> dict[str, int]:
    return parse(os.environ.get(ENV, ""))


def slowed(impl: Impl, times: int) -> Impl:
    """The same implementation (same name, so its cells line up), doing its work `times` times."""
    if impl.variant in MODULE_VARIANTS:
        factory = impl.fn

        def build(**kwargs):
            module = factory(**kwargs)
            forward = module.forward

            def repeated(*args, **kw):
                for _ in range(times - 1):
                    forward(*args, **kw)
                return forward(*args, **kw)

            module.forward = repeated
            return module

        fn = build
    else:
        kernel = impl.fn

        def fn(*args, **kwargs):
            for _ in range(times - 1):
                kernel(*args, **kwargs)
            return kernel(*args, **kwargs)

    return dataclasses.replace(impl, fn=fn, description=f"{impl.description} [slowed x{times} by {ENV}]")


def apply(impls: list[Impl], spec: dict[str, int] | None = None) -> list[Impl]:
    spec = active() if spec is None else spec
    return [slowed(i, spec[i.key]) if i.key in spec else i for i in impls]
