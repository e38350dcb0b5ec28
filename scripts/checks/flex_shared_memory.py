"""Re-checks the declared 16-bit shared-memory limits of compiled flex (impls/flex.py
`_flex_limits`, `_forward_smem_16bit`, `WIDE_V_BACKWARD_SMEM`): which shapes do not fit the GPU's
shared memory? Each shard runs its share of D x Dv x (MHA, GQA) x (Sq 1, 130) x (no window,
window (8, 0)) in float16, forward + backward, and prints one line per case: ok, or FAIL with the
phase and the bytes Triton asked for. Shard 0 also prints Inductor's flex config tables for this GPU.

    for i in $(seq 0 13); do python3 scripts/checks/flex_shared_memory.py $i 14 > grid_$i.log & done; wait

Expected while the limit holds: the FAIL lines are exactly the shapes `_flex_limits` declares.
Evidence: evidence/h100/runs/s5-diag/call3-flex_grid.log (H100, torch 2.11).
"""

import itertools
import re
import sys

import torch

from attnbench.registry import registry
from attnbench.spec import Spec

DIMS = [(16, d) for d in (16, 32, 64, 128, 256)] + [(32, d) for d in (32, 64, 128, 256)] + \
       [(64, d) for d in (64, 128, 192, 256)] + [(128, d) for d in (128, 192, 256)] + [(256, 256), (256, 64), (128, 32)]
CASES = list(itertools.product(DIMS, ((4, 4), (4, 2)), (1, 130), (None, (8, 0))))


def tables() -> None:
    from torch._inductor.template_heuristics.triton import CUDAConfigHeuristic

    h = CUDAConfigHeuristic()
    print("h100 fwd table:", getattr(h, "h100_default_flex_config", None), flush=True)
    for d in (16, 32, 64, 128, 256):
        fwd, bwd = h.get_flex_attn_fwd_configs(d, torch.float16), h.get_flex_attn_bwd_configs(d, torch.float16)
        print("fwd configs", d, fwd, "bwd", bwd, flush=True)


def main(shard: int, shards: int) -> None:
    if shard == 0:
        try:
            tables()
        except Exception as exc:  # private API: report, go on
            print("heuristics:", type(exc).__name__, exc, flush=True)
    impl = registry().get("dense/flex")
    for i, ((D, Dv), (Hq, Hkv), Sq, window) in enumerate(CASES):
        if i % shards != shard:
            continue
        spec = Spec(B=1, Hq=Hq, Hkv=Hkv, Sq=Sq, Sk=130, D=D, Dv=Dv, dtype="float16", device="cuda", window=window)
        phase = "fwd"
        try:
            x = spec.make_inputs(requires_grad=True)
            out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
            phase = "bwd"
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            res = "ok"
        except Exception as exc:
            text = " ".join(str(exc).split())
            m = re.search(r"Required: (\d+)", text)
            res = f"FAIL {phase} {type(exc).__name__} required={m.group(1) if m else '?'} {'' if m else text[:200]}"
        print(f"D={D} Dv={Dv} H={Hq}/{Hkv} Sq={Sq} win={window}: {res}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
