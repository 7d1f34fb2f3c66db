"""The cost model: modelled hardware time per unit of UV and kernel work, and the fit that
recovers costs from a user's own measurement.

A ``CostModel`` prices what the accounting counts (``pvfast.accounting.Usage``): each UVC
execution (a fixed cost, plus a per-page cost for the UVCs in which the UV itself walks pages:
Destroy Secure Configuration and Set Unshare All), each present PTE a kernel walk visits, each
4 KiB page the UV clears and each page the host faults in. Costs are nanoseconds here and integer
picoseconds inside the native accounts, so a modelled time is exact and the same on every machine.

The default numbers are assumptions (no public per-UVC timings exist); ``DEFAULT_SOURCES`` says,
for each, where it comes from, and docs/PERFORMANCE.md lists them. Replace them with a TOML file
(``CostModel.from_toml``, ``pvfast --costs FILE``) or fit them (``fit``, ``pvfast calibrate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from . import _native

#: UVC names in the order of the native counters (the kernel's UVC_CMD_* without the prefix).
UVC_NAMES: tuple[str, ...] = tuple(_native.UVC_NAMES)

#: The UVCs in which the UV processes a variable number of pages itself (per_page_ns applies).
PER_PAGE_UVCS: frozenset[str] = frozenset({"DESTROY_SEC_CONF", "SET_UNSHARE_ALL"})

#: Cost parameters that are not per UVC.
GLOBAL_PARAMETERS: tuple[str, ...] = ("pte_ns", "zero_page_ns", "fault_page_ns")


@dataclass(frozen=True, slots=True)
class UvcCost:
    """What one UVC costs: ``fixed_ns`` per execution, ``per_page_ns`` per page it processes."""

    fixed_ns: float = 0.0
    per_page_ns: float = 0.0


# Default costs in ns. Every figure is an assumption: IBM publishes no per-UVC timing, and the
# public record of the teardown (the async-destroy series' cover letter, IBM's documentation of
# async teardown) only says that it "can take a very long time" and may run a host out of memory.
_A = "assumption"
_DEFAULT_UVCS: dict[str, tuple[float, float, str]] = {
    "QUI": (1_000, 0, f"{_A}: a query that copies one block; order of a firmware call (~1 µs)"),
    "INIT_UV": (1_000_000, 0, f"{_A}: one-time set-up at boot; 1 ms, never on a teardown path"),
    "CREATE_SEC_CONF": (100_000, 0, f"{_A}: builds the configuration's UV tables; 100 µs"),
    "DESTROY_SEC_CONF": (
        100_000,
        200,
        f"{_A}: 100 µs fixed; per page the UV still owns, 200 ns of table work besides clearing it",
    ),
    "DESTROY_SEC_CONF_FAST": (100_000, 0, f"{_A}: O(1), like the fixed part of Destroy Config"),
    "CREATE_SEC_CPU": (20_000, 0, f"{_A}: sets up the secure CPU's state; 20 µs"),
    "DESTROY_SEC_CPU": (20_000, 0, f"{_A}: as Create CPU"),
    "CONV_TO_SEC_STOR": (2_000, 0, f"{_A}: import: 2 µs of checks and table updates (clearing counted apart)"),
    "CONV_FROM_SEC_STOR": (
        4_000,
        0,
        f"{_A}: export: encrypt and hash 4 KiB (~1 GB/s per core for AES-GCM in firmware) plus the call",
    ),
    "DESTR_SEC_STOR": (
        1_000,
        0,
        f"{_A}: destroy page: 1 µs per call (a firmware call with one table update; clearing counted apart)",
    ),
    "SET_SEC_CONF_PARAMS": (50_000, 0, f"{_A}: unwrap and check the SE header; 50 µs"),
    "UNPACK_IMG": (5_000, 0, f"{_A}: decrypt (AES-XTS) and hash one image page; 5 µs"),
    "VERIFY_IMG": (10_000, 0, f"{_A}: compare the image digests; 10 µs"),
    "CPU_RESET": (2_000, 0, f"{_A}: CPU state update; 2 µs"),
    "CPU_RESET_INITIAL": (2_000, 0, f"{_A}: as CPU reset"),
    "PREPARE_RESET": (2_000, 0, f"{_A}: as CPU reset"),
    "CPU_RESET_CLEAR": (2_000, 0, f"{_A}: as CPU reset"),
    "CPU_SET_STATE": (2_000, 0, f"{_A}: as CPU reset"),
    "SET_UNSHARE_ALL": (10_000, 100, f"{_A}: 10 µs fixed, 100 ns per page it unshares"),
    "PIN_PAGE_SHARED": (1_000, 0, f"{_A}: as destroy page"),
    "UNPIN_PAGE_SHARED": (1_000, 0, f"{_A}: as destroy page"),
    "DUMP_INIT": (10_000, 0, f"{_A}: 10 µs"),
    "DUMP_CONF_STOR_STATE": (20_000, 0, f"{_A}: one 1 MiB block of page states; 20 µs"),
    "DUMP_CPU": (10_000, 0, f"{_A}: 10 µs"),
    "DUMP_COMPLETE": (10_000, 0, f"{_A}: 10 µs"),
    "SET_SHARED_ACCESS": (1_000, 0, f"{_A}: guest-side share of one page; as destroy page"),
    "REMOVE_SHARED_ACCESS": (1_000, 0, f"{_A}: as share"),
}
_DEFAULT_GLOBAL: dict[str, tuple[float, str]] = {
    "pte_ns": (
        10,
        f"{_A}: the kernel's page-table walk per present PTE (read, test, lock the page); 10 ns",
    ),
    "zero_page_ns": (
        250,
        f"{_A}: the UV clears 4 KiB at ~16 GB/s of one core's store bandwidth: 256 ns, rounded",
    ),
    "fault_page_ns": (
        1_000,
        f"{_A}: a host page fault that allocates and zero-fills 4 KiB; ~1 µs, the usual x86 order",
    ),
}

#: Where each default comes from, by parameter name (``uvc.NAME.fixed_ns``, ``pte_ns``, ...).
DEFAULT_SOURCES: Mapping[str, str] = MappingProxyType(
    {
        **{f"uvc.{name}.fixed_ns": src for name, (_, _, src) in _DEFAULT_UVCS.items()},
        **{f"uvc.{name}.per_page_ns": src for name, (_, pp, src) in _DEFAULT_UVCS.items() if name in PER_PAGE_UVCS},
        **{name: src for name, (_, src) in _DEFAULT_GLOBAL.items()},
    }
)


#: The largest cost of one unit (one UVC, page, PTE): 1 s, far above any published figure (the
#: slowest default, Init UV, is 1 ms). Costs near it make long walks reach the end of the 64-bit
#: picosecond clock, which then stays at 2**64 - 1 ps (about 213 days) instead of wrapping.
MAX_COST_NS = 1e9


def _check_cost(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number of nanoseconds, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: {value} is not a finite, non-negative number of nanoseconds")
    if value > MAX_COST_NS:
        raise ValueError(f"{name}: {value} ns is more than the {MAX_COST_NS:g} ns (1 s) one unit may cost")
    return float(value)


def _ps(ns: float) -> int:
    return round(ns * 1000)


@dataclass(frozen=True)
class CostModel:
    """Modelled cost of each unit of work, in nanoseconds (see the module docstring).

    ``uvcs`` has an entry for every UVC name; ``per_page_ns`` is used only for the UVCs in
    ``PER_PAGE_UVCS``. ``name`` says where the table came from (``"default"``, a file path).
    """

    uvcs: Mapping[str, UvcCost]
    pte_ns: float
    zero_page_ns: float
    fault_page_ns: float
    name: str = "default"

    def __post_init__(self) -> None:
        missing = [n for n in UVC_NAMES if n not in self.uvcs]
        unknown = [n for n in self.uvcs if n not in UVC_NAMES]
        if missing or unknown:
            raise ValueError(f"uvcs: missing {missing}, unknown {unknown}")
        for n, c in self.uvcs.items():
            _check_cost(f"uvc.{n}.fixed_ns", c.fixed_ns)
            _check_cost(f"uvc.{n}.per_page_ns", c.per_page_ns)
        for p in GLOBAL_PARAMETERS:
            _check_cost(p, getattr(self, p))
        object.__setattr__(self, "uvcs", MappingProxyType(dict(self.uvcs)))

    # -- construction --
    @classmethod
    def default(cls) -> CostModel:
        """The documented default table (assumptions; see ``DEFAULT_SOURCES``)."""
        return cls(
            uvcs={n: UvcCost(f, p if n in PER_PAGE_UVCS else 0.0) for n, (f, p, _) in _DEFAULT_UVCS.items()},
            pte_ns=_DEFAULT_GLOBAL["pte_ns"][0],
            zero_page_ns=_DEFAULT_GLOBAL["zero_page_ns"][0],
            fault_page_ns=_DEFAULT_GLOBAL["fault_page_ns"][0],
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, base: CostModel | None = None, name: str = "") -> CostModel:
        """A table from parsed TOML: top-level ``pte_ns``/``zero_page_ns``/``fault_page_ns`` and
        ``name``, and a ``[uvc.NAME]`` table per UVC with ``fixed_ns``/``per_page_ns``. What the
        mapping leaves out comes from ``base`` (the defaults if None). Unknown keys are errors.
        The table's ``name`` is the mapping's ``name``, else ``name``, else ``base``'s."""
        model = base if base is not None else cls.default()
        values: dict[str, float] = {}
        label = name
        for key, value in data.items():
            if key == "name":
                if not isinstance(value, str):
                    raise TypeError(f"name: expected a string, got {type(value).__name__}")
                label = value
            elif key in GLOBAL_PARAMETERS:
                values[key] = _check_cost(key, value)
            elif key == "uvc":
                if not isinstance(value, Mapping):
                    raise TypeError("uvc: expected a table of [uvc.NAME] tables")
                for uvc, fields in value.items():
                    if uvc not in UVC_NAMES:
                        raise ValueError(f"uvc.{uvc}: unknown UVC (known: {', '.join(UVC_NAMES)})")
                    if not isinstance(fields, Mapping):
                        raise TypeError(f"uvc.{uvc}: expected a table with fixed_ns and/or per_page_ns")
                    for field_name, v in fields.items():
                        param = f"uvc.{uvc}.{field_name}"
                        if field_name not in ("fixed_ns", "per_page_ns"):
                            raise ValueError(f"{param}: unknown key (expected fixed_ns or per_page_ns)")
                        if field_name == "per_page_ns" and uvc not in PER_PAGE_UVCS:
                            raise ValueError(
                                f"{param}: the UV does no per-page work in {uvc} "
                                f"(per_page_ns applies to {', '.join(sorted(PER_PAGE_UVCS))})"
                            )
                        values[param] = _check_cost(param, v)
            else:
                raise ValueError(f"{key}: unknown key (expected name, uvc, {', '.join(GLOBAL_PARAMETERS)})")
        return model.with_values(values, name=label or model.name)

    @classmethod
    def from_toml(cls, source: str | Path, *, base: CostModel | None = None) -> CostModel:
        """Read a TOML cost file (see ``to_toml`` for the layout). ``source`` is a path."""
        path = Path(source)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"{path}: not valid TOML: {err}") from None
        return cls.from_mapping(data, base=base, name=str(path))

    # -- parameters by name --
    @staticmethod
    def parameters() -> tuple[str, ...]:
        """Every parameter name: ``uvc.NAME.fixed_ns``, ``uvc.NAME.per_page_ns`` (per-page UVCs
        only), ``pte_ns``, ``zero_page_ns``, ``fault_page_ns``."""
        out = [f"uvc.{n}.fixed_ns" for n in UVC_NAMES]
        out += [f"uvc.{n}.per_page_ns" for n in UVC_NAMES if n in PER_PAGE_UVCS]
        return (*out, *GLOBAL_PARAMETERS)

    def get(self, param: str) -> float:
        """One parameter by name: a global one (e.g. ``pte_visit_ns``) or ``UVC.fixed_ns`` / ``UVC.per_page_ns``."""
        if param in GLOBAL_PARAMETERS:
            return float(getattr(self, param))
        parts = param.split(".")
        if len(parts) == 3 and parts[0] == "uvc" and parts[1] in self.uvcs and parts[2] in ("fixed_ns", "per_page_ns"):
            if parts[2] == "per_page_ns" and parts[1] not in PER_PAGE_UVCS:
                raise ValueError(f"{param}: the UV does no per-page work in {parts[1]}")
            return float(getattr(self.uvcs[parts[1]], parts[2]))
        raise ValueError(f"{param}: unknown cost parameter (see CostModel.parameters())")

    def with_values(self, values: Mapping[str, float], *, name: str | None = None) -> CostModel:
        """A copy with some parameters replaced (names as in ``parameters()``)."""
        uvcs = dict(self.uvcs)
        glob = {p: float(getattr(self, p)) for p in GLOBAL_PARAMETERS}
        for param, value in values.items():
            self.get(param)  # validates the name
            v = _check_cost(param, value)
            if param in glob:
                glob[param] = v
            else:
                _, uvc, field_name = param.split(".")
                uvcs[uvc] = dataclasses.replace(uvcs[uvc], **{field_name: v})
        return CostModel(
            uvcs=uvcs,
            pte_ns=glob["pte_ns"],
            zero_page_ns=glob["zero_page_ns"],
            fault_page_ns=glob["fault_page_ns"],
            name=self.name if name is None else name,
        )

    def as_dict(self) -> dict[str, Any]:
        """The table as the TOML layout (JSON-serialisable)."""
        out: dict[str, Any] = {"name": self.name}
        out.update({p: getattr(self, p) for p in GLOBAL_PARAMETERS})
        out["uvc"] = {
            n: (
                {"fixed_ns": c.fixed_ns, "per_page_ns": c.per_page_ns}
                if n in PER_PAGE_UVCS
                else {"fixed_ns": c.fixed_ns}
            )
            for n, c in self.uvcs.items()
        }
        return out

    def to_toml(self, *, comments: Mapping[str, str] | None = None) -> str:
        """The whole table as TOML, readable back by ``from_toml``; ``comments`` (by parameter
        name) are written above the values they explain."""
        notes = comments or {}

        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else repr(float(v))

        def note(param: str) -> str:
            return f"# {notes[param]}\n" if param in notes else ""

        lines = [
            "# pvfast cost model: modelled hardware time per unit of work, in nanoseconds.",
            f"name = {json.dumps(self.name)}",  # a JSON string is a valid TOML basic string
        ]
        lines += [f"{note(p)}{p} = {num(getattr(self, p))}" for p in GLOBAL_PARAMETERS]
        for n, c in self.uvcs.items():
            lines.append("")
            lines.append(f"[uvc.{n}]")
            lines.append(f"{note(f'uvc.{n}.fixed_ns')}fixed_ns = {num(c.fixed_ns)}")
            if n in PER_PAGE_UVCS:
                lines.append(f"{note(f'uvc.{n}.per_page_ns')}per_page_ns = {num(c.per_page_ns)}")
        return "\n".join(lines) + "\n"

    # -- pricing --
    def native_table(self) -> dict[str, Any]:
        """Keyword arguments of ``_native.Ultravisor.set_costs`` (integer ps)."""
        return {
            "uvc_fixed": [_ps(self.uvcs[n].fixed_ns) for n in UVC_NAMES],
            "uvc_per_page": [_ps(self.uvcs[n].per_page_ns) if n in PER_PAGE_UVCS else 0 for n in UVC_NAMES],
            "pte": _ps(self.pte_ns),
            "zero_page": _ps(self.zero_page_ns),
            "fault_page": _ps(self.fault_page_ns),
        }

    def price_ps(self, counts: Mapping[str, int]) -> int:
        """Modelled ps of work given as counts per parameter (``Usage.cost_counts()``); exact."""
        return sum(n * _ps(self.get(param)) for param, n in counts.items() if n)

    def price(self, counts: Mapping[str, int]) -> float:
        """``price_ps`` in seconds."""
        return self.price_ps(counts) / 1e12


# ------------------------------------------------------------------------------------- the fit


@dataclass(frozen=True, slots=True)
class Observation:
    """One measurement to fit: the work a phase did (counts per parameter, as priced by
    ``CostModel.price_ps``) and the seconds it took on the machine being modelled."""

    counts: Mapping[str, int]
    seconds: float
    label: str = ""


@dataclass(frozen=True)
class Fit:
    """The result of ``fit``: the fitted model, the fitted values, and per observation the
    measured and the modelled seconds."""

    model: CostModel
    values: Mapping[str, float]
    residuals: tuple[tuple[str, float, float], ...]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve the square system a x = b (Gaussian elimination with partial pivoting); ValueError
    if it is singular."""
    n = len(b)
    m = [[*row, rhs] for row, rhs in zip(a, b, strict=True)]
    scale = max((abs(v) for row in a for v in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[pivot][col]) <= 1e-12 * scale:
            raise ValueError("singular")
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(n):
            if r != col:
                f = m[r][col] / m[col][col]
                for c in range(col, n + 1):
                    m[r][c] -= f * m[col][c]
    return [m[i][n] / m[i][i] for i in range(n)]


def fit(observations: Sequence[Observation], params: Iterable[str], *, base: CostModel | None = None) -> Fit:
    """Least-squares fit of ``params`` (the others as in ``base``) so the modelled times of the
    observations match the measured ones. Modelled time is linear in the costs, so with as many
    independent observations as parameters the fit is exact. ValueError when the observations
    cannot separate the parameters (e.g. a fixed and a per-page cost from one size) or when the
    fit needs a negative cost."""
    model = base if base is not None else CostModel.default()
    names = list(dict.fromkeys(params))
    if not names:
        raise ValueError("params: name at least one cost parameter to fit")
    for p in names:
        model.get(p)
    if not observations:
        raise ValueError("observations: give at least one measurement")
    rows: list[list[float]] = []
    rhs: list[float] = []
    for obs in observations:
        if not math.isfinite(obs.seconds) or obs.seconds <= 0:
            raise ValueError(f"{obs.label or 'measurement'}: {obs.seconds} is not a positive number of seconds")
        fixed = {p: n for p, n in obs.counts.items() if p not in names}
        rows.append([float(obs.counts.get(p, 0)) for p in names])
        rhs.append(obs.seconds * 1e9 - model.price_ps(fixed) / 1000)  # ns
    for j, p in enumerate(names):
        if not any(row[j] for row in rows):
            raise ValueError(f"{p}: the measured phases do no work this parameter prices, so it cannot be fitted")
    ata = [[sum(r[i] * r[j] for r in rows) for j in range(len(names))] for i in range(len(names))]
    atb = [sum(r[i] * y for r, y in zip(rows, rhs, strict=True)) for i in range(len(names))]
    try:
        x = _solve(ata, atb)
    except ValueError:
        raise ValueError(
            f"the measurements cannot separate {', '.join(names)}: give measurements of "
            f"at least {len(names)} different sizes or phases, or fit fewer parameters"
        ) from None
    values = dict(zip(names, x, strict=True))
    negative = {p: v for p, v in values.items() if v < -1e-9}
    if negative:
        shown = ", ".join(f"{p} = {v:.4g} ns" for p, v in negative.items())
        raise ValueError(f"the fit needs a negative cost ({shown}): the measurements do not fit this model")
    fitted = model.with_values({p: max(0.0, v) for p, v in values.items()}, name=f"fit of {', '.join(names)}")
    residuals = tuple((obs.label, obs.seconds, fitted.price(obs.counts)) for obs in observations)
    return Fit(model=fitted, values=MappingProxyType(values), residuals=residuals)
