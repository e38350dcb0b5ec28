"""Repository-level pytest configuration: the attnbench plugin parametrizes `impl` over the
registry, adds --impl / --variant / --device / --zoo, and records results (attnbench/app/plugin.py).

Without a CUDA device Triton can only run interpreted, and it must see TRITON_INTERPRET=1
before it is first imported (a test module that imports triton first otherwise leaves every
later interpreter test failing with "Cannot call @triton.jit'd outside of the scope of a
kernel"). tox sets it; this makes a plain `pytest` on a CPU machine behave the same.
"""

import os
import shutil

if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ["attnbench.app.plugin"]
