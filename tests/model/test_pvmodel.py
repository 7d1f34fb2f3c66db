"""Tests of the reference model itself against worked examples of the kernel's behaviour.

Sources: the kernel functions named in tests/model/pvmodel.py (arch/s390/kvm/pv.c @ f7866f582b1c,
arch/s390/kvm/kvm-s390.c @ cc726886079f) and, for the double-reboot race, QEMU's
s390_pv_vm_try_disable_async (target/s390x/kvm/pv.c @ 06b40d250ecf; docs/EXAMPLES.md §3).
Invariant numbers are those of docs/VERIFICATION.md §8.
"""

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from .pvmodel import (
    BATCH_PAGES,
    EFAULT,
    EINVAL,
    EIO,
    ENOMEM,
    ENOTTY,
    EXPORTED,
    KERNELS,
    KVM_CAP_S390_PROTECTED,
    KVM_CAP_S390_PROTECTED_ASYNC_DISABLE,
    KVM_CAP_S390_PROTECTED_DUMP,
    KVM_PV_ASYNC_CLEANUP_PERFORM,
    KVM_PV_ASYNC_CLEANUP_PREPARE,
    KVM_PV_DISABLE,
    KVM_PV_DUMP,
    KVM_PV_DUMP_COMPLETE,
    KVM_PV_DUMP_CONFIG_STOR_STATE,
    KVM_PV_DUMP_CPU,
    KVM_PV_DUMP_INIT,
    KVM_PV_ENABLE,
    KVM_PV_INFO,
    KVM_PV_INFO_DUMP,
    KVM_PV_INFO_VM,
    KVM_PV_PREP_RESET,
    KVM_PV_SET_SEC_PARMS,
    KVM_PV_UNPACK,
    KVM_PV_UNSHARE_ALL,
    KVM_PV_VERIFY,
    LOW_PAGES,
    NONSECURE,
    ORPHANED,
    PAGE_SIZE,
    SECURE,
    SHARED,
    Model,
    asce_type_for_limit,
    check_invariants,
)

GiB = 1 << 30
BIG = 4 * GiB  # region-3 ASCE: async destroy allowed
PREPARE = KVM_PV_ASYNC_CLEANUP_PREPARE
PERFORM = KVM_PV_ASYNC_CLEANUP_PERFORM


def clean(m):
    problems = check_invariants(m)
    assert problems == [], problems


def delta(m, before):
    now = m.uv.stats()
    return {k: now.get(k, 0) - before.get(k, 0) for k in now if now.get(k, 0) != before.get(k, 0)}


def booted_vm(memory=BIG, vcpus=2, **opts):
    m = Model(**opts)
    pid = m.spawn_process()
    vm = m.create_vm(pid, memory, vcpus)
    return m, pid, vm


def protected_vm(memory=BIG, vcpus=2, **opts):
    m, pid, vm = booted_vm(memory, vcpus, **opts)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    return m, pid, vm


def count(m, vm):
    return m.pv_state(vm)["protected_count"]


# ------------------------------------------------------------------------------------------
# protected_count walkthrough, one VM: ENABLE 0→1, PREPARE stays 1 (the record counts), ENABLE 1→2,
# PERFORM 2→1, DISABLE 1→0 (kvm_s390_pv_init_vm, _dispose_one_leftover, _deinit_cleanup_all)


@pytest.mark.parametrize("fast", [False, True])
def test_counter_walkthrough(fast):
    m, _, vm = booted_vm(destroy_fast=fast)
    assert count(m, vm) == 0
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert count(m, vm) == 1
    first = m.pv_state(vm)["handle"]
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert count(m, vm) == 1  # the record counts
    # slow: the old config still exists in the UV; fast: it is gone already
    assert m.uv.config_handles() == (set() if fast else {first})
    clean(m)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert count(m, vm) == 2
    clean(m)
    result = m.pv_command(vm, PERFORM)
    # slow: rc/rrc of the Destroy Config; fast: untouched (the values passed in, 0/0)
    assert result == ((0, 0, 0) if fast else (0, 1, 0))
    assert count(m, vm) == 1
    assert m.uv.live_configs() == 1
    clean(m)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert count(m, vm) == 0
    assert m.uv.live_configs() == 0
    clean(m)


def test_fast_perform_leaves_rc_untouched():
    m, _, vm = protected_vm(destroy_fast=True)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, PERFORM, rc_in=0x77, rrc_in=0x88) == (0, 0x77, 0x88)
    clean(m)


def test_failed_destroy_keeps_count_high_for_good():
    m, _, vm = protected_vm()
    m.inject_failure("DESTROY_SEC_CONF", 0x0A01, 0x22)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (EIO, 0x0A01, 0x22)
    state = m.pv_state(vm)
    assert state["protected"]
    assert state["protected_count"] == 1
    assert state["leaked"] == 3  # base + variable storage + unlisted top table
    assert not state["service_irq_masked"]  # cleared whatever cleanup-all returned
    clean(m)
    # retry: the handle was kept, so the retry destroys it and frees base/var
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert m.pv_state(vm)["leaked"] == 1
    assert count(m, vm) == 0


# ------------------------------------------------------------------------------------------
# PREPARE success postconditions (invariants 2 and 17)


@pytest.mark.parametrize("fast", [False, True])
def test_prepare_success_state_and_uv_work(fast):
    m, _, vm = protected_vm(vcpus=3, destroy_fast=fast)
    assert m.guest_access(vm, 0, 5) == 0
    assert m.guest_access(vm, LOW_PAGES - 1, 1) == 0
    assert m.guest_access(vm, LOW_PAGES, 4) == 0  # above 2 GiB
    old = m.pv_state(vm)["handle"]
    before = m.uv.stats()
    assert m.pv_command(vm, PREPARE, rc_in=5, rrc_in=6) == (0, 1, 42)
    state = m.pv_state(vm)
    assert state["handle"] == 0
    assert state["set_aside"]
    assert state["vcpu_protected"] == [False] * 3
    assert not state["service_irq_masked"]
    for page in [*range(5), LOW_PAGES - 1]:
        assert m.page_state(vm, page) == (NONSECURE, 0)
    expected = {"DESTROY_SEC_CPU": 3, "DESTR_SEC_STOR": 6}
    if fast:
        expected["DESTROY_SEC_CONF_FAST"] = 1
        assert all(m.page_state(vm, LOW_PAGES + i) == (ORPHANED, old) for i in range(4))
    else:
        assert all(m.page_state(vm, LOW_PAGES + i) == (SECURE, old) for i in range(4))
    assert delta(m, before) == expected
    assert m.uv.secure_pages(old) == 4
    clean(m)


# ------------------------------------------------------------------------------------------
# PREPARE destroys the CPUs even when it fails (kvm_s390_cpus_from_pv runs before
# kvm_s390_pv_set_aside; invariant 1), segment ASCE (invariant 7)


def test_second_prepare_fails_after_destroying_cpus():
    m, _, vm = protected_vm()
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    handle = m.pv_state(vm)["handle"]
    assert m.pv_state(vm)["service_irq_masked"]
    before = m.uv.stats()
    assert m.pv_command(vm, PREPARE, rc_in=0x11, rrc_in=0x22) == (EINVAL, 0x11, 0x22)
    state = m.pv_state(vm)
    assert state["vcpu_protected"] == [False, False]  # already made non-protected
    assert state["handle"] == handle
    assert state["protected"]
    assert not state["service_irq_masked"]
    assert state["set_aside"]
    assert delta(m, before) == {"DESTROY_SEC_CPU": 2}
    clean(m)
    # user space must now DISABLE: cpus_from_pv is a no-op, cleanup-all takes both configs
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert "DESTROY_SEC_CPU" not in delta(m, before)
    assert delta(m, before)["DESTROY_SEC_CONF"] == 1  # fast record: no UVC to dispose
    state = m.pv_state(vm)
    assert not state["set_aside"]
    assert state["need_cleanup"] == 0
    assert state["protected_count"] == 0
    assert m.uv.live_configs() == 0
    clean(m)


def test_segment_asce_prepare_einval_after_cpus():
    m, _, vm = protected_vm(memory=2 * GiB)
    assert m.vm_info(vm)["asce_type"] == "segment"
    assert m.pv_command(vm, PREPARE) == (EINVAL, 0, 0)
    state = m.pv_state(vm)
    assert state["protected"]
    assert state["vcpu_protected"] == [False, False]
    assert not state["service_irq_masked"]
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert count(m, vm) == 0
    clean(m)


@pytest.mark.parametrize(
    ("limit", "kind"),
    [
        (1 << 20, "segment"),
        (2 * GiB, "segment"),
        (2 * GiB + (1 << 20), "region3"),
        (1 << 42, "region3"),
        ((1 << 42) + (1 << 20), "region2"),
        ((1 << 53) + (1 << 20), "region1"),
    ],
)
def test_asce_type(limit, kind):
    assert asce_type_for_limit(limit) == kind


def test_prepare_cpu_destroy_failure_keeps_mask():
    m, _, vm = protected_vm()
    m.inject_failure("DESTROY_SEC_CPU", 0x0B01, 3)
    assert m.pv_command(vm, PREPARE) == (EIO, 0x0B01, 3)
    state = m.pv_state(vm)
    assert state["service_irq_masked"]
    assert state["protected"]
    assert not state["set_aside"]
    assert state["leaked"] == 1  # the CPU donation of the failed vCPU
    assert state["vcpu_protected"] == [False, False]
    clean(m)


def test_prepare_destroy_fast_0x104_stays_protected():
    m, _, vm = protected_vm(destroy_fast=True)
    m.inject_failure("DESTROY_SEC_CONF_FAST", 0x0104, 0)
    assert m.pv_command(vm, PREPARE) == (EIO, 0x0104, 0)
    state = m.pv_state(vm)
    assert state["protected"]
    assert not state["set_aside"]
    assert state["leaked"] == 0
    assert not state["service_irq_masked"]
    # fallback: DISABLE with the normal Destroy Config
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert delta(m, before) == {"DESTROY_SEC_CONF": 1}
    clean(m)


# ------------------------------------------------------------------------------------------
# QEMU's quick double reboot (s390_pv_vm_try_disable_async, target/s390x/kvm/pv.c @ 06b40d250ecf;
# docs/EXAMPLES.md §3)


@pytest.mark.parametrize("fast", [False, True])
def test_double_reboot_race(fast):
    m, _, vm = protected_vm(destroy_fast=fast)
    m.guest_access(vm, LOW_PAGES, 8)
    # reboot 1: PREPARE ok; the PERFORM thread has not entered the kernel yet
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    m.guest_access(vm, 0, 4)
    # reboot 2: PREPARE fails (a record is still set aside) -> QEMU falls back to DISABLE
    assert m.pv_command(vm, PREPARE) == (EINVAL, 0, 0)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    state = m.pv_state(vm)
    assert not state["set_aside"]
    assert state["need_cleanup"] == 0
    assert state["protected_count"] == 0
    assert m.uv.live_configs() == 0
    assert m.uv.secure_pages() == 0
    # the late PERFORM finds nothing: EINVAL, rc/rrc as passed in (QEMU exit(1)s)
    assert m.pv_command(vm, PERFORM, rc_in=0, rrc_in=0) == (EINVAL, 0, 0)
    assert m.pv_command(vm, PERFORM, rc_in=3, rrc_in=4) == (EINVAL, 3, 4)
    clean(m)


# ------------------------------------------------------------------------------------------
# PERFORM (invariants 3, 4, 5, 15, 19)


def test_perform_without_record_and_async_destroy_off():
    m, _, vm = protected_vm()
    assert m.pv_command(vm, PERFORM, rc_in=9, rrc_in=8) == (EINVAL, 9, 8)
    m0, _, vm0 = protected_vm(async_destroy=0)
    assert m0.check_extension(KVM_CAP_S390_PROTECTED_ASYNC_DISABLE) == 0
    before = m0.uv.stats()
    assert m0.pv_command(vm0, PREPARE, rc_in=1, rrc_in=2) == (EINVAL, 1, 2)
    assert m0.pv_command(vm0, PERFORM) == (EINVAL, 0, 0)
    assert delta(m0, before) == {}  # checked before any side effect
    assert m0.pv_state(vm0)["vcpu_protected"] == [True, True]
    assert m0.module_params == {"async_destroy": 0}


def test_prepare_allowed_once_perform_claimed():
    m, _, vm = protected_vm(destroy_fast=False)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    claim = m.perform_claim(vm)
    assert claim.err == 0
    assert claim.token is not None
    assert count(m, vm) == 1  # the in-flight PERFORM holds the record
    clean(m)
    # a second PERFORM gets nothing
    assert m.perform_claim(vm).err == EINVAL
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)  # allowed while PERFORM runs
    assert count(m, vm) == 2
    assert m.uv.live_configs() == 2
    clean(m)
    assert m.perform_finish(claim.token) == (0, 1, 0)
    assert m.pv_command(vm, PERFORM) == (0, 1, 0)
    assert count(m, vm) == 0
    assert m.uv.live_configs() == 0
    clean(m)


def test_perform_interrupted_goes_to_need_cleanup():
    m, _, vm = protected_vm(destroy_fast=False)
    m.guest_access(vm, LOW_PAGES, 3 * BATCH_PAGES)
    old = m.pv_state(vm)["handle"]
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    claim = m.perform_claim(vm)
    before = m.uv.stats()
    assert m.perform_finish(claim.token, interrupted=True, batches=1) == (0, 1, 42)
    assert delta(m, before) == {"DESTR_SEC_STOR": BATCH_PAGES}  # stopped within one batch
    state = m.pv_state(vm)
    assert state["need_cleanup"] == 1
    assert not state["set_aside"]
    assert state["protected_count"] == 1
    assert m.uv.secure_pages(old) == 2 * BATCH_PAGES
    assert old in m.uv.config_handles()
    clean(m)
    # DISABLE needs a protected VM; after a new ENABLE it disposes of the leftover too
    assert m.pv_command(vm, KVM_PV_DISABLE) == (EINVAL, 0, 0)
    assert m.pv_state(vm)["need_cleanup"] == 1
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert m.pv_state(vm)["need_cleanup"] == 0
    assert count(m, vm) == 0
    assert m.uv.live_configs() == 0
    assert m.uv.secure_pages() == 0
    clean(m)


def test_interrupted_late_signal_still_reports_need_cleanup():
    m, _, vm = protected_vm(destroy_fast=True)
    m.guest_access(vm, LOW_PAGES, 5)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    claim = m.perform_claim(vm)
    # the walk finished (one batch), the signal check after the last batch still fires
    assert m.perform_finish(claim.token, interrupted=True, batches=10) == (0, 1, 42)
    assert m.pv_state(vm)["need_cleanup"] == 1
    assert m.uv.secure_pages() == 0
    m.close_vm(vm)
    assert count(m, vm) == 0
    clean(m)


@pytest.mark.parametrize("kernel", KERNELS)
def test_perform_and_the_running_vm(kernel):
    """PERFORM's walk meets the rebooted guest's pages: the UV refuses to destroy them (the owner
    has CPUs); 6.2 ignores that, Δlatest exports them."""
    m, _, vm = protected_vm(destroy_fast=True, kernel=kernel)
    m.guest_access(vm, LOW_PAGES, 10)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    new = m.pv_state(vm)["handle"]
    m.guest_access(vm, LOW_PAGES + 100, 7)  # the new guest's own pages
    m.guest_access(vm, 0, 3)
    trace_start = len(m.uv.trace)
    assert m.pv_command(vm, PERFORM) == (0, 0, 0)
    refused = [e for e in m.uv.trace[trace_start:] if e.name == "DESTR_SEC_STOR" and e.cc]
    assert len(refused) == 10  # destroy refused: the owner has CPUs
    exports = [e for e in m.uv.trace[trace_start:] if e.name == "CONV_FROM_SEC_STOR"]
    if kernel == "6.2":
        assert m.uv.secure_pages(new) == 10
        assert m.uv.secure_pages() == 10
        assert exports == []
    else:
        assert m.uv.secure_pages() == 0
        assert len(exports) == 10
    clean(m)


def test_close_deferred_while_perform_in_flight():
    m, _, vm = protected_vm(destroy_fast=False)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    claim = m.perform_claim(vm)
    m.close_vm(vm)
    with pytest.raises(ValueError, match="is closed"):
        m.pv_command(vm, KVM_PV_INFO, id=0, len_max=80)
    assert m.uv.live_configs() == 1  # the ioctl still holds the VM
    assert m.perform_finish(claim.token) == (0, 1, 0)
    assert m.uv.live_configs() == 0
    assert count(m, vm) == 0
    clean(m)


# ------------------------------------------------------------------------------------------
# DISABLE (invariants 6, 21)


def test_disable_not_protected_leaves_records():
    m, _, vm = protected_vm()
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_DISABLE, rc_in=4, rrc_in=5) == (EINVAL, 4, 5)
    assert m.pv_state(vm)["set_aside"]


def _two_slow_leftovers():
    """Current VM protected, one record set aside, one on need_cleanup (all slow)."""
    m, _, vm = protected_vm(destroy_fast=False)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    claim = m.perform_claim(vm)
    assert m.perform_finish(claim.token, interrupted=True) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    state = m.pv_state(vm)
    assert state["set_aside"]
    assert state["need_cleanup"] == 1
    assert state["protected_count"] == 3
    return m, vm


def test_disable_rc_current_vm_takes_precedence():
    m, vm = _two_slow_leftovers()
    m.inject_failure("DESTROY_SEC_CONF", 0x0A01, 1)
    m.inject_failure("DESTROY_SEC_CONF", 0x0A02, 2)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (EIO, 0x0A01, 1)
    state = m.pv_state(vm)
    # current VM: handle kept (still counts); failed set-aside: stuck; need_cleanup one freed
    assert state["protected"]
    assert state["protected_count"] == 2
    assert state["leaked"] == 6
    assert not state["set_aside"]
    assert state["need_cleanup"] == 0
    clean(m)


def test_disable_rc_first_failing_leftover_wins():
    m, vm = _two_slow_leftovers()
    m.inject_failure("DESTROY_SEC_CONF", 0x0A02, 2, after=1)  # current VM's destroy succeeds
    m.inject_failure("DESTROY_SEC_CONF", 0x0A03, 3)
    # the set-aside record is moved to the front of need_cleanup, so it is disposed of first
    assert m.pv_command(vm, KVM_PV_DISABLE) == (EIO, 0x0A02, 2)
    state = m.pv_state(vm)
    assert not state["protected"]
    assert state["protected_count"] == 2  # two stuck leftovers
    assert state["leaked"] == 6
    clean(m)


def test_disable_all_ok_rc_one_rrc_from_destroy():
    m, vm = _two_slow_leftovers()
    assert m.pv_command(vm, KVM_PV_DISABLE, rc_in=0x55, rrc_in=0x66) == (0, 1, 0)
    assert count(m, vm) == 0
    assert m.uv.live_configs() == 0
    clean(m)


def test_disable_cpu_failure_stops_before_config_destroy():
    m, _, vm = protected_vm()
    m.inject_failure("DESTROY_SEC_CPU", 0x0C01, 7)
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_DISABLE) == (EIO, 0x0C01, 7)
    assert delta(m, before) == {"DESTROY_SEC_CPU": 2}  # does not stop at the first failure
    state = m.pv_state(vm)
    assert state["service_irq_masked"]
    assert state["protected"]
    assert state["leaked"] == 1
    # the UV CPU of the failed vCPU still exists: the config can never be destroyed now
    assert m.pv_command(vm, KVM_PV_DISABLE)[0] == EIO
    assert m.pv_state(vm)["protected"]


# ------------------------------------------------------------------------------------------
# ENABLE failure paths (kvm_s390_pv_init_vm; invariant 8: the count goes up at the Create Config attempt
# and comes back down on every path except a failed destroy of a NEED_DESTROY handle)


def test_enable_create_config_failure():
    m, _, vm = booted_vm()
    m.inject_failure("CREATE_SEC_CONF", 0x0D01, 5)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (EIO, 0x0D01, 5)
    state = m.pv_state(vm)
    assert state["protected_count"] == 0
    assert not state["protected"]
    assert state["leaked"] == 0
    assert not state["service_irq_masked"]  # step 5 is not reached when init_vm fails
    clean(m)


def test_enable_need_destroy_failure_sticks():
    m, _, vm = booted_vm()
    m.inject_failure("CREATE_SEC_CONF", 0x8000 | 0x0D02, 0)
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_ENABLE) == (EIO, 0x8D02, 0)
    assert delta(m, before) == {"CREATE_SEC_CONF": 1, "DESTROY_SEC_CONF": 1}
    state = m.pv_state(vm)
    assert state["protected_count"] == 1
    assert not state["protected"]
    assert state["leaked"] == 3
    clean(m)


def test_enable_cpu_creation_failure_undoes_everything():
    m, _, vm = booted_vm(vcpus=3)
    m.inject_failure("CREATE_SEC_CPU", 0x0E01, 9, after=1)
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_ENABLE) == (EIO, 0x0E01, 9)
    assert delta(m, before) == {
        "CREATE_SEC_CONF": 1,
        "CREATE_SEC_CPU": 2,
        "DESTROY_SEC_CPU": 1,
        "DESTROY_SEC_CONF": 1,
    }
    state = m.pv_state(vm)
    assert state["protected_count"] == 0
    assert not state["protected"]
    assert state["leaked"] == 0
    assert state["service_irq_masked"]  # set even when cpus_to_pv failed
    assert m.uv.live_configs() == 0
    clean(m)


def test_vcpu_hotplug_while_protected():
    m, _, vm = protected_vm(vcpus=1)
    result = m.create_vcpu(vm)
    assert result.err == 0
    assert m.pv_state(vm)["vcpu_protected"] == [True, True]
    m.inject_failure("CREATE_SEC_CPU", 0x0E02, 0)
    assert m.create_vcpu(vm).err == EIO
    assert len(m.pv_state(vm)["vcpu_protected"]) == 2
    clean(m)


# ------------------------------------------------------------------------------------------
# errno of every command's preconditions (kvm_arch_vm_ioctl's prologue, kvm_s390_handle_pv; docs/COMMANDS.md)

NEEDS_PROTECTED = [
    (KVM_PV_DISABLE, {}),
    (KVM_PV_SET_SEC_PARMS, {"header": b"x" * 100}),
    (KVM_PV_UNPACK, {"addr": 0, "size": PAGE_SIZE, "tweak": 0}),
    (KVM_PV_VERIFY, {}),
    (KVM_PV_PREP_RESET, {}),
    (KVM_PV_UNSHARE_ALL, {}),
    (KVM_PV_DUMP, {"subcmd": KVM_PV_DUMP_INIT}),
    (PREPARE, {}),
]


@pytest.mark.parametrize(("cmd", "data"), NEEDS_PROTECTED)
def test_not_protected_einval_rc_untouched(cmd, data):
    m, _, vm = booted_vm()
    before = m.uv.stats()
    assert m.pv_command(vm, cmd, rc_in=0x1234, rrc_in=0x5678, **data) == (EINVAL, 0x1234, 0x5678)
    assert delta(m, before) == {}
    assert m.pv_state(vm)["user_cpu_state_ctrl"]  # set even on failure


@pytest.mark.parametrize("cmd", [*range(12), 0xFFFF])
def test_prologue_errors(cmd):
    m, _, vm = booted_vm()
    assert m.pv_command(vm, cmd, rc_in=1, rrc_in=2, flags=1) == (EINVAL, 1, 2)
    off, _, vm_off = booted_vm(prot_virt=False)
    assert off.pv_command(vm_off, cmd, rc_in=3, rrc_in=4) == (EINVAL, 3, 4)
    assert off.pv_state(vm_off)["user_cpu_state_ctrl"]


@pytest.mark.parametrize("cmd", [11, 12, 0xFFFF])
def test_unknown_command_enotty(cmd):
    m, _, vm = booted_vm()
    assert m.pv_command(vm, cmd, rc_in=7, rrc_in=8) == (ENOTTY, 7, 8)


def test_enable_twice_einval():
    m, _, vm = protected_vm()
    assert m.pv_command(vm, KVM_PV_ENABLE, rc_in=3, rrc_in=3) == (EINVAL, 3, 3)


@pytest.mark.parametrize("kernel", KERNELS)
def test_set_sec_parms(kernel):
    m, _, vm = protected_vm(kernel=kernel)
    assert m.pv_command(vm, KVM_PV_SET_SEC_PARMS) == (EFAULT, 0, 0)
    limit = 8192 if kernel == "6.2" else 1 << 20
    assert m.pv_command(vm, KVM_PV_SET_SEC_PARMS, length=limit + 1) == (EINVAL, 0, 0)
    assert m.pv_command(vm, KVM_PV_SET_SEC_PARMS, length=limit).err == 0
    assert m.pv_command(vm, KVM_PV_SET_SEC_PARMS, header=b"") == (ENOMEM, 0, 0)
    assert m.pv_command(vm, KVM_PV_SET_SEC_PARMS, header=b"h" * 8192) == (0, 1, 0)
    bad = m.pv_command(vm, KVM_PV_SET_SEC_PARMS, header=b"h", valid=False)
    assert bad == (EINVAL, 0x0108, 0)  # a UV error is EINVAL, not EIO (invariant 22)
    assert m.pv_state(vm)["protected_count"] == 1  # no side effect since v6.0


def test_unpack_checks_and_pages():
    m, _, vm = protected_vm(memory=1 << 24)
    assert m.pv_command(vm, KVM_PV_UNPACK) == (EFAULT, 0, 0)
    for addr, size in [(1, PAGE_SIZE), (0, 0), (0, PAGE_SIZE + 1)]:
        assert m.pv_command(vm, KVM_PV_UNPACK, addr=addr, size=size, tweak=0) == (EINVAL, 0, 0)
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_UNPACK, addr=0x10000, size=3 * PAGE_SIZE, tweak=1) == (0, 1, 0)
    assert delta(m, before) == {"UNPACK_IMG": 3}
    handle = m.pv_state(vm)["handle"]
    assert [m.page_state(vm, 16 + i) for i in range(3)] == [(SECURE, handle)] * 3
    # runs off the end of guest memory: EFAULT, rc/rrc of the last UVC tried
    last = (1 << 24) - PAGE_SIZE
    assert m.pv_command(vm, KVM_PV_UNPACK, addr=last, size=2 * PAGE_SIZE, tweak=0) == (EFAULT, 1, 0)
    m.inject_failure("UNPACK_IMG", 0x0F01, 2)
    assert m.pv_command(vm, KVM_PV_UNPACK, addr=0, size=PAGE_SIZE, tweak=0) == (EINVAL, 0x0F01, 2)
    clean(m)


@pytest.mark.parametrize(
    ("cmd", "uvc"),
    [(KVM_PV_VERIFY, "VERIFY_IMG"), (KVM_PV_PREP_RESET, "PREPARE_RESET"), (KVM_PV_UNSHARE_ALL, "SET_UNSHARE_ALL")],
)
def test_nodata_commands(cmd, uvc):
    m, _, vm = protected_vm()
    before = m.uv.stats()
    assert m.pv_command(vm, cmd) == (0, 1, 0)
    assert delta(m, before) == {uvc: 1}
    m.inject_failure(uvc, 0x0010, 0x0001)
    assert m.pv_command(vm, cmd) == (EINVAL, 0x0010, 0x0001)


def test_info():
    m, _, vm = booted_vm()  # works whether or not the VM is protected
    assert m.pv_command(vm, KVM_PV_INFO) == (EFAULT, 0, 0)
    assert m.pv_command(vm, KVM_PV_INFO, id=KVM_PV_INFO_VM, len_max=15).err == EINVAL
    assert m.pv_command(vm, KVM_PV_INFO, id=KVM_PV_INFO_VM, len_max=79).err == EINVAL
    result = m.pv_command(vm, KVM_PV_INFO, id=KVM_PV_INFO_VM, len_max=80, rc_in=5, rrc_in=6)
    assert result == (0, 5, 6)
    assert result.data["len_written"] == 80
    assert result.data["inst_calls_list"][0] & 0x0000_0100_0000_0000  # bit 23: Destroy-Fast
    assert result.data["feature_indication"] == 0xC000_0000_0000_0000  # MISC + AIV
    assert m.pv_command(vm, KVM_PV_INFO, id=KVM_PV_INFO_DUMP, len_max=39).err == EINVAL
    assert m.pv_command(vm, KVM_PV_INFO, id=KVM_PV_INFO_DUMP, len_max=40).data["len_written"] == 40
    assert m.pv_command(vm, KVM_PV_INFO, id=2, len_max=100).err == EINVAL
    slow = Model(destroy_fast=False, feature_misc=False)
    vm2 = slow.create_vm(slow.spawn_process(), BIG)
    data = slow.pv_command(vm2, KVM_PV_INFO, id=KVM_PV_INFO_VM, len_max=80).data
    assert not data["inst_calls_list"][0] & 0x0000_0100_0000_0000
    assert data["feature_indication"] == 0x4000_0000_0000_0000


def test_dump_sequence():
    m, _, vm = protected_vm(memory=64 << 20, conf_dump_storage_state_len=512, conf_dump_finalize_len=256)
    assert m.pv_command(vm, KVM_PV_DUMP) == (EFAULT, 0, 0)
    for sub in (KVM_PV_DUMP_CONFIG_STOR_STATE, KVM_PV_DUMP_COMPLETE):
        assert m.pv_command(vm, KVM_PV_DUMP, subcmd=sub, buff_len=4096).err == EINVAL
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_CPU).err == ENOTTY
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=9).err == ENOTTY
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT) == (0, 1, 0)
    assert m.pv_state(vm)["dumping"]
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT).err == EINVAL
    stor = KVM_PV_DUMP_CONFIG_STOR_STATE
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=stor, buff_len=512, gaddr=4096).err == EINVAL
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=stor, buff_len=0).err == EINVAL
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=stor, buff_len=700).err == EINVAL
    before = m.uv.stats()
    result = m.pv_command(vm, KVM_PV_DUMP, subcmd=stor, buff_len=2048, gaddr=1 << 20)
    assert result == (0, 1, 0)
    assert result.data["gaddr"] == 5 << 20
    assert delta(m, before) == {"DUMP_CONF_STOR_STATE": 4}
    # past the end of guest memory the UV fails: EINVAL, data already produced stays
    result = m.pv_command(vm, KVM_PV_DUMP, subcmd=stor, buff_len=1024, gaddr=63 << 20)
    assert result.err == EINVAL
    assert result.data["bytes_copied"] == 512
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_COMPLETE, buff_len=255).err == EINVAL
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_COMPLETE, buff_len=256) == (0, 1, 0)
    assert not m.pv_state(vm)["dumping"]
    m.inject_failure("DUMP_INIT", 0x0020, 0)
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT) == (EINVAL, 0x0020, 0)
    assert not m.pv_state(vm)["dumping"]


def test_dumping_survives_disable_literal():
    m, _, vm = protected_vm(kernel="6.2")
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT) == (0, 1, 0)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert m.pv_state(vm)["dumping"]  # v6.2's kvm_s390_clear_pv_state does not reset it
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT).err == EINVAL
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_state(vm)["dumping"]


def test_dumping_ends_with_the_pv_state_latest():
    m, _, vm = protected_vm(kernel="latest")
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT) == (0, 1, 0)
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert not m.pv_state(vm)["dumping"]  # Δlatest: kvm_s390_clear_pv_state ends the dump
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert m.pv_command(vm, KVM_PV_DUMP, subcmd=KVM_PV_DUMP_INIT) == (0, 1, 0)


def test_capabilities():
    assert Model().check_extension(KVM_CAP_S390_PROTECTED) == 1
    assert Model().check_extension(KVM_CAP_S390_PROTECTED_DUMP) == 1
    assert Model().check_extension(KVM_CAP_S390_PROTECTED_ASYNC_DISABLE) == 1
    assert Model(async_destroy=5).check_extension(KVM_CAP_S390_PROTECTED_ASYNC_DISABLE) == 1
    assert Model(prot_virt=False).check_extension(KVM_CAP_S390_PROTECTED_ASYNC_DISABLE) == 0
    assert Model(prot_virt=False).check_extension(KVM_CAP_S390_PROTECTED) == 0
    assert Model().check_extension(999) == 0


# ------------------------------------------------------------------------------------------
# Export before import (should_export_before_import, invariant 23) and the fault model (docs/KERNEL.md)


@pytest.mark.parametrize("misc", [False, True])
def test_export_before_import_while_count_above_one(misc):
    m, _, vm = protected_vm(destroy_fast=False, feature_misc=misc)
    m.guest_access(vm, 0, 2)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert count(m, vm) == 2
    before = m.uv.stats()
    assert m.guest_access(vm, 10, 3) == 0
    assert m.pv_command(vm, KVM_PV_UNPACK, addr=0x40000, size=2 * PAGE_SIZE, tweak=0) == (0, 1, 0)
    exports = 0 if misc else 5
    expected = {"CONV_TO_SEC_STOR": 3, "UNPACK_IMG": 2}
    if exports:
        expected["CONV_FROM_SEC_STOR"] = exports
    assert delta(m, before) == expected
    assert m.pv_command(vm, PERFORM) == (0, 1, 0)
    before = m.uv.stats()
    m.guest_access(vm, 20, 3)
    assert delta(m, before) == {"CONV_TO_SEC_STOR": 3}  # count back to 1: no more exports
    clean(m)


def test_guest_touching_old_secure_page_destroys_then_imports():
    m, _, vm = protected_vm(destroy_fast=True, feature_misc=True)
    m.guest_access(vm, LOW_PAGES, 1)
    old = m.pv_state(vm)["handle"]
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.page_state(vm, LOW_PAGES) == (ORPHANED, old)
    # the non-protected rebooted guest touches it: host-style fault, pin fails, export
    before = m.uv.stats()
    assert m.guest_access(vm, LOW_PAGES, 1) == 0
    assert delta(m, before) == {"PIN_PAGE_SHARED": 1, "CONV_FROM_SEC_STOR": 1}
    assert m.page_state(vm, LOW_PAGES) == (EXPORTED, old)
    m.guest_access(vm, LOW_PAGES + 1, 1)  # untouched: nothing to do
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    new = m.pv_state(vm)["handle"]
    m.guest_access(vm, LOW_PAGES + 2, 1)  # give the old VM another page later
    # protected guest on an old orphaned page: violation -> destroy -> import
    m2, _, vm2 = protected_vm(destroy_fast=True)
    m2.guest_access(vm2, LOW_PAGES, 1)
    assert m2.pv_command(vm2, PREPARE) == (0, 1, 42)
    assert m2.pv_command(vm2, KVM_PV_ENABLE) == (0, 1, 0)
    before = m2.uv.stats()
    assert m2.guest_access(vm2, LOW_PAGES, 1) == 0
    assert delta(m2, before) == {"DESTR_SEC_STOR": 1, "CONV_TO_SEC_STOR": 1}
    assert m2.page_state(vm2, LOW_PAGES) == (SECURE, m2.pv_state(vm2)["handle"])
    assert new
    assert m.uv.secure_pages(new) == 1
    clean(m)
    clean(m2)


def test_host_access_and_shared_pages():
    m, _, vm = protected_vm()
    handle = m.pv_state(vm)["handle"]
    assert m.guest_share(vm, 5, 2) == 0
    assert m.page_state(vm, 5) == (SHARED, handle)
    before = m.uv.stats()
    assert m.host_access(vm, 5, 2) == 0  # shared: no fault
    assert delta(m, before) == {}
    m.guest_access(vm, 9, 1)
    before = m.uv.stats()
    assert m.host_access(vm, 9, 1) == 0
    assert delta(m, before) == {"PIN_PAGE_SHARED": 1, "CONV_FROM_SEC_STOR": 1}
    assert m.page_state(vm, 9) == (EXPORTED, handle)
    assert m.uv.secure_pages(handle) == 2  # exported pages are not counted
    assert m.guest_access(vm, 9, 1) == 0  # the guest imports it back
    assert m.page_state(vm, 9) == (SECURE, handle)
    assert m.pv_command(vm, KVM_PV_UNSHARE_ALL) == (0, 1, 0)
    assert m.page_state(vm, 5) == (SECURE, handle)
    booted, _, plain = booted_vm()
    assert booted.guest_share(plain, 0, 1) == EINVAL  # only a protected guest can share
    clean(m)


def test_destroy_is_idempotent():
    m, _, vm = protected_vm(destroy_fast=False)
    m.guest_access(vm, 0, 3)
    m.guest_access(vm, LOW_PAGES, 3)
    m.host_access(vm, 100, 2)  # present, never secure
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    before = m.uv.stats()
    assert m.pv_command(vm, PERFORM) == (0, 1, 0)
    assert delta(m, before) == {"DESTR_SEC_STOR": 8, "DESTROY_SEC_CONF": 1}
    assert m.uv.secure_pages() == 0
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    states = {p: m.page_state(vm, p) for p in (0, 1, 2, 100, LOW_PAGES)}
    before = m.uv.stats()
    assert m.pv_command(vm, KVM_PV_DISABLE) == (0, 1, 0)
    assert delta(m, before) == {"DESTROY_SEC_CPU": 2, "DESTROY_SEC_CONF": 1, "DESTR_SEC_STOR": 8}
    assert {p: m.page_state(vm, p) for p in states} == states  # all NONSECURE no-ops
    clean(m)


# ------------------------------------------------------------------------------------------
# exit (do_exit drops the mm before the files), the CLONE_VM helper, kill (PERFORM interrupted),
# VM destroy (kvm_arch_destroy_vm)


@pytest.mark.parametrize("fast", [False, True])
def test_exit_without_helper(fast):
    m, pid, vm = protected_vm(destroy_fast=fast)
    m.guest_access(vm, 0, 4)
    before = m.uv.stats()
    m.exit(pid)
    assert not m.process_alive(pid)
    d = delta(m, before)
    assert d["DESTROY_SEC_CPU"] == 2
    assert d["DESTR_SEC_STOR"] == 4
    if fast:  # notifier: Destroy-Fast; VM destroy then finds handle 0
        assert d["DESTROY_SEC_CONF_FAST"] == 1
        assert "DESTROY_SEC_CONF" not in d
        assert count(m, vm) == 1  # the notifier never decrements (mm is dead)
    else:
        assert d["DESTROY_SEC_CONF"] == 1
        assert "DESTROY_SEC_CONF_FAST" not in d
        assert count(m, vm) == 0
    assert m.uv.live_configs() == 0
    assert m.uv.secure_pages() == 0
    clean(m)


@pytest.mark.parametrize("fast", [False, True])
def test_exit_with_clone_vm_helper(fast):
    m, pid, vm = protected_vm(destroy_fast=fast)
    helper = m.clone_vm(pid)
    m.guest_access(vm, 0, 4)
    before = m.uv.stats()
    m.exit(pid)
    assert m.process_alive(helper)
    d = delta(m, before)
    # VM destroy in QEMU's context: normal Destroy Config, full zap while the mm lives
    assert d == {"DESTROY_SEC_CPU": 2, "DESTROY_SEC_CONF": 1, "DESTR_SEC_STOR": 4}
    assert count(m, vm) == 0
    before = m.uv.stats()
    m.exit(helper)
    assert delta(m, before) == {}  # the mm is no longer protected: no page UVCs
    clean(m)


def test_kill_during_perform():
    m, pid, vm = protected_vm(destroy_fast=False)
    m.guest_access(vm, LOW_PAGES, 40)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    m.perform_claim(vm)
    m.kill(pid)
    assert m.inflight_tokens() == []
    assert m.pv_state(vm)["need_cleanup"] == 0  # disposed of by VM destroy
    assert m.uv.live_configs() == 0
    assert m.uv.secure_pages() == 0
    assert not m.process_alive(pid)
    clean(m)


def test_close_vm_disposes_leftovers_and_zaps():
    m, pid, vm = protected_vm(destroy_fast=True)
    m.guest_access(vm, LOW_PAGES, 10)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    before = m.uv.stats()
    m.close_vm(vm)
    m.close_vm(vm)  # twice is a no-op
    assert delta(m, before) == {"DESTR_SEC_STOR": 10}
    assert count(m, vm) == 0
    assert m.uv.secure_pages() == 0
    with pytest.raises(ValueError, match="is closed"):
        m.guest_access(vm, 0, 1)
    clean(m)
    m.exit(pid)
    clean(m)


def test_close_non_protected_vm_touches_nothing():
    m, _, vm = booted_vm()
    m.guest_access(vm, 0, 3)
    before = m.uv.stats()
    m.close_vm(vm)  # Δ6.5: cleanup-all returns at once when the count is 0
    assert delta(m, before) == {}
    clean(m)


def test_unmap_on_close_option():
    m, pid, vm = booted_vm(unmap_on_close=True)
    other = m.create_vm(pid, BIG)
    assert m.pv_command(other, KVM_PV_ENABLE) == (0, 1, 0)
    m.guest_access(vm, 0, 3)
    before = m.uv.stats()
    m.close_vm(vm)  # partial unmap of a protected mm: export per present page
    assert delta(m, before) == {"CONV_FROM_SEC_STOR": 3}
    m.exit(pid)
    clean(m)


def test_uv_handles_in_creation_order():
    m, _, vm = protected_vm(destroy_fast=False)
    first = m.pv_state(vm)["handle"]
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    assert m.pv_command(vm, KVM_PV_ENABLE) == (0, 1, 0)
    assert m.uv.created_handles == [first, m.pv_state(vm)["handle"]]


# ------------------------------------------------------------------------------------------
# Random sequences: the model keeps its own invariants (no injected failures).


class ModelMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.m: Model | None = None

    @property
    def model(self) -> Model:
        """The booted model (every rule but ``boot`` runs after it)."""
        assert self.m is not None
        return self.m

    @rule(
        fast=st.booleans(),
        misc=st.booleans(),
        helper=st.booleans(),
        vcpus=st.integers(0, 3),
        gib=st.sampled_from([1, 2, 3, 8]),
    )
    @precondition(lambda self: self.m is None)
    def boot(self, fast, misc, helper, vcpus, gib):
        self.m = Model(destroy_fast=fast, feature_misc=misc)
        self.pid = self.model.spawn_process()
        self.helper = self.model.clone_vm(self.pid) if helper else None
        self.vm = self.model.create_vm(self.pid, gib * GiB, vcpus)
        self.pages = gib * GiB // PAGE_SIZE
        self.tokens = []

    def _alive(self):
        return self.m is not None and self.model.process_alive(self.pid)

    def _live(self):
        return self._alive()

    @rule(cmd=st.sampled_from([0, 1, 4, 5, 6, 9, 10]))
    @precondition(lambda self: self._live())
    def command(self, cmd):
        result = self.model.pv_command(self.vm, cmd)
        if cmd == PREPARE and result.err == 0:
            assert result[1:] == (1, 42)
        if cmd == KVM_PV_DISABLE and result.err == 0:
            assert result.rc == 1

    @rule(data=st.data())
    @precondition(lambda self: self._live())
    def access(self, data):
        page = data.draw(st.sampled_from([0, 1, 7, LOW_PAGES - 1, LOW_PAGES, LOW_PAGES + 3]))
        page = min(page, self.pages - 2)
        n = data.draw(st.integers(1, 2))
        kind = data.draw(st.sampled_from(["guest", "host", "share", "unpack"]))
        if kind in ("guest", "share") and not self.model.vms[self.vm].vcpus:
            with pytest.raises(ValueError, match="vcpu"):  # a guest runs only on a vCPU
                self.model.guest_access(self.vm, page, n)
        elif kind == "guest":
            self.model.guest_access(self.vm, page, n)
        elif kind == "host":
            self.model.host_access(self.vm, page, n)
        elif kind == "share":
            self.model.guest_share(self.vm, page, n)
        else:
            self.model.pv_command(self.vm, KVM_PV_UNPACK, addr=page * PAGE_SIZE, size=n * PAGE_SIZE, tweak=0)

    @rule()
    @precondition(lambda self: self._live())
    def claim(self):
        result = self.model.perform_claim(self.vm)
        if result.token is not None:
            self.tokens.append(result.token)

    @rule(interrupted=st.booleans(), batches=st.integers(0, 2))
    @precondition(lambda self: self._alive() and self.tokens)
    def finish(self, interrupted, batches):
        result = self.model.perform_finish(self.tokens.pop(0), interrupted, batches)
        assert result.err == 0
        if interrupted:
            assert result[1:] == (1, 42)

    @rule(kill=st.booleans())
    @precondition(lambda self: self._alive())
    def end(self, kill):
        (self.model.kill if kill else self.model.exit)(self.pid)
        self.tokens = []
        if self.helper is not None:
            self.model.exit(self.helper)
        if self.model.uv.injected_fired == 0:
            assert self.model.uv.live_configs() == 0
            assert self.model.uv.secure_pages() == 0

    @rule()
    @precondition(lambda self: self.m is not None)
    def observe(self):
        state = self.model.pv_state(self.vm)
        assert state["protected_count"] >= 0
        assert state["protected"] == (state["handle"] != 0)

    @invariant()
    def holds(self):
        if self.m is not None:
            clean(self.m)


class FailureMachine(ModelMachine):
    """The same, with injected UVC failures, vCPU hotplug and early close: the counting
    (invariant 8) and freeing (invariant 12) rules must survive every error path."""

    @rule(
        uvc=st.sampled_from(
            [
                "CREATE_SEC_CONF",
                "DESTROY_SEC_CONF",
                "DESTROY_SEC_CONF_FAST",
                "CREATE_SEC_CPU",
                "DESTROY_SEC_CPU",
                "DESTR_SEC_STOR",
                "CONV_FROM_SEC_STOR",
                "CONV_TO_SEC_STOR",
                "UNPACK_IMG",
            ]
        ),
        rc=st.sampled_from([0x0104, 0x0200, 0x8000 | 0x0201]),
        count=st.integers(1, 2),
        after=st.integers(0, 2),
    )
    @precondition(lambda self: self._live())
    def inject(self, uvc, rc, count, after):
        self.model.inject_failure(uvc, rc, 0, count, after)

    @rule()
    @precondition(lambda self: self._live())
    def hotplug(self):
        self.model.create_vcpu(self.vm)

    @rule()
    @precondition(lambda self: self._live() and not self.model.vm_info(self.vm)["closed"])
    def close(self):
        self.model.close_vm(self.vm)

    def _live(self):
        return self._alive() and not self.model.vm_info(self.vm)["closed"]


FailureMachine.TestCase.settings = settings(
    stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_failure_machine = FailureMachine.TestCase

ModelMachine.TestCase.settings = settings(
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_model_machine = ModelMachine.TestCase


def test_kill_after_close_with_perform_in_flight_destroys_after_mm():
    m, pid, vm = protected_vm(destroy_fast=False)
    m.guest_access(vm, LOW_PAGES, 5)
    assert m.pv_command(vm, PREPARE) == (0, 1, 42)
    m.perform_claim(vm)
    m.close_vm(vm)  # the running PERFORM keeps the VM alive
    assert m.uv.live_configs() == 1
    start = len(m.uv.trace)
    m.kill(pid)
    names = [e.name for e in m.uv.trace[start:]]
    # mm teardown (count 1 from the leftover: page destroys) before the VM release (0x0101)
    assert names == ["DESTR_SEC_STOR"] * 5 + ["DESTROY_SEC_CONF"]
    assert m.uv.live_configs() == 0
    assert count(m, vm) == 0
    clean(m)
