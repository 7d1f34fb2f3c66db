"""Where UV work lands: per emulated thread, process and VM (pvfast.accounting), with the work of
pool workers counted for the thread that issued the walk."""

from __future__ import annotations

import threading

import pytest

import pvfast
from pvfast import PvCmd, clock, experiments, vmm
from pvfast.accounting import AccountingSnapshot, ThreadUsage, Usage

from .conftest import GiB, MiB

HIGH = 2 * GiB
PAGE = 4096
SECURE = 96 * MiB  # more than one 64 MiB walk task: the walks run on the pool workers


def booted(host: pvfast.Host, secure: int = SECURE, *, name: str = "qemu") -> tuple[pvfast.Process, pvfast.Vm]:
    proc = host.spawn_process(name)
    vm = experiments.boot_guest(proc, experiments.auto_memory(secure), secure)
    return proc, vm


def test_async_reboot_lands_the_old_guest_on_async_cleanup():
    """PREPARE (main thread) destroys only the guest's memory below 2 GiB; every DESTR_SEC_STOR of
    the old guest's memory above it is issued by the async_cleanup thread's PERFORM."""
    host = pvfast.Host()
    proc, vm = booted(host)
    present = vm.region.present_pages()
    high = SECURE // PAGE  # the guest dirtied [2 GiB, 2 GiB + SECURE)
    low = present - high  # the boot image, below 2 GiB
    assert low > 0
    before = host.accounting.snapshot()
    thread = vmm.unprotect(vm)
    assert thread is not None
    assert clock.join(thread, 60)
    delta = (host.accounting.snapshot() - before).busy()
    main = delta.thread("MainThread", "qemu")
    cleanup = delta.thread("async_cleanup", "qemu")
    assert main.usage.uvcs["DESTR_SEC_STOR"] == low  # only the low-2 GiB pass
    assert main.usage.zeroed == low
    assert main.usage.uvcs["DESTROY_SEC_CONF_FAST"] == 1
    assert cleanup.usage.uvcs == {"DESTR_SEC_STOR": present}  # PERFORM visits every present page
    assert cleanup.usage.zeroed == high  # ... and clears the old guest's secure pages above 2 GiB
    assert cleanup.usage.ptes == present
    assert cleanup.usage.walks == 1
    # the walk ran on the pool: its workers' CPU time counts for async_cleanup
    assert cleanup.usage.worker_cpu_ns > 0
    assert cleanup.usage.tasks > 0
    assert cleanup.usage.cpu_ns >= cleanup.usage.worker_cpu_ns
    assert {t.thread for t in delta.threads} == {"MainThread", "async_cleanup"}
    assert delta.unattributed.uvc_total == 0
    # the process sums its threads; the VM saw all of it (both threads worked on its fd)
    qemu = delta.process("qemu")
    assert qemu.usage.uvcs["DESTR_SEC_STOR"] == low + present
    assert delta.vm(vm.name).usage.uvcs["DESTR_SEC_STOR"] == low + present
    proc.exit()


def test_sync_reboot_lands_everything_on_the_main_thread():
    host = pvfast.Host()
    proc, vm = booted(host)
    present = vm.region.present_pages()
    before = host.accounting.snapshot()
    vm.pv_command(PvCmd.DISABLE)
    delta = (host.accounting.snapshot() - before).busy()
    assert [t.thread for t in delta.threads] == ["MainThread"]
    main = delta.threads[0]
    assert main.usage.uvcs["DESTROY_SEC_CONF"] == 1
    assert main.usage.uv_pages == {"DESTROY_SEC_CONF": present}  # the UV cleaned every page itself
    assert main.usage.uvcs["DESTR_SEC_STOR"] == present  # then the zap over the address space
    proc.exit()


def test_helper_shutdown_lands_the_mm_teardown_on_the_helper():
    """With QEMU's CLONE_VM helper, the VMM's exit destroys the VM (cleanup-all) but the last mm
    user is the helper: the mm teardown (the unmap of every present page) is the helper's work."""
    host = pvfast.Host()
    proc = host.spawn_process("qemu")
    helper = proc.clone_vm()
    vm = experiments.boot_guest(proc, experiments.auto_memory(SECURE), SECURE)
    present = vm.region.present_pages()
    s0 = host.accounting.snapshot()
    proc.exit()
    s1 = host.accounting.snapshot()
    helper.exit()
    s2 = host.accounting.snapshot()
    vmm_exit, helper_exit = (s1 - s0).busy(), (s2 - s1).busy()
    assert [p.process for p in vmm_exit.processes] == ["qemu"]
    assert [p.process for p in helper_exit.processes] == [helper.name]
    teardown = helper_exit.process(helper.name).usage
    assert teardown.ptes == present  # every present PTE unmapped by the helper
    assert teardown.walks == 1
    assert teardown.uvc_total == 0  # nothing secure was left for it
    assert vmm_exit.process("qemu").usage.uvcs["DESTROY_SEC_CONF"] == 1


def test_shutdown_without_helper_lands_the_mm_teardown_on_the_vmm():
    host = pvfast.Host()
    proc, vm = booted(host)
    present = vm.region.present_pages()
    s0 = host.accounting.snapshot()
    proc.exit()
    delta = (host.accounting.snapshot() - s0).busy()
    usage = delta.process("qemu").usage
    assert usage.uvcs["DESTR_SEC_STOR"] == present  # exit_mmap: one destroy per present PTE
    assert usage.ptes == present
    assert usage.uvcs["DESTROY_SEC_CONF_FAST"] == 1  # the mmu notifier's release


def test_counters_advance_during_a_long_walk():
    """Walk workers publish per chunk: a reader sees a synchronous DISABLE's counters grow."""
    host = pvfast.Host()
    secure = 512 * MiB
    proc, vm = booted(host, secure)
    before = host.accounting.snapshot().thread("MainThread", "qemu").usage
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            now = host.accounting.snapshot().thread("MainThread", "qemu").usage
            seen.append(
                (now - before).uvcs.get("DESTR_SEC_STOR", 0) + (now - before).uv_pages.get("DESTROY_SEC_CONF", 0)
            )
            done.wait(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    vm.pv_command(PvCmd.DISABLE)
    done.set()
    sampler.join()
    total = 2 * vm.region.present_pages()
    assert seen[-1] <= total
    assert any(0 < n < total for n in seen), "no sample saw the DISABLE half done"
    proc.exit()


def test_raw_native_work_of_an_unbound_thread_is_unattributed():
    host = pvfast.Host()
    out: list[AccountingSnapshot] = []

    def raw() -> None:
        host.uv.native.query()
        out.append(host.accounting.snapshot())

    t = threading.Thread(target=raw)
    t.start()
    t.join()
    assert out[0].unattributed.uvcs == {"QUI": 1}
    assert out[0].threads == ()


def test_snapshot_api_and_reset():
    host = pvfast.Host()
    proc, _vm = booted(host, 16 * MiB)
    snap = host.accounting.snapshot()
    main = snap.thread("MainThread")
    assert isinstance(main, ThreadUsage)
    assert main.pid == proc.pid
    assert main.usage.uvcs["CONV_TO_SEC_STOR"] == 16 * MiB // PAGE
    assert main.usage.faulted >= 16 * MiB // PAGE
    assert main.usage.model_seconds > 0
    assert main.clock_ps >= main.usage.work_ps
    assert snap.process(proc.pid) == snap.process("qemu")
    assert snap.total.uvcs == {k: v for k, v in host.uv.stats().items() if v}
    with pytest.raises(KeyError, match="no thread 'nope'"):
        snap.thread("nope")
    with pytest.raises(KeyError, match="no process"):
        snap.process("nope")
    doc = snap.as_dict()
    assert doc["threads"][0]["uvcs"]["CONV_TO_SEC_STOR"] == 16 * MiB // PAGE
    clock_before = main.clock_ps
    host.accounting.reset()
    after = host.accounting.snapshot().thread("MainThread")
    assert after.usage == Usage()
    assert after.clock_ps == clock_before  # a reset keeps the clocks: they are positions in time
    proc.exit()


def test_threads_of_one_name_are_summed_and_two_hosts_stay_apart():
    a, b = pvfast.Host(), pvfast.Host()
    (pa, va), (pb, _vb) = booted(a, 4 * MiB), booted(b, 8 * MiB)
    for _ in range(2):
        t = threading.Thread(target=va.pv_command, args=(PvCmd.PREP_RESET,), name="worker")
        t.start()
        t.join()
    sa, sb = a.accounting.snapshot(), b.accounting.snapshot()
    assert sa.thread("worker").usage.uvcs == {"PREPARE_RESET": 2}
    assert sa.thread("MainThread").usage.uvcs["CONV_TO_SEC_STOR"] == 4 * MiB // PAGE
    assert sb.thread("MainThread").usage.uvcs["CONV_TO_SEC_STOR"] == 8 * MiB // PAGE
    assert "PREPARE_RESET" not in sb.total.uvcs
    pa.exit()
    pb.exit()


def test_reboot_json_says_where_the_work_landed():
    r = experiments.reboot(experiments.auto_memory(SECURE), SECURE, mode="async")
    teardown = {t["thread"]: t for t in r["accounting"]["teardown"]}
    assert set(teardown) == {"MainThread", "async_cleanup"}
    assert teardown["async_cleanup"]["uvcs"]["DESTR_SEC_STOR"] > SECURE // PAGE
    assert teardown["MainThread"]["uvcs"]["DESTR_SEC_STOR"] < 100  # the image below 2 GiB
    assert teardown["async_cleanup"]["worker_cpu_seconds"] > 0
    boot = r["accounting"]["boot_new_guest"]
    assert [t["thread"] for t in boot] == ["MainThread"]
    assert boot[0]["uvcs"]["UNPACK_IMG"] == 65
    # the UVC counts of the per-thread sections add up to the reboot's
    summed: dict[str, int] = {}
    for t in r["accounting"]["teardown"] + boot:
        for k, v in t["uvcs"].items():
            summed[k] = summed.get(k, 0) + v
    assert summed == r["uvcs"]
