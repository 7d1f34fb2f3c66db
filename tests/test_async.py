"""Asynchronous destroy: PREPARE (kvm_s390_pv_set_aside), PERFORM (kvm_s390_pv_deinit_aside_vm),
cleanup-all (kvm_s390_pv_deinit_cleanup_all; arch/s390/kvm/pv.c @ f7866f582b1c), signals, and
process exit (the mm-release notifier, page-table teardown, VM destroy)."""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from typing import Any

import pytest

import pvfast
from pvfast import PvCmd, PvError, Uvc, vmm

from .conftest import GiB, MiB, enable

PREPARE = PvCmd.ASYNC_CLEANUP_PREPARE
PERFORM = PvCmd.ASYNC_CLEANUP_PERFORM
HIGH = 2 * GiB  # first guest address above the range PREPARE cleans itself


def raises_errno(err: int):
    return pytest.raises(PvError, match=f"IOCTL rc: -{err}$")


def protected_vm(host: pvfast.Host, size: int = 3 * GiB, vcpus: int = 2, low: int = 8 * MiB, high: int = 8 * MiB):
    """A protected VM whose guest has made ``low`` bytes below 2 GiB and ``high`` above secure."""
    vm = host.create_vm(size, vcpus=vcpus)
    enable(vm)
    if low:
        vm.guest_access(0, low)
    if high:
        vm.guest_access(HIGH, high)
    return vm


def assert_fully_clean(host: pvfast.Host, *, injected: bool = False) -> None:
    """Invariant 13: no secure or orphaned page, no configuration, nothing leaked; and, without
    injected failures, invariant 10: every config and CPU destroyed exactly once."""
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()
    assert host.leaked() == []
    assert host.kernel_memory() == 0  # every donation, SIDA page and top table went back
    if not injected:
        s = host.uv.stats()
        assert s.get("DESTROY_SEC_CONF", 0) + s.get("DESTROY_SEC_CONF_FAST", 0) == s.get("CREATE_SEC_CONF", 0)
        assert s.get("DESTROY_SEC_CPU", 0) == s.get("CREATE_SEC_CPU", 0)


# ---------------------------------------------------------------- PREPARE


def test_prepare_success_state(any_host):
    host = any_host
    vm = protected_vm(host)
    old = vm.pv_state().handle
    res = vm.pv_command(PREPARE)
    assert (res.rc, res.rrc) == (1, 42)
    st = vm.pv_state()
    assert st.handle == 0
    assert not st.protected
    assert st.set_aside
    assert not any(st.vcpu_handles)
    assert not st.service_irq_masked
    assert st.protected_count == 1  # the set-aside VM still counts until it is disposed of (invariant 8)
    assert st.set_aside_fast == host.destroy_fast_available
    # [0, 2 GiB) is clean now; the high pages still belong to the old configuration
    assert host.uv.secure_pages(old) == 8 * MiB // 4096
    for page in (0, 100, 2047):
        assert vm.region.page_state(page).state == "nonsecure"
    kind = "orphaned" if host.destroy_fast_available else "secure"
    assert vm.region.page_state(HIGH // 4096).state == kind
    stats = host.uv.stats()
    assert stats.get("DESTROY_SEC_CONF_FAST", 0) == int(host.destroy_fast_available)
    assert stats.get("DESTROY_SEC_CONF", 0) == 0
    assert (old in host.uv.config_handles()) == (not host.destroy_fast_available)


def test_prepare_preconditions():
    host = pvfast.Host()
    vm = host.create_vm(3 * GiB)
    with raises_errno(errno.EINVAL) as ei:
        vm.pv_command(PREPARE, rc=9, rrc=9)  # not protected
    assert (ei.value.rc, ei.value.rrc) == (9, 9)
    host0 = pvfast.Host(async_destroy=0)
    vm0 = protected_vm(host0)
    with raises_errno(errno.EINVAL):
        vm0.pv_command(PREPARE)
    assert vm0.pv_state().protected
    assert all(vm0.pv_state().vcpu_handles)  # nothing happened
    with raises_errno(errno.EINVAL):
        vm0.pv_command(PERFORM)


def test_prepare_refused_for_segment_asce_after_cpus_are_gone(host):
    vm = host.create_vm(2 * GiB, vcpus=2)
    enable(vm)
    handle = vm.pv_state().handle
    with raises_errno(errno.EINVAL) as ei:
        vm.pv_command(PREPARE, rc=0x11, rrc=0x22)
    # kvm_s390_cpus_from_pv copies rc/rrc out only for a failing CPU, and set_aside refuses
    # before any UV call: what user space passed in comes back.
    assert (ei.value.rc, ei.value.rrc) == (0x11, 0x22)
    st = vm.pv_state()
    assert st.handle == handle
    assert not any(st.vcpu_handles)
    assert not st.service_irq_masked
    assert vm.pv_command(PvCmd.DISABLE).rc == 1  # DISABLE works for small VMs
    vm.process.exit()
    assert_fully_clean(host)


def test_second_prepare_fails_until_perform_claims(any_host):
    host = any_host
    vm = protected_vm(host)
    vm.pv_command(PREPARE)
    enable(vm)
    handle2 = vm.pv_state().handle
    assert vm.pv_state().protected_count == 2
    with raises_errno(errno.EINVAL):
        vm.pv_command(PREPARE)
    st = vm.pv_state()
    assert st.handle == handle2
    assert not any(st.vcpu_handles)  # CPUs were already made non-protected
    assert st.set_aside
    assert not st.service_irq_masked
    # DISABLE tears down the current VM and the set-aside one
    assert vm.pv_command(PvCmd.DISABLE).rc == 1
    st = vm.pv_state()
    assert not st.set_aside
    assert st.need_cleanup == 0
    assert st.protected_count == 0
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()


def test_prepare_destroy_fast_failure_keeps_vm_protected():
    host = pvfast.Host()
    vm = protected_vm(host)
    handle = vm.pv_state().handle
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF_FAST, 0x0104)
    with raises_errno(errno.EIO) as ei:
        vm.pv_command(PREPARE)
    assert ei.value.rc == 0x0104
    st = vm.pv_state()
    assert st.handle == handle
    assert not st.set_aside
    assert not st.service_irq_masked
    assert st.guest_handle == 0  # v6.2 zeroes gmap->guest_handle anyway
    assert host.uv.stats().get("DESTROY_SEC_CONF", 0) == 0  # no fallback inside PREPARE
    vm.pv_command(PvCmd.DISABLE)
    vm.process.exit()
    assert_fully_clean(host, injected=True)


def test_prepare_cpu_failure_is_eio_and_keeps_mask():
    host = pvfast.Host()
    vm = protected_vm(host)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0021)
    with raises_errno(errno.EIO):
        vm.pv_command(PREPARE)
    st = vm.pv_state()
    assert st.protected
    assert st.service_irq_masked
    assert not st.set_aside


def test_prepare_slow_path_enomem_leaks_old_table():
    host = pvfast.Host(destroy_fast=False)
    vm = protected_vm(host)
    host.inject_alloc_failure(1)  # the record allocation: nothing unlisted yet
    with raises_errno(errno.ENOMEM):
        vm.pv_command(PREPARE)
    assert vm.pv_state().leaked == 0
    # the record succeeds, the new top table does not: s390_replace_asce has already unlisted the old
    # table, which nobody frees any more (it leaks, as in the kernel)
    orig = host._kalloc
    host._kalloc = lambda kind, size: None if kind == "crst" else orig(kind, size)  # type: ignore[method-assign]
    try:
        with raises_errno(errno.ENOMEM):
            vm.pv_command(PREPARE)
    finally:
        del host._kalloc
    st = vm.pv_state()
    assert st.leaked == 1
    assert st.leaks[0]["kind"] == "crst"
    assert st.protected
    assert not st.set_aside


# ---------------------------------------------------------------- PERFORM


def test_perform_without_record_is_einval_with_rc_passed_in(host):
    vm = host.create_vm(3 * GiB)
    with raises_errno(errno.EINVAL) as ei:
        vm.pv_command(PERFORM, rc=0x77, rrc=0x88)
    assert (ei.value.rc, ei.value.rrc) == (0x77, 0x88)


def test_perform_fast_and_slow(any_host):
    host = any_host
    vm = protected_vm(host, high=16 * MiB)
    old = vm.pv_state().handle
    vm.pv_command(PREPARE)
    before = host.uv.stats().get("DESTR_SEC_STOR", 0)
    res = vm.pv_command(PERFORM, rc=0x55, rrc=0x66)
    if host.destroy_fast_available:
        assert (res.rc, res.rrc) == (0x55, 0x66)  # fast record: no UVC, rc/rrc untouched
    else:
        assert (res.rc, res.rrc) == (1, 0)  # Destroy Config's rc
        assert host.uv.stats()["DESTROY_SEC_CONF"] == 1
    assert host.uv.stats()["DESTR_SEC_STOR"] - before == vm.region.present_pages()
    st = vm.pv_state()
    assert not st.set_aside
    assert st.need_cleanup == 0
    assert st.protected_count == 0
    assert host.uv.secure_pages(old) == 0
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "slow"])
@pytest.mark.parametrize("kernel", ["6.6", "latest"])
def test_perform_and_the_running_guest(fast, kernel):
    """PERFORM walks the memory the rebooted guest runs on too; the UV refuses to destroy that
    guest's pages (its configuration has CPUs). Up to the gmap rewrite the refusal was ignored
    and those pages stay secure; the newest kernels export them (__kvm_s390_pv_destroy_page's
    fallback), and the guest imports them back when it touches them, its data intact."""
    host = pvfast.Host(kernel=kernel, destroy_fast=fast)
    vm = protected_vm(host, high=16 * MiB)
    vm.pv_command(PREPARE)
    enable(vm)
    new = vm.pv_state().handle
    vm.guest_write(HIGH + 64 * MiB, b"new guest data")
    vm.guest_access(0, 4 * MiB)
    mine = host.uv.secure_pages(new)
    exports = host.uv.stats().get("CONV_FROM_SEC_STOR", 0)
    vm.pv_command(PERFORM)
    exported = host.uv.stats().get("CONV_FROM_SEC_STOR", 0) - exports
    if kernel == "latest":
        assert host.uv.secure_pages() == 0
        assert exported == mine
        assert vm.region.page_state((HIGH + 64 * MiB) // 4096).state == "exported"
    else:
        assert host.uv.secure_pages(new) == mine
        assert host.uv.secure_pages() == mine
        assert exported == 0
    assert vm.guest_read(HIGH + 64 * MiB, 14) == b"new guest data"
    assert host.uv.secure_pages(new) >= 1
    assert vm.pv_state().protected_count == 1


def test_export_before_import_only_while_count_above_one():
    host = pvfast.Host(feature_misc=False)
    vm = protected_vm(host, high=0)
    vm.pv_command(PREPARE)
    enable(vm)
    s0 = host.uv.stats()
    vm.guest_access(HIGH, 10 * 4096)  # count == 2: one export before each import
    s1 = host.uv.stats()
    assert s1["CONV_TO_SEC_STOR"] - s0["CONV_TO_SEC_STOR"] == 10
    assert s1.get("CONV_FROM_SEC_STOR", 0) - s0.get("CONV_FROM_SEC_STOR", 0) == 10
    vm.pv_command(PERFORM)
    s1 = host.uv.stats()  # (the newest kernels' PERFORM exports the running guest's pages)
    vm.guest_access(HIGH + 64 * MiB, 10 * 4096)  # count == 1: no more exports
    s2 = host.uv.stats()
    assert s2["CONV_TO_SEC_STOR"] - s1["CONV_TO_SEC_STOR"] == 10
    assert s2.get("CONV_FROM_SEC_STOR", 0) == s1.get("CONV_FROM_SEC_STOR", 0)


def test_no_export_before_import_with_misc():
    host = pvfast.Host(feature_misc=True)
    vm = protected_vm(host, high=0)
    vm.pv_command(PREPARE)
    enable(vm)
    s0 = host.uv.stats().get("CONV_FROM_SEC_STOR", 0)
    vm.guest_access(HIGH, 10 * 4096)
    assert host.uv.stats().get("CONV_FROM_SEC_STOR", 0) == s0


def test_fatal_signal_during_perform_queues_leftover(any_host):
    host = any_host
    vm = protected_vm(host, high=4 * MiB)
    vm.pv_command(PREPARE)
    vm.process.fatal_signal.set()  # a fatal signal is pending when the walk checks
    res = vm.pv_command(PERFORM)
    assert (res.rc, res.rrc) == (1, 42)
    st = vm.pv_state()
    assert st.need_cleanup == 1
    assert not st.set_aside
    assert st.protected_count == 1
    vm.process.fatal_signal.clear()
    # a non-protected VM cannot DISABLE its leftovers; VM destroy does
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.DISABLE)
    proc = vm.process
    proc.exit()
    assert_fully_clean(host)


def test_disable_on_protected_vm_cleans_leftover(any_host):
    host = any_host
    vm = protected_vm(host)
    vm.pv_command(PREPARE)
    vm.process.fatal_signal.set()
    vm.pv_command(PERFORM)
    vm.process.fatal_signal.clear()
    enable(vm)
    assert vm.pv_state().protected_count == 2
    assert vm.pv_command(PvCmd.DISABLE).rc == 1
    st = vm.pv_state()
    assert st.need_cleanup == 0
    assert st.protected_count == 0
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()


def test_disable_first_error_wins():
    host = pvfast.Host(destroy_fast=False)
    vm = protected_vm(host)
    vm.pv_command(PREPARE)
    enable(vm)
    # the current VM's destroy fails first; the leftover's destroy fails after it
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0031, rrc=1, count=1)
    with raises_errno(errno.EIO) as ei:
        vm.pv_command(PvCmd.DISABLE)
    assert (ei.value.rc, ei.value.rrc) == (0x0031, 1)
    st = vm.pv_state()
    assert st.protected
    assert st.protected_count == 1
    assert st.need_cleanup == 0  # leftover disposed


def test_perform_destroy_config_failure_is_eio_and_leaks():
    host = pvfast.Host(destroy_fast=False)
    vm = protected_vm(host)
    old = vm.pv_state().handle
    vm.pv_command(PREPARE)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0042, rrc=3)
    with raises_errno(errno.EIO) as ei:
        vm.pv_command(PERFORM)
    assert (ei.value.rc, ei.value.rrc) == (0x0042, 3)
    st = vm.pv_state()
    assert st.protected_count == 1  # a failed leftover never leaves the count (invariant 8)
    assert {leak["kind"] for leak in st.leaks} == {"stor_base", "stor_var", "crst"}
    assert old in host.uv.config_handles()


def test_vm_destroy_leftover_failure_leaks_and_goes_on():
    host = pvfast.Host(destroy_fast=False)
    vm = protected_vm(host)
    vm.pv_command(PREPARE)
    proc = vm.process
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0042, rrc=3)
    vm.close()
    assert len(host.leaked()) == 3
    assert proc.mm.protected_count == 1


def test_two_concurrent_performs_one_claims(any_host):
    host = any_host
    vm = protected_vm(host, high=64 * MiB)
    vm.pv_command(PREPARE)
    results: list[object] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        try:
            results.append(vm.pv_command(PERFORM))
        except PvError as err:
            results.append(err)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r for r in results if isinstance(r, PvError)]
    assert len(errors) == 1
    assert errors[0].errno == errno.EINVAL
    assert host.uv.secure_pages() == 0


def test_commands_complete_while_perform_walks():
    host = pvfast.Host(walk_threads=1)
    vm = protected_vm(host, size=6 * GiB, high=512 * MiB)
    vm.pv_command(PREPARE)
    vm.perform_started.clear()
    t = threading.Thread(target=vm.pv_command, args=(PERFORM,))
    t.start()
    vm.perform_started.wait()
    enable(vm)  # PREPARE may be followed by ENABLE while PERFORM runs (no kvm->lock held by the walk)
    vm.pv_command(PvCmd.INFO, id=0, len_max=80)
    vm.guest_access(HIGH, 4 * MiB)
    t.join()
    st = vm.pv_state()
    assert st.protected
    assert st.protected_count == 1
    assert st.need_cleanup == 0
    assert host.uv.secure_pages() == host.uv.secure_pages(st.handle)


# ---------------------------------------------------------------- kill / exit / helpers


@pytest.mark.parametrize("end", ["kill", "exit"])
def test_kill_during_perform_stops_within_a_batch_and_loses_nothing(any_host, end):
    """kill: the fatal signal stops the walk; exit: exit_group's SIGKILL to the other threads does."""
    host = any_host
    vm = protected_vm(host, size=4 * GiB, high=1 * GiB)
    proc = vm.process
    vm.pv_command(PREPARE)
    vm.perform_started.clear()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(vm.pv_command(PERFORM)))
    t.start()
    vm.perform_started.wait()
    if end == "kill":
        proc.kill()
    else:
        proc.exit()
    t.join()
    assert not proc.alive
    res = out[0]
    assert isinstance(res, pvfast.PvResult)
    assert_fully_clean(host)


def test_exit_and_kill_record_how_the_process_ended():
    """exit(status) records an exit status, kill(sig) a terminating signal, as waitpid shows them."""
    host = pvfast.Host()
    procs = [host.spawn_process() for _ in range(4)]
    for p in procs:
        p.create_vm(1 * GiB)
        assert p.wait_status is None
        assert p.exit_status is None
        assert p.exit_signal is None
    procs[0].exit()
    procs[1].exit(3 + 256)  # only the low 8 bits reach the parent, as with exit_group
    procs[2].kill()
    procs[3].kill(signal.SIGTERM)
    assert [p.alive for p in procs] == [False] * 4
    assert [p.exit_status for p in procs] == [0, 3, None, None]
    assert [p.exit_signal for p in procs] == [None, None, signal.SIGKILL, signal.SIGTERM]
    for p, status in zip(procs[:2], (0, 3), strict=True):
        assert p.wait_status is not None
        assert os.WIFEXITED(p.wait_status)
        assert os.WEXITSTATUS(p.wait_status) == status
    for p, sig in zip(procs[2:], (signal.SIGKILL, signal.SIGTERM), strict=True):
        assert p.wait_status is not None
        assert os.WIFSIGNALED(p.wait_status)
        assert os.WTERMSIG(p.wait_status) == sig
    procs[0].kill()  # a dead process: nothing happens, the first end stays recorded
    procs[2].exit(1)
    assert procs[0].exit_status == 0
    assert procs[2].exit_signal == signal.SIGKILL
    assert host.uv.config_handles() == set()
    assert host.kernel_memory() == 0


def test_host_create_vm_process_exits_0_when_its_vm_closes():
    host = pvfast.Host()
    vm = host.create_vm(1 * GiB)
    vm.close()
    assert not vm.process.alive
    assert vm.process.exit_status == 0


@pytest.mark.parametrize(
    ("call", "kwargs", "error"),
    [
        ("kill", {"sig": signal.SIGCHLD}, ValueError),  # default action: ignore
        ("kill", {"sig": signal.SIGSTOP}, ValueError),
        ("kill", {"sig": 0}, ValueError),
        ("kill", {"sig": 1000}, ValueError),
        ("kill", {"sig": "SIGKILL"}, TypeError),
        ("kill", {"sig": True}, TypeError),
        ("exit", {"status": 1.0}, TypeError),
        ("exit", {"status": None}, TypeError),
        ("exit", {"status": 1 << 40}, ValueError),
    ],
)
def test_kill_and_exit_argument_checks(call: str, kwargs: dict[str, Any], error: type[Exception]):
    proc = pvfast.Host().spawn_process()
    name = next(iter(kwargs))
    with pytest.raises(error, match=name):
        getattr(proc, call)(**kwargs)
    assert proc.alive  # a refused call changes nothing
    proc.kill(signal.SIGRTMIN + 1)  # any terminating signal, real-time ones too
    assert proc.exit_signal == signal.SIGRTMIN + 1


def test_a_second_end_waits_for_the_first_teardown():
    """kill() while exit() is tearing down returns only once that teardown is done; exit's status stays."""
    host = pvfast.Host()
    vm = protected_vm(host, high=4 * MiB)
    proc = vm.process
    entered, release = threading.Event(), threading.Event()
    real_mmput = proc.mm._mmput

    def slow_mmput() -> None:
        entered.set()
        release.wait(10)
        real_mmput()

    proc.mm._mmput = slow_mmput
    first = threading.Thread(target=proc.exit, args=(7,))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=proc.kill)
    second.start()
    time.sleep(0.2)
    assert second.is_alive(), "kill() returned while exit()'s teardown was still running"
    release.set()
    first.join(10)
    second.join(10)
    assert not second.is_alive()
    assert not proc.alive
    assert proc.exit_status == 7
    assert proc.exit_signal is None
    assert_fully_clean(host)


def test_exit_without_helper_uses_notifier_and_page_teardown():
    host = pvfast.Host()
    vm = protected_vm(host, high=32 * MiB)
    proc = vm.process
    s0 = host.uv.stats()
    proc.exit()
    s1 = host.uv.stats()
    assert s1["DESTROY_SEC_CONF_FAST"] - s0.get("DESTROY_SEC_CONF_FAST", 0) == 1  # notifier
    assert s1.get("DESTROY_SEC_CONF", 0) == 0
    assert s1["DESTR_SEC_STOR"] - s0.get("DESTR_SEC_STOR", 0) >= 40 * MiB // 4096  # per-page teardown
    assert not proc.alive
    assert proc.mm.dead
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()


def test_exit_with_helper_moves_mm_teardown_to_helper():
    host = pvfast.Host()
    vm = protected_vm(host, high=32 * MiB)
    proc = vm.process
    helper = proc.clone_vm()
    assert helper.name == f"cleanup/{proc.pid}"
    assert helper.mm is proc.mm
    s0 = host.uv.stats()
    proc.exit()
    s1 = host.uv.stats()
    # QEMU's exit: fds close → VM destroy → cleanup-all with Destroy Config and the full zap
    assert s1["DESTROY_SEC_CONF"] - s0.get("DESTROY_SEC_CONF", 0) == 1
    assert s1.get("DESTROY_SEC_CONF_FAST", 0) == s0.get("DESTROY_SEC_CONF_FAST", 0)
    assert not proc.alive
    assert helper.alive
    assert not proc.mm.dead
    assert host.uv.secure_pages() == 0
    helper.exit()
    assert proc.mm.dead
    assert_fully_clean(host)


def test_exit_with_set_aside_and_leftovers_cleans_everything(any_host):
    host = any_host
    vm = protected_vm(host)
    vm.pv_command(PREPARE)
    vm.process.fatal_signal.set()
    vm.pv_command(PERFORM)
    vm.process.fatal_signal.clear()
    enable(vm)
    vm.guest_access(HIGH, 4 * MiB)
    vm.pv_command(PREPARE)
    assert vm.pv_state().need_cleanup == 1
    assert vm.pv_state().set_aside
    vm.process.exit()
    assert_fully_clean(host)


def test_vm_close_runs_cleanup_all(any_host):
    host = any_host
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, vcpus=2)
    enable(vm)
    vm.guest_access(HIGH, 8 * MiB)
    vm.pv_command(PREPARE)
    enable(vm)
    vm.close()
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()
    assert proc.mm.protected_count == 0
    proc.exit()
    assert_fully_clean(host)


# ---------------------------------------------------------------- QEMU helpers


def test_unprotect_async_and_sync_paths():
    host = pvfast.Host()
    big = protected_vm(host)
    t = vmm.unprotect(big)
    assert t is not None
    assert t.name == "async_cleanup"
    t.join()
    assert t.error is None
    assert not big.pv_state().set_aside
    small = host.create_vm(2 * GiB)
    enable(small)
    assert vmm.unprotect(small) is None  # 2 GiB gate: DISABLE
    host0 = pvfast.Host(async_destroy=0)
    vm0 = protected_vm(host0)
    assert vmm.unprotect(vm0) is None
    assert not vm0.pv_state().protected


def test_double_reboot_race_is_reproducible(caplog):
    host = pvfast.Host()
    vm = protected_vm(host)
    hold = threading.Event()
    t1 = vmm.unprotect(vm, hold=hold)  # reboot 1: PREPARE ok; the thread has not entered the ioctl
    assert t1 is not None
    enable(vm)  # the rebooted guest is protected again
    t2 = vmm.unprotect(vm)  # reboot 2: PREPARE fails (one set aside) → DISABLE consumes both
    assert t2 is None
    assert "KVM PV command 9 (KVM_PV_ASYNC_CLEANUP_PREPARE) failed" in caplog.text
    assert not vm.pv_state().set_aside
    assert host.uv.config_handles() == set()
    hold.set()
    t1.join()
    assert t1.error is not None
    assert t1.error.errno == errno.EINVAL  # the late PERFORM
    assert not vm.process.alive
    assert vm.process.exit_status == 1  # QEMU exit(1)s on a failed PERFORM
    assert_fully_clean(host)


def test_protect_failure_unprotects():
    from pvfast import image

    host = pvfast.Host()
    vm = host.create_vm(3 * GiB)
    img = image.build([(0x10000, b"kernel" * 1000)])
    bad = img.header[:-1] + bytes([img.header[-1] ^ 1])
    with pytest.raises(PvError) as ei:
        vmm.protect(vm, image.Image(header=bad, components=img.components))
    assert ei.value.cmd == PvCmd.SET_SEC_PARMS
    assert ei.value.errno == errno.EINVAL
    assert not vm.pv_state().protected
    vm.process.exit()
    assert_fully_clean(host)


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02, 0.05])
def test_signal_at_random_batch_boundaries_loses_nothing(delay):
    import time

    host = pvfast.Host(destroy_fast=bool(int(delay * 1000) % 2))
    vm = protected_vm(host, size=3 * GiB, high=256 * MiB)
    vm.pv_command(PREPARE)
    enable(vm)
    vm.guest_access(HIGH, 8 * MiB)
    vm.perform_started.clear()
    out: list[object] = []
    t = threading.Thread(target=lambda: out.append(vm.pv_command(PERFORM)))
    t.start()
    vm.perform_started.wait()
    time.sleep(delay)
    vm.process.fatal_signal.set()
    t.join()
    st = vm.pv_state()
    res = out[0]
    assert isinstance(res, pvfast.PvResult)
    assert st.need_cleanup == (1 if (res.rc, res.rrc) == (1, 42) else 0)
    assert st.protected_count == 1 + st.need_cleanup
    vm.process.fatal_signal.clear()
    assert vm.pv_command(PvCmd.DISABLE).rc == 1  # cleans the current VM and the leftover
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()
    assert vm.pv_state().protected_count == 0


def test_async_destroy_0_gates_only_prepare_perform_and_the_capability():
    host = pvfast.Host(async_destroy=0, feature_misc=False)
    assert host.check_extension(224) == 0
    vm = protected_vm(host)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PREPARE)
    with raises_errno(errno.EINVAL) as ei:
        vm.pv_command(PERFORM, rc=3, rrc=4)
    assert (ei.value.rc, ei.value.rrc) == (3, 4)
    assert vm.pv_command(PvCmd.DISABLE).rc == 1  # DISABLE is not gated
    enable(vm)
    vm.guest_access(HIGH, 4 * MiB)
    s0 = host.uv.stats()
    vm.process.exit()  # the mm-release notifier still uses Destroy-Fast
    assert host.uv.stats()["DESTROY_SEC_CONF_FAST"] - s0.get("DESTROY_SEC_CONF_FAST", 0) == 1
    assert_fully_clean(host)
