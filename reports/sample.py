"""Synthetic results for trying the report renderers without a GPU run.

Nothing here is a measurement: env["synthetic"] is True and every report built from it says so
in its first lines. The numbers follow a simple made-up model (fixed throughput per kernel,
quadratic memory for the materializing kernel) only so the plots have shapes to show. Used by
tests/test_reports.py and scripts/screenshot_report.sh.
"""

from __future__ import annotations

import random

from attnbench.results import CorrectnessRow, PerfRow, Results, ZooRow

PROPERTIES = (
    "output_matches_oracle",
    "lse_matches_oracle",
    "grad_q_matches_oracle",
    "grad_k_matches_oracle",
    "grad_v_matches_oracle",
    "causal_never_sees_future",
    "window_edges_exact",
    "gqa_head_mapping",
    "empty_rows_are_zero",
    "key_padding_ignored",
    "kv_cache_decode_matches",
    "dropout_zero_is_identity",
)

# (made-up) forward TFLOP/s each kernel reaches at long sequences
_SPEED = {"naive": 22.0, "sdpa_flash": 330.0, "flex": 420.0, "triton_fa2": 280.0}


def _replay(impl: str, prop: str, seed: str) -> str:
    return f"attnbench verify --variant dense --impl {impl} --property {prop} --replay {seed} --device cuda"


def correctness_rows() -> list[CorrectnessRow]:
    rng = random.Random(1)
    rows = []
    for impl in ("naive", "sdpa_flash", "flex", "triton_fa2", "flash_attn"):
        for prop in PROPERTIES:
            row = CorrectnessRow("dense", impl, prop, "pass", device="cuda", dtype="bfloat16")
            row.error_ratio = round(rng.uniform(0.02, 0.6), 3) if "matches" in prop else None
            if impl == "flash_attn":
                row.status, row.reason, row.error_ratio = "skip", "flash_attn not installed", None
            elif impl == "sdpa_flash" and prop == "dropout_zero_is_identity":
                row.status, row.reason, row.error_ratio = "skip", "unsupported features: dropout", None
            rows.append(row)
    fail = CorrectnessRow(
        "dense", "triton_fa2", "grad_k_matches_oracle", "fail", device="cuda", dtype="bfloat16",
        reason="dk error is 4.2x the tolerance: max |dk - oracle| = 3.1e-02 at b=0 h=1 k=17 d=5 "
        "(allowed 7.4e-03 = 2 x naive's error + 1e-05); the last key block of a causal row is "
        "accumulated twice when Sk % BLOCK_N != 0",
        error_ratio=4.2, counterexample="Spec(Hq=2, Sq=17, Sk=33, D=16, dtype='bfloat16', causal=True)",
        seed="0x5eed01", replay=_replay("triton_fa2", "grad_k_matches_oracle", "0x5eed01"),
    )  # fmt: skip
    edge = CorrectnessRow(
        "dense", "triton_fa2", "window_edges_exact", "fail", device="cuda", dtype="float16",
        reason="query 7 sees key 2, which is outside window (4, 0) (p(i)-left = 3)\n"
        "visible keys differ from the oracle in 1 of 320 rows",
        counterexample="Spec(Sq=9, window=(4, 0), dtype='float16')", seed="0x5eed02",
        replay=_replay("triton_fa2", "window_edges_exact", "0x5eed02"),
    )  # fmt: skip
    crash = CorrectnessRow(
        "dense", "flex", "empty_rows_are_zero", "error", device="cuda", dtype="bfloat16",
        reason="RuntimeError: CUDA error: an illegal memory access was encountered",
        counterexample="Spec(B=2, Sq=1, Sk=1, key_lengths=(0, 1))", seed="0x5eed03",
        replay=_replay("flex", "empty_rows_are_zero", "0x5eed03"),
    )  # fmt: skip
    bad = {(r.impl, r.property): r for r in (fail, edge, crash)}
    rows = [bad.get((r.impl, r.property), r) for r in rows]
    for prop in PROPERTIES[:5] + ("window_edges_exact",):
        for impl in ("naive", "triton_local"):
            ratio = round(rng.uniform(0.05, 0.5), 3) if "matches" in prop else None
            rows.append(CorrectnessRow("local", impl, prop, "pass", "cuda", "bfloat16", error_ratio=ratio))
    for prop in ("output_matches_oracle", "grad_q_matches_oracle", "kv_cache_decode_matches"):
        rows.append(CorrectnessRow("MultiQueryAttention", "naive", prop, "pass", "cuda", "float32", error_ratio=0.1))
    return rows + zoo_correctness_rows()


def zoo_correctness_rows() -> list[CorrectnessRow]:
    """What `attnbench verify --zoo` adds: checks run on the planted bugs (expected to fail)."""
    rows = []
    for member, caught in (("off_by_one_causal", ("causal_never_sees_future", "output_matches_oracle")),
                           ("dropout_unscaled", ())):  # fmt: skip
        for prop in PROPERTIES[:6]:
            hit = prop in caught
            rows.append(CorrectnessRow(
                "dense", member, prop, "fail" if hit else "pass", "cuda", "float32",
                reason="planted bug found" if hit else "", error_ratio=35.0 if hit and "matches" in prop else None,
                counterexample="Spec(Sq=2, causal=True)" if hit else None,
            ))  # fmt: skip
    return rows


def perf_rows() -> list[PerfRow]:
    rng = random.Random(2)
    rows = []
    tokens = 16384
    for mode, work in (("fwd", 1.0), ("fwdbwd", 3.5)):
        for impl, speed in _SPEED.items():
            for s in (512, 1024, 2048, 4096, 8192, 16384):
                b = max(tokens // s, 1)
                shape = dict(B=b, Hq=16, Hkv=16, Sq=s, Sk=s, D=128, causal=False, window=None, dtype="bfloat16")
                flops = 4 * b * 16 * s * s * 128 * work
                mem = 16 * b * s * s * 4 if impl == "naive" else 3 * b * 16 * s * 128 * 2
                if impl == "naive" and s >= 16384:
                    rows.append(PerfRow("dense", impl, mode, shape, "oom", "CUDA out of memory: tried to allocate "
                                        f"{mem / 2**30:.0f} GiB", mem_bytes=mem))  # fmt: skip
                    continue
                tflops = speed * (1 - 0.5 * 512 / s) * (0.8 if mode == "fwdbwd" else 1.0) * rng.uniform(0.95, 1.05)
                ms = flops / tflops / 1e9
                rows.append(PerfRow(
                    "dense", impl, mode, shape, ms=ms, ms_p20=ms * 0.98, ms_p80=ms * 1.03, tflops=tflops,
                    gbps=(3 * b * 16 * s * 128 * 2) / ms / 1e6, pct_peak=100 * tflops / 680, mem_bytes=mem,
                ))  # fmt: skip
    for impl, speed in (("naive", 15.0), ("triton_local", 260.0)):
        for s in (2048, 4096, 8192):
            shape = dict(B=2, Hq=16, Hkv=16, Sq=s, Sk=s, D=128, causal=True, window=(512, 0), dtype="bfloat16")
            ms = 4 * 2 * 16 * s * 512 * 128 / speed / 1e9
            rows.append(PerfRow("local", impl, "fwd", shape, ms=ms, ms_p20=ms * 0.97, ms_p80=ms * 1.04,
                                tflops=speed, mem_bytes=2 * 16 * s * 512 * 4))  # fmt: skip
    ref = {(r.mode, r.variant, r.shape["Sq"]): r.ms for r in rows if r.impl == "naive" and r.ms}
    for r in rows:
        base = ref.get((r.mode, r.variant, r.shape["Sq"]))
        r.speedup = base / r.ms if base and r.ms else None
    return rows


def zoo_rows() -> list[ZooRow]:
    return [
        ZooRow("dense/off_by_one_causal", "masking", ["causal_never_sees_future", "output_matches_oracle"]),
        ZooRow("dense/window_left_inclusive", "window edge", ["window_edges_exact"]),
        ZooRow("dense/gqa_tile_not_interleave", "grouped heads", ["gqa_head_mapping", "output_matches_oracle"]),
        ZooRow("dense/nan_on_empty_row", "empty rows", ["empty_rows_are_zero"]),
        ZooRow("dense/lse_natural_vs_log2", "logsumexp", ["lse_matches_oracle"]),
        ZooRow("dense/dk_missing_scale", "gradients", ["grad_k_matches_oracle"]),
        ZooRow("dense/top_left_decode", "KV cache", ["kv_cache_decode_matches"]),
        ZooRow("dense/dropout_unscaled", "dropout", [], status="missed", detail="p=0 path untouched; only p>0 is wrong"),
    ]


def sample_results() -> Results:
    env = {
        "synthetic": True,
        "device": "cuda",
        "device_name": "NVIDIA H100 80GB HBM3",
        "driver": "580.00",
        "cuda": "13.0",
        "torch": "2.11.0+cu130",
        "triton": "3.6.0",
        "flash_attn": None,
        "python": "3.12.3",
        "commit": "0000000",
    }
    return Results(
        env=env,
        peaks={"matmul_tflops": 680.0, "copy_gbps": 3000.0, "dtype": "bfloat16"},
        correctness=correctness_rows(),
        perf=perf_rows(),
        zoo=zoo_rows(),
        created="2026-11-23T00:00:00+00:00",
    )
