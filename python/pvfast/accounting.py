"""Where UV work lands: per emulated thread, per process and per VM.

Every UVC and every kernel walk counts for the *emulated thread* on whose behalf it ran: the pair
(process, Python thread) that entered the emulated kernel. A thread enters the kernel for a
process at its fdget (every call on a VM fd), at close(2) of a VM fd, and when it runs a process's
exit; ``bind`` is called there (mm.py). Walk work done on the UV's worker pools counts for the
thread that issued the walk, with the workers' thread CPU time. Each ``Host`` has one
``Accounting``; ``host.accounting.snapshot()`` is a typed ``AccountingSnapshot``.

A native account also holds its emulated thread's modelled clock (see pvfast.clock): the work
priced by the host's ``CostModel``, plus the waits.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from . import _native
from .costs import PER_PAGE_UVCS, UVC_NAMES, CostModel

if TYPE_CHECKING:
    from .host import Host
    from .mm import File, Process

# What the calling thread is bound to (the File of its last fdget, or the Process of an exit);
# mm._fdget compares it with the file it gets, so the usual call pays one ContextVar read.
_context: ContextVar[object] = ContextVar("pvfast_accounting_context", default=None)
current = _context.get

# Per Python thread: where its next new emulated thread starts its clock (``ps``, clock.inherit
# sets it) and the Accounting it last bound (``accounting``).
_inherited = threading.local()

_EMPTY: Mapping[str, int] = MappingProxyType({})


def _nonzero(values: list[int]) -> Mapping[str, int]:
    return MappingProxyType({n: v for n, v in zip(UVC_NAMES, values, strict=True) if v})


@dataclass(frozen=True, slots=True)
class Usage:
    """UV and kernel work: UVCs issued (by name, non-zero only), pages the UV processed inside a
    UVC, present PTEs kernel walks visited, pages the UV cleared, pages faulted in, kernel walks,
    worker tasks, thread CPU time (caller and pool workers) and modelled work (ps)."""

    uvcs: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    uv_pages: Mapping[str, int] = field(default_factory=lambda: _EMPTY)
    ptes: int = 0
    zeroed: int = 0
    faulted: int = 0
    walks: int = 0
    tasks: int = 0
    cpu_ns: int = 0
    worker_cpu_ns: int = 0
    work_ps: int = 0

    @classmethod
    def from_native(cls, s: _native.AccountSnapshot) -> Usage:
        """The usage of one native account snapshot (counters that are zero are left out)."""
        return cls(
            uvcs=_nonzero(s.uvcs),
            uv_pages=_nonzero(s.uv_pages),
            ptes=s.ptes,
            zeroed=s.zeroed,
            faulted=s.faulted,
            walks=s.walks,
            tasks=s.tasks,
            cpu_ns=s.cpu_ns,
            worker_cpu_ns=s.worker_cpu_ns,
            work_ps=s.work_ps,
        )

    def _combine(self, other: Usage, sign: int) -> Usage:
        def merge(a: Mapping[str, int], b: Mapping[str, int]) -> Mapping[str, int]:
            keys = [n for n in UVC_NAMES if n in a or n in b]
            return MappingProxyType({n: v for n in keys if (v := a.get(n, 0) + sign * b.get(n, 0))})

        return Usage(
            uvcs=merge(self.uvcs, other.uvcs),
            uv_pages=merge(self.uv_pages, other.uv_pages),
            ptes=self.ptes + sign * other.ptes,
            zeroed=self.zeroed + sign * other.zeroed,
            faulted=self.faulted + sign * other.faulted,
            walks=self.walks + sign * other.walks,
            tasks=self.tasks + sign * other.tasks,
            cpu_ns=self.cpu_ns + sign * other.cpu_ns,
            worker_cpu_ns=self.worker_cpu_ns + sign * other.worker_cpu_ns,
            work_ps=self.work_ps + sign * other.work_ps,
        )

    def __add__(self, other: Usage) -> Usage:
        return self._combine(other, 1)

    def __sub__(self, other: Usage) -> Usage:
        return self._combine(other, -1)

    def __bool__(self) -> bool:
        return bool(self.uvcs or self.ptes or self.zeroed or self.faulted or self.walks or self.cpu_ns)

    @property
    def uvc_total(self) -> int:
        """Every UVC issued, whatever its kind."""
        return sum(self.uvcs.values())

    @property
    def cpu_seconds(self) -> float:
        """Host CPU time of the calling threads and their walk workers, in seconds."""
        return self.cpu_ns / 1e9

    @property
    def worker_cpu_seconds(self) -> float:
        """The part of ``cpu_seconds`` spent on the UV's pool workers."""
        return self.worker_cpu_ns / 1e9

    @property
    def model_seconds(self) -> float:
        """Modelled hardware time of this work (the host's cost model; no waits)."""
        return self.work_ps / 1e12

    def cost_counts(self) -> dict[str, int]:
        """The work as counts per cost parameter (``CostModel.price_ps`` prices it)."""
        out = {f"uvc.{n}.fixed_ns": v for n, v in self.uvcs.items()}
        out.update({f"uvc.{n}.per_page_ns": v for n, v in self.uv_pages.items() if n in PER_PAGE_UVCS})
        out.update(pte_ns=self.ptes, zero_page_ns=self.zeroed, fault_page_ns=self.faulted)
        return {k: v for k, v in out.items() if v}

    def model_seconds_with(self, costs: CostModel) -> float:
        """Modelled time of this work under another cost model."""
        return costs.price(self.cost_counts())

    def as_dict(self) -> dict[str, Any]:
        """The usage as JSON-serialisable data."""
        return {
            "uvcs": dict(self.uvcs),
            "uv_pages": dict(self.uv_pages),
            "ptes": self.ptes,
            "zeroed_pages": self.zeroed,
            "faulted_pages": self.faulted,
            "walks": self.walks,
            "worker_tasks": self.tasks,
            "cpu_seconds": self.cpu_seconds,
            "worker_cpu_seconds": self.worker_cpu_seconds,
            "model_seconds": self.model_seconds,
        }


@dataclass(frozen=True, slots=True)
class ThreadUsage:
    """One emulated thread (all Python threads of that name in that process, summed): its work
    and its modelled clock (the latest of them, in ps)."""

    pid: int
    process: str
    thread: str
    usage: Usage
    clock_ps: int

    @property
    def key(self) -> tuple[int, str]:
        """(pid, thread name): how this emulated thread is told apart."""
        return (self.pid, self.thread)

    @property
    def clock_seconds(self) -> float:
        """The thread's modelled clock, in seconds."""
        return self.clock_ps / 1e12

    def as_dict(self) -> dict[str, Any]:
        """The thread's usage as JSON-serialisable data."""
        return {
            "pid": self.pid,
            "process": self.process,
            "thread": self.thread,
            **self.usage.as_dict(),
            "clock_seconds": self.clock_seconds,
        }


@dataclass(frozen=True, slots=True)
class ProcessUsage:
    """One emulated process: its threads and their sum."""

    pid: int
    process: str
    usage: Usage
    threads: tuple[ThreadUsage, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "process": self.process,
            **self.usage.as_dict(),
            "threads": [t.thread for t in self.threads],
        }


@dataclass(frozen=True, slots=True)
class VmUsage:
    """The work done on one VM fd (its calls and its release), whoever did it."""

    vm: str
    pid: int
    usage: Usage

    def as_dict(self) -> dict[str, Any]:
        return {"vm": self.vm, "pid": self.pid, **self.usage.as_dict()}


@dataclass(frozen=True)
class AccountingSnapshot:
    """Counters of every emulated thread and VM of a host at one moment; ``unattributed`` is UV
    work of threads that never entered the emulated kernel (raw native calls). Subtract two
    snapshots for the work in between."""

    threads: tuple[ThreadUsage, ...]
    vms: tuple[VmUsage, ...]
    unattributed: Usage = field(default_factory=Usage)
    #: work of exited processes' threads that were folded together to bound memory in long runs
    #: (``Accounting.RETAIN_DEAD``); counted in ``total``
    retired: Usage = field(default_factory=Usage)

    @property
    def processes(self) -> tuple[ProcessUsage, ...]:
        """The threads' usage summed per process (pid order)."""
        by_pid: dict[int, list[ThreadUsage]] = {}
        for t in self.threads:
            by_pid.setdefault(t.pid, []).append(t)
        out = []
        for pid, threads in by_pid.items():
            total = Usage()
            for t in threads:
                total = total + t.usage
            out.append(ProcessUsage(pid=pid, process=threads[0].process, usage=total, threads=tuple(threads)))
        return tuple(out)

    @property
    def total(self) -> Usage:
        """Everything the host's UV did: every thread, the retired threads and the unattributed work."""
        total = self.unattributed + self.retired
        for t in self.threads:
            total = total + t.usage
        return total

    def thread(self, thread: str, process: str | int | None = None) -> ThreadUsage:
        """The emulated thread named ``thread`` (of the process with that name or pid); KeyError
        if there is none, ValueError if the name is ambiguous without ``process``."""
        found = [t for t in self.threads if t.thread == thread and process in (None, t.pid, t.process)]
        if not found:
            raise KeyError(f"no thread {thread!r}" + (f" in process {process!r}" if process is not None else ""))
        if len(found) > 1:
            raise ValueError(f"thread: {thread!r} is in several processes {[t.process for t in found]}; name one")
        return found[0]

    def process(self, process: str | int) -> ProcessUsage:
        """The process with that pid or name (KeyError if none, ValueError if the name is ambiguous)."""
        found = [p for p in self.processes if process in (p.pid, p.process)]
        if not found:
            raise KeyError(f"no process {process!r}")
        if len(found) > 1:
            raise ValueError(f"process: several processes are named {process!r}; give the pid")
        return found[0]

    def vm(self, name: str) -> VmUsage:
        """The usage of the VM called ``name`` (``Vm.name``); KeyError if it has none."""
        for v in self.vms:
            if v.vm == name:
                return v
        raise KeyError(f"no VM {name!r}")

    def __sub__(self, before: AccountingSnapshot) -> AccountingSnapshot:
        old = {t.key: t for t in before.threads}
        threads = []
        for t in self.threads:
            prev = old.get(t.key)
            usage = t.usage - prev.usage if prev is not None else t.usage
            threads.append(ThreadUsage(t.pid, t.process, t.thread, usage, t.clock_ps))
        old_vms = {(v.pid, v.vm): v for v in before.vms}
        vms = []
        for v in self.vms:
            prev_vm = old_vms.get((v.pid, v.vm))
            vms.append(VmUsage(v.vm, v.pid, v.usage - prev_vm.usage if prev_vm is not None else v.usage))
        # Threads folded into ``retired`` in between: their whole usage moved there, of which
        # ``before`` already had the part it saw.
        retired = self.retired - before.retired
        now = {t.key for t in self.threads}
        for key, t in old.items():
            if key not in now:
                retired = retired - t.usage
        return AccountingSnapshot(tuple(threads), tuple(vms), self.unattributed - before.unattributed, retired)

    def busy(self) -> AccountingSnapshot:
        """Only the threads and VMs that did some work."""
        return AccountingSnapshot(
            tuple(t for t in self.threads if t.usage),
            tuple(v for v in self.vms if v.usage),
            self.unattributed,
            self.retired,
        )

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as JSON-serialisable data: threads, processes, VMs, unattributed work."""
        return {
            "threads": [t.as_dict() for t in self.threads],
            "processes": [p.as_dict() for p in self.processes],
            "vms": [v.as_dict() for v in self.vms],
            "unattributed": self.unattributed.as_dict(),
            "retired": self.retired.as_dict(),
        }


class EmulatedThread:
    """A (process, Python thread) pair and its native account (counters and modelled clock)."""

    __slots__ = ("account", "name", "pid", "process", "process_name", "thread")

    def __init__(self, process: Process, thread: threading.Thread, account: _native.Account) -> None:
        self.process: weakref.ref[Process] = weakref.ref(process)
        self.pid = process.pid
        self.process_name = process.name
        self.thread: weakref.ref[threading.Thread] = weakref.ref(thread)
        self.name = thread.name
        self.account = account

    @property
    def clock_ps(self) -> int:
        return self.account.clock_ps


class Accounting:
    """``host.accounting``: the accounts of one host's emulated threads and VMs.

    The accounts of exited processes and closed VMs stay readable (a snapshot after a shutdown
    shows the helper's work), up to ``RETAIN_DEAD`` threads and as many VMs; beyond that the
    processes that exited first are folded, whole, into the snapshot's ``retired`` usage (a closed
    VM's usage is already in its threads'), so a long run of created-and-exited processes stays
    flat. Folding keeps the modelled clocks: a process's clock is where its exit ended, a Python
    thread's next work starts after everything it did before.
    """

    RETAIN_DEAD = 1024  # dead threads kept (and as many closed VMs)
    PRUNE_EVERY = 256  # new accounts between two prunes (amortises the scan)

    def __init__(self, uv: _native.Ultravisor, costs: CostModel) -> None:
        self._uv = uv
        self.costs = costs
        uv.set_costs(**costs.native_table())
        self._lock = threading.Lock()
        self._all: list[EmulatedThread] = []  # in the order they first entered the kernel
        # Python thread -> its emulated threads of processes that have not exited (by id(et))
        self._by_thread: weakref.WeakKeyDictionary[threading.Thread, dict[int, EmulatedThread]] = (
            weakref.WeakKeyDictionary()
        )
        self._by_process: dict[int, list[EmulatedThread]] = {}  # id(process) -> its emulated threads
        # Python thread -> the account it is bound to now (its clock moves on with joins and waits
        # even after that account's process exited)
        self._bound: weakref.WeakKeyDictionary[threading.Thread, EmulatedThread] = weakref.WeakKeyDictionary()
        # Python thread -> the latest clock of its emulated threads of exited processes
        self._floor: weakref.WeakKeyDictionary[threading.Thread, int] = weakref.WeakKeyDictionary()
        # exited process -> its clock when its exit ended
        self._exit_clock: weakref.WeakKeyDictionary[Process, int] = weakref.WeakKeyDictionary()
        self._dead: list[list[EmulatedThread]] = []  # per exited process, in exit order
        self._retired = Usage()
        self._retired_clock_ps = 0  # the latest clock among the folded accounts
        self._vms: weakref.WeakKeyDictionary[File, tuple[str, int, _native.Account]] = weakref.WeakKeyDictionary()
        self._vm_list: list[tuple[weakref.ref[File], tuple[str, int, _native.Account]]] = []
        self._prune_at = 2 * self.RETAIN_DEAD + self.PRUNE_EVERY

    # -- binding (the slow path of mm._fdget; also close(2) and process exit) --
    def bind(self, process: Process, file: File | None) -> None:
        """The calling thread works for ``process`` (on ``file``, a VM fd, if given) from now on."""
        me = threading.current_thread()
        with self._lock:
            mine = self._by_process.get(id(process), ())
            et = next((e for e in mine if e.thread() is me and e.process() is process), None)
            if et is None:
                et = EmulatedThread(process, me, self._uv.new_account(self._start_ps(process, me)))
                self._all.append(et)
                self._by_thread.setdefault(me, {})[id(et)] = et
                self._by_process.setdefault(id(process), []).append(et)
            self._bound[me] = et
            vm_account = None
            if file is not None:
                entry = self._vms.get(file)
                if entry is None:
                    entry = (str(getattr(file, "name", repr(file))), process.pid, self._uv.new_account())
                    self._vms[file] = entry
                    self._vm_list.append((weakref.ref(file), entry))
                vm_account = entry[2]
            if len(self._all) + len(self._vm_list) > self._prune_at:
                self._prune()
        _native.bind_accounts(et.account, vm_account)
        _context.set(file if file is not None else process)
        _inherited.accounting = self

    def process_exited(self, process: Process) -> None:
        """``process``'s exit is complete: its clock is final (``process_clock_ps`` keeps it), its
        emulated threads stop being scanned for their Python threads' next clocks (a floor per
        Python thread keeps theirs), and it queues for folding once too many are dead."""
        with self._lock:
            mine = [et for et in self._by_process.get(id(process), ()) if et.process() is process]
            self._exit_clock[process] = max([0, *(et.clock_ps for et in mine)])
            for et in mine:
                thread = et.thread()
                if thread is None:
                    continue
                live = self._by_thread.get(thread)
                if live is not None and live.pop(id(et), None) is not None and not live:
                    del self._by_thread[thread]
                self._floor[thread] = max(self._floor.get(thread, 0), et.clock_ps)
            self._dead.append(mine)

    def _prune(self) -> None:
        """Fold the processes that exited first, whole, while more than RETAIN_DEAD of their
        threads are kept, and drop the oldest closed VMs beyond RETAIN_DEAD. Called with the lock
        held, amortised: once per PRUNE_EVERY new accounts. Builds the new state in locals and
        assigns it at the end (an exception in between changes nothing)."""
        fold: list[EmulatedThread] = []
        dead = self._dead
        dead_threads = sum(len(threads) for threads in dead)
        n = 0
        while dead_threads > self.RETAIN_DEAD and n < len(dead):
            fold += dead[n]
            dead_threads -= len(dead[n])
            n += 1
        if fold:
            retired, latest = self._retired, self._retired_clock_ps
            for et in fold:
                retired = retired + Usage.from_native(et.account.snapshot())
                latest = max(latest, et.clock_ps)
            gone = {id(et) for et in fold}
            kept = [et for et in self._all if id(et) not in gone]
            by_process = {}
            for k, v in self._by_process.items():
                left = [et for et in v if id(et) not in gone]
                if left:
                    by_process[k] = left
            self._retired, self._retired_clock_ps = retired, latest
            self._all, self._by_process, self._dead = kept, by_process, dead[n:]
        dead_vms = [i for i, (ref, _) in enumerate(self._vm_list) if (f := ref()) is None or f.closed]
        drop = set(dead_vms[: max(0, len(dead_vms) - self.RETAIN_DEAD)])
        if drop:
            self._vm_list = [v for i, v in enumerate(self._vm_list) if i not in drop]
        self._prune_at = len(self._all) + len(self._vm_list) + self.PRUNE_EVERY

    def _start_ps(self, process: Process, me: threading.Thread) -> int:
        """Where a new emulated thread's clock starts: where ``clock.inherit`` said, else after
        everything its Python thread already did on this host for other processes (program
        order) and no earlier than the process's other threads are now. Each host is a machine of
        its own: its clocks start at 0."""
        inherited: int | None = getattr(_inherited, "ps", None)
        if inherited is not None and getattr(_inherited, "accounting", self) is self:
            _inherited.ps = None
            return inherited
        mine = self._thread_clock(me)
        theirs = self._process_clock(process)
        return max(0 if mine is None else mine, theirs)

    def _thread_clock(self, thread: threading.Thread) -> int | None:
        clocks = [et.clock_ps for et in self._by_thread.get(thread, {}).values()]
        bound = self._bound.get(thread)
        if bound is not None:
            clocks.append(bound.clock_ps)
        floor = self._floor.get(thread)
        if floor is not None:
            clocks.append(floor)
        return max(clocks) if clocks else None

    def _process_clock(self, process: Process) -> int:
        clocks = [et.clock_ps for et in self._by_process.get(id(process), ()) if et.process() is process]
        return max([self._exit_clock.get(process, 0), *clocks])

    # -- clocks --
    def thread_clock_ps(self, thread: threading.Thread) -> int | None:
        """The latest modelled clock of ``thread``'s emulated threads here (None: it has none)."""
        with self._lock:
            return self._thread_clock(thread)

    def process_clock_ps(self, process: Process) -> int:
        """The latest modelled clock of the process's emulated threads (0 if none); for an exited
        process, where its exit ended."""
        with self._lock:
            return self._process_clock(process)

    def latest_clock_ps(self) -> int:
        """The latest modelled clock of any emulated thread of this host, folded ones included."""
        with self._lock:
            return max([self._retired_clock_ps, *(et.clock_ps for et in self._all)])

    def emulated_threads(self, process: Process | None = None) -> list[EmulatedThread]:
        """The emulated threads kept (of ``process``, or of every process; see ``RETAIN_DEAD``)."""
        with self._lock:
            return [et for et in self._all if process is None or et.process() is process]

    # -- counters --
    def snapshot(self) -> AccountingSnapshot:
        """Every emulated thread's and VM's counters now (threads of one name in one process
        summed, in the order they first entered the kernel)."""
        with self._lock:
            threads = list(self._all)
            vms = [entry for _, entry in self._vm_list]
            retired = self._retired
        merged: dict[tuple[int, str], ThreadUsage] = {}
        for et in threads:
            native = et.account.snapshot()
            usage = Usage.from_native(native)
            key = (et.pid, et.name)
            prev = merged.get(key)
            if prev is None:
                merged[key] = ThreadUsage(et.pid, et.process_name, et.name, usage, native.clock_ps)
            else:
                merged[key] = ThreadUsage(
                    et.pid, et.process_name, et.name, prev.usage + usage, max(prev.clock_ps, native.clock_ps)
                )
        vm_usage = tuple(VmUsage(name, pid, Usage.from_native(acct.snapshot())) for name, pid, acct in vms)
        return AccountingSnapshot(
            threads=tuple(merged.values()),
            vms=vm_usage,
            unattributed=Usage.from_native(self._uv.unattributed().snapshot()),
            retired=retired,
        )

    def reset(self) -> None:
        """Zero every usage counter (the modelled clocks stay: they are positions in time)."""
        with self._lock:
            accounts = [et.account for et in self._all] + [entry[2] for _, entry in self._vm_list]
            for acct in [*accounts, self._uv.unattributed()]:
                acct.reset()
            self._retired = Usage()


def current_accounting() -> Accounting | None:
    """The Accounting (host) the calling thread last entered the emulated kernel of."""
    return getattr(_inherited, "accounting", None)


def bind(process: Process, file: File | None) -> None:
    """Make the calling thread's UV work count for ``process`` (and ``file``). mm.py calls it when
    a thread enters the emulated kernel; ``current() is file`` means nothing changed."""
    host: Host = process.host
    host.accounting.bind(process, file)


def process_exited(process: Process) -> None:
    """mm.py calls it when ``process``'s exit is complete (see ``Accounting.process_exited``)."""
    host: Host = process.host
    host.accounting.process_exited(process)


def thread_clock_ps(thread: threading.Thread) -> int | None:
    """The latest modelled clock of ``thread``'s emulated threads on the host the calling thread
    works on (None: none there, or the caller works on none)."""
    acct = current_accounting()
    return acct.thread_clock_ps(thread) if acct is not None else None
