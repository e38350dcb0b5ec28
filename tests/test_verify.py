"""The verify runner and plugin end to end, on a tiny property file of their own: a broken
implementation is reported failing with reason, minimal spec and replay command, a crashing one
is contained, and the run goes on to the end."""

from __future__ import annotations

import ast
import os
import re
import textwrap

from attnbench.app import verify

PROPERTY = textwrap.dedent("""
    import pytest
    import torch
    from hypothesis import assume, example, given, settings, strategies as st
    from attnbench.oracles.dense import reference
    from attnbench.spec import Spec

    pytestmark = pytest.mark.variant("dense")

    @settings(max_examples=10, deadline=None, derandomize=True, database=None)
    @given(S=st.integers(1, 6), causal=st.booleans())
    def test_forward_matches_oracle(impl, device, measure, S, causal):
        spec = Spec(Sq=S, Sk=S + 1, causal=causal, device=device)
        if not impl.covers(spec):
            return
        x = spec.make_inputs()
        out, _ = impl.fn(x.q, x.k, x.v, spec.config(), x.key_padding_mask, x.bias)
        err = (out.double() - reference(spec, x)[0]).abs().max().item()
        measure(err / 1e-4)
        assert err < 1e-4, f"max error {err:.3g} (ratio {err / 1e-4:.3g}) for {spec.short()}"

    @settings(max_examples=20, deadline=None, derandomize=True, database=None)
    @given(S=st.integers(1, 1000))
    def test_ratio_shrinks(impl, measure, S):
        if impl.name != "toplefty":
            return
        measure(S + 1.0)  # every example fails; the minimal one (S=1) with the smallest ratio
        assert False, f"max error {S + 1.0:g} (ratio {S + 1.0:g}) for S={S}"

    def test_second_property_runs(impl):
        assert impl.name

    @settings(max_examples=5, deadline=None, derandomize=True, database=None)
    @given(S=st.integers(1, 10**6))
    def test_declined_everywhere(impl, S):
        assume(impl.name != "toplefty")  # stands in for a supports() that declines every draw

    @settings(max_examples=2, database=None)
    @example(S=1)
    @given(S=st.integers(1, 3))
    def test_skipped_in_an_explicit_example(impl, S):
        pytest.skip(f"{impl.key} does not declare lse")
""")

IMPLS = textwrap.dedent("""
    import os
    from attnbench.impls.naive import attention
    from attnbench.registry import Impl
    from attnbench.spec import Config

    def top_left(q, k, v, cfg, key_padding_mask=None, bias=None):
        cfg = Config(**{**cfg.__dict__, "align": "top_left"})
        return attention(q, k, v, cfg, key_padding_mask, bias)

    def crash(q, k, v, cfg, key_padding_mask=None, bias=None):
        os.abort()

    def twofold(q, k, v, cfg, key_padding_mask=None, bias=None):
        if q.shape[2] == 1:
            raise ValueError("no single query")
        return top_left(q, k, v, cfg, key_padding_mask, bias)

    broken = Impl(name="toplefty", variant="dense", fn=top_left, features={"causal", "cross"})
    twice = Impl(name="twofold", variant="dense", fn=twofold, features={"causal", "cross"})
    crashing = Impl(name="crashy", variant="dense", fn=crash, features={"causal", "cross"})
""")


def run(tmp_path, monkeypatch, *impls):
    (tmp_path / "test_prop.py").write_text(PROPERTY)
    (tmp_path / "mykernels.py").write_text(IMPLS)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return verify.run(impls=impls, paths=[str(tmp_path / "test_prop.py")])


def test_broken_impl_is_reported_with_counterexample_and_replay(tmp_path, monkeypatch):
    outcome = run(tmp_path, monkeypatch, "dense/naive", "mykernels:broken")
    rows = {(r.impl, r.property): r for r in outcome.results.correctness}
    assert rows[("naive", "test_forward_matches_oracle")].status == "pass"
    bad = rows[("toplefty", "test_forward_matches_oracle")]
    assert bad.status == "fail"
    assert "max error" in bad.reason
    assert bad.counterexample.startswith("Spec(") and "causal=True" in bad.counterexample
    assert "E " not in bad.counterexample
    ast.parse(bad.counterexample, mode="eval")  # valid Python
    assert "--impl mykernels:broken --variant dense --property test_forward_matches_oracle" in bad.replay
    # one ratio per failure: the header's is the failing check's, the one the reason gives
    assert bad.error_ratio == float(re.search(r"\(ratio ([\d.e+-]+)\)", bad.reason).group(1))
    # one ratio per failure when the examples tried on the way had larger ones
    shrunk = rows[("toplefty", "test_ratio_shrinks")]
    assert shrunk.status == "fail" and "(ratio 2)" in shrunk.reason and shrunk.error_ratio == 2.0
    assert shrunk.counterexample == "dict(S=1)"
    assert rows[("toplefty", "test_second_property_runs")].status == "pass"  # the run went on
    # every draw declined: a failure that says so, not Hypothesis' health-check text
    declined = rows[("toplefty", "test_declined_everywhere")]
    assert declined.status == "fail" and declined.reason.startswith("no drawn case ran")
    assert rows[("naive", "test_declined_everywhere")].status == "pass"
    # A skip inside an @example: Hypothesis appends "Failing explicit example: ..."; not a reason.
    skipped = rows[("naive", "test_skipped_in_an_explicit_example")]
    assert skipped.status == "skip" and skipped.reason == "dense/naive does not declare lse"


def test_each_of_several_distinct_failures_is_named(tmp_path, monkeypatch):
    outcome = run(tmp_path, monkeypatch, "mykernels:twice")
    bad = {r.property: r for r in outcome.results.correctness}["test_forward_matches_oracle"]
    assert bad.status == "fail" and "2 distinct failures" in bad.reason
    assert "(1) " in bad.reason and "(2) " in bad.reason
    assert "ValueError: no single query" in bad.reason and "AssertionError: max error" in bad.reason
    # each with its own minimal example (this property draws S, not a Spec)
    assert "[S=1, causal=" in bad.reason and "[S=2, causal=True]" in bad.reason


def test_crashing_impl_is_contained(tmp_path, monkeypatch):
    outcome = run(tmp_path, monkeypatch, "mykernels:crashing", "dense/naive")
    rows = {(r.impl, r.property): r for r in outcome.results.correctness}
    crashed = rows[("crashy", "test_forward_matches_oracle")]
    assert crashed.status == "error" and "died" in crashed.reason
    assert rows[("crashy", "test_second_property_runs")].status == "pass"
    assert rows[("naive", "test_forward_matches_oracle")].status == "pass"
    assert outcome.crashed


def test_only_file_keeps_the_listed_rows_in_its_order(tmp_path):
    """--attnbench-only-file (GPU runs that cannot finish everything: the rows that matter first)."""
    import subprocess
    import sys

    wanted = ["properties/test_structure.py::test_batch_elements_are_independent[dense/naive]",
              "properties/test_masking.py::test_window_edges[dense/naive]"]
    only = tmp_path / "only.txt"
    only.write_text("\n".join(wanted) + "\n")
    out = subprocess.run(
        [sys.executable, "-P", "-m", "pytest", "properties", "-p", "attnbench.app.plugin", "--device", "cpu", "-q",
         "--import-mode=importlib", "--collect-only", "-p", "no:cacheprovider", "--attnbench-only-file", str(only)],
        capture_output=True, text=True, timeout=300,
    )
    listed = [line for line in out.stdout.splitlines() if line.startswith("properties/")]
    assert listed == wanted, out.stdout[-2000:] + out.stderr[-2000:]


def test_default_workers_per_device(monkeypatch):
    """One test process per two cores on CUDA (at most 8), one per core on a CPU (at most 4);
    ATTNBENCH_VERIFY_WORKERS wins."""
    monkeypatch.delenv("ATTNBENCH_VERIFY_WORKERS", raising=False)
    for cores, cuda, cpu in ((16, 8, 4), (32, 8, 4), (2, 1, 2), (1, 1, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert (verify.default_workers("cuda"), verify.default_workers("cpu")) == (cuda, cpu)
    monkeypatch.setenv("ATTNBENCH_VERIFY_WORKERS", "3")
    assert verify.default_workers("cuda") == 3


def test_the_lost_device_guard_keeps_the_examples_and_the_name():
    """The plugin wraps a Hypothesis test's inner function to stop at a faulting example; the
    wrapper must keep the function's digest (a derandomized profile's examples come from it) and
    its name (failures print under it)."""
    from types import SimpleNamespace

    from hypothesis.internal.reflection import function_digest

    from attnbench.app import plugin
    from attnbench.registry import registry

    def test_prop(impl, device, data):
        return data

    hyp = SimpleNamespace(inner_test=test_prop)
    item = SimpleNamespace(obj=SimpleNamespace(hypothesis=hyp), callspec=SimpleNamespace(
        params={"impl": registry().get("dense/naive")}))
    unguard = plugin._guard_lost_device(item)
    assert hyp.inner_test is not test_prop
    assert function_digest(hyp.inner_test) == function_digest(test_prop)
    assert hyp.inner_test.__name__ == "test_prop" and hyp.inner_test(None, "cpu", 3) == 3
    unguard()
    assert hyp.inner_test is test_prop
