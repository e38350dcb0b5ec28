"""The fault set: broken implementations (tests/faults/, one fault each) run through verify,
bench and run. Each run completes, names the fault against the right implementation, exits
non-zero, and keeps every other implementation's results. Signals end a command with its
children, and earlier runs stay intact.

verify runs a tiny property file (tests/faults/props/) instead of the real suite, and bench a
single small cell or the quick sweep's dense causal cells, so the set stays short on a CPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnbench.app import cli, verify
from attnbench.app.plugin import read_rows
from attnbench.files import latest, write_atomic
from attnbench.perf import bench
from attnbench.perf.cells import Cell
from attnbench.perf.isolate import Budgets
from attnbench.spec import Spec

FAULTS = Path(__file__).parent / "faults"
PROPS = FAULTS / "props"
NAMES = ("raises", "nan", "shape", "dtype", "sleeps", "oom", "mutates", "exits", "segfault")
TARGETS = [f"fault_{n}:impl" for n in NAMES]
DEADLINE = "8"  # seconds: the sleeper's deadline (verify: without progress; bench: per cell)

# what verify's reason says for each fault. nan / dtype / mutates are caught here by the tiny
# property's own checks; in the real suite the harness's contract check names them.
VERIFY_REASON = {
    "raises": "kernel exploded", "nan": "max error nan", "shape": "wrong output shape",
    "dtype": "float16", "sleeps": "timeout", "oom": "DefaultCPUAllocator", "mutates": "mutated its input q",
    "exits": "exit code 3", "segfault": "signal 11",
}
BENCH_STATUS = {
    "raises": ("error", "kernel exploded"), "shape": ("error", "shape (1, 2, 31, 16)"),
    "dtype": ("error", "returned float16 for float32"), "sleeps": ("timeout", "deadline"),
    "oom": ("oom", "DefaultCPUAllocator"), "exits": ("crashed", "exit code 3"),
    "segfault": ("crashed", "signal 11"),
    "nan": ("ok", ""), "mutates": ("ok", ""),  # bench times; verify judges values
}


@pytest.fixture(scope="module")
def fault_env():
    """PYTHONPATH with the fault files (children inherit it), small deadlines."""
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "ATTNBENCH_VERIFY_DEADLINE", "ATTNBENCH_BENCH_DEADLINE")}
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAULTS), saved["PYTHONPATH"]) if p)
    os.environ["ATTNBENCH_VERIFY_DEADLINE"] = DEADLINE
    os.environ["ATTNBENCH_BENCH_DEADLINE"] = DEADLINE
    sys.path.insert(0, str(FAULTS))
    yield
    sys.path.remove(str(FAULTS))
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cell(causal: bool = True) -> Cell:
    return Cell("dense", "fwd", spec=Spec(B=1, Hq=2, Sq=32, D=16, causal=causal, dtype="float32"))


# -- verify ------------------------------------------------------------------------------------


def test_verify_names_every_fault_and_keeps_the_others(fault_env):
    outcome = verify.run(impls=["dense/naive", *TARGETS], paths=[str(PROPS)])
    rows = {(r.impl, r.property): r for r in outcome.results.correctness}
    assert rows[("naive", "test_forward_matches_oracle")].status == "pass"
    assert rows[("naive", "test_second_property")].status == "pass"
    for name in NAMES:
        row = rows[(f"fault_{name}", "test_forward_matches_oracle")]
        assert row.status in ("fail", "error"), (name, row)
        assert VERIFY_REASON[name] in row.reason, (name, row.reason)
        # the fault's other test, which never calls it, still ran and passed after any crash
        assert rows[(f"fault_{name}", "test_second_property")].status == "pass", name
    assert rows[("fault_sleeps", "test_forward_matches_oracle")].reason.startswith("timeout:")
    assert rows[("fault_exits", "test_forward_matches_oracle")].reason.startswith("crashed:")
    assert len(outcome.crashed) == 3 and not outcome.not_run and outcome.collect_error is None


def test_verify_gives_up_on_an_implementation_after_its_cap_and_lists_what_did_not_run(fault_env, monkeypatch):
    monkeypatch.setattr(verify, "MAX_FAULTS_PER_IMPL", 1)
    outcome = verify.run(impls=["fault_exits:impl", "dense/naive"], paths=[str(PROPS)])
    rows = {(r.impl, r.property): r for r in outcome.results.correctness}
    assert "exit code 3" in rows[("fault_exits", "test_forward_matches_oracle")].reason
    left = rows[("fault_exits", "test_second_property")]
    assert left.status == "error" and left.reason.startswith("not run: dense/fault_exits crashed")
    assert outcome.not_run == [n for n in outcome.not_run if "fault_exits" in n] and len(outcome.not_run) == 1
    assert rows[("naive", "test_forward_matches_oracle")].status == "pass"  # a bystander runs everything
    assert rows[("naive", "test_second_property")].status == "pass"


# -- bench -------------------------------------------------------------------------------------


def test_bench_contains_every_fault(fault_env):
    results = bench.run_bench(quick=True, device="cpu", impls=["dense/naive", *TARGETS], cells=[_cell()], budget_s=None)
    rows = {r.impl: r for r in results.perf}
    assert rows["naive"].status == "ok" and rows["naive"].ms > 0
    for name, (status, text) in BENCH_STATUS.items():
        row = rows[f"fault_{name}"]
        assert row.status == status and text in row.reason, (name, row.status, row.reason)


def test_bench_skips_an_implementation_after_its_fault_cap_and_runs_the_others(fault_env):
    cells = [_cell(), Cell("dense", "fwd", spec=Spec(B=1, Hq=2, Sq=48, D=16, causal=True, dtype="float32")),
             Cell("dense", "fwd", spec=Spec(B=1, Hq=2, Sq=64, D=16, causal=True, dtype="float32"))]
    results = bench.run_bench(quick=True, device="cpu", impls=["fault_exits:impl", "dense/naive"], cells=cells,
                              budget_s=None)
    statuses = [(r.impl, r.status) for r in results.perf]
    assert statuses == [("naive", "ok"), ("fault_exits", "crashed")] * 2 + [("naive", "ok"), ("fault_exits", "skipped")]
    assert "crashed or timed out 2 times" in results.perf[-1].reason


def test_budget_shares_keep_one_slow_implementation_from_spending_the_others_time():
    b = Budgets(10.0, ["slow", "slow", "fast", "fast"])  # 5 s each once the 10 s are spent
    assert b.allows("slow")
    b.charge("slow", 80.0)  # a first call far past the whole budget
    assert not b.allows("slow")
    for _ in range(4):  # the other still gets its own 5 s
        assert b.allows("fast")
        b.charge("fast", 1.0)
    b.charge("fast", 1.0)
    assert not b.allows("fast")
    within = Budgets(10.0, ["a", "b"])
    within.charge("a", 9.0)  # past its share, but the sweep is within its budget: not cut
    assert within.allows("a") and within.allows("b")
    assert Budgets(None, ["a"]).allows("a")


# -- run and the command line ------------------------------------------------------------------


def test_run_completes_names_the_faults_and_keeps_verify_and_bench_results(fault_env, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(verify, "PROPERTIES_DIR", PROPS)
    impls = [a for t in ["dense/naive", *TARGETS] for a in ("--impl", t)]
    rc = cli.main(["run", *impls, "--variant", "dense", "--device", "cpu", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 1
    data = json.loads((latest(tmp_path) / "results.json").read_text())
    correctness = {(r["impl"], r["property"]): r for r in data["correctness"]}
    perf = [r for r in data["perf"] if r["status"] != "unsupported"]
    assert correctness[("naive", "test_forward_matches_oracle")]["status"] == "pass"
    assert all(r["status"] == "ok" for r in perf if r["impl"] == "naive") and len(perf) > len(NAMES)
    for name in NAMES:
        assert correctness[(f"fault_{name}", "test_forward_matches_oracle")]["status"] in ("fail", "error"), name
    by_impl = {r["impl"]: r for r in perf}
    for name, (status, _) in BENCH_STATUS.items():
        assert by_impl[f"fault_{name}"]["status"] == status, name
    assert "bench: dense/fault_exits" in out and (latest(tmp_path) / "report.html").exists()


def test_a_fault_that_fails_to_import_is_refused_by_name(fault_env, tmp_path, capsys):
    for command in ("verify", "bench", "run"):
        rc = cli.main([command, "--impl", "fault_import:impl", "--device", "cpu", "--out", str(tmp_path)])
        assert rc == 2, command
        assert "fault_import" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


# -- data safety -------------------------------------------------------------------------------


def test_a_cut_write_leaves_the_previous_file_whole(tmp_path):
    target = tmp_path / "results.json"
    write_atomic(target, json.dumps({"ok": True}))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
            "import signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "from attnbench.files import write_atomic; write_atomic(sys.argv[1], 'x' * 100000)")
    done = subprocess.run([sys.executable, "-P", "-c", code, str(target)], capture_output=True, text=True)
    assert done.returncode != 0 and "File too large" in done.stderr
    assert json.loads(target.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_runs_never_overwrite_each_other_and_report_writes_beside(tmp_path, capsys):
    from attnbench.reports.sample import sample_results

    root = tmp_path / "results"
    first = cli.write_run(sample_results(), str(root))["json"]
    before = first.read_bytes()
    second = cli.write_run(sample_results(), str(root))["json"]
    assert first.parent != second.parent and latest(root) == second.parent.resolve()
    assert cli.main(["report", str(first)]) == 0
    assert first.read_bytes() == before and latest(root) == second.parent.resolve()
    assert list((first.parent / "reports").glob("*/report.html"))
    assert cli.main(["report", str(root)]) == 0  # a folder: its latest run
    assert list((second.parent / "reports").glob("*/report.html"))


def test_a_torn_row_is_skipped_with_a_warning(tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"variant": "dense", "impl": "naive", "property": "p", "status": "pass"}\n{"variant": "de')
    assert [r.impl for r in read_rows(rows)] == ["naive"]
    assert "rows.jsonl:2: skipped" in capsys.readouterr().err


# -- signals -----------------------------------------------------------------------------------


def _descendants(pid: int) -> set[int]:
    """Every live process whose parent chain reaches pid (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc").exists(), reason="reads /proc")
@pytest.mark.parametrize("command, sig", [("bench", signal.SIGTERM), ("verify", signal.SIGINT)])
def test_a_signal_ends_the_command_and_its_children_and_keeps_earlier_runs(fault_env, tmp_path, command, sig):
    from attnbench.reports.sample import sample_results

    root = tmp_path / "results"
    old = cli.write_run(sample_results(), str(root))["json"]
    before = {p: p.read_bytes() for p in old.parent.rglob("*") if p.is_file()}
    env = dict(os.environ, ATTNBENCH_VERIFY_DEADLINE="600", ATTNBENCH_BENCH_DEADLINE="600")
    code = ("import sys; from attnbench.app import verify, cli; verify.PROPERTIES_DIR = sys.argv[1]; "
            "sys.exit(cli.main(sys.argv[2:]))")
    # -P: the checkout's own attnbench/ folder (the current directory under tox) must not shadow
    # the installed package
    args = [sys.executable, "-P", "-c", code, str(PROPS), command, "--impl", "fault_sleeps:impl", "--device", "cpu",
            "--out", str(root)] + (["--quick"] if command == "bench" else [])
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    children: set[int] = set()
    end = time.monotonic() + 300
    while time.monotonic() < end and proc.poll() is None:  # until the child is inside the sleeping call
        children |= _descendants(proc.pid)
        # the worker itself (a forked child shows its parent's command line until it execs)
        if any(marker in _cmdline(c) for c in children for marker in ("attnbench.perf.isolate", "-m pytest")):
            time.sleep(3)
            children |= _descendants(proc.pid)
            break
        time.sleep(0.5)
    if not children:
        proc.kill()
        out, err = proc.communicate(timeout=30)
        raise AssertionError(f"no child process started; the command exited {proc.returncode}: {err[-2000:]}")
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    last = err.strip().splitlines()[-1]  # before it: the progress line, when stderr is not a terminal
    assert "Traceback" not in err and last.startswith("attnbench: stopped by") and sig.name in last, err
    time.sleep(0.5)
    assert not [c for c in children if _alive(c)]
    assert {p: p.read_bytes() for p in old.parent.rglob("*") if p.is_file()} == before
    assert latest(root) == old.parent.resolve()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_the_latest_pointer_is_a_file_where_symlinks_are_not_allowed(tmp_path, monkeypatch):
    from attnbench import files

    def refuse(*args, **kwargs):
        raise OSError("symlinks not allowed")

    monkeypatch.setattr(files.os, "symlink", refuse)
    first, second = files.new_run_dir(tmp_path), files.new_run_dir(tmp_path)
    files.set_latest(tmp_path, first)
    files.set_latest(tmp_path, second)
    assert (tmp_path / "latest").read_text().strip() == f"runs/{second.name}"
    assert files.latest(tmp_path) == second and files.results_file(tmp_path) == second / "results.json"


def test_a_lost_device_context_ends_the_test_process_and_the_rest_run_in_a_fresh_one(fault_env):
    outcome = verify.run(impls=["fault_devicelost:impl", "dense/naive"], paths=[str(PROPS)])
    rows = {(r.impl, r.property): r for r in outcome.results.correctness}
    lost = rows[("fault_devicelost", "test_forward_matches_oracle")]
    assert lost.status == "fail" and "CUDA context is lost" in lost.reason
    # stopped at the first (faulting) example, before Hypothesis shrank on the lost context
    assert "not shrunk" in lost.reason and lost.counterexample == "dict(S=2)"
    # the tests after it ran in a fresh process, the fault's own other test included
    assert rows[("fault_devicelost", "test_second_property")].status == "pass"
    assert rows[("naive", "test_forward_matches_oracle")].status == "pass"
    assert rows[("naive", "test_second_property")].status == "pass"
    assert outcome.collect_error is None and not outcome.not_run


def test_an_interrupted_verify_keeps_the_checks_that_finished(monkeypatch, tmp_path, capsys):
    from attnbench import procs
    from attnbench.reports.sample import sample_results
    from attnbench.results import CorrectnessRow, Results

    finished = CorrectnessRow(variant="dense", impl="naive", property="test_forward_matches_oracle", status="pass")

    def interrupted_child(args, env, loop, deadline_s):
        loop.add(finished)
        raise procs.Interrupted(signal.SIGINT)

    monkeypatch.setattr(verify, "_run_child", interrupted_child)
    with pytest.raises(procs.Interrupted) as stop:
        verify.run(impls=["dense/naive"], paths=[str(PROPS)], workers=1)
    assert stop.value.partial.correctness == [finished] and stop.value.partial.env["interrupted"] == "SIGINT"

    root = tmp_path / "results"
    old = cli.write_run(sample_results(), str(root))["json"]
    monkeypatch.setattr(cli, "do_verify", lambda args: verify.run(impls=["dense/naive"], paths=[str(PROPS)], workers=1))
    assert cli.main(["verify", "--impl", "dense/naive", "--device", "cpu", "--out", str(root)]) == 128 + signal.SIGINT
    kept = [p for p in root.glob("runs/*/results.json") if p != old]
    assert len(kept) == 1 and Results.load(kept[0]).correctness[0].impl == "naive"
    assert Results.load(kept[0]).env["interrupted"] == "SIGINT"
    assert latest(root) == old.parent.resolve()  # the last finished run stays the latest
    assert "1 finished check(s) kept" in capsys.readouterr().err
