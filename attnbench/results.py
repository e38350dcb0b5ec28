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
  derives it from tflops. Above 100 it is a measurement error (over_peak): no attention kernel
  outruns the matmul units it is built on, so the peak probe read low or the work model over-counts.
  ms / ms_p20 / ms_p80 are milliseconds; mem_bytes is bytes. `shape`
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

from attnbench.files import write_atomic

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

    def to_line(self, nodeid: str) -> dict[str, Any]:
        """The row as the pytest plugin streams it and writes it (one JSON line per row, with
        --attnbench-results): its fields and the test's node id."""
        return {**dataclasses.asdict(self), "nodeid": nodeid}

    @classmethod
    def from_line(cls, data: dict[str, Any], where: str = "row") -> CorrectnessRow:
        """The row of a line written by to_line (or a stream event): its fields checked, other
        keys (the node id, the event name) left out. A wrong field is a ValueError naming `where`."""
        _check_row(cls, data, where)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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


def over_peak(pct_peak: float | None) -> bool:
    """A cell above 100% of the measured matmul peak: a measurement error, not a speed."""
    return pct_peak is not None and pct_peak > 100.0


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
        return write_atomic(path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        """Read and check a results file. Every problem (unreadable, not JSON, not an object,
        another schema, a missing field, a wrong type) is a ResultsFileError naming the file."""
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ResultsFileError(f"{path}: cannot read it ({exc.__class__.__name__}: {exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ResultsFileError(f"{path}: not valid JSON ({exc})") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ResultsFileError(f"{path}: {exc}") from exc

    @classmethod
    def from_dict(cls, data: Any) -> Results:
        """Results from parsed JSON, checked against the schema (ValueError says what is wrong)."""
        if not isinstance(data, dict):
            raise ValueError(f"not an attnbench results file: expected a JSON object, got {_json_type(data)}")
        schema = data.get("schema")
        if not isinstance(schema, str) or schema.split("/")[0] != SCHEMA.split("/")[0]:
            raise ValueError(f"not an attnbench results file (schema {schema!r})")
        if schema != SCHEMA:
            raise ValueError(f"schema {schema!r}, this attnbench reads {SCHEMA!r}")
        for key, kind in (("env", dict), ("peaks", dict), ("correctness", list), ("perf", list), ("zoo", list),
                          ("created", str)):
            if key in data and not isinstance(data[key], kind):
                raise ValueError(f"{key!r} must be {_KIND_NAMES[kind]}, got {_json_type(data[key])}")
        for key in ("matmul_tflops", "copy_gbps"):
            value = data.get("peaks", {}).get(key)
            if value is not None and not _is_number(value):
                raise ValueError(f"peaks.{key} must be a number, got {_json_type(value)} {value!r}")
        return cls(
            env=data.get("env", {}),
            peaks=data.get("peaks", {}),
            correctness=[_row(CorrectnessRow, r, f"correctness[{n}]") for n, r in enumerate(data.get("correctness", []))],
            perf=[_row(PerfRow, r, f"perf[{n}]") for n, r in enumerate(data.get("perf", []))],
            zoo=[_row(ZooRow, r, f"zoo[{n}]") for n, r in enumerate(data.get("zoo", []))],
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


class ResultsFileError(ValueError):
    """A results file that cannot be used; the message names the file and the problem."""


_KIND_NAMES = {dict: "an object", list: "an array", str: "a string"}
# The JSON types each annotated field type accepts ("| None" adds null).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,), "float": (int, float), "int": (int,), "dict[str, Any]": (dict,), "list[str]": (list,),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if _is_number(value):
        return "a number"
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), type(value).__name__)


def _check_row(cls, data: Any, where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {_json_type(data)}")
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if f.name not in data:
            if required:
                raise ValueError(f"{where}: the field {f.name!r} is missing")
            continue
        value, kind = data[f.name], str(f.type)
        optional = kind.endswith(" | None")
        accepted = _FIELD_TYPES.get(kind.removesuffix(" | None"))
        if value is None and optional or accepted is None:
            continue
        if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
            want = "a number" if float in accepted else _KIND_NAMES.get(accepted[0], accepted[0].__name__)
            raise ValueError(f"{where}.{f.name} must be {want}{' or null' if optional else ''}, "
                             f"got {_json_type(value)} {value!r}"[:300])


def _row(cls, data: dict[str, Any], where: str = "row"):
    _check_row(cls, data, where)
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


def commit(root: Path | None = None) -> str | None:
    """ATTNBENCH_COMMIT when set (a copied working tree may carry a stale .git: say which commit
    it really is), else HEAD of attnbench's own checkout, with "-dirty" when tracked files differ
    from it. None where the package (or `root`) is not the top of a git checkout: a copy inside
    another repository's folder would otherwise record that repository's commit."""
    given = os.environ.get("ATTNBENCH_COMMIT", "").strip()
    if given:
        return given
    root = (root or Path(__file__).resolve().parent.parent).resolve()  # attnbench/ sits at the top
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=root)
    if top is None or Path(top).resolve() != root:
        return None
    head = _run(["git", "rev-parse", "--short", "HEAD"], cwd=root)
    if head and _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root):
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
