"""perf/: work models (hand-counted), the gate (synthetic runs), the harness on the CPU, the quick sweep."""

from __future__ import annotations

import json
import os
import random
import signal
import time
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from attnbench.oracles.dense import visible
from attnbench.perf import bench, cases, measure, slow, work
from attnbench.perf.cells import Cell, ModuleCase, cell_key
from attnbench.perf.gate import gate
from attnbench.perf.memory import fit_exponent, memory_fits, verdict
from attnbench.perf.sweeps import sweep_cells
from attnbench.perf.timing import summarize, time_call
from attnbench.registry import MODULE_VARIANTS, Impl, registry
from attnbench.reports import text
from attnbench.reports.terminal import gate_table
from attnbench.results import PerfRow, Results
from attnbench.spec import Block, Spec

# -- work models ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "pairs"),
    [
        (Spec(Sq=4), 16),
        (Spec(Sq=4, causal=True), 10),  # 1 + 2 + 3 + 4
        (Spec(Sq=2, Sk=4, causal=True), 7),  # bottom-right: rows at positions 2, 3 see 3 + 4 keys
        (Spec(Sq=2, Sk=4, causal=True, align="top_left"), 3),  # positions 0, 1 see 1 + 2
        (Spec(Sq=4, Sk=2, causal=True), 3),  # positions -2, -1, 0, 1: 0 + 0 + 1 + 2 (two empty rows)
        (Spec(Sq=4, window=(1, 0)), 7),  # 1 + 2 + 2 + 2
        (Spec(Sq=4, window=(1, 1)), 10),  # 2 + 3 + 3 + 2
        (Spec(Sq=4, window=(0, 0)), 4),
        (Spec(Sq=4, window=(None, 1)), 2 + 3 + 4 + 4),
        (Spec(Sq=6, block=Block(2, 1, 0)), 2 * 2 + 2 * 4 + 2 * 4),  # buckets see themselves and the one before
        (Spec(Sq=6, block=Block(2, 1, 0), causal=True), 1 + 2 + 3 + 4 + 3 + 4),
        (Spec(B=2, Sq=4, key_lengths=(3, 0)), 4 * 3 + 0),
        (Spec(B=3, Hq=4, Hkv=2, Sq=4, causal=True), 3 * 10),  # per head, summed over the batch; GQA changes nothing
    ],
)
def test_visible_pairs_by_hand(spec, pairs):
    assert work.visible_pairs(spec) == pairs


def test_visible_pairs_match_the_oracle_visibility():
    rng = random.Random(0)
    for _ in range(40):
        Sq, Sk = rng.randint(1, 12), rng.randint(1, 12)
        kw = dict(B=2, Sq=Sq, Sk=Sk, causal=rng.random() < 0.5, align=rng.choice(["bottom_right", "top_left"]),
                  key_drop=rng.choice([0.0, 0.3]), seed=rng.randint(0, 99))
        choice = rng.random()
        if choice < 0.4:
            kw["window"] = (rng.choice([None, 0, 1, 3]), rng.choice([None, 0, 2]))
        elif choice < 0.7:
            kw["block"] = Block(rng.randint(1, 4), rng.randint(0, 2), rng.randint(0, 1))
        spec = Spec(**kw)
        kpm = spec.make_inputs().key_padding_mask
        expected = visible(spec.B, Sq, Sk, causal=spec.causal, window=spec.window, block=spec.block,
                           align=spec.align, key_padding_mask=kpm).sum().item()
        assert work.visible_pairs(spec, kpm) == expected, spec.short()


def test_random_padding_needs_its_mask():
    with pytest.raises(ValueError, match="key_padding_mask"):
        work.visible_pairs(Spec(B=1, Sq=4, key_drop=0.5))
    with pytest.raises(ValueError, match="key_padding_mask: expected shape"):
        work.visible_pairs(Spec(B=1, Sq=4), torch.ones(2, 4, dtype=torch.bool))


def test_flops_causal_cross_gqa_and_modes():
    # Sq=3 queries at positions 2, 3, 4 over Sk=5 keys: 3 + 4 + 5 = 12 pairs per batch element.
    spec = Spec(B=2, Hq=4, Hkv=2, Sq=3, Sk=5, D=8, causal=True)
    fwd = 2 * 4 * (2 * 12) * (8 + 8)
    assert work.attention_flops(spec, "fwd") == fwd == 3072
    assert work.attention_flops(spec, "bwd") == 2.5 * fwd
    assert work.attention_flops(spec, "fwdbwd") == 3.5 * fwd
    # Non-causal square: 4 * B * H * S^2 * D, the usual formula.
    assert work.attention_flops(Spec(B=2, Hq=3, Sq=16, D=8)) == 4 * 2 * 3 * 16 * 16 * 8
    # Dv != D: 2 * pairs * D for q.k, 2 * pairs * Dv for p.v.
    assert work.attention_flops(Spec(Sq=2, D=4, Dv=6)) == 2 * 4 * (4 + 6)
    # A causal window of W over S keys: (W + 1) keys per row once past the first W rows.
    S, W = 64, 8
    pairs = sum(min(i, W) + 1 for i in range(S))
    assert work.attention_flops(Spec(Sq=S, D=16, causal=True, window=(W, 0))) == 4 * pairs * 16
    with pytest.raises(ValueError, match="mode: unknown mode 'fwd_bwd'"):
        work.attention_flops(spec, "fwd_bwd")


def test_bytes_are_inputs_once_and_outputs_once():
    spec = Spec(B=1, Hq=2, Hkv=1, Sq=4, D=8, dtype="float16")
    q, k, v, out, lse = 128, 64, 64, 128, 2 * 4 * 4
    assert work.attention_bytes(spec, "fwd") == q + k + v + out
    bwd = q + k + v + out + out + lse + q + k + v
    assert work.attention_bytes(spec, "bwd") == bwd
    assert work.attention_bytes(spec, "fwdbwd") == q + k + v + out + lse + bwd
    padded = Spec(B=2, Hq=1, Sq=4, D=2, key_lengths=(4, 2), bias="per_key")
    e = 4
    assert work.attention_bytes(padded) == (3 * 2 * 4 * 2 + 2 * 4 * 2) * e + 2 * 4 * e + 2 * 4


def test_module_flops_dense_and_routed():
    x = torch.zeros(1, 8, 16)
    # FlashAttentionTwo: q, k, v, out projections 8 * B * S * dim * inner, plus causal attention (36 pairs).
    got = work.module_flops("FlashAttentionTwo", dict(dim=16, heads=2, dim_head=4, causal=True), x)
    assert got == 8 * 8 * 16 * 8 + 2 * 2 * 36 * (4 + 4)
    # A routed module is charged for what its routing selected: 2 experts x 3 queries x (3 keys + null).
    routing = SimpleNamespace(q_valid=torch.ones(1, 2, 3, dtype=torch.bool),
                              kv_valid=torch.tensor([[[1, 1, 1, 0], [1, 0, 1, 1]]], dtype=torch.bool))
    module = SimpleNamespace(route=lambda x: routing)
    kwargs = dict(dim=16, heads=2, dim_head=4, num_experts=2, num_routed_queries=3, num_routed_key_values=4)
    attention = 2 * 2 * (2 * 3 * 4) * (4 + 4)
    projections = 2 * 6 * 16 * 8 * 2 + 2 * 6 * 16 * 8 * 2
    routers = 2 * 1 * 8 * 16 * 2 * 2
    assert work.module_flops("MixtureOfAttention", kwargs, x, module) == attention + projections + routers
    assert work.module_flops("MixtureOfAttention", kwargs, x, module, "fwdbwd") == 3.5 * (
        attention + projections + routers)


def test_rates():
    assert work.tflops(2e12, 1000.0) == pytest.approx(2.0)
    assert work.gbps(3e9, 1.0) == pytest.approx(3000.0)
    assert work.tflops(None, 1.0) is None and work.gbps(1.0, None) is None


# -- the gate ------------------------------------------------------------------------------------

IMPLS = {"sdpa_flash": 1.0, "triton": 1.2, "naive": 8.0}


def run(times: dict[str, float] | None = None, scale: float = 1.0, jitter: float = 0.0, seed: int = 0,
        drop: tuple = (), status: dict | None = None, spread: float = 0.01) -> Results:
    """A synthetic run: three impls over S = 1k, 2k, 4k; times = base * S^2 * scale (+ jitter)."""
    rng = random.Random(seed)
    rows = []
    for S in (1024, 2048, 4096):
        for impl, base in (times or IMPLS).items():
            if (impl, S) in drop:
                continue
            ms = base * (S / 1024) ** 2 * scale * (1 + rng.uniform(-jitter, jitter))
            row = PerfRow(variant="dense", impl=impl, mode="fwd", shape=dict(B=1, Hq=8, Hkv=8, Sq=S, Sk=S, D=64,
                          causal=True, window=None, dtype="bfloat16"), ms=ms, ms_p20=ms * (1 - spread),
                          ms_p80=ms * (1 + spread))
            st = (status or {}).get((impl, S))
            if st:
                row.status, row.reason, row.ms = st, "CUDA out of memory", None
            rows.append(row)
    return Results(env={"device_name": "synthetic"}, perf=rows)


def test_gate_passes_the_same_run_and_a_uniformly_slower_machine():
    base = run()
    assert gate(run(), base).ok
    slower = gate(run(scale=1.3), base)  # machine drift cancels in the ratios
    assert slower.ok
    assert slower.drift == pytest.approx(0.3)
    assert slower.references == {"dense": "sdpa_flash"}
    assert {r.status for r in slower.rows} == {"ok", "reference"}


def test_gate_tolerates_noise_under_the_threshold():
    base = run(jitter=0.03, seed=1)
    for seed in range(2, 12):
        result = gate(run(jitter=0.03, seed=seed), base, threshold=0.10)
        assert result.ok, text.gate_text(result)


def test_gate_fails_a_regressed_cell_and_shows_it():
    current = run({**IMPLS, "triton": 1.2 * 1.25})  # triton 25% slower everywhere
    result = gate(current, run(), threshold=0.10)
    assert not result.ok
    regressed = [r for r in result.rows if r.status == "regressed"]
    assert {r.impl for r in regressed} == {"triton"} and len(regressed) == 3
    assert all(r.change == pytest.approx(0.25) for r in regressed)
    # The same slowdown passes a looser threshold; a faster impl is an improvement, not a failure.
    assert gate(current, run(), threshold=0.3).ok
    improved = gate(run({**IMPLS, "naive": 4.0}), run())
    assert improved.ok and improved.counts["improved"] == 3
    console = Console(width=120, record=True)
    console.print(gate_table(result))
    shown = console.export_text()
    assert "regressed" in shown and "triton" in shown and "+25.0%" in shown
    assert "FAIL" in text.gate_text(result) and "regressed" in text.gate_text(result)


def test_gate_does_not_judge_a_change_inside_the_timings_spread():
    # 15% slower, but each timing's p20-p80 spread is 40% of its median: not evidence.
    noisy = gate(run({**IMPLS, "triton": 1.2 * 1.15}, spread=0.2), run(spread=0.2))
    assert noisy.ok and noisy.counts["noisy"] == 3
    assert all("within the timings' p20-p80 spread" in r.note for r in noisy.rows if r.status == "noisy")
    # Twice as slow is far outside the same spread.
    assert not gate(run({**IMPLS, "triton": 2.4}, spread=0.2), run(spread=0.2)).ok


def test_gate_reports_host_bound_cells_unless_asked_to_judge_them():
    """A cell whose enqueueing took most of its GPU time follows the host CPU: a slower host
    (another lease) must not fail the gate there, but two runs from one host are judged."""
    def with_host(results: Results, share: float) -> Results:
        for r in results.perf:
            if r.impl == "naive":
                r.host_ms = share * r.ms
        return results

    slower_host = lambda share: with_host(run({**IMPLS, "naive": 8.0 * 1.5}), share)
    result = gate(slower_host(0.95), with_host(run(), 0.95))
    assert result.ok and result.counts["host_bound"] == 3
    assert all("host" in r.note and "95%" in r.note for r in result.rows if r.status == "host_bound")
    assert not gate(slower_host(0.95), with_host(run(), 0.95), judge_host_bound=True).ok
    assert not gate(slower_host(0.3), with_host(run(), 0.3)).ok  # GPU-bound: judged as usual
    assert not gate(slower_host(0.3), run()).ok  # no host time recorded in either: judged


def test_gate_takes_a_gpu_bound_reference_where_the_preferred_one_was_host_bound():
    """Seventh session, H100: sdpa_flash (the reference) was host-bound in the baseline of one cell
    and 26% faster in the next lease; flex, math and naive, unchanged in absolute time, all
    "regressed" by +36%. The cell must take a GPU-bound reference instead (naive here)."""
    def flash_faster_at_1k(results: Results) -> Results:
        for r in results.perf:
            if r.impl == "sdpa_flash" and r.shape["Sq"] == 1024:
                r.ms, r.ms_p20, r.ms_p80 = (x / 1.35 for x in (r.ms, r.ms_p20, r.ms_p80))
        return results

    def flash_host_bound(results: Results, only_1k: bool = True) -> Results:
        for r in results.perf:
            if r.impl == "sdpa_flash" and (r.shape["Sq"] == 1024 or not only_1k):
                r.host_ms = 0.85 * r.ms
        return results

    current, base = flash_faster_at_1k(run()), run()
    assert {r.impl for r in gate(current, base).failures} == {"triton", "naive"}  # GPU-bound flex: judged
    result = gate(current, flash_host_bound(base))
    rows = {(r.impl, r.cell.split()[3]): r for r in result.rows}
    assert result.ok, text.gate_text(result)
    assert rows[("triton", "S1024")].reference == "naive" and rows[("triton", "S1024")].status == "ok"
    assert rows[("sdpa_flash", "S1024")].status == "host_bound"  # its own speed-up, against naive
    assert rows[("triton", "S2048")].reference == "sdpa_flash" and rows[("triton", "S2048")].status == "ok"
    # With no GPU-bound candidate the host-bound reference is kept and its cell is not judged.
    no_naive = {k: v for k, v in IMPLS.items() if k != "naive"}
    current, base = flash_faster_at_1k(run(no_naive)), flash_host_bound(run(no_naive))
    result = gate(current, base)
    assert result.ok and result.counts["host_bound"] == 1
    assert all("the reference's host enqueueing took 85%" in r.note for r in result.rows if r.status == "host_bound")
    assert not gate(current, base, judge_host_bound=True).ok


def test_gate_reports_missing_new_and_broken_cells():
    base = run(drop=(("naive", 4096),))
    current = run(drop=(("triton", 2048),), status={("naive", 2048): "oom"})
    result = gate(current, base)
    by = {(r.impl, r.cell.split()[3]): r.status for r in result.rows}
    assert by[("triton", "S2048")] == "missing"
    assert by[("naive", "S4096")] == "new"
    assert by[("naive", "S2048")] == "broken"
    assert not result.ok and [r.impl for r in result.failures] == ["naive"]
    only_missing = gate(run(drop=(("triton", 2048),)), run())
    assert only_missing.ok
    assert not gate(run(drop=(("triton", 2048),)), run(), fail_on_missing=True).ok


def test_gate_does_not_compare_a_cell_across_timers():
    """Graph replays drop launch gaps that eager timings keep: a cell that changed timer is
    reported as retimed, whatever its times did, and does not fail the gate."""
    base, current = run(), run({**IMPLS, "triton": 1.2 * 3})
    for r in base.perf:
        r.timer = "cuda_events"
    for r in current.perf:
        r.timer = "cuda_graph" if r.shape["Sq"] == 1024 else "cuda_events"
    result = gate(current, base)
    by = {(r.impl, r.cell.split()[3]): r for r in result.rows}
    assert by[("triton", "S1024")].status == "retimed" and "cuda_graph" in by[("triton", "S1024")].note
    assert by[("sdpa_flash", "S1024")].status == "retimed"
    assert by[("triton", "S2048")].status == "regressed"
    assert [r.cell.split()[3] for r in result.failures] == ["S2048", "S4096"]


def test_gate_reference_choice_and_fallback():
    base, current = run(), run({**IMPLS, "sdpa_flash": 2.0})  # the reference itself got 2x slower
    assert gate(current, base).ok  # ratios against it all shrink: no failure
    against_naive = gate(current, base, reference="naive")
    assert not against_naive.ok and {r.impl for r in against_naive.failures} == {"sdpa_flash"}
    # A run without the preferred reference falls back to the registry's reference (naive).
    no_flash = {k: v for k, v in IMPLS.items() if k != "sdpa_flash"}
    fallback = gate(run(no_flash), run(no_flash))
    assert fallback.ok and {r.reference for r in fallback.rows} == {"naive"}
    # A cell whose preferred reference failed falls back (per cell) to the registry's reference...
    result = gate(run(status={("sdpa_flash", 4096): "error"}), run())
    rows = {(r.impl, r.cell.split()[3]): r for r in result.rows}
    assert rows[("triton", "S4096")].status == "ok" and rows[("triton", "S4096")].reference == "naive"
    assert rows[("triton", "S2048")].reference == "sdpa_flash"
    assert rows[("sdpa_flash", "S4096")].status == "broken"
    # ... and a cell where no reference ran in both runs cannot be judged, and says so.
    result = gate(run(status={("sdpa_flash", 4096): "error", ("naive", 4096): "oom"}), run())
    rows = {(r.impl, r.cell.split()[3]): r for r in result.rows}
    assert rows[("triton", "S4096")].status == "no_reference"
    # finalize() picks the same per-cell reference for speedups.
    fin = bench.finalize(run(status={("sdpa_flash", 4096): "error"}).perf)
    assert {(r.impl, r.shape["Sq"]): r.reference for r in fin if r.status == "ok"}[("triton", 4096)] == "naive"


def test_gate_survives_a_json_round_trip(tmp_path):
    path = run().save(tmp_path / "base.json")
    loaded = Results.load(path)
    assert gate(run(), loaded).ok
    assert not gate(run({**IMPLS, "triton": 2.0}), loaded).ok


def test_gate_rejects_a_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        gate(run(), run(), threshold=10)
    with pytest.raises(ValueError, match="threshold"):
        gate(run(), run(), threshold=0)


# -- memory fits ---------------------------------------------------------------------------------


def test_memory_exponents():
    S = [1024, 2048, 4096, 8192]
    assert fit_exponent(S, [s * 1000 + 5e5 for s in S]) < 1.0  # linear plus a constant
    assert fit_exponent(S, [s * s * 4 for s in S]) == pytest.approx(2.0)
    assert verdict(1.02) == "linear" and verdict(1.98) == "quadratic" and verdict(1.5) == "between"
    with pytest.raises(ValueError, match="positive"):
        fit_exponent([1, 2], [0, 1])
    with pytest.raises(ValueError, match="two"):
        fit_exponent([1], [1])


def test_memory_fits_flag_a_declared_linear_impl_that_is_quadratic():
    rows = []
    for S in (1024, 2048, 4096):
        shape = dict(B=1, Hq=16, Hkv=16, Sq=S, Sk=S, D=128, causal=True, window=None, dtype="bfloat16")
        rows.append(PerfRow("dense", "fused", "fwd", dict(shape), mem_bytes=S * 4096))
        rows.append(PerfRow("dense", "fake_fused", "fwd", dict(shape), mem_bytes=S * S * 64))
        rows.append(PerfRow("dense", "naive", "fwd", dict(shape), mem_bytes=S * S * 64))
    fits = {f.impl: f for f in memory_fits(rows, declared={"dense/fused": "linear", "dense/fake_fused": "linear"})}
    assert fits["fused"].verdict == "linear" and fits["fused"].ok
    assert fits["naive"].verdict == "quadratic" and fits["naive"].ok  # declares nothing
    assert not fits["fake_fused"].ok


# -- sweeps --------------------------------------------------------------------------------------


def test_sweeps_are_valid_and_keys_survive_json():
    for device in ("cpu", "cuda"):
        for quick in (True, False):
            cells = sweep_cells(quick, device)
            keys = [c.key() for c in cells]
            assert len(keys) == len(set(keys))
            for c in cells:
                shape = json.loads(json.dumps(c.shape()))
                assert cell_key(c.variant, c.mode, shape) == c.key()
    full = sweep_cells(False, "cuda")
    assert {c.mode for c in full} == {"fwd", "bwd", "fwdbwd"}
    assert {c.variant for c in full} >= {"dense", "local", "FlashAttentionTwo", "MixtureOfAttention"}
    assert any(c.graph for c in full)
    # Launch-bound forwards are timed as graph replays; big ones, backwards and CPU cells are not.
    by = {c.label(): c.graph for c in full}
    assert by["dense B1 H16 S1024 D128 causal bfloat16 fwd"] is True
    assert by["dense B1 H16 S2048 D128 causal bfloat16 fwdbwd"] is False
    assert by["dense B4 H16 S4096 D128 causal bfloat16 fwd"] is False
    assert by["dense B2 H16 S2048 D64 causal float32 fwd"] is False  # float32: slow enough eagerly
    assert not any(c.graph for q in (True, False) for c in sweep_cells(q, "cpu"))
    assert sweep_cells(True, "cpu", ["local"]) and all(c.variant == "local" for c in sweep_cells(True, "cpu", ["local"]))
    with pytest.raises(ValueError, match="variants: unknown"):
        sweep_cells(True, "cpu", ["dens"])
    with pytest.raises(ValueError, match="Cell.spec"):
        Cell("dense", "fwd")
    with pytest.raises(ValueError, match="Cell.module"):
        Cell("LocalMHA", "fwd", spec=Spec())
    with pytest.raises(ValueError, match="mode"):
        Cell("dense", "forward", spec=Spec())


def test_sweeps_are_named_selectable_and_checked():
    from attnbench.perf import sweeps

    assert sweeps.default_sweeps("cpu") == ["cpu"]
    assert sweeps.default_sweeps("cuda:1")[:3] == ["seq", "window", "decode"] and "anchors" not in sweeps.default_sweeps("cuda")
    chosen = sweep_cells(True, "cpu", names=["module", "anchors"])
    assert {c.variant for c in chosen[:5]} == set(MODULE_VARIANTS) and chosen[5].variant == "dense"
    assert len({c.key() for c in chosen}) == len(chosen)
    every = [c for s in sweeps.SWEEPS.values() for d in s.devices for q in (True, False) for c in s.cells(d, q)]
    assert all(c.device.split(":")[0] in sweeps.DEVICES for c in every)
    assert {c.label() for c in sweep_cells(True, "cpu", names=["moa"]) if c.spec is not None and c.spec.has_padding}
    with pytest.raises(ValueError, match="unknown sweep"):
        sweep_cells(True, "cpu", names=["sequence"])
    with pytest.raises(ValueError, match="no shapes for cpu"):
        sweeps.check_sweeps(["seq"], "cpu")
    with pytest.raises(ValueError, match="registered twice"):
        sweeps.sweep("seq")(lambda device, quick: [])
    with pytest.raises(ValueError, match="devices"):
        sweeps.sweep("tpu_only", devices=("tpu",))


def test_the_moa_sweep_measures_on_the_cpu():
    """The moa sweep's kinds of cell that no default sweep has (a key-padded routed problem, a
    routed module with the study's constructor) time with the naive implementations."""
    naive = [i for i in registry().impls.values() if i.name == "naive"]
    moa = sweep_cells(True, "cpu", names=["moa"])
    padded = next(c for c in moa if c.spec is not None and c.spec.has_padding and c.mode == "fwd")
    routed = next(c for c in moa if c.variant == "MixtureOfAttention")
    picked = [padded, routed]
    rows = measure.run_cells(picked, naive, settings=SETTINGS, peaks={})
    assert len(rows) == len(picked) and all(r.status == "ok" and r.ms > 0 for r in rows), rows



def test_the_feature_sweeps_measure_on_the_cpu():
    """varlen, paged_decode, score_features and fp8 time with naive on the CPU; their work is
    counted per sequence (hand-counted here) and the score features and fp8 keep the plain cell's
    FLOPs (fp8 moves one byte per input element)."""
    naive = registry().get("dense/naive")
    cells = sweep_cells(True, "cpu", names=["varlen", "paged_decode", "score_features", "fp8"])
    for c in cells:
        assert cell_key(c.variant, c.mode, json.loads(json.dumps(c.shape()))) == c.key()
    rows = measure.run_cells(cells, [naive], settings=SETTINGS, peaks={})
    assert len(rows) == len(cells) and all(r.status == "ok" and r.ms > 0 for r in rows), rows
    factor = {"fwd": 1.0, "fwdbwd": 3.5}
    for cell, row in zip(cells, rows, strict=True):
        flops, nbytes = cases.make_case(naive, cell).work()
        s, shape = cell.spec, cell.shape()
        if shape.get("packing") == "varlen":
            pairs = sum(n * (n + 1) // 2 if s.causal else n * n for n, _ in s.seqlens)
            assert flops == 2 * s.Hq * pairs * (s.D + s.Dv) * factor[cell.mode]
        elif shape.get("packing") == "paged":
            kv = sum(s.cache_seqlens) * s.Hkv * (s.D + s.Dv) * 4
            assert nbytes == kv + s.B * s.Hq * s.Sq * (s.D + s.Dv) * 4
            assert flops == 2 * s.Hq * sum(s.cache_seqlens) * (s.D + s.Dv)
        else:
            plain = Spec(B=s.B, Hq=s.Hq, Sq=s.Sq, D=s.D, causal=s.causal, device="cpu")
            assert flops == work.attention_flops(plain, cell.mode)
        assert row.tflops == pytest.approx(flops / (row.ms * 1e-3) / 1e12, rel=1e-3)
    kinds = {(c.shape().get("packing"), *sorted(k for k in ("softcap", "alibi", "sinks", "fp8") if k in c.shape()))
             for c in cells}
    assert kinds == {("varlen",), ("paged",), (None,), (None, "softcap"), (None, "alibi"), (None, "sinks"),
                     (None, "fp8")}
    fp8 = [c for c in cells if c.shape().get("fp8")]
    assert fp8 and all(c.label().endswith("fp8 bfloat16 fwd") for c in fp8)
    for c in fp8:  # beside each fp8 cell, the bfloat16 cell of the same shape
        assert any(o.spec == c.spec.replace(fp8=False) for o in cells)
        _, nbytes = cases.make_case(naive, c).work()
        _, plain_bytes = cases.make_case(naive, next(o for o in cells if o.spec == c.spec.replace(fp8=False))).work()
        s = c.spec
        assert plain_bytes - nbytes == (s.B * s.Hq * s.Sq * s.D + s.B * s.Hkv * s.Sk * (s.D + s.Dv)) * (2 - 1)
    assert {c.spec.block_size for c in cells if c.shape().get("packing") == "paged"} == {16, 256}

# -- the harness on the CPU ----------------------------------------------------------------------


def test_time_call_on_the_wall_clock():
    t = time_call(lambda i: i, lambda state: time.sleep(0.002), device="cpu", rep_ms=20, min_reps=5)
    assert t.timer == "wall_clock"
    assert t.reps >= 5
    assert 2.0 <= t.p20 <= t.ms <= t.p80 < 100
    with pytest.raises(ValueError, match="graph"):
        time_call(lambda i: i, lambda s: None, device="cpu", graph=True)
    with pytest.raises(ValueError, match="n_sets"):
        time_call(lambda i: i, lambda s: None, device="cpu", n_sets=0)
    assert summarize([3.0, 1.0, 2.0]) == (2.0, pytest.approx(1.4), pytest.approx(2.6))


def test_time_call_caps_a_slow_call():
    calls = []
    t = time_call(lambda i: i, lambda s: calls.append(time.sleep(0.03)), device="cpu", max_ms=10)
    assert t.reps == 2 and t.ms >= 30 and len(calls) == 3  # the first call (compilation) is never a sample
    t = time_call(lambda i: i, lambda s: time.sleep(0.03), device="cpu", max_ms=50)
    assert t.reps == 3 and t.ms >= 30


def _raises(q, k, v, cfg, key_padding_mask=None, bias=None):
    raise RuntimeError("kernel exploded")


def _ooms(q, k, v, cfg, key_padding_mask=None, bias=None):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")


SETTINGS = measure.Settings(warmup_ms=1, rep_ms=5, min_reps=3, max_ms=200, budget_s=None)


def test_harness_times_a_cell_and_records_failures_without_aborting():
    naive = registry().get("dense/naive")
    broken = Impl(name="exploding", variant="dense", fn=_raises, features={"causal", "backward"})
    ooms = Impl(name="ooming", variant="dense", fn=_ooms, features={"causal", "backward"})
    no_bwd = Impl(name="fwd_only", variant="dense", fn=naive.fn, features={"causal"})
    cells = [Cell("dense", mode, spec=Spec(B=1, Hq=2, Sq=32, D=16, causal=True)) for mode in ("fwd", "fwdbwd")]
    rows = measure.run_cells(cells, [broken, ooms, no_bwd, naive], settings=SETTINGS, peaks={"matmul_tflops": 1.0})
    by = {(r.impl, r.mode): r for r in rows}
    assert by[("exploding", "fwd")].status == "error" and "kernel exploded" in by[("exploding", "fwd")].reason
    assert by[("ooming", "fwd")].status == "oom"
    assert by[("fwd_only", "fwdbwd")].status == "unsupported" and "backward" in by[("fwd_only", "fwdbwd")].reason
    for mode in ("fwd", "fwdbwd"):
        ok = by[("naive", mode)]
        assert ok.status == "ok", ok.reason
        assert ok.timer == "wall_clock" and ok.mem_bytes is None
        assert 0 < ok.ms_p20 <= ok.ms <= ok.ms_p80
        flops = work.attention_flops(cells[0].spec, mode)
        assert ok.tflops == pytest.approx(flops / (ok.ms * 1e-3) / 1e12, rel=1e-3)
        assert ok.pct_peak == pytest.approx(100 * ok.tflops, rel=1e-3)
    rows = bench.finalize(rows, reference="naive")
    assert by[("fwd_only", "fwd")].speedup == pytest.approx(by[("naive", "fwd")].ms / by[("fwd_only", "fwd")].ms,
                                                            rel=1e-3)
    assert by[("naive", "fwd")].reference == "naive"


def test_harness_runs_a_module_cell_and_the_budget_skips_the_rest():
    impl = registry().get("FlashAttentionTwo/naive")
    case = ModuleCase(tuple(sorted(dict(dim=32, heads=2, dim_head=8, causal=True).items())), B=1, S=16,
                      dtype="float32", device="cpu")
    cell = Cell("FlashAttentionTwo", "fwd", module=case)
    row = measure.measure(impl, cell, SETTINGS, {})
    assert row.status == "ok", row.reason
    x = torch.zeros(1, 16, 32)
    assert row.tflops == pytest.approx(work.module_flops("FlashAttentionTwo", case.ctor, x) / row.ms / 1e9, rel=1e-3)
    late = measure.run_cells([cell, cell], [impl], settings=measure.Settings(1, 5, 3, 200, budget_s=-1.0), peaks={})
    assert [r.status for r in late] == ["skipped", "skipped"]


def test_perf_inputs_are_seeded_and_shaped_like_the_spec():
    spec = Spec(B=2, Hq=4, Hkv=2, Sq=3, Sk=5, D=8, Dv=6, dtype="float16")
    a, b = cases.perf_inputs(spec), cases.perf_inputs(spec)
    assert a.q.shape == (2, 4, 3, 8) and a.k.shape == (2, 2, 5, 8) and a.v.shape == (2, 2, 5, 6)
    assert a.grad_out.shape == (2, 4, 3, 6) and not a.grad_out.requires_grad
    assert a.q.dtype == torch.float16 and a.q.requires_grad
    assert torch.equal(a.q, b.q) and not torch.equal(a.q, cases.perf_inputs(spec.replace(seed=1)).q)
    padded = cases.perf_inputs(Spec(B=2, Sq=4, key_lengths=(4, 1), bias="per_key"))
    assert padded.key_padding_mask.tolist() == [[True] * 4, [True, False, False, False]]
    assert padded.bias.shape == (2, 1, 1, 4)


def test_slowdown_wraps_the_implementation_under_its_own_name(monkeypatch):
    calls = []

    def fn(*args, **kwargs):
        calls.append(1)
        return "out"

    impl = Impl(name="k", variant="dense", fn=fn)
    slowed = slow.apply([impl], slow.parse("dense/k=3"))[0]
    assert slowed.name == "k" and slowed.fn() == "out" and len(calls) == 3
    assert slow.apply([impl], {})[0] is impl
    monkeypatch.setenv(slow.ENV, "dense/k=2")
    assert slow.active() == {"dense/k": 2}
    for bad in ("dense/k", "k=2", "dense/k=0", "dense/k=two"):
        with pytest.raises(ValueError, match=slow.ENV):
            slow.parse(bad)


def test_prewarm_groups_compiling_impls_and_survives_a_failing_one():
    """Real spawned workers: a cell's modes form one group, impls that do not compile are left
    out, and a pair that fails in its worker is reported (the sweep will time it anyway)."""
    from attnbench.perf import prewarm

    naive = registry().get("dense/naive")
    compiling = Impl(name="naive", variant="dense", fn=naive.fn, features=naive.features - {"varlen", "paged_kv"}, compiles=True)
    ghost = Impl(name="ghost", variant="dense", fn=naive.fn, features=naive.features - {"varlen", "paged_kv"}, compiles=True)
    spec = Spec(B=1, Hq=2, Sq=16, D=8, causal=True)
    cells = [Cell("dense", mode, spec=spec) for mode in ("fwd", "fwdbwd")]
    groups = prewarm.plan([(c, i) for c in cells for i in (compiling, ghost, naive)])
    assert [(g.impl_key, [c.mode for c in g.cells]) for g in groups] == [
        ("dense/naive", ["fwd", "fwdbwd"]), ("dense/ghost", ["fwd", "fwdbwd"])]
    summary = prewarm.prewarm(groups, workers=2, timeout_s=280)  # worker start-up: 90 s on a loaded 2-core box
    assert summary.done == 1 and summary.timed_out == 0, summary
    assert len(summary.failed) == 1 and "dense/ghost" in summary.failed[0] and "not found" in summary.failed[0]
    assert summary.as_dict()["groups"] == 2


SLEEPY = """
import os
import time
from attnbench.registry import Impl, registry

_naive = registry().get("dense/naive")

def _fn(q, k, v, cfg, key_padding_mask=None, bias=None):
    if q.shape[2] == 7:  # this problem's first call never ends (a stuck compile)
        time.sleep(600)
    if q.shape[2] == 5:  # this one ends its worker
        os._exit(3)
    if q.shape[2] == 6:  # this one's worker is killed as the out-of-memory killer would
        os.kill(os.getpid(), 9)
    return _naive.fn(q, k, v, cfg, key_padding_mask, bias)

impl = Impl(name="sleepy", variant="dense", fn=_fn, features=_naive.features - {"varlen", "paged_kv"}, compiles=True)
"""


def test_prewarm_cuts_a_stuck_worker_and_names_what_it_left(tmp_path, monkeypatch):
    """An implementation named as package.module:object is loaded in the workers too; a group
    that never finishes is cut 1.5 x max(longest group, 10 s) after its start (every group has
    started by then), and the stack of the stuck worker says where it was."""
    from attnbench.perf import prewarm

    (tmp_path / "sleepy_impl.py").write_text(SLEEPY)
    monkeypatch.syspath_prepend(str(tmp_path))  # spawned workers start with the parent's sys.path
    naive = registry().get("dense/naive")
    sleepy = Impl(name="sleepy", variant="dense", fn=naive.fn, features=naive.features - {"varlen", "paged_kv"}, compiles=True,
                  origin="sleepy_impl:impl")
    cells = [Cell("dense", "fwd", spec=Spec(B=1, Hq=1, Sq=S, D=8)) for S in (7, 16)]
    groups = prewarm.plan([(c, sleepy) for c in cells])
    start = time.perf_counter()
    summary = prewarm.prewarm(groups, workers=2, timeout_s=300)
    elapsed = time.perf_counter() - start
    assert summary.done == 1 and summary.timed_out == 1 and not summary.failed, summary
    assert len(summary.left) == 1 and "S7" in summary.left[0]
    # cut by the straggler rule, not the 300 s limit (worker start-up counts in elapsed: 90 s on a loaded 2-core box)
    assert elapsed < 250, f"the stuck group was waited on for {elapsed:.0f} s"
    if hasattr(__import__("signal"), "SIGUSR1"):
        stack = summary.stacks[summary.left[0]]
        assert "sleepy_impl.py" in stack and "_fn" in stack, stack
        assert stack.startswith("[worker ") and "sleeping" in stack.splitlines()[0], stack


def test_prewarm_fails_a_dead_workers_group_at_once_and_goes_on(tmp_path, monkeypatch):
    """A worker that dies mid-group (os._exit, SIGKILL) fails that group at once with its exit
    code or signal, is not waited on, and does not stop the other groups (multiprocessing.Pool
    never reported such a task, and its shared queue could wedge the other workers)."""
    from attnbench.perf import prewarm

    (tmp_path / "sleepy_impl.py").write_text(SLEEPY)
    monkeypatch.syspath_prepend(str(tmp_path))
    naive = registry().get("dense/naive")
    sleepy = Impl(name="sleepy", variant="dense", fn=naive.fn, features=naive.features - {"varlen", "paged_kv"}, compiles=True,
                  origin="sleepy_impl:impl")
    cells = [Cell("dense", "fwd", spec=Spec(B=1, Hq=1, Sq=S, D=8)) for S in (5, 6, 16, 17)]
    start = time.perf_counter()
    summary = prewarm.prewarm(prewarm.plan([(c, sleepy) for c in cells]), workers=3, timeout_s=280)
    assert time.perf_counter() - start < 250  # nothing waited on until the limit
    assert summary.done == 2 and summary.timed_out == 0, summary
    failed = sorted(summary.failed)
    assert len(failed) == 2 and "S5" in failed[0] and "died: exited with code 3" in failed[0], failed
    assert "S6" in failed[1] and "died: killed by SIGKILL" in failed[1] and "out-of-memory" in failed[1], failed


def test_prewarm_leaves_the_rest_to_the_sweep_when_every_worker_died(tmp_path, monkeypatch):
    from attnbench.perf import prewarm

    (tmp_path / "sleepy_impl.py").write_text(SLEEPY)
    monkeypatch.syspath_prepend(str(tmp_path))
    naive = registry().get("dense/naive")
    sleepy = Impl(name="sleepy", variant="dense", fn=naive.fn, features=naive.features - {"varlen", "paged_kv"}, compiles=True,
                  origin="sleepy_impl:impl")
    cells = [Cell("dense", "fwd", spec=Spec(B=1, Hq=1, Sq=S, D=8)) for S in (5, 16)]
    summary = prewarm.prewarm(prewarm.plan([(c, sleepy) for c in cells]), workers=1, timeout_s=280)
    assert summary.done == 0 and len(summary.failed) == 1 and len(summary.left) == 1, summary
    assert "S5" in summary.failed[0] and "S16" in summary.left[0]


def test_gpu_pool_pinning(monkeypatch):
    from attnbench.perf import conftest

    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv(conftest.POOL, "0,1")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert conftest.pin_worker_gpu() == "1"
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"
    assert conftest.device_label("cpu").startswith("cpu-")
    assert " " not in conftest.device_label("cpu")


def test_quick_bench_on_the_cpu_measures_every_cell(tmp_path, monkeypatch):
    # no time limit here: speed is measured by benchmarks, never by a timed unit test.
    # A fresh process-wide registry: other tests in this worker load --impl targets into it
    # (the fault set's), which this sweep would otherwise run in children that cannot import them.
    import attnbench.registry

    monkeypatch.setattr(attnbench.registry, "_REGISTRY", None)
    # budget_s=None: the sweep's time budget would skip cells on a loaded machine, and this test
    # is about every cell being measured, not about how fast
    results = bench.run_bench(quick=True, device="cpu", out=tmp_path / "bench.json", budget_s=None)
    # every registered implementation is correct code: none may error (an eager-flex forward under
    # no_grad with inputs that require grad once did, in every cell)
    bad = ("error", "oom", "crashed", "timeout", "skipped")
    errors = [f"{r.variant}/{r.impl} {r.mode}: {r.status}: {r.reason}" for r in results.perf if r.status in bad]
    assert not errors, errors[:5]
    loaded = Results.load(tmp_path / "bench.json")
    assert loaded.peaks["matmul_tflops"] > 0 and loaded.peaks["copy_gbps"] > 0
    ok = [r for r in loaded.perf if r.status == "ok"]
    assert {r.variant for r in ok} >= {"dense", "local"}
    assert all(r.timer == "wall_clock" and r.ms > 0 for r in ok)
    naive = [r for r in ok if r.impl == "naive" and r.variant == "dense"]
    assert naive and all(r.speedup == pytest.approx(1.0) for r in naive)  # no sdpa_flash on a CPU: naive is it


def _interrupt_after_two_pairs(monkeypatch) -> SimpleNamespace:
    """A CPU sweep of two small dense cells whose pair runner measures two pairs, then gets SIGINT
    (as the parent does in worker.read when the signal arrives); the worker handed out is a stand-in
    that records being stopped."""
    from attnbench import procs
    from attnbench.perf import isolate

    cells = [Cell("dense", "fwd", spec=Spec(B=1, Hq=2, Sq=S, D=16, causal=True)) for S in (32, 64)]
    seen = SimpleNamespace(ran=0, stopped=0)
    worker = SimpleNamespace(stop=lambda: setattr(seen, "stopped", seen.stopped + 1))

    def run_pair(worker, n, cell, impl, deadline_s, first_calls):
        if seen.ran == 2:
            raise procs.Interrupted(signal.SIGINT)
        seen.ran += 1
        return PerfRow(variant=cell.variant, impl=impl.name, mode=cell.mode, shape=cell.shape(), ms=1.0,
                       timer="wall_clock"), 0.01, worker

    monkeypatch.setattr(isolate, "_start", lambda plan_file, device: worker)
    monkeypatch.setattr(isolate, "_run_pair", run_pair)
    monkeypatch.setattr(bench, "measure_peaks", lambda device: {"matmul_tflops": 1.0, "copy_gbps": 1.0})
    monkeypatch.setattr(bench, "sweep_cells", lambda *args: cells)
    return seen


def test_an_interrupted_bench_keeps_and_writes_the_rows_that_finished(tmp_path, monkeypatch, capsys):
    from attnbench import procs
    from attnbench.app import cli
    from attnbench.files import latest
    from attnbench.reports.sample import sample_results

    seen = _interrupt_after_two_pairs(monkeypatch)
    with pytest.raises(procs.Interrupted) as stop:
        bench.run_bench(quick=True, device="cpu", budget_s=None)
    partial = stop.value.partial
    assert seen.stopped == 1 and partial.env["interrupted"] == "SIGINT"
    assert len([r for r in partial.perf if r.status == "ok"]) == 2  # the pairs not reached have no row

    # the module's main: the rows go to --out, one line, exit 130, no traceback
    seen = _interrupt_after_two_pairs(monkeypatch)
    out = tmp_path / "bench.json"
    assert bench.main(["--device", "cpu", "--budget", "0", "--quiet", "--out", str(out)]) == 128 + signal.SIGINT
    written = Results.load(out)
    assert written.env["interrupted"] == "SIGINT" and len([r for r in written.perf if r.status == "ok"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bench: stopped by SIGINT" in err and "written to" in err and "Traceback" not in err

    # `attnbench bench`: a run folder of its own; latest stays on the last finished run
    seen = _interrupt_after_two_pairs(monkeypatch)
    root = tmp_path / "results"
    old = cli.write_run(sample_results(), str(root))["json"]
    assert cli.main(["bench", "--device", "cpu", "--out", str(root)]) == 128 + signal.SIGINT
    kept = [p for p in root.glob("runs/*/results.json") if p != old]
    assert len(kept) == 1 and Results.load(kept[0]).env["interrupted"] == "SIGINT"
    assert len([r for r in Results.load(kept[0]).perf if r.status == "ok"]) == 2
    assert latest(root) == old.parent.resolve() and seen.stopped == 1
    assert "Interrupted run (stopped by SIGINT)" in (kept[0].parent / "report.md").read_text()
    assert "2 finished row(s) kept" in capsys.readouterr().err

    # `attnbench run` stopped in its benchmark: its folder keeps the verify results and the finished rows
    from attnbench.results import CorrectnessRow

    _interrupt_after_two_pairs(monkeypatch)
    check = CorrectnessRow(variant="dense", impl="naive", property="test_forward_matches_oracle", status="pass")
    verified = SimpleNamespace(results=Results(env={"device": "cpu"}, correctness=[check]), usage_error=None,
                               collect_error=None)
    monkeypatch.setattr(cli, "do_verify", lambda args: verified)
    assert cli.main(["run", "--device", "cpu", "--out", str(root)]) == 128 + signal.SIGINT
    ran = [p for p in root.glob("runs/*/results.json") if p not in (old, *kept)]
    assert len(ran) == 1 and latest(root) == old.parent.resolve()
    both = Results.load(ran[0])
    assert both.env["interrupted"] == "SIGINT" and both.correctness == [check]
    assert len([r for r in both.perf if r.status == "ok"]) == 2
    assert "verify results and 2 finished benchmark row(s) kept" in capsys.readouterr().err


def test_first_calls_of_compiling_impls_are_recorded():
    """The sweep keeps, per compiling implementation's first call, its time and torch.compile's
    cache hits and misses (env.first_calls): where prewarm did not help shows up there."""
    naive = registry().get("dense/naive")
    compiling = Impl(name="naive_c", variant="dense", fn=naive.fn, features=naive.features - {"varlen", "paged_kv"},
                     compiles=True)
    cell = Cell("dense", "fwd", spec=Spec(B=1, Hq=1, Sq=8, D=8))
    settings = measure.Settings.default(True, "cpu")
    calls: list = []
    row = measure.measure(compiling, cell, settings, {}, first_calls=calls)
    assert row.status == "ok" and len(calls) == 1, (row, calls)
    assert calls[0]["impl"] == "dense/naive_c" and calls[0]["first_ms"] == row.first_ms
    measure.measure(naive, cell, settings, {}, first_calls=calls)
    assert len(calls) == 1  # naive does not compile
    assert set(measure.compile_cache_counts()) >= {"fxgraph_cache_hit", "fxgraph_cache_miss"}


def test_prewarm_gives_every_process_one_triton_cache(monkeypatch):
    """Workers and the sweep must look in the same Triton cache (Inductor moves a process to its
    own directory the first time it compiles, so without this the two disagreed)."""
    from attnbench.perf import prewarm

    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    path = prewarm.share_triton_cache()
    assert path and os.environ["TRITON_CACHE_DIR"] == path
    monkeypatch.setenv("TRITON_CACHE_DIR", "/somewhere/else")
    assert prewarm.share_triton_cache() == "/somewhere/else"  # a user's choice stands


def test_autotuner_picks_are_collected_once_per_tuner_and_never_raise():
    from attnbench.impls.naive import attention

    def picks():
        return {"fwd[Sq=8]": {"BLOCK_M": 64}}

    def broken():
        raise RuntimeError("no tuner")

    a = Impl(name="tuned", variant="dense", fn=attention, tuning=picks)
    got = measure.autotuner_picks([a, a.for_variant("local"), Impl(name="plain", variant="dense", fn=attention),
                                 Impl(name="bad", variant="dense", fn=attention, tuning=broken)])
    assert got == {"dense/tuned": {"fwd[Sq=8]": {"BLOCK_M": 64}}, "dense/bad": {"error": "RuntimeError: no tuner"}}

