"""The registry: declaration checks, discovery, --impl targets, entry points, broken sources."""

from __future__ import annotations

import sys
import textwrap

import pytest

from attnbench.registry import Impl, Registry, registry
from attnbench.spec import Spec


def dummy(q, k, v, cfg, key_padding_mask=None, bias=None):
    return q, None


def test_builtin_scan_finds_naive_for_both_kernel_variants():
    reg = registry()
    assert reg.get("dense/naive").reference
    assert reg.get("local/naive").reference
    assert reg.reference("dense").name == "naive"


def test_unknown_feature_variant_and_dtype_are_named():
    with pytest.raises(ValueError, match="unknown features.*causall"):
        Impl(name="x", variant="dense", fn=dummy, features={"causall"})
    with pytest.raises(ValueError, match="unknown variant 'densе'"):
        Impl(name="x", variant="densе", fn=dummy)
    with pytest.raises(ValueError, match="unknown dtypes.*float8"):
        Impl(name="x", variant="dense", fn=dummy, dtypes=("float8",))


def test_why_not_names_the_missing_feature_dtype_and_device():
    impl = Impl(name="x", variant="dense", fn=dummy, features={"causal"}, devices=("cuda",), dtypes=("float16",))
    assert "device cpu" in impl.why_not(Spec())
    assert "dtype float32" in impl.why_not(Spec(device="cuda"))
    assert impl.why_not(Spec(device="cuda", dtype="float16", causal=True)) is None
    assert "gqa" in impl.why_not(Spec(device="cuda", dtype="float16", Hq=4, Hkv=2))
    assert "backward" in impl.why_not(Spec(device="cuda", dtype="float16"), needs={"backward"})


def test_supports_hook_and_requires():
    impl = Impl(name="x", variant="dense", fn=dummy, supports=lambda s: "D > 32" if s.D > 32 else None,
                requires=("surely_not_a_real_module_xyz",))
    assert impl.why_not(Spec(D=64)) == "D > 32"
    assert impl.unavailable() == "surely_not_a_real_module_xyz not installed"


def test_unknown_impl_error_lists_known():
    with pytest.raises(KeyError, match="unknown implementation 'nope'.*dense/naive"):
        registry().get("nope")


def test_duplicate_names_are_refused():
    reg = Registry()
    reg.add(Impl(name="x", variant="dense", fn=dummy))
    with pytest.raises(ValueError, match="two implementations named 'dense/x'"):
        reg.add(Impl(name="x", variant="dense", fn=dummy))


def test_load_spec_module_object(tmp_path, monkeypatch):
    (tmp_path / "thirdparty_mod.py").write_text(textwrap.dedent("""
        from attnbench.registry import Impl
        def f(q, k, v, cfg, key_padding_mask=None, bias=None):
            return q, None
        mine = Impl(name="mine", variant="dense", fn=f, features={"causal"})
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    [impl] = reg.load_spec("thirdparty_mod:mine")
    assert reg.get("dense/mine") is impl and impl.origin == "thirdparty_mod:mine"
    with pytest.raises(ValueError, match="has no attribute 'other'"):
        reg.load_spec("thirdparty_mod:other")
    with pytest.raises(ModuleNotFoundError):
        reg.load_spec("no_such_module_abc:x")
    sys.modules.pop("thirdparty_mod", None)


def test_entry_points_are_loaded_and_broken_ones_reported(monkeypatch, tmp_path):
    import importlib.metadata as md

    (tmp_path / "ep_mod.py").write_text(
        "from attnbench.registry import Impl\n"
        "good = Impl(name='ep_good', variant='dense', fn=lambda *a, **k: None)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    eps = [
        md.EntryPoint(name="good", value="ep_mod:good", group="attnbench.impls"),
        md.EntryPoint(name="bad", value="ep_mod:missing", group="attnbench.impls"),
    ]
    monkeypatch.setattr(md, "entry_points", lambda group=None: [e for e in eps if e.group == group])
    reg = Registry()
    reg.load_entry_points()
    assert "dense/ep_good" in reg.impls
    assert len(reg.broken) == 1 and "ep_mod:missing" in reg.broken[0].origin
    sys.modules.pop("ep_mod", None)


def test_an_impl_prints_as_the_expression_that_loads_it():
    """A counterexample shows `impl=` as one line of Python that gives the implementation back
    (Hypothesis' printer and repr both), never the ~40-line field dump of the dataclass."""
    from hypothesis.vendor.pretty import pretty

    import attnbench.registry as reg_module

    target = "attnbench.zoo.sink_in_numerator:sink_in_numerator"
    found = {"registry": registry, "load_zoo": reg_module.load_zoo}
    for impl in (registry().get("dense/naive"), registry().get("local/blockwise"), registry([target]).get("sink_in_numerator"),
                 reg_module.load_zoo()[0]):
        text = pretty(impl)
        assert text == repr(impl) and "\n" not in text and "fn=" not in text
        assert eval(text, found).key == impl.key
