"""Hypothesis profiles, registered on import (the attnbench pytest plugin imports this module).

- ci: derandomized (same examples every run unless --hypothesis-seed is given), small example
  counts sized so that the default CPU tox run stays well under its budget.
- dev: random, more examples; for working on a kernel.
- thorough: nightly / GPU runs, many examples.

On a CPU, an implementation that compiles (`Impl.compiles`: Triton kernels run in Triton's
interpreter there, flex traces through dynamo once per shape) draws a third of its profile's
examples (`settings_for`): its properties took about 80% of the CPU suite's time with the full
count (docs/DESIGN.md, Log). The GPU runs, where these kernels are fast, keep the full count.

Every profile prints the reproduction blob on failure (print_blob) and has no deadline
(kernel timings vary, and the first call of a kernel compiles it). dev and thorough keep their
example database in attnbench's cache directory (attnbench/cache.py).
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from attnbench.cache import cache_dir
from attnbench.registry import Impl

# Fixtures (impl, device, measure) are function-scoped by design: one impl per test item.
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
CI_EXAMPLES = 12
SLOW_HERE_SHARE = 3  # an implementation that compiles, on a CPU: one example in this many
SLOW_HERE_MIN = 4

_common = dict(deadline=None, print_blob=True, suppress_health_check=SUPPRESS)

settings.register_profile("ci", max_examples=CI_EXAMPLES, derandomize=True, database=None, **_common)
# The random profiles keep failing examples in the cache directory (attnbench/cache.py), never in
# a `.hypothesis/` folder of the directory the user runs from.
_database = DirectoryBasedExampleDatabase(cache_dir("hypothesis", "examples"))
settings.register_profile("dev", max_examples=60, database=_database, **_common)
settings.register_profile("thorough", max_examples=400, database=_database, **_common)
# The bug-zoo check (tests/test_zoo.py): ci's examples in ci's order, without the shrink
# phase. Whether a member is caught is decided before shrinking starts, so this catches
# exactly the members ci catches, minus the minutes spent minimizing 100 counterexamples.
settings.register_profile(
    "ci-zoo",
    parent=settings.get_profile("ci"),
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
)


def settings_for(impl: Impl, device: str, current: settings) -> settings | None:
    """The settings a property runs `impl` with on `device`, when they differ from `current`
    (the profile's, or the test's own): fewer examples for an implementation that compiles,
    on a CPU."""
    if device.split(":")[0] != "cpu" or not impl.compiles or current.max_examples <= SLOW_HERE_MIN:
        return None
    return settings(current, max_examples=max(SLOW_HERE_MIN, current.max_examples // SLOW_HERE_SHARE))
