"""How many compiled Triton specializations a GPU property run of dense/triton asks for, counted
on the CPU: draws specs for "cuda" the way the properties do (the compile palette applies unless
--full-palette), runs impls/triton.py's forward and backward on CPU copies with every kernel
launch captured instead of run, and counts the distinct keys Triton would compile, formed as
Triton forms them: each constexpr and the launch config (ATTNBENCH_TRITON_AUTOTUNE=spread's
pick), each tensor's dtype and 16-byte alignment, each int as 1, a multiple of 16, or neither.
It also counts them as if the length-like ints (Sq, Sk, off, window sizes, Hq, GROUP) were not
specialized (Triton's do_not_specialize).

    python scripts/triton_specializations.py [--examples 250] [--full-palette]

The count approximates the compiles of one verify run: its test processes share one disk cache.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")  # the CPU path of impls/triton.py (no launch runs)

import torch  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attnbench.impls import triton as tri  # noqa: E402
from attnbench.properties import strategies  # noqa: E402
from attnbench.registry import registry  # noqa: E402

LENGTHS = {"Sq", "Sk", "off", "left", "right", "W", "LB", "LF", "SHIFT_B", "Hq", "Hkv", "GROUP"}


def _int_class(value: int) -> str:
    return "1" if value == 1 else "16" if value % 16 == 0 else "n"


def key_of(kind: str, kwargs: dict, generic_lengths: bool) -> tuple:
    ker = tri.kernels(True)
    fits = ker.PRUNE[kind](ker.CONFIGS[kind], {}, **kwargs) if kind in ker.PRUNE else []
    config = None
    if fits:
        config = fits[tri.spread_index(ker, kind, kwargs, len(fits))] if len(fits) > 1 else fits[0]
        config = (tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages)
    parts = []
    for name, value in sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool) or isinstance(value, str):
            parts.append((name, value))
        elif isinstance(value, int):
            parts.append((name, "x" if generic_lengths and name in LENGTHS else _int_class(value)))
        else:
            parts.append((name, type(value).__name__))
    return kind, config, tuple(parts)


def count(examples: int, full_palette: bool) -> dict:
    impl = registry().get("dense/triton")
    strategies.use_full_palette(full_palette)
    keys = {False: set(), True: set()}
    seen = {"specs": 0}

    def capture(kind, length, block, heads, interpret, **kwargs):
        for generic in (False, True):
            keys[generic].add(key_of(kind, kwargs, generic))

    tri._launch = capture

    @settings(max_examples=examples, derandomize=True, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def draw(data):
        needs = data.draw(st.sampled_from(((), ("backward",), ("lse",))))
        spec = data.draw(strategies.specs_for(impl, needs, "cuda")).replace(device="cpu")
        if spec.dtype == "bfloat16":  # the CPU path refuses bfloat16 (the interpreter's bf16 dot)
            spec = spec.replace(dtype="float16")
        x = spec.make_inputs(requires_grad="backward" in needs)
        out, lse = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias, **x.score_kwargs())
        if "backward" in needs:
            out.float().sum().backward()
        seen["specs"] += 1

    draw()
    return {"specs": seen["specs"], "keys": len(keys[False]), "keys_generic_lengths": len(keys[True])}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--examples", type=int, default=250)
    p.add_argument("--full-palette", action="store_true")
    args = p.parse_args(argv)
    result = count(args.examples, args.full_palette)
    palette = "full head dims and groups" if args.full_palette else "compile palette"
    print(f"{palette}: {result['specs']} specs -> {result['keys']} Triton specializations; "
          f"{result['keys_generic_lengths']} with the length-like ints not specialized")
    return 0


if __name__ == "__main__":
    sys.exit(main())
