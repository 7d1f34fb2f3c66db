"""Confidentiality under races: a protected guest's plaintext never lands in a page the host can
read, whatever teardown path runs while a guest-side call is in progress.

In the kernel a guest touches memory only while one of its vCPUs runs (KVM_RUN holds
vcpu->mutex) and kvm_s390_cpus_from_pv takes each vcpu->mutex before destroying the secure CPU;
the other teardown paths (close, exit, kill, the mm teardown) run only once no call of the process
is in flight. pvfast models both, so a guest access and the destruction of the configuration it
runs as never overlap (issue 13 item 1: a 256 MiB ``guest_write`` racing PREPARE used to land the
rest of the write as plaintext in destroyed, host-readable pages).

Every guest-side call is raced against every teardown path deterministically (the guest call is
paused at the ``guest_access`` race point, holding its vCPU, while the teardown starts), and a
hypothesis state machine races random guest-side calls in threads against random teardown paths,
scanning the host's view of guest memory after every step.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule, run_state_machine_as_test

import pvfast
from pvfast import PvCmd, PvError, UvcError

from .conftest import GiB, MiB

PAGE = 4096
JOIN = 30.0
# The window every test writes secrets to: 4 MiB on each side of the 2 GiB line, so PREPARE's
# own clean-up of [0, 2 GiB) and the pages it leaves to PERFORM are both in it.
WINDOW = (2 * GiB - 4 * MiB, 8 * MiB)


def mark(n: int) -> bytes:
    """A recognisable 16-byte secret (never produced by encryption or zeroing by chance)."""
    return b"SECRET#%09d\xa5\x5a\xc3" % n


def secret(n: int, size: int) -> bytes:
    m = mark(n)
    return m * (size // len(m)) + m[: size % len(m)]


def host_visible_leaks(vm: pvfast.Vm, marks: set[bytes], window: tuple[int, int] = WINDOW) -> list[int]:
    """Pages of ``window`` the host can read (non-secure or exported; shared pages are the
    guest's own choice) that contain one of ``marks``, read as the host reads them."""
    start, size = window
    region = vm.region
    leaks: list[int] = []
    for page in range(start // PAGE, (start + size) // PAGE):
        try:
            state = region.page_state(page).state
        except ValueError:  # the address space is gone: nothing left to read
            return leaks
        if state not in ("nonsecure", "exported"):
            continue
        try:
            data = region.read(page * PAGE, PAGE)
        except (ValueError, pvfast._native.SecureStorageAccess):
            continue  # it turned secure again (or the mapping went away) meanwhile
        if any(m in data for m in marks):
            leaks.append(page)
    return leaks


# ------------------------------------------------------------------ guest-side calls


def _guest_call(kind: str, vm: pvfast.Vm, n: int) -> None:
    start, size = WINDOW
    if kind == "guest_write":
        vm.guest_write(start, secret(n, size))
    elif kind == "guest_read":
        vm.guest_read(start, size)
    elif kind == "guest_access":
        vm.guest_access(start, size)
    elif kind == "guest_share":
        vm.guest_share(start + size - PAGE, PAGE)  # the last page: the guest shares it on purpose
    else:  # pragma: no cover - parametrisation below
        raise AssertionError(kind)


GUEST_CALLS = ["guest_write", "guest_read", "guest_access", "guest_share"]
TEARDOWNS = ["disable", "prepare_fast", "prepare_slow", "perform", "close", "kill", "exit", "exit_with_helper"]


def _setup(teardown: str) -> tuple[pvfast.Host, pvfast.Process, pvfast.Vm, set[bytes]]:
    """A protected 3 GiB guest that has written a secret over the window (for ``perform``: a
    set-aside guest with its secret, and the rebooted protected guest with another one)."""
    host = pvfast.Host(destroy_fast=teardown != "prepare_slow")
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    marks = {mark(0), mark(1)}
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_write(WINDOW[0], secret(0, WINDOW[1]))
    if teardown == "perform":
        vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
        vm.pv_command(PvCmd.ENABLE)
        vm.guest_write(WINDOW[0], secret(2, WINDOW[1]))
        marks.add(mark(2))
    return host, proc, vm, marks


def _teardown(teardown: str, proc: pvfast.Process, vm: pvfast.Vm, helper: pvfast.Process | None) -> Callable[[], Any]:
    if teardown == "disable":
        return lambda: vm.pv_command(PvCmd.DISABLE)
    if teardown.startswith("prepare"):
        return lambda: vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    if teardown == "perform":
        return lambda: vm.pv_command(PvCmd.ASYNC_CLEANUP_PERFORM)
    if teardown == "close":
        return vm.close
    if teardown == "kill":
        return proc.kill
    return proc.exit


def _entered(teardown: str, proc: pvfast.Process, vm: pvfast.Vm, perform_hit: Any) -> Callable[[], bool]:
    """When the teardown thread has got as far as it can while the guest call runs."""
    if teardown in ("disable", "prepare_fast", "prepare_slow"):
        return vm.lock.locked  # inside the ioctl under kvm->lock, waiting for vcpu->mutex
    if teardown == "perform":
        return lambda: perform_hit.hits > 0
    if teardown == "close":
        return lambda: vm.closed
    return proc.fatal_signal.is_set  # exit/kill: waiting for the calls in flight


@pytest.mark.parametrize("teardown", TEARDOWNS)
@pytest.mark.parametrize("kind", GUEST_CALLS)
def test_guest_call_racing_teardown_leaks_nothing(kind: str, teardown: str) -> None:
    host, proc, vm, marks = _setup(teardown)
    helper = proc.clone_vm() if teardown == "exit_with_helper" else None
    handle = vm.pv_state().handle
    marks.add(mark(7))
    seen: list[list[int]] = []
    errors: list[BaseException] = []

    def scan(_context: dict[str, Any]) -> None:  # runs in the exiting thread, memory still there
        seen.append(host_visible_leaks(vm, marks))

    def run(call: Callable[[], Any]) -> Callable[[], None]:
        def body() -> None:
            try:
                call()
            except (PvError, UvcError, ValueError) as err:
                errors.append(err)

        return body

    with (
        host.race_point("guest_access", vm=vm) as running,
        host.race_point("perform_claimed", vm=vm, pause=False) as perform_hit,
        host.race_point("mm_teardown", pause=False, action=scan),
    ):
        guest = threading.Thread(target=run(lambda: _guest_call(kind, vm, 7)), daemon=True)
        guest.start()
        assert running.wait()["handle"] == handle  # on its vCPU, running as the configuration
        down = threading.Thread(target=run(_teardown(teardown, proc, vm, helper)), daemon=True)
        down.start()
        deadline = time.monotonic() + JOIN
        entered = _entered(teardown, proc, vm, perform_hit)
        while not entered() and down.is_alive():
            assert time.monotonic() < deadline, "the teardown never started"
            time.sleep(0.001)
        time.sleep(0.01)  # give a wrong teardown the time to run past the running guest
        # while the guest call holds its vCPU, its secure CPU and configuration stay
        assert vm.vcpu_list[0].pv_handle if vm.vcpu_list else True
        assert handle in host.uv.config_handles()
        assert host_visible_leaks(vm, marks) == []
        running.release()
        guest.join(JOIN)
        down.join(JOIN)
        assert not guest.is_alive()
        assert not down.is_alive()
        if helper is not None:
            helper.exit()  # the last mm user: exit_mmap runs here
    assert not [e for e in errors if not isinstance(e, PvError)], errors
    if proc.alive and not vm.closed:
        assert host_visible_leaks(vm, marks) == []
    assert all(found == [] for found in seen), seen
    if teardown in ("kill", "exit", "exit_with_helper"):
        assert seen, "the mm teardown was not reached"
    for p in (proc, helper):
        if p is not None and p.alive:
            p.exit()
    assert host.uv.secure_pages() == 0


def test_large_write_racing_prepare_leaks_nothing() -> None:
    """The reported case: 256 MiB written by the guest in one call while the main thread issues
    PREPARE (no Destroy-Fast). PREPARE waits for the vCPU; the whole write lands in the guest's
    secure pages, then PREPARE cleans [0, 2 GiB) and sets the configuration aside."""
    host = pvfast.Host(destroy_fast=False)
    proc = host.spawn_process()
    vm = proc.create_vm(3 * GiB, 1)
    vm.pv_command(PvCmd.ENABLE)
    size = 256 * MiB
    base = 2 * GiB - 128 * MiB
    with host.race_point("guest_access", vm=vm) as running:
        t = threading.Thread(target=vm.guest_write, args=(base, secret(3, size)), daemon=True)
        t.start()
        running.wait()
        prep = threading.Thread(target=vm.pv_command, args=(PvCmd.ASYNC_CLEANUP_PREPARE,), daemon=True)
        prep.start()
        while not vm.lock.locked():
            time.sleep(0.001)
        running.release()
        t.join(JOIN)
        prep.join(JOIN)
    state = vm.pv_state()
    assert state.set_aside
    assert host_visible_leaks(vm, {mark(3)}, (base, size)) == []
    assert host.uv.secure_pages() == 128 * MiB // PAGE  # the half above 2 GiB waits for PERFORM
    proc.exit()
    assert host.uv.secure_pages() == 0


def test_guest_access_needs_a_vcpu() -> None:
    """A VM without vCPUs has no running guest: a guest-side call is misuse (ValueError naming
    ``vcpu``), before anything is touched; so is a vCPU index the VM does not have."""
    host = pvfast.Host()
    vm = host.create_vm(64 * MiB, vcpus=0)
    for call in (
        lambda: vm.guest_access(0),
        lambda: vm.guest_write(0, b"x"),
        lambda: vm.guest_read(0, 1),
        lambda: vm.guest_share(0),
    ):
        with pytest.raises(ValueError, match="vcpu: the VM has no vCPU"):
            call()
    assert vm.region.present_pages() == 0
    vm.create_vcpu()
    vm.guest_access(0, vcpu=0)
    with pytest.raises(ValueError, match="vcpu: no vCPU 1"):
        vm.guest_access(0, vcpu=1)
    with pytest.raises(TypeError, match="vcpu"):
        vm.guest_access(0, vcpu="0")  # type: ignore[arg-type]
    vm.close()


def test_guest_runs_protected_only_on_vcpus_with_a_secure_cpu() -> None:
    """After a DISABLE that failed on Destroy Config the configuration stays but no vCPU has a
    secure CPU; a vCPU hot-added then gets one (kvm_arch_vcpu_create under a protected VM). The
    guest runs protected on that vCPU only (sdf 2), not on the others."""
    host = pvfast.Host()
    vm = host.create_vm(64 * MiB, vcpus=1)
    vm.pv_command(PvCmd.ENABLE)
    host.uv.inject_failure(pvfast.Uvc.DESTROY_SEC_CONF, 0x0003)
    with pytest.raises(PvError):
        vm.pv_command(PvCmd.DISABLE)
    assert vm.pv_state().protected
    vm.create_vcpu()
    assert [bool(h) for h in vm.pv_state().vcpu_handles] == [False, True]
    with pytest.raises(ValueError, match="not protected"):
        vm.guest_share(0, vcpu=0)
    vm.guest_write(0, b"on the secure vCPU", vcpu=1)
    assert vm.region.page_state(0).state == "secure"
    vm.guest_access(0, vcpu=0)  # the non-protected vCPU: the host exports the page for it
    assert vm.region.page_state(0).state == "exported"
    vm.process.kill()


# ------------------------------------------------------------------ property: random races


class RaceMachine(RuleBasedStateMachine):
    """Random guest-side calls in threads racing random teardown paths; after every step no
    page the host can read holds a secret a protected guest wrote."""

    def __init__(self) -> None:
        super().__init__()
        self.host = pvfast.Host(destroy_fast=False, walk_threads=1)
        self.n = 0
        self.marks: set[bytes] = set()
        self.vms: list[pvfast.Vm] = []
        self.procs: list[pvfast.Process] = []
        self.probe = self.host.race_point("guest_access", pause=False, count=None)
        self._fresh()

    def _fresh(self) -> None:
        proc = self.host.spawn_process()
        vm = proc.create_vm(3 * GiB, 2)
        self.procs.append(proc)
        self.vms.append(vm)

    def _live(self) -> list[pvfast.Vm]:
        return [vm for vm in self.vms if not vm.closed and vm.process.alive]

    @rule(i=st.integers(0, 9))
    def protect(self, i: int) -> None:
        live = self._live()
        if not live:
            self._fresh()
            return
        vm = live[i % len(live)]
        if not vm.protected:
            try:
                vm.pv_command(PvCmd.ENABLE)
            except PvError:
                return

    @precondition(lambda self: len(self._live()) < 3)
    @rule()
    def spawn(self) -> None:
        self._fresh()

    @rule(
        i=st.integers(0, 9),
        kind=st.sampled_from(["write", "write", "read", "access", "share"]),
        down=st.sampled_from(["none", "disable", "prepare", "perform", "close", "kill", "exit", "helper"]),
        offset=st.integers(0, 2047),
        pages=st.integers(1, 256),
        vcpu=st.integers(0, 1),
        jitter=st.sampled_from([0.0, 0.0, 0.0005, 0.002]),
    )
    def race(self, i: int, kind: str, down: str, offset: int, pages: int, vcpu: int, jitter: float) -> None:
        live = self._live()
        if not live:
            return
        vm = live[i % len(live)]
        proc = vm.process
        start = WINDOW[0] + offset * PAGE
        pages = min(pages, (WINDOW[0] + WINDOW[1] - start) // PAGE)
        self.n += 1
        n = self.n
        threads: dict[str, threading.Thread] = {}

        def guest() -> None:
            try:
                if kind == "write":
                    vm.guest_write(start, secret(n, pages * PAGE), vcpu=vcpu)
                elif kind == "read":
                    vm.guest_read(start, pages * PAGE, vcpu=vcpu)
                elif kind == "access":
                    vm.guest_access(start, pages * PAGE, vcpu=vcpu)
                else:
                    vm.guest_share(start, PAGE, vcpu=vcpu)
            except (PvError, UvcError, ValueError):
                pass

        helper = proc.clone_vm() if down == "helper" and proc.alive else None

        def teardown() -> None:
            try:
                if down == "disable":
                    vm.pv_command(PvCmd.DISABLE)
                elif down == "prepare":
                    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
                elif down == "perform":
                    vm.pv_command(PvCmd.ASYNC_CLEANUP_PERFORM)
                elif down == "close":
                    vm.close()
                elif down == "kill":
                    proc.kill()
                elif down in ("exit", "helper"):
                    proc.exit()
            except (PvError, ValueError):
                pass

        seen = len(self.probe.contexts)  # thread idents are reused: look at this step's hits only
        threads["guest"] = threading.Thread(target=guest, daemon=True)
        threads["down"] = threading.Thread(target=teardown, daemon=True)
        threads["guest"].start()
        if jitter:
            time.sleep(jitter)
        threads["down"].start()
        for t in threads.values():
            t.join(JOIN)
            assert not t.is_alive(), "a thread did not return (deadlock?)"
        # a secret is what a guest wrote while it ran protected (the probe saw its handle)
        if kind == "write":
            ident = threads["guest"].ident
            if any(c["thread"] == ident and c["handle"] for c in self.probe.contexts[seen:]):
                self.marks.add(mark(n))
        if helper is not None:
            self._check()
            helper.exit()

    @invariant()
    def no_plaintext_for_the_host(self) -> None:
        self._check()

    def _check(self) -> None:
        if not self.marks:
            return
        for vm in self.vms:
            if vm.process.alive or not vm.mm.dead:
                assert host_visible_leaks(vm, self.marks) == [], f"secret plaintext in host-readable pages of {vm}"

    def teardown(self) -> None:
        self.probe.close()
        for proc in self.procs:
            if proc.alive:
                proc.kill()
        for p in self.host.processes:
            if p.alive:
                p.exit()
        assert self.host.uv.secure_pages() == 0


def test_random_guest_calls_racing_random_teardowns_leak_nothing() -> None:
    run_state_machine_as_test(RaceMachine)
