"""The emulated machine: kvm module parameters and KVM_CHECK_EXTENSION (kvm-s390.c), uv_info and
/sys/firmware/uv (arch/s390/kernel/uv.c), the Ultravisor view, kernel memory (allocations and the
leak ledger), and the process registry with its interpreter-exit hook.

The bottom layer above constants/errors: it imports no other pvfast module. Processes are made by
the mm layer, which registers its constructor here (``register_copy_process``), as kernel/fork.c
sits above the machine it runs on.
"""

from __future__ import annotations

import atexit
import collections
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypedDict

from . import _native, profiles
from ._util import check_bool, check_int
from .accounting import Accounting
from .constants import (
    BIT_UV_FEAT_AIV,
    BIT_UV_FEAT_MISC,
    BIT_UVC_CMD_DESTROY_SEC_CONF_FAST,
    BIT_UVC_CMD_DUMP_COMPLETE,
    BIT_UVC_CMD_DUMP_CONF_STOR_STATE,
    BIT_UVC_CMD_DUMP_CPU,
    BIT_UVC_CMD_DUMP_INIT,
    MAX_GUEST_MEMORY,
    PAGE_SIZE,
    SZ_1M,
    UVC_RC_EXECUTED,
    Cap,
    Uvc,
    test_bit_inv,
)
from .costs import CostModel
from .racepoints import RacePoint, RacePoints

if TYPE_CHECKING:
    from .kvm import Vm
    from .mm import Process

_SYSFS_ASYNC_DESTROY = "/sys/module/kvm/parameters/async_destroy"

log = logging.getLogger("pvfast.host")

#: ``Host(guest_memory=...)``: "real" (every touched page is host memory) or "state" (a page
#: costs only its state word until it holds data; see docs/PERFORMANCE.md).
GUEST_MEMORY_MODES = ("real", "state")


class UvInfo(TypedDict):
    """``host.uv.info()``: the Ultravisor's Query Ultravisor Information (UVC 0x0001), as the kernel
    keeps it in ``struct uv_info`` (arch/s390/include/asm/uv.h) and shows it in /sys/firmware/uv.

    ``inst_calls_list``: four 64-bit words of installed-call bits, numbered from the most significant
    bit (bit 23: Destroy-Fast, bits 24-27: the dump calls); ``uv_feature_indications``: feature bits,
    same numbering (bit 0: MISC, bit 1: AIV); ``guest_base_stor_len``, ``guest_virt_base_stor_len``,
    ``guest_virt_var_stor_len`` (per MiB of guest memory) and ``guest_cpu_stor_len``: the storage a
    configuration and a secure CPU take from the host, in bytes; ``uv_base_stor_len``: what Init UV
    took from the host for the UV itself; ``max_guest_cpu_id``,
    ``max_num_sec_conf``, ``max_sec_stor_addr``: the limits; ``conf_dump_storage_state_len`` (per MiB)
    and ``conf_dump_finalize_len``: the sizes of the dump data.
    """

    inst_calls_list: tuple[int, int, int, int]
    uv_feature_indications: int
    guest_base_stor_len: int
    guest_virt_base_stor_len: int
    guest_virt_var_stor_len: int
    guest_cpu_stor_len: int
    uv_base_stor_len: int
    max_guest_cpu_id: int
    max_num_sec_conf: int
    max_sec_stor_addr: int
    conf_dump_storage_state_len: int
    conf_dump_finalize_len: int


def _uv_info(native: _native.Ultravisor) -> UvInfo:
    raw = native.info()
    words = raw["inst_calls_list"]
    if not isinstance(words, tuple) or len(words) != 4:  # pragma: no cover - the native side's shape
        raise RuntimeError(f"uv_info: inst_calls_list is {words!r}, expected four words")

    def num(key: str) -> int:
        value = raw[key]
        if not isinstance(value, int):  # pragma: no cover - the native side's shape
            raise RuntimeError(f"uv_info: {key} is {value!r}, expected an int")
        return value

    return UvInfo(
        inst_calls_list=(words[0], words[1], words[2], words[3]),
        uv_feature_indications=num("uv_feature_indications"),
        guest_base_stor_len=num("guest_base_stor_len"),
        guest_virt_base_stor_len=num("guest_virt_base_stor_len"),
        uv_base_stor_len=num("uv_base_stor_len"),
        guest_virt_var_stor_len=num("guest_virt_var_stor_len"),
        guest_cpu_stor_len=num("guest_cpu_stor_len"),
        max_guest_cpu_id=num("max_guest_cpu_id"),
        max_num_sec_conf=num("max_num_sec_conf"),
        max_sec_stor_addr=num("max_sec_stor_addr"),
        conf_dump_storage_state_len=num("conf_dump_storage_state_len"),
        conf_dump_finalize_len=num("conf_dump_finalize_len"),
    )


@dataclass(frozen=True, slots=True)
class KernelWarning:
    """One kernel WARN, as ``host.warnings()`` lists them (also logged on ``pvfast.kvm_uv``).

    The kernel warns (WARN_ONCE, in arch/s390/kvm/pv.c) when a destroy UV call fails and it has
    to leave memory to the UV: ``function`` is the kernel function that warned (for example
    ``"kvm_s390_pv_deinit_vm"``), ``message`` the text, ``vm`` the VM's name (``Vm.name``),
    ``handle`` the secure CPU's or configuration's handle, ``rc``/``rrc`` the failed call's codes.
    """

    function: str
    message: str
    vm: str
    handle: int
    rc: int
    rrc: int


#: ``host.warnings()`` keeps the latest this many warnings.
MAX_WARNINGS = 10_000


class KernelReport(TypedDict):
    """A report the emulated kernel printed with a stack trace: ``kind`` is "oops" (the kernel
    crashed in that task, e.g. an operation exception) or "kasan" (a memory-safety violation
    KASAN reports), ``function`` where, ``message`` what."""

    kind: str
    function: str
    message: str


class LeakEntry(TypedDict):
    """One resource the kernel leaves to the UV on purpose (a failed destroy UVC): ``kind``, what
    the allocation was for (see ``Host.kernel_allocations``); ``addr`` and ``size``, where it is
    and how big; ``handle``, the secure CPU's or configuration's handle; ``vm``, ``id()`` of its VM."""

    kind: str
    addr: int
    size: int
    handle: int
    vm: int


def check_vm_args(host: Host, memory_size: object, vcpus: object, memory_limit: object) -> tuple[int, int, int]:
    """The arguments of ``create_vm`` checked (TypeError/ValueError naming the argument) before
    anything is created: (memory_size, vcpus, memory_limit), the limit defaulting to the size."""
    size = check_int("memory_size", memory_size)
    if size <= 0 or size % SZ_1M:
        raise ValueError(f"memory_size: {size} is not a positive multiple of 1 MiB")
    if size > MAX_GUEST_MEMORY:
        raise ValueError(f"memory_size: {size:#x} is more than the {MAX_GUEST_MEMORY >> 40} TiB one VM can have")
    cpus = check_int("vcpus", vcpus, bits=16)
    max_cpus = host.uv_info["max_guest_cpu_id"] + 1
    if cpus > max_cpus:
        raise ValueError(f"vcpus: {cpus} is more than the {max_cpus} the host supports")
    if memory_limit is None:
        return size, cpus, size
    limit = check_int("memory_limit", memory_limit)
    if limit < size:
        raise ValueError(f"memory_limit: {limit} is below memory_size {size}")
    return size, cpus, limit


# -- the process registry's constructor and the interpreter-exit hook ----------------------

_copy_process: Callable[[Host, str], Process] | None = None
_hosts: weakref.WeakSet[Host] = weakref.WeakSet()


def register_copy_process(make: Callable[[Host, str], Process]) -> None:
    """Install how ``Host.spawn_process`` makes a process with a fresh address space (mm.py does
    this when it is imported, so the host layer never imports the layers above it)."""
    global _copy_process
    _copy_process = make


@atexit.register
def _shutdown_all() -> None:
    """Interpreter exit: every live process gets a fatal signal and exits, so in-flight PERFORM
    walks stop within a batch, their records go to need_cleanup, and teardown cleans everything."""
    for host in list(_hosts):
        for proc in list(host.processes):
            if proc.alive:
                try:
                    proc.kill()
                except Exception:  # best effort at interpreter exit: log and go on with the others
                    log.exception("teardown of process %s at interpreter exit failed", proc.pid)


class UltravisorView:
    """``host.uv``: the emulated Ultravisor, for inspection and fault injection. ``native`` is the
    Rust Ultravisor itself (``pvfast._native.Ultravisor``), for what this view does not wrap."""

    def __init__(self, native: _native.Ultravisor) -> None:
        self.native = native

    def stats(self) -> dict[str, int]:
        """UVCs issued so far (failed and injected-failure calls count too), by ``Uvc`` name."""
        return self.native.stats()

    def reset_stats(self) -> None:
        """Set every counter of ``stats()`` back to zero."""
        self.native.reset_stats()

    def config_handles(self) -> set[int]:
        """Handles of the configurations that exist in the UV now."""
        return self.native.config_handles()

    def secure_pages(self, handle: int | None = None) -> int:
        """Pages the host cannot read in plaintext (secure, shared-secure, orphaned) of ``handle``."""
        if handle is not None:
            handle = check_int("handle", handle, bits=64)
        return self.native.secure_pages(handle)

    def inject_failure(self, uvc: int, rc: int, *, rrc: int = 0, count: int = 1) -> None:
        """Make the next ``count`` executions of ``uvc`` fail (cc 1) with rc/rrc, changing nothing."""
        uvc = check_int("uvc", uvc, bits=16)
        try:
            Uvc(uvc)
        except ValueError:
            raise ValueError(f"uvc: unknown UVC command code {uvc:#x}") from None
        rc = check_int("rc", rc, bits=16)
        rrc = check_int("rrc", rrc, bits=16)
        count = check_int("count", count, bits=31)
        if rc == UVC_RC_EXECUTED:
            raise ValueError(f"rc: {UVC_RC_EXECUTED:#06x} means success; an injected failure needs another rc")
        if count < 1:
            raise ValueError("count: must be at least 1")
        self.native.inject_failure(uvc, rc, rrc, count)

    def clear_failures(self) -> None:
        """Drop every injected failure that has not fired yet."""
        self.native.clear_failures()

    def info(self) -> UvInfo:
        """The Ultravisor's query data (a fresh copy each call); see ``UvInfo`` for the fields."""
        return _uv_info(self.native)

    def donated_bytes(self) -> int:
        """Bytes of host storage donated to the UV now: configurations' base and variable storage
        and secure CPUs' storage (leaked donations included: the UV still has them)."""
        return self.native.donated_bytes()


class Host:
    """One booted machine: a kernel of profile ``kernel`` (``pvfast.profiles.PROFILES``; the
    newest by default) with the kvm module loaded with ``async_destroy``, and a UV with its
    features.

    The keywords are load-time settings (read-only afterwards): the kvm module parameter
    ``async_destroy``, whether the host booted with PV support (``prot_virt``), the UV's
    Destroy-Fast call, MISC and AIV features and dump calls, KVM's ``use_gisa``, and
    ``walk_threads`` (worker threads of the native page walks; 0: one per CPU).
    ``guest_memory``: ``"real"`` (every page a guest touches is host memory) or ``"state"`` (a
    touched page costs only its 4-byte state until it holds data; for guests of many TiB).
    ``costs``: the ``CostModel`` of the modelled clock (None: the documented defaults).
    ``uv_facility=False`` is a machine without the Ultravisor-call facility (then ``prot_virt``
    must be False): a UVC the kernel issues there is an operation exception, which the emulated
    kernel reports as an oops (``oopses()``).

    Attributes: ``kernel`` (the profile's name), ``profile`` (its precomputed deltas), ``uv``
    (UltravisorView), ``uv_info`` (UvInfo, as QUI reported it at boot), ``processes`` (the live
    processes of this host), ``async_destroy``, ``prot_virt``, ``use_gisa``,
    ``destroy_fast_available``, ``feature_misc``, ``feature_aiv``, ``dump_available``,
    ``accounting`` (where the UV work landed, per emulated thread, process and VM), ``race``
    (the race points).
    """

    def __init__(
        self,
        *,
        kernel: str = profiles.DEFAULT,
        async_destroy: int = 1,
        prot_virt: bool = True,
        destroy_fast: bool = True,
        feature_misc: bool = True,
        feature_aiv: bool = True,
        dump: bool = True,
        use_gisa: bool = True,
        uv_facility: bool = True,
        walk_threads: int = 0,
        guest_memory: str = "real",
        costs: CostModel | None = None,
    ) -> None:
        profile = profiles.profile(kernel)
        if isinstance(async_destroy, bool):
            async_destroy = int(async_destroy)
        async_destroy = check_int("async_destroy", async_destroy, bits=32, signed=True)
        prot_virt = check_bool("prot_virt", prot_virt)
        destroy_fast = check_bool("destroy_fast", destroy_fast)
        feature_misc = check_bool("feature_misc", feature_misc)
        feature_aiv = check_bool("feature_aiv", feature_aiv)
        dump = check_bool("dump", dump)
        use_gisa = check_bool("use_gisa", use_gisa)
        uv_facility = check_bool("uv_facility", uv_facility)
        if prot_virt and not uv_facility:
            raise ValueError("uv_facility: a host without the Ultravisor facility cannot boot with prot_virt")
        walk_threads = check_int("walk_threads", walk_threads, bits=16)
        if not isinstance(guest_memory, str):
            raise TypeError(f"guest_memory: expected str, got {type(guest_memory).__name__}")
        if guest_memory not in GUEST_MEMORY_MODES:
            raise ValueError(f"guest_memory: expected one of {', '.join(GUEST_MEMORY_MODES)}, got {guest_memory!r}")
        if costs is None:
            costs = CostModel.default()
        elif not isinstance(costs, CostModel):
            raise TypeError(f"costs: expected CostModel or None, got {type(costs).__name__}")
        native = _native.Ultravisor(
            destroy_fast=bool(destroy_fast),
            feature_misc=bool(feature_misc),
            feature_aiv=bool(feature_aiv),
            dump=bool(dump),
            threads=walk_threads,
        )
        object.__setattr__(self, "_frozen", False)
        self.profile = profile
        self.kernel = profile.name
        self.uv_facility = bool(uv_facility)
        self.uv = UltravisorView(native)
        self.guest_memory = guest_memory  # how guest memory is backed: "real" pages or "state" words only
        self.costs = costs  # the cost model of the modelled clock
        self.accounting = Accounting(native, costs)  # where the UV work lands, per thread/process/VM
        self._params: Mapping[str, int] = MappingProxyType({"async_destroy": int(async_destroy)})
        self.async_destroy = int(async_destroy)
        self.prot_virt = bool(prot_virt)
        self.use_gisa = bool(use_gisa)
        info = _uv_info(native)
        self.uv_info = info
        inst = info["inst_calls_list"]
        feat = info["uv_feature_indications"]
        self.destroy_fast_available = test_bit_inv(BIT_UVC_CMD_DESTROY_SEC_CONF_FAST, inst)
        self.feature_misc = test_bit_inv(BIT_UV_FEAT_MISC, feat)
        self.feature_aiv = test_bit_inv(BIT_UV_FEAT_AIV, feat)
        self.dump_available = all(
            test_bit_inv(b, inst)
            for b in (
                BIT_UVC_CMD_DUMP_INIT,
                BIT_UVC_CMD_DUMP_CONF_STOR_STATE,
                BIT_UVC_CMD_DUMP_CPU,
                BIT_UVC_CMD_DUMP_COMPLETE,
            )
        )
        self._lock = threading.Lock()
        self._next_pid = 1000
        self._next_kaddr = 0x1_0000_0000
        self._kmem: dict[int, tuple[str, int]] = {}
        self._alloc_failures = 0
        self._warnings: collections.deque[KernelWarning] = collections.deque(maxlen=MAX_WARNINGS)
        self.processes: list[Process] = []
        self._ledger: dict[int, LeakEntry] = {}
        self.race = RacePoints()
        self._reports: list[KernelReport] = []
        self._races: list[dict[str, Any]] = []
        self._warned: set[str] = set()
        object.__setattr__(self, "_frozen", True)
        _hosts.add(self)

    # -- module parameters (0444: read-only after load) --
    @property
    def module_params(self) -> Mapping[str, int]:
        """The kvm module parameters as sysfs shows them; read-only after load (0444)."""
        return self._params

    @module_params.setter
    def module_params(self, value: object) -> None:
        raise PermissionError("kvm module parameters are 0444: set them when creating the Host")

    def __setattr__(self, name: str, value: object) -> None:
        if name in ("async_destroy", "prot_virt", "kernel", "profile") and getattr(self, "_frozen", False):
            raise PermissionError(f"{name} is a load-time setting of the emulated host")
        object.__setattr__(self, name, value)

    def read_sysfs(self, path: str) -> str:
        """The text the kernel shows in a sysfs file this emulation knows."""
        if not isinstance(path, str):
            raise TypeError(f"path: expected str, got {type(path).__name__}")
        files = self._sysfs()
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory", path)
        return files[path]

    def sysfs_paths(self) -> list[str]:
        """The sysfs files ``read_sysfs`` knows on this host, sorted."""
        return sorted(self._sysfs())

    def _sysfs(self) -> dict[str, str]:
        info = self.uv_info
        files = {
            _SYSFS_ASYNC_DESTROY: f"{self.async_destroy}\n",
            "/sys/firmware/uv/prot_virt_host": f"{int(self.prot_virt)}\n",
        }
        if self.prot_virt:
            q = "/sys/firmware/uv/query/"
            files[q + "facilities"] = "".join(f"{w:x}\n" for w in info["inst_calls_list"])
            files[q + "feature_indications"] = f"{info['uv_feature_indications']:x}\n"
            files[q + "max_cpus"] = f"{info['max_guest_cpu_id'] + 1}\n"
            files[q + "max_guests"] = f"{info['max_num_sec_conf']}\n"
            files[q + "max_address"] = f"{info['max_sec_stor_addr']:x}\n"
        return files

    # -- KVM_CHECK_EXTENSION on the system fd --
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 180 → prot_virt, 217 → prot_virt and dump UVCs, 224 → async_destroy && prot_virt."""
        cap = check_int("cap", cap, bits=64, signed=True)
        if cap == Cap.S390_PROTECTED:
            return int(self.prot_virt)
        if cap == Cap.S390_PROTECTED_DUMP:
            return int(self.prot_virt and self.dump_available)
        if cap == Cap.S390_PROTECTED_ASYNC_DISABLE:
            return int(bool(self.async_destroy) and self.prot_virt)
        return 0

    # -- what the kernel prints with a stack trace --
    def report(self, kind: str, function: str, message: str) -> None:
        """The emulated kernel hit an oops or a KASAN report (logged at ERROR on pvfast.host)."""
        with self._lock:
            self._reports.append(KernelReport(kind=kind, function=function, message=message))
        label = "BUG: KASAN" if kind == "kasan" else "Oops"
        log.error("%s in %s: %s (kernel %s)", label, function, message, self.kernel)

    def oopses(self) -> list[KernelReport]:
        """Every oops and KASAN report of this host so far (a real kernel would have crashed the
        task, or printed a memory-corruption report); empty on a healthy run."""
        with self._lock:
            return list(self._reports)

    def note_race(self, race: str, function: str, vm: object, handle: int, leaked: list[int]) -> None:
        """A known kernel race happened (docs/KERNEL.md): which, where it showed, the VM
        (``id()``), the configuration handle, and the kernel addresses it left on the ledger."""
        with self._lock:
            self._races.append({"race": race, "function": function, "vm": id(vm), "handle": handle, "leaked": leaked})

    def races(self) -> list[dict[str, Any]]:
        """The known kernel races that happened on this host, each with what it left behind.
        (The kernel itself only WARNs; pvfast keeps the record so tests can tell that residue
        from a leak of their own.)"""
        with self._lock:
            return [dict(r, leaked=list(r["leaked"])) for r in self._races]

    def warn_once(self, site: str, message: str) -> None:
        """WARN_ONCE at ``site`` (a kernel function): logged at WARNING the first time only."""
        with self._lock:
            if site in self._warned:
                return
            self._warned.add(site)
        log.warning("WARNING: at %s: %s", site, message)

    # -- deterministic interleaving --
    def race_point(
        self,
        name: str,
        *,
        vm: object | None = None,
        process: object | None = None,
        pause: bool = True,
        count: int | None = 1,
        timeout: float = 10.0,
        action: Callable[[dict[str, Any]], object] | None = None,
        raises: type[BaseException] | BaseException | None = None,
    ) -> RacePoint:
        """Arm the race point ``name`` (``pvfast.racepoints.POINTS`` lists them and where they are).

        A thread of this host that reaches it (only for that ``vm`` / ``process`` if given)
        pauses there, holding what the kernel holds at that place, until ``release()``; the
        first ``count`` hits pause (None: all), later ones pass. ``pause=False`` only records
        hits. ``action(context)`` runs in that thread when it goes on; ``raises`` makes it raise
        that exception there (e.g. KeyboardInterrupt, to replay a Ctrl-C at that point), with
        the kernel's rule for interrupts: a step the kernel does not interrupt (ENABLE,
        DISABLE, PREPARE, cleanup-all, exit) completes first and the exception comes out when it
        returns; PERFORM's walk unwinds as a fatal signal (docs/KERNEL.md).
        ``wait()`` returns the next hit's context. Every wait gives up after ``timeout``
        seconds with ``RaceTimeout`` (a paused thread that is never released goes on by itself
        and the point's ``close()`` / ``with`` exit raises it). Use as a context manager::

            with host.race_point("perform_claimed", vm=vm) as point:
                t = threading.Thread(target=vm.pv_command, args=(PvCmd.ASYNC_CLEANUP_PERFORM,))
                t.start()
                point.wait()      # PERFORM holds the record and has not walked yet
                ...               # whatever must happen in that window
                point.release()
            t.join()
        """
        match = {k: v for k, v in (("vm", vm), ("process", process)) if v is not None}
        return self.race.arm(name, pause=pause, count=count, timeout=timeout, action=action, raises=raises, **match)

    # -- processes --
    def spawn_process(self, name: str = "qemu") -> Process:
        """A new VMM process named ``name`` with its own address space and no VM yet (fork+exec
        of a VMM). ``host.create_vm`` is the shortcut for a process with one VM."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected str, got {type(name).__name__}")
        if _copy_process is None:  # pragma: no cover - pvfast/__init__ imports mm, which registers it
            raise RuntimeError("pvfast.mm is not loaded: no process can be made")
        return _copy_process(self, name)

    def _add_process(self, proc: Process) -> None:
        """Enter a new process in the registry (the interpreter-exit hook kills what is alive)."""
        with self._lock:
            self.processes.append(proc)

    def _remove_process(self, proc: Process) -> None:
        """release_task: a process that has exited leaves the registry (``processes`` lists the
        processes alive or still exiting; a dead one is kept only by whoever holds it)."""
        with self._lock:
            if proc in self.processes:
                self.processes.remove(proc)

    def create_vm(self, memory_size: int, vcpus: int = 1) -> Vm:
        """A VM in a new process; the process exits when the VM is closed."""
        memory_size, vcpus, _ = check_vm_args(self, memory_size, vcpus, None)
        proc = self.spawn_process()
        try:
            vm = proc.create_vm(memory_size, vcpus)
        except BaseException:
            proc.exit()
            raise
        proc.exit_with_last_vm = True
        return vm

    def _alloc_pid(self) -> int:
        with self._lock:
            self._next_pid += 1
            return self._next_pid

    # -- kernel memory: donations and page tables, so leaks can be accounted --
    def inject_alloc_failure(self, count: int = 1) -> None:
        """Make the next ``count`` kernel allocations of the PV code fail (-ENOMEM paths)."""
        count = check_int("count", count, bits=31)
        with self._lock:
            self._alloc_failures += count

    def _kalloc(self, kind: str, size: int) -> int | None:
        with self._lock:
            if self._alloc_failures:
                self._alloc_failures -= 1
                return None
            return self._kalloc_locked(kind, size)

    def _kalloc_nofail(self, kind: str, size: int) -> int:
        """An allocation outside the PV code (KVM_CREATE_VM's gmap and SCA): injected failures are
        for the PV paths and are left for them."""
        with self._lock:
            return self._kalloc_locked(kind, size)

    def _kalloc_locked(self, kind: str, size: int) -> int:
        addr = self._next_kaddr
        self._next_kaddr += max(size, PAGE_SIZE) + PAGE_SIZE  # a guard page between allocations
        self._kmem[addr] = (kind, size)
        return addr

    def allocated(self, addr: int) -> bool:
        """Whether ``addr`` is a live kernel allocation (not freed yet)."""
        with self._lock:
            return addr in self._kmem

    def _kfree(self, addr: int) -> None:
        if addr:
            with self._lock:
                self._kmem.pop(addr, None)
                self._ledger.pop(addr, None)

    def _leak(self, addr: int, vm: object | None, handle: int = 0) -> None:
        """Record a resource the kernel leaves to the UV because a destroy UVC failed."""
        if not addr:
            return
        with self._lock:
            kind, size = self._kmem.get(addr, ("unknown", 0))
            self._ledger[addr] = LeakEntry(kind=kind, addr=addr, size=size, handle=handle, vm=id(vm) if vm else 0)

    def leaked(self) -> list[LeakEntry]:
        """Every resource currently on the leak ledger (all VMs of this host), as copies."""
        with self._lock:
            return [entry.copy() for entry in self._ledger.values()]

    def kernel_memory(self) -> int:
        """Bytes of kernel memory (donations, SIDA pages, top tables) currently allocated."""
        with self._lock:
            return sum(size for _, size in self._kmem.values())

    def kernel_allocations(self) -> dict[str, tuple[int, int]]:
        """The kernel memory allocated now, by what it is for: ``{kind: (count, bytes)}``.

        Kinds: ``crst`` (a gmap's top-level table), ``sca``, ``stor_base``/``stor_var`` (a
        configuration's donations), ``cpu_stor`` (a secure CPU's), ``sida``, ``aside_record``.
        """
        out: dict[str, tuple[int, int]] = {}
        with self._lock:
            for kind, size in self._kmem.values():
                count, total = out.get(kind, (0, 0))
                out[kind] = (count + 1, total + size)
        return out

    # -- kernel WARNs --
    def warnings(self) -> list[KernelWarning]:
        """The kernel WARNs issued on this host so far (the latest MAX_WARNINGS), oldest first."""
        with self._lock:
            return list(self._warnings)

    def clear_warnings(self) -> None:
        """Forget the warnings recorded so far."""
        with self._lock:
            self._warnings.clear()

    def _warn(self, warning: KernelWarning) -> None:
        with self._lock:
            self._warnings.append(warning)
