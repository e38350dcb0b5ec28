"""Hypothesis profiles, registered on import (the attnbench pytest plugin imports this module).

- ci: derandomized (same examples every run unless --hypothesis-seed is given), small example
  counts sized so that the default CPU tox run stays well under its budget.
- dev: random, more examples; for working on a kernel.
- thorough: nightly / GPU runs, many examples.

Every profile prints the reproduction blob on failure (print_blob) and has no deadline
(kernel timings vary, and the first call of a kernel compiles it). dev and thorough keep their
example database in attnbench's cache directory (attnbench/cache.py).
"""

from __future__ import annotations

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

from attnbench.cache import cache_dir

# Fixtures (impl, device, measure) are function-scoped by design: one impl per test item.
SUPPRESS = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]
CI_EXAMPLES = 12

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
