"""Writing result files safely, and the run directories they go into.

- `write_atomic(path, data)`: every results / report / rows file is written through it: a
  temporary file in the same folder, flushed and fsync'd, then `os.replace`d over the target. A
  write cut short (a full disk, a size limit, a signal) leaves the previous file whole.
- `new_run_dir(root)`: each command that writes results gets its own folder
  `root/runs/<UTC time>-<id>/`, so no command overwrites another run's files.
- `set_latest(root, run_dir)` / `latest(root)`: the `root/latest` pointer to the newest finished
  run: a relative symlink where the file system allows one, else a one-line text file naming the
  run folder; both replaced atomically, both read by `latest()`.
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
import tempfile
from pathlib import Path

RUNS = "runs"
LATEST = "latest"


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write data (text as UTF-8) to path atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_run_dir(root: str | os.PathLike, folder: str = RUNS) -> Path:
    """A new, empty folder root/runs/<UTC time>-<random id>/ (never an existing one); folder
    names another parent than runs/ (report renders go to reports/)."""
    runs = Path(root) / folder
    runs.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y%m%d-%H%M%S")
    while True:
        path = runs / f"{stamp}-{secrets.token_hex(3)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def set_latest(root: str | os.PathLike, run_dir: str | os.PathLike) -> Path:
    """Point root/latest at run_dir (atomically replacing the previous pointer)."""
    root = Path(root)
    target = os.path.relpath(Path(run_dir), root)
    link = root / LATEST
    tmp = root / f".{LATEST}.{secrets.token_hex(4)}.tmp"
    try:
        os.symlink(target, tmp, target_is_directory=True)
    except (OSError, NotImplementedError):  # no symlinks here (Windows without the privilege)
        return write_atomic(link, target + "\n")
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return link


def latest(root: str | os.PathLike) -> Path | None:
    """The run folder root/latest points at, or None when there is none."""
    link = Path(root) / LATEST
    if link.is_symlink() or link.is_dir():
        return link.resolve() if link.exists() else None
    if link.is_file():
        name = link.read_text(encoding="utf-8").strip()
        folder = Path(root) / name
        return folder if name and folder.is_dir() else None
    return None


def results_file(path: str | os.PathLike) -> Path:
    """A results.json named directly, or found in a folder: the folder's own results.json, else
    that of its latest run."""
    path = Path(path)
    if not path.is_dir():
        return path
    if (path / "results.json").exists():
        return path / "results.json"
    run = latest(path)
    return run / "results.json" if run is not None else path / "results.json"
