"""Repository-level pytest configuration: the attnbench plugin parametrizes `impl` over the
registry, adds --impl / --variant / --device / --zoo, and records results (attnbench/plugin.py)."""

pytest_plugins = ["attnbench.plugin"]
