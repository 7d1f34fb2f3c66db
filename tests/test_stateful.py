"""Differential stateful test: pvfast against the independent reference model (tests/model/pvmodel.py).

A hypothesis ``RuleBasedStateMachine`` drives one ``pvfast.Host`` and one ``Model`` with the same
random steps (host options, ENABLE/DISABLE/PREPARE/PERFORM and the other PV commands, PERFORM split
into claim + finish with a real thread, vCPU hotplug, guest/host memory accesses above and below
2 GiB, guest shares, injected UV failures, kill/exit, CLONE_VM helpers, VM close) and compares,
after every step, every observable both sides expose: errno/rc/rrc of each command, the
``pv_state()`` fields, the UV's configurations (through a handle map), secure pages per owner, the
state of every touched page, and the per-step deltas of the UVC counters. The invariants of
docs/VERIFICATION.md §8 are checked on both sides after every step (the model's
``check_invariants`` plus checks on pvfast's own state).

Deliberate differences between the two (each explained in docs/VERIFICATION.md §1) are applied
in ``_expected_stats_delta``/``_compare``; everything else must match exactly.

Profiles: ``quick`` (default, CI) and ``HYPOTHESIS_PROFILE=long``; the number of steps run is
printed (``-s``) and, with ``PVFAST_STATEFUL_REPORT=<file>``, appended to that file.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pvfast
import pvfast.image
from pvfast import PvCmd, PvError, Uvc, UvcError

from .conftest import unexplained_leaks
from .model import pvmodel as pm

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096
LOW_LIMIT_PAGES = (2 * GiB) // PAGE

JOIN_TIMEOUT = 60.0  # a gated PERFORM that does not come back within this is a deadlock

# UVCs whose per-step counts are compared. QUI/INIT_UV are boot-only.
COMPARED_UVCS = (
    "CREATE_SEC_CONF",
    "DESTROY_SEC_CONF",
    "DESTROY_SEC_CONF_FAST",
    "CREATE_SEC_CPU",
    "DESTROY_SEC_CPU",
    "CONV_TO_SEC_STOR",
    "CONV_FROM_SEC_STOR",
    "DESTR_SEC_STOR",
    "SET_SHARED_ACCESS",
    "PIN_PAGE_SHARED",
    "SET_UNSHARE_ALL",
    "SET_SEC_CONF_PARAMS",
    "UNPACK_IMG",
    "VERIFY_IMG",
    "PREPARE_RESET",
    "DUMP_INIT",
    "DUMP_CONF_STOR_STATE",
    "DUMP_COMPLETE",
)

# (uvc name, rc) pairs of the failures the machine may inject. Teardown-relevant first.
INJECTABLE = (
    ("DESTROY_SEC_CONF", 0x0003),
    ("DESTROY_SEC_CONF_FAST", 0x0104),
    ("DESTROY_SEC_CONF_FAST", 0x0003),
    ("DESTROY_SEC_CPU", 0x0003),
    ("CREATE_SEC_CONF", 0x0003),
    ("CREATE_SEC_CONF", 0x8003),
    ("CREATE_SEC_CPU", 0x0003),
    ("DESTR_SEC_STOR", 0x0003),
    ("CONV_FROM_SEC_STOR", 0x0003),
    ("CONV_TO_SEC_STOR", 0x0003),
)

# VERIFY is driven by the boot_image rule: the model does not model image verification.
PV_CMDS = (
    PvCmd.ENABLE,
    PvCmd.DISABLE,
    PvCmd.ASYNC_CLEANUP_PREPARE,
    PvCmd.ASYNC_CLEANUP_PERFORM,
    PvCmd.PREP_RESET,
    PvCmd.UNSHARE_ALL,
)

STEPS = {"steps": 0, "examples": 0, "seconds": 0.0}

# Boot images (built once): a kernel below 2 GiB, and for >2 GiB guests a second component above.
_IMAGES: dict[bool, tuple[Any, list[bytes]]] = {}


def boot_image(high: bool) -> tuple[Any, list[bytes]]:
    if high not in _IMAGES:
        plain = [b"kernel" * 1500, b"initrd" * 700]
        comps = [(0x10000, plain[0])] + ([(2 * GiB + 0x20000, plain[1])] if high else [])
        _IMAGES[high] = (pvfast.image.build(comps), plain[: len(comps)])
    return _IMAGES[high]


class ComparedModel(pm.Model):
    """The reference model with pvfast's documented choice where the kernel's behaviour is ambiguous.

    Each override names the item of docs/VERIFICATION.md §1 it implements. D2: a protected guest
    touching a page that another live configuration has made SHARED. Such an access raises no
    exception (a shared page does not fault), so the model does nothing; pvfast (``Vm.guest_access``
    "resolves pages owned by another configuration", _native.pyi import_range) treats it like any
    foreign page: export-before-import when should_export_before_import says so, then import (which
    the UV allows only with MISC).
    """

    def guest_access(self, vm_id, page, n=1, write=True, vcpu=0):
        vm = self._open_vm(vm_id)
        self._check_range(vm, page, n)
        if not self._guest_protected(vm, vcpu):
            return super().guest_access(vm_id, page, n, write, vcpu)
        for p in range(page, page + n):
            key = (vm.id, p)
            vm.mm.present.add(key)
            state, owner = self.uv.page_state(key)
            if owner == vm.handle and state in (pm.SECURE, pm.SHARED):
                continue
            if state in (pm.SECURE, pm.ORPHANED):
                # secure-storage violation: destroy page, export if that fails (gmap_destroy_page)
                cc, _, _, _ = self.uv.destroy_page(key, "violation")
                if cc:
                    self.uv.export_page(key, "violation")
                    # D10: pvfast goes on with the import even when the export failed too (the
                    # import then fails); the model returns EFAULT before importing.
            # D2: a SHARED page of another configuration is imported like any foreign page
            if self._make_secure(vm, p, "CONV_TO_SEC_STOR", pm.Cmd()):
                return pm.EINVAL
        return 0

    def exit(self, pid):
        """M4 (VERIFICATION.md): a VM whose fd was closed while its PERFORM ran is released by the
        PERFORM thread itself when the fatal signal ends the ioctl: the deferred fput runs as task
        work before that thread's own exit_mm, so cleanup-all still finds the mm alive and zaps.
        The model (MODEL.md §4 item 18) runs that release after the mm user is dropped."""
        proc = self.processes[pid]
        if proc.alive:
            for token_id, token in list(self.tokens.items()):
                if token.vm.pid == pid:
                    self.perform_finish(token_id, interrupted=True, batches=0)
        return super().exit(pid)


def pv_call(vm: pvfast.Vm, cmd: int, rc: int = 0, rrc: int = 0, **data: Any) -> tuple[int, int, int]:
    """pvfast's ioctl as the model's (errno or 0, rc, rrc) triple."""
    try:
        res = vm.pv_command(cmd, rc=rc, rrc=rrc, **data)
    except PvError as err:
        return (err.errno or 0, err.rc, err.rrc)
    return (0, res.rc, res.rrc)


@dataclass
class ProcPair:
    proc: pvfast.Process
    pid: int
    helper: bool = False


@dataclass
class VmPair:
    vm: pvfast.Vm
    vid: int
    proc: ProcPair
    region: Any  # the _native.Region (stays valid while the mm lives)
    mm: Any  # pvfast AddressSpace


@dataclass
class GatedPerform:
    """A PERFORM in its own thread, stopped between the claim and the walk (kvm_s390_pv_deinit_aside_vm
    has taken the record under kvm->lock and dropped the lock, its walk has not started)."""

    pair: VmPair
    rc_in: int
    rrc_in: int
    release: threading.Event = field(default_factory=threading.Event)
    entered: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    result: tuple[int, int, int] | None = None
    exc: BaseException | None = None
    thread: threading.Thread | None = None
    token: int | None = None
    seq: int = 0


class PvMachine(RuleBasedStateMachine):
    """pvfast and the model, step by step."""

    def __init__(self) -> None:
        super().__init__()
        self.host: pvfast.Host | None = None
        self.model: pm.Model | None = None
        self.procs: list[ProcPair] = []
        self.vms: list[VmPair] = []
        self.gates: list[GatedPerform] = []
        self.gate_by_thread: dict[int, GatedPerform] = {}
        self.handle_map: dict[int, int] = {}  # model handle -> pvfast handle
        self.patched_mms: set[int] = set()
        self.injected = False
        self.failures = False
        self.injections = 0
        self.gate_seq = 0
        self.booted: set[int] = set()  # pvfast handles that got SET_SEC_PARMS already
        self.last_stats: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self.t0 = time.perf_counter()
        STEPS["examples"] += 1

    # ------------------------------------------------------------------ set-up

    @initialize(
        async_destroy=st.sampled_from([1, 1, 1, 0, 7]),
        destroy_fast=st.booleans(),
        misc=st.booleans(),
        aiv=st.booleans(),
        size=st.sampled_from([3 * GiB, 3 * GiB, 3 * GiB, 2 * GiB, 2 * GiB + MiB]),
        vcpus=st.integers(1, 2),
        failures=st.booleans(),
        kernel=st.sampled_from(pm.KERNELS),
    )
    def boot(
        self,
        async_destroy: int,
        destroy_fast: bool,
        misc: bool,
        aiv: bool,
        size: int,
        vcpus: int,
        failures: bool,
        kernel: str,
    ) -> None:
        self.failures = failures  # half of the runs inject no failure at all (invariant 13 at the end)
        # walk_threads=1: the walk visits pages in the model's order (matters for DESTR injections)
        self.host = pvfast.Host(
            kernel=kernel,
            async_destroy=async_destroy,
            destroy_fast=destroy_fast,
            feature_misc=misc,
            feature_aiv=aiv,
            walk_threads=1,
        )
        assert self.host.kernel == kernel
        info = self.host.uv.info()
        self.model = ComparedModel(
            kernel=kernel,
            async_destroy=async_destroy,
            destroy_fast=destroy_fast,
            feature_misc=misc,
            feature_aiv=aiv,
            conf_dump_storage_state_len=info["conf_dump_storage_state_len"],
            conf_dump_finalize_len=info["conf_dump_finalize_len"],
        )
        # D1 fixed: pvfast now issues destroy-page on every present PTE at mm teardown, like the model
        self._wrap_model_create()
        self._wrap_model_dump()
        self._wrap_model_unpack()
        assert self.host.check_extension(224) == self.model.check_extension(224)
        assert self.host.read_sysfs("/sys/module/kvm/parameters/async_destroy") == f"{async_destroy}\n"
        self.last_stats = (self.host.uv.stats(), self.model.uv.stats())
        p = self._spawn()
        self._create_vm(p, size, vcpus)

    def _wrap_model_create(self) -> None:
        """D7: an injected Create Config failure whose rc carries 0x8000 (NEED_DESTROY) creates a
        configuration in pvfast (the rc says "a handle exists anyway, destroy it": UVC_RC_NEED_DESTROY,
        which kvm_s390_pv_init_vm answers with a Destroy Config); the model keeps "change nothing" and
        returns handle 0. Follow pvfast here."""
        model = self.model
        assert model is not None
        uv = model.uv
        real = uv.create_conf

        def create_conf(table: Any, guest_len: int) -> Any:
            queue = uv.injections.get("CREATE_SEC_CONF")
            if queue and queue[0].after == 0 and queue[0].rc & pm.UVC_RC_NEED_DESTROY:
                head = queue[0]
                rc, rrc = head.rc, head.rrc
                head.count -= 1
                if head.count <= 0:
                    queue.popleft()
                saved = uv.injections.pop("CREATE_SEC_CONF", None)
                try:
                    _cc, _rc, _rrc, handle = real(table, guest_len)
                finally:
                    if saved:
                        uv.injections["CREATE_SEC_CONF"] = saved
                uv.injected_fired += 1
                return (1, rc, rrc, handle)
            return real(table, guest_len)

        uv.create_conf = create_conf  # type: ignore[method-assign]

    def _wrap_model_unpack(self) -> None:
        """M3: UNPACK into a page that is already SECURE/SHARED and owned by the same configuration
        is unspecified; the model lets it succeed (MODEL.md §4 item 9), pvfast's UV refuses it
        (rc 0x0003), as an import of a page that is already secure. Follow pvfast."""
        model = self.model
        assert model is not None
        uv = model.uv
        real = uv.import_page

        def import_page(name: str, handle: int, key: Any, ebi_rule: Any) -> Any:
            state, owner = uv.page_state(key)
            if name == "UNPACK_IMG" and owner == handle and state in (pm.SECURE, pm.SHARED):
                return uv._call(name, key, uv._refused, "import", ebi_rule)
            return real(name, handle, key, ebi_rule)

        uv.import_page = import_page  # type: ignore[method-assign]

    def _wrap_model_dump(self) -> None:
        """M2: the model's UV keeps no per-configuration dump state, so after DUMP_INIT, DISABLE and
        ENABLE (the kernel's ``dumping`` flag survives them up to 6.6: kvm_s390_clear_pv_state) it
        lets the *new* configuration run DUMP_CONF_STOR_STATE/DUMP_COMPLETE. pvfast's UV refuses them
        for a configuration that never saw DUMP_INIT (rc 0x0003). Give the model's UV that
        per-configuration state."""
        model = self.model
        assert model is not None
        uv = model.uv
        real = uv.nodata
        dumping: set[int] = set()

        def nodata(name: str, handle: int, *, valid: bool = True, gaddr: int = 0) -> Any:
            if name in ("DUMP_CONF_STOR_STATE", "DUMP_COMPLETE") and handle in uv.configs and handle not in dumping:
                return uv._call(name, handle, uv._refused)
            result = real(name, handle, valid=valid, gaddr=gaddr)
            if result[0] == 0 and name == "DUMP_INIT":
                dumping.add(handle)
            if result[0] == 0 and name == "DUMP_COMPLETE":
                dumping.discard(handle)
            return result

        uv.nodata = nodata  # type: ignore[method-assign]

    def _patch_mm(self, mm: Any) -> None:
        """Let a PERFORM thread stop between its claim and its walk (test instrumentation)."""
        if id(mm) in self.patched_mms:
            return
        self.patched_mms.add(id(mm))
        real = mm._destroy_range

        def destroy_range(cancel: Any, *args: Any, **kwargs: Any) -> bool:
            gate = self.gate_by_thread.get(threading.get_ident())
            if gate is None or cancel is None:
                return real(cancel, *args, **kwargs)
            gate.entered.set()
            while not gate.release.wait(0.0005):
                if cancel.is_set():
                    # The fatal signal came before the walk's first batch: the model's
                    # perform_finish(interrupted=True, batches=0). (VERIFICATION.md, harness H1)
                    gate.cancelled = True
                    # Two interrupted PERFORMs queue their records in a racy order; the model
                    # finishes them in claim order, so let earlier claims return first (H1).
                    for other in list(self.gates):
                        if other.seq < gate.seq and other.pair.proc is gate.pair.proc and other.thread is not None:
                            other.thread.join(JOIN_TIMEOUT)
                    return False
            return real(cancel, *args, **kwargs)

        mm._destroy_range = destroy_range

    def _spawn(self) -> ProcPair:
        assert self.host is not None
        assert self.model is not None
        proc = self.host.spawn_process()
        pid = self.model.spawn_process()
        self._patch_mm(proc.mm)
        pair = ProcPair(proc, pid)
        self.procs.append(pair)
        return pair

    def _create_vm(self, p: ProcPair, size: int, vcpus: int) -> VmPair:
        assert self.model is not None
        vm = p.proc.create_vm(size, vcpus)
        vid = self.model.create_vm(p.pid, size, vcpus)
        pair = VmPair(vm, vid, p, vm.region, vm.mm)
        self.vms.append(pair)
        return pair

    # ------------------------------------------------------------------ selection helpers

    def _live_procs(self, with_fds: bool | None = None) -> list[ProcPair]:
        return [p for p in self.procs if p.proc.alive and (with_fds is None or (not p.helper) == with_fds)]

    def _open_vms(self) -> list[VmPair]:
        return [v for v in self.vms if not v.vm.closed]

    def _pick(self, items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    def has_open_vm(self) -> bool:
        return bool(self._open_vms())

    def _pending(self, *names: str) -> bool:
        """An injected failure of one of these UVCs is still waiting to fire."""
        if self.model is None:
            return False
        return any(self.model.uv.injections.get(n) for n in names)

    def _fault_injections_pending(self) -> bool:
        return self._pending("CONV_TO_SEC_STOR", "CONV_FROM_SEC_STOR", "DESTR_SEC_STOR")

    def _accessible(self) -> list[VmPair]:
        """VMs whose guest may touch memory now (all open ones; since the B2 fix a non-protected
        guest access that cannot make a page accessible fails as in the model)."""
        return self._open_vms()

    # ------------------------------------------------------------------ processes and VMs

    def spawn_process(self) -> None:
        self._spawn()

    def create_vm(self, i: int, size: int, vcpus: int) -> None:
        self._create_vm(self._pick(self._live_procs(with_fds=True), i), size, vcpus)

    def clone_helper(self, i: int) -> None:
        assert self.model is not None
        p = self._pick(self._live_procs(with_fds=True), i)
        child = p.proc.clone_vm()
        pid = self.model.clone_vm(p.pid)
        self.procs.append(ProcPair(child, pid, helper=True))
        assert child.name == f"cleanup/{p.proc.pid}"

    def create_vcpu(self, i: int) -> None:
        assert self.model is not None
        v = self._pick(self._open_vms(), i)
        if v.vm.vcpus >= 3:
            return
        try:
            v.vm.create_vcpu()
            got = (0, 0, 0)
        except (PvError, UvcError) as err:
            got = (err.errno or 0, err.rc, err.rrc)
        want = self.model.create_vcpu(v.vid)
        assert got[0] == want.err, (got, want)
        if got[0]:
            assert got[1:] == (want.rc, want.rrc)

    def _closable(self) -> list[VmPair]:
        # A VM with a PERFORM in flight may be closed too: its destroy runs when PERFORM returns
        # (the ioctl holds the file), in pvfast since the B1 fix as in the model.
        return self._open_vms()

    def close_vm(self, i: int) -> None:
        assert self.model is not None
        v = self._pick(self._closable(), i)
        v.vm.close()
        self.model.close_vm(v.vid)
        with pytest.raises(ValueError, match="VM is closed"):
            v.vm.pv_state()

    def end_process(self, i: int, kill: bool) -> None:
        assert self.model is not None
        p = self._pick(self._live_procs(), i)
        gates = [g for g in self.gates if g.pair.proc is p]
        if kill:
            p.proc.kill()
            self.model.kill(p.pid)
        else:
            p.proc.exit()
            self.model.exit(p.pid)
        assert not p.proc.alive
        assert not self.model.process_alive(p.pid)
        # interrupted PERFORMs: rc 1 / rrc 42, record on need_cleanup (kvm_s390_pv_deinit_aside_vm)
        for g in gates:
            self._join(g)
            assert g.result == (0, pm.UVC_RC_EXECUTED, pm.RRC_KVM_SYNTHETIC), g.result
            self.gates.remove(g)

    @rule(
        op=st.sampled_from(["spawn", "create_vm", "clone", "vcpu", "close", "exit", "kill"]),
        i=st.integers(0, 99),
        size=st.sampled_from([3 * GiB, 3 * GiB, 3 * GiB, 2 * GiB, 2 * GiB + MiB]),
        vcpus=st.integers(0, 2),
    )
    def lifecycle(self, op: str, i: int, size: int, vcpus: int) -> None:
        """Processes, helpers, VMs and vCPUs (one rule, so they do not crowd out the PV steps)."""
        fds = self._live_procs(with_fds=True)
        if op == "spawn" and len(fds) < 3:
            self.spawn_process()
        elif op == "create_vm" and fds and len(self._open_vms()) < 3:
            self.create_vm(i, size, vcpus)
        elif op == "clone" and fds and len(self._live_procs(with_fds=False)) < 2:
            self.clone_helper(i)
        elif op == "vcpu" and self.has_open_vm():
            self.create_vcpu(i)
        elif op == "close" and self._closable():
            self.close_vm(i)
        elif op in ("exit", "kill") and self._live_procs():
            self.end_process(i, op == "kill")

    # ------------------------------------------------------------------ PV commands

    @precondition(has_open_vm)
    @rule(
        i=st.integers(0, 99),
        cmd=st.sampled_from(PV_CMDS),
        rc_in=st.sampled_from([0, 0, 0, 0x77]),
        rrc_in=st.sampled_from([0, 0, 0, 0x88]),
        data=st.none()
        | st.tuples(
            st.sampled_from([PvCmd.INFO, PvCmd.DUMP, 11, 255]),
            st.integers(0, 3),
            st.sampled_from([0, 16, 40, 79, 80, 4096]),
            st.sampled_from([0, 512, 4096, 8192]),
            st.sampled_from([0, MiB, 3 * GiB - MiB, 3 * GiB, 12345]),
        ),
    )
    def any_command(self, i: int, cmd: int, rc_in: int, rrc_in: int, data: Any) -> None:
        """Any command on any VM (error paths included); with ``data``: INFO/DUMP/unknown ids."""
        if data is not None:
            self.pv_command_data(i, *data)
        else:
            self.pv_command(i, cmd, rc_in, rrc_in)

    def pv_command(self, i: int, cmd: int, rc_in: int, rrc_in: int, v: VmPair | None = None) -> None:
        assert self.model is not None
        assert self.host is not None
        if v is None:
            v = self._pick(self._open_vms(), i)
        before = v.vm.pv_state()
        got = pv_call(v.vm, cmd, rc_in, rrc_in)
        want = self.model.pv_command(v.vid, int(cmd), rc_in, rrc_in)
        self._check_result(cmd, got, want)
        after = v.vm.pv_state()
        if cmd == PvCmd.ASYNC_CLEANUP_PREPARE and got[0] == 0:
            self._check_prepare_success(v, before.handle, got)
        if cmd == PvCmd.DISABLE and not before.protected:  # invariant 6
            assert got[0] == errno.EINVAL
            assert (after.set_aside, after.need_cleanup) == (before.set_aside, before.need_cleanup)
        if (
            cmd == PvCmd.ASYNC_CLEANUP_PREPARE
            and v.vm.asce_type == "segment"
            and before.protected
            and not self.injected
            and self.host.profile.segment_asce_refused
        ):
            assert got[0] == errno.EINVAL  # invariant 7 (Δ6.4)
        if cmd in (PvCmd.ASYNC_CLEANUP_PREPARE, PvCmd.ASYNC_CLEANUP_PERFORM) and not self.host.async_destroy:
            assert got == (errno.EINVAL, rc_in, rrc_in)  # invariant 4

    def _vms_where(self, pred: Any) -> list[VmPair]:
        return [v for v in self._open_vms() if pred(v.vm.pv)]

    @precondition(lambda self: bool(self._vms_where(lambda pv: not pv.handle)))
    @rule(i=st.integers(0, 99))
    def enable(self, i: int) -> None:
        self.pv_command(0, PvCmd.ENABLE, 0, 0, self._pick(self._vms_where(lambda pv: not pv.handle), i))

    @precondition(lambda self: bool(self._vms_where(lambda pv: pv.handle)))
    @rule(
        i=st.integers(0, 99),
        cmd=st.sampled_from([PvCmd.DISABLE, PvCmd.ASYNC_CLEANUP_PREPARE, PvCmd.ASYNC_CLEANUP_PREPARE]),
    )
    def unprotect(self, i: int, cmd: int) -> None:
        self.pv_command(0, cmd, 0, 0, self._pick(self._vms_where(lambda pv: pv.handle), i))

    @precondition(lambda self: bool(self._vms_where(lambda pv: pv.set_aside is not None)))
    @rule(i=st.integers(0, 99))
    def perform_inline(self, i: int) -> None:
        self.pv_command(0, PvCmd.ASYNC_CLEANUP_PERFORM, 0, 0, self._pick(self._vms_where(lambda pv: pv.set_aside), i))

    def pv_command_data(self, i: int, cmd: int, sub: int, len_max: int, buff_len: int, gaddr: int) -> None:
        assert self.model is not None
        v = self._pick(self._open_vms(), i)
        if cmd == PvCmd.INFO:
            data: dict[str, int] = {"id": sub, "len_max": len_max}
        elif cmd == PvCmd.DUMP:
            data = {"subcmd": sub, "buff_len": buff_len, "gaddr": gaddr}
        else:
            data = {}
        got = pv_call(v.vm, cmd, **data)
        want = self.model.pv_command(v.vid, int(cmd), **data)
        self._check_result(cmd, got, want)

    def _check_result(self, cmd: int, got: tuple[int, int, int], want: Any) -> None:
        want_t = (want.err, want.rc, want.rrc)
        assert got[0] == want_t[0], f"cmd {cmd}: pvfast {got} model {want_t}"
        if got != want_t:
            # the model's invented UV refusal rc (0x0003) may differ from pvfast's UV code (MODEL.md §6)
            assert got[0], f"cmd {cmd}: pvfast {got} model {want_t}"
            assert want.rc == pm.UVC_RC_INV_STATE, f"cmd {cmd}: pvfast {got} model {want_t}"

    def _check_prepare_success(self, v: VmPair, old: int, got: tuple[int, int, int]) -> None:
        """Invariant 2: rc 1/rrc 42, handle 0, vCPUs non-protected, no old page below 2 GiB."""
        assert got == (0, 1, 42)
        s = v.vm.pv_state()
        assert s.handle == 0
        assert s.set_aside
        assert not any(s.vcpu_handles)
        assert not s.service_irq_masked
        assert s.guest_handle == 0  # v6.2 zeroes gmap->guest_handle in kvm_s390_pv_set_aside
        if self.injected:
            return  # a failed CPU destroy keeps the UV CPU, so the [0, 2 GiB) destroys are refused
        end = min(v.vm.memory_size // PAGE, LOW_LIMIT_PAGES)
        for page in self._touched_pages(v):
            if page >= end:
                continue
            info = v.region.page_state(page)
            state, owner = info.state, info.owner
            assert not (owner == old and state in ("secure", "shared", "orphaned")), (page, state)

    # ------------------------------------------------------------------ PERFORM split with a thread

    @precondition(lambda self: bool(self._vms_where(lambda pv: pv.set_aside is not None)) and len(self.gates) < 2)
    @rule(i=st.integers(0, 99), rc_in=st.sampled_from([0, 0x55]))
    def perform_claim(self, i: int, rc_in: int) -> None:
        assert self.model is not None
        v = self._pick(self._vms_where(lambda pv: pv.set_aside is not None), i)
        self.gate_seq += 1
        gate = GatedPerform(v, rc_in, rc_in, seq=self.gate_seq)
        machine = self

        def run() -> None:
            machine.gate_by_thread[threading.get_ident()] = gate
            try:
                gate.result = pv_call(v.vm, PvCmd.ASYNC_CLEANUP_PERFORM, rc_in, rc_in)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                gate.exc = exc
            finally:
                gate.entered.set()

        gate.thread = threading.Thread(target=run, name="async_cleanup", daemon=True)
        gate.thread.start()
        assert gate.entered.wait(JOIN_TIMEOUT), "PERFORM neither claimed a record nor returned"
        claim = self.model.perform_claim(v.vid, rc_in, rc_in)
        if gate.thread.is_alive() and gate.result is None:
            # pvfast claimed a record and waits at the gate: the model must have claimed too
            assert claim.token is not None, f"pvfast claimed, model returned {tuple(claim)}"
            assert v.vm.pv_state().performing >= 1
            gate.token = claim.token
            self.gates.append(gate)
        else:
            self._join(gate)
            assert claim.token is None, "model claimed a record, pvfast did not"
            self._check_result(PvCmd.ASYNC_CLEANUP_PERFORM, gate.result, claim)  # type: ignore[arg-type]

    @precondition(lambda self: bool(self.gates))
    @rule(i=st.integers(0, 99))
    def perform_finish(self, i: int) -> None:
        assert self.model is not None
        gate = self._pick(self.gates, i)
        self.gates.remove(gate)
        gate.release.set()
        self._join(gate)
        want = self.model.perform_finish(gate.token)
        assert gate.result is not None
        self._check_result(PvCmd.ASYNC_CLEANUP_PERFORM, gate.result, want)

    def _join(self, gate: GatedPerform) -> None:
        assert gate.thread is not None
        gate.thread.join(JOIN_TIMEOUT)
        assert not gate.thread.is_alive(), "PERFORM thread did not return (deadlock?)"
        if gate.exc is not None:
            raise gate.exc

    @precondition(lambda self: bool(self._vms_where(lambda pv: pv.handle and pv.handle not in self.booted)))
    @rule(i=st.integers(0, 99), load=st.booleans())
    def protect(self, i: int, load: bool) -> None:
        """vmm.protect's sequence on a protected VM: load the image (host writes), SET_SEC_PARMS,
        UNPACK of each component (kvm_s390_pv_unpack, with export-before-import), VERIFY; then the
        guest reads its plaintext back."""
        assert self.model is not None
        v = self._pick(self._vms_where(lambda pv: pv.handle and pv.handle not in self.booted), i)
        self.booted.add(v.vm.pv.handle)
        image, plain = boot_image(v.vm.memory_size > 2 * GiB + 0x40000)
        if load:
            for comp in image.components:
                if self._fault_injections_pending() and comp.size > PAGE:
                    load = False  # multi-page host writes with a page-UVC failure pending (D5, H3)
                    break
                try:
                    v.vm.host_write(comp.addr, comp.data)
                    failed = False
                except UvcError:
                    failed = True
                assert failed == bool(self.model.host_access(v.vid, comp.addr // PAGE, comp.size // PAGE))
                if failed:
                    return  # QEMU gives up the boot
        # VERIFY's verdict depends on page contents, which the model does not have: compare it only
        # when every image page holds what the host wrote (not secure/shared when unpacked).
        clean = all(
            v.region.page_state(pg).state in ("nonsecure", "exported")
            for comp in image.components
            for pg in range(comp.addr // PAGE, (comp.addr + comp.size) // PAGE)
        )
        got = pv_call(v.vm, PvCmd.SET_SEC_PARMS, header=image.header)
        want = self.model.pv_command(v.vid, int(PvCmd.SET_SEC_PARMS), header=image.header)
        self._check_result(PvCmd.SET_SEC_PARMS, got, want)
        ok = not got[0]
        for comp in image.components:
            got = pv_call(v.vm, PvCmd.UNPACK, addr=comp.addr, size=comp.size, tweak=comp.tweak)
            want = self.model.pv_command(v.vid, int(PvCmd.UNPACK), addr=comp.addr, size=comp.size, tweak=comp.tweak)
            self._check_result(PvCmd.UNPACK, got, want)
            ok = ok and not got[0]
        if not (ok and load and clean):
            return
        got = pv_call(v.vm, PvCmd.VERIFY)
        want = self.model.pv_command(v.vid, int(PvCmd.VERIFY))
        self._check_result(PvCmd.VERIFY, got, want)
        if not got[0] and any(x.pv_handle for x in v.vm.vcpu_list):
            for comp, text in zip(image.components, plain, strict=True):
                assert v.vm.guest_read(comp.addr, len(text)) == text
                assert self.model.guest_access(v.vid, comp.addr // PAGE, comp.size // PAGE) == 0

    # ------------------------------------------------------------------ memory

    def _range(self, v: VmPair, where: str, off: int, n: int) -> tuple[int, int]:
        pages = v.vm.memory_size // PAGE
        start = {"low": off, "edge": LOW_LIMIT_PAGES - 20 + off, "high": pages - 64 + off}[where]
        start = max(0, min(start, pages - n))
        return start, n

    @precondition(lambda self: bool(self._accessible()))
    @rule(
        i=st.integers(0, 99),
        where=st.sampled_from(["low", "edge", "high"]),
        off=st.integers(0, 40),
        n=st.integers(1, 40),
        write=st.booleans(),
        cpu=st.integers(0, 3),
    )
    def guest_access(self, i: int, where: str, off: int, n: int, write: bool, cpu: int) -> None:
        assert self.model is not None
        v = self._pick(self._accessible(), i)
        if self._fault_injections_pending():
            n = 1  # pvfast goes on after a failed page, the model stops (D5; harness H3)
        page, n = self._range(v, where, off, n)
        cpu = self._pick_vcpu(v, cpu)
        try:
            v.vm.guest_access(page * PAGE, n * PAGE, write=write, vcpu=cpu)
            got = 0
        except (PvError, UvcError) as err:
            got = err.errno or -1
        except ValueError:
            got = None  # no such vCPU: no guest runs there
        try:
            want = self.model.guest_access(v.vid, page, n, write, vcpu=cpu)
        except ValueError:
            want = None
        if got is None or want is None:
            assert got is None, got
            assert want is None, want
            return
        assert bool(got) == bool(want), (got, want)  # errno compared only as failed/not (D5)

    def _pick_vcpu(self, v: VmPair, cpu: int) -> int:
        """A vCPU index: mostly one the VM has (0 if it has none, which both sides refuse)."""
        return cpu % v.vm.vcpus if v.vm.vcpus and cpu < 3 else cpu

    @precondition(lambda self: bool(self._accessible()))
    @rule(
        i=st.integers(0, 99),
        where=st.sampled_from(["low", "edge", "high"]),
        off=st.integers(0, 40),
        n=st.integers(1, 8),
        cpu=st.integers(0, 3),
    )
    def guest_share(self, i: int, where: str, off: int, n: int, cpu: int) -> None:
        assert self.model is not None
        v = self._pick(self._accessible(), i)
        if self._fault_injections_pending():
            n = 1  # (D5; harness H3)
        page, n = self._range(v, where, off, n)
        cpu = self._pick_vcpu(v, cpu)
        try:
            v.vm.guest_share(page * PAGE, n * PAGE, vcpu=cpu)
            got = 0
        except (PvError, UvcError, ValueError):
            got = 1
        try:
            want = self.model.guest_share(v.vid, page, n, vcpu=cpu)
        except ValueError:
            want = 1
        assert bool(got) == bool(want), (got, want)

    @precondition(has_open_vm)
    @rule(
        i=st.integers(0, 99),
        where=st.sampled_from(["low", "edge", "high"]),
        off=st.integers(0, 40),
        n=st.integers(1, 8),
    )
    def host_read(self, i: int, where: str, off: int, n: int) -> None:
        assert self.model is not None
        v = self._pick(self._open_vms(), i)
        if self._fault_injections_pending():
            n = 1  # (D5; harness H3)
        page, n = self._range(v, where, off, n)
        secure_before = [v.region.page_state(p).state for p in range(page, page + n)]
        try:
            data = v.vm.host_read(page * PAGE, n * PAGE)
        except UvcError:
            data = None  # a secure page could be neither pinned nor exported (injected failure)
        want = self.model.host_access(v.vid, page, n)
        assert (data is None) == bool(want), (data is None, want)
        if data is None:
            return
        assert len(data) == n * PAGE
        for k, state in enumerate(secure_before):
            if state in ("secure", "orphaned"):
                # invariant 16: a secure page is never read in plaintext; it was exported first
                assert v.region.page_state(page + k).state in ("exported", "shared", "nonsecure")

    # ------------------------------------------------------------------ failures

    @precondition(lambda self: self.failures and self.injections < 6)
    @rule(which=st.sampled_from(INJECTABLE), count=st.integers(1, 2))
    def inject(self, which: tuple[str, int], count: int) -> None:
        assert self.host is not None
        assert self.model is not None
        name, rc = which
        self.host.uv.inject_failure(Uvc[name], rc, rrc=0x0A, count=count)
        # pvfast keeps one pending injection per UVC (a new one replaces it); the model queues
        # them. Mirror pvfast's API semantics (VERIFICATION.md, harness H2).
        self.model.uv.injections.pop(name, None)
        self.model.inject_failure(name, rc, 0x0A, count)
        self.injected = True
        self.injections += 1

    # ------------------------------------------------------------------ comparison after every step

    def _touched_pages(self, v: VmPair) -> list[int]:
        assert self.model is not None
        mm = self.model.vms[v.vid].mm
        return sorted(p for (vid, p) in mm.present if vid == v.vid)

    def _map_handles(self) -> None:
        """Pair configurations created by the last step (MODEL.md §6 handle map)."""
        assert self.host is not None
        assert self.model is not None
        known_real = set(self.handle_map.values())
        new_real = sorted(h for h in self.host.uv.config_handles() if h not in known_real)
        new_model = [h for h in self.model.uv.created_handles if h not in self.handle_map]
        # pvfast VM handles are the authoritative pairing where both sides show one
        for v in self.vms:
            if v.vm.closed:
                continue
            mh = self.model.vms[v.vid].handle
            rh = v.vm.pv.handle
            if mh and rh and mh not in self.handle_map:
                self.handle_map[mh] = rh
                if mh in new_model:
                    new_model.remove(mh)
                if rh in new_real:
                    new_real.remove(rh)
        new_real = [h for h in new_real if h not in set(self.handle_map.values())]
        assert len(new_real) == len([h for h in new_model if h in self.model.uv.configs]), (new_real, new_model)
        for mh, rh in zip([h for h in new_model if h in self.model.uv.configs], new_real, strict=True):
            self.handle_map[mh] = rh

    def _model_secure(self, handle: int | None = None) -> int:
        """The model's secure pages, without frames the host has already unmapped (D6)."""
        model = self.model
        assert model is not None
        return sum(
            1
            for key, (state, owner) in model.uv.pages.items()
            if state in pm.SECURE_STATES and model.vms[key[0]].mm.alive and (handle is None or owner == handle)
        )

    def _real(self, mh: int) -> int:
        if mh == 0:
            return 0
        assert mh in self.handle_map, f"model handle {mh:#x} was never paired with a pvfast handle"
        return self.handle_map[mh]

    @invariant()
    def compare(self) -> None:
        if self.host is None:
            return
        STEPS["steps"] += 1
        self._compare()

    def _compare(self) -> None:
        host, model = self.host, self.model
        assert host is not None
        assert model is not None
        self._map_handles()
        # --- UVC counters: per-step deltas
        real_now, model_now = host.uv.stats(), model.uv.stats()
        real_prev, model_prev = self.last_stats
        rd = {k: real_now.get(k, 0) - real_prev.get(k, 0) for k in COMPARED_UVCS}
        md = {k: model_now.get(k, 0) - model_prev.get(k, 0) for k in COMPARED_UVCS}
        exp = md
        diff = {k: (rd[k], exp[k]) for k in COMPARED_UVCS if rd[k] != exp[k]}
        assert not diff, f"UVC count deltas (pvfast, model): {diff}"
        self.last_stats = (real_now, model_now)
        # --- configurations
        inv = {r: m for m, r in self.handle_map.items()}
        real_cfgs = host.uv.config_handles()
        assert all(h in inv for h in real_cfgs), f"unpaired pvfast configs {real_cfgs - set(inv)}"
        assert {inv[h] for h in real_cfgs} == model.uv.config_handles()
        # --- secure pages, in total and per owner (frames of dead address spaces: D6)
        assert host.uv.secure_pages() == self._model_secure()
        for mh in {owner for (_s, owner) in model.uv.pages.values()} | set(model.uv.configs):
            if mh in self.handle_map:
                assert host.uv.secure_pages(self._real(mh)) == self._model_secure(mh), f"owner {mh:#x}"
        # --- per VM state and per page state
        for v in self.vms:
            mvm = model.vms[v.vid]
            if not v.vm.closed:
                s = v.vm.pv_state()
                ms = model.pv_state(v.vid)
                for k in ("protected", "set_aside", "need_cleanup", "protected_count", "dumping", "leaked"):
                    assert getattr(s, k) == ms[k], f"vm {v.vid} {k}: pvfast {getattr(s, k)} model {ms[k]}"
                assert s.handle == self._real(ms["handle"])
                assert [bool(h) for h in s.vcpu_handles] == ms["vcpu_protected"]
                assert s.service_irq_masked == ms["service_irq_masked"]
                assert s.gisa_enabled == ms["gisa_enabled"]
                assert s.user_cpu_state_ctrl == ms["user_cpu_state_ctrl"]
                self._check_pvfast_structure(v, s)
            if mvm.mm.alive:
                touched = self._touched_pages(v)
                assert v.region.present_pages() == len(touched), f"vm {v.vid} present pages"
                for page in touched:
                    info = v.region.page_state(page)
                    rs, ro = info.state, info.owner
                    ms_, mo = model.page_state(v.vid, page)
                    assert rs == ms_.lower(), f"vm {v.vid} page {page}: pvfast {rs} model {ms_}"
                    if ms_ != pm.NONSECURE:
                        assert ro == self._real(mo), f"vm {v.vid} page {page} owner"
        # --- the invariants of docs/VERIFICATION.md §8
        problems = pm.check_invariants(model)
        assert not problems, problems
        self._check_pvfast_invariants()

    def _check_pvfast_structure(self, v: VmPair, s: pvfast.PvState) -> None:
        if any(s.vcpu_handles):
            assert s.protected, "a secure vCPU without a configuration"
        if s.set_aside:
            assert self.host is not None
            assert s.set_aside_fast == self.host.destroy_fast_available

    def _check_pvfast_invariants(self) -> None:
        """The invariants (docs/VERIFICATION.md §8) on pvfast's own state (independent of the model)."""
        host = self.host
        assert host is not None
        clean = not self.injected
        if not host.async_destroy:
            # async_destroy=0 (a read-only module parameter): nothing can ever be set aside
            for v in self._open_vms():
                s = v.vm.pv_state()
                assert not s.set_aside
                assert s.need_cleanup == 0
        by_mm: dict[int, list[VmPair]] = {}
        for v in self.vms:
            by_mm.setdefault(id(v.mm), []).append(v)
        for vms in by_mm.values():
            mm = vms[0].mm
            if mm.dead:
                continue
            parts = 0
            for v in vms:
                pv = v.vm.pv
                parts += (pv.handle != 0) + (pv.set_aside is not None) + len(pv.need_cleanup) + pv.performing
            # invariant 8 (equality needs no failed destroys, i.e. no injection)
            if clean:
                assert mm.protected_count == parts, f"I8: count {mm.protected_count} != {parts}"
            else:
                assert mm.protected_count >= parts, f"I8: count {mm.protected_count} < {parts}"
            # invariant 9
            if any(v.vm.pv.set_aside is not None or v.vm.pv.need_cleanup for v in vms):
                assert mm.protected_count > 0
        # The sequential steps never run an mm teardown during a VM destroy, so the one kernel
        # race that leaks (mm-release notifier vs kvm_arch_destroy_vm, docs/KERNEL.md) cannot
        # happen here; if it did, its residue would be the only ledger entry allowed.
        assert host.races() == [], host.races()
        if clean:
            assert unexplained_leaks(host) == [], "I12: leak ledger not empty without failures"
            referenced = set()
            for v in self.vms:
                pv = v.vm.pv
                referenced.add(pv.handle)
                for rec in ([pv.set_aside] if pv.set_aside else []) + list(pv.need_cleanup):
                    referenced.add(rec.handle)
            model = self.model
            assert model is not None
            for g in self.gates:
                token = model.tokens.get(g.token) if g.token is not None else None
                referenced.add(self._real(token.record.handle) if token is not None else 0)
            # invariant 10: every live config is referenced by a VM, a record or a claimed PERFORM
            assert host.uv.config_handles() <= referenced, "I10: an orphan configuration"

    # ------------------------------------------------------------------ end of an example

    def teardown(self) -> None:
        host, model = self.host, self.model
        STEPS["seconds"] += time.perf_counter() - self.t0
        if host is None or model is None:
            return
        try:
            for g in list(self.gates):
                self.gates.remove(g)
                g.release.set()
                self._join(g)
                want = model.perform_finish(g.token)
                self._check_result(PvCmd.ASYNC_CLEANUP_PERFORM, g.result, want)  # type: ignore[arg-type]
            self._compare()
            # pending injections that never fired: drop them on both sides, then end everything
            host.uv.clear_failures()
            for q in model.uv.injections.values():
                q.clear()
            for p in self.procs:
                if p.proc.alive:
                    p.proc.exit()
                    model.exit(p.pid)
            self._compare()
            if model.uv.injected_fired == 0:
                # invariant 13: full teardown leaves nothing behind (but a race's residue)
                assert host.uv.secure_pages() == 0
                assert host.uv.config_handles() == set()
                assert unexplained_leaks(host) == []
        finally:
            for g in self.gates:
                g.release.set()
            for p in self.procs:
                if p.proc.alive:
                    p.proc.kill()


def test_pv_state_machine(request: pytest.FixtureRequest) -> None:
    """Random step sequences; pvfast and the model agree after every step (profile: quick/long)."""
    STEPS.update(steps=0, examples=0, seconds=0.0)
    t0 = time.perf_counter()
    run_state_machine_as_test(PvMachine)
    took = time.perf_counter() - t0
    line = f"stateful: {STEPS['examples']} examples, {STEPS['steps']} steps in {took:.1f} s"
    print(line)
    report = os.environ.get("PVFAST_STATEFUL_REPORT")
    if report:
        with open(report, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


# ----------------------------------------------------------------------------------------------
# Regression tests for what the machine and the stress test found (docs/VERIFICATION.md §1). A bug
# still open in pvfast is a strict xfail (it turns into XPASS, i.e. a failure, once fixed, so the
# marker gets removed then). B1, B2 and D1 were fixed in c08eefd, B3 in d605118.


def _hold_perform(mm: Any) -> tuple[threading.Event, threading.Event]:
    """Stop the next PERFORM walk on ``mm`` between its claim and its walk (kvm_s390_pv_deinit_aside_vm
    has taken the record under kvm->lock and dropped the lock, its walk has not started)."""
    entered, release = threading.Event(), threading.Event()
    real = mm._destroy_range

    def destroy_range(cancel: Any, *args: Any, **kwargs: Any) -> bool:
        if cancel is not None and not entered.is_set():
            entered.set()
            while not release.wait(0.001):
                if cancel.is_set():
                    break
        return real(cancel, *args, **kwargs)

    mm._destroy_range = destroy_range
    return entered, release


def test_close_while_perform_runs_defers_vm_destroy() -> None:
    """B1: an ioctl in flight holds the file (fdget), so kvm_arch_destroy_vm (arch/s390/kvm/kvm-s390.c
    @ cc726886079f) runs only when PERFORM returns. pvfast used to run it at once, destroying the
    current configuration under the running PERFORM."""
    host = pvfast.Host(destroy_fast=False)
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, 4 * PAGE)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    vm.pv_command(PvCmd.ENABLE)  # the rebooted guest
    current = vm.pv_state().handle
    entered, release = _hold_perform(vm.mm)
    t = threading.Thread(target=vm.pv_command, args=(PvCmd.ASYNC_CLEANUP_PERFORM,), daemon=True)
    t.start()
    assert entered.wait(10)
    try:
        vm.close()
        # the kernel has not released the fd yet: the current configuration is untouched
        assert current in host.uv.config_handles()
    finally:
        release.set()
        t.join(10)
        proc.exit()
    assert host.uv.config_handles() == set()
    assert host.uv.secure_pages() == 0


def test_guest_access_fails_when_page_cannot_be_made_accessible() -> None:
    """B2, arch_make_page_accessible / invariant 16: a guest that does not run protected and touches
    a secure (here orphaned) page makes the host export it; if that export fails the access cannot
    proceed (the model returns EFAULT). pvfast used to return normally with the page still orphaned."""
    host = pvfast.Host(destroy_fast=True)
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, PAGE)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)  # the page above 2 GiB is orphaned now
    host.uv.inject_failure(Uvc.CONV_FROM_SEC_STOR, 0x0003)
    try:
        with pytest.raises((UvcError, PvError)):
            vm.guest_access(2 * GiB, PAGE)
    finally:
        proc.exit()


def test_mm_teardown_destroys_every_present_page() -> None:
    """D1, page-table teardown (ptep_get_and_clear_full): for each present PTE of a protected mm,
    destroy page (a no-op success on non-secure pages, but still one UVC). pvfast used to skip the non-secure ones, so
    stats()["DESTR_SEC_STOR"] was lower than the kernel's count."""
    host = pvfast.Host(destroy_fast=False)
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    vm.host_read(0, 10 * PAGE)  # 10 present, non-secure pages
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, PAGE)  # 1 secure page
    before = host.uv.stats().get("DESTR_SEC_STOR", 0)
    proc.exit()  # last mm user: notifier (no Destroy-Fast), then teardown with protected_count 1
    assert host.uv.stats().get("DESTR_SEC_STOR", 0) - before == 11


def test_guest_share_needs_a_secure_vcpu() -> None:
    """Fixed in d605118: after DISABLE fails on a CPU the handle stays but no vCPU runs protected;
    such a guest cannot issue the guest-side SET_SHARED_ACCESS (its vCPUs have sdf 0 after
    kvm_s390_cpus_from_pv, DISABLE's first step)."""
    host = pvfast.Host()
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    vm.pv_command(PvCmd.ENABLE)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0003)
    with pytest.raises(PvError):
        vm.pv_command(PvCmd.DISABLE)
    assert vm.pv_state().protected
    assert not any(vm.pv_state().vcpu_handles)
    before = host.uv.stats().get("SET_SHARED_ACCESS", 0)
    with pytest.raises(ValueError, match="not protected"):
        vm.guest_share(0)
    assert host.uv.stats().get("SET_SHARED_ACCESS", 0) == before
    proc.exit()


def test_close_while_enable_runs_defers_vm_destroy() -> None:
    """B1, general form (found by tests/test_stress.py): a thread is inside ENABLE (here: between
    Create Config and Create CPU) when another thread closes the fd. The kernel releases the VM
    only after the ioctl returns, so ENABLE succeeds and VM destroy then cleans everything. pvfast
    used to destroy the VM under the running ENABLE: EIO, a bogus leak-ledger entry and 16 KiB of
    kernel memory left (a freed top-level table)."""
    host = pvfast.Host()
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    real = vm.uv
    entered, release = threading.Event(), threading.Event()

    class SlowCreateCpu:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def create_cpu(self, *args: Any, **kwargs: Any) -> Any:
            entered.set()
            release.wait(10)
            return real.create_cpu(*args, **kwargs)

    vm.uv = SlowCreateCpu()  # type: ignore[assignment]
    result: list[Any] = []
    t = threading.Thread(target=lambda: result.append(pv_call(vm, PvCmd.ENABLE)), daemon=True)
    t.start()
    assert entered.wait(10)
    vm.close()
    release.set()
    t.join(10)
    proc.exit()
    assert result == [(0, 1, 0)]
    assert host.leaked() == []
    assert host.kernel_memory() == 0
    assert host.uv.config_handles() == set()


def test_disable_reports_the_failing_leftover_when_the_current_destroy_succeeds() -> None:
    """Invariant 21 / kvm_s390_pv_deinit_cleanup_all's leftover loop: the current VM's Destroy
    Config succeeds, a leftover's fails: DISABLE gives EIO with the leftover's rc/rrc. (The
    leftover is made undestroyable by giving its configuration a CPU through the raw UV, which only
    a test can do; found by mutation testing of deinit_cleanup_all, docs/VERIFICATION.md §4.2.)"""
    host = pvfast.Host(destroy_fast=False)
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    vm.pv_command(PvCmd.ENABLE)
    old = vm.pv_state().handle
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    vm.pv_command(PvCmd.ENABLE)
    created = host.uv.native.create_cpu(old, num=7, stor_len=host.uv_info["guest_cpu_stor_len"])
    assert created.cc == 0
    cpu = created.handle
    with pytest.raises(PvError) as ei:
        vm.pv_command(PvCmd.DISABLE)
    err = ei.value
    assert err.errno == errno.EIO
    assert (err.rc, err.rrc) != (1, 0)  # the leftover's Destroy Config rc, not the current one's
    st = vm.pv_state()
    assert not st.protected
    assert not st.set_aside
    assert st.need_cleanup == 0
    # the failed leftover keeps its reference for good (kvm_s390_pv_dispose_one_leftover)
    assert st.protected_count == 1
    assert host.uv.config_handles() == {old}
    host.uv.native.destroy_cpu(cpu)
    proc.exit()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
def test_close_zaps_only_when_there_was_something_to_clean(fast: bool) -> None:
    """kvm_s390_pv_deinit_cleanup_all's need_zap: closing a VM that has only a set-aside record (no
    current configuration) still zaps the address space while it lives, so the old guest's pages
    are destroyed; closing a VM that never had anything issues no destroy-page at all, even though
    the mm is protected (another VM). (Found by mutation testing, docs/VERIFICATION.md §4.2.)"""
    host = pvfast.Host(destroy_fast=fast)
    proc = host.spawn_process()
    keep = proc.create_vm(3 * GiB, 1)
    keep.pv_command(PvCmd.ENABLE)
    keep.guest_access(0, 8 * PAGE)
    plain = proc.create_vm(3 * GiB, 1)
    plain.host_read(0, 8 * PAGE)
    before = host.uv.stats()["DESTR_SEC_STOR"]
    plain.close()  # nothing to clean: no zap
    assert host.uv.stats()["DESTR_SEC_STOR"] == before
    old = proc.create_vm(3 * GiB, 1)
    old.pv_command(PvCmd.ENABLE)
    old.guest_access(2 * GiB, 4 * PAGE)
    handle = old.pv_state().handle
    old.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)  # only the record is left
    assert host.uv.secure_pages(handle) == 4
    old.close()
    assert host.uv.secure_pages(handle) == 0  # the zap destroyed the old guest's pages
    assert host.uv.secure_pages() == 8  # the running VM's pages are untouched (invariant 15)
    proc.exit()
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()
    assert host.leaked() == []
