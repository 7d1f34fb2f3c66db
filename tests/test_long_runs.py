"""Long runs do not grow (issue 13 item 5): a regression test per leak, and a quick run of the soak
benchmark (benches/soak.py; the full run is 10**6 ENABLE/DISABLE cycles and 10**5 VMs)."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import weakref
from pathlib import Path

import pytest

import pvfast
from pvfast import PvCmd, clock
from pvfast.accounting import Accounting

from .conftest import MiB, enable

ROOT = Path(__file__).resolve().parent.parent


def test_enable_disable_keeps_no_configuration_record(host: pvfast.Host) -> None:
    """Every Create Config used to stay in the UV's tables (and took a new, never reused id)."""
    vm = host.create_vm(16 * MiB)
    handles = set()
    for i in range(300):
        enable(vm)
        handles.add(vm.pv_state().handle)
        if i % 3 == 0:
            vm.guest_write(0, b"x")
            vm.host_read(0, 1)  # exported while the configuration lives
        vm.pv_command(PvCmd.DISABLE)
        sizes = host.uv.native.table_sizes()
        assert (sizes["configs"], sizes["dead"], sizes["cpus"]) == (0, 0, 0)
    assert sizes["id_slots"] == 1, "the configuration id is reused"
    assert len(handles) == 300, "handles are never reused"


def test_fast_destroyed_configurations_go_with_their_pages() -> None:
    """A Destroy-Fast configuration is kept while its orphaned pages exist, not longer."""
    host = pvfast.Host(destroy_fast=True)
    for _ in range(50):
        vm = host.create_vm(16 * MiB)
        enable(vm)
        vm.guest_write(0, b"x" * (4 * 4096))
        vm.close()
    sizes = host.uv.native.table_sizes()
    assert (sizes["configs"], sizes["dead"], sizes["live"]) == (0, 0, 0)
    assert sizes["id_slots"] <= 2
    assert host.uv.secure_pages() == 0


def test_dead_processes_leave_the_registry(host: pvfast.Host) -> None:
    """host.processes used to keep every process that ever existed (and, through it, its address
    space and VMs): ~4.4 MiB per 1,000 created-and-closed VMs with the UV records."""
    refs = []
    for _ in range(20):
        vm = host.create_vm(16 * MiB)
        enable(vm)
        refs.append((weakref.ref(vm), weakref.ref(vm.process), weakref.ref(vm.process.mm)))
        vm.close()
        del vm
    helper_owner = host.spawn_process()
    helper = helper_owner.clone_vm()
    helper.exit()
    assert host.processes == [helper_owner]
    helper_owner.exit()
    assert host.processes == []
    del helper, helper_owner
    gc.collect()
    alive = [r for group in refs for r in group if r() is not None]
    assert not alive, f"{len(alive)} objects of closed VMs are still referenced"


def test_accounts_of_exited_processes_are_folded_away(monkeypatch) -> None:
    """host.accounting used to keep an account per emulated thread and VM forever (~1.5 KB per
    created-and-closed VM, and a scan of all of them per new process: quadratic). Beyond
    RETAIN_DEAD dead ones they are folded into ``retired``; totals stay exact, clocks in order."""
    monkeypatch.setattr(Accounting, "RETAIN_DEAD", 8)
    monkeypatch.setattr(Accounting, "PRUNE_EVERY", 8)
    host = pvfast.Host()
    clocks = []
    pids = []
    for i in range(100):
        vm = host.create_vm(16 * MiB)
        pids.append(vm.process.pid)
        enable(vm)
        vm.guest_write(i % 4 * 4096, b"x")
        vm.close()
        clocks.append(host.accounting.thread_clock_ps(threading.current_thread()) or 0)
    snap = host.accounting.snapshot()
    assert len(host.accounting.emulated_threads()) <= 8 + 8 + 2  # kept + between prunes + live
    assert len(snap.vms) <= 8 + 8 + 1
    assert snap.retired.uvcs["CREATE_SEC_CONF"] > 50
    assert snap.total.uvcs == {k: v for k, v in host.uv.stats().items() if v}
    assert clocks[0] > 0
    assert clocks == sorted(clocks)  # program order survives the folding
    assert clocks[-1] > clocks[50]
    kept = {t.pid for t in snap.threads}
    assert pids[-1] in kept  # the newest stay
    assert pids[0] not in kept  # the oldest go
    host.accounting.reset()
    assert host.accounting.snapshot().total.uvc_total == 0


def test_soak_quick() -> None:
    """benches/soak.py --quick runs and reports every table, the registry and RSS flat."""
    res = subprocess.run(
        [sys.executable, str(ROOT / "benches" / "soak.py"), "--quick", "--rss-slack", "8"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count(": flat") == 2, res.stdout


# Folding keeps clocks and deltas right (found in review of the folding; each failed before).


@pytest.fixture
def small_retention(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Accounting, "RETAIN_DEAD", 2)
    monkeypatch.setattr(Accounting, "PRUNE_EVERY", 1)


def _short_vm(host: pvfast.Host) -> None:
    vm = host.create_vm(16 * MiB)
    enable(vm)
    vm.close()


@pytest.mark.usefixtures("small_retention")
def test_a_wait_after_an_exit_still_orders_the_next_process() -> None:
    """The thread stays bound to the exited process's account; a wait moves that account's clock,
    and the thread's next process starts after it (not at the clock the exit ended with)."""
    host = pvfast.Host()
    p1 = host.spawn_process("p1")
    enable(p1.create_vm(16 * MiB))
    p1.exit()
    target = clock.now_ps() + 10**12
    clock.wait_until(target)
    assert host.accounting.thread_clock_ps(threading.current_thread()) == target
    host.spawn_process("p2").create_vm(16 * MiB)
    assert clock.now_ps() >= target


@pytest.mark.usefixtures("small_retention")
def test_a_folded_parent_keeps_its_exit_clock_for_the_helper() -> None:
    """Folding goes by exit order, whole processes; a process folded away still reports where its
    exit ended, so its CLONE_VM helper's exit starts there."""
    host = pvfast.Host()
    parent = host.spawn_process("qemu")
    helper = parent.clone_vm("cleanup")
    enable(parent.create_vm(16 * MiB))
    clock.wait_until(clock.now_ps() + 10**12)
    parent.exit()
    end = host.accounting.process_clock_ps(parent)
    assert end >= 10**12
    for _ in range(6):  # more dead processes than kept, on other threads: the parent is folded
        short = threading.Thread(target=_short_vm, args=(host,), name="short")
        short.start()
        short.join()
    assert parent.pid not in {t.pid for t in host.accounting.snapshot().threads}
    assert host.accounting.process_clock_ps(parent) == end
    ended: list[int] = []

    def helper_exit() -> None:
        helper.exit()
        ended.append(clock.now_ps())

    t = threading.Thread(target=helper_exit, name="helper-main")
    t.start()
    t.join()
    assert ended[0] >= end


@pytest.mark.usefixtures("small_retention")
def test_floors_follow_the_thread_not_its_reused_ident() -> None:
    """An ended thread's clock (for clock.join) and a live thread's floor do not share a slot when
    the live thread got the ended one's ident (glibc hands C the ident A had, most runs)."""
    host = pvfast.Host()
    out: dict[str, int | None] = {}

    def body(name: str, until: int) -> None:
        p = host.spawn_process(name)
        enable(p.create_vm(16 * MiB))
        clock.wait_until(until)
        p.exit()
        out[name] = clock.now_ps()

    a = threading.Thread(target=body, args=("pa", 10**12), name="A")
    a.start()
    a.join()

    def c_body() -> None:
        body("pc", 5 * 10**12)
        out["join_a"] = host.accounting.thread_clock_ps(a)
        for _ in range(3):
            t = threading.Thread(target=_short_vm, args=(host,), name="filler")
            t.start()
            t.join()
        host.spawn_process("pd").create_vm(16 * MiB)
        out["c_next"] = clock.now_ps()

    c = threading.Thread(target=c_body, name="C")
    c.start()
    c.join()
    assert out["join_a"] == out["pa"]
    assert out["c_next"] is not None
    assert out["c_next"] >= 5 * 10**12


@pytest.mark.usefixtures("small_retention")
def test_a_delta_across_a_fold_counts_each_uvc_once() -> None:
    host = pvfast.Host()
    for _ in range(3):
        _short_vm(host)
    before = host.accounting.snapshot()
    for _ in range(10):
        _short_vm(host)
    after = host.accounting.snapshot()
    assert before.threads[0].key not in {t.key for t in after.threads}  # folded in between
    assert (after - before).total.uvcs["CREATE_SEC_CONF"] == 10
    assert (after - before).total == after.total - before.total
