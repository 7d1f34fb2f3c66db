"""Processes and their address space (mm_struct): the protected-VM counter, users, exit order.

The kernel facts (spec §2.2, §4.7, §4.8 C/D): ``mm->context.protected_count`` counts the protected
configurations that may own pages of the mm; at task exit the mm user is dropped *before* the file
descriptors close; the last ``mmput`` runs exit_mmap (mmu notifier release, then per-page destroy or
export of every secure page).
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from . import _native
from ._util import check_int

if TYPE_CHECKING:
    from .host import Host
    from .kvm import Vm


class AddressSpace:
    """An mm_struct: the guest memory mappings of every VM of the processes that share it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.uv = host.uv.native
        self._lock = threading.Lock()
        self.protected_count = 0
        self.users = 1
        self.regions: list[_native.Region] = []
        self.notifiers: list[Vm] = []  # VMs whose mmu notifier is registered on this mm
        self.dead = False
        self.teardown_stats: dict[str, int] = {}

    # -- mm->context.protected_count (atomic in the kernel) --
    def protected_inc(self) -> None:
        with self._lock:
            self.protected_count += 1

    def protected_dec(self) -> None:
        with self._lock:
            self.protected_count -= 1

    def protected_inc_not_zero(self) -> bool:
        with self._lock:
            if self.protected_count == 0:
                return False
            self.protected_count += 1
            return True

    def is_protected(self) -> bool:
        return self.protected_count != 0

    # -- mm_users --
    def mmget(self) -> None:
        with self._lock:
            self.users += 1

    def mmget_not_zero(self) -> bool:
        with self._lock:
            if self.users == 0:
                return False
            self.users += 1
            return True

    def mmput(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self.exit_mmap()

    def exit_mmap(self) -> None:
        """Last user gone: notifier release for every registered VM, then page-table teardown."""
        from .pv import mmu_notifier_release

        for vm in list(self.notifiers):
            mmu_notifier_release(vm)
        self.notifiers.clear()
        destroyed = exported = 0
        if self.is_protected():
            for region in self.regions:
                d, e = self.uv.mm_teardown(region, all_present=True)  # one UVC per present PTE
                destroyed += d
                exported += e
        for region in self.regions:
            self.uv.release_region(region)
        self.regions.clear()
        self.teardown_stats = {"destroyed": destroyed, "exported": exported}
        self.dead = True

    def destroy_range(self, cancel: _native.CancelToken | None) -> bool:
        """s390_uv_destroy_range over the whole address space. Returns False if interrupted."""
        for region in list(self.regions):
            _, _, interrupted, _ = self.uv.destroy_walk(region, 0, None, cancel)
            if interrupted:
                return False
        if cancel is not None and cancel.is_set():
            return False
        return True


class Process:
    """A VMM process: an address space (possibly shared with clone_vm helpers) and VM fds."""

    def __init__(self, host: Host, mm: AddressSpace, name: str, *, helper_of: Process | None = None) -> None:
        self.host = host
        self.mm = mm
        self.name = name
        self.pid = host._new_pid()
        self.alive = True
        self.fatal_signal = _native.CancelToken()
        self._fds: list[Vm] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._exiting = False
        self._exit_with_last_vm = False
        self.helper_of = helper_of
        self.exit_seconds = 0.0  # wall time spent in the last exit()/kill() teardown
        host.processes.append(self)

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} name={self.name!r} alive={self.alive}>"

    # -- in-flight calls, so kill()/exit() can wait for them as the kernel waits for threads --
    def _enter(self) -> None:
        with self._lock:
            if not self.alive or self._exiting:
                raise ValueError(f"process {self.pid} ({self.name}) has exited")
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    def _wait_idle(self) -> None:
        while True:
            with self._lock:
                if self._inflight == 0:
                    return
            time.sleep(0.0005)  # releases the GIL; in-flight calls stop within one walk batch

    # -- public API --
    def create_vm(self, memory_size: int, vcpus: int = 1, *, memory_limit: int | None = None) -> Vm:
        """KVM_CREATE_VM plus one memslot of ``memory_size`` bytes and ``vcpus`` vCPUs."""
        from .kvm import Vm

        check_int("memory_size", memory_size)
        if memory_size <= 0 or memory_size % (1 << 20):
            raise ValueError(f"memory_size: {memory_size} is not a positive multiple of 1 MiB")
        check_int("vcpus", vcpus, bits=16)
        max_cpus = self.host.uv_info["max_guest_cpu_id"] + 1
        if vcpus > max_cpus:
            raise ValueError(f"vcpus: {vcpus} is more than the {max_cpus} the host supports")
        if memory_limit is not None:
            check_int("memory_limit", memory_limit)
            if memory_limit < memory_size:
                raise ValueError(f"memory_limit: {memory_limit} is below memory_size {memory_size}")
        self._enter()
        try:
            vm = Vm(self, memory_size, memory_limit if memory_limit is not None else memory_size)
            self._fds.append(vm)
        finally:
            self._leave()
        for _ in range(vcpus):
            vm.create_vcpu()
        return vm

    def clone_vm(self, name: str | None = None) -> Process:
        """A CLONE_VM helper: shares this address space, holds no fds (QEMU's async-teardown helper)."""
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name: expected str, got {type(name).__name__}")
        self._enter()
        try:
            self.mm.mmget()
            return Process(self.host, self.mm, name or f"cleanup/{self.pid}", helper_of=self)
        finally:
            self._leave()

    @property
    def vms(self) -> list[Vm]:
        return list(self._fds)

    def kill(self) -> None:
        """A fatal signal: interruptible work stops at its next check, then the process exits."""
        self._teardown(signal=True)

    def exit(self) -> None:
        """Process exit in kernel order: stop other threads, drop the mm user, close the fds."""
        self._teardown(signal=True)

    def _teardown(self, *, signal: bool) -> None:
        with self._lock:
            if not self.alive or self._exiting:
                return
            self._exiting = True
        start = time.perf_counter()
        if signal:
            self.fatal_signal.set()
        self._wait_idle()
        self.mm.mmput()  # exit_mm before exit_files
        for vm in list(self._fds):
            vm._release()
        self._fds.clear()
        self.alive = False
        self.exit_seconds = time.perf_counter() - start

    def _vm_closed(self, vm: Vm) -> None:
        if vm in self._fds:
            self._fds.remove(vm)
        if self._exit_with_last_vm and not self._fds and self.alive and not self._exiting:
            self._teardown(signal=False)
