"""Where attnbench keeps files between runs: `$XDG_CACHE_HOME/attnbench`, else
`~/.cache/attnbench` (the XDG base-directory rule). Hypothesis'
example database lives in its `hypothesis/` folder, so a failure found once is tried first the
next time, and nothing is written into the directory a command is run from."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser().joinpath("attnbench", *parts)
