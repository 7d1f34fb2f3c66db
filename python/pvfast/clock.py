"""The modelled clock: hardware time per emulated thread, from the work it issues.

Each emulated thread (see pvfast.accounting) has a clock in integer picoseconds. It advances by
the cost (the host's ``CostModel``) of every UVC and kernel walk the thread issues, and only
then: Python overhead, host scheduling and the number of pool workers do not move it, so a
scenario gives the same modelled times on every machine and run. Kernel walks are charged as the
kernel's single-threaded walk would cost.

A thread that waits for another moves to at least the other's clock:

* ``KernelMutex`` (the emulated ``kvm->lock``): acquiring it at a modelled time inside another
  thread's last non-empty hold moves the acquirer to the end of that hold;
* ``join(thread)``: the joiner moves to the joined thread's clock;
* a process's exit waits for all of its threads, and a CLONE_VM helper whose parent is gone
  starts its exit where the parent's ended (``join_process``);
* a new thread starts where its creator was (``inherit``; by default after whatever its Python
  thread did before, and not before the process's other threads).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from . import _native
from .accounting import _inherited, thread_clock_ps

if TYPE_CHECKING:
    from .mm import Process

#: The emulated kvm->lock: a mutex whose waits take part in the modelled clock.
KernelMutex = _native.KernelMutex


def now_ps() -> int:
    """The calling thread's modelled clock in ps (its bound emulated thread's; an unbound thread
    reads where its next emulated thread will start, or 0)."""
    ps = _native.current_clock_ps()
    if ps is not None:
        return ps
    inherited: int | None = getattr(_inherited, "ps", None)
    return inherited if inherited is not None else 0


def now() -> float:
    """``now_ps()`` in seconds."""
    return now_ps() / 1e12


def inherit(ps: int) -> None:
    """The calling thread starts (or goes on) at modelled time ``ps`` or later: a thread created
    by another calls this first with the creator's ``now_ps()``."""
    if ps < 0:
        raise ValueError(f"ps: {ps} is negative")
    if _native.advance_clock_to(ps) is None:
        _inherited.ps = max(ps, getattr(_inherited, "ps", None) or 0)


def wait_until(ps: int) -> int:
    """The calling thread waits (in modelled time) until ``ps``; returns its clock afterwards."""
    inherit(ps)
    return now_ps()


def join(thread: threading.Thread, timeout: float | None = None) -> bool:
    """``thread.join(timeout)``; once it has ended, the caller's clock moves to at least the
    clock it ended at. Returns whether it has ended."""
    thread.join(timeout)
    if thread.is_alive():
        return False
    ps = thread_clock_ps(thread)
    if ps is not None:
        inherit(ps)
    return True


def join_process(process: Process) -> int:
    """The calling thread waits for every thread of ``process`` (its exit, or a helper waiting for
    its parent's death): its clock moves to the latest of theirs. Returns the clock."""
    ps = process.host.accounting.process_clock_ps(process)
    return wait_until(ps)
