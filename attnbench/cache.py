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


def compiler_env(device: str) -> dict[str, str]:
    """The environment of the processes that run kernels on `device` (verify's test processes,
    the sweep's prewarm workers; each variable only where the user has not set it): one
    persistent compile cache per compiler in attnbench's cache directory, shared by every
    process and kept for the next run. FlashAttention-4's CuTe cache is off unless asked for;
    Triton's and Inductor's move here so that one folder holds everything a GPU host can carry
    to the next one. On the CPU, Triton runs in its interpreter: nothing compiles."""
    if device.split(":")[0] == "cpu":
        return {"TRITON_INTERPRET": "1"}
    return {
        "TRITON_CACHE_DIR": str(cache_dir("compiled", "triton")),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir("compiled", "inductor")),
        "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED": "1",
        "FLASH_ATTENTION_CUTE_DSL_CACHE_DIR": str(cache_dir("compiled", "cute")),
    }
