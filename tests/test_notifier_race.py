"""The mm-release notifier races kvm_arch_destroy_vm's cleanup-all (issue 13 item 4).

Nothing in the kernel serialises them, in any profile: kvm_arch_destroy_vm takes no kvm->lock,
kvm_s390_pv_mmu_notifier_release takes none either, and the mmu_notifier core lets ->release run
concurrently with mmu_notifier_unregister. QEMU's exit (VM destroy after exit_mm) racing its
CLONE_VM helper's exit (the last mm user: exit_mmap runs the release) therefore lets the
notifier's Destroy-Fast and VM destroy's Destroy Config act on the same configuration. pvfast
keeps that race, reproducible with race points, and records it in ``host.races()``.
"""

from __future__ import annotations

import threading

import pytest

import pvfast
from pvfast import PvCmd, profiles

from .conftest import GiB, MiB, race_residue_bytes, unexplained_leaks

PAGE = 4096
JOIN = 30.0
RACE = "mmu_notifier_release vs kvm_arch_destroy_vm"


def qemu_with_helper(kernel: str) -> tuple[pvfast.Host, pvfast.Process, pvfast.Process, pvfast.Vm]:
    host = pvfast.Host(kernel=kernel)  # Destroy-Fast installed
    qemu = host.spawn_process()
    vm = qemu.create_vm(4 * GiB, vcpus=2)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, 4 * MiB)
    helper = qemu.clone_vm()  # -run-with async-teardown=on
    return host, qemu, helper, vm


@pytest.mark.parametrize("kernel", list(profiles.PROFILES))
def test_notifier_destroy_fast_wins_and_vm_destroy_leaks_the_top_table(kernel: str) -> None:
    """VM destroy has decided to destroy the current configuration (the handle was set) when the
    helper's exit runs the release notifier: its Destroy-Fast of the same configuration wins;
    kvm_s390_pv_deinit_vm then reads handle 0, Destroy Config fails (rc 0x0020) and the
    "impossible error" path leaks the top table it replaced: 16 KiB on the ledger. The reported
    symptom (1 in ~750 exit pairs), in every profile."""
    host, qemu, helper, vm = qemu_with_helper(kernel)
    handle = vm.pv_state().handle
    table = vm.gmap.table
    with host.race_point("cleanup_all_deinit_vm", vm=vm) as destroying:
        exiting = threading.Thread(target=qemu.exit)  # exit_mm (the helper keeps the mm), then VM destroy
        exiting.start()
        destroying.wait()
        helper.exit()  # the last mm user: the release notifier's Destroy-Fast
        assert handle not in host.uv.config_handles()
        destroying.release()
        exiting.join(JOIN)
    assert not exiting.is_alive()
    stats = host.uv.stats()
    assert (stats["DESTROY_SEC_CONF_FAST"], stats["DESTROY_SEC_CONF"]) == (1, 1)
    assert [(e["kind"], e["addr"], e["size"]) for e in host.leaked()] == [("crst", table, 16 * 1024)]
    assert host.kernel_memory() == 16 * 1024
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()
    races = host.races()
    assert [(r["race"], r["function"], r["handle"], r["leaked"]) for r in races] == [
        (RACE, "kvm_s390_pv_deinit_vm", 0, [table])
    ]
    # what the invariant checks accept as this race's residue, and nothing more
    assert unexplained_leaks(host) == []
    assert race_residue_bytes(host) == host.kernel_memory()


@pytest.mark.parametrize("kernel", ["6.2", "latest"])
def test_vm_destroy_wins_and_the_notifier_destroy_fast_fails(kernel: str) -> None:
    """The other order: the notifier has tested the handle and decided to Destroy-Fast when VM
    destroy's cleanup-all destroys the configuration; kvm_s390_pv_deinit_vm_fast then reads
    handle 0 and fails (WARN_ONCE in the kernel). Nothing leaks."""
    host, qemu, helper, vm = qemu_with_helper(kernel)
    with host.race_point("notifier_release", vm=vm) as deciding:
        exiting = threading.Thread(target=helper.exit)
        with host.race_point("vm_destroy_vcpus_gone", vm=vm) as vcpus_gone:
            qemu_exit = threading.Thread(target=qemu.exit)
            qemu_exit.start()
            vcpus_gone.wait()  # VM destroy: the vCPUs are gone, cleanup-all next
            exiting.start()  # the helper: last mm user, the notifier finds no CPUs
            assert deciding.wait()["fast"]
            vcpus_gone.release()
            qemu_exit.join(JOIN)  # cleanup-all destroyed the configuration
        deciding.release()
        exiting.join(JOIN)
    stats = host.uv.stats()
    assert (stats["DESTROY_SEC_CONF"], stats["DESTROY_SEC_CONF_FAST"]) == (1, 1)
    assert host.leaked() == []
    assert host.kernel_memory() == 0
    assert host.uv.config_handles() == set()
    assert [(r["function"], r["handle"], r["leaked"]) for r in host.races()] == [("kvm_s390_pv_deinit_vm_fast", 0, [])]


def test_sequential_exits_do_not_race() -> None:
    """Without the overlap nothing of this happens: QEMU's exit completes (VM destroy while the
    helper still holds the mm: full cleanup, zap), then the helper's exit finds nothing."""
    host, qemu, helper, _vm = qemu_with_helper("latest")
    qemu.exit()
    helper.exit()
    assert host.races() == []
    assert host.leaked() == []
    assert host.kernel_memory() == 0
    assert host.uv.stats()["DESTROY_SEC_CONF_FAST"] == 0


def test_exit_pairs_racing_freely_leave_only_the_documented_residue() -> None:
    """QEMU's exit and its helper's exit in two threads, 60 pairs, no race point: whatever the
    interleaving, nothing is left but what host.races() explains, and no oops."""
    for _ in range(60):
        host, qemu, helper, _vm = qemu_with_helper("latest")
        a = threading.Thread(target=qemu.exit)
        b = threading.Thread(target=helper.exit)
        a.start()
        b.start()
        a.join(JOIN)
        b.join(JOIN)
        assert not a.is_alive()
        assert not b.is_alive()
        assert host.uv.secure_pages() == 0
        assert host.uv.config_handles() == set()
        assert unexplained_leaks(host) == []
        assert host.kernel_memory() == race_residue_bytes(host)
        assert host.oopses() == []


def test_the_window_before_5ff92181577a_is_the_same_race() -> None:
    """In 6.2/6.4 the race has one more outcome: VM destroy of an unprotected VM raises the count
    from 0 (test_profiles' replay of 5ff92181577a), so the helper's teardown issues destroy UVCs."""
    assert not profiles.profile("6.4").cleanup_all_skip_if_zero
    host = pvfast.Host(kernel="6.4")
    qemu = host.spawn_process()
    vm = qemu.create_vm(64 * MiB)
    vm.host_write(0, b"x")
    helper = qemu.clone_vm()
    with host.race_point("cleanup_all_counted", vm=vm) as counted:
        t = threading.Thread(target=qemu.exit)
        t.start()
        counted.wait()
        helper.exit()
        counted.release()
        t.join(JOIN)
    assert host.uv.stats()["DESTR_SEC_STOR"] == 1
    assert host.races() == []  # no configuration was involved: nothing for the ledger
