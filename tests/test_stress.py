"""Concurrency stress: many threads issuing random PV commands, guest/host accesses, PERFORMs (also
through ``pvfast.vmm.unprotect``'s ``async_cleanup`` thread) and kills on a few VMs and processes.

Checked: no deadlock (every thread joins within a timeout; ``faulthandler`` dumps all stacks and
aborts the run if the process hangs), no exception other than the API's (``PvError``,
``UvcError``, ``ValueError`` for a closed VM or an exited process), the counting invariants of
docs/VERIFICATION.md §8 once the threads have stopped, and after every process has exited: no
secure or orphaned page, no configuration, no kernel memory, an empty leak ledger (invariant 13),
unless failures were injected.

Duration: ``PVFAST_STRESS_SECONDS`` in total over the three tests (default 5 s, for CI).
``PVFAST_STRESS_REPORT=<file>`` appends the figures (ops, ops/s, PERFORMs, kills).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import random
import sys
import threading
import time
from collections import Counter

import pytest

import pvfast
from pvfast import PvCmd, PvError, Uvc, UvcError, vmm

from .conftest import race_residue_bytes, unexplained_leaks

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096

SECONDS = float(os.environ.get("PVFAST_STRESS_SECONDS", "5"))
THREADS = int(os.environ.get("PVFAST_STRESS_THREADS", "6"))
JOIN_TIMEOUT = 60.0
EXPECTED = (PvError, UvcError, ValueError)


class Fleet:
    """A few processes (with CLONE_VM helpers sometimes), each with one or two protected-capable VMs."""

    def __init__(self, host: pvfast.Host, rng: random.Random, procs: int = 3) -> None:
        self.host = host
        self.lock = threading.Lock()
        self.procs: list[pvfast.Process] = []
        self.helpers: list[pvfast.Process] = []
        self.vms: list[pvfast.Vm] = []
        self.async_threads: list[threading.Thread] = []
        for _ in range(procs):
            self.respawn(rng)

    def respawn(self, rng: random.Random) -> None:
        proc = self.host.spawn_process()
        vms = [proc.create_vm(rng.choice([3 * GiB, 4 * GiB, 2 * GiB]), vcpus=rng.randint(1, 2))]
        if rng.random() < 0.3:
            vms.append(proc.create_vm(3 * GiB, vcpus=1))
        helper = proc.clone_vm() if rng.random() < 0.5 else None
        with self.lock:
            # drop what is gone, so picking stays O(live) over long runs
            self.procs = [p for p in self.procs if p.alive] + [proc]
            self.vms = [vm for vm in self.vms if not vm.closed and vm.process.alive] + vms
            self.helpers = [h for h in self.helpers if h.alive] + ([helper] if helper is not None else [])

    def pick_vm(self, rng: random.Random) -> pvfast.Vm | None:
        with self.lock:
            live = [vm for vm in self.vms if not vm.closed and vm.process.alive]
        return rng.choice(live) if live else None

    def pick_proc(self, rng: random.Random) -> pvfast.Process | None:
        with self.lock:
            live = [p for p in self.procs if p.alive]
        return rng.choice(live) if live else None


def _guest_range(vm: pvfast.Vm, rng: random.Random) -> tuple[int, int]:
    pages = vm.memory_size // PAGE
    n = rng.randint(1, 96)
    base = rng.choice([0, 2 * GiB // PAGE - 48, pages - 200, rng.randrange(pages - n)])
    base = max(0, min(base, pages - n))
    return base * PAGE, n * PAGE


def worker(fleet: Fleet, seed: int, deadline: float, stats: Counter, errors: list[BaseException], inject: bool) -> None:
    rng = random.Random(seed)
    host = fleet.host
    while time.monotonic() < deadline:
        op = rng.choices(
            [
                "enable",
                "disable",
                "prepare",
                "perform",
                "unprotect",
                "access",
                "share",
                "host",
                "cmd",
                "kill",
                "close",
                "inject",
            ],
            weights=[10, 4, 8, 6, 4, 20, 4, 6, 4, 0.3, 0.5, 2 if inject else 0],
        )[0]
        try:
            if op == "kill":
                proc = fleet.pick_proc(rng)
                if proc is not None:
                    (proc.kill if rng.random() < 0.5 else proc.exit)()
                    # QEMU's async-teardown helper (a CLONE_VM child that ends as the last user of
                    # the mm) exits once QEMU is gone: mostly at once here, sometimes later (the
                    # next kill of anything, or the end)
                    with fleet.lock:
                        helpers = [h for h in fleet.helpers if h.alive and (h.helper_of is proc or rng.random() < 0.2)]
                    for h in helpers:
                        h.exit()
                    fleet.respawn(rng)
                stats[op] += 1
                continue
            if op == "inject":
                uvc, rc = rng.choice(
                    [
                        (Uvc.DESTROY_SEC_CONF, 0x3),
                        (Uvc.DESTROY_SEC_CONF_FAST, 0x104),
                        (Uvc.DESTROY_SEC_CPU, 0x3),
                        (Uvc.CREATE_SEC_CONF, 0x3),
                        (Uvc.DESTR_SEC_STOR, 0x3),
                        (Uvc.CONV_FROM_SEC_STOR, 0x3),
                    ]
                )
                host.uv.inject_failure(uvc, rc, count=rng.randint(1, 3))
                stats[op] += 1
                continue
            vm = fleet.pick_vm(rng)
            if vm is None:
                continue
            if op == "enable":
                vm.pv_command(PvCmd.ENABLE)
            elif op == "disable":
                vm.pv_command(PvCmd.DISABLE)
            elif op == "prepare":
                vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
            elif op == "perform":
                res = vm.pv_command(PvCmd.ASYNC_CLEANUP_PERFORM)  # this thread is the async_cleanup thread
                stats["perform_interrupted" if (res.rc, res.rrc) == (1, 42) else "perform_done"] += 1
            elif op == "unprotect":
                t = vmm.unprotect(vm, exit_on_error=False)
                if t is not None:
                    with fleet.lock:
                        fleet.async_threads.append(t)
            elif op == "access":
                vm.guest_access(*_guest_range(vm, rng), write=rng.random() < 0.5)
            elif op == "share":
                vm.guest_share(_guest_range(vm, rng)[0], PAGE)
            elif op == "host":
                gaddr, size = _guest_range(vm, rng)
                data = vm.host_read(gaddr, min(size, 8 * PAGE))
                assert len(data) == min(size, 8 * PAGE)
            elif op == "cmd":
                cmd = rng.choice([PvCmd.INFO, PvCmd.UNSHARE_ALL, PvCmd.PREP_RESET, PvCmd.DUMP, 42])
                if cmd == PvCmd.INFO:
                    vm.pv_command(PvCmd.INFO, id=rng.randint(0, 1), len_max=80)
                elif cmd == PvCmd.DUMP:
                    vm.pv_command(PvCmd.DUMP, subcmd=rng.randint(0, 2), buff_len=4096, gaddr=0)
                else:
                    vm.pv_command(cmd)
            elif op == "close":
                vm.close()
            stats[op] += 1
        except EXPECTED:
            stats[op] += 1
            stats["errors"] += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            return


def check_quiescent(host: pvfast.Host, fleet: Fleet, clean: bool) -> None:
    """Invariants 1, 8, 9 (docs/VERIFICATION.md §8) once no thread runs (8 exact only without failures)."""
    by_mm: dict[int, list[pvfast.Vm]] = {}
    for vm in fleet.vms:
        if vm.process.alive and not vm.closed:
            by_mm.setdefault(id(vm.mm), []).append(vm)
    for vms in by_mm.values():
        mm = vms[0].mm
        parts = 0
        for vm in vms:
            st = vm.pv_state()
            assert st.performing == 0
            if any(st.vcpu_handles):
                assert st.protected
            parts += int(st.protected) + int(st.set_aside) + st.need_cleanup
        if clean:
            assert mm.protected_count == parts, (mm.protected_count, parts)
        else:
            assert mm.protected_count >= parts
        if any(vm.pv_state().set_aside or vm.pv_state().need_cleanup for vm in vms):
            assert mm.protected_count > 0


def run_stress(destroy_fast: bool, misc: bool, inject: bool, seconds: float) -> Counter:
    seed = int(os.environ.get("PVFAST_STRESS_SEED", str(random.randrange(1 << 30))))
    print(f"stress seed {seed}", file=sys.stderr)
    rng = random.Random(seed)
    host = pvfast.Host(destroy_fast=destroy_fast, feature_misc=misc)
    fleet = Fleet(host, rng)
    stats: Counter = Counter()
    errors: list[BaseException] = []
    faulthandler.dump_traceback_later(seconds + 3 * JOIN_TIMEOUT, exit=True)  # watchdog: a hang aborts loudly
    quiet = logging.getLogger("pvfast")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # thousands of expected QEMU-style error lines
    try:
        start = time.monotonic()
        deadline = start + seconds
        threads = [
            threading.Thread(target=worker, args=(fleet, seed + i, deadline, stats, errors, inject), name=f"stress-{i}")
            for i in range(THREADS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + JOIN_TIMEOUT)
        stuck = [t.name for t in threads if t.is_alive()]
        assert not stuck, f"deadlock: {stuck} still running"
        for t in list(fleet.async_threads):
            t.join(JOIN_TIMEOUT)
            assert not t.is_alive(), "an async_cleanup thread did not finish"
        took = time.monotonic() - start
        if errors:
            raise errors[0]
        check_quiescent(host, fleet, clean=not inject)
        # every process (and helper) exits: full teardown
        for p in fleet.procs + fleet.helpers:
            p.exit()
        assert all(not p.alive for p in host.processes)
        if not inject:
            assert host.uv.secure_pages() == 0, "secure or orphaned pages left after every process exited"
            assert host.uv.config_handles() == set(), "configurations left after every process exited"
            # the one kernel race that leaks (mm-release notifier vs VM destroy, docs/KERNEL.md)
            # leaves a top table per occurrence; anything else on the ledger is a bug
            assert unexplained_leaks(host) == [], "leak ledger not empty without injected failures"
            assert host.kernel_memory() == race_residue_bytes(host), "kernel memory still allocated"
            assert host.uv.donated_bytes() == 0
        stats["notifier_races"] = len(host.races())
        ops = sum(v for k, v in stats.items() if k not in ("errors", "notifier_races"))
        stats["ops"] = ops
        stats["seconds_x1000"] = int(took * 1000)
        line = (
            f"stress fast={destroy_fast} misc={misc} inject={inject}: {ops} ops in {took:.1f} s "
            f"({ops / took:.0f} ops/s, {THREADS} threads), PERFORM {stats['perform']} "
            f"(finished {stats['perform_done']}, "
            f"interrupted {stats['perform_interrupted']}), unprotect {stats['unprotect']}, "
            f"kills {stats['kill']}, expected errors {stats['errors']}, "
            f"notifier/VM-destroy races {stats['notifier_races']}, "
            f"DESTR_SEC_STOR {host.uv.stats().get('DESTR_SEC_STOR', 0)}"
        )
        print(line)
        report = os.environ.get("PVFAST_STRESS_REPORT")
        if report:
            with open(report, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")
        return stats
    finally:
        quiet.setLevel(level)
        faulthandler.cancel_dump_traceback_later()
        for p in list(host.processes):
            if p.alive:
                p.kill()


@pytest.mark.parametrize(("destroy_fast", "misc"), [(True, True), (False, False)], ids=["fast-misc", "slow-nomisc"])
def test_stress_no_failures(destroy_fast: bool, misc: bool) -> None:
    stats = run_stress(destroy_fast, misc, inject=False, seconds=SECONDS / 3)
    assert stats["ops"] > 0


def test_stress_with_injected_failures() -> None:
    stats = run_stress(True, False, inject=True, seconds=SECONDS / 3)
    assert stats["ops"] > 0
