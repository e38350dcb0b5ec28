"""Registers the attnbench Hypothesis profiles (ci, dev, thorough, ci-zoo) as an initial
conftest, i.e. before Hypothesis' own pytest plugin loads `--hypothesis-profile`."""

import attnbench.properties.profiles  # noqa: F401
