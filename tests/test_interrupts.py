"""Python-level interrupts and reentrancy (issue 13 items 2 and 3).

A Ctrl-C (KeyboardInterrupt), an exception a signal handler raises, or an asynchronous exception
lands in a thread at its next check of pending work: right after a native call returns, or at a
Python point of the kernel code. Kernel steps the kernel does not interrupt (DISABLE, PREPARE,
ENABLE, cleanup-all and its zap, VM destroy, exit, the mm teardown) complete and then let the
exception reach the caller; PERFORM's walk unwinds as a fatal signal would. A signal handler that
calls back into pvfast gets the kernel's order: the interrupted ioctl finishes, then the handler's
request. Every case is simulated deterministically: a race point that raises (or raises a signal
whose handler runs right there), PyThreadState_SetAsyncExc on a paused thread, or a profile hook
that raises right after a given native call returned.
"""

from __future__ import annotations

import _thread
import ctypes
import functools
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import pvfast
from pvfast import PvCmd, PvError, _native, interrupts

from .conftest import GiB, MiB

PREPARE = PvCmd.ASYNC_CLEANUP_PREPARE
PERFORM = PvCmd.ASYNC_CLEANUP_PERFORM
PAGE = 4096
JOIN = 30.0


def assert_all_gone(host: pvfast.Host) -> None:
    assert host.uv.secure_pages() == 0
    assert host.uv.config_handles() == set()
    assert host.leaked() == []
    assert host.kernel_memory() == 0
    assert host.uv.donated_bytes() == 0


def async_raise(thread: threading.Thread, exc: type[BaseException]) -> None:
    """PyThreadState_SetAsyncExc: ``exc`` is raised in ``thread`` at its next check."""
    assert thread.ident is not None
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(exc))
    assert n == 1


@contextmanager
def interrupt_after_native(name: str, exc: type[BaseException] = KeyboardInterrupt) -> Iterator[list[str]]:
    """In this thread, raise ``exc`` the first time the native UV method ``name`` returns: where a
    Ctrl-C that arrived during that call lands (a profile hook on the C call's return)."""
    fired: list[str] = []

    def hook(frame: Any, event: str, arg: Any) -> None:
        if fired or event != "c_return":
            return
        if frame.f_code is interrupts.native.__code__:  # list.extend of native()'s starmap returned
            fn = frame.f_locals["fn"]
            called = fn.func if isinstance(fn, functools.partial) else fn
        else:  # a native method called directly
            called = arg
        if getattr(called, "__name__", "") == name and isinstance(
            getattr(called, "__self__", None), _native.Ultravisor
        ):
            fired.append(name)
            raise exc

    sys.setprofile(hook)
    try:
        yield fired
    finally:
        sys.setprofile(None)


def once(fn: Any) -> Any:
    """A race-point action that acts on the first hit only (a handler may hit the point again)."""
    done: list[bool] = []

    def action(context: dict[str, Any]) -> None:
        if not done:
            done.append(True)
            fn(context)

    return action


@contextmanager
def signal_handler(signum: int, handler: Any) -> Iterator[None]:
    old = signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, old)


def protected(host: pvfast.Host, size: int = 4 * GiB, secure: int = 8 * MiB, vcpus: int = 2) -> pvfast.Vm:
    vm = host.spawn_process().create_vm(size, vcpus)
    vm.pv_command(PvCmd.ENABLE)
    vm.guest_access(0, secure)
    vm.guest_access(2 * GiB, secure)
    return vm


# ------------------------------------------------------------------ the mechanism


def test_native_keeps_the_result_when_an_interrupt_lands_as_it_returns() -> None:
    """``interrupts.native``: the result of a C call survives a KeyboardInterrupt raised as the
    call returns (here the call itself makes SIGINT pending: _thread.interrupt_main); inside an
    uninterruptible step the exception is held and raised when the step ends, outside it is
    raised at once."""
    done: list[object] = []

    def step(call: Any, *args: Any) -> None:
        with interrupts.Uninterruptible():
            done.append(interrupts.native(call, *args))  # the step goes on with the result

    with signal_handler(signal.SIGINT, signal.default_int_handler):
        with pytest.raises(KeyboardInterrupt):
            step(_thread.interrupt_main)
        assert done == [None]
        with pytest.raises(KeyboardInterrupt):
            interrupts.native(_thread.interrupt_main)
    me = threading.current_thread()
    with pytest.raises(KeyboardInterrupt):
        step(
            ctypes.pythonapi.PyThreadState_SetAsyncExc,
            ctypes.c_ulong(me.ident or 0),
            ctypes.py_object(KeyboardInterrupt),
        )
    assert done == [None, 1]  # the asynchronous exception landed after the call: its result is there


def test_an_exception_the_native_call_raises_itself_is_not_held() -> None:
    with pytest.raises(ZeroDivisionError), interrupts.Uninterruptible():
        interrupts.native(divmod, 1, 0)


# ------------------------------------------------------------------ Ctrl-C in kernel steps


@pytest.mark.parametrize("how", ["race_point", "async_exc"])
def test_ctrl_c_during_perform_walk_unwinds_as_a_fatal_signal(how: str) -> None:
    """Issue 13 item 2: an interrupted PERFORM dropped its claimed record (never freed). Now the
    walk unwinds as a fatal signal would: the record goes to need_cleanup, the exception reaches
    the caller, and teardown frees everything."""
    host = pvfast.Host(destroy_fast=False)
    vm = protected(host)
    old = vm.pv_state().handle
    vm.pv_command(PREPARE)
    got: list[BaseException] = []

    def perform() -> None:
        try:
            vm.pv_command(PERFORM)
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            got.append(exc)

    raises = KeyboardInterrupt if how == "race_point" else None
    with host.race_point("walk_batch", raises=raises) as batch:
        t = threading.Thread(target=perform)
        t.start()
        batch.wait()  # after the first batch of the walk
        if how == "async_exc":
            async_raise(t, KeyboardInterrupt)  # lands when the paused thread resumes
        batch.release()
        t.join(JOIN)
    assert [type(e) for e in got] == [KeyboardInterrupt]
    st = vm.pv_state()
    assert (st.set_aside, st.need_cleanup, st.performing) == (False, 1, 0)
    assert old in host.uv.config_handles()
    vm.process.exit()
    assert_all_gone(host)


@pytest.mark.parametrize("point", ["cleanup_all_counted", "cleanup_all_deinit_vm", "cleanup_all_before_zap"])
def test_ctrl_c_during_disable_completes_disable_then_raises(point: str) -> None:
    """DISABLE, cleanup-all and the zap are not interruptible in the kernel: the step completes,
    then the KeyboardInterrupt reaches the caller. No ledger entry, no later rc 0x20."""
    host = pvfast.Host()
    vm = protected(host)
    with host.race_point(point, vm=vm, pause=False, raises=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        vm.pv_command(PvCmd.DISABLE)
    st = vm.pv_state()
    assert not st.protected
    assert not st.service_irq_masked
    assert st.protected_count == 0
    assert host.uv.secure_pages() == 0  # the zap ran
    assert host.leaked() == []
    vm.pv_command(PvCmd.ENABLE)  # the VM is usable
    vm.pv_command(PvCmd.DISABLE)
    vm.process.exit()
    assert_all_gone(host)


@pytest.mark.parametrize("uvc", ["destroy_config", "destroy_walk", "destroy_cpu"])
def test_ctrl_c_after_a_native_call_in_disable_keeps_its_result(uvc: str) -> None:
    """The issue's case: the Ctrl-C arrives during the UV call and lands as it returns. Before,
    the Destroy Config result was lost with the exception: the handle stayed set, and a later
    destroy of the gone configuration failed with rc 0x20 and left ledger entries."""
    host = pvfast.Host()
    vm = protected(host)
    with interrupt_after_native(uvc) as fired, pytest.raises(KeyboardInterrupt):
        vm.pv_command(PvCmd.DISABLE)
    assert fired == [uvc]
    assert not vm.pv_state().protected
    assert host.uv.config_handles() == set()
    assert host.leaked() == []
    vm.process.exit()
    assert_all_gone(host)


def test_ctrl_c_after_create_config_in_enable_keeps_the_configuration() -> None:
    host = pvfast.Host()
    vm = host.create_vm(4 * GiB, vcpus=2)
    with interrupt_after_native("create_config") as fired, pytest.raises(KeyboardInterrupt):
        vm.pv_command(PvCmd.ENABLE)
    assert fired == ["create_config"]
    st = vm.pv_state()
    assert st.protected  # ENABLE completed: configuration and secure CPUs
    assert all(st.vcpu_handles)
    vm.close()
    assert_all_gone(host)


@pytest.mark.parametrize("point", ["cleanup_all_counted", "vm_destroy_vcpus_gone"])
def test_ctrl_c_during_prepare_and_vm_destroy(point: str) -> None:
    host = pvfast.Host(destroy_fast=False)
    vm = protected(host)
    old = vm.pv_state().handle
    with interrupt_after_native("destroy_walk") as fired, pytest.raises(KeyboardInterrupt):
        vm.pv_command(PREPARE)  # the Ctrl-C lands after PREPARE's [0, 2 GiB) walk
    assert fired == ["destroy_walk"]
    st = vm.pv_state()
    assert st.set_aside  # PREPARE completed
    assert not st.protected
    assert host.uv.secure_pages(old) == 8 * MiB // PAGE  # what is left above 2 GiB
    with host.race_point(point, vm=vm, pause=False, raises=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        vm.close()  # kvm_arch_destroy_vm completes
    assert host.uv.config_handles() == set()
    assert host.leaked() == []
    vm.process.exit()
    assert_all_gone(host)


@pytest.mark.parametrize("point", ["exit_before_mmput", "mm_teardown", "cleanup_all_before_zap"])
def test_ctrl_c_during_exit_finishes_the_exit(point: str) -> None:
    """Issue 13 item 2: an interrupted exit() left the process alive forever (a second exit()
    returned at once). do_exit is not interruptible: the teardown completes, then the
    KeyboardInterrupt reaches the caller."""
    host = pvfast.Host()
    vm = protected(host)
    proc = vm.process
    with host.race_point(point, pause=False, raises=KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        proc.exit()
    assert not proc.alive
    assert proc.exit_status == 0
    proc.exit()  # a no-op now
    assert_all_gone(host)


def test_ctrl_c_while_exit_waits_for_a_perform() -> None:
    """The Ctrl-C lands while exit() waits for another thread's call (here a PERFORM paused at a
    race point, released later by a timer): the wait goes on, the teardown completes, then the
    exception."""
    host = pvfast.Host()
    vm = protected(host)
    proc = vm.process
    vm.pv_command(PREPARE)
    with host.race_point("perform_claimed", vm=vm) as claimed:
        t = threading.Thread(target=lambda: vm.pv_command(PERFORM))
        t.start()
        claimed.wait()
        me = threading.current_thread()
        threading.Timer(0.05, async_raise, args=(me, KeyboardInterrupt)).start()
        threading.Timer(0.3, claimed.release).start()
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            proc.exit()
        assert time.monotonic() - t0 >= 0.25  # it waited for the PERFORM, interrupt or not
    t.join(JOIN)
    assert not proc.alive
    assert_all_gone(host)


# ------------------------------------------------------------------ reentrancy


def test_sigterm_handler_calling_exit_during_disable() -> None:
    """Issue 13 item 3, the clean-shutdown pattern: a SIGTERM handler calls proc.exit() while the
    main thread is in DISABLE. The kernel delivers the signal when the ioctl returns; pvfast
    starts the exit at once in a thread of its own, which waits for the interrupted DISABLE, and
    exit() returns. DISABLE returns its result, then the process ends."""
    host = pvfast.Host()
    vm = protected(host)
    proc = vm.process
    calls: list[str] = []

    def on_sigterm(signum: int, frame: Any) -> None:
        proc.exit()
        calls.append("exit returned")

    with (
        signal_handler(signal.SIGTERM, on_sigterm),
        host.race_point(
            "cleanup_all_before_zap", vm=vm, pause=False, action=once(lambda c: signal.raise_signal(signal.SIGTERM))
        ),
    ):
        res = vm.pv_command(PvCmd.DISABLE)
    assert calls == ["exit returned"]
    assert (res.rc, res.rrc) == (1, 0)
    proc.exit()  # waits for the exit the handler started
    assert not proc.alive
    assert proc.exit_status == 0
    assert_all_gone(host)


def test_kill_from_a_handler_during_guest_access() -> None:
    host = pvfast.Host()
    vm = protected(host)
    proc = vm.process

    def on_usr1(signum: int, frame: Any) -> None:
        proc.kill()

    with (
        signal_handler(signal.SIGUSR1, on_usr1),
        host.race_point("guest_access", vm=vm, pause=False, action=once(lambda c: signal.raise_signal(signal.SIGUSR1))),
    ):
        vm.guest_write(2 * GiB, b"still written")
    proc.exit()  # waits for the kill's teardown
    assert proc.exit_signal == signal.SIGKILL
    assert_all_gone(host)


def test_info_from_a_handler_during_disable() -> None:
    """kvm->lock is not reentrant: INFO from a handler that interrupted DISABLE on the same VM
    used to wait forever for the lock its own thread holds. INFO depends on nothing DISABLE
    changes, so it answers at once (what it would answer after DISABLE)."""
    host = pvfast.Host()
    vm = protected(host)
    answers: list[bytes | None] = []

    def on_usr1(signum: int, frame: Any) -> None:
        answers.append(vm.pv_command(PvCmd.INFO, id=0, len_max=80).data)

    with (
        signal_handler(signal.SIGUSR1, on_usr1),
        host.race_point(
            "cleanup_all_before_zap", vm=vm, pause=False, action=once(lambda c: signal.raise_signal(signal.SIGUSR1))
        ),
    ):
        vm.pv_command(PvCmd.DISABLE)
    assert answers == [vm.pv_command(PvCmd.INFO, id=0, len_max=80).data]
    assert answers[0] is not None
    vm.close()


def test_other_commands_from_a_handler_during_an_ioctl_are_refused() -> None:
    host = pvfast.Host()
    vm = protected(host)
    errors: list[BaseException] = []

    def on_usr1(signum: int, frame: Any) -> None:
        try:
            vm.pv_command(PvCmd.DISABLE)
        except ValueError as exc:
            errors.append(exc)

    with (
        signal_handler(signal.SIGUSR1, on_usr1),
        host.race_point(
            "cleanup_all_before_zap", vm=vm, pause=False, action=once(lambda c: signal.raise_signal(signal.SIGUSR1))
        ),
    ):
        vm.pv_command(PvCmd.DISABLE)
    assert len(errors) == 1
    assert "cmd: KVM_PV_DISABLE" in str(errors[0])
    assert not vm.pv_state().protected
    vm.close()


def test_guest_calls_from_a_handler_during_a_guest_access() -> None:
    """The vCPU runs on this thread: a guest access on it, or a command that destroys its secure
    CPU, from the handler is refused (ValueError naming vcpu); another vCPU runs fine."""
    host = pvfast.Host()
    vm = protected(host)
    seen: list[str] = []

    def on_usr1(signum: int, frame: Any) -> None:
        for call in (
            lambda: vm.guest_access(0, vcpu=0),
            lambda: vm.pv_command(PvCmd.DISABLE),
        ):
            try:
                call()
                seen.append("ran")
            except (ValueError, PvError) as exc:
                seen.append(str(exc).split(":")[0])
        vm.guest_access(0, vcpu=1)
        seen.append("vcpu 1 ran")

    with (
        signal_handler(signal.SIGUSR1, on_usr1),
        host.race_point("guest_access", vm=vm, pause=False, action=once(lambda c: signal.raise_signal(signal.SIGUSR1))),
    ):
        vm.guest_write(2 * GiB, b"on vCPU 0", vcpu=0)
    assert seen == ["vcpu", "vcpu", "vcpu 1 ran"]
    assert vm.pv_state().protected  # the refused DISABLE changed nothing
    assert vm.guest_read(2 * GiB, 9) == b"on vCPU 0"
    vm.close()
    assert_all_gone(host)
