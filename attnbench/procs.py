"""Child processes that are stopped as a whole, and the signals that stop a command.

`spawn` starts a child (verify's pytest, bench's worker) in a process group of its own, so that
`kill_tree` ends it together with everything it started (compiler workers, pytest's own
children). A SIGKILL to the command itself is not covered: its children then run on until they
finish (no PR_SET_PDEATHSIG, see `spawn`).

`on_signals()` makes SIGINT and SIGTERM raise `Interrupted` in the main thread; the CLI catches
it, kills every live child's group, prints one line and exits 128 + the signal number.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import threading
from collections.abc import Iterator

# Starts each machine-readable line a child writes to its parent (verify's pytest, bench's worker):
# `STREAM_PREFIX + json` on a line of its own, among the child's other output.
STREAM_PREFIX = "@@attnbench "

_LIVE: set[subprocess.Popen] = set()


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: a BaseException, so no `except Exception` swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def spawn(args: list[str], **kwargs) -> subprocess.Popen:
    """Popen(args) in a new process group (session), tracked until kill_tree or reap."""
    # No preexec_fn (e.g. prctl(PR_SET_PDEATHSIG)): Python code between fork and exec can deadlock
    # when the parent has other threads (pytest-xdist's execnet, our stream readers), and did in
    # the CI run. Children are ended through their process groups (kill_tree, kill_all) instead.
    if os.name == "posix":
        kwargs.setdefault("start_new_session", True)
    proc = subprocess.Popen(args, **kwargs)
    _LIVE.add(proc)
    return proc


def kill_tree(proc: subprocess.Popen) -> int:
    """Kill the child and its process group; wait for it; returns its exit code."""
    if os.name == "posix":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    code = proc.wait()
    reap(proc)
    return code


def reap(proc: subprocess.Popen) -> None:
    """The child has ended: stop tracking it (and kill what it left in its group)."""
    if os.name == "posix" and proc.poll() is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    _LIVE.discard(proc)


def kill_all() -> None:
    """Kill every live child started with spawn (and their groups)."""
    for proc in list(_LIVE):
        kill_tree(proc)


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """Inside: SIGINT / SIGTERM raise Interrupted in the main thread (a second one during the
    cleanup is ignored); the previous handlers come back on exit."""

    def handler(signum, frame):
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in before:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


class Lines:
    """The lines of a child's stdout, read on a thread, so the parent can wait with a timeout."""

    _EOF = object()

    def __init__(self, stream) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        try:
            for line in stream:
                self._queue.put(line.rstrip("\n"))
        except (OSError, ValueError):  # the pipe closed under us: the child was killed
            pass
        finally:
            self._queue.put(self._EOF)

    def get(self, timeout: float | None) -> str | None:
        """The next line; None at end of output; raises TimeoutError after timeout seconds."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None
        return None if item is self._EOF else item


def seconds_setting(name: str) -> float | None:
    """The environment variable `name` as a positive, finite number of seconds; None when unset.
    ValueError naming the variable otherwise (the CLI prints it as one line)."""
    value = os.environ.get(name)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return seconds
