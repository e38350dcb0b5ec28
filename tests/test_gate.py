"""The gate cannot lie: one device model per comparison, no pass without a judged cell, no
NaN / zero / negative time, a validated threshold, and every error naming its file
(perf/gate.py, through `attnbench gate` as a user runs it)."""

from __future__ import annotations

import json
import math

import pytest

from attnbench.app import cli
from attnbench.perf import gate as gate_mod
from attnbench.perf.gate import GateError, default_baseline, device_model, gate, model_slug
from attnbench.results import PerfRow, Results

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"
TIMES = {"flash_attn4": 0.8, "sdpa_flash": 1.0, "triton": 1.2}


def run(model: str = H200, times: dict | None = None, scale: float = 1.0, sizes=(1024, 2048), device="cuda",
        ) -> Results:
    rows = []
    for S in sizes:
        for impl, base in (times or TIMES).items():
            ms = base * (S / 1024) ** 2 * scale
            rows.append(PerfRow(variant="dense", impl=impl, mode="fwd", ms=ms, ms_p20=0.99 * ms, ms_p80=1.01 * ms,
                                shape=dict(B=1, Hq=8, Hkv=8, Sq=S, Sk=S, D=64, causal=True, dtype="bfloat16")))
    return Results(env={"device": device, "bench_device": device, "device_name": model}, perf=rows)


def gate_cli(tmp_path, current: Results | str, baseline: Results | str | None, *extra: str):
    """`attnbench gate` on files: (exit code, output)."""
    def write(res, name):
        path = tmp_path / name
        if isinstance(res, Results):
            res.save(path)
        else:
            path.write_text(res)
        return str(path)

    argv = ["gate", write(current, "current.json")]
    if baseline is not None:
        argv += ["--baseline", write(baseline, "baseline.json")]
    return cli.main([*argv, *extra])


def test_device_models_and_slugs():
    assert device_model(run(H200).env) == H200
    assert device_model(run(H200, device="cpu").env) == "cpu"  # a CPU sweep on a GPU host: CPU times
    assert device_model({}) is None
    assert model_slug(H200) == "nvidia-h200" and model_slug(H100) == "nvidia-h100-80gb-hbm3"


def test_the_same_model_is_judged():
    result = gate(run(H200), run(H200))
    assert result.verdict == "pass" and result.exit_code == 0
    slower = gate(run(H200, {**TIMES, "triton": 2.0}), run(H200))
    assert slower.verdict == "fail" and slower.exit_code == 1


def test_two_models_are_refused_unless_asked_and_then_reported(tmp_path, capsys):
    """The H200 run 'regressed' 36 cells of the H100 baseline with no slower kernel: refused."""
    with pytest.raises(GateError, match="'NVIDIA H200'.*'NVIDIA H100 80GB HBM3'"):
        gate(run(H200), run(H100))
    assert gate_cli(tmp_path, run(H200), run(H100)) == 2
    out = capsys.readouterr().out
    assert "current.json ran on 'NVIDIA H200'" in out and "--cross-device" in out and "Traceback" not in out
    report = gate(run(H200, {**TIMES, "triton": 3.0}), run(H100), cross_device=True)
    assert report.verdict == "no_verdict" and report.exit_code == 3 and not report.ok
    assert "REPORT, no verdict" in report.summary()
    assert gate_cli(tmp_path, run(H200), run(H100), "--cross-device") == 3


def test_a_cpu_run_never_passes_against_a_gpu_baseline(tmp_path):
    """Issue #17: a CPU run against the H100 baseline passed, every time tripled."""
    cpu = run("x86_64", scale=3.0, device="cpu")
    assert gate_cli(tmp_path, cpu, run(H100)) == 2


def test_no_cell_in_common_is_no_verdict(tmp_path):
    other = run(H200, sizes=(4096,))
    result = gate(other, run(H200))
    assert result.verdict == "no_verdict" and result.judged == 0 and result.exit_code == 3
    assert "NO VERDICT" in result.summary()
    only_ref = run(H200, {"sdpa_flash": 1.0})  # only the reference ran: nothing was judged
    assert gate(only_ref, run(H200)).verdict == "no_verdict"
    assert gate_cli(tmp_path, other, run(H200)) == 3


def test_a_run_without_perf_rows_is_an_error_naming_it(tmp_path, capsys):
    empty = Results(env=run().env)
    with pytest.raises(GateError, match="current run: has no perf rows"):
        gate(empty, run())
    assert gate_cli(tmp_path, empty, run()) == 2
    assert "current.json: has no perf rows" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["current", "baseline"])
def test_an_interrupted_run_is_refused_in_one_line(which, tmp_path, capsys):
    cut = run()
    cut.env["interrupted"] = "SIGINT"
    current, baseline = (cut, run()) if which == "current" else (run(), cut)
    with pytest.raises(GateError, match="an interrupted run"):
        gate(current, baseline)
    assert gate_cli(tmp_path, current, baseline) == 2
    out = capsys.readouterr().out
    assert f"{which}.json: an interrupted run (stopped by SIGINT after 6 rows)" in out
    assert ("not a baseline" in out) == (which == "baseline") and len(out.strip().splitlines()) == 1


@pytest.mark.parametrize("bad", [math.nan, 0.0, -1.0, math.inf, "0.5", None])
@pytest.mark.parametrize("which", ["current", "baseline"])
def test_bad_times_in_either_file_are_rejected(bad, which, tmp_path, capsys):
    broken = run()
    broken.perf[3].ms = bad
    current, baseline = (broken, run()) if which == "current" else (run(), broken)
    with pytest.raises(GateError, match=f"{which if which == 'baseline' else 'current run'}: perf row 3"):
        gate(current, baseline)
    assert gate_cli(tmp_path, current, baseline) == 2
    out = capsys.readouterr().out
    # a string is refused when the file loads (Results.load checks field types), the rest by the gate
    named = (f"{which}.json: perf[3].ms must be a number" if isinstance(bad, str)
             else f"{which}.json: perf row 3 (dense/flash_attn4 fwd) has ms=")
    assert named in out and "Traceback" not in out
    assert len(out.strip().splitlines()) == 1


def test_bad_spread_times_are_rejected_too():
    broken = run()
    broken.perf[0].ms_p80 = -0.1
    with pytest.raises(GateError, match="ms_p80=-0.1"):
        gate(run(), broken)


@pytest.mark.parametrize("threshold", ["nan", "inf", "-inf", "0", "-0.1", "10", "abc", ""])
def test_bad_thresholds_are_one_line_errors(threshold, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        gate_cli(tmp_path, run(), run(), "--threshold", threshold)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "threshold" in err and "Traceback" not in err
    if threshold not in ("abc", ""):
        with pytest.raises(GateError, match="threshold"):
            gate(run(), run(), threshold=float(threshold))


@pytest.mark.parametrize("text", ["{not json", "[]", "null", '{"schema": "other/1"}', '"a string"',
                                  '{"schema": "attnbench.results/1", "perf": [{"impl": "x"}]}'])
@pytest.mark.parametrize("which", ["current", "baseline"])
def test_unreadable_files_are_errors_naming_the_file(text, which, tmp_path, capsys):
    current, baseline = (text, run()) if which == "current" else (run(), text)
    assert gate_cli(tmp_path, current, baseline) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"error: {tmp_path / which}.json") and "Traceback" not in out


def test_a_missing_file_is_an_error_naming_it(tmp_path, capsys):
    assert cli.main(["gate", str(tmp_path / "nowhere.json"), "--baseline", str(tmp_path / "b.json")]) == 2
    assert "nowhere.json" in capsys.readouterr().out


def test_the_default_baseline_is_the_current_runs_model(tmp_path, monkeypatch, capsys):
    assert default_baseline(H100) == gate_mod.BASELINES / "h100.json"  # matched by its recorded model
    monkeypatch.setattr(gate_mod, "BASELINES", tmp_path / "baselines")
    (tmp_path / "baselines").mkdir()
    run(H100).save(tmp_path / "baselines" / "h100.json")
    run(H200).save(tmp_path / "baselines" / "nvidia-h200.json")
    assert default_baseline(H200) == tmp_path / "baselines" / "nvidia-h200.json"
    assert default_baseline(H100) == tmp_path / "baselines" / "h100.json"
    assert default_baseline("NVIDIA B200") is None and default_baseline(None) is None
    assert gate_cli(tmp_path, run(H200), None) == 0
    assert "nvidia-h200.json" in capsys.readouterr().out
    assert gate_cli(tmp_path, run("NVIDIA B200"), None) == 2
    assert "no baseline committed for device model 'NVIDIA B200'" in capsys.readouterr().out


def test_fa4_is_the_reference_where_it_ran_in_both_runs():
    result = gate(run(H200), run(H200))
    assert {r.reference for r in result.rows} == {"flash_attn4"}
    assert result.references == {"dense": "flash_attn4"}
    no_fa4 = run(H200, {k: v for k, v in TIMES.items() if k != "flash_attn4"})
    fallback = gate(run(H200), no_fa4)  # FA4 only in the current run: sdpa_flash for every cell
    assert {r.reference for r in fallback.rows if r.impl != "flash_attn4"} == {"sdpa_flash"}
    assert fallback.verdict == "pass"


def test_the_committed_baselines_are_valid_gate_inputs():
    """Every committed baseline loads, records its model, and has only positive finite times."""
    for path in sorted(gate_mod.BASELINES.glob("*.json")):
        results = gate_mod.load(path)
        gate_mod.check_times(results, path)
        assert device_model(results.env), path
        assert json.loads(path.read_text())["env"]["device_name"] == device_model(results.env)
