"""The bug zoo: every deliberately broken implementation is caught by the property suite.

One `attnbench verify --zoo` run (a child pytest, as the CLI does) under the `ci-zoo`
profile: ci's derandomized examples without the shrink phase. Whether a member is caught is
settled before shrinking starts, so this catches exactly what the ci profile catches.
"""

from __future__ import annotations

from attnbench.app import verify
from attnbench.registry import Impl, load_zoo
from attnbench.spec import FEATURES

MIN_MEMBERS = 12


def test_zoo_members_are_well_formed():
    members = load_zoo()
    assert len(members) >= MIN_MEMBERS, f"the zoo has {len(members)} members, needs {MIN_MEMBERS}"
    for m in members:
        assert isinstance(m, Impl)
        assert m.bug, f"{m.key}: a zoo member names its bug class (Impl.bug)"
        assert m.features <= FEATURES
        assert not m.reference, f"{m.key}: a zoo member is never the tolerance reference"
    assert len({m.bug for m in members}) == len(members), "two members carry the same bug class"


def test_zoo_is_never_registered_by_default():
    from attnbench.registry import registry

    zoo_keys = {m.key for m in load_zoo()}
    assert not zoo_keys & set(registry().impls), "zoo members leaked into the default registry"


def _kernel_property_files() -> list[str]:
    """The zoo holds dense kernels: the module properties have nothing to run on it."""
    return [str(p) for p in sorted(verify.PROPERTIES_DIR.glob("test_*.py")) if p.name != "test_modules.py"]


def test_every_zoo_member_is_caught(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # tiny tensors: a thread pool only adds contention
    outcome = verify.run(zoo=True, profile="ci-zoo", device="cpu", paths=_kernel_property_files())
    assert outcome.collect_error is None, outcome.collect_error
    assert not outcome.crashed, f"the suite crashed on {outcome.crashed}"
    table = {row.member: row for row in outcome.results.zoo}
    members = {m.key for m in load_zoo()}
    assert set(table) == members, f"members not run: {sorted(members - set(table))}"
    missed = sorted(key for key, row in table.items() if row.status != "caught")
    report = "\n".join(f"{key}: {row.bug_class} -> {', '.join(row.caught_by) or 'MISSED'}" for key, row in
                       sorted(table.items()))
    assert not missed, f"zoo members no property caught: {missed}\n{report}"
