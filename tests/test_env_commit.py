"""env.commit names attnbench's own commit, or none: never the commit of a repository the
project was copied into."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from attnbench import results as schema

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="no git")


def git(cwd, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_commit_is_the_checkouts_own_or_none(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNBENCH_COMMIT", raising=False)
    outer = tmp_path / "outer"
    (outer / "copy" / "attnbench").mkdir(parents=True)
    (outer / "copy" / "attnbench" / "results.py").write_text("# a copied project\n")
    git(outer, "init", "-q")
    git(outer, "add", "-A")
    git(outer, "commit", "-qm", "outer")
    assert schema.commit(outer / "copy") is None  # inside another repository's folder
    own = tmp_path / "own"
    own.mkdir()
    (own / "f").write_text("x\n")
    git(own, "init", "-q")
    git(own, "add", "-A")
    git(own, "commit", "-qm", "own")
    head = git(own, "rev-parse", "--short", "HEAD")
    assert schema.commit(own) == head
    (own / "f").write_text("y\n")
    assert schema.commit(own) == f"{head}-dirty"
    assert schema.commit(tmp_path / "own" / ".." / "outer" / "copy") is None
    monkeypatch.setenv("ATTNBENCH_COMMIT", "abc1234")
    assert schema.commit(outer / "copy") == "abc1234"


def test_no_git_at_all_is_none(tmp_path, monkeypatch):
    monkeypatch.delenv("ATTNBENCH_COMMIT", raising=False)
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    assert schema.commit(tmp_path) is None
