"""arch/s390/kvm/pv.c: secure configurations and CPUs, set-aside (async destroy), cleanup-all,
the mmu-notifier release, and UNPACK.

Function names follow the kernel (``kvm_s390_pv_`` prefix dropped; read at v6.2, commit
f7866f582b1c, and in the newest tree read, torvalds/linux 7bb6284aa7b3). Where they differ, the
host's kernel profile decides (``vm.host.profile.<delta>``, see profiles.py). Every function takes
the VM and an ``UvRc`` standing for the ``u16 *rc, u16 *rrc`` pointers; callers that pass
"dummy" pointers pass a fresh ``UvRc()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .constants import (
    ASYNC_RRC,
    PAGE_SIZE,
    SZ_1M,
    SZ_2G,
    UVC_RC_DESTROY_FAST_APQN,
    UVC_RC_EXECUTED,
    UVC_RC_NEED_DESTROY,
)
from .errors import EAGAIN, EFAULT, EINTR, EINVAL, EIO, ENOMEM
from .fault import should_export_before_import
from .host import KernelWarning
from .interrupts import VCPU_RUN_CODES, Uninterruptible, native, on_stack
from .mm import MmuNotifier

if TYPE_CHECKING:
    from . import _native
    from .kvm import Vcpu, Vm

log = logging.getLogger("pvfast.kvm_uv")


class UvRc:
    """The rc/rrc pair a UV call writes through (``u16 *rc, u16 *rrc``)."""

    __slots__ = ("rc", "rrc")

    def __init__(self, rc: int = 0, rrc: int = 0) -> None:
        self.rc = rc
        self.rrc = rrc

    def set(self, rc: int, rrc: int) -> None:
        self.rc = rc
        self.rrc = rrc


@dataclass
class AsideRecord:
    """struct pv_vm_to_be_destroyed. A Destroy-Fast record is all zero (handle 0)."""

    handle: int = 0
    stor_base: int = 0
    stor_var: int = 0
    old_gmap_table: int = 0
    kaddr: int = 0  # the record's own allocation (kzalloc), freed by whoever disposes of it

    @property
    def fast(self) -> bool:
        return self.handle == 0


class PvVmState:
    """kvm->arch.pv (struct kvm_s390_pv)."""

    __slots__ = (
        "dumping",
        "guest_len",
        "handle",
        "mmu_notifier",
        "need_cleanup",
        "performing",
        "set_aside",
        "stor_base",
        "stor_var",
    )

    def __init__(self) -> None:
        self.handle = 0
        self.stor_base = 0
        self.stor_var = 0
        self.guest_len = 0
        self.dumping = False
        self.set_aside: AsideRecord | None = None
        self.need_cleanup: list[AsideRecord] = []
        self.performing = 0  # PERFORMs between their claim and their end (emulator bookkeeping)
        self.mmu_notifier: MmuNotifier | None = None  # registered on the mm by the first init_vm

    def clear_state(self) -> None:
        """The fields kvm_s390_clear_pv_state clears in every profile: handle, guest_len,
        stor_base, stor_var (``clear_pv_state`` below adds the dump reset of the newest kernels)."""
        self.handle = 0
        self.guest_len = 0
        self.stor_base = 0
        self.stor_var = 0


def warn(vm: Vm, function: str, what: str, handle: int, rc: int, rrc: int) -> None:
    """A kernel WARN (WARN_ONCE in pv.c): recorded on the host (``host.warnings()``) and logged."""
    message = f"{what}: rc {rc:x} rrc {rrc:x}"
    vm.host._warn(KernelWarning(function=function, message=message, vm=vm.name, handle=handle, rc=rc, rrc=rrc))
    log.warning("vm %s: %s", vm.name, message)


def clear_pv_state(vm: Vm) -> None:
    """kvm_s390_clear_pv_state. The newest kernels also end a dump in progress there (unblock
    the vCPUs, ``dumping`` false); before, ``dumping`` survived the PV state."""
    vm.pv.clear_state()
    if vm.host.profile.clear_pv_state_resets_dump and vm.pv.dumping:
        for vcpu in vm.vcpu_list:
            vcpu.sie_blocked = False
        vm.pv.dumping = False


def uv_event(vm: Vm, fmt: str, *args: object) -> None:
    """KVM_UV_EVENT: the kvm-uv debug feature, as Python logging on ``pvfast.kvm_uv``."""
    if log.isEnabledFor(logging.DEBUG):
        log.debug("vm %s: " + fmt, vm.name, *args)


# ---------------------------------------------------------------------------------------------
# vCPUs
# ---------------------------------------------------------------------------------------------


def destroy_cpu(vm: Vm, vcpu: Vcpu, rc: UvRc) -> int:
    """kvm_s390_pv_destroy_cpu: nothing without a CPU handle; else UVC 0x0121 (rc/rrc written),
    leak the donation on failure, free the SIDA page and clear the vCPU's PV fields."""
    if not vcpu.pv_handle:
        return 0
    host = vm.host
    res = native(vm.uv.destroy_cpu, vcpu.pv_handle)
    cc = res.cc
    rc.set(res.rc, res.rrc)
    uv_event(vm, "PROTVIRT DESTROY VCPU %d: rc %x rrc %x", vcpu.id, res.rc, res.rrc)
    if cc:
        warn(vm, "kvm_s390_pv_destroy_cpu", f"destroying secure CPU {vcpu.id} failed", vcpu.pv_handle, res.rc, res.rrc)
        host._leak(vcpu.stor_base, vm, vcpu.pv_handle)
    else:
        host._kfree(vcpu.stor_base)
    host._kfree(vcpu.sida)
    vcpu.clear_pv()
    # The newest kernels return -EIO, older ones a positive EIO; callers only test non-zero.
    return -EIO if cc else 0


def dispose_cpu(vm: Vm, vcpu: Vcpu) -> None:
    """kvm_s390_pv_dispose_cpu(vcpu, true) of the newest kernels: free the CPU donation and the
    SIDA page and clear the vCPU's PV fields, without a UVC."""
    vm.host._kfree(vcpu.stor_base)
    vm.host._kfree(vcpu.sida)
    vcpu.clear_pv()


def create_cpu(vm: Vm, vcpu: Vcpu, rc: UvRc) -> int:
    """kvm_s390_pv_create_cpu: donate CPU storage and a SIDA page, UVC 0x0120. On failure the
    newest kernels dispose of both; before, kvm_s390_pv_destroy_cpu returned at once (no CPU
    handle), so both stayed allocated, still pointed to by the vCPU, and leaked."""
    host = vm.host
    if vcpu.pv_handle:
        return -EINVAL
    stor = host._kalloc("cpu_stor", vm.host.uv_info["guest_cpu_stor_len"])
    if stor is None:
        return -ENOMEM
    sida = host._kalloc("sida", PAGE_SIZE)
    if sida is None:
        host._kfree(stor)
        return -ENOMEM
    vcpu.stor_base = stor
    vcpu.sida = sida
    res = native(vm.uv.create_cpu, vm.pv.handle, num=vcpu.id, stor_len=vm.host.uv_info["guest_cpu_stor_len"])
    rc.set(res.rc, res.rrc)
    uv_event(vm, "PROTVIRT CREATE VCPU: cpu %d handle %x rc %x rrc %x", vcpu.id, res.handle, res.rc, res.rrc)
    vcpu.pv_handle = res.handle if not res.cc else 0
    if res.cc:
        if vm.host.profile.create_cpu_fail_frees:
            dispose_cpu(vm, vcpu)
        else:
            destroy_cpu(vm, vcpu, UvRc())  # returns at once: no CPU handle
        return -EIO
    vcpu.pv_handle_config = vm.pv.handle
    vcpu.sdf = 2
    return 0


def cpus_from_pv(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_cpus_from_pv: destroy every secure CPU (each under its vcpu->mutex, so no guest
    access is in progress on it), never stop early; the caller's rc/rrc get the values of the
    first destroy that fails only (successful destroys write a local copy); then GISA is
    re-enabled (when in use) whatever the destroys returned."""
    for vcpu in vm.vcpu_list:
        if vcpu.mutex.locked() and on_stack(VCPU_RUN_CODES, _runs_on(vcpu)):
            # A signal handler on the thread whose guest access it interrupted: that vCPU runs
            # on this very thread (the kernel would run the handler after KVM_RUN returned).
            raise ValueError(
                f"vcpu: vCPU {vcpu.id} is running a guest access on this thread; destroy its secure CPU "
                "after that access returns (not from a signal handler that interrupted it)"
            )
    ret = 0
    for vcpu in vm.vcpu_list:
        local = UvRc()
        with vcpu.mutex:
            err = destroy_cpu(vm, vcpu, local)
        if err and not ret:
            rc.set(local.rc, local.rrc)
            ret = -EIO
    if vm.host.use_gisa:
        vm.gisa_enabled = True
    return ret


def _runs_on(vcpu: Vcpu) -> Callable[[Mapping[str, object]], bool]:
    return lambda loc: loc.get("run") is vcpu


def cpus_to_pv(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_cpus_to_pv: a secure CPU for every vCPU; on failure undo them all."""
    if not vm.host.feature_aiv:
        vm.gisa_enabled = False
    for vcpu in vm.vcpu_list:
        with vcpu.mutex:
            err = create_cpu(vm, vcpu, rc)
        if err:
            cpus_from_pv(vm, UvRc())
            return err
    return 0


# ---------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------


def dealloc_vm(vm: Vm) -> None:
    """kvm_s390_pv_dealloc_vm: free both donations and clear the PV state."""
    vm.host._kfree(vm.pv.stor_base)
    vm.host._kfree(vm.pv.stor_var)
    clear_pv_state(vm)


def _register_notifier(vm: Vm) -> int:
    """Register the mm-release notifier once per VM (the ops pointer is the "registered" mark).
    mmu_notifier_register fails with -EINTR when the task has a signal pending."""
    if vm.pv.mmu_notifier is not None:
        return 0
    notifier = MmuNotifier(lambda _mm: mmu_notifier_release(vm))
    r = vm.mm._mmu_notifier_register(notifier, signal_pending=vm.process.fatal_signal.is_set())
    if r and vm.host.profile.notifier_register_first:
        return r  # ops reset to NULL: ENABLE fails before anything is allocated
    vm.pv.mmu_notifier = notifier  # before the fix: ops set even when registering failed
    return 0


def init_vm(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_pv_init_vm: donations, Create Config; handle and counter set whatever the result.
    The newest kernels register the mm notifier first and fail with its error; before, it was
    registered after a successful Create Config and its error ignored."""
    host = vm.host
    if host.profile.notifier_register_first:
        r = _register_notifier(vm)
        if r:
            return r
    info = host.uv_info
    base_len = info["guest_base_stor_len"]
    base = host._kalloc("stor_base", base_len)
    if base is None:
        return -ENOMEM
    guest_len = vm.memory_size  # end of the highest memslot
    npages_1m = guest_len // SZ_1M
    vlen = -(-(info["guest_virt_var_stor_len"] * npages_1m) // PAGE_SIZE) * PAGE_SIZE
    vlen += info["guest_virt_base_stor_len"]
    var = host._kalloc("stor_var", vlen)
    if var is None:
        host._kfree(base)
        return -ENOMEM
    vm.pv.stor_base = base
    vm.pv.stor_var = var
    vm.pv.guest_len = guest_len
    res = native(
        vm.uv.create_config,
        vm.region,
        guest_len=guest_len,
        asce=vm.gmap.asce,
        sca=vm.sca,
        base_stor_len=base_len,
        var_stor_len=vlen,
    )
    rc.set(res.rc, res.rrc)
    handle = res.handle
    vm.pv.handle = handle
    vm.mm._protected_inc()
    uv_event(vm, "PROTVIRT CREATE VM: handle %x len %x rc %x rrc %x", handle, guest_len, res.rc, res.rrc)
    if res.cc:
        if res.rc & UVC_RC_NEED_DESTROY:
            deinit_vm(vm, UvRc())
        else:
            vm.mm._protected_dec()
            dealloc_vm(vm)
        return -EIO
    if not host.profile.no_guest_handle:
        vm.gmap.guest_handle = handle
    if not host.profile.notifier_register_first:
        _register_notifier(vm)
    return 0


def deinit_vm(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_pv_deinit_vm: Destroy Config of the current VM; no memory walk."""
    handle = vm.pv.handle  # read here, as the kernel reads it for the UVC
    res = native(vm.uv.destroy_config, handle)
    rc.set(res.rc, res.rrc)
    vm.gmap.guest_handle = 0
    if not res.cc:
        vm.mm._protected_dec()
        dealloc_vm(vm)
    else:
        # Intended leak: the UV may still use the donations and the top table.
        leaked = [vm.pv.stor_base, vm.pv.stor_var, vm.gmap.table]
        vm.host._leak(vm.pv.stor_base, vm, vm.pv.handle)
        vm.host._leak(vm.pv.stor_var, vm, vm.pv.handle)
        old_table = vm.gmap.table
        vm.gmap.replace_asce()
        vm.host._leak(old_table, vm, vm.pv.handle)
        warn(vm, "kvm_s390_pv_deinit_vm", "destroying the secure configuration failed", handle, res.rc, res.rrc)
        _note_notifier_race(vm, handle, "kvm_s390_pv_deinit_vm", leaked)
    uv_event(vm, "PROTVIRT DESTROY VM: rc %x rrc %x", res.rc, res.rrc)
    return -EIO if res.cc else 0


def _note_notifier_race(vm: Vm, handle: int, function: str, leaked: list[int]) -> None:
    """A destroy of the current configuration failed because it was already gone: nothing but
    the mm-release notifier's Destroy-Fast, which takes no lock, can have destroyed it meanwhile
    (KERNEL.md, "the mm-release notifier races VM destroy"). The kernel only WARNs; the host
    records it (``host.races()``) with what it left on the leak ledger."""
    if handle and handle in vm.uv.config_handles():
        return  # the configuration lives: an ordinary UV failure
    vm.host.note_race(
        "mmu_notifier_release vs kvm_arch_destroy_vm",
        function,
        vm,
        handle,
        [addr for addr in leaked if addr and vm.host.allocated(addr)],
    )


def deinit_vm_fast(vm: Vm, rc: UvRc | None) -> int:
    """kvm_s390_pv_deinit_vm_fast: Destroy-Fast (0x0102); the counter is left to the caller.
    WARN_ONCE on a failure; since b1e428615f15 not for rc 0x0104 (APQNs still bound)."""
    handle = vm.pv.handle
    res = native(vm.uv.destroy_config_fast, handle)
    if rc is not None:
        rc.set(res.rc, res.rrc)
    vm.gmap.guest_handle = 0  # up to the gmap rewrite: zeroed whatever the result
    if not res.cc:
        dealloc_vm(vm)
    uv_event(vm, "PROTVIRT DESTROY VM FAST: rc %x rrc %x", res.rc, res.rrc)
    if res.cc:
        _note_notifier_race(vm, handle, "kvm_s390_pv_deinit_vm_fast", [])
        if res.rc != UVC_RC_DESTROY_FAST_APQN or not vm.host.profile.fast_0x104_no_warn:
            warn(vm, "kvm_s390_pv_deinit_vm_fast", "Destroy-Fast failed", handle, res.rc, res.rrc)
            vm.host.warn_once(
                "kvm_s390_pv_deinit_vm_fast", f"protvirt destroy vm fast failed rc {res.rc:x} rrc {res.rrc:x}"
            )
        else:
            log.info("vm %s: Destroy-Fast failed: rc %x rrc %x", vm.name, res.rc, res.rrc)
    return -EIO if res.cc else 0


def dispose_one_leftover(vm: Vm, rec: AsideRecord, rc: UvRc) -> int:
    """kvm_s390_pv_dispose_one_leftover: fast records only drop the count; slow ones Destroy Config."""
    if rec.fast:
        vm.mm._protected_dec()
        return 0
    res = native(vm.uv.destroy_config, rec.handle)
    rc.set(res.rc, res.rrc)
    uv_event(vm, "PROTVIRT DESTROY LEFTOVER VM: handle %x rc %x rrc %x", rec.handle, res.rc, res.rrc)
    if res.cc:
        warn(
            vm,
            "kvm_s390_pv_dispose_one_leftover",
            "destroying a leftover configuration failed",
            rec.handle,
            res.rc,
            res.rrc,
        )
        for addr in (rec.stor_base, rec.stor_var, rec.old_gmap_table):
            vm.host._leak(addr, vm, rec.handle)
        return res.cc
    vm.host._kfree(rec.stor_base)
    vm.host._kfree(rec.old_gmap_table)
    vm.host._kfree(rec.stor_var)
    vm.mm._protected_dec()
    return 0


def destroy_lower_2g(vm: Vm) -> None:
    """Synchronous, non-interruptible destroy of guest absolute [0, 2 GiB) (every memslot below
    2 GiB; the newest kernels walk the gmap, with the export fallback)."""
    end_page = min(vm.memory_size, SZ_2G) // PAGE_SIZE
    native(vm.uv.destroy_walk, vm.region, 0, end_page, None, export_refused=vm.host.profile.walk_export_fallback)


def destroy_range(vm: Vm, cancel: _native.CancelToken | None) -> bool:
    """The walk of PERFORM (interruptible: ``cancel``) and of cleanup-all's zap: the whole
    address space up to the gmap rewrite (__s390_uv_destroy_range(mm, 0, TASK_SIZE)), the VM's
    own memory since (gmap_pv_destroy_range, with the export fallback). False if interrupted."""
    profile = vm.host.profile
    return vm.mm._destroy_range(
        cancel, vm.region if profile.walk_own_gmap else None, export_refused=profile.walk_export_fallback
    )


def set_aside(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_pv_set_aside: keep the old VM for PERFORM; clean [0, 2 GiB) now. Since
    292a7d6fca33 a VM with a segment ASCE is refused, Destroy-Fast or not."""
    if vm.pv.set_aside is not None:
        return -EINVAL
    if vm.gmap.asce_type == "segment" and vm.host.profile.segment_asce_refused:
        return -EINVAL
    kaddr = vm.host._kalloc("aside_record", 64)
    if kaddr is None:
        return -ENOMEM
    rec = AsideRecord(kaddr=kaddr)
    if vm.host.destroy_fast_available:
        res = deinit_vm_fast(vm, rc)
        if res:
            vm.host._kfree(kaddr)
            return res
    else:
        rec = AsideRecord(
            handle=vm.pv.handle,
            stor_base=vm.pv.stor_base,
            stor_var=vm.pv.stor_var,
            old_gmap_table=vm.gmap.table,
            kaddr=kaddr,
        )
        vm.gmap.guest_handle = 0
        if vm.gmap.replace_asce():
            # The old table was unlisted before the failure and nobody points to it now.
            vm.host._leak(rec.old_gmap_table, vm, rec.handle)
            vm.host._kfree(kaddr)
            return -ENOMEM
    destroy_lower_2g(vm)
    clear_pv_state(vm)
    vm.pv.set_aside = rec
    rc.set(UVC_RC_EXECUTED, ASYNC_RRC)
    uv_event(vm, "PROTVIRT SET ASIDE: handle %x fast %d", rec.handle, int(rec.fast))
    return 0


def deinit_aside_vm(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_pv_deinit_aside_vm (PERFORM): claim under the lock, walk without it, dispose."""
    with vm.lock:
        rec = vm.pv.set_aside
        vm.pv.set_aside = None
        if rec is not None:
            vm.pv.performing += 1
    if rec is None:
        return -EINVAL
    ret = 0
    try:
        try:
            vm.perform_started.set()
            race = vm.host.race
            if race.armed:
                race.hit("perform_claimed", vm=vm, process=vm.process)
            finished = destroy_range(vm, vm.process.fatal_signal)
        except BaseException:
            # A Python-level interrupt (Ctrl-C, a handler's exception) in the interruptible part:
            # unwind as a fatal signal would, the record goes to need_cleanup; then re-raise.
            _queue_leftover(vm, rec)
            raise
        if finished:
            with Uninterruptible():  # the dispose of a walked record is not interrupted
                if dispose_one_leftover(vm, rec, rc):
                    ret = -EIO
                vm.host._kfree(rec.kaddr)
            return ret
        _queue_leftover(vm, rec)
        rc.set(UVC_RC_EXECUTED, ASYNC_RRC)
        return 0
    finally:
        with vm.lock:
            vm.pv.performing -= 1


def _queue_leftover(vm: Vm, rec: AsideRecord) -> None:
    """An interrupted PERFORM: the claimed record goes to the head of need_cleanup (list_add)."""
    with vm.lock:
        vm.pv.need_cleanup.insert(0, rec)
    uv_event(vm, "PROTVIRT ASYNC CLEANUP interrupted: handle %x queued as leftover", rec.handle)


def deinit_cleanup_all(vm: Vm, rc: UvRc) -> int:
    """kvm_s390_pv_deinit_cleanup_all: current VM, set-aside, leftovers, then the zap. It holds a
    protected_count reference meanwhile: since 5ff92181577a only if the count is not 0 (else it
    returns at once); before, it raised the count from 0 too, so for its duration the mm looked
    protected to a page-table teardown running in parallel."""
    mm = vm.mm
    if vm.host.profile.cleanup_all_skip_if_zero:
        if not mm._protected_inc_not_zero():
            return 0
    else:
        mm._protected_inc()
    race = vm.host.race
    if race.armed:
        race.hit("cleanup_all_counted", vm=vm, process=vm.process)
    rc.rc = UVC_RC_EXECUTED
    cc = 0
    need_zap = False
    if vm.pv.handle:
        if race.armed:
            race.hit("cleanup_all_deinit_vm", vm=vm, process=vm.process)
        cc = deinit_vm(vm, rc)
        need_zap = True
    if vm.pv.set_aside is not None:
        vm.pv.need_cleanup.insert(0, vm.pv.set_aside)
        vm.pv.set_aside = None
    tmp = UvRc()
    while vm.pv.need_cleanup:
        rec = vm.pv.need_cleanup.pop(0)
        need_zap = True
        if dispose_one_leftover(vm, rec, tmp):
            cc = 1
            if rc.rc == UVC_RC_EXECUTED:  # first error wins; a failed current-VM destroy comes first
                rc.set(tmp.rc, tmp.rrc)
        vm.host._kfree(rec.kaddr)
    if race.armed:
        race.hit("cleanup_all_before_zap", vm=vm, process=vm.process)
    if need_zap and mm._mmget_not_zero():
        destroy_range(vm, None)
        mm._mmput()
    mm._protected_dec()
    return -EIO if cc else 0


def mmu_notifier_release(vm: Vm) -> None:
    """kvm_s390_pv_mmu_notifier_release: CPUs gone, then Destroy-Fast if available; count untouched."""
    r = cpus_from_pv(vm, UvRc())
    fast = not r and vm.host.destroy_fast_available and vm.pv.handle != 0
    race = vm.host.race
    if race.armed:
        race.hit("notifier_release", vm=vm, process=vm.process, fast=fast)
    if fast:
        deinit_vm_fast(vm, None)  # reads the handle again, as the kernel does


# ---------------------------------------------------------------------------------------------
# image and simple commands
# ---------------------------------------------------------------------------------------------


def unpack(vm: Vm, addr: int, size: int, tweak: int, rc: UvRc) -> int:
    """kvm_s390_pv_unpack: page by page; a fatal signal stops it only where the kernel retries."""
    if addr % PAGE_SIZE or not size or size % PAGE_SIZE:
        return -EINVAL
    res = vm.uv.unpack_range(
        vm.pv.handle,
        vm.region,
        addr,
        size,
        tweak,
        export_first=should_export_before_import(vm.host, vm.mm),
        cancel=vm.process.fatal_signal,
    )
    if res.status != "ok" or res.pages_done:
        rc.set(res.rc, res.rrc)
    if res.status == "ok":
        uv_event(vm, "PROTVIRT VM UNPACK: successful rc %x rrc %x", res.rc, res.rrc)
        return 0
    failed_at = addr + res.pages_done * PAGE_SIZE
    uv_event(vm, "PROTVIRT VM UNPACK: failed addr %x rc %x rrc %x", failed_at, res.rc, res.rrc)
    return {"eagain": -EAGAIN, "einval": -EINVAL, "efault": -EFAULT, "eintr": -EINTR}.get(res.status, -EINVAL)
