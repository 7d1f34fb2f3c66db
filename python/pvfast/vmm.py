"""QEMU-shaped helpers (target/s390x/kvm/pv.c, hw/s390x/s390-virtio-ccw.c): protect and unprotect.

``unprotect`` is QEMU's ``s390_machine_unprotect``: try the asynchronous path (memory limit above
2 GiB, capability 224 read on every call, PREPARE, then a detached thread named ``async_cleanup``
issuing PERFORM), else DISABLE. Failures are logged with QEMU's line on the ``pvfast.vmm`` logger.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from . import clock
from .constants import SZ_2G, Cap, PvCmd
from .errors import PvError
from .image import Image
from .kvm import Vm

if TYPE_CHECKING:
    from .kvm import PvResult

log = logging.getLogger("pvfast.vmm")


def _check_vm(vm: object) -> None:
    if not isinstance(vm, Vm):
        raise TypeError(f"vm: expected Vm, got {type(vm).__name__}")


def _check_hold(hold: object) -> None:
    if hold is not None and not isinstance(hold, threading.Event):
        raise TypeError(f"hold: expected threading.Event or None, got {type(hold).__name__}")


class AsyncCleanupThread(threading.Thread):
    """QEMU's detached ``async_cleanup`` thread: one PERFORM; on failure QEMU exits (status 1).

    It passes the race point ``async_cleanup_start`` ("thread created, ioctl not yet entered",
    the double-reboot window) before its ioctl; a ``hold`` event is a gate there that keeps this
    thread waiting until the event is set."""

    def __init__(self, vm: Vm, *, hold: threading.Event | None, exit_on_error: bool) -> None:
        super().__init__(name="async_cleanup", daemon=True)
        self.vm = vm
        self.hold = hold
        self.exit_on_error = exit_on_error
        self.result: PvResult | None = None
        self.error: PvError | None = None
        self.entered = threading.Event()
        self.clock_start = clock.now_ps()  # modelled clock: the thread starts where its creator is
        race = vm.host.race
        self._gate = race.gate("async_cleanup_start", lambda ctx: ctx.get("thread_obj") is self, hold) if hold else None

    def run(self) -> None:
        """Wait for ``hold`` (a gate at the ``async_cleanup_start`` race point), issue PERFORM; on
        failure log QEMU's line and, with ``exit_on_error``, exit the VMM with status 1.
        ``result``/``error`` keep the outcome."""
        clock.inherit(self.clock_start)
        race = self.vm.host.race
        try:
            if race.armed:
                race.hit("async_cleanup_start", vm=self.vm, process=self.vm.process, thread_obj=self)
        finally:
            if self._gate is not None:
                race.ungate("async_cleanup_start", self._gate)
        self.entered.set()
        try:
            self.result = self.vm.pv_command(PvCmd.ASYNC_CLEANUP_PERFORM)
        except PvError as err:
            self.error = err
            log.error("%s", err)
            if self.exit_on_error:
                self.vm.process.exit(1)  # QEMU's *_exit flavour: exit(1) of the whole VMM
        except ValueError as err:  # the process died meanwhile: the thread died with it
            log.debug("async_cleanup ended with its process: %s", err)


def try_disable_async(
    vm: Vm, *, hold: threading.Event | None = None, exit_on_error: bool = True
) -> AsyncCleanupThread | None:
    """s390_pv_vm_try_disable_async: the thread running PERFORM, or None if QEMU would not go async."""
    _check_vm(vm)
    _check_hold(hold)
    if vm.memory_limit <= SZ_2G:
        return None
    if not vm.host.check_extension(Cap.S390_PROTECTED_ASYNC_DISABLE):
        return None
    try:
        vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    except PvError as err:
        log.error("%s", err)
        return None
    thread = AsyncCleanupThread(vm, hold=hold, exit_on_error=exit_on_error)
    thread.start()
    return thread


def unprotect(vm: Vm, *, hold: threading.Event | None = None, exit_on_error: bool = True) -> AsyncCleanupThread | None:
    """s390_machine_unprotect: async teardown when possible (returns the thread), else DISABLE.

    ``hold``: the async_cleanup thread waits for this event before entering the ioctl (a gate at
    the race point ``async_cleanup_start``, see ``Host.race_point``), which makes QEMU's
    double-reboot race reproducible. ``exit_on_error``: a failing PERFORM or DISABLE exits the
    VMM process, as QEMU does.
    """
    _check_vm(vm)
    _check_hold(hold)
    thread = try_disable_async(vm, hold=hold, exit_on_error=exit_on_error)
    if thread is not None:
        return thread
    try:
        vm.pv_command(PvCmd.DISABLE)
    except PvError as err:
        log.error("%s", err)
        if exit_on_error:
            vm.process.exit(1)
        raise
    return None


def protect(vm: Vm, image: Image, *, load: bool = True) -> None:
    """s390_machine_protect: load the image, ENABLE, SET_SEC_PARMS, UNPACK each component, VERIFY.

    On a failure after ENABLE, QEMU unprotects (async first) and reports the error; so does this.
    """
    _check_vm(vm)
    if not isinstance(image, Image):
        raise TypeError(f"image: expected pvfast.image.Image, got {type(image).__name__}")
    if load:
        for comp in image.components:
            vm.host_write(comp.addr, comp.data)  # the IPL loads the encrypted image into guest memory
    vm.pv_command(PvCmd.ENABLE)
    try:
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=image.header)
        for comp in image.components:
            vm.pv_command(PvCmd.UNPACK, addr=comp.addr, size=len(comp.data), tweak=comp.tweak)
        vm.pv_command(PvCmd.VERIFY)
    except PvError:
        thread = unprotect(vm, exit_on_error=False)
        if thread is not None:
            clock.join(thread)
        raise


def reboot(vm: Vm, image: Image, **kwargs: Any) -> AsyncCleanupThread | None:
    """A guest re-IPL of a protected guest: unprotect, then boot the image protected again."""
    thread = unprotect(vm, **kwargs)
    protect(vm, image)
    return thread
