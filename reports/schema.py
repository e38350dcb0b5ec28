"""The one results file that verify, bench, gate and report all read and write.

Schema `attnbench.results/1` (JSON):
{
  "schema": "attnbench.results/1",
  "created": ISO-8601 time,
  "env": {host, python, torch, triton, flash_attn, cuda, device, device_name, driver, commit, ...},
  "peaks": {"matmul_tflops": float, "copy_gbps": float, "dtype": "bfloat16"} or {},
  "correctness": [CorrectnessRow...],
  "perf": [PerfRow...],
  "zoo": [ZooRow...]
}
Rows are flat dicts (the dataclasses below); unknown keys are kept (loaded as attributes and
written back by save()), so newer writers stay readable by older readers. Bump SCHEMA only for
incompatible changes.

Field conventions the reports rely on:
- CorrectnessRow.status: pass | fail | error (the check itself crashed) | skip (unsupported;
  `reason` says why). error_ratio is worst error / allowed error, so <= 1 passes; the report's
  matrix shows the worst ratio of each (variant, impl, property) cell.
- PerfRow.pct_peak is a percentage (0-100) of peaks["matmul_tflops"]; when absent the report
  derives it from tflops. ms / ms_p20 / ms_p80 are milliseconds; mem_bytes is bytes. `shape`
  keys B, Sq, Sk are the sweep; rows that agree on every other shape key (and variant, mode)
  form one table and one plot.
- ZooRow.caught_by lists the properties that killed the member; `detail` (optional) says what
  the planted bug does.

Additive changes since attnbench.results/1 was first written: ZooRow.detail; save() keeps the
unknown keys a row was loaded with.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "attnbench.results/1"


@dataclass
class CorrectnessRow:
    variant: str
    impl: str
    property: str
    status: str  # pass | fail | error | skip
    device: str = "cpu"
    dtype: str | None = None
    reason: str = ""  # failure message or why skipped
    error_ratio: float | None = None  # worst measured error / allowed error (<= 1 passes)
    counterexample: str | None = None  # minimal Spec(...) that fails
    seed: str | None = None
    replay: str | None = None  # one shell command that replays the failure
    duration_s: float = 0.0


@dataclass
class PerfRow:
    variant: str
    impl: str
    mode: str  # fwd | bwd | fwdbwd
    shape: dict[str, Any]  # B, Hq, Hkv, Sq, Sk, D, causal, window, dtype, ...
    status: str = "ok"  # ok | oom | error | unsupported
    reason: str = ""
    ms: float | None = None  # median
    ms_p20: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    pct_peak: float | None = None  # of the measured matmul peak
    mem_bytes: int | None = None  # peak allocated minus inputs
    speedup: float | None = None  # reference time / this time
    timer: str = "cuda_events"  # or "wall_clock" on the CPU


@dataclass
class ZooRow:
    member: str
    bug_class: str
    caught_by: list[str] = field(default_factory=list)
    status: str = "caught"  # caught | missed
    detail: str = ""  # what the planted bug does


@dataclass
class Results:
    env: dict[str, Any] = field(default_factory=dict)
    peaks: dict[str, Any] = field(default_factory=dict)
    correctness: list[CorrectnessRow] = field(default_factory=list)
    perf: list[PerfRow] = field(default_factory=list)
    zoo: list[ZooRow] = field(default_factory=list)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    schema: str = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for name in ("correctness", "perf", "zoo"):
            data[name] = [_row_dict(r) for r in getattr(self, name)]
        return data

    def save(self, path: str | os.PathLike) -> Path:
        from attnbench.files import write_atomic

        return write_atomic(path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        data = json.loads(Path(path).read_text())
        if data.get("schema", "").split("/")[0] != SCHEMA.split("/")[0]:
            raise ValueError(f"{path}: not an attnbench results file (schema {data.get('schema')!r})")
        if data["schema"] != SCHEMA:
            raise ValueError(f"{path}: schema {data['schema']!r}, this attnbench reads {SCHEMA!r}")
        return cls(
            env=data.get("env", {}),
            peaks=data.get("peaks", {}),
            correctness=[_row(CorrectnessRow, r) for r in data.get("correctness", [])],
            perf=[_row(PerfRow, r) for r in data.get("perf", [])],
            zoo=[_row(ZooRow, r) for r in data.get("zoo", [])],
            created=data.get("created", ""),
        )

    def merge(self, other: Results) -> Results:
        return Results(
            env=self.env or other.env,
            peaks=self.peaks or other.peaks,
            correctness=self.correctness + other.correctness,
            perf=self.perf + other.perf,
            zoo=self.zoo + other.zoo,
            created=self.created,
        )


def _row_dict(row) -> dict[str, Any]:
    data = dataclasses.asdict(row)
    names = {f.name for f in dataclasses.fields(row)}
    data.update({k: v for k, v in vars(row).items() if k not in names})
    return data


def _row(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    row = cls(**{k: v for k, v in data.items() if k in names})
    for k, v in data.items():  # keep what a newer writer added
        if k not in names:
            setattr(row, k, v)
    return row


def environment() -> dict[str, Any]:
    """Where and with what a run happened: device, driver, library versions, commit."""
    import torch

    env: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    for mod in ("triton", "flash_attn", "hypothesis", "pytest_benchmark"):
        env[mod] = _version(mod)
    if torch.cuda.is_available():
        env["driver"] = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        env["cudnn"] = torch.backends.cudnn.version()
    env["commit"] = commit()
    return env


def commit() -> str | None:
    """ATTNBENCH_COMMIT when set (a copied working tree may carry a stale .git: say which commit
    it really is), else HEAD, with "-dirty" when tracked files differ from it."""
    given = os.environ.get("ATTNBENCH_COMMIT", "").strip()
    if given:
        return given
    here = Path(__file__).resolve().parent
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=here)
    if head and _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here):
        head += "-dirty"
    return head


def _version(mod: str) -> str | None:
    import importlib.metadata

    name = {"flash_attn": "flash-attn", "pytest_benchmark": "pytest-benchmark"}.get(mod, mod)
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
