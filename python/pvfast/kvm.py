"""arch/s390/kvm/kvm-s390.c: the VM fd, its vCPUs and the KVM_S390_PV_COMMAND ioctl.

``Vm.pv_command`` is ``kvm_arch_vm_ioctl(KVM_S390_PV_COMMAND)``: the prologue of spec §3.0, then
``kvm_s390_handle_pv`` (the per-command switch) under ``kvm->lock`` for every command but PERFORM.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from . import _native
from . import pv as _pv
from ._util import check_bytes, check_int
from .constants import *  # noqa: F403  (re-export: constants are importable from pvfast.kvm)
from .constants import (
    HPAGE_SIZE,
    PAGE_SIZE,
    PV_INFO_DUMP_LEN,
    PV_INFO_HEADER_LEN,
    PV_INFO_VM_LEN,
    SEC_PARMS_MAX_LEN,
    Cap,
    PvCmd,
    PvDumpSubcmd,
    PvInfoId,
)
from .errors import EFAULT, EINVAL, EIO, ENOMEM, ENOTTY, PvError, UvcError
from .gmap import Gmap
from .pv import UvRc

if TYPE_CHECKING:
    from .mm import Process

T = TypeVar("T")

# Command data (the struct behind kvm_pv_cmd.data), by command.
_DATA_ARGS: dict[int, tuple[str, ...]] = {
    PvCmd.SET_SEC_PARMS: ("header", "length"),
    PvCmd.UNPACK: ("addr", "size", "tweak"),
    PvCmd.INFO: ("id", "len_max"),
    PvCmd.DUMP: ("subcmd", "buff_len", "gaddr"),
}
_ALL_DATA_ARGS = frozenset(a for args in _DATA_ARGS.values() for a in args)
_CMD_NAMES = {int(c): c for c in PvCmd}


@dataclass(frozen=True)
class PvResult:
    """A successful KVM_S390_PV_COMMAND: rc/rrc as copied back, and INFO/DUMP output."""

    rc: int
    rrc: int
    data: bytes | None = None
    gaddr: int | None = None  # DUMP CONFIG_STOR_STATE: the advanced gaddr copied back


@dataclass(frozen=True)
class PvState:
    """``vm.pv_state()``: the VM's PV bookkeeping as the kernel holds it."""

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
    leaks: tuple[dict[str, Any], ...] = field(default=(), repr=False)


class Vcpu:
    """A vCPU: its secure-CPU handle, donated storage, SIDA page and SIE-block PV fields."""

    __slots__ = ("id", "mutex", "pv_handle", "stor_base", "sida", "sdf", "pv_handle_config", "gbea", "sie_blocked")

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
        self.pv_handle = 0
        self.stor_base = 0
        self.sida = 0
        self.sdf = 0
        self.pv_handle_config = 0
        self.gbea = 1


class PvVmState:
    """kvm->arch.pv."""

    __slots__ = ("handle", "stor_base", "stor_var", "guest_len", "dumping", "set_aside", "need_cleanup", "performing")

    def __init__(self) -> None:
        self.handle = 0
        self.stor_base = 0
        self.stor_var = 0
        self.guest_len = 0
        self.dumping = False
        self.set_aside: _pv.AsideRecord | None = None
        self.need_cleanup: list[_pv.AsideRecord] = []
        self.performing = 0

    def clear_state(self) -> None:
        """kvm_s390_clear_pv_state: handle, guest_len, stor_base, stor_var (not ``dumping``)."""
        self.handle = 0
        self.guest_len = 0
        self.stor_base = 0
        self.stor_var = 0


class Vm:
    """A VM file descriptor: guest memory, vCPUs and the PV command interface."""

    def __init__(self, process: Process, memory_size: int, memory_limit: int) -> None:
        self.process = process
        self.host = process.host
        self.mm = process.mm
        self.uv: _native.Ultravisor = self.host.uv.native
        self.memory_size = memory_size
        self.memory_limit = memory_limit
        self.region = self.uv.create_region(memory_size)
        self.mm.regions.append(self.region)
        self.gmap = Gmap(self.host, memory_limit)
        self.sca = self.host.kalloc("sca", PAGE_SIZE) or 0
        self.lock = threading.Lock()  # kvm->lock
        self.pv = PvVmState()
        self.vcpu_list: list[Vcpu] = []
        self.service_irq_masked = False
        self.user_cpu_state_ctrl = False
        self.gisa_enabled = self.host.use_gisa
        self.mmu_notifier_registered = False
        self.closed = False  # the fd is closed: new calls fail
        self._destroyed = False  # kvm_arch_destroy_vm has run
        self._refs = 0  # calls in flight, each holding the file
        self._destroy_pending = False
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
    def asce_type(self) -> str:
        return self.gmap.asce_type

    @property
    def vcpus(self) -> int:
        return len(self.vcpu_list)

    @property
    def protected(self) -> bool:
        return self.pv.handle != 0

    def _enter(self) -> None:
        """An ioctl or access starts: it holds a reference on the fd (fdget) and counts as the
        process's work in flight (one lock: the process's)."""
        if self.closed:
            raise ValueError("VM is closed")
        proc = self.process
        with proc._lock:
            if not proc.alive or proc._exiting:
                raise ValueError(f"process {proc.pid} ({proc.name}) has exited")
            proc._inflight += 1
            self._refs += 1

    def _leave(self) -> None:
        """The call returns; if the fd was closed meanwhile, the last reference destroys the VM."""
        proc = self.process
        with proc._lock:
            self._refs -= 1
            destroy = self._destroy_pending and self._refs == 0
            if destroy:
                self._destroy_pending = False
            else:
                proc._inflight -= 1
        if destroy:
            try:
                self._destroy()  # still counted in flight, so an exit waits for it
            finally:
                proc._leave()
            proc._vm_closed(self)

    # -- VM ioctls --
    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (same values as the system fd)."""
        if self.closed:
            raise ValueError("VM is closed")
        return self.host.check_extension(cap)

    def create_vcpu(self) -> int:
        """KVM_CREATE_VCPU; a vCPU created while the VM is protected gets a secure CPU (under kvm->lock)."""
        self._enter()
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
            self._leave()

    def pv_state(self) -> PvState:
        if self.closed:
            raise ValueError("VM is closed")
        return self._state()

    def _state(self) -> PvState:
        leaks = tuple(dict(e) for e in self.host.leaked() if e["vm"] == id(self))
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
        )

    # -- KVM_S390_PV_COMMAND --
    def pv_command(self, cmd: int, *, flags: int = 0, rc: int = 0, rrc: int = 0, **data: Any) -> PvResult:
        """The KVM_S390_PV_COMMAND ioctl. Success returns PvResult; failure raises PvError."""
        if isinstance(cmd, bool) or not isinstance(cmd, int):
            raise TypeError(f"cmd: expected int or PvCmd, got {type(cmd).__name__}")
        if not 0 <= cmd <= 0xFFFFFFFF:
            raise ValueError(f"cmd: {cmd} does not fit the u32 cmd field")
        if type(flags) is not int or type(rc) is not int or type(rrc) is not int or flags or (rc | rrc) >> 16 or rc < 0 or rrc < 0:
            check_int("flags", flags, bits=32)  # also for falsy non-ints ('' or None): TypeError
            check_int("rc", rc, bits=16)
            check_int("rrc", rrc, bits=16)
        if data:
            for name in data:
                if name not in _ALL_DATA_ARGS:
                    raise TypeError(f"pv_command() got an unexpected keyword argument {name!r}")
            wanted = _DATA_ARGS.get(cmd)
            if wanted is not None:
                for name, value in data.items():
                    if name not in wanted:
                        raise TypeError(f"{name}: not an argument of {PvCmd(cmd).name}")
                    if name == "header":
                        check_bytes(name, value)
                    else:
                        check_int(name, value, bits=32 if name in ("id", "len_max") else 64)
        cmd = int(cmd)
        self._enter()
        try:
            self.user_cpu_state_ctrl = True  # side effect first, even for calls that fail
            if not self.host.prot_virt:
                raise PvError(EINVAL, cmd, rc, rrc)
            if flags:
                raise PvError(EINVAL, cmd, rc, rrc)
            uvrc = UvRc(rc, rrc)
            out: list[Any] = [None, None]
            if cmd == PvCmd.ASYNC_CLEANUP_PERFORM:
                r = self._handle_perform(uvrc)
            else:
                with self.lock:
                    r = self._handle_pv(cmd, uvrc, data, out)
            if r:
                raise PvError(-r, cmd, uvrc.rc, uvrc.rrc, out[0])
            return PvResult(uvrc.rc, uvrc.rrc, out[0], out[1])
        finally:
            self._leave()

    def _handle_perform(self, rc: UvRc) -> int:
        if not self.host.async_destroy:
            return -EINVAL
        return _pv.deinit_aside_vm(self, rc)

    def _handle_pv(self, cmd: int, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
        """kvm_s390_handle_pv: called with kvm->lock held."""
        if cmd == PvCmd.ENABLE:
            if self.pv.handle:
                return -EINVAL
            # extended SCA and KSM-off are host-side steps without failure modes here
            r = _pv.init_vm(self, rc)
            if r:
                return r
            r = _pv.cpus_to_pv(self, rc)
            if r:
                _pv.deinit_vm(self, UvRc())
            self.service_irq_masked = True  # set even when cpus_to_pv failed
            return r
        if cmd == PvCmd.DISABLE:
            if not self.pv.handle:
                return -EINVAL
            r = _pv.cpus_from_pv(self, rc)
            if r:
                return r
            r = _pv.deinit_cleanup_all(self, rc)
            self.service_irq_masked = False
            return r
        if cmd == PvCmd.ASYNC_CLEANUP_PREPARE:
            if not self.host.async_destroy or not self.pv.handle:
                return -EINVAL
            r = _pv.cpus_from_pv(self, rc)
            if r:
                return r
            r = _pv.set_aside(self, rc)
            self.service_irq_masked = False
            return r
        if cmd == PvCmd.SET_SEC_PARMS:
            return self._set_sec_parms(rc, data)
        if cmd == PvCmd.UNPACK:
            if not self.pv.handle or not self.mm.is_protected():
                return -EINVAL
            if not data:
                return -EFAULT
            addr = check_int("addr", data.get("addr", 0))
            size = check_int("size", data.get("size", 0))
            tweak = check_int("tweak", data.get("tweak", 0))
            return _pv.unpack(self, addr, size, tweak, rc)
        if cmd in (PvCmd.VERIFY, PvCmd.PREP_RESET, PvCmd.UNSHARE_ALL):
            if not self.pv.handle:
                return -EINVAL
            call, label = {
                PvCmd.VERIFY: (self.uv.verify, "VERIFY"),
                PvCmd.PREP_RESET: (self.uv.prepare_reset, "PREP_RESET"),
                PvCmd.UNSHARE_ALL: (self.uv.unshare_all, "UNSHARE ALL"),
            }[PvCmd(cmd)]
            cc, r, rr = call(self.pv.handle)
            rc.set(r, rr)
            _pv.uv_event(self, "PROTVIRT %s: rc %x rrc %x", label, r, rr)
            return -EINVAL if cc else 0
        if cmd == PvCmd.INFO:
            return self._info(data, out)
        if cmd == PvCmd.DUMP:
            return self._dump(rc, data, out)
        return -ENOTTY

    def _set_sec_parms(self, rc: UvRc, data: dict[str, Any]) -> int:
        if not self.pv.handle:
            return -EINVAL
        if "header" not in data:
            return -EFAULT
        header = check_bytes("header", data["header"])
        length = check_int("length", data.get("length", len(header)))
        if length > SEC_PARMS_MAX_LEN:
            return -EINVAL
        if length == 0:
            return -ENOMEM  # vmalloc(0) returns NULL
        if length > len(header):
            return -EFAULT  # copy_from_user past the end of the buffer
        cc, r, rr = self.uv.set_sec_parms(self.pv.handle, header[:length])
        rc.set(r, rr)
        _pv.uv_event(self, "PROTVIRT VM SET PARMS: rc %x rrc %x", r, rr)
        return -EINVAL if cc else 0

    def _info(self, data: dict[str, Any], out: list[Any]) -> int:
        if not data:
            return -EFAULT
        info_id = check_int("id", data.get("id", 0), bits=32)
        len_max = check_int("len_max", data.get("len_max", 0), bits=32)
        if len_max < PV_INFO_HEADER_LEN:
            return -EINVAL
        ui = self.host.uv_info
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

    def _dump(self, rc: UvRc, data: dict[str, Any], out: list[Any]) -> int:
        if not self.pv.handle:
            return -EINVAL
        if not data:
            return -EFAULT
        subcmd = check_int("subcmd", data.get("subcmd", 0))
        buff_len = check_int("buff_len", data.get("buff_len", 0))
        gaddr = check_int("gaddr", data.get("gaddr", 0))
        ui = self.host.uv_info
        handle = self.pv.handle
        if subcmd == PvDumpSubcmd.INIT:
            if self.pv.dumping:
                return -EINVAL
            for v in self.vcpu_list:
                v.sie_blocked = True
            cc, r, rr = self.uv.dump_init(handle)
            rc.set(r, rr)
            _pv.uv_event(self, "PROTVIRT DUMP INIT: rc %x rrc %x", r, rr)
            if cc:
                for v in self.vcpu_list:
                    v.sie_blocked = False
                return -EINVAL
            self.pv.dumping = True
            return 0
        if subcmd == PvDumpSubcmd.CONFIG_STOR_STATE:
            chunk = ui["conf_dump_storage_state_len"]
            if not self.pv.dumping or gaddr % HPAGE_SIZE or not buff_len or buff_len % chunk:
                return -EINVAL
            buf = bytearray()
            for _ in range(buff_len // chunk):
                cc, r, rr, blob = self.uv.dump_conf_stor_state(handle, gaddr)
                rc.set(r, rr)
                if cc:
                    out[0] = bytes(buf)  # what was copied before the failure stays in the user buffer
                    return -EINVAL
                buf += blob
                gaddr += HPAGE_SIZE
            out[0] = bytes(buf)
            out[1] = gaddr
            return 0
        if subcmd == PvDumpSubcmd.COMPLETE:
            if not self.pv.dumping or buff_len < ui["conf_dump_finalize_len"]:
                return -EINVAL
            cc, r, rr, blob = self.uv.dump_complete(handle)
            rc.set(r, rr)
            _pv.uv_event(self, "PROTVIRT DUMP COMPLETE: rc %x rrc %x", r, rr)
            if cc:
                return -EINVAL
            self.pv.dumping = False
            for v in self.vcpu_list:
                v.sie_blocked = False
            out[0] = blob
            return 0
        return -ENOTTY

    # -- guest and host memory (spec §4.7, §6) --
    def _page_range(self, gaddr: object, size: object) -> tuple[int, int]:
        check_int("gaddr", gaddr)
        check_int("size", size)
        assert isinstance(gaddr, int) and isinstance(size, int)
        if size <= 0:
            raise ValueError(f"size: {size} must be positive")
        if gaddr + size > self.memory_size:
            raise ValueError(f"gaddr: range [{gaddr:#x}, {gaddr + size:#x}) is outside guest memory of {self.memory_size:#x} bytes")
        first = gaddr // PAGE_SIZE
        last = (gaddr + size - 1) // PAGE_SIZE
        return first, last - first + 1

    def _guest_fault(self, first: int, npages: int) -> int:
        """The guest touches pages: import (protected guest) or make accessible (normal guest)."""
        handle = self.pv.handle
        # The guest runs protected only on vCPUs that have a secure CPU (sdf 2); after a failed
        # PREPARE the config still exists but the vCPUs run as a normal guest.
        if handle and any(v.pv_handle for v in self.vcpu_list):
            _, _, _, failed, frc = self.uv.import_range(
                handle, self.region, first, npages, export_first=_pv.export_before_import(self)
            )
            if failed:
                raise UvcError(EFAULT, f"guest fault: CONV_TO_SEC_STOR on {failed} page(s)", frc)
            return handle
        self._host_fault(first, npages)
        self.region.touch(first * PAGE_SIZE, npages * PAGE_SIZE)
        return 0

    def guest_access(self, gaddr: int, size: int = PAGE_SIZE, *, write: bool = True) -> None:
        """The running guest touches [gaddr, gaddr+size) (faults resolved as the kernel does)."""
        first, npages = self._page_range(gaddr, size)
        self._enter()
        try:
            self._guest_fault(first, npages)
        finally:
            self._leave()

    def _with_faults(self, fault: Callable[[], int], access: Callable[[int], T], what: str) -> T:
        """Resolve faults, then access; a page that raced back to secure faults again, as on hardware."""
        self._enter()
        try:
            for _ in range(8):
                handle = fault()
                try:
                    return access(handle)
                except _native.SecureStorageAccess:
                    continue
            raise RuntimeError(f"{what}: a page kept faulting")
        finally:
            self._leave()

    def guest_write(self, gaddr: int, data: bytes) -> None:
        """The guest writes its own memory (plaintext in its view)."""
        payload = check_bytes("data", data)
        first, npages = self._page_range(gaddr, len(payload))
        self._with_faults(
            lambda: self._guest_fault(first, npages),
            lambda handle: self.region.write(gaddr, payload, as_config=handle),
            "guest_write",
        )

    def guest_read(self, gaddr: int, size: int) -> bytes:
        """The guest reads its own memory (plaintext in its view)."""
        first, npages = self._page_range(gaddr, size)
        return self._with_faults(
            lambda: self._guest_fault(first, npages),
            lambda handle: self.region.read(gaddr, size, as_config=handle),
            "guest_read",
        )

    def guest_share(self, gaddr: int, size: int = PAGE_SIZE) -> None:
        """The protected guest makes pages shared (SET_SHARED_ACCESS, guest-side UVC 0x1000)."""
        first, npages = self._page_range(gaddr, size)
        self._enter()
        try:
            handle = self.pv.handle
            if not handle or not any(v.pv_handle for v in self.vcpu_list):
                raise ValueError("guest_share: the guest is not protected")
            self._guest_fault(first, npages)
            for page in range(first, first + npages):
                cc, r, rr = self.uv.set_shared_access(handle, page * PAGE_SIZE)
                if cc:
                    raise UvcError(EIO, f"SET_SHARED_ACCESS at {page * PAGE_SIZE:#x}", r, rr)
        finally:
            self._leave()

    def _host_fault(self, first: int, npages: int) -> int:
        """Host access to guest pages: pin shared pages, export secure ones (spec §4.7)."""
        _, _, failed = self.uv.make_accessible_range(self.region, first, npages)
        if failed:
            # Neither pin nor export worked: the page stays secure and the access cannot go on.
            raise UvcError(EFAULT, f"secure-storage access: {failed} page(s) stay secure", 0)
        return 0

    def host_read(self, gaddr: int, size: int) -> bytes:
        """The VMM reads guest memory: secure pages are pinned (shared) or exported first."""
        first, npages = self._page_range(gaddr, size)
        return self._with_faults(
            lambda: self._host_fault(first, npages), lambda _: self.region.read(gaddr, size), "host_read"
        )

    def host_write(self, gaddr: int, data: bytes) -> None:
        """The VMM writes guest memory: secure pages are pinned (shared) or exported first."""
        payload = check_bytes("data", data)
        first, npages = self._page_range(gaddr, len(payload))
        self._with_faults(
            lambda: self._host_fault(first, npages), lambda _: self.region.write(gaddr, payload), "host_write"
        )

    # -- VM destruction --
    def close(self) -> None:
        """Close the VM fd: kvm_arch_destroy_vm (vCPUs, then cleanup-all, then the notifier).

        A call still in flight on this VM (a PERFORM in another thread, say) holds the file, so
        the destruction runs when the last such call returns, as in the kernel.
        """
        with self.process._lock:
            if self.closed:
                return
            self.closed = True
            if self._refs:
                self._destroy_pending = True
                return
        if not self.process.alive:
            return
        self.process._enter()
        try:
            self._destroy()
        finally:
            self.process._leave()
        self.process._vm_closed(self)

    def _release(self) -> None:
        """The fd closed by process exit (every call of the process has returned by then)."""
        self.closed = True
        self._destroy_pending = False
        self._destroy()

    def _destroy(self) -> None:
        """kvm_arch_destroy_vm (no kvm->lock)."""
        if self._destroyed:
            return
        self._destroyed = True
        self.closed = True
        rc = UvRc()
        for vcpu in self.vcpu_list:
            if vcpu.pv_handle:
                _pv.destroy_cpu(self, vcpu, rc)
            else:
                self.host.kfree(vcpu.sida)
        self.vcpu_list = []
        self.host.kfree(self.sca)
        _pv.deinit_cleanup_all(self, rc)
        if self.mmu_notifier_registered:
            self.mmu_notifier_registered = False
            if self in self.mm.notifiers:
                self.mm.notifiers.remove(self)
                if not self.mm.dead:
                    _pv.mmu_notifier_release(self)  # unregister while the mm lives calls release
        self.gmap.free()
