"""Compare the dense kernels' PTX of impls/_triton_kernels.py with a git revision's, on the CPU.

A branch of the Triton kernels behind a constexpr (IS_VARLEN, say) should leave the dense
specialization the same code. This compiles attn_fwd, attn_bwd_dkdv and attn_bwd_dq for sm_90
(Triton's bundled ptxas; no GPU needed) from the working tree and from REV, with the arguments
impls/triton.py passes for a few dense calls (captured, not launched), and compares the PTX
bodies with register and parameter names normalized (parameters by argument name, so an added
argument shows only in the parameter list). It also compiles the working tree's packed (varlen)
specialization. About 10 s per kernel and spec on a 2-core box.

    python scripts/triton_dense_ptx.py [--rev main]

Exit status 1 when a dense kernel's PTX body differs.
"""

from __future__ import annotations

import argparse
import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNELS = "impls/_triton_kernels.py"
META = {"BLOCK_M": 64, "BLOCK_N": 64}
OPTIONS = {"num_warps": 4, "num_stages": 3}


def load(path: Path, name: str):
    """The kernel file, compiled (TRITON_INTERPRET=0 from here on: compiling reads it too)."""
    os.environ["TRITON_INTERPRET"] = "0"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def captured_calls() -> dict[str, list[tuple[str, dict]]]:
    """{case: [(kernel kind, keyword arguments)]} of what impls/triton.py launches, forward and
    backward, for a few dense calls and one packed call (launches replaced by a recorder)."""
    from attnbench.impls import triton as tri
    from attnbench.packing import cu_seqlens
    from attnbench.spec import Config

    calls: list[tuple[str, dict]] = []
    real = tri._launch
    tri._launch = lambda kind, length, block, heads, interpret, **kw: calls.append((kind, kw))
    try:
        cases = {}
        q, k, v = (torch.randn(2, 4, 40, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
        for name, cfg in (("plain", Config(scale=0.125)), ("causal_softcap", Config(scale=0.125, causal=True, softcap=30.0))):
            calls.clear()
            out, lse = tri.attention(q, k, v, cfg)
            out.float().sum().backward()
            cases[name] = list(calls)
        calls.clear()
        bias = torch.randn(2, 4, 40, 40, dtype=torch.float16)
        kpm = torch.ones(2, 40, dtype=torch.bool)
        out, lse = tri.attention(q, k, v, Config(scale=0.125, window=(8, 0)), kpm, bias)
        out.float().sum().backward()
        cases["window_bias_padding"] = list(calls)
        calls.clear()
        qp, kp, vp = (torch.randn(50, 4, 64, dtype=torch.float16, requires_grad=True) for _ in range(3))
        cu = cu_seqlens([10, 40])
        out, lse = tri.varlen(qp, kp, vp, cu, cu, 40, 40, Config(scale=0.125, causal=True))
        out.float().sum().backward()
        cases["varlen"] = list(calls)
    finally:
        tri._launch = real
    return {case: [(kind, {n: _described(v) for n, v in kw.items()}) for kind, kw in calls]
            for case, calls in cases.items()}


def _described(value):
    """A tensor as its pointer type ("*fp16"), anything else as itself."""
    if isinstance(value, torch.Tensor):
        return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32",
                      torch.uint8: "u8", torch.bool: "i1"}[value.dtype]
    return value


def _type(value) -> str:
    if isinstance(value, str) and value.startswith("*"):
        return value
    return "fp32" if isinstance(value, float) else "i32"


def compile_ptx(fn, kwargs: dict) -> str:
    """fn's PTX body for these arguments, parameters named by argument, registers renumbered."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    args = {**kwargs, **META}
    constexprs = {fn.arg_names[i] for i in fn.constexprs}
    missing = [n for n in fn.arg_names if n not in args]
    if missing:
        raise KeyError(f"{fn.__name__}: impls/triton.py passes no {missing}")
    signature = {n: "constexpr" if n in constexprs else _type(args[n]) for n in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={n: args[n] for n in fn.arg_names if n in constexprs})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=OPTIONS).asm["ptx"]
    runtime = [n for n in fn.arg_names if n not in constexprs] + ["global_scratch", "profile_scratch"]
    ptx = re.sub(r"_param_(\d+)\b", lambda m: "_param_" + runtime[int(m.group(1))], ptx)
    body = ptx.split(")\n", 1)[1]
    seen: dict[str, str] = {}
    count: Counter = Counter()

    def rename(m):
        if m.group(0) not in seen:
            seen[m.group(0)] = f"%{m.group(1)}#{count[m.group(1)]}"
            count[m.group(1)] += 1
        return seen[m.group(0)]

    lines = [line for line in body.splitlines() if line.strip() and not re.match(r"\s*(\.loc|\.file|//)", line)]
    return "\n".join(re.sub(r"%(rd|r|f|p|rs|h|b)\d+", rename, line) for line in lines).split("\t.section\t.debug")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rev", default="main", help="git revision to compare with (default: main)")
    parser.add_argument("--capture", action="store_true", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.capture:
        print(json.dumps(captured_calls()))
        return 0
    rev = options.rev
    # Triton fixes interpreted-or-compiled for its own library when first imported: the capture
    # (impls/triton.py's host code on cpu tensors, interpreted) runs in a process of its own
    capture = subprocess.run([sys.executable, __file__, "--capture"], capture_output=True, text=True,
                             env={**os.environ, "TRITON_INTERPRET": "1"})
    if capture.returncode:
        sys.exit(f"triton_dense_ptx: the capture failed:\n{capture.stderr}")
    cases = json.loads(capture.stdout.splitlines()[-1])
    old_text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{KERNELS}"], capture_output=True, text=True,
                              check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        old_path = Path(tmp) / "old_kernels.py"
        old_path.write_text(old_text)
        old, new = load(old_path, "ptx_old_kernels"), load(ROOT / KERNELS, "ptx_new_kernels")
    differ = 0
    for case, calls in cases.items():
        for kind, kwargs in calls:
            new_ptx = compile_ptx(new.RAW[kind], kwargs)
            if case == "varlen":
                print(f"{case:20s} {kind:5s} compiles ({len(new_ptx.splitlines())} PTX lines)")
                continue
            old_ptx = compile_ptx(old.RAW[kind], kwargs)
            diff = [d for d in difflib.unified_diff(old_ptx.splitlines(), new_ptx.splitlines(), lineterm="", n=0)
                    if d[:1] in "+-" and d[:3] not in ("+++", "---")]
            differ += bool(diff)
            print(f"{case:20s} {kind:5s} {'same PTX' if not diff else f'{len(diff)} PTX lines differ'} "
                  f"({len(new_ptx.splitlines())} lines)")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
