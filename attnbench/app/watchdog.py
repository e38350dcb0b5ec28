"""The child side of verify's deadline: a pytest plugin that reports progress to the parent.

`attnbench verify` loads it in its child pytest (`-p attnbench.app.watchdog`). It writes, on the
child's original stdout (pytest's output capture cannot hold them back):

- one `collected` event listing the (node id, implementation) pairs the child will run, so the
  parent can name what did not run when it gives up on an implementation;
- a `beat` event whenever a call into an implementation starts (at most one a second): the
  parent kills the child when no test started, finished or called an implementation for the
  deadline's length (a hung kernel cannot be trusted to stop itself).

Implementations are wrapped per test item (a copy of the Impl whose fn beats; module variants'
modules beat on every forward); the registry's objects are left as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import pytest

from attnbench.procs import STREAM_PREFIX
from attnbench.registry import MODULE_VARIANTS, Impl

_OUT = os.dup(1)  # the real stdout, taken when the plugin loads (before pytest captures fd 1)
_LAST = [0.0]


def emit(event: dict) -> None:
    os.write(_OUT, ("\n" + STREAM_PREFIX + json.dumps(event) + "\n").encode())


def beat() -> None:
    now = time.monotonic()
    if now - _LAST[0] >= 1.0:
        _LAST[0] = now
        emit({"event": "beat"})


def _beat_hook(module, args) -> None:
    beat()


def beating(impl: Impl) -> Impl:
    """A copy of impl whose calls (kernels) or forwards (modules) report a heartbeat."""
    fn = impl.fn

    if impl.variant in MODULE_VARIANTS:

        @functools.wraps(fn)
        def build(*args, **kwargs):
            beat()
            module = fn(*args, **kwargs)
            if hasattr(module, "register_forward_pre_hook"):
                module.register_forward_pre_hook(_beat_hook)
            return module

        return dataclasses.replace(impl, fn=build)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        beat()
        return fn(*args, **kwargs)

    return dataclasses.replace(impl, fn=call)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    copies: dict[int, Impl] = {}
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        impl = params.get("impl")
        if isinstance(impl, Impl):
            if id(impl) not in copies:
                copies[id(impl)] = beating(impl)
            params["impl"] = copies[id(impl)]


def pytest_collection_finish(session: pytest.Session) -> None:
    pairs = []
    for item in session.items:
        impl = getattr(getattr(item, "callspec", None), "params", {}).get("impl")
        if isinstance(impl, Impl):
            pairs.append([item.nodeid, impl.key])
    emit({"event": "collected", "items": pairs})
