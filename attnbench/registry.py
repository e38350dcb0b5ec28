"""The registry: implementations declare what they are and what they support.

An implementation is an `Impl` object at module level in a file of `impls/` (found by
scanning the package), in a third-party package exposed through the entry-point group
`attnbench.impls`, or named on the command line as `package.module:object`. Nothing is
guessed: a feature an implementation does not declare is never tested against it.

Properties and benchmarks select implementations through `select()` and never name one.

The registry sits below the implementations: it imports none of their code, and finds the
built-in ones (and the bug zoo) by scanning their packages, named in BUILTIN and ZOO, as it finds
third-party ones through entry points.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import pkgutil
import re
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch

from attnbench.spec import DTYPES, FEATURES, GRAD_LAYOUTS, LAYOUTS, Spec

ENTRY_POINT_GROUP = "attnbench.impls"
BUILTIN = "attnbench.impls"  # the package of the built-in implementations, one file each
ZOO = "attnbench.zoo"  # the bug zoo: deliberately broken implementations, never registered by default

# Variants: the functional kernels and the seed modules. Each has one oracle in oracles/.
VARIANTS: dict[str, str] = {
    "dense": "attention core fn(q, k, v, cfg, key_padding_mask, bias) -> (out, lse | None): "
    "MHA / GQA / MQA, self and cross, causal, windows, padding, bias",
    "local": "the same core, always windowed (sliding or blocked): LocalMHA's kernel",
    "FlashAttentionTwo": "seed module: dense multi-head attention, bucketed (FlashAttention-2)",
    "MultiQueryAttention": "seed module: multi-query / grouped-query attention with KV cache",
    "LocalMHA": "seed module: local multi-head attention, sliding or blocked windows",
    "MixtureOfAttention": "seed module: routed mixture of attention experts",
    "MixtureOfAutoregressiveAttention": "seed module: the strictly causal routed mixture",
}
MODULE_VARIANTS = tuple(v for v in VARIANTS if v[0].isupper())
ALL_DTYPES = ("float64", "float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Decoder:
    """How a module decodes through its cache (the decoding properties).

    step(module, x, cache, mask=None) -> (out, cache): run the tokens `x` (batch, n, dim)
        after the ones already in `cache` (None before the first step) and return their
        outputs and the new cache; `mask` is the (batch, tokens so far) keep-mask when passed.
    max_chunk: the most tokens one step takes (None: any number).
    mask: whether step takes a keep-mask.
    """

    step: Callable
    max_chunk: int | None = None
    mask: bool = False


@dataclass(frozen=True, repr=False)
class Impl:
    """One implementation of one variant.

    fn: for kernel variants, the attention function; for module variants, a factory
        `fn(**module_kwargs) -> nn.Module`.
    features: what it supports (names from attnbench.spec.FEATURES).
    requires: importable modules it needs ("flash_attn", "flash_attn.cute"): missing ones make it
        unavailable.
    available: optional check `available() -> reason | None` run after `requires` (a guarded
        import, a compute capability): a reason makes it unavailable on this machine.
    absent: optional `absent() -> {feature: reason}`: declared features this machine's hardware
        lacks (FA4's fp8 runs on SM100 only). Specs needing them are not covered and properties
        that need them skip with the reason, instead of drawing specs that are all declined.
        why_not calls it for every spec: cache it (functools.cache), as impls/flash_attn4.py does.
    supports: optional extra check `supports(spec) -> reason | None` for limits the feature
        set cannot express (head dims, block multiples, ...); one taking a second argument gets
        the features asked for too (`supports(spec, needs)`: a limit of the backward alone).
    layouts / grad_layouts: the memory layouts of q, k, v / of grad_out it accepts (names from
        attnbench.spec.LAYOUTS / GRAD_LAYOUTS; default all). One that declares fewer must reject
        the others with an error, and a property checks that it does.
    """

    name: str
    variant: str
    fn: Callable
    features: frozenset[str] = frozenset()
    devices: tuple[str, ...] = ("cpu", "cuda")
    dtypes: tuple[str, ...] | None = None  # default: all four for kernels, ("float32",) for modules
    requires: tuple[str, ...] = ()
    supports: Callable[..., str | None] | None = None
    available: Callable[[], str | None] | None = None
    absent: Callable[[], Mapping[str, str]] | None = None
    layouts: tuple[str, ...] = LAYOUTS
    grad_layouts: tuple[str, ...] = GRAD_LAYOUTS
    description: str = ""
    reference: bool = False  # the naive impl the tolerance rule measures others against
    bug: str = ""  # bug-zoo members: the bug class this deliberately broken impl carries
    memory: str = ""  # "linear": promises O(S) extra memory (blockwise / fused); perf checks the slope
    compiles: bool = False  # its first call compiles (Triton, torch.compile): a CUDA sweep prewarms it in parallel
    tuning: Callable[[], dict] | None = None  # what its autotuner picked so far (a sweep stores it in env)
    origin: str = field(default="", compare=False)  # where it was found
    # Module variants only (properties/test_modules.py says which tier needs which):
    # options: constructor option -> the values this module takes; cases draw only those.
    options: Mapping[str, tuple] = field(default_factory=dict, compare=False)
    # weights: the white-box tier's map from the module's parameters to the variant's reference
    #   layout: {reference name: own parameter name or fn(module) -> tensor}, or
    #   fn(module) -> {reference name: tensor}. None: oracle agreement and gradients are unsupported.
    weights: Mapping[str, str | Callable] | Callable | None = field(default=None, compare=False)
    # route: fn(module, x, context=None, mask=None, context_mask=None) -> an object with
    #   q_index, q_valid, kv_index, kv_valid (the routed mixtures' decisions); None: not exposed.
    route: Callable | None = field(default=None, compare=False)
    decode: Decoder | None = field(default=None, compare=False)  # decoding through a cache
    # Kernel variants only, the call conventions of attnbench.packing (declared with the feature
    # of the same name; a kernel declaring "document" takes the dense call's document_ids=):
    # varlen: fn(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, cfg, return_lse=True)
    varlen: Callable | None = field(default=None, compare=False)
    # paged: fn(q, k_cache, v_cache, block_table, cache_seqlens, cfg, return_lse=True)
    paged: Callable | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"Impl {self.name!r}: unknown variant {self.variant!r}; one of {sorted(VARIANTS)}")
        module = self.variant in MODULE_VARIANTS
        if self.dtypes is None:
            object.__setattr__(self, "dtypes", ("float32",) if module else ALL_DTYPES)
        object.__setattr__(self, "dtypes", tuple(self.dtypes))
        hooks = [n for n in ("weights", "route", "decode") if getattr(self, n) is not None]
        hooks += ["options"] if self.options else []
        if hooks and not module:
            raise ValueError(f"Impl {self.name!r}: {', '.join(hooks)} apply to module variants only, not {self.variant!r}")
        if not isinstance(self.options, Mapping) or not all(isinstance(v, tuple) for v in self.options.values()):
            raise ValueError(f"Impl {self.name!r}: options must map an option name to a tuple of the values it takes")
        if self.decode is not None and not isinstance(self.decode, Decoder):
            raise ValueError(f"Impl {self.name!r}: decode must be a Decoder, got {type(self.decode).__name__}")
        object.__setattr__(self, "features", frozenset(self.features))
        for hook, feature in (("varlen", "varlen"), ("paged", "paged_kv")):
            fn = getattr(self, hook)
            if fn is not None and (module or not callable(fn)):
                raise ValueError(f"Impl {self.name!r}: {hook} must be a callable of a kernel variant")
            if (fn is not None) != (feature in self.features):
                raise ValueError(f"Impl {self.name!r}: the feature {feature!r} and the {hook} function come together")
        unknown = self.features - FEATURES
        if unknown:
            raise ValueError(f"Impl {self.name!r}: unknown features {sorted(unknown)}; known: {sorted(FEATURES)}")
        bad = set(self.dtypes) - set(DTYPES)
        if bad:
            raise ValueError(f"Impl {self.name!r}: unknown dtypes {sorted(bad)}")
        for name, known in (("layouts", LAYOUTS), ("grad_layouts", GRAD_LAYOUTS)):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if set(getattr(self, name)) - set(known):
                raise ValueError(f"Impl {self.name!r}: unknown {name} {sorted(set(getattr(self, name)) - set(known))}")
        if self.memory not in ("", "linear", "quadratic"):
            raise ValueError(f"Impl {self.name!r}: memory must be '', 'linear' or 'quadratic', got {self.memory!r}")

    def __repr__(self) -> str:
        """An expression that loads this implementation (`from attnbench.registry import
        load_zoo, registry`), short enough for a counterexample's printout: the dataclass repr
        spelled out every field, functions included, over ~40 lines."""
        if is_target(self.origin):
            return f"registry([{self.origin!r}]).get({self.key!r})"
        if self.bug:
            return f"next(i for i in load_zoo() if i.key == {self.key!r})"
        return f"registry().get({self.key!r})"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        """Hypothesis' (IPython's) pretty printer takes this over its field-by-field dataclass form."""
        printer.text(repr(self))

    def for_variant(self, variant: str, description: str = "") -> Impl:
        """The same implementation declared for another variant (a dense kernel that also serves
        `local`): every declaration carried over, so the two cannot drift apart."""
        return dataclasses.replace(self, variant=variant, description=description or self.description, origin="")

    @property
    def key(self) -> str:
        return f"{self.variant}/{self.name}"

    def unavailable(self) -> str | None:
        """Why this implementation cannot run on this machine at all, or None."""
        for mod in self.requires:
            if not _installed(mod):
                return f"{mod} not installed"
        if "cpu" not in self.devices and not torch.cuda.is_available():
            return "needs CUDA"
        return self.available() if self.available is not None else None

    def lacks_here(self, features: Iterable[str]) -> str | None:
        """Why some of these declared features do not run on this machine (the `absent` hook), or None."""
        if self.absent is None:
            return None
        absent = self.absent()
        why = [f"{f}: {absent[f]}" for f in sorted(set(features)) if f in absent]
        return "; ".join(why) or None

    def device_ok(self, device: str) -> bool:
        return device.split(":")[0] in self.devices

    def why_not(self, spec: Spec, needs: Iterable[str] = ()) -> str | None:
        """Why this implementation does not cover `spec` (plus extra needs), or None. A packed or
        paged spec (attnbench.packing) is covered when each of its sequences' dense specs is."""
        if not self.device_ok(spec.device):
            return f"device {spec.device} not supported"
        if spec.dtype not in self.dtypes:
            return f"dtype {spec.dtype} not supported"
        wanted = spec.needs() | set(needs)
        missing = wanted - self.features
        if missing:
            return f"unsupported features: {', '.join(sorted(missing))}"
        if why := self.lacks_here(wanted):
            return why
        if not isinstance(spec, Spec):
            rest = set(needs) - {"varlen", "paged_kv"}
            return next((why for s in spec.dense_specs() if (why := self.why_not(s, rest))), None)
        if spec.layout not in self.layouts:
            return f"layout {spec.layout} not accepted"
        if spec.grad_layout not in self.grad_layouts:
            return f"grad_layout {spec.grad_layout} not accepted"
        if self.supports is None:
            return None
        if _takes_needs(self.supports):
            return self.supports(spec, frozenset(wanted))
        return self.supports(spec)

    def covers(self, spec: Spec, needs: Iterable[str] = ()) -> bool:
        return self.why_not(spec, needs) is None


def _installed(module: str) -> bool:
    """find_spec without the ModuleNotFoundError it raises for a dotted name whose parent is missing."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@functools.cache
def _takes_needs(supports: Callable) -> bool:
    try:
        params = inspect.signature(supports).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


@dataclass
class Broken:
    """An implementation source that failed to load: reported, never fatal."""

    origin: str
    reason: str


class Registry:
    def __init__(self) -> None:
        self.impls: dict[str, Impl] = {}
        self.broken: list[Broken] = []

    def add(self, impl: Impl) -> None:
        if impl.key in self.impls and self.impls[impl.key] is not impl:
            raise ValueError(f"two implementations named {impl.key!r} ({self.impls[impl.key].origin} and {impl.origin})")
        self.impls[impl.key] = impl

    def add_module(self, module, origin: str) -> int:
        found = 0
        for value in vars(module).values():
            for impl in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(impl, Impl):
                    object.__setattr__(impl, "origin", impl.origin or origin)
                    self.add(impl)
                    found += 1
        return found

    def load_builtin(self) -> None:
        for name in package_files(BUILTIN):
            try:
                self.add_module(importlib.import_module(name), origin=name)
            except Exception as exc:  # one broken file never aborts the run
                self.broken.append(Broken(name, error_line(exc)))

    def load_entry_points(self) -> None:
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            try:
                obj = ep.load()
                self._add_object(obj, origin=f"entry point {ep.name} = {ep.value}")
            except Exception as exc:
                self.broken.append(Broken(f"entry point {ep.value}", error_line(exc)))

    def load_spec(self, target: str) -> list[Impl]:
        """Load `package.module:object` (an Impl, a list of them, or a module of them).

        `package.module:object[variant/name]` loads the same object and returns only the one
        implementation of that key (or name): a replay of one member of a list."""
        m = _TARGET.fullmatch(target.strip())
        if m is None:
            raise ValueError(f"--impl {target!r}: expected package.module:object or package.module:object[variant/name]")
        mod_name, attr, pick = m.group("module"), m.group("attr"), m.group("pick")
        module = importlib.import_module(mod_name)
        obj = module
        for part in attr.split(".") if attr else []:
            if not hasattr(obj, part):
                raise ValueError(f"--impl {target!r}: {mod_name} has no attribute {attr!r}")
            obj = getattr(obj, part)
        items = self._add_object(obj, origin=target.partition("[")[0])
        if pick is None:
            return items
        chosen = [i for i in items if pick in (i.key, i.name)]
        if len(chosen) != 1:
            keys = ", ".join(i.key for i in items)
            problem = "is ambiguous" if chosen else "matches none"
            raise ValueError(f"--impl {target!r}: [{pick}] {problem} of its implementations ({keys})")
        return chosen

    def _add_object(self, obj, origin: str) -> list[Impl]:
        if isinstance(obj, Impl):
            items = [obj]
        elif isinstance(obj, (list, tuple)) and all(isinstance(i, Impl) for i in obj):
            items = list(obj)
        elif hasattr(obj, "__dict__") and type(obj).__name__ == "module":
            items = [i for i in vars(obj).values() if isinstance(i, Impl)]
        else:
            raise TypeError(f"{origin}: expected an attnbench Impl (or a list of them), got {type(obj).__name__}")
        if not items:
            raise ValueError(f"{origin}: no Impl objects found")
        for impl in items:
            object.__setattr__(impl, "origin", impl.origin or origin)
            self.add(impl)
        return items

    def get(self, key: str, variants: Iterable[str] = ()) -> Impl:
        """The implementation of this key ("dense/naive") or name ("naive"); a name is looked up
        within `variants` when given, so `naive` with variants ("local",) is local/naive."""
        if key in self.impls:
            return self.impls[key]
        variants = set(variants)
        matches = [i for i in self.impls.values() if i.name == key]
        if variants and len(matches) > 1:
            matches = [i for i in matches if i.variant in variants] or matches
        if len(matches) == 1:
            return matches[0]
        known = ", ".join(sorted(self.impls))
        if matches:
            raise KeyError(f"implementation {key!r} is ambiguous: {', '.join(i.key for i in matches)}; "
                           "name one as variant/name or add --variant")
        raise KeyError(f"unknown implementation {key!r}; known: {known}")

    def resolve(self, names: Iterable[str], variants: Iterable[str] = ()) -> list[Impl]:
        """The implementations the --impl arguments name: keys, names (looked up within
        `variants`) and package.module:object targets."""
        out: list[Impl] = []
        for n in names:
            out.extend(self.load_spec(n) if is_target(n) else [self.get(n, variants)])
        return out

    def select(
        self,
        variant: str | None = None,
        names: Iterable[str] | None = None,
        available_only: bool = True,
    ) -> list[Impl]:
        if variant is not None and variant not in VARIANTS:
            raise KeyError(f"unknown variant {variant!r}; one of {sorted(VARIANTS)}")
        chosen = [self.get(n) for n in names] if names else list(self.impls.values())
        out = [i for i in chosen if variant is None or i.variant == variant]
        if available_only:
            out = [i for i in out if i.unavailable() is None]
        return sorted(out, key=lambda i: (list(VARIANTS).index(i.variant), not i.reference, i.name))

    def reference(self, variant: str) -> Impl:
        refs = [i for i in self.impls.values() if i.variant == variant and i.reference]
        if not refs:
            raise KeyError(f"variant {variant!r} has no reference implementation")
        return refs[0]


_TARGET = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<attr>[\w.]*)(?:\[(?P<pick>[^\]]+)\])?")


def is_target(text: str) -> bool:
    """Whether an --impl argument names a Python object (package.module:object) rather than a key."""
    return _TARGET.fullmatch(text.strip()) is not None


def error_line(exc: BaseException) -> str:
    """One line: the exception and where it happened (for a syntax error, the file and line)."""
    if isinstance(exc, SyntaxError):
        return f"{type(exc).__name__}: {exc.msg} ({exc.filename}:{exc.lineno})"
    if isinstance(exc, ModuleNotFoundError):  # where the import machinery noticed says nothing
        return f"{type(exc).__name__}: {exc}"
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" ({last[0].filename.split('/')[-1]}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"


_REGISTRY: Registry | None = None


def package_files(package: str) -> list[str]:
    """The module names of a package's files, sorted, leaving out private ones (`_name.py`)."""
    pkg = importlib.import_module(package)
    infos = sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name)
    return [f"{package}.{info.name}" for info in infos if not info.name.startswith("_")]


def load_zoo() -> list[Impl]:
    """The bug zoo: deliberately broken implementations, never registered by default."""
    found = Registry()
    for name in package_files(ZOO):
        found.add_module(importlib.import_module(name), origin=f"zoo.{name.rsplit('.', 1)[-1]}")
    return list(found.impls.values())


def registry(extra: Iterable[str] = ()) -> Registry:
    """The process-wide registry: builtin impls, entry points, then ATTNBENCH_IMPLS / extra."""
    global _REGISTRY
    if _REGISTRY is None:
        reg = Registry()
        reg.load_builtin()
        reg.load_entry_points()
        for target in _env_targets():
            try:
                reg.load_spec(target)
            except Exception as exc:
                reg.broken.append(Broken(target, error_line(exc)))
        _REGISTRY = reg
    for target in extra:
        _REGISTRY.load_spec(target)
    return _REGISTRY


def _env_targets() -> list[str]:
    # The CLI passes --impl targets to pytest workers through this variable.
    return [t for t in os.environ.get("ATTNBENCH_IMPLS", "").split(",") if t.strip()]
