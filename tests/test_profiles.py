"""Kernel profiles: the API, one test per delta (a profile without it and one with it, differing
in an observable), the seven divergences from the kernel's code that were fixed (each citing the
kernel function), the race points, and the two replays of bugs later kernels fixed."""

from __future__ import annotations

import errno
import itertools
import logging
import pathlib
import re
import threading
import time
from typing import Any

import pytest

import pvfast
from pvfast import PvCmd, PvDumpSubcmd, PvError, RaceTimeout, Uvc, UvcError, profiles, vmm
from pvfast import image as pvfast_image

from .conftest import GiB, MiB

PAGE = 4096
PREPARE = PvCmd.ASYNC_CLEANUP_PREPARE
PERFORM = PvCmd.ASYNC_CLEANUP_PERFORM
ROOT = pathlib.Path(__file__).resolve().parents[1]
JOIN = 30.0


def pv(vm: pvfast.Vm, cmd: int, **kw: Any) -> tuple[int, int, int]:
    try:
        r = vm.pv_command(cmd, **kw)
    except PvError as err:
        return (err.errno or 0, err.rc, err.rrc)
    return (0, r.rc, r.rrc)


def until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + JOIN
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


# ------------------------------------------------------------------ the API


def test_default_is_the_newest_and_host_kernel_reports_it() -> None:
    assert pvfast.Host().kernel == "latest" == profiles.DEFAULT
    assert pvfast.Host(kernel="6.2").kernel == "6.2"
    assert pvfast.Host(kernel="mainline").kernel == "latest"  # the documented alias
    assert pvfast.Host(kernel="6.5").profile.cleanup_all_skip_if_zero


def test_unknown_profile_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"kernel: unknown kernel profile '6\.3'; the profiles are 6\.2, 6\.4"):
        pvfast.Host(kernel="6.3")
    with pytest.raises(TypeError, match="kernel"):
        pvfast.Host(kernel=6.2)  # type: ignore[arg-type]


def test_profile_is_read_only() -> None:
    host = pvfast.Host()
    with pytest.raises(PermissionError):
        host.kernel = "6.2"


def test_profiles_are_rows_of_deltas_each_newer_one_a_superset() -> None:
    rows = list(profiles.PROFILES.values())
    assert all(a <= b for a, b in itertools.pairwise(rows))
    assert profiles.PROFILES["6.2"] == frozenset()
    assert profiles.PROFILES["latest"] == frozenset(profiles.DELTA_NAMES)
    assert set(profiles.DESCRIPTIONS) == set(profiles.PROFILES)
    for name in profiles.PROFILES:
        p = profiles.profile(name)
        assert {d for d in profiles.DELTA_NAMES if getattr(p, d)} == p.deltas


def test_every_delta_is_in_the_kernel_md_table_and_has_a_test_pair() -> None:
    text = (ROOT / "docs" / "KERNEL.md").read_text(encoding="utf-8")
    tests = {name for name in globals() if name.startswith("test_delta_")}
    for delta in profiles.DELTAS:
        assert f"| `{delta.name}` |" in text, delta.name
        assert f"test_delta_{delta.name}" in tests, delta.name


# ------------------------------------------------------------------ one test per delta


def test_delta_segment_asce_refused() -> None:
    """292a7d6fca33, kvm_s390_pv_set_aside: PREPARE on a segment-ASCE VM (limit <= 2 GiB)."""
    results = {}
    for kernel in ("6.2", "6.4"):
        host = pvfast.Host(kernel=kernel)
        vm = host.create_vm(2 * GiB)
        vm.pv_command(PvCmd.ENABLE)
        results[kernel] = pv(vm, PREPARE)
        vm.close()
    assert results == {"6.2": (0, 1, 42), "6.4": (errno.EINVAL, 0, 0)}


def _cleanup_all_races_helper_teardown(kernel: str, *, uv_facility: bool) -> tuple[pvfast.Host, int, int]:
    """VM destroy of a never-protected VM while the CLONE_VM helper's exit tears the pages of the
    same mm down. Returns (host, DESTR_SEC_STOR of the page teardown, race-point hits)."""
    host = pvfast.Host(kernel=kernel, prot_virt=uv_facility, uv_facility=uv_facility)
    qemu = host.spawn_process()
    vm = qemu.create_vm(64 * MiB)
    vm.host_write(0, b"guest RAM" * 1000)  # three present pages
    helper = qemu.clone_vm()
    with host.race_point("cleanup_all_counted", vm=vm) as inside:
        t = threading.Thread(target=qemu.exit)  # exit_mm (the helper keeps the mm), then VM destroy
        t.start()
        if not host.profile.cleanup_all_skip_if_zero:
            inside.wait()  # kvm_s390_pv_deinit_cleanup_all: protected_count 0 -> 1
        else:
            t.join(JOIN)  # 5ff92181577a: count 0, cleanup-all returns before the point
        before = host.uv.stats().get("DESTR_SEC_STOR", 0)
        helper.exit()  # the last mm user: exit_mmap, ptep_get_and_clear_full on every page
        destroys = host.uv.stats().get("DESTR_SEC_STOR", 0) - before
        inside.release()
        t.join(JOIN)
        hits = inside.hits
    assert not t.is_alive()
    return host, destroys, hits


def test_delta_cleanup_all_skip_if_zero() -> None:
    """5ff92181577a, kvm_s390_pv_deinit_cleanup_all: on a UV host the race costs one destroy-page
    UVC per present page of the mm (no-ops); without the UV it is an oops (the replay below)."""
    host, destroys, hits = _cleanup_all_races_helper_teardown("6.4", uv_facility=True)
    assert (destroys, hits) == (3, 1)
    host, destroys, hits = _cleanup_all_races_helper_teardown("6.5", uv_facility=True)
    assert (destroys, hits) == (0, 0)
    assert host.oopses() == []


def test_delta_fast_0x104_no_warn(caplog: pytest.LogCaptureFixture) -> None:
    """b1e428615f15, kvm_s390_pv_deinit_vm_fast: Destroy-Fast rc 0x0104 WARNs before v6.6."""
    for kernel, warned in (("6.5", True), ("6.6", False)):
        caplog.clear()
        host = pvfast.Host(kernel=kernel)
        vm = host.create_vm(4 * GiB)
        vm.pv_command(PvCmd.ENABLE)
        host.uv.inject_failure(Uvc.DESTROY_SEC_CONF_FAST, 0x0104)
        with caplog.at_level(logging.WARNING, logger="pvfast.host"):
            assert pv(vm, PREPARE) == (errno.EIO, 0x0104, 0)
        assert ("WARNING: at kvm_s390_pv_deinit_vm_fast" in caplog.text) == warned, kernel
        assert vm.pv_state().protected  # nothing else differs
        vm.process.kill()


def test_warn_once_warns_once_per_host(caplog: pytest.LogCaptureFixture) -> None:
    host = pvfast.Host(kernel="6.6")
    vm = host.create_vm(4 * GiB)
    with caplog.at_level(logging.WARNING, logger="pvfast.host"):
        for _ in range(2):
            vm.pv_command(PvCmd.ENABLE)
            host.uv.inject_failure(Uvc.DESTROY_SEC_CONF_FAST, 0x0003)
            assert pv(vm, PREPARE)[0] == errno.EIO
            vm.pv_command(PvCmd.DISABLE)
    assert caplog.text.count("WARNING: at kvm_s390_pv_deinit_vm_fast") == 1
    vm.close()


def _enable_with_a_fatal_signal_pending(kernel: str) -> tuple[pvfast.Host, tuple[int, int, int]]:
    host = pvfast.Host(kernel=kernel)
    proc = host.spawn_process()
    vm = proc.create_vm(4 * GiB)
    result: list[tuple[int, int, int]] = []
    with host.race_point("enable_start", vm=vm) as start:
        t = threading.Thread(target=lambda: result.append(pv(vm, PvCmd.ENABLE)))
        t.start()
        start.wait()
        killer = threading.Thread(target=proc.kill)
        killer.start()  # waits for ENABLE, with the signal pending for it
        until(proc.fatal_signal.is_set, "the fatal signal")
        start.release()
        t.join(JOIN)
        killer.join(JOIN)
    return host, result[0]


def test_delta_notifier_register_first() -> None:
    """ "KVM: s390: Fix incorrect usage of mmu_notifier_register()", kvm_s390_pv_init_vm: with a
    signal pending mm_take_all_locks fails with -EINTR. The fixed kernel returns that from ENABLE
    before anything is allocated; before, ENABLE went on without a registered notifier and VM
    destroy unregistered it anyway: the extra mmdrop frees the mm too early."""
    host, result = _enable_with_a_fatal_signal_pending("latest")
    assert result == (errno.EINTR, 0, 0)
    assert host.uv.stats().get("CREATE_SEC_CONF", 0) == 0
    assert host.oopses() == []
    assert host.kernel_memory() == 0
    host, result = _enable_with_a_fatal_signal_pending("6.6")
    assert result == (0, 1, 0)
    assert [(o["kind"], o["function"]) for o in host.oopses()] == [("kasan", "mmu_notifier_unregister")]
    assert host.uv.stats().get("DESTROY_SEC_CONF_FAST", 0) == 0  # the release never ran


def _perform_with_a_second_vm(kernel: str) -> int:
    host = pvfast.Host(kernel=kernel)
    proc = host.spawn_process()
    vm = proc.create_vm(4 * GiB)
    other = proc.create_vm(4 * GiB)  # another VM of the same process
    other.host_write(0, b"x" * (100 * PAGE))
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, 10 * PAGE)
    vm.pv_command(PREPARE)
    before = host.uv.stats().get("DESTR_SEC_STOR", 0)
    vm.pv_command(PERFORM)
    proc.exit()
    return host.uv.stats().get("DESTR_SEC_STOR", 0) - before


def test_delta_walk_own_gmap() -> None:
    """a2c17f9270cc, gmap_pv_destroy_range: PERFORM walked the whole mm (every present page of
    every VM of the process: __s390_uv_destroy_range(mm, 0, TASK_SIZE_MAX)), now only the VM's
    own memory. Counted up to the exit (which adds nothing: the mm is no longer protected)."""
    assert _perform_with_a_second_vm("6.6") == 110
    assert _perform_with_a_second_vm("latest") == 10


def test_delta_walk_export_fallback() -> None:
    """a2c17f9270cc, __kvm_s390_pv_destroy_page: a destroy the UV refuses during PERFORM's walk
    (the rebooted guest's pages: its configuration has CPUs) is followed by an export."""
    got = {}
    for kernel in ("6.6", "latest"):
        host = pvfast.Host(kernel=kernel)
        vm = host.create_vm(4 * GiB)
        vm.pv_command(PvCmd.ENABLE)
        vm.pv_command(PREPARE)
        vm.pv_command(PvCmd.ENABLE)
        vm.guest_write(3 * GiB, b"rebooted guest")
        before = host.uv.stats().get("CONV_FROM_SEC_STOR", 0)
        vm.pv_command(PERFORM)
        got[kernel] = (
            host.uv.stats().get("CONV_FROM_SEC_STOR", 0) - before,
            vm.region.page_state(3 * GiB // PAGE).state,
        )
        assert vm.guest_read(3 * GiB, 14) == b"rebooted guest"  # imported back on the next touch
        vm.close()
    assert got == {"6.6": (0, "secure"), "latest": (1, "exported")}


def _hot_added_vcpu_after_failed_destroy(kernel: str) -> pvfast.Host:
    host = pvfast.Host(kernel=kernel)
    vm = host.create_vm(64 * MiB, vcpus=1)
    vm.pv_command(PvCmd.ENABLE)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0003)
    assert pv(vm, PvCmd.DISABLE)[0] == errno.EIO  # handle kept, gmap->guest_handle zeroed
    vm.create_vcpu()  # a secure CPU on the half-dead configuration
    return host


def test_delta_no_guest_handle() -> None:
    """Divergence 2, gmap_convert_to_secure (uv.c) up to the gmap rewrite imports with
    gmap->guest_handle, which kvm_s390_pv_deinit_vm zeroes even when it fails; the newest
    kvm_s390_pv_convert_to_secure uses kvm->arch.pv.handle. A secure vCPU's guest access after a
    failed destroy: the import fails (the kernel sends the vCPU thread SIGSEGV) vs works."""
    host = _hot_added_vcpu_after_failed_destroy("6.6")
    vm = host.processes[0].vms[0]
    assert vm.pv_state().guest_handle == 0
    with pytest.raises(UvcError, match="CONV_TO_SEC_STOR"):
        vm.guest_access(0, vcpu=1)
    vm.process.kill()
    host = _hot_added_vcpu_after_failed_destroy("latest")
    vm = host.processes[0].vms[0]
    vm.guest_access(0, vcpu=1)
    assert vm.region.page_state(0).state == "secure"
    vm.process.kill()


def test_delta_se_header_1m() -> None:
    """ "Increase permitted SE header size to 1 MiB", kvm_s390_handle_pv (SET_SEC_PARMS): a 16 KiB
    header is EINVAL before the UV sees it up to 6.x (limit PAGE_SIZE * 2), passed to the UV
    (which refuses this one) in the newest kernels."""
    header = b"\0" * (16 * 1024)
    for kernel, uvcs in (("6.6", 0), ("latest", 1)):
        host = pvfast.Host(kernel=kernel)
        vm = host.create_vm(64 * MiB)
        vm.pv_command(PvCmd.ENABLE)
        err = pv(vm, PvCmd.SET_SEC_PARMS, header=header)
        assert err[0] == errno.EINVAL
        assert host.uv.stats().get("SET_SEC_CONF_PARAMS", 0) == uvcs
        assert (err[1] != 0) == bool(uvcs)  # the UV's rc, or untouched
        big = pv(vm, PvCmd.SET_SEC_PARMS, header=b"\0" * 16, length=(1 << 20) + 1)
        assert big == (errno.EINVAL, 0, 0)  # above 1 MiB in every profile
        vm.close()


def test_delta_clear_pv_state_resets_dump() -> None:
    """kvm_s390_clear_pv_state of the newest kernels ends a dump in progress (and unblocks the
    vCPUs); before, DUMP_INIT, DISABLE, ENABLE left the next guest unable to start a dump."""
    for kernel, dumping in (("6.6", True), ("latest", False)):
        host = pvfast.Host(kernel=kernel)
        vm = host.create_vm(4 * GiB, vcpus=2)
        vm.pv_command(PvCmd.ENABLE)
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)
        vm.pv_command(PREPARE if kernel == "latest" else PvCmd.DISABLE)
        assert vm.pv_state().dumping == dumping
        assert all(v.sie_blocked == dumping for v in vm.vcpu_list)
        vm.pv_command(PvCmd.ENABLE)
        assert pv(vm, PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)[0] == (errno.EINVAL if dumping else 0)
        vm.close()


def test_delta_create_cpu_fail_frees() -> None:
    """kvm_s390_pv_create_cpu: a failed Create CPU frees the CPU donation and the SIDA page in
    the newest kernels; before, kvm_s390_pv_destroy_cpu returned early (no CPU handle) and both
    leaked: kernel memory that no teardown frees (not on the leak ledger: nobody meant it)."""
    for kernel, leaked in (("6.6", True), ("latest", False)):
        host = pvfast.Host(kernel=kernel)
        vm = host.create_vm(64 * MiB, vcpus=1)
        host.uv.inject_failure(Uvc.CREATE_SEC_CPU, 0x0003)
        assert pv(vm, PvCmd.ENABLE)[0] == errno.EIO
        vm.close()  # its process exits with it
        assert host.leaked() == []
        cpu_and_sida = host.uv_info["guest_cpu_stor_len"] + PAGE
        assert host.kernel_memory() == (cpu_and_sida if leaked else 0), kernel


# ------------------------------------------------------------------ the seven divergences


def test_cpus_from_pv_reports_only_a_failing_destroy() -> None:
    """Divergence 1, kvm_s390_cpus_from_pv: every CPU destroy writes a local rc/rrc; the caller's
    get them only from the first destroy that fails. A PREPARE refused in set_aside (one record
    is already set aside) reports the rc/rrc passed in (QEMU logs "header rc 0"), not 1."""
    host = pvfast.Host()
    vm = host.create_vm(4 * GiB, vcpus=2)
    vm.pv_command(PvCmd.ENABLE)
    vm.pv_command(PREPARE)
    vm.pv_command(PvCmd.ENABLE)
    assert pv(vm, PREPARE, rc=0, rrc=0) == (errno.EINVAL, 0, 0)
    vm.process.kill()
    vm = host.create_vm(64 * MiB, vcpus=2)
    vm.pv_command(PvCmd.ENABLE)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0003, rrc=0x22)  # the first CPU's destroy fails
    assert pv(vm, PvCmd.DISABLE) == (errno.EIO, 0x0003, 0x22)  # not the second one's rc 1
    vm.process.kill()


def test_dump_stor_state_rc_and_flushes() -> None:
    """Divergence 3, kvm_s390_pv_dump_stor_state: an argument error leaves through the exit that
    copies the (zero) UVC header, so rc = rrc = 0 replace what was passed in; "not dumping" is
    kvm_s390_pv_dmp's EINVAL with rc/rrc untouched; the output reaches the user per full 1 MiB
    kernel buffer, so a UVC failure loses what came since the last flush."""
    host = pvfast.Host()
    vm = host.create_vm(260 * MiB)
    vm.pv_command(PvCmd.ENABLE)
    chunk = host.uv_info["conf_dump_storage_state_len"]
    stor = {"subcmd": PvDumpSubcmd.CONFIG_STOR_STATE, "rc": 5, "rrc": 6}
    assert pv(vm, PvCmd.DUMP, buff_len=chunk, gaddr=0, **stor) == (errno.EINVAL, 5, 6)  # not dumping
    vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)
    assert pv(vm, PvCmd.DUMP, buff_len=chunk, gaddr=PAGE, **stor) == (errno.EINVAL, 0, 0)
    assert pv(vm, PvCmd.DUMP, buff_len=0, gaddr=0, **stor) == (errno.EINVAL, 0, 0)
    per_flush = (1 << 20) // chunk  # UVCs whose output fills the 1 MiB kernel buffer
    with pytest.raises(PvError) as ei:  # UVC 261 asks for guest memory beyond 260 MiB
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=300 * chunk, gaddr=0)
    assert ei.value.errno == errno.EINVAL
    assert ei.value.rc != 0
    assert ei.value.data is not None
    assert len(ei.value.data) == per_flush * chunk  # 256 copied, the 4 after the flush lost
    ok = vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=260 * chunk, gaddr=0)
    assert ok.data is not None
    assert len(ok.data) == 260 * chunk  # at completion everything arrives
    vm.close()


def test_unpack_of_absent_pages_one_uvc_each() -> None:
    """Divergence 4, kvm_s390_pv_unpack -> gmap_make_secure: a page never faulted in has no PTE,
    so make-secure returns -ENXIO without any UVC; the kernel faults it in and retries. One
    UNPACK_IMG (and with export-before-import due, one export) per page, not two."""
    host = pvfast.Host(feature_misc=False)
    proc = host.spawn_process()
    vm = proc.create_vm(64 * MiB)
    other = proc.create_vm(64 * MiB)  # a second protected VM: protected_count 2, exports due
    other.pv_command(PvCmd.ENABLE)
    image = pvfast_image.build([(0x10000, b"kernel" * 3000)])
    vm.pv_command(PvCmd.ENABLE)
    vm.pv_command(PvCmd.SET_SEC_PARMS, header=image.header)
    comp = image.components[0]
    # the host never loaded the image: its pages are absent
    before = host.uv.stats()
    assert pv(vm, PvCmd.UNPACK, addr=comp.addr, size=len(comp.data), tweak=comp.tweak)[0] == 0
    after = host.uv.stats()
    pages = len(comp.data) // PAGE
    assert after["UNPACK_IMG"] - before.get("UNPACK_IMG", 0) == pages
    assert after["CONV_FROM_SEC_STOR"] - before.get("CONV_FROM_SEC_STOR", 0) == pages
    proc.exit()


def test_cpus_from_pv_reenables_gisa_whatever_happened() -> None:
    """Divergence 5, kvm_s390_cpus_from_pv: ``if (use_gisa) kvm_s390_gisa_enable(kvm)`` after the
    loop, also when a CPU destroy failed (cpus_to_pv had disabled it on a host without AIV)."""
    host = pvfast.Host(feature_aiv=False)
    vm = host.create_vm(64 * MiB)
    vm.pv_command(PvCmd.ENABLE)
    assert not vm.pv_state().gisa_enabled
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0003)
    assert pv(vm, PvCmd.DISABLE)[0] == errno.EIO
    assert vm.pv_state().gisa_enabled
    vm.process.kill()


def test_host_access_to_a_shared_page_needs_no_uvc() -> None:
    """Divergence 6, do_secure_storage_access -> arch_make_page_accessible: only a secure page
    raises the exception that leads to PIN_PAGE_SHARED (and PG_arch_1 is checked there); the host
    reads and writes a page the guest shared without any UVC. A secure page still gets the pin
    attempt (refused: not shared) and the export."""
    host = pvfast.Host()
    vm = host.create_vm(64 * MiB)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_write(0, b"shared ring")
    vm.guest_share(0)
    vm.guest_write(PAGE, b"private")
    s0 = host.uv.stats()
    assert vm.host_read(0, 11) == b"shared ring"
    vm.host_write(0, b"host answer")
    assert host.uv.stats() == s0
    assert vm.host_read(PAGE, 7) != b"private"  # exported: ciphertext
    s1 = host.uv.stats()
    assert (
        s1["PIN_PAGE_SHARED"] - s0.get("PIN_PAGE_SHARED", 0),
        s1["CONV_FROM_SEC_STOR"] - s0["CONV_FROM_SEC_STOR"],
    ) == (1, 1)
    vm.close()


@pytest.mark.parametrize("threads", [1, 2])
def test_signal_stops_the_walk_after_one_batch_in_all(threads: int) -> None:
    """Divergence 7, __s390_uv_destroy_range: the kernel's walk is one thread and tests the fatal
    signal after every batch of 32 present PTEs; pvfast's parallel walk lets only one batch stand
    after the signal, however many workers were in one. With the signal already pending, PERFORM
    destroys at most 32 pages and queues the record."""
    host = pvfast.Host(walk_threads=threads)
    vm = host.create_vm(8 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    for base in (2 * GiB, 4 * GiB, 6 * GiB):  # secure pages in several 64 MiB walk tasks
        vm.guest_access(base, 4 * MiB)
    old = vm.pv_state().handle
    vm.pv_command(PREPARE)
    left = host.uv.secure_pages(old)
    vm.process.fatal_signal.set()
    assert pv(vm, PERFORM) == (0, 1, 42)
    assert 0 <= left - host.uv.secure_pages(old) <= 32
    assert vm.pv_state().need_cleanup == 1
    vm.process.fatal_signal.clear()
    vm.process.exit()
    assert host.uv.secure_pages() == 0


def test_signal_between_batches_stops_perform_there() -> None:
    """The walk_batch race point: PERFORM's walk runs batch by batch; a kill after batch 2 leaves
    exactly two batches done (the kernel's rule), the record on need_cleanup."""
    host = pvfast.Host(destroy_fast=False)
    proc = host.spawn_process()
    vm = proc.create_vm(4 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, 100 * PAGE)
    old = vm.pv_state().handle
    vm.pv_command(PREPARE)
    out: list[tuple[int, int, int]] = []
    with host.race_point("walk_batch", vm=None, count=2) as batch:
        t = threading.Thread(target=lambda: out.append(pv(vm, PERFORM)))
        t.start()
        assert batch.wait()["batch"] == 1
        batch.release()
        assert batch.wait()["batch"] == 2
        proc.fatal_signal.set()  # the signal arrives while batch 2 is done
        batch.release()
        t.join(JOIN)
    assert out == [(0, 1, 42)]
    assert host.uv.secure_pages(old) == 100 - 64
    proc.fatal_signal.clear()
    proc.exit()
    assert host.uv.secure_pages() == 0


# ------------------------------------------------------------------ race points


def test_race_point_names_and_arguments() -> None:
    host = pvfast.Host()
    with pytest.raises(ValueError, match="name: unknown race point 'nope'; the points are "):
        host.race_point("nope")
    with pytest.raises(ValueError, match="timeout"):
        host.race_point("perform_claimed", timeout=0)
    with pytest.raises(ValueError, match="count"):
        host.race_point("perform_claimed", count=0)
    assert set(pvfast.racepoints.POINTS) >= {"perform_claimed", "walk_batch", "cleanup_all_before_zap"}
    assert not host.race.armed


def test_race_point_wait_times_out_instead_of_hanging() -> None:
    host = pvfast.Host()
    with host.race_point("perform_claimed", timeout=0.05) as point, pytest.raises(RaceTimeout, match="no thread"):
        point.wait()
    assert not host.race.armed


def test_a_paused_thread_that_is_never_released_fails_the_test() -> None:
    host = pvfast.Host()
    vm = host.create_vm(4 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    vm.pv_command(PREPARE)
    point = host.race_point("perform_claimed", vm=vm, timeout=0.2)
    t = threading.Thread(target=vm.pv_command, args=(PERFORM,))
    t.start()
    point.wait()
    t.join(JOIN)  # the thread goes on by itself after the timeout
    with pytest.raises(RaceTimeout, match="not released"):
        point.close()
    assert not vm.pv_state().performing


def test_race_point_holds_the_kernel_state_of_its_place() -> None:
    """perform_claimed: the record is claimed (a second PERFORM finds none) and kvm->lock is free
    (other commands run); cleanup_all_before_zap: DISABLE holds kvm->lock there."""
    host = pvfast.Host()
    vm = host.create_vm(4 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(2 * GiB, 8 * PAGE)
    vm.pv_command(PREPARE)
    with host.race_point("perform_claimed", vm=vm) as claimed:
        t = threading.Thread(target=vm.pv_command, args=(PERFORM,))
        t.start()
        claimed.wait()
        assert vm.pv_state().performing == 1
        assert pv(vm, PERFORM) == (errno.EINVAL, 0, 0)  # nothing left to claim
        vm.pv_command(PvCmd.ENABLE)  # kvm->lock is free
        claimed.release()
        t.join(JOIN)
    with host.race_point("cleanup_all_before_zap", vm=vm) as zap:
        t = threading.Thread(target=vm.pv_command, args=(PvCmd.DISABLE,))
        t.start()
        zap.wait()
        assert vm.lock.locked()
        assert not vm.pv_state().protected
        zap.release()
        t.join(JOIN)
    assert host.uv.secure_pages() == 0
    vm.close()


def test_race_point_action_and_probe() -> None:
    host = pvfast.Host()
    vm = host.create_vm(64 * MiB, vcpus=2)
    seen: list[int] = []
    with host.race_point("guest_access", vm=vm, pause=False, count=None, action=lambda c: seen.append(c["vcpu"])) as p:
        vm.guest_access(0, vcpu=0)
        vm.guest_access(0, vcpu=1)
    assert seen == [0, 1]
    assert p.hits == 2
    assert [c["handle"] for c in p.contexts] == [0, 0]


def test_unprotect_hold_is_a_gate_at_async_cleanup_start() -> None:
    host = pvfast.Host()
    vm = host.create_vm(4 * GiB)
    vm.pv_command(PvCmd.ENABLE)
    hold = threading.Event()
    with host.race_point("async_cleanup_start", vm=vm, pause=False) as start:
        t = vmm.unprotect(vm, hold=hold)
        assert t is not None
        time.sleep(0.02)
        assert start.hits == 0  # the gate comes first
        assert not t.entered.is_set()
        hold.set()
        t.join(JOIN)
        assert start.hits == 1
    assert t.error is None
    assert not host.race.armed
    vm.close()


# ------------------------------------------------------------------ replays (docs/KERNEL.md)


def test_replay_5ff92181577a_oops_without_the_uv() -> None:
    """VM destroy of a never-protected VM raised protected_count 0 -> 1 (v6.2-v6.4); the CLONE_VM
    helper's exit tore the same mm down meanwhile and issued destroy UVCs: on a machine without
    the UV an operation exception, an oops. Since 5ff92181577a the count stays 0."""
    host, destroys, hits = _cleanup_all_races_helper_teardown("6.4", uv_facility=False)
    assert hits == 1
    assert destroys == 0  # no UV to count them
    oops = host.oopses()
    assert [(o["kind"], o["function"]) for o in oops] == [("oops", "uv_destroy_owned_page")]
    host, _, hits = _cleanup_all_races_helper_teardown("6.5", uv_facility=False)
    assert (hits, host.oopses()) == (0, [])


def _small_vm_reboot(kernel: str, fast: bool) -> tuple[tuple[int, int, int], list[Any]]:
    host = pvfast.Host(kernel=kernel, destroy_fast=fast)
    qemu = host.spawn_process()
    vm = qemu.create_vm(2 * GiB)
    assert vm.asce_type == "segment"
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_write(1 * GiB, b"old guest")
    prepare = pv(vm, PREPARE)
    if prepare[0]:
        vm.pv_command(PvCmd.DISABLE)
    else:
        vm.pv_command(PERFORM)  # disposes of the record: frees the old segment table
    vm.pv_command(PvCmd.ENABLE)  # the rebooted guest
    qemu.exit()  # exit_mmap frees the page tables, unlinking them from the gmap
    assert host.uv.secure_pages() == 0
    return prepare, host.oopses()


def test_replay_292a7d6fca33_use_after_free_for_small_vms() -> None:
    """A segment-ASCE VM (memory limit <= 2 GiB), no Destroy-Fast: v6.2's PREPARE replaced the
    segment table host_to_guest points into; PERFORM freed it; the unlinks of exit_mmap wrote
    into freed memory (KASAN). Since 292a7d6fca33 PREPARE is EINVAL and QEMU falls back to DISABLE.
    With Destroy-Fast v6.2 took the fast branch and was fine."""
    prepare, oopses = _small_vm_reboot("6.2", fast=False)
    assert prepare == (0, 1, 42)
    assert [(o["kind"], o["function"]) for o in oopses] == [("kasan", "__gmap_unlink_by_vmaddr")]
    assert _small_vm_reboot("6.2", fast=True) == ((0, 1, 42), [])
    assert _small_vm_reboot("6.4", fast=False) == ((errno.EINVAL, 0, 0), [])
    assert _small_vm_reboot("6.4", fast=True) == ((errno.EINVAL, 0, 0), [])


def test_kernel_md_examples_run() -> None:
    """Every ``python`` block of docs/KERNEL.md runs as written (the replays a developer reads)."""
    text = (ROOT / "docs" / "KERNEL.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        exec(compile(block, "docs/KERNEL.md", "exec"), {"__name__": "kernel_md_example"})
