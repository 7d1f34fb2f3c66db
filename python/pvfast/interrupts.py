"""Python-level interrupts in the emulated kernel: Ctrl-C (KeyboardInterrupt), an exception a
signal handler raises, an asynchronous exception (PyThreadState_SetAsyncExc), and a handler that
calls back into pvfast.

CPython raises such an exception in a thread at its next check of pending work, which for a call
into native code is the moment that call returns: a Ctrl-C during a long walk lands right after
the walk, as if the walk had raised it. The kernel steps pvfast emulates then behave as the
kernel's do under a signal:

* A step the kernel does not interrupt (DISABLE, PREPARE, ENABLE, cleanup-all and its zap, VM
  destroy, process exit, the mm teardown) runs inside ``Uninterruptible()``: a native call's
  result is kept (``native``), the exception is held, the step completes, and the first held
  exception is raised when the outermost such step ends.
* An interruptible step (PERFORM's walk) unwinds as a fatal signal would (its record goes to
  need_cleanup), then the exception propagates.

A signal handler that calls into pvfast while its thread is inside a call of the same process
(``on_stack``) gets the kernel's answer, "the interrupted ioctl finishes, then the handler runs":
see ``Process.exit`` and ``Vm.pv_command``.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Collection, Mapping
from functools import partial
from itertools import starmap
from types import CodeType
from typing import Any, TypeVar

T = TypeVar("T")

_tls = threading.local()


class Uninterruptible:
    """A kernel step that completes whatever lands in it (see the module docstring)."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: BaseException | None = None

    def keep(self, exc: BaseException) -> None:
        if self.held is None:
            self.held = exc

    def __enter__(self) -> Uninterruptible:
        stack: list[Uninterruptible] | None = getattr(_tls, "stack", None)
        if stack is None:
            stack = _tls.stack = []
        stack.append(self)
        return self

    def __exit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        stack: list[Uninterruptible] = _tls.stack
        stack.pop()
        held, self.held = self.held, None
        if held is None or exc is not None:
            return  # nothing held, or something else is propagating already
        if stack:
            stack[-1].keep(held)  # the enclosing step completes too
            return
        raise held


def keep_or_raise(exc: BaseException) -> None:
    """``exc`` landed in the kernel: held by the innermost uninterruptible step, else raised."""
    stack: list[Uninterruptible] | None = getattr(_tls, "stack", None)
    if stack:
        stack[-1].keep(exc)
        return
    raise exc


def active() -> bool:
    """Whether this thread is inside an uninterruptible kernel step."""
    return bool(getattr(_tls, "stack", None))


def native(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call a native (Rust) function and keep its result when an interrupt lands as it returns.

    ``list.extend`` over ``itertools.starmap`` calls ``fn`` from C and stores its result before
    control is back in Python code, where pending signals and asynchronous exceptions are
    raised; so if one is raised, the result is in ``box`` already. An exception ``fn`` raised
    itself propagates unchanged. Keyword arguments are bound with ``functools.partial`` (C too).
    """
    if kwargs:
        fn = partial(fn, **kwargs)
    box: list[T] = []
    try:
        box.extend(starmap(fn, (args,)))
    except BaseException as exc:
        if not box:
            raise
        keep_or_raise(exc)
    return box[0]


#: Code objects of the entry points of kernel calls (registered by mm.py and kvm.py): a frame
#: running one of them is a call into the emulated kernel.
ENTRY_CODES: set[CodeType] = set()
#: Code objects of the guest-side calls, whose local ``run`` is the vCPU they run on.
VCPU_RUN_CODES: set[CodeType] = set()


def on_stack(codes: Collection[CodeType], test: Callable[[Mapping[str, Any]], bool], *, skip: int = 2) -> bool:
    """Whether a frame below the caller runs one of ``codes`` with locals that pass ``test``:
    the calling thread is inside that kernel call (a signal handler, or a callback, interrupted
    it). Only for slow paths: it walks the stack."""
    frame = sys._getframe(skip)
    while frame is not None:
        if frame.f_code in codes and test(frame.f_locals):
            return True
        frame = frame.f_back  # type: ignore[assignment]
    return False
