"""The README's table of ATTNBENCH_* environment variables matches the variables the code reads."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CODE = ("attnbench", "impls", "oracles", "perf", "properties", "reports", "zoo", "scripts")
NAME = re.compile(r"\bATTNBENCH_[A-Z0-9_]*[A-Z0-9]\b")
ROW = re.compile(r"^\| `(ATTNBENCH_[A-Z0-9_]+)` \|", re.MULTILINE)


def code_variables() -> set[str]:
    found: set[str] = set()
    for folder in CODE:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".sh") and path.is_file():
                found |= set(NAME.findall(path.read_text(encoding="utf-8")))
    return found


def readme_variables() -> set[str]:
    return set(ROW.findall((ROOT / "README.md").read_text(encoding="utf-8")))


def test_every_variable_the_code_reads_is_in_the_readme_table():
    missing = code_variables() - readme_variables()
    assert not missing, f"add a row to README.md's environment-variable table for: {sorted(missing)}"


def test_the_readme_table_lists_no_variable_the_code_does_not_read():
    stale = readme_variables() - code_variables()
    assert not stale, f"README.md lists variables no code reads: {sorted(stale)}"
