"""The command line as a user meets it: bad input is a one-line error with exit 2, malformed
results files name the file, nothing that checked nothing passes, failures print valid Python
and replay commands that work pasted from another directory."""

from __future__ import annotations

import ast
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from rich.console import Console

from attnbench.app import cli, verify
from attnbench.app.plugin import _counterexample, _failed_ratio, strip_markers
from attnbench.registry import Registry, registry
from attnbench.reports import tables as T
from attnbench.results import SCHEMA, PerfRow, Results

ATTNBENCH = Path(sys.executable).parent / "attnbench"


def _main(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


# -- one-line errors, exit 2 ---------------------------------------------------------------
GOOD_PERF = {"variant": "dense", "impl": "x", "mode": "fwd", "shape": {"Sq": 8}}


@pytest.mark.parametrize(
    "content, problem",
    [
        ("[]", "expected a JSON object, got an array"),
        ("null", "expected a JSON object, got null"),
        ("{not json", "not valid JSON"),
        (json.dumps({"schema": SCHEMA, "perf": [{**GOOD_PERF, "ms": "1.2"}]}), "perf[0].ms must be a number"),
        (json.dumps({"schema": SCHEMA, "perf": [{"variant": "dense", "mode": "fwd", "shape": {}}]}),
         "perf[0]: the field 'impl' is missing"),
        (json.dumps({"schema": SCHEMA, "correctness": {}}), "'correctness' must be an array"),
        (json.dumps({"schema": SCHEMA, "correctness": [None]}), "correctness[0] must be an object"),
        (json.dumps({"schema": SCHEMA, "peaks": {"matmul_tflops": "fast"}}), "peaks.matmul_tflops must be a number"),
        (json.dumps({"perf": []}), "not an attnbench results file"),
    ],
)  # fmt: skip
def test_a_malformed_results_file_is_one_line_naming_it(tmp_path, capsys, content, problem):
    path = tmp_path / "bad.json"
    path.write_text(content)
    code, out = _main(capsys, "report", str(path))
    assert code == cli.EXIT_USAGE
    assert out.startswith(f"error: {path}: ") and problem in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


def test_gate_names_the_malformed_file(tmp_path, capsys):
    bad = tmp_path / "current.json"
    bad.write_text("[]")
    code, out = _main(capsys, "gate", str(bad), "--baseline", str(bad))
    assert code == cli.EXIT_USAGE and str(bad) in out and len(out.strip().splitlines()) == 1


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    """A package of implementations on PYTHONPATH (and sys.path, for the in-process checks)."""
    (tmp_path / "syntax_error.py").write_text("def f(:\n")
    (tmp_path / "mykernels.py").write_text(KERNELS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


@pytest.mark.parametrize(
    "argv, problem",
    [
        (["verify", "--impl", "syntax_error:x"], "--impl syntax_error:x: SyntaxError: invalid syntax ("),
        (["list", "--impl", "syntax_error:x"], "SyntaxError"),
        (["bench", "--impl", "syntax_error:x"], "SyntaxError"),
        (["verify", "--impl", "nosuch.module:x"], "--impl nosuch.module:x: ModuleNotFoundError"),
        (["verify", "--impl", "local/naive", "--variant", "dense"], "outside the selected --variant dense"),
        (["run", "--impl", "local/naive", "--variant", "dense"], "outside the selected --variant dense"),
        (["verify", "--device", "gpu"], "--device gpu: expected cpu, cuda or cuda:N"),
        (["verify", "--impl", "mykernels:ALL[dense/nosuch]"], "matches none of its implementations"),
        (["bench", "--sweep", "sequence"], "unknown sweep(s) ['sequence']"),
        (["bench", "--device", "cpu", "--sweep", "seq"], "['seq'] have no shapes for cpu"),
    ],
)  # fmt: skip
def test_bad_selection_is_one_line_exit_2(kernels, capsys, argv, problem):
    code, out = _main(capsys, *argv)
    assert code == cli.EXIT_USAGE, out
    assert out.startswith("error: ") and problem in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out
    assert "❌" not in out  # `:x` followed by `: ` is rich's emoji code for a cross mark


@pytest.mark.parametrize(
    "command, setting, value",
    [
        ("verify", "ATTNBENCH_VERIFY_WORKERS", "abc"),
        ("run", "ATTNBENCH_VERIFY_WORKERS", "0"),
        ("verify", "ATTNBENCH_VERIFY_DEADLINE", "abc"),
        ("run", "ATTNBENCH_VERIFY_DEADLINE", "-1"),
        ("bench", "ATTNBENCH_BENCH_DEADLINE", "nan"),
        ("run", "ATTNBENCH_BENCH_DEADLINE", "abc"),
    ],
)
def test_a_bad_setting_is_one_line_exit_2_before_anything_runs(monkeypatch, capsys, command, setting, value):
    monkeypatch.setenv(setting, value)
    code, out = _main(capsys, command, "--impl", "dense/naive", "--device", "cpu")
    assert code == cli.EXIT_USAGE, out
    assert out.startswith(f"error: {setting} must be a positive") and f"got {value!r}" in out, out
    assert len(out.strip().splitlines()) == 1 and "Traceback" not in out


def test_bench_lists_its_sweeps(capsys):
    from attnbench.perf.sweeps import SWEEPS

    code, out = _main(capsys, "bench", "--list-sweeps")
    assert code == cli.EXIT_OK
    names = [line.split()[0] for line in out.strip().splitlines()[1:]]
    assert names == list(SWEEPS) and "seq" in names and "moa" in names


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine")
def test_device_cuda_on_a_cpu_host_is_an_error(capsys):
    code, out = _main(capsys, "verify", "--device", "cuda")
    assert code == cli.EXIT_USAGE and "no CUDA device" in out


def test_a_short_name_resolves_within_the_variant():
    reg = registry()
    assert reg.get("naive", ["local"]).key == "local/naive"
    with pytest.raises(KeyError, match="ambiguous"):
        reg.get("naive")


def test_one_member_of_a_list_target(kernels):
    reg = Registry()
    assert [i.key for i in reg.load_spec("mykernels:ALL")] == ["dense/toplefty", "dense/inline_crash"]
    assert [i.key for i in reg.load_spec("mykernels:ALL[dense/inline_crash]")] == ["dense/inline_crash"]


def test_list_names_declared_features_this_machine_lacks(tmp_path, monkeypatch, capsys):
    """Impl.absent: `list` shows the declared feature and why it does not run here."""
    (tmp_path / "absentk.py").write_text(textwrap.dedent("""
        from attnbench.impls.naive import attention
        from attnbench.registry import Impl
        k = Impl(name="absentk", variant="dense", fn=attention, features={"causal", "fp8"},
                 absent=lambda: {"fp8": "SM100 only"})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(cli, "console", Console(width=400, emoji=False))  # no folded cells
    code, out = _main(capsys, "list", "--impl", "absentk:k")
    assert code == 0
    assert "causal, fp8 (not on this machine: fp8: SM100 only)" in out


def test_help_documents_the_exit_codes(capsys):
    for command in ("verify", "run"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for code, meaning in cli.EXIT_MEANING.items():
            assert f"{code}: {meaning}" in out


# -- failure text --------------------------------------------------------------------------
def test_counterexamples_are_python_without_pytest_markers():
    marked = textwrap.dedent("""\
        E   AssertionError: out: max error 3.01 > allowed 4.52e-06 (ratio 6.66e+05; ...)
        E   Falsifying example: test_forward_matches_oracle(
        E       impl=Impl(name='x', variant='dense', fn=f),
        E       data=data(...),
        E   )
        E   Draw 1 (spec): Spec(B=2,
        E    Hq=2,
        E    Hkv=2,
        E    window=(None, 0),
        E   )""")
    case = _counterexample(marked)
    assert case == "Spec(B=2, Hq=2, Hkv=2, window=(None, 0))"
    ast.parse(case, mode="eval")
    assert "E " not in strip_markers(marked).replace("AssertionError", "")


def test_the_noted_short_case_wins_over_the_full_draw():
    text = textwrap.dedent("""\
        Falsifying example: test_forward_matches_oracle(
            data=data(...),
        )
        Draw 1: Spec(B=2, Hq=1, Hkv=1, Sq=2, Sk=2, D=16, Dv=16, dtype='float32', device='cpu', scale=None)
        spec: Spec(B=2, Sq=2)""")
    assert _counterexample(text) == "Spec(B=2, Sq=2)"


def test_a_module_failure_shows_the_module_case():
    note = textwrap.dedent("""\
        Falsifying example: test_module_forward_matches_oracle(
            impl=Impl(name='sloppy', variant='LocalMHA', features=frozenset({'causal'})),
            device='cpu',
            measure=record_ratio,
            data=data(...),
        )
        Draw 1 (case): ModuleCase(variant='LocalMHA', kwargs=(('causal', False), ('dim', 16)), N=3, seed=7)""")
    case = _counterexample(note)
    assert case == "ModuleCase(variant='LocalMHA', kwargs=(('causal', False), ('dim', 16)), N=3, seed=7)"
    ast.parse(case, mode="eval")


def test_the_ratio_is_the_one_the_tolerance_message_states():
    import torch

    from attnbench.properties import tolerance

    oracle = torch.zeros(4, dtype=torch.float64)
    verdict = tolerance.compare("out", torch.ones(4), oracle, torch.full((4,), 1e-7), "float32")
    with pytest.raises(AssertionError) as info:
        verdict.require()

    class Call:
        excinfo = info

    assert _failed_ratio(Call()) == pytest.approx(verdict.ratio, rel=1e-2)


# -- no silent pass ------------------------------------------------------------------------
def test_not_verified_names_what_checked_nothing():
    from attnbench.results import CorrectnessRow

    rows = [
        CorrectnessRow("dense", "naive", "test_a", "pass"),
        CorrectnessRow("dense", "flash", "test_a", "skip", reason="dense/flash unavailable: flash_attn not installed"),
    ]
    requested = {"impls": ["dense/naive", "dense/flash", "local/naive"], "explicit": True,
                 "broken": ["mypkg.kernels: failed to load: SyntaxError: invalid syntax (kernels.py:3)"]}
    lines = verify.not_verified(rows, requested, properties=["test_a", "test_b"])
    assert lines == [
        "dense/flash: every check skipped: dense/flash unavailable: flash_attn not installed",
        "local/naive: no selected property applies to the local variant",
        "property test_b: no selected implementation has it",
        "mypkg.kernels: failed to load: SyntaxError: invalid syntax (kernels.py:3)",
    ]
    assert verify.not_verified(rows[:1], {"impls": ["dense/naive"], "explicit": True, "broken": []}) == []


PROPERTY = textwrap.dedent("""
    import pytest
    pytestmark = pytest.mark.variant("dense")

    def test_needs_lse(impl):
        pytest.skip(f"{impl.key} does not declare lse")

    def test_runs(impl):
        assert impl.name
""")


def test_an_unknown_property_stops_the_run(tmp_path):
    (tmp_path / "test_prop.py").write_text(PROPERTY)
    outcome = verify.run(impls=["dense/naive"], properties=["test_rnus"], paths=[str(tmp_path / "test_prop.py")])
    assert outcome.usage_error.startswith("unknown property 'test_rnus'; did you mean test_runs")
    assert not outcome.results.correctness


def test_a_property_that_checked_nothing_is_not_a_pass(tmp_path):
    (tmp_path / "test_prop.py").write_text(PROPERTY)
    totals, started, rows = [], [], []
    # the CLI's progress total: the checks finished so far plus what the test processes have left
    outcome = verify.run(impls=["dense/naive"], properties=["needs_lse"], paths=[str(tmp_path / "test_prop.py")],
                         on_collect=lambda left: totals.append(len(rows) + left), on_start=started.append,
                         on_row=rows.append)
    assert not outcome.failures
    assert outcome.not_verified == [
        "dense/naive: every check skipped: dense/naive does not declare lse",
        "property needs_lse: every check skipped: dense/naive does not declare lse",
    ]
    assert cli.verify_code(outcome) == cli.EXIT_NOTHING
    assert totals and totals[-1] == 1  # the progress total is the collected count, over every test process
    assert started[0]["impl"] == "naive" and started[0]["property"] == "test_needs_lse"


# -- the replay command, pasted ------------------------------------------------------------
KERNELS = textwrap.dedent("""
    import os
    from attnbench.impls.naive import attention
    from attnbench.registry import Impl
    from attnbench.spec import Config

    def top_left(q, k, v, cfg, key_padding_mask=None, bias=None):
        cfg = Config(**{**cfg.__dict__, "align": "top_left"})
        return attention(q, k, v, cfg, key_padding_mask, bias)

    def crash(q, k, v, cfg, key_padding_mask=None, bias=None):
        os.abort()

    broken = Impl(name="toplefty", variant="dense", fn=top_left, features={"causal", "cross"})
    # a list whose second member is bound to no module attribute: its replay picks it by key
    ALL = [broken, Impl(name="inline_crash", variant="dense", fn=crash, features={"causal", "cross"})]
""")


def _attnbench(args: list[str] | str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    command = args if isinstance(args, str) else shlex.join([str(ATTNBENCH), *args])
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def test_replays_work_pasted_from_another_directory(kernels, tmp_path):
    """One verify of a list target (a failing member and a crashing one), then the printed replay
    of the crash, run by a shell from another directory: it re-runs that member and property
    only. Neither run writes into the directory it runs in."""
    env = {**os.environ, "PYTHONPATH": str(kernels), "COLUMNS": "80"}
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    out = _attnbench(["verify", "--impl", "mykernels:ALL", "--property", "test_forward_matches_oracle",
                      "--out", "results"], first, env)  # fmt: skip
    assert out.returncode == cli.EXIT_FAILED, out.stdout[-3000:] + out.stderr[-3000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: FAIL") and "exit 1: a check failed" in last
    assert all(len(line) <= 80 for line in out.stdout.splitlines()[:-1]), out.stdout
    saved = json.loads((first / "results" / "latest" / "results.json").read_text())
    rows = {r["impl"]: r for r in saved["correctness"]}
    failed, crashed = rows["toplefty"], rows["inline_crash"]
    assert failed["status"] == "fail" and crashed["status"] == "error"
    assert failed["counterexample"].startswith("Spec(") and "E " not in failed["counterexample"]
    ast.parse(failed["counterexample"], mode="eval")
    assert "--impl mykernels:broken --variant dense --property test_forward_matches_oracle" in failed["replay"]
    assert "'mykernels:ALL[dense/inline_crash]' --variant dense" in crashed["replay"]
    assert sorted(p.name for p in first.iterdir()) == ["results"]  # no .hypothesis/, no .benchmarks/

    again = _attnbench(crashed["replay"] + " --out results", second, {**env, "PYTHONPATH": ""})
    assert again.returncode == cli.EXIT_FAILED, again.stdout[-3000:] + again.stderr[-3000:]
    replayed = json.loads((second / "results" / "latest" / "results.json").read_text())["correctness"]
    assert [(r["impl"], r["property"], r["status"]) for r in replayed] == [
        ("inline_crash", "test_forward_matches_oracle", "error")
    ]
    assert sorted(p.name for p in second.iterdir()) == ["results"]


# -- reports -------------------------------------------------------------------------------
def _perf(impl: str, ms: float, p20: float, p80: float, tflops: float) -> PerfRow:
    return PerfRow("dense", impl, "fwd", {"Sq": 64, "Sk": 64, "B": 1}, ms=ms, ms_p20=p20, ms_p80=p80,
                   tflops=tflops, timer="wall_clock")  # fmt: skip


def test_a_noisy_or_impossible_cell_is_flagged_and_never_the_winner():
    peaks = {"matmul_tflops": 1.0}
    noisy = _perf("blockwise", 0.447, 0.1, 5.84, 0.9)  # ±642%
    beyond = _perf("sdpa_math", 1.0, 0.99, 1.01, 2.96)  # 296% of the peak
    fine = _perf("naive", 2.0, 1.98, 2.02, 0.5)
    group = T.perf_groups([noisy, beyond, fine])[0]
    assert T.best_tflops(group, peaks) == {"64": 0.5}
    assert "noise ±642%" in T.suspect(noisy, peaks) and "296% of the measured matmul peak" in T.suspect(beyond, peaks)
    cells = {r.impl: T.perf_cells(r, peaks) for r in group.rows}
    assert cells["blockwise"][4].endswith("?") and cells["sdpa_math"][6].endswith("?")
    assert any("not trusted" in n for n in T.perf_notes(group, peaks))


def test_cpu_figures_say_how_they_were_timed():
    results = Results(env={"triton_interpret": True}, perf=[_perf("triton", 1, 1, 1, 1)])
    assert T.timing_label(results) == "wall clock; Triton interpreted"


def test_a_comparison_warns_on_different_peaks_and_never_prints_zero_ratios():
    a = Results(peaks={"matmul_tflops": 100.0}, perf=[_perf("naive", 100.0, 99, 101, 1)])
    b = Results(peaks={"matmul_tflops": 80.0}, perf=[_perf("naive", 0.04, 0.039, 0.041, 1)])
    cmp = T.compare_runs(a, b)
    assert "measured peaks differ" in cmp.peak_warning() and "-20%" in cmp.peak_warning()
    assert T.fmt_times(cmp.perf[0].ratio) == "0.0004×"
    assert not T.compare_runs(a, a).peak_warning()


def test_the_bench_bar_advances_and_names_its_cell():
    import io

    from rich.console import Console

    from attnbench.reports.terminal import Progress

    with Progress(console=Console(file=io.StringIO())) as progress:
        cli._bench_progress(progress, "measuring the cpu peaks (matmul, copy)")
        assert progress.message.startswith("measuring") and progress.total is None
        cli._bench_progress(progress, "[3/7 12s] dense fwd S=128 · naive: 1.2 ms, 0.1 TFLOP/s")
        assert (progress.done, progress.total, progress.failed) == (3, 7, 0)
        assert progress.message == "dense fwd S=128 · naive: 1.2 ms, 0.1 TFLOP/s"
        cli._bench_progress(progress, "[4/7 13s] dense fwd S=256 · blockwise: error (ValueError: x)")
        assert (progress.done, progress.failed) == (4, 1)


def test_failures_decide_the_exit_code_before_what_was_not_verified():
    from attnbench.results import CorrectnessRow

    failed = verify.Outcome(Results(correctness=[CorrectnessRow("dense", "x", "test_a", "fail")]),
                            not_verified=["dense/y: every check skipped: needs CUDA"])
    assert cli.verify_code(failed) == cli.EXIT_FAILED
    assert cli.verify_code(verify.Outcome(Results(), not_verified=["property p: ..."])) == cli.EXIT_NOTHING
    assert cli.verify_code(verify.Outcome(Results())) == cli.EXIT_OK
