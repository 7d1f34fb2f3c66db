"""Processes, their address space and their files (kernel/fork.c, kernel/exit.c, mm/mmap.c,
mm/mmu_notifier.c, fs/file.c), below everything KVM-specific.

Kernel facts this mirrors: ``mm->context.protected_count`` counts the protected configurations
that may own pages of the mm; at exit the mm user is dropped *before* the files close (exit_mm
before exit_files); the last ``mmput`` runs exit_mmap, which calls every mmu notifier's release
callback and then destroys (or exports) every present page. A call on a file holds a reference
(fdget/fput); after close(2) the file's release runs when the last reference goes.

This layer never calls KVM code directly: KVM registers a release callback (``MmuNotifier``, like
``kvm_s390_pv_mmu_notifier_ops``), its files implement ``File._release``, and kvm.py registers the
KVM_CREATE_VM entry ``Process.create_vm`` uses (``register_kvm_create_vm``).
"""

from __future__ import annotations

import abc
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _native
from ._util import check_int
from .accounting import bind as _bind_account
from .accounting import current as _accounting_context
from .accounting import process_exited as _account_exited
from .clock import join_process
from .errors import EINTR, ENOMEM, ClosedFdError
from .host import check_vm_args, register_copy_process
from .interrupts import ENTRY_CODES, Uninterruptible, keep_or_raise, native, on_stack

if TYPE_CHECKING:
    from .gmap import Gmap
    from .host import Host
    from .kvm import Vm

# Pages per step of the stepped walk: one summary chunk (2 MiB), so each native call runs on the
# calling thread and does at most one batch.
_STEP_PAGES = 512

# Signals whose default action does not end the process (ignore, stop, continue): not fatal.
_NOT_FATAL = frozenset(
    {
        signal.SIGCHLD,
        signal.SIGCONT,
        signal.SIGSTOP,
        signal.SIGTSTP,
        signal.SIGTTIN,
        signal.SIGTTOU,
        signal.SIGURG,
        signal.SIGWINCH,
    }
)

_kvm_create_vm: Callable[[Process, int, int], Vm] | None = None


def register_kvm_create_vm(create: Callable[[Process, int, int], Vm]) -> None:
    """Install the KVM_CREATE_VM entry (``create(process, memory_size, memory_limit)``); kvm.py
    does this when it is imported, as the kvm module registers /dev/kvm when it loads."""
    global _kvm_create_vm
    _kvm_create_vm = create


class MmuNotifier:
    """struct mmu_notifier with its one op: ``release(mm)`` runs once, when the last user of the mm
    goes (exit_mmap) or when the subscription is unregistered while the mm still lives.
    ``grabbed``: registration succeeded and took its mm_count reference (mmgrab), which
    unregistering drops again (mmdrop)."""

    __slots__ = ("grabbed", "release")

    def __init__(self, release: Callable[[AddressSpace], None]) -> None:
        self.release = release
        self.grabbed = False


class AddressSpace:
    """An mm_struct: the guest memory mappings of every VM of the processes that share it.

    For inspection: ``protected_count`` (``mm->context.protected_count``), ``users``
    (``mm_users``: the process and its CLONE_VM helpers), ``regions`` (one per VM's memory),
    ``dead`` (torn down), ``teardown_stats`` (pages destroyed and exported by the teardown).
    """

    def __init__(self, host: Host) -> None:
        self.host = host
        self.uv = host.uv.native
        self._lock = threading.Lock()
        self.protected_count = 0
        self.users = 1
        self.regions: list[_native.Region] = []
        self._notifiers: list[MmuNotifier] = []
        self.gmaps: list[Gmap] = []  # the guest address spaces of this mm (gmap_create .. gmap_remove)
        self.dead = False
        self.teardown_stats: dict[str, int] = {}

    # -- mm->context.protected_count (atomic in the kernel) --
    def _protected_inc(self) -> None:
        with self._lock:
            self.protected_count += 1

    def _protected_dec(self) -> None:
        with self._lock:
            self.protected_count -= 1

    def _protected_inc_not_zero(self) -> bool:
        with self._lock:
            if self.protected_count == 0:
                return False
            self.protected_count += 1
            return True

    def is_protected(self) -> bool:
        """mm_is_protected: a protected configuration may still own pages of this address space."""
        return self.protected_count != 0

    # -- mappings --
    def _mmap(self, size: int) -> _native.Region:
        """An anonymous mapping of ``size`` bytes (guest memory of one VM), torn down with the mm."""
        try:
            region = self.uv.create_region(size, guest_memory=self.host.guest_memory)
        except OSError as err:  # the machine cannot reserve that much address space
            code = err.errno or ENOMEM
            why = f"memory_size: cannot reserve {size:#x} bytes of guest memory: {os.strerror(code)}"
            raise OSError(code, why) from err

        with self._lock:
            self.regions.append(region)
        return region

    # -- mmu notifiers --
    def _mmu_notifier_register(self, subscription: MmuNotifier, *, signal_pending: bool = False) -> int:
        """__mmu_notifier_register: mm_take_all_locks first, which gives up with -EINTR when the
        registering task has a signal pending; on success mmgrab and link. Returns 0 or -errno."""
        if signal_pending:
            return -EINTR
        with self._lock:
            self._notifiers.append(subscription)
            subscription.grabbed = True
        return 0

    def _mmu_notifier_unregister(self, subscription: MmuNotifier) -> None:
        """Unregister; a subscription still registered on a live mm gets its release call now.
        The mm_count reference registration took is dropped whatever happened: for a
        subscription that was never registered that mmdrop has no mmgrab to match, and the mm is
        freed while it is still in use (the bug "Fix incorrect usage of mmu_notifier_register()"
        fixed, KASAN's use-after-free)."""
        with self._lock:
            registered = subscription in self._notifiers
            if registered:
                self._notifiers.remove(subscription)
            live = not self.dead
            grabbed, subscription.grabbed = subscription.grabbed, False
        if registered and live:
            subscription.release(self)
        if not grabbed:
            self.host.report(
                "kasan",
                "mmu_notifier_unregister",
                "mmdrop of a subscription that was never registered: mm_count drops below its users "
                "and the mm_struct is freed while still in use (use-after-free)",
            )

    # -- mm_users --
    def _mmget(self) -> None:
        with self._lock:
            self.users += 1

    def _mmget_not_zero(self) -> bool:
        with self._lock:
            if self.users == 0:
                return False
            self.users += 1
            return True

    def _mmput(self) -> None:
        with self._lock:
            self.users -= 1
            last = self.users == 0
        if last:
            self._exit_mmap()

    def _exit_mmap(self) -> None:
        """Last user gone: every notifier's release, then page-table teardown: while the mm is
        protected (protected_count != 0) each present PTE gets a destroy-page UVC, an export if
        that fails (ptep_get_and_clear_full); then the page tables are freed, which unlinks
        them from every gmap still attached (host_to_guest)."""
        with self._lock:
            subscriptions, self._notifiers = self._notifiers, []
        for subscription in subscriptions:
            subscription.release(self)
        race = self.host.race
        if race.armed:
            race.hit("mm_teardown", mm=self)
        destroyed = exported = 0
        if self.is_protected():
            if not self.host.uv_facility:
                # The UVC instruction does not exist on this machine: operation exception in
                # kernel mode. The exiting task dies; the page teardown goes on without UVCs.
                self.host.report(
                    "oops",
                    "uv_destroy_owned_page",
                    "operation exception: UVC 0x0202 (destroy secure storage) issued by "
                    "ptep_get_and_clear_full on a machine without the Ultravisor facility "
                    f"(protected_count {self.protected_count})",
                )
            else:
                for region in self.regions:
                    res = native(self.uv.mm_teardown, region, all_present=True)  # one UVC per present PTE
                    destroyed += res.destroyed
                    exported += res.exported
        for gmap in list(self.gmaps):
            gmap.unlink_host_mappings("exit_mmap")
        for region in self.regions:
            native(self.uv.release_region, region)
        self.regions.clear()
        self.teardown_stats = {"destroyed": destroyed, "exported": exported}
        self.dead = True

    def _destroy_range(
        self,
        cancel: _native.CancelToken | None,
        region: _native.Region | None = None,
        *,
        export_refused: bool = False,
    ) -> bool:
        """__s390_uv_destroy_range: a destroy-page UVC on every present page of the whole address
        space (``region=None``, the walk up to the gmap rewrite) or of one VM's memory
        (``region``, gmap_pv_destroy_range); ``export_refused``: a refused destroy is followed by
        an export. With ``cancel`` the walk is interruptible (PERFORM): it tests the fatal
        signal after every batch. Returns False if interrupted."""
        regions = [region] if region is not None else list(self.regions)
        race = self.host.race
        if cancel is not None and race.armed and race.is_armed("walk_batch"):
            return all(self._stepped_walk(r, cancel, export_refused) for r in regions)
        for r in regions:
            if native(self.uv.destroy_walk, r, 0, None, cancel, export_refused=export_refused).interrupted:
                return False
        return not (cancel is not None and cancel.is_set())

    def _stepped_walk(self, region: _native.Region, cancel: _native.CancelToken, export_refused: bool) -> bool:
        """The interruptible walk one batch at a time, on the calling thread, with the
        ``walk_batch`` race point after each batch and then the fatal-signal test, as the
        kernel's single-threaded walk does. (A walk given a token that is already set does
        exactly one batch and says where to resume.)"""
        one_batch = _native.CancelToken()
        one_batch.set()
        race = self.host.race
        pos, end, batches = 0, region.pages, 0
        while pos < end:
            span_end = min(end, (pos // _STEP_PAGES + 1) * _STEP_PAGES)
            res = native(self.uv.destroy_walk, region, pos, span_end, one_batch, export_refused=export_refused)
            if not res.interrupted:  # nothing present in that span: no batch, no signal test
                pos = span_end
                continue
            pos = res.resume_page
            batches += 1
            race.hit("walk_batch", mm=self, region=region, batch=batches, resume_page=pos)
            if cancel.is_set():
                return False
        return True


class File(abc.ABC):
    """struct file: ``f_count`` counts the calls in flight that hold it (fdget). After close the
    last fput runs ``release`` (f_op->release). ``what`` names the file in error messages."""

    what = "file"

    def __init__(self) -> None:
        self.closed = False  # close(2) has run: new calls fail
        self.f_count = 0
        self.release_pending = False  # closed while calls were in flight: the last fput releases

    @abc.abstractmethod
    def _release(self) -> None:
        """f_op->release: the last reference is gone (it runs at most once per file)."""


class Process:
    """A VMM process: an address space (possibly shared with clone_vm helpers) and VM fds.

    ``pid``, ``name``, ``alive``, ``host``, ``mm`` (its AddressSpace), ``helper_of`` (the process a
    CLONE_VM helper was cloned from), ``exit_seconds`` (wall time of its exit teardown).

    Every call into the emulated kernel counts as work in flight of its process, so ``exit`` and
    ``kill`` wait for it as the kernel waits for the process's other threads.
    """

    def __init__(self, host: Host, mm: AddressSpace, name: str, *, helper_of: Process | None = None) -> None:
        self.host = host
        self.mm = mm
        self.name = name
        self.pid = host._alloc_pid()
        self.alive = True
        self.fatal_signal = _native.CancelToken()
        self.helper_of = helper_of
        self.exit_with_last_vm = False  # Host.create_vm's process: closing its VM ends it
        self.exit_seconds = 0.0  # wall time spent in the exit()/kill() teardown
        self._fds: list[Vm] = []
        self._lock = threading.Lock()
        self._inflight = 0
        self._exiting = False
        self._wait_status: int | None = None
        self._exiter = 0  # thread ident running the teardown
        self._exited = threading.Event()
        host._add_process(self)

    def __repr__(self) -> str:
        return f"<Process pid={self.pid} name={self.name!r} alive={self.alive}>"

    # -- work in flight, so exit() can wait for it --
    def _enter(self) -> None:
        with self._lock:
            if self._exiting:
                raise ValueError(f"process {self.pid} ({self.name}) has exited")
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1

    def _wait_idle(self) -> None:
        """Wait for the calls in flight (exit waits for the other threads); an interrupt that
        lands meanwhile is kept by the exit, which the kernel does not interrupt."""
        while True:
            with self._lock:
                if self._inflight == 0:
                    return
            try:
                time.sleep(0.0005)  # releases the GIL; in-flight calls stop within one walk batch
            except BaseException as exc:  # noqa: BLE001 - held and re-raised when the exit is done
                keep_or_raise(exc)

    # -- files: fdget/fput and close --
    # fdget/fdput run on every call into the kernel: explicit acquire/release is about half the
    # cost of ``with`` on CPython 3.11, and the try/finally costs nothing when nothing raises.
    def _fdget(self, file: File) -> None:
        """A call on ``file`` starts: it holds a reference and counts as work in flight, and the
        calling thread's UV work counts for this process (and ``file``) from here on. A closed
        file (or one of an exited process) raises ClosedFdError (EBADF)."""
        if _accounting_context() is not file:
            _bind_account(self, file)
        lock = self._lock
        lock.acquire()
        try:
            if file.closed:
                raise ClosedFdError(f"{file.what} is closed")
            if self._exiting:  # exit closes every fd of the process
                raise ClosedFdError(f"process {self.pid} ({self.name}) has exited")
            self._inflight += 1
            file.f_count += 1
        finally:
            lock.release()

    def _fdput(self, file: File) -> None:
        """The call returns; if the file was closed meanwhile, the last reference releases it."""
        lock = self._lock
        lock.acquire()
        try:
            file.f_count -= 1
            if not file.release_pending or file.f_count:
                self._inflight -= 1
                return
            file.release_pending = False
        finally:
            lock.release()
        try:
            file._release()  # still counted in flight, so an exit waits for it
        finally:
            self._leave()
        self._fd_closed(file)

    def _close_fd(self, file: File) -> None:
        """close(2): with no call in flight the file is released now, else by the last fput."""
        with self._lock:
            if file.closed:
                return
            file.closed = True
            if file.f_count:
                file.release_pending = True
                return
            if not self.alive:
                return
            if self._exiting:  # the exit releases it
                raise ValueError(f"process {self.pid} ({self.name}) has exited")
            self._inflight += 1
        try:
            _bind_account(self, file)
            file._release()
        finally:
            self._leave()
        self._fd_closed(file)

    def _fd_closed(self, file: File) -> None:
        with self._lock:
            self._fds = [f for f in self._fds if f is not file]
            last = self.exit_with_last_vm and not self._fds and not self._exiting
        if last:
            self._do_group_exit(0)

    # -- public API --
    def create_vm(self, memory_size: int, vcpus: int = 1, *, memory_limit: int | None = None) -> Vm:
        """KVM_CREATE_VM plus one memslot of ``memory_size`` bytes and ``vcpus`` vCPUs.

        ``memory_size`` is a positive multiple of 1 MiB up to 64 TiB, ``memory_limit`` (default: the
        size) at least the size; misuse raises TypeError/ValueError naming the argument. If the
        machine cannot reserve the guest memory, OSError(ENOMEM) names ``memory_size``.
        """
        memory_size, vcpus, limit = check_vm_args(self.host, memory_size, vcpus, memory_limit)
        if _kvm_create_vm is None:  # pragma: no cover - pvfast/__init__ imports kvm, which registers it
            raise RuntimeError("pvfast.kvm is not loaded: no VM can be created")
        self._enter()
        try:
            vm = _kvm_create_vm(self, memory_size, limit)
            with self._lock:
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
            self.mm._mmget()
            return Process(self.host, self.mm, name or f"cleanup/{self.pid}", helper_of=self)
        finally:
            self._leave()

    @property
    def vms(self) -> list[Vm]:
        """The VM fds this process holds open."""
        with self._lock:
            return list(self._fds)

    def exit(self, status: int = 0) -> None:
        """exit_group(status): the other threads' interruptible work is stopped (they get SIGKILL),
        the address-space user is dropped first (the last user runs the mm teardown: notifiers,
        then destroy/export of every present page), then the VM fds close (each VM is destroyed
        as by ``Vm.close()``). Records ``exit_status`` = ``status & 0xff``; returns when done."""
        status = check_int("status", status, bits=32, signed=True)
        self._end((status & 0xFF) << 8)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """A fatal signal ``sig`` (default SIGKILL; any signal whose default action ends the
        process): interruptible work in flight stops at its next check (PERFORM at a batch
        boundary, UNPACK where the kernel retries), then the process is torn down as by ``exit``.
        Records ``exit_signal`` = ``sig``; returns once the teardown is done."""
        sig = check_int("sig", sig, bits=32, signed=True)
        if not 0 < sig < signal.NSIG or sig in _NOT_FATAL:
            raise ValueError(f"sig: {sig} is not a signal whose default action ends the process")
        self._end(int(sig))

    def _end(self, wait_status: int) -> None:
        """exit()/kill(). Called on a thread that is inside a call of this process (a signal
        handler that interrupted it, say), the kernel's order is: the interrupted call returns,
        then the process ends. The teardown then runs in a thread of its own, which waits for
        that call like any exit waits for the other threads, and this returns at once."""
        if on_stack(ENTRY_CODES, lambda loc: _in_process(loc.get("self"), self)):
            self.fatal_signal.set()
            threading.Thread(
                target=self._do_group_exit, args=(wait_status,), name=f"exit/{self.pid}", daemon=True
            ).start()
            return
        self._do_group_exit(wait_status)

    @property
    def wait_status(self) -> int | None:
        """The status waitpid(2) reports once the process is gone (``os.WIFEXITED`` /
        ``os.WEXITSTATUS`` / ``os.WIFSIGNALED`` / ``os.WTERMSIG`` decode it; no core dumps);
        None while it has not exited."""
        return self._wait_status if not self.alive else None

    @property
    def exit_status(self) -> int | None:
        """``status & 0xff`` of ``exit(status)``; None if the process was killed or is alive."""
        code = self.wait_status
        return code >> 8 if code is not None and not code & 0x7F else None

    @property
    def exit_signal(self) -> int | None:
        """The signal given to ``kill``; None if the process exited or is alive."""
        code = self.wait_status
        if code is None or not code & 0x7F:
            return None
        try:
            return signal.Signals(code & 0x7F)
        except ValueError:  # a real-time signal without a name
            return code & 0x7F

    def _do_group_exit(self, wait_status: int) -> None:
        """do_group_exit: the one teardown of exit() and kill(); the first caller's status wins,
        later callers wait until that teardown is done."""
        me = threading.get_ident()
        with self._lock:
            first = not self._exiting
            if first:
                self._exiting = True
                self._wait_status = wait_status
                self._exiter = me
        if not first:
            if self._exiter != me:
                self._exited.wait()
            return
        start = time.perf_counter()
        try:
            with Uninterruptible():  # do_exit: an interrupt is held until the teardown is done
                _bind_account(self, None)
                self.fatal_signal.set()  # the killing signal, or exit_group's SIGKILL to the other threads
                self._wait_idle()
                join_process(self)  # modelled clock: the exit waits for every thread of the process
                parent = self.helper_of
                if parent is not None and not parent.alive:
                    join_process(parent)  # a CLONE_VM helper exits once its parent is gone
                race = self.host.race
                if race.armed:
                    race.hit("exit_before_mmput", process=self, mm=self.mm)
                self.mm._mmput()  # exit_mm before exit_files
                with self._lock:
                    files, self._fds = self._fds, []
                for file in files:  # close_files: nothing is in flight any more, so each fput releases
                    file.closed = True
                    file.release_pending = False
                    _bind_account(self, file)
                    file._release()
                self.alive = False
                _account_exited(self)
                self.host._remove_process(self)
                self.exit_seconds = time.perf_counter() - start
        finally:
            self._exited.set()


def _in_process(obj: object, proc: Process) -> bool:
    return obj is proc or getattr(obj, "process", None) is proc


ENTRY_CODES.update({Process.create_vm.__code__, Process.clone_vm.__code__})


def _copy_process(host: Host, name: str) -> Process:
    return Process(host, AddressSpace(host), name)


register_copy_process(_copy_process)
