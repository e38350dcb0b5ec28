"""Report data: what every renderer (terminal, Markdown, HTML) shows, computed once.

The renderers only lay these out; every grouping, merging and formatting rule lives here so
the three outputs always agree.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from attnbench.results import CorrectnessRow, PerfRow, Results, ZooRow, over_peak

# A matrix cell merges every row of one (variant, impl, property); the worst status wins.
_SEVERITY = {"none": 0, "skip": 1, "pass": 2, "error": 3, "fail": 4}
STATUSES = ("pass", "fail", "error", "skip")
SWEEP_KEYS = ("Sq", "Sk")  # shape keys a sweep varies along one curve; the rest (B too) names the group
# shape keys a row shows beside its implementation rather than in its group's title: a packed
# batch's lengths (long lists) and the score features (so a softcap row sits beside the plain one)
ROW_KEYS = ("seqlens", "cache_seqlens", "softcap", "alibi", "sinks")


# -- formatting ------------------------------------------------------------------------
def fmt_ratio(x: float | None) -> str:
    """An error ratio in at most 4 characters: 0.31, 4.2, 42, 420, 4e3."""
    if x is None:
        return ""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf"
    if x == 0:
        return "0"
    if x < 0.01:
        return "<.01"
    if x < 10:
        return f"{x:.2g}" if x >= 1 else f"{x:.2f}"
    if x < 1000:
        return f"{x:.0f}"
    exp = int(math.floor(math.log10(x)))
    return f"{x / 10**exp:.0f}e{exp}"


def fmt_ms(ms: float | None) -> str:
    if ms is None:
        return ""
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def fmt_num(x: float | None) -> str:
    """A rate (TFLOP/s, GB/s): one decimal from 10 up, three significant digits below."""
    if x is None:
        return ""
    if abs(x) >= 10:
        return f"{x:,.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_pct(x: float | None) -> str:
    if x is None:
        return ""
    if x == 0:
        return "0%"
    if x < 0.1:
        return "<0.1%"
    return f"{x:.1f}%" if x < 10 else f"{x:.0f}%"


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return ""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # unreachable; keeps the type checker quiet


def fmt_speedup(x: float | None) -> str:
    """A speedup or time ratio: three significant digits, so a small one never reads 0.00×."""
    if x is None:
        return ""
    if x >= 100:
        return f"{x:.0f}×"
    if x >= 10:
        return f"{x:.1f}×"
    return f"{x:.2f}×" if x >= 1 else f"{x:.3g}×"


fmt_times = fmt_speedup  # the same rule for the b ÷ a time ratios of a comparison


def fmt_spread(row: PerfRow) -> str:
    """Half the p20-p80 range as a percentage of the median: the run-to-run noise."""
    if row.ms is None or row.ms_p20 is None or row.ms_p80 is None or row.ms <= 0:
        return ""
    return f"±{50 * (row.ms_p80 - row.ms_p20) / row.ms:.0f}%"


# -- correctness matrix ----------------------------------------------------------------
@dataclass
class MatrixCell:
    """One (property, implementation) square of the correctness matrix: the worst status and ratio."""

    status: str = "none"  # pass | fail | error | skip | none (never run)
    ratio: float | None = None  # worst error ratio among the rows of the winning status
    rows: list[CorrectnessRow] = field(default_factory=list)

    def add(self, row: CorrectnessRow) -> None:
        status = row.status if row.status in _SEVERITY else "error"
        self.rows.append(row)
        if _SEVERITY[status] > _SEVERITY[self.status]:
            self.status, self.ratio = status, None
        if status == self.status and row.error_ratio is not None:
            self.ratio = row.error_ratio if self.ratio is None else _max(self.ratio, row.error_ratio)

    def text(self, unicode: bool = True) -> str:
        """'✓ 0.31', '✗ 4.2', '! err', '–' (unsupported), '' (not run)."""
        mark = {"pass": "✓", "fail": "✗", "error": "!", "skip": "–", "none": ""}
        if not unicode:
            mark = {"pass": "ok", "fail": "X", "error": "!", "skip": "-", "none": ""}
        if self.status == "error":
            return f"{mark['error']} err"
        if self.status in ("pass", "fail") and self.ratio is not None:
            return f"{mark[self.status]} {fmt_ratio(self.ratio)}"
        return mark[self.status]

    def reasons(self) -> list[str]:
        """Distinct reasons of the rows that decided the cell."""
        seen: dict[str, None] = {}
        for row in self.rows:
            if row.status == self.status and row.reason:
                seen.setdefault(row.reason)
        return list(seen)


def _max(a: float, b: float) -> float:
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


@dataclass
class Matrix:
    variant: str
    impls: list[str]
    properties: list[str]
    cells: dict[tuple[str, str], MatrixCell]  # (property, impl) -> cell

    def cell(self, prop: str, impl: str) -> MatrixCell:
        return self.cells.get((prop, impl), MatrixCell())


def variant_order(names: list[str]) -> list[str]:
    """Variants in the registry's order, unknown ones after, in first-seen order."""
    try:
        from attnbench.registry import VARIANTS

        known = list(VARIANTS)
    except Exception:  # the report must render even where the registry cannot import
        known = []
    first = list(dict.fromkeys(names))
    return sorted(first, key=lambda v: (known.index(v) if v in known else len(known), first.index(v)))


def matrices(rows: list[CorrectnessRow]) -> list[Matrix]:
    """One implementation x property matrix per variant; producer order is kept."""
    by_variant: dict[str, list[CorrectnessRow]] = defaultdict(list)
    for row in rows:
        by_variant[row.variant].append(row)
    out = []
    for variant in variant_order([r.variant for r in rows]):
        vrows = by_variant[variant]
        cells: dict[tuple[str, str], MatrixCell] = {}
        for row in vrows:
            cells.setdefault((row.property, row.impl), MatrixCell()).add(row)
        impls = list(dict.fromkeys(r.impl for r in vrows))
        props = list(dict.fromkeys(r.property for r in vrows))
        out.append(Matrix(variant, impls, props, cells))
    return out


def failures(rows: list[CorrectnessRow]) -> list[CorrectnessRow]:
    """Every failing or erroring row, grouped by variant, then implementation."""
    bad = [r for r in rows if r.status not in ("pass", "skip")]
    order = variant_order([r.variant for r in rows])
    impls = list(dict.fromkeys(r.impl for r in rows))
    return sorted(bad, key=lambda r: (order.index(r.variant), impls.index(r.impl)))


def failure_title(row: CorrectnessRow) -> str:
    where = " ".join(x for x in (row.dtype, row.device) if x)
    return f"{row.variant} / {row.impl} · {row.property}" + (f" · {where}" if where else "")


def skip_reasons(rows: list[CorrectnessRow]) -> dict[tuple[str, str], Counter]:
    """Why properties were not run, per (variant, impl): reason -> count."""
    out: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for row in rows:
        if row.status == "skip":
            out[(row.variant, row.impl)][row.reason or "no reason given"] += 1
    return dict(out)


def counts(rows: list[CorrectnessRow]) -> Counter:
    return Counter(r.status if r.status in STATUSES else "error" for r in rows)


# -- performance -----------------------------------------------------------------------
def shape_key(shape: dict[str, Any], drop: tuple[str, ...] = ()) -> str:
    """A stable text key for a shape dict (lists and tuples compare equal after JSON)."""
    return json.dumps({k: v for k, v in sorted(shape.items()) if k not in drop}, default=str)


def fixed_shape(shape: dict[str, Any]) -> dict[str, Any]:
    """The part of a shape that names its table: all but batch and lengths, plus the regime
    (self-attention, decoding with a few queries, or cross-attention), so a decode cell never
    shares a line with a self-attention sweep."""
    fixed = {k: v for k, v in shape.items() if k not in SWEEP_KEYS + ROW_KEYS}
    sq, sk = shape.get("Sq"), shape.get("Sk")
    if sq is not None and sk is not None and sq != sk:
        if sq <= 16:
            fixed["decode Sq"] = sq
        else:
            fixed["cross"] = True
    return fixed


def group_key(variant: str, mode: str, shape: dict[str, Any]) -> tuple[str, str, str]:
    return (variant, mode, shape_key(fixed_shape(shape)))


def group_title(variant: str, mode: str, shape: dict[str, Any]) -> str:
    return " · ".join([variant, mode, *describe_shape(fixed_shape(shape))])


def seq_len(shape: dict[str, Any]) -> int:
    return int(shape.get("Sk") or shape.get("Sq") or shape.get("S") or 0)


def cell_label(variant: str, mode: str, shape: dict[str, Any]) -> str:
    """The one-line name of a benchmark cell: 'dense B4 H32/8 S1x4096 D128 causal bfloat16 fwd'
    (a seed module: 'LocalMHA B1 S64 float32 fwd')."""
    if "Sq" not in shape:
        return f"{variant} B{shape.get('B')} S{shape.get('S')} {shape.get('dtype')} {mode}"
    hkv = shape.get("Hkv", shape["Hq"])
    parts = [f"B{shape['B']}", f"H{shape['Hq']}" + (f"/{hkv}" if hkv != shape["Hq"] else "")]
    parts.append(f"S{shape['Sq']}" if shape["Sq"] == shape["Sk"] else f"S{shape['Sq']}x{shape['Sk']}")
    parts.append(f"D{shape['D']}")
    if shape.get("causal"):
        parts.append("causal")
    if shape.get("window") is not None:
        parts.append(f"win{tuple(shape['window'])}")
    if shape.get("block") is not None:
        parts.append(f"block{tuple(shape['block'])}")
    if shape.get("key_lengths") is not None or shape.get("key_drop"):
        parts.append("key-padded")
    if shape.get("bias") is not None:
        parts.append(f"bias={shape['bias']}")
    if shape.get("packing") == "paged":
        parts.append(f"paged{shape.get('block_size')}")
    elif shape.get("packing") is not None:
        parts.append(str(shape["packing"]))
    parts += score_words(shape)
    return f"{variant} " + " ".join([*parts, str(shape.get("dtype")), mode])


def score_words(shape: dict[str, Any]) -> list[str]:
    """The score features (and fp8) of a shape as words: 'softcap=30', 'alibi', 'sinks', 'fp8'."""
    words = [f"softcap={shape['softcap']:g}"] if shape.get("softcap") is not None else []
    return words + [name for name in ("alibi", "sinks", "fp8") if shape.get(name)]


def seq_label(shape: dict[str, Any]) -> str:
    sq, sk = shape.get("Sq"), shape.get("Sk")
    if sq is not None and sk is not None and sq != sk:
        return f"{sq}→{sk}"
    return str(sq if sq is not None else sk if sk is not None else shape.get("S", "?"))


@dataclass
class PerfGroup:
    """Rows of one variant and mode that differ only in batch and sequence length."""

    variant: str
    mode: str
    shape: dict[str, Any]  # the fixed part of the shape
    rows: list[PerfRow]

    @property
    def title(self) -> str:
        return " · ".join([self.variant, self.mode, *describe_shape(self.shape)])

    @property
    def slug(self) -> str:
        text = "-".join([self.variant, self.mode, *describe_shape(self.shape)])
        keep = "".join(c if c.isalnum() else "-" for c in text.lower())
        return "-".join(p for p in keep.split("-") if p)

    @property
    def impls(self) -> list[str]:
        return list(dict.fromkeys(r.impl for r in self.rows))

    @property
    def reference(self) -> str:
        """The implementation speedups are measured against, when the writer named it."""
        names = {str(getattr(r, "reference", "")) for r in self.rows if r.speedup is not None}
        names.discard("")
        return ", ".join(sorted(names))

    @property
    def caption(self) -> str:
        ref = self.reference
        return f"{self.title} · speedup vs {ref}" if ref else self.title

    def sorted_rows(self) -> list[PerfRow]:
        impls = self.impls
        return sorted(self.rows, key=lambda r: (seq_len(r.shape), r.shape.get("Sq") or 0, impls.index(r.impl)))


def describe_shape(shape: dict[str, Any]) -> list[str]:
    """Short words for the fixed part of a shape: dtype, heads, head dim, masking."""
    s = dict(shape)
    words = []
    if "dtype" in s:
        words.append(str(s.pop("dtype")).replace("float", "fp").replace("bfp16", "bf16"))
    hq, hkv = s.pop("Hq", None), s.pop("Hkv", None)
    if hq is not None:
        words.append(f"H{hq}" if hkv in (None, hq) else f"H{hq}/kv{hkv}")
    if "D" in s:
        d, dv = s.pop("D"), s.pop("Dv", None)
        words.append(f"D{d}" if dv in (None, d) else f"D{d}/v{dv}")
    causal = s.pop("causal", None)
    if causal:
        words.append("causal")
    window = s.pop("window", None)
    if window is not None:
        words.append(f"window {tuple(window) if isinstance(window, list) else window}")
    decode = s.pop("decode Sq", None)
    if decode is not None:
        words.append(f"decode Sq={decode}")
    for key, value in sorted(s.items()):
        if value is not None and value is not False:
            words.append(key if value is True else f"{key}={value}")
    return words


def perf_groups(rows: list[PerfRow]) -> list[PerfGroup]:
    groups: dict[tuple[str, str, str], PerfGroup] = {}
    for row in rows:
        key = group_key(row.variant, row.mode, row.shape)
        if key not in groups:
            groups[key] = PerfGroup(row.variant, row.mode, fixed_shape(row.shape), [])
        groups[key].rows.append(row)
    order = variant_order([r.variant for r in rows])
    modes = ["fwd", "bwd", "fwdbwd"]
    return sorted(
        groups.values(),
        key=lambda g: (order.index(g.variant), modes.index(g.mode) if g.mode in modes else 9),
    )


def pct_peak(row: PerfRow, peaks: dict[str, Any]) -> float | None:
    """Percent of the measured matmul peak: the producer's number, else TFLOP/s / peak."""
    if row.pct_peak is not None:
        return row.pct_peak
    peak = peaks.get("matmul_tflops") if peaks else None
    if row.tflops is not None and peak:
        return 100.0 * row.tflops / float(peak)
    return None


def status_text(row: PerfRow) -> str:
    return {"oom": "OOM", "unsupported": "n/a", "error": "error"}.get(row.status, row.status)


PERF_HEADERS = ("S", "B", "impl", "ms", "noise", "TFLOP/s", "% peak", "GB/s", "memory", "speedup")


def perf_cells(row: PerfRow, peaks: dict[str, Any]) -> list[str]:
    """One table row: S, B, impl, ms, noise, TFLOP/s, % peak, GB/s, memory, speedup."""
    head = [seq_label(row.shape), str(row.shape.get("B", "")), " ".join([row.impl, *score_words(row.shape)])]
    if row.status != "ok":
        return head + [status_text(row), "", "", "", "", fmt_bytes(row.mem_bytes), ""]
    pct = pct_peak(row, peaks)
    noise_flag = " ?" if (noise_pct(row) or 0) > NOISE_LIMIT else ""
    peak_flag = " ?" if over_peak(pct) else ""
    return head + [
        fmt_ms(row.ms),
        fmt_spread(row) + noise_flag,
        fmt_num(row.tflops),
        fmt_pct(pct) + peak_flag,
        fmt_num(row.gbps),
        fmt_bytes(row.mem_bytes),
        fmt_speedup(row.speedup),
    ]


def perf_table(group: PerfGroup, peaks: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of a group's table (rows as sorted_rows()), without the columns that are
    empty in every row (memory on a CPU run, say). S, B, impl and ms always stay, in front."""
    rows = [perf_cells(r, peaks) for r in group.sorted_rows()]
    keep = [i for i, h in enumerate(PERF_HEADERS) if i < 4 or any(row[i] for row in rows)]
    return [PERF_HEADERS[i] for i in keep], [[row[i] for i in keep] for row in rows]


NOISE_LIMIT = 50.0  # % : half the p20-p80 range over the median; noisier cells are not measurements to rank
PEAK_LIMIT = 100.0  # % of the measured peak: more is a timing or peak error (attnbench.results.over_peak)


def noise_pct(row: PerfRow) -> float | None:
    if row.ms is None or row.ms_p20 is None or row.ms_p80 is None or row.ms <= 0:
        return None
    return 50 * (row.ms_p80 - row.ms_p20) / row.ms


def suspect(row: PerfRow, peaks: dict[str, Any]) -> str:
    """Why a measured cell cannot be trusted ("" when it can): noise over NOISE_LIMIT, or over
    PEAK_LIMIT of the measured peak. Such a cell is flagged and never shown as the winner."""
    if row.status != "ok":
        return ""
    why = []
    noise = noise_pct(row)
    if noise is not None and noise > NOISE_LIMIT:
        why.append(f"noise ±{noise:.0f}% (over {NOISE_LIMIT:.0f}%)")
    pct = pct_peak(row, peaks)
    if over_peak(pct):
        why.append(f"{pct:.0f}% of the measured matmul peak is a measurement error (over {PEAK_LIMIT:.0f}%: "
                   "the peak probe read low, or the work model over-counts)")
    return "; ".join(why)


def best_tflops(group: PerfGroup, peaks: dict[str, Any] | None = None) -> dict[str, float]:
    """Highest TFLOP/s per sequence label among the trusted cells, to highlight the winner of
    each row block."""
    best: dict[str, float] = {}
    for row in group.rows:
        if row.status == "ok" and row.tflops is not None and not suspect(row, peaks or {}):
            label = seq_label(row.shape)
            best[label] = max(best.get(label, 0.0), row.tflops)
    return best


def perf_notes(group: PerfGroup, peaks: dict[str, Any] | None = None) -> list[str]:
    """Why cells are missing (OOM / unsupported / error reasons) or flagged `?` (not trusted),
    one line each."""
    notes = []
    for row in group.sorted_rows():
        if row.status != "ok" and row.reason:
            notes.append(f"{row.impl} at S={seq_label(row.shape)}: {status_text(row)}: {row.reason}")
        why = suspect(row, peaks or {})
        if why:
            notes.append(f"{row.impl} at S={seq_label(row.shape)}: ? not trusted: {why}")
    return notes


def timing_label(results: Results) -> str:
    """How the times were taken, for every renderer's performance heading: CPU figures are wall
    clock, and with the Triton interpreter its kernels run as Python."""
    timers = {r.timer for r in results.perf}
    if "wall_clock" not in timers:
        return "CUDA events" if timers == {"cuda_events"} else ""
    interpreted = results.env.get("triton_interpret") and any("triton" in r.impl for r in results.perf)
    return "wall clock; Triton interpreted" if interpreted else "wall clock"


# -- bug zoo ---------------------------------------------------------------------------
def checked_rows(results: Results) -> list[CorrectnessRow]:
    """Correctness rows of the implementations under test. Rows of bug-zoo members (named in
    results.zoo as "variant/impl") are expected to fail: the zoo's kill table reports them."""
    members = {z.member for z in results.zoo}
    if not members:
        return list(results.correctness)
    return [r for r in results.correctness if f"{r.variant}/{r.impl}" not in members and r.impl not in members]


def zoo_note(results: Results) -> str:
    n = len(results.correctness) - len(checked_rows(results))
    if not n:
        return ""
    return f"{n} checks ran on bug-zoo members; their failures are expected and are counted here, not as failures."


def zoo_summary(rows: list[ZooRow]) -> str:
    if not rows:
        return ""
    caught = sum(r.status == "caught" for r in rows)
    missed = [r.member for r in rows if r.status != "caught"]
    text = f"bug zoo: {caught}/{len(rows)} killed"
    return text + (f"; missed: {', '.join(missed)}" if missed else "")


# -- environment -----------------------------------------------------------------------
ENV_KEYS = (
    ("device", "device_name"),
    ("driver", "driver"),
    ("CUDA", "cuda"),
    ("cuDNN", "cudnn"),
    ("torch", "torch"),
    ("triton", "triton"),
    ("flash-attn", "flash_attn"),
    ("hypothesis", "hypothesis"),
    ("python", "python"),
    ("platform", "platform"),
    ("host", "host"),
    ("commit", "commit"),
)


def env_rows(results: Results) -> list[tuple[str, str]]:
    """(label, value) pairs: the well-known keys first, then anything else the writer added."""
    env = results.env or {}
    rows = []
    known = {key for _, key in ENV_KEYS}
    for label, key in ENV_KEYS:
        value = env.get(key)
        if key == "device_name" and env.get("device"):
            value = f"{value or '?'} ({env['device']})"
        rows.append((label, "not installed" if value is None and key == "flash_attn" else _plain(value)))
    for key, value in sorted(env.items()):
        if key not in known and key != "device":
            rows.append((key, _plain(value)))
    for key, value in sorted((results.peaks or {}).items()):
        rows.append((f"peak {key}", _plain(value)))
    rows.append(("created", results.created or ""))
    return [(k, v) for k, v in rows if v != ""]


def _plain(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def headline(results: Results) -> str:
    """One line: device, library versions, commit, date."""
    env = results.env or {}
    parts = [str(env.get("device_name") or env.get("device") or "unknown device")]
    for label, key in (("torch", "torch"), ("triton", "triton"), ("flash-attn", "flash_attn")):
        if env.get(key):
            parts.append(f"{label} {env[key]}")
    if env.get("commit"):
        parts.append(f"commit {env['commit']}")
    if results.created:
        parts.append(results.created[:10])
    return " · ".join(parts)


def correctness_line(rows: list[CorrectnessRow]) -> str:
    c = counts(rows)
    return f"{c['pass']} pass · {c['fail']} fail · {c['error']} error · {c['skip']} unsupported"


# -- comparing two runs ----------------------------------------------------------------
PEAK_DIFF = 0.10  # measured peaks further apart than this make a comparison warn


@dataclass
class PerfChange:
    variant: str
    mode: str
    impl: str
    shape: dict[str, Any]
    a: PerfRow | None
    b: PerfRow | None
    verdict: str  # slower | faster | same | broke | fixed | new | gone | n/a

    @property
    def ratio(self) -> float | None:
        """b's median time over a's: above 1 is slower."""
        if self.a is None or self.b is None or not self.a.ms or self.b.ms is None:
            return None
        return self.b.ms / self.a.ms


@dataclass
class CorrectnessChange:
    variant: str
    impl: str
    property: str
    a: MatrixCell
    b: MatrixCell
    verdict: str  # newly failing | fixed | new | gone | changed


@dataclass
class ZooChange:
    member: str
    a: str | None  # caught | missed | None (absent)
    b: str | None


@dataclass
class Comparison:
    a: Results
    b: Results
    threshold: float
    perf: list[PerfChange]
    correctness: list[CorrectnessChange]
    zoo: list[ZooChange]

    def env_diff(self) -> list[tuple[str, str, str]]:
        ea, eb = dict(env_rows(self.a)), dict(env_rows(self.b))
        labels = list(dict.fromkeys([*ea, *eb]))
        return [(k, ea.get(k, ""), eb.get(k, "")) for k in labels if ea.get(k, "") != eb.get(k, "")]

    def same_device(self) -> bool:
        return (self.a.env or {}).get("device_name") == (self.b.env or {}).get("device_name")

    def peak_warning(self) -> str:
        """A warning when the two runs' measured peaks differ by more than PEAK_DIFF: the
        machines (or their clocks, or their load) differed, so time ratios compare them too."""
        parts = []
        for key, unit in (("matmul_tflops", "TFLOP/s matmul"), ("copy_gbps", "GB/s copy")):
            pa, pb = (self.a.peaks or {}).get(key), (self.b.peaks or {}).get(key)
            if pa and pb and abs(pb / pa - 1) > PEAK_DIFF:
                parts.append(f"{fmt_num(pa)} → {fmt_num(pb)} {unit} ({100 * (pb / pa - 1):+.0f}%)")
        if not parts:
            return ""
        return ("measured peaks differ by more than " f"{PEAK_DIFF:.0%}: {', '.join(parts)}; "
                "time ratios compare the machines' state too")

    def regressions(self) -> list[str]:
        """Everything that got worse, one line each: slower cells, new failures, missed bugs."""
        out = []
        for c in self.perf:
            if c.verdict == "slower":
                out.append(f"{c.variant}/{c.impl} {c.mode} S={seq_label(c.shape)}: {fmt_times(c.ratio)} slower")
            elif c.verdict == "broke":
                out.append(f"{c.variant}/{c.impl} {c.mode} S={seq_label(c.shape)}: now {status_text(c.b)}")
        for c in self.correctness:
            if c.verdict == "newly failing":
                out.append(f"{c.variant}/{c.impl} {c.property}: {c.a.text()} → {c.b.text()}")
        for z in self.zoo:
            if z.a == "caught" and z.b == "missed":
                out.append(f"zoo {z.member}: no longer caught")
        return out

    def improvements(self) -> list[str]:
        out = [
            f"{c.variant}/{c.impl} {c.mode} S={seq_label(c.shape)}: {fmt_times(1 / c.ratio)} faster"
            for c in self.perf
            if c.verdict == "faster" and c.ratio
        ]
        out += [f"{c.variant}/{c.impl} {c.property}: fixed" for c in self.correctness if c.verdict == "fixed"]
        return out


def geomean_ratios(changes: list[PerfChange]) -> dict[str, float]:
    """Per implementation, the geometric mean of b/a time ratios over the matched cells."""
    logs: dict[str, list[float]] = defaultdict(list)
    for c in changes:
        if c.ratio and c.ratio > 0 and c.verdict not in ("broke", "fixed"):
            logs[c.impl].append(math.log(c.ratio))
    return {impl: math.exp(sum(v) / len(v)) for impl, v in logs.items()}


def compare_runs(a: Results, b: Results, threshold: float = 0.10) -> Comparison:
    """Match two runs cell by cell.

    A perf cell is `slower` when b's median is more than (1 + threshold) times a's and, where
    both carry p20/p80, b's p20 is above a's p80 (the noise bands do not overlap); `faster`
    symmetrically. A correctness cell is `newly failing` when it passed (or was not run) in a
    and fails or errors in b.
    """
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 10):
        raise ValueError(f"threshold: must be a number in [0, 10), got {threshold!r}")
    return Comparison(a, b, float(threshold), _perf_changes(a, b, threshold), _correctness_changes(a, b), _zoo(a, b))


def _perf_key(row: PerfRow) -> tuple[str, str, str, str]:
    return (row.variant, row.mode, row.impl, shape_key(row.shape))


def _perf_changes(a: Results, b: Results, threshold: float) -> list[PerfChange]:
    rows_a = {_perf_key(r): r for r in a.perf}
    rows_b = {_perf_key(r): r for r in b.perf}
    out = []
    for group in perf_groups(a.perf + b.perf):
        seen = set()
        for row in group.sorted_rows():
            key = _perf_key(row)
            if key in seen:
                continue
            seen.add(key)
            ra, rb = rows_a.get(key), rows_b.get(key)
            change = PerfChange(row.variant, row.mode, row.impl, row.shape, ra, rb, "")
            change.verdict = _perf_verdict(change, threshold)
            out.append(change)
    return out


def _perf_verdict(c: PerfChange, threshold: float) -> str:
    if c.a is None:
        return "new"
    if c.b is None:
        return "gone"
    ok_a, ok_b = c.a.status == "ok" and c.a.ms, c.b.status == "ok" and c.b.ms is not None
    if ok_a and not ok_b:
        return "broke"
    if ok_b and not ok_a:
        return "fixed"
    if not (ok_a and ok_b):
        return "n/a"
    ratio = c.ratio
    bands = None not in (c.a.ms_p20, c.a.ms_p80, c.b.ms_p20, c.b.ms_p80)
    if ratio > 1 + threshold and (not bands or c.b.ms_p20 > c.a.ms_p80):
        return "slower"
    if ratio < 1 / (1 + threshold) and (not bands or c.b.ms_p80 < c.a.ms_p20):
        return "faster"
    return "same"


def _correctness_changes(a: Results, b: Results) -> list[CorrectnessChange]:
    rows_a, rows_b = checked_rows(a), checked_rows(b)
    ma = {m.variant: m for m in matrices(rows_a)}
    mb = {m.variant: m for m in matrices(rows_b)}
    out = []
    for m in matrices(rows_a + rows_b):
        for prop in m.properties:
            for impl in m.impls:
                ca = ma[m.variant].cell(prop, impl) if m.variant in ma else MatrixCell()
                cb = mb[m.variant].cell(prop, impl) if m.variant in mb else MatrixCell()
                verdict = _cell_verdict(ca, cb)
                if verdict:
                    out.append(CorrectnessChange(m.variant, impl, prop, ca, cb, verdict))
    return out


def _cell_verdict(a: MatrixCell, b: MatrixCell) -> str:
    bad = ("fail", "error")
    if a.status == b.status:
        return ""
    if b.status in bad and a.status not in bad:
        return "newly failing"
    if a.status in bad and b.status == "pass":
        return "fixed"
    if a.status == "none":
        return "new"
    if b.status == "none":
        return "gone"
    return "changed"


def _zoo(a: Results, b: Results) -> list[ZooChange]:
    sa = {z.member: z.status for z in a.zoo}
    sb = {z.member: z.status for z in b.zoo}
    members = list(dict.fromkeys([*sa, *sb]))
    return [ZooChange(m, sa.get(m), sb.get(m)) for m in members if sa.get(m) != sb.get(m)]
