"""The emulated machine: kvm module parameters and KVM_CHECK_EXTENSION (kvm-s390.c), uv_info and
/sys/firmware/uv (arch/s390/kernel/uv.c), the Ultravisor view, kernel memory (allocations and the
leak ledger), and the process registry with its interpreter-exit hook.

The bottom layer above constants/errors: it imports no other pvfast module. Processes are made by
the mm layer, which registers its constructor here (``register_copy_process``), as kernel/fork.c
sits above the machine it runs on.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypedDict

from . import _native, profiles
from ._util import check_bool, check_int
from .constants import (
    BIT_UV_FEAT_AIV,
    BIT_UV_FEAT_MISC,
    BIT_UVC_CMD_DESTROY_SEC_CONF_FAST,
    BIT_UVC_CMD_DUMP_COMPLETE,
    BIT_UVC_CMD_DUMP_CONF_STOR_STATE,
    BIT_UVC_CMD_DUMP_CPU,
    BIT_UVC_CMD_DUMP_INIT,
    PAGE_SIZE,
    UVC_RC_EXECUTED,
    Cap,
    Uvc,
    test_bit_inv,
)
from .racepoints import RacePoint, RacePoints

if TYPE_CHECKING:
    from .kvm import Vm
    from .mm import Process

_SYSFS_ASYNC_DESTROY = "/sys/module/kvm/parameters/async_destroy"

log = logging.getLogger("pvfast.host")


class KernelReport(TypedDict):
    """A report the emulated kernel printed with a stack trace: ``kind`` is "oops" (the kernel
    crashed in that task, e.g. an operation exception) or "kasan" (a memory-safety violation
    KASAN reports), ``function`` where, ``message`` what."""

    kind: str
    function: str
    message: str


class LeakEntry(TypedDict):
    """One resource the kernel leaves to the UV on purpose (a failed destroy UVC): what the
    allocation was for, its address and size, the configuration handle, and ``id()`` of its VM."""

    kind: str
    addr: int
    size: int
    handle: int
    vm: int


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
    """``host.uv``: the emulated Ultravisor, for inspection and fault injection."""

    def __init__(self, native: _native.Ultravisor) -> None:
        self.native = native

    def stats(self) -> dict[str, int]:
        """UVCs issued so far (failed and injected-failure calls count too), by ``Uvc`` name."""
        return self.native.stats()

    def reset_stats(self) -> None:
        self.native.reset_stats()

    def config_handles(self) -> set[int]:
        """Handles of the configurations that exist in the UV now."""
        return self.native.config_handles()

    def secure_pages(self, handle: int | None = None) -> int:
        """Pages the host cannot read in plaintext (secure, shared-secure, orphaned) of ``handle``."""
        if handle is not None:
            check_int("handle", handle, bits=64)
        return self.native.secure_pages(handle)

    def inject_failure(self, uvc: int, rc: int, *, rrc: int = 0, count: int = 1) -> None:
        """Make the next ``count`` executions of ``uvc`` fail (cc 1) with rc/rrc, changing nothing."""
        check_int("uvc", uvc, bits=16)
        try:
            Uvc(uvc)
        except ValueError:
            raise ValueError(f"uvc: unknown UVC command code {uvc:#x}") from None
        check_int("rc", rc, bits=16)
        check_int("rrc", rrc, bits=16)
        check_int("count", count, bits=31)
        if rc == UVC_RC_EXECUTED:
            raise ValueError(f"rc: {UVC_RC_EXECUTED:#06x} means success; an injected failure needs another rc")
        if count < 1:
            raise ValueError("count: must be at least 1")
        self.native.inject_failure(int(uvc), rc, rrc, count)

    def clear_failures(self) -> None:
        self.native.clear_failures()

    def info(self) -> dict[str, Any]:
        return self.native.info()

    def donated_bytes(self) -> int:
        return self.native.donated_bytes()


class Host:
    """One booted machine: a kernel of profile ``kernel`` (``pvfast.profiles.PROFILES``; the
    newest by default) with the kvm module loaded with ``async_destroy``, and a UV with its
    features. ``uv_facility=False`` is a machine without the Ultravisor-call facility (then
    ``prot_virt`` must be False): a UVC the kernel issues there is an operation exception, which
    the emulated kernel reports as an oops (``oopses()``)."""

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
    ) -> None:
        profile = profiles.profile(kernel)
        if isinstance(async_destroy, bool):
            async_destroy = int(async_destroy)
        check_int("async_destroy", async_destroy, bits=32, signed=True)
        for name, value in (
            ("prot_virt", prot_virt),
            ("destroy_fast", destroy_fast),
            ("feature_misc", feature_misc),
            ("feature_aiv", feature_aiv),
            ("dump", dump),
            ("use_gisa", use_gisa),
            ("uv_facility", uv_facility),
        ):
            check_bool(name, value)
        if prot_virt and not uv_facility:
            raise ValueError("uv_facility: a host without the Ultravisor facility cannot boot with prot_virt")
        check_int("walk_threads", walk_threads, bits=16)
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
        self._params: Mapping[str, int] = MappingProxyType({"async_destroy": int(async_destroy)})
        self.async_destroy = int(async_destroy)
        self.prot_virt = bool(prot_virt)
        self.use_gisa = bool(use_gisa)
        info: dict[str, Any] = dict(native.info())
        self.uv_info = info
        inst: tuple[int, ...] = info["inst_calls_list"]
        feat: int = info["uv_feature_indications"]
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
        self.processes: list[Process] = []
        self.ledger: dict[int, LeakEntry] = {}
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
        check_int("cap", cap, bits=64, signed=True)
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
        that exception there (e.g. KeyboardInterrupt, to replay a Ctrl-C at that point).
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
        """A new VMM process with its own address space."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected str, got {type(name).__name__}")
        if _copy_process is None:  # pragma: no cover - pvfast/__init__ imports mm, which registers it
            raise RuntimeError("pvfast.mm is not loaded: no process can be made")
        return _copy_process(self, name)

    def add_process(self, proc: Process) -> None:
        """Enter a new process in the registry (the interpreter-exit hook kills what is alive)."""
        with self._lock:
            self.processes.append(proc)

    def create_vm(self, memory_size: int, vcpus: int = 1) -> Vm:
        """A VM in a new process; the process exits when the VM is closed."""
        proc = self.spawn_process()
        try:
            vm = proc.create_vm(memory_size, vcpus)
        except BaseException:
            proc.exit()
            raise
        proc.exit_with_last_vm = True
        return vm

    def alloc_pid(self) -> int:
        with self._lock:
            self._next_pid += 1
            return self._next_pid

    # -- kernel memory: donations and page tables, so leaks can be accounted --
    def inject_alloc_failure(self, count: int = 1) -> None:
        """Make the next ``count`` kernel allocations of the PV code fail (-ENOMEM paths)."""
        check_int("count", count, bits=31)
        with self._lock:
            self._alloc_failures += count

    def kalloc(self, kind: str, size: int) -> int | None:
        with self._lock:
            if self._alloc_failures:
                self._alloc_failures -= 1
                return None
            addr = self._next_kaddr
            self._next_kaddr += max(size, PAGE_SIZE) + PAGE_SIZE  # a guard page between allocations
            self._kmem[addr] = (kind, size)
            return addr

    def allocated(self, addr: int) -> bool:
        """Whether ``addr`` is a live kernel allocation (not freed yet)."""
        with self._lock:
            return addr in self._kmem

    def kfree(self, addr: int) -> None:
        if addr:
            with self._lock:
                self._kmem.pop(addr, None)
                self.ledger.pop(addr, None)

    def leak(self, addr: int, vm: object | None, handle: int = 0) -> None:
        """Record a resource the kernel leaves to the UV because a destroy UVC failed."""
        if not addr:
            return
        with self._lock:
            kind, size = self._kmem.get(addr, ("unknown", 0))
            self.ledger[addr] = LeakEntry(kind=kind, addr=addr, size=size, handle=handle, vm=id(vm) if vm else 0)

    def leaked(self) -> list[LeakEntry]:
        """Every resource currently on the leak ledger (all VMs of this host)."""
        with self._lock:
            return list(self.ledger.values())

    def kernel_memory(self) -> int:
        """Bytes of kernel memory (donations, SIDA pages, top tables) currently allocated."""
        with self._lock:
            return sum(size for _, size in self._kmem.values())
