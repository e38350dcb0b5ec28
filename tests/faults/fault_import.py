"""Fails to import."""

import attnbench_no_such_module  # noqa: F401
