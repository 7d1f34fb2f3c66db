"""arch/s390/kvm/kvm-s390.c: the VM fd, its vCPUs and the KVM_S390_PV_COMMAND ioctl.

``Vm.pv_command`` is ``kvm_arch_vm_ioctl(KVM_S390_PV_COMMAND)``: the prologue (user_cpu_state_ctrl
first, prot_virt, flags), then the ``kvm_s390_handle_pv`` switch (``_HANDLE_PV`` below) under
``kvm->lock`` for every command but PERFORM, then rc/rrc copied back. The PV work itself is in
pv.py (pv.c), memory faults in fault.py (uv.c, fault.c), fd references in mm.py (fs/file.c).

The constants of the public API are also importable from here (``pvfast.kvm.PvCmd`` ...).
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from . import pv as _pv
from ._util import check_bytes, check_int
from .clock import KernelMutex
from .constants import (
    HPAGE_SIZE,
    KVM_CAP_S390_PROTECTED,
    KVM_CAP_S390_PROTECTED_ASYNC_DISABLE,
    KVM_CAP_S390_PROTECTED_DUMP,
    KVM_CHECK_EXTENSION,
    KVM_PV_ASYNC_CLEANUP_PERFORM,
    KVM_PV_ASYNC_CLEANUP_PREPARE,
    KVM_PV_DISABLE,
    KVM_PV_DUMP,
    KVM_PV_ENABLE,
    KVM_PV_INFO,
    KVM_PV_PREP_RESET,
    KVM_PV_SET_SEC_PARMS,
    KVM_PV_UNPACK,
    KVM_PV_UNSHARE_ALL,
    KVM_PV_VERIFY,
    KVM_S390_PV_COMMAND,
    KVM_S390_PV_CPU_COMMAND,
    PAGE_SIZE,
    PV_INFO_DUMP_LEN,
    PV_INFO_HEADER_LEN,
    PV_INFO_VM_LEN,
    SEC_PARMS_MAX_LEN,
    SZ_1M,
    AsceType,
    Cap,
    PvCmd,
    PvDumpSubcmd,
    PvInfoId,
    Uvc,
)
from .errors import EFAULT, EINVAL, EIO, ENOMEM, ENOTTY, ClosedFdError, PvError, UvcError
from .fault import access_with_faults, guest_fault, host_fault
from .gmap import Gmap
from .host import LeakEntry
from .interrupts import ENTRY_CODES, VCPU_RUN_CODES, Uninterruptible, on_stack
from .mm import File, register_kvm_create_vm
from .pv import PvVmState, UvRc

if TYPE_CHECKING:
    from . import _native
    from .mm import Process

__all__ = [
    "KVM_CAP_S390_PROTECTED",
    "KVM_CAP_S390_PROTECTED_ASYNC_DISABLE",
    "KVM_CAP_S390_PROTECTED_DUMP",
    "KVM_CHECK_EXTENSION",
    "KVM_PV_ASYNC_CLEANUP_PERFORM",
    "KVM_PV_ASYNC_CLEANUP_PREPARE",
    "KVM_PV_DISABLE",
    "KVM_PV_DUMP",
    "KVM_PV_ENABLE",
    "KVM_PV_INFO",
    "KVM_PV_PREP_RESET",
    "KVM_PV_SET_SEC_PARMS",
    "KVM_PV_UNPACK",
    "KVM_PV_UNSHARE_ALL",
    "KVM_PV_VERIFY",
    "KVM_S390_PV_COMMAND",
    "KVM_S390_PV_CPU_COMMAND",
    "PAGE_SIZE",
    "Cap",
    "PvCmd",
    "PvDumpSubcmd",
    "PvInfoId",
    "PvResult",
    "PvState",
    "Uvc",
    "Vcpu",
    "Vm",
]

# Command data (the struct behind kvm_pv_cmd.data), by command, and the int width of each field.
_DATA_ARGS: dict[int, tuple[str, ...]] = {
    PvCmd.SET_SEC_PARMS: ("header", "length"),
    PvCmd.UNPACK: ("addr", "size", "tweak"),
    PvCmd.INFO: ("id", "len_max"),
    PvCmd.DUMP: ("subcmd", "buff_len", "gaddr"),
}
_ALL_DATA_ARGS = frozenset(a for args in _DATA_ARGS.values() for a in args)
_DATA_BITS = {"id": 32, "len_max": 32}
_ZERO = 0  # the cached int 0: an identity test against it selects the argument-check fast path


#: The commands that take no data struct.
_NoDataCmd = Literal[
    PvCmd.ENABLE,
    PvCmd.DISABLE,
    PvCmd.VERIFY,
    PvCmd.PREP_RESET,
    PvCmd.UNSHARE_ALL,
    PvCmd.ASYNC_CLEANUP_PREPARE,
    PvCmd.ASYNC_CLEANUP_PERFORM,
    0,
    1,
    4,
    5,
    6,
    9,
    10,
]


@dataclass(frozen=True, slots=True)
class PvResult:
    """A successful KVM_S390_PV_COMMAND, as the struct and data come back to user space.

    ``rc``, ``rrc``: the UV return codes copied back (docs/COMMANDS.md says, per command, whose
    they are; a field KVM did not write holds what the caller passed). ``data``: INFO's
    ``struct kvm_s390_pv_info`` (header and the part asked for) or DUMP's output buffer, else None.
    ``gaddr``: after DUMP CONFIG_STOR_STATE, the guest address the next call continues at.
    """

    rc: int
    rrc: int
    data: bytes | None = None
    gaddr: int | None = None  # DUMP CONFIG_STOR_STATE: the advanced gaddr copied back


# A frozen dataclass's __init__ pays object.__setattr__ per field; the ioctl builds results with
# the slots' own setters instead (same object, about half the cost).
_new_object = object.__new__
_set_rc = PvResult.__dict__["rc"].__set__
_set_rrc = PvResult.__dict__["rrc"].__set__
_set_data = PvResult.__dict__["data"].__set__
_set_gaddr = PvResult.__dict__["gaddr"].__set__


def _pv_result(rc: int, rrc: int, data: bytes | None, gaddr: int | None) -> PvResult:
    result: PvResult = _new_object(PvResult)
    _set_rc(result, rc)
    _set_rrc(result, rrc)
    _set_data(result, data)
    _set_gaddr(result, gaddr)
    return result


@dataclass(frozen=True)
class PvState:
    """``vm.pv_state()``: the VM's PV bookkeeping as the kernel holds it (``kvm->arch.pv`` and friends).

    * ``handle``: the current configuration's handle, 0 when not protected; ``protected``: handle != 0.
    * ``set_aside``: a configuration was set aside by PREPARE and not yet claimed by PERFORM;
      ``set_aside_fast``: that record is a Destroy-Fast one (the configuration is already gone,
      only its memory is left).
    * ``need_cleanup``: leftover records (a PERFORM stopped by a fatal signal), for DISABLE or the
      VM's destruction; ``performing``: PERFORM calls between their claim and their end.
    * ``protected_count``: the address space's ``mm->context.protected_count``, the protected
      configurations that may still own pages of it; ``mm_users``: the address space's users.
    * ``dumping``: a dump sequence started by DUMP INIT has not completed.
    * ``leaked``, ``leaks``: the number of leak-ledger entries of this VM, and the entries (as
      ``host.leaked()`` gives them): storage the kernel left to the UV after a failed destroy.
    * ``vcpu_handles``: each vCPU's secure-CPU handle (0: not protected).
    * ``service_irq_masked``: service-signal interrupts are masked (from ENABLE to DISABLE/PREPARE).
    * ``user_cpu_state_ctrl``: user space controls the CPU state (set by every PV command).
    * ``guest_handle``: the gmap's copy of the handle that the fault handlers read (v6.2).
    * ``asce``: the guest ASCE: top-level table origin, designation type, table length.
    * ``gisa_enabled``: the guest interruption state area is in use (disabled while vCPUs are
      protected on a UV without AIV; cpus_from_pv re-enables it when ``use_gisa`` is set).
    """

    handle: int
    protected: bool
    set_aside: bool
    set_aside_fast: bool
    need_cleanup: int
    protected_count: int
    dumping: bool
    leaked: int
    performing: int
    vcpu_handles: tuple[int, ...]
    service_irq_masked: bool
    user_cpu_state_ctrl: bool
    guest_handle: int
    asce: int
    mm_users: int
    leaks: tuple[LeakEntry, ...] = field(default=(), repr=False)
    gisa_enabled: bool = True


class Vcpu:
    """A vCPU: its secure-CPU handle, donated storage, SIDA page and SIE-block PV fields."""

    __slots__ = ("gbea", "id", "mutex", "pv_handle", "pv_handle_config", "sdf", "sida", "sie_blocked", "stor_base")

    def __init__(self, vcpu_id: int) -> None:
        self.id = vcpu_id
        self.mutex = threading.Lock()
        self.pv_handle = 0
        self.stor_base = 0
        self.sida = 0
        self.sdf = 0
        self.pv_handle_config = 0
        self.gbea = 1
        self.sie_blocked = False

    def clear_pv(self) -> None:
        """The SIE block's PV fields back to a normal vCPU (after its secure CPU is destroyed)."""
        self.pv_handle = 0
        self.stor_base = 0
        self.sida = 0
        self.sdf = 0
        self.pv_handle_config = 0
        self.gbea = 1


class Vm(File):
    """A VM file descriptor: guest memory, vCPUs and the PV command interface.

    Made by ``Process.create_vm`` (or ``Host.create_vm``). ``memory_size`` and ``memory_limit``
    are in bytes, ``process`` and ``host`` are where it lives, ``name`` (``"<pid>:<tag>"``) names
    it in log lines and warnings. A context manager: leaving the block closes it. Calls on a
    closed VM raise ClosedFdError (EBADF; a ValueError too).
    """

    what = "VM"

    def __init__(self, process: Process, memory_size: int, memory_limit: int) -> None:
        super().__init__()
        self.process = process
        self.host = process.host
        self.mm = process.mm
        self.uv = self.host.uv.native
        self.memory_size = memory_size
        self.memory_limit = memory_limit
        self.region = self.mm._mmap(memory_size)
        self.gmap = Gmap(self.host, self.mm, self.region, memory_limit)
        self.sca = self.host._kalloc_nofail("sca", PAGE_SIZE)
        self.lock = KernelMutex()  # kvm->lock (its waits move the modelled clock)
        self.pv = PvVmState()
        self.vcpu_list: list[Vcpu] = []
        self.service_irq_masked = False
        self.user_cpu_state_ctrl = False
        self.gisa_enabled = self.host.use_gisa
        self._prot_virt = self.host.prot_virt  # a load-time setting of the host: read-only
        self._destroyed = False  # kvm_arch_destroy_vm has run
        self.perform_started = threading.Event()
        self.name = f"{process.pid}:{id(self) & 0xFFFF:04x}"

    def __repr__(self) -> str:
        return f"<Vm {self.name} memory={self.memory_size} protected={bool(self.pv.handle)} closed={self.closed}>"

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- simple properties --
    @property
    def asce_type(self) -> AsceType:
        """The designation type of the guest ASCE, chosen from the memory limit as gmap_create does:
        ``"segment"`` for a limit up to 2 GiB (PREPARE refuses such a VM), then ``"region3"`` (up to
        4 TiB), ``"region2"`` (up to 8 PiB), ``"region1"``."""
        return self.gmap.asce_type

    @property
    def vcpus(self) -> int:
        """The number of vCPUs (``create_vcpu`` adds one)."""
        return len(self.vcpu_list)

    @property
    def protected(self) -> bool:
        """Whether the VM runs as a protected VM now: a configuration handle is set
        (kvm_s390_pv_is_protected)."""
        return self.pv.handle != 0

    # -- VM ioctls --
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (same values as the system fd)."""
        if self.closed:
            raise ClosedFdError("VM is closed")
        return self.host.check_extension(cap)

    def create_vcpu(self) -> int:
        """KVM_CREATE_VCPU; a vCPU created while the VM is protected gets a secure CPU (under kvm->lock)."""
        self.process._fdget(self)
        try:
            with self.lock:
                max_cpus = self.host.uv_info["max_guest_cpu_id"] + 1
                if len(self.vcpu_list) >= max_cpus:
                    raise ValueError(f"vcpus: this VM already has the maximum of {max_cpus}")
                vcpu = Vcpu(len(self.vcpu_list))
                if self.pv.handle:
                    rc = UvRc()
                    err = _pv.create_cpu(self, vcpu, rc)
                    if err:
                        raise UvcError(-err, f"KVM_CREATE_VCPU {vcpu.id}: CREATE_SEC_CPU", rc.rc, rc.rrc)
                self.vcpu_list.append(vcpu)
                return vcpu.id
        finally:
            self.process._fdput(self)

    def pv_state(self) -> PvState:
        """The VM's PV bookkeeping now (kvm->arch.pv, the vCPUs, the mm counter, the leaks); see PvState."""
        if self.closed:
            raise ClosedFdError("VM is closed")
        leaks = tuple(e for e in self.host.leaked() if e["vm"] == id(self))  # copies
        aside = self.pv.set_aside
        return PvState(
            handle=self.pv.handle,
            protected=self.pv.handle != 0,
            set_aside=aside is not None,
            set_aside_fast=aside is not None and aside.fast,
            need_cleanup=len(self.pv.need_cleanup),
            protected_count=self.mm.protected_count,
            dumping=self.pv.dumping,
            leaked=len(leaks),
            performing=self.pv.performing,
            vcpu_handles=tuple(v.pv_handle for v in self.vcpu_list),
            service_irq_masked=self.service_irq_masked,
            user_cpu_state_ctrl=self.user_cpu_state_ctrl,
            guest_handle=self.gmap.guest_handle,
            asce=self.gmap.asce,
            mm_users=self.mm.users,
            leaks=leaks,
            gisa_enabled=self.gisa_enabled,
        )

    # -- KVM_S390_PV_COMMAND --
    # One signature per command: the keywords are the fields of the command's data struct. A call
    # with no data at all also type-checks (the last overload): the kernel then reads a NULL
    # pointer, so a command that takes data fails with EFAULT.
    @overload
    def pv_command(
        self,
        cmd: _NoDataCmd,
        *,
        flags: int = 0,
        rc: int = 0,
        rrc: int = 0,
    ) -> PvResult: ...
    @overload
    def pv_command(
        self,
        cmd: Literal[PvCmd.SET_SEC_PARMS, 2],
        *,
        header: bytes | bytearray | memoryview,
        length: int = ...,
        flags: int = 0,
        rc: int = 0,
        rrc: int = 0,
    ) -> PvResult: ...
    @overload
    def pv_command(
        self,
        cmd: Literal[PvCmd.UNPACK, 3],
        *,
        addr: int,
        size: int,
        tweak: int,
        flags: int = 0,
        rc: int = 0,
        rrc: int = 0,
    ) -> PvResult: ...
    @overload
    def pv_command(
        self,
        cmd: Literal[PvCmd.INFO, 7],
        *,
        id: int,
        len_max: int,
        flags: int = 0,
        rc: int = 0,
        rrc: int = 0,
    ) -> PvResult: ...
    @overload
    def pv_command(
        self,
        cmd: Literal[PvCmd.DUMP, 8],
        *,
        subcmd: int,
        buff_len: int = 0,
        gaddr: int = 0,
        flags: int = 0,
        rc: int = 0,
        rrc: int = 0,
    ) -> PvResult: ...
    @overload
    def pv_command(self, cmd: int, *, flags: int = 0, rc: int = 0, rrc: int = 0) -> PvResult: ...
    def pv_command(self, cmd: int, *, flags: int = 0, rc: int = 0, rrc: int = 0, **data: Any) -> PvResult:
        """The KVM_S390_PV_COMMAND ioctl (kvm_s390_handle_pv). Success returns PvResult; failure
        raises PvError (errno, and rc/rrc as copied back). ``rc``/``rrc`` are the values user space
        puts in the struct before the call: a field KVM does not write comes back unchanged, on
        success and on failure alike.

        Command data, as keywords (any other keyword is a TypeError naming it):

        * SET_SEC_PARMS: ``header`` (bytes), ``length`` (default ``len(header)``)
        * UNPACK: ``addr``, ``size``, ``tweak``
        * INFO: ``id`` (PvInfoId), ``len_max``; DUMP: ``subcmd`` (PvDumpSubcmd), ``buff_len``, ``gaddr``
        * every other command: none

        What comes back in rc/rrc (details and kernel sources: docs/COMMANDS.md):

        * ENABLE: Create Config's rc/rrc, then each Create CPU's (0x0001/0 on success); a failed CPU
          creation's on EIO.
        * DISABLE: 0x0001/0 on success; on EIO the first failing destroy's (a secure CPU, else the
          current configuration, else a leftover).
        * SET_SEC_PARMS, UNPACK (the last page tried), VERIFY, PREP_RESET, UNSHARE_ALL, DUMP: the UV
          call's rc/rrc, also when the UV refuses (EINVAL).
        * INFO: never written.
        * ASYNC_CLEANUP_PREPARE: 0x0001/42 (made by KVM) on success; a secure CPU's or Destroy-Fast's
          rc/rrc on EIO.
        * ASYNC_CLEANUP_PERFORM: on success with Destroy-Fast nothing is written (the caller's values
          come back); without it Destroy Config's 0x0001/0; 0x0001/42 if a fatal signal stopped the
          walk (the rest is left for DISABLE or VM destroy).
        * Every refusal before a UV call (EINVAL for a VM in the wrong state or ``flags`` != 0,
          EFAULT for missing data, ENOMEM, ENOTTY for an unknown ``cmd``) writes nothing, even a
          PREPARE refused after it destroyed the secure CPUs.

        Python misuse (a cmd that is not an int or does not fit u32, flags/rc/rrc of the wrong type
        or width, unknown or wrongly typed command data) raises TypeError/ValueError naming the
        argument before the ioctl starts. On a closed VM: ClosedFdError (EBADF, a ValueError).
        """
        tp = type(cmd)
        if (tp is not PvCmd and tp is not int) or flags is not _ZERO or rc is not _ZERO or rrc is not _ZERO or data:
            cmd, flags, rc, rrc, data = _check_pv_args(cmd, flags, rc, rrc, data)  # the unusual calls
        handler = _HANDLE_PV.get(cmd)
        if handler is None:
            if not 0 <= cmd <= 0xFFFFFFFF:
                raise ValueError(f"cmd: {cmd} does not fit the u32 cmd field")
            handler = _handle_pv_unknown
        proc = self.process
        proc._fdget(self)
        try:
            self.user_cpu_state_ctrl = True  # side effect first, even for calls that fail
            if not self._prot_virt:
                raise PvError(EINVAL, cmd, rc, rrc)
            if flags:
                raise PvError(EINVAL, cmd, rc, rrc)
            uvrc = _new_object(UvRc)  # UvRc(rc, rrc) without the __init__ call (hot path)
            uvrc.rc = rc
            uvrc.rrc = rrc
            out: list[Any] = [None, None]
            if handler is handle_pv_async_cleanup_perform:  # takes kvm->lock only for short moments
                r = handler(self, uvrc, data, out)
            else:
                lock = self.lock  # kvm->lock; acquire/release: cheaper than ``with`` (see Process.fdget)
                if not lock.acquire(False) and not self._lock_contended(cmd, handler):
                    r = handler(self, uvrc, data, out)  # INFO re-entered from a signal handler
                else:
                    try:
                        r = handler(self, uvrc, data, out)
                    finally:
                        lock.release()
            if r:
                raise PvError(-r, cmd, uvrc.rc, uvrc.rrc, out[0])
            return _pv_result(uvrc.rc, uvrc.rrc, out[0], out[1])
        finally:
            proc._fdput(self)

    def _lock_contended(self, cmd: int, handler: PvHandler) -> bool:
        """kvm->lock is taken. Normally another thread holds it: wait (True). If this thread holds
        it, a signal handler (or callback) re-entered the ioctl it interrupted; the kernel would
        run the handler after that ioctl returned. INFO depends on nothing that ioctl changes,
        so it runs now without the lock (False); any other command raises ValueError."""
        if not on_stack((Vm.pv_command.__code__,), lambda loc: loc.get("self") is self and "lock" in loc, skip=3):
            self.lock.acquire()
            return True
        if handler is handle_pv_info:
            return False
        raise ValueError(
            f"cmd: {_cmd_name(cmd)} issued on this thread while it is inside a KVM_S390_PV_COMMAND of "
            "this VM (from a signal handler that interrupted it?); the kernel runs such a handler only "
            "after the interrupted ioctl returned: issue it then"
        )

    # -- guest and host memory (faults resolved as in fault.py) --
    def _page_range(self, gaddr: object, size: object) -> tuple[int, int]:
        start = check_int("gaddr", gaddr)
        length = check_int("size", size)
        if length <= 0:
            raise ValueError(f"size: {length} must be positive")
        if start + length > self.memory_size:
            raise ValueError(
                f"gaddr: range [{start:#x}, {start + length:#x}) is outside guest memory of {self.memory_size:#x} bytes"
            )
        first = start // PAGE_SIZE
        last = (start + length - 1) // PAGE_SIZE
        return first, last - first + 1

    # A guest touches memory only while one of its vCPUs runs (KVM_RUN), and the run loop holds
    # that vCPU's mutex; kvm_s390_cpus_from_pv takes each vcpu->mutex before destroying the
    # secure CPU. So a guest-side call runs on a vCPU (``vcpu=``, default 0) and holds its mutex
    # for its whole duration: no teardown path can destroy the secure CPU, and with it the
    # configuration the access runs as, while the access is in progress.

    def _vcpu(self, vcpu: object) -> Vcpu:
        index = check_int("vcpu", vcpu, bits=16)
        vcpus = self.vcpu_list
        if index < len(vcpus):
            return vcpus[index]
        if not vcpus:
            raise ValueError("vcpu: the VM has no vCPU, and a guest runs only on a vCPU (KVM_RUN)")
        raise ValueError(f"vcpu: no vCPU {index} (the VM has {len(vcpus)})")

    def _run(self, run: Vcpu) -> int:
        """Enter KVM_RUN on ``run`` (the caller holds the file): take vcpu->mutex and return the
        configuration the guest runs as on it, 0 if it runs as a normal guest. A vCPU runs
        protected only with a secure CPU (sdf 2): after a PREPARE or DISABLE that destroyed the
        CPUs, the configuration may still exist but the guest runs non-protected."""
        if not run.mutex.acquire(False):
            if on_stack(VCPU_RUN_CODES, lambda loc: loc.get("run") is run, skip=3):
                raise ValueError(
                    f"vcpu: vCPU {run.id} already runs a guest access on this thread (a signal handler "
                    "that interrupted it?); use another vCPU or wait until that access returned"
                )
            run.mutex.acquire()
        handle = self.pv.handle if run.pv_handle else 0
        race = self.host.race
        if race.armed:
            try:
                race.hit("guest_access", vm=self, process=self.process, vcpu=run.id, handle=handle)
            except BaseException:
                run.mutex.release()
                raise
        return handle

    def _fault(self, first: int, npages: int, handle: int) -> int:
        """The guest running as ``handle`` touches pages (fault.guest_fault). Up to the gmap
        rewrite the non-secure-storage handler imports with gmap->guest_handle, which every
        configuration-destroy attempt zeroes; the newest kernels use kvm->arch.pv.handle."""
        imports = handle if self.host.profile.no_guest_handle or not handle else self.gmap.guest_handle
        return guest_fault(self.gmap, first, npages, secure_handle=handle, import_handle=imports)

    def guest_access(self, gaddr: int, size: int = PAGE_SIZE, *, write: bool = True, vcpu: int = 0) -> None:
        """The guest, running on ``vcpu``, touches [gaddr, gaddr+size) (faults resolved as the
        kernel does). A VM without vCPUs has no running guest: ValueError naming ``vcpu``."""
        first, npages = self._page_range(gaddr, size)
        proc = self.process
        proc._fdget(self)
        try:
            run = self._vcpu(vcpu)
            handle = self._run(run)
            try:
                self._fault(first, npages, handle)
            finally:
                run.mutex.release()
        finally:
            proc._fdput(self)

    def guest_write(self, gaddr: int, data: bytes, *, vcpu: int = 0) -> None:
        """The guest, running on ``vcpu``, writes its own memory (plaintext in its view)."""
        payload = check_bytes("data", data)
        first, npages = self._page_range(gaddr, len(payload))
        proc = self.process
        proc._fdget(self)
        try:
            run = self._vcpu(vcpu)
            handle = self._run(run)
            try:
                access_with_faults(
                    lambda: self._fault(first, npages, handle),
                    lambda view: self.region.write(gaddr, payload, as_config=view),
                    "guest_write",
                )
            finally:
                run.mutex.release()
        finally:
            proc._fdput(self)

    def guest_read(self, gaddr: int, size: int, *, vcpu: int = 0) -> bytes:
        """The guest, running on ``vcpu``, reads its own memory (plaintext in its view)."""
        first, npages = self._page_range(gaddr, size)
        proc = self.process
        proc._fdget(self)
        try:
            run = self._vcpu(vcpu)
            handle = self._run(run)
            try:
                return access_with_faults(
                    lambda: self._fault(first, npages, handle),
                    lambda view: self.region.read(gaddr, size, as_config=view),
                    "guest_read",
                )
            finally:
                run.mutex.release()
        finally:
            proc._fdput(self)

    def guest_share(self, gaddr: int, size: int = PAGE_SIZE, *, vcpu: int = 0) -> None:
        """The protected guest, running on ``vcpu``, makes pages shared (SET_SHARED_ACCESS,
        guest-side UVC 0x1000). ValueError if the guest does not run protected on that vCPU."""
        first, npages = self._page_range(gaddr, size)
        proc = self.process
        proc._fdget(self)
        try:
            run = self._vcpu(vcpu)
            handle = self._run(run)
            try:
                if not handle:
                    raise ValueError("guest_share: the guest is not protected")
                self._fault(first, npages, handle)
                for page in range(first, first + npages):
                    res = self.uv.set_shared_access(handle, page * PAGE_SIZE)
                    if res.cc:
                        raise UvcError(EIO, f"SET_SHARED_ACCESS at {page * PAGE_SIZE:#x}", res.rc, res.rrc)
            finally:
                run.mutex.release()
        finally:
            proc._fdput(self)

    def host_read(self, gaddr: int, size: int) -> bytes:
        """The VMM reads guest memory: secure pages are pinned (shared) or exported first, so the
        host never reads plaintext of a protected guest. A page a running vCPU keeps importing back
        ends the read with OSError(EAGAIN) (BlockingIOError)."""
        first, npages = self._page_range(gaddr, size)
        self.process._fdget(self)
        try:
            return access_with_faults(
                lambda: host_fault(self.gmap, first, npages), lambda _: self.region.read(gaddr, size), "host_read"
            )
        finally:
            self.process._fdput(self)

    def host_write(self, gaddr: int, data: bytes) -> None:
        """The VMM writes guest memory: secure pages are pinned (shared) or exported first."""
        payload = check_bytes("data", data)
        first, npages = self._page_range(gaddr, len(payload))
        self.process._fdget(self)
        try:
            access_with_faults(
                lambda: host_fault(self.gmap, first, npages), lambda _: self.region.write(gaddr, payload), "host_write"
            )
        finally:
            self.process._fdput(self)

    # -- VM destruction --
    def close(self) -> None:
        """Close the VM fd: kvm_arch_destroy_vm (vCPUs, then cleanup-all, then the notifier).

        A call still in flight on this VM (a PERFORM in another thread, say) holds the file, so
        the destruction runs when the last such call returns, as in the kernel.
        """
        self.process._close_fd(self)

    def _release(self) -> None:
        """kvm_vm_release -> kvm_destroy_vm -> kvm_arch_destroy_vm (no kvm->lock): vCPUs, the SCA,
        cleanup-all, then the mmu notifier is unregistered (which calls its release while the mm
        lives). Runs once."""
        if self._destroyed:
            return
        self._destroyed = True
        self.closed = True
        with Uninterruptible():  # kvm_arch_destroy_vm runs to the end
            rc = UvRc()
            for vcpu in self.vcpu_list:  # kvm_arch_vcpu_destroy: no vcpu->mutex, nothing runs any more
                _pv.destroy_cpu(self, vcpu, rc)
            self.vcpu_list = []
            self.host._kfree(self.sca)
            race = self.host.race
            if race.armed:
                race.hit("vm_destroy_vcpus_gone", vm=self, process=self.process)
            _pv.deinit_cleanup_all(self, rc)
            notifier = self.pv.mmu_notifier
            if notifier is not None:
                self.pv.mmu_notifier = None
                self.mm._mmu_notifier_unregister(notifier)
            self.gmap.free()


register_kvm_create_vm(Vm)
ENTRY_CODES.update(
    f.__code__
    for f in (
        Vm.pv_command,
        Vm.create_vcpu,
        Vm.guest_access,
        Vm.guest_write,
        Vm.guest_read,
        Vm.guest_share,
        Vm.host_read,
        Vm.host_write,
    )
)
VCPU_RUN_CODES.update(f.__code__ for f in (Vm.guest_access, Vm.guest_write, Vm.guest_read, Vm.guest_share))


def _cmd_name(cmd: int) -> str:
    try:
        return f"KVM_PV_{PvCmd(cmd).name}"
    except ValueError:
        return str(cmd)


# ---------------------------------------------------------------------------------------------
# Argument checks of pv_command (the slow path: only when something is unusual)
# ---------------------------------------------------------------------------------------------


def _check_pv_args(
    cmd: object, flags: object, rc: object, rrc: object, data: dict[str, Any]
) -> tuple[int, int, int, int, dict[str, Any]]:
    """Every argument checked and returned as plain values (an int subclass is read by its value).

    A keyword that is no command's data, or that this command does not take, is a TypeError naming
    it, like a Python call with an unexpected keyword; an unknown command number takes any of them
    (the ioctl then fails with ENOTTY, as the kernel's switch does).
    """
    if isinstance(cmd, bool) or not isinstance(cmd, int):
        raise TypeError(f"cmd: expected int or PvCmd, got {type(cmd).__name__}")
    plain = int.__index__(cmd)
    if not 0 <= plain <= 0xFFFFFFFF:
        raise ValueError(f"cmd: {plain} does not fit the u32 cmd field")
    known = _CMDS.get(plain)
    flags = check_int("flags", flags, bits=32)  # also for falsy non-ints ('' or None): TypeError
    rc = check_int("rc", rc, bits=16)
    rrc = check_int("rrc", rrc, bits=16)
    for name in data:
        if name not in _ALL_DATA_ARGS:
            raise TypeError(f"pv_command() got an unexpected keyword argument {name!r}")
    wanted = _DATA_ARGS.get(plain, ())
    checked: dict[str, Any] = {}
    for name, value in data.items():
        if known is not None and name not in wanted:
            takes = f"takes {', '.join(wanted)}" if wanted else "takes no command data"
            raise TypeError(f"{name}: not an argument of {known.name} (it {takes})")
        if name == "header":
            checked[name] = check_bytes(name, value)
        else:
            checked[name] = check_int(name, value, bits=_DATA_BITS.get(name, 64))
    return plain, flags, rc, rrc, checked


_CMDS: dict[int, PvCmd] = {int(c): c for c in PvCmd}


# ---------------------------------------------------------------------------------------------
# kvm_s390_handle_pv: one handler per case of the switch, called with kvm->lock held (except
# PERFORM). Each returns 0 or -errno and writes INFO/DUMP output to out[0] (data), out[1] (gaddr).
# ---------------------------------------------------------------------------------------------

PvHandler = Callable[[Vm, UvRc, dict[str, Any], list[Any]], int]


def handle_pv_enable(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_ENABLE: create the configuration, then a secure CPU for every vCPU."""
    if vm.pv.handle:
        return -EINVAL
    with Uninterruptible():
        race = vm.host.race
        if race.armed:
            race.hit("enable_start", vm=vm, process=vm.process)
        # the prelude (extended SCA and KSM off; in the newest kernels adapters unmapped, THP and
        # COW sharing off) has no state pvfast models
        r = _pv.init_vm(vm, rc)
        if r:
            return r
        r = _pv.cpus_to_pv(vm, rc)
        if r:
            _pv.deinit_vm(vm, UvRc())
        vm.service_irq_masked = True  # set even when cpus_to_pv failed
    return r


def handle_pv_disable(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_DISABLE: secure CPUs gone, then cleanup-all (current, set-aside and leftovers)."""
    if not vm.pv.handle:
        return -EINVAL
    with Uninterruptible():
        r = _pv.cpus_from_pv(vm, rc)
        if r:
            return r
        r = _pv.deinit_cleanup_all(vm, rc)
        vm.service_irq_masked = False
    return r


def handle_pv_async_cleanup_prepare(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_ASYNC_CLEANUP_PREPARE: secure CPUs gone, then set the configuration aside."""
    if not vm.host.async_destroy or not vm.pv.handle:
        return -EINVAL
    with Uninterruptible():
        r = _pv.cpus_from_pv(vm, rc)
        if r:
            return r
        r = _pv.set_aside(vm, rc)
        vm.service_irq_masked = False
    return r


def handle_pv_async_cleanup_perform(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_ASYNC_CLEANUP_PERFORM (no kvm->lock around it): destroy the set-aside configuration."""
    if not vm.host.async_destroy:
        return -EINVAL
    return _pv.deinit_aside_vm(vm, rc)


def handle_pv_set_sec_parms(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_SET_SEC_PARMS: copy the SE header in and hand it to the UV (0x0300). Headers up to
    8 KiB (PAGE_SIZE * 2); the newest kernels take up to 1 MiB."""
    if not vm.pv.handle:
        return -EINVAL
    if "header" not in data:
        return -EFAULT
    header = check_bytes("header", data["header"])
    length = check_int("length", data.get("length", len(header)))
    if length > (SZ_1M if vm.host.profile.se_header_1m else SEC_PARMS_MAX_LEN):
        return -EINVAL
    if length == 0:
        return -ENOMEM  # vmalloc(0) returns NULL
    if length > len(header):
        return -EFAULT  # copy_from_user past the end of the buffer
    res = vm.uv.set_sec_parms(vm.pv.handle, header[:length])
    rc.set(res.rc, res.rrc)
    _pv.uv_event(vm, "PROTVIRT VM SET PARMS: rc %x rrc %x", res.rc, res.rrc)
    return -EINVAL if res.cc else 0


def handle_pv_unpack(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_UNPACK: kvm_s390_pv_unpack of one component (addr, size, tweak)."""
    if not vm.pv.handle or not vm.mm.is_protected():
        return -EINVAL
    if not data:
        return -EFAULT
    addr = check_int("addr", data.get("addr", 0))
    size = check_int("size", data.get("size", 0))
    tweak = check_int("tweak", data.get("tweak", 0))
    return _pv.unpack(vm, addr, size, tweak, rc)


def _uv_cmd_nodata(uvc: str, label: str) -> PvHandler:
    """VERIFY, PREP_RESET, UNSHARE_ALL: one UVC on the configuration handle (uv_cmd_nodata)."""

    def handler(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
        if not vm.pv.handle:
            return -EINVAL
        call: Callable[[int], _native.UvcResult] = getattr(vm.uv, uvc)
        res = call(vm.pv.handle)
        rc.set(res.rc, res.rrc)
        _pv.uv_event(vm, "PROTVIRT %s: rc %x rrc %x", label, res.rc, res.rrc)
        return -EINVAL if res.cc else 0

    handler.__name__ = handler.__qualname__ = f"handle_pv_{uvc}"
    return handler


def handle_pv_info(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_INFO (kvm_s390_handle_pv_info): the VM or DUMP part of the UV's query data."""
    if not data:
        return -EFAULT
    info_id = check_int("id", data.get("id", 0), bits=32)
    len_max = check_int("len_max", data.get("len_max", 0), bits=32)
    if len_max < PV_INFO_HEADER_LEN:
        return -EINVAL
    ui = vm.host.uv_info
    if info_id == PvInfoId.VM:
        if len_max < PV_INFO_HEADER_LEN + PV_INFO_VM_LEN:
            return -EINVAL
        payload = struct.pack(
            ">4Q4Q",
            *ui["inst_calls_list"],
            ui["max_guest_cpu_id"] + 1,
            ui["max_num_sec_conf"],
            ui["max_sec_stor_addr"],
            ui["uv_feature_indications"],
        )
    elif info_id == PvInfoId.DUMP:
        if len_max < PV_INFO_HEADER_LEN + PV_INFO_DUMP_LEN:
            return -EINVAL
        payload = struct.pack(
            ">3Q", ui["guest_cpu_stor_len"], ui["conf_dump_storage_state_len"], ui["conf_dump_finalize_len"]
        )
    else:
        return -EINVAL
    length = PV_INFO_HEADER_LEN + len(payload)
    out[0] = struct.pack(">4I", info_id, len_max, length, 0) + payload
    return 0


def pv_dmp(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """KVM_PV_DUMP (kvm_s390_pv_dmp): INIT, CONFIG_STOR_STATE, COMPLETE; CPU is a vCPU ioctl."""
    if not vm.pv.handle:
        return -EINVAL
    if not data:
        return -EFAULT
    subcmd = check_int("subcmd", data.get("subcmd", 0))
    buff_len = check_int("buff_len", data.get("buff_len", 0))
    gaddr = check_int("gaddr", data.get("gaddr", 0))
    ui = vm.host.uv_info
    handle = vm.pv.handle
    if subcmd == PvDumpSubcmd.INIT:
        if vm.pv.dumping:
            return -EINVAL
        for v in vm.vcpu_list:
            v.sie_blocked = True
        res = vm.uv.dump_init(handle)
        rc.set(res.rc, res.rrc)
        _pv.uv_event(vm, "PROTVIRT DUMP INIT: rc %x rrc %x", res.rc, res.rrc)
        if res.cc:
            for v in vm.vcpu_list:
                v.sie_blocked = False
            return -EINVAL
        vm.pv.dumping = True
        return 0
    if subcmd == PvDumpSubcmd.CONFIG_STOR_STATE:
        if not vm.pv.dumping:
            return -EINVAL  # kvm_s390_pv_dmp: rc/rrc untouched
        return dump_stor_state(vm, rc, buff_len, gaddr, out)
    if subcmd == PvDumpSubcmd.COMPLETE:
        if not vm.pv.dumping or buff_len < ui["conf_dump_finalize_len"]:
            return -EINVAL
        dump = vm.uv.dump_complete(handle)
        rc.set(dump.rc, dump.rrc)
        _pv.uv_event(vm, "PROTVIRT DUMP COMPLETE: rc %x rrc %x", dump.rc, dump.rrc)
        if dump.cc:
            return -EINVAL
        vm.pv.dumping = False
        for v in vm.vcpu_list:
            v.sie_blocked = False
        out[0] = dump.data
        return 0
    return -ENOTTY


def dump_stor_state(vm: Vm, rc: UvRc, buff_len: int, gaddr: int, out: list[Any]) -> int:
    """kvm_s390_pv_dump_stor_state: one UVC 0x0401 per 1 MiB of guest memory into a kernel buffer
    of min(buff_len, 1 MiB); the buffer goes to the user each time it is full and at the end.
    Every error leaves through the exit that copies the UVC header, so an argument error (gaddr
    not 1 MiB aligned, buff_len 0 or not a multiple of the per-MiB length) or -ENOMEM gives
    rc = rrc = 0, a UVC failure that UVC's rc/rrc; output since the last flush is lost then."""
    chunk = vm.host.uv_info["conf_dump_storage_state_len"]
    if gaddr % HPAGE_SIZE or not buff_len or buff_len % chunk:
        rc.set(0, 0)
        return -EINVAL
    kbuf_len = min(buff_len, HPAGE_SIZE)
    copied = bytearray()  # what reached the user buffer
    kbuf = bytearray()
    for _ in range(buff_len // chunk):
        dump = vm.uv.dump_conf_stor_state(vm.pv.handle, gaddr)
        rc.set(dump.rc, dump.rrc)
        if dump.cc:
            out[0] = bytes(copied)
            return -EINVAL
        kbuf += dump.data
        gaddr += HPAGE_SIZE
        if len(kbuf) >= kbuf_len:
            copied += kbuf
            kbuf.clear()
    copied += kbuf
    out[0] = bytes(copied)
    out[1] = gaddr
    return 0


def _handle_pv_unknown(vm: Vm, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
    """The switch's default case."""
    return -ENOTTY


# Keyed by plain ints: a PvCmd looks up an int key at C speed, the reverse goes through the
# enum class.
_HANDLE_PV: dict[int, PvHandler] = {
    KVM_PV_ENABLE: handle_pv_enable,
    KVM_PV_DISABLE: handle_pv_disable,
    KVM_PV_SET_SEC_PARMS: handle_pv_set_sec_parms,
    KVM_PV_UNPACK: handle_pv_unpack,
    KVM_PV_VERIFY: _uv_cmd_nodata("verify", "VERIFY"),
    KVM_PV_PREP_RESET: _uv_cmd_nodata("prepare_reset", "PREP_RESET"),
    KVM_PV_UNSHARE_ALL: _uv_cmd_nodata("unshare_all", "UNSHARE ALL"),
    KVM_PV_INFO: handle_pv_info,
    KVM_PV_DUMP: pv_dmp,
    KVM_PV_ASYNC_CLEANUP_PREPARE: handle_pv_async_cleanup_prepare,
    KVM_PV_ASYNC_CLEANUP_PERFORM: handle_pv_async_cleanup_perform,
}
