"""Exceptions of the Python API: PvError for the ioctl's errno, plus rc/rrc as QEMU logs them;
UvcError for a failed UV call outside that ioctl; ClosedFdError for a call on a closed VM fd. Also
the errno values the kernel code returns."""

from __future__ import annotations

import errno as _errno
import os

from .constants import PvCmd

_CMDS: dict[int, PvCmd] = {int(c): c for c in PvCmd}
_STRERROR: dict[int, str] = {err: os.strerror(err) for err in _errno.errorcode}
_oserror_init = OSError.__init__


def _cmd_label(cmd: int) -> str:
    try:
        return f"KVM_PV_{PvCmd(cmd).name}"
    except ValueError:
        return "unknown"


class PvError(OSError):
    """A failed KVM_S390_PV_COMMAND: ``errno`` plus the UV rc/rrc copied back to user space."""

    # Slots: a failing ioctl builds one of these on every call, and slot stores cost less than
    # the first stores into an exception's __dict__.
    __slots__ = ("cmd", "data", "rc", "rrc")

    cmd: PvCmd | int
    rc: int
    rrc: int
    data: bytes | None

    def __init__(self, err: int, cmd: int, rc: int, rrc: int, data: bytes | None = None) -> None:
        _oserror_init(self, err, _STRERROR.get(err) or os.strerror(err))
        self.cmd = _CMDS.get(cmd, cmd)
        self.rc = rc
        self.rrc = rrc
        self.data = data

    def __str__(self) -> str:
        return (
            f"KVM PV command {int(self.cmd)} ({_cmd_label(int(self.cmd))}) failed: "
            f"header rc {self.rc:x} rrc {self.rrc:x} IOCTL rc: {-(self.errno or 0)}"
        )

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.errno, int(self.cmd), self.rc, self.rrc, self.data))


EINVAL = _errno.EINVAL
EFAULT = _errno.EFAULT
ENOTTY = _errno.ENOTTY
ENOMEM = _errno.ENOMEM
EIO = _errno.EIO
EAGAIN = _errno.EAGAIN
EINTR = _errno.EINTR
ENXIO = _errno.ENXIO
EOPNOTSUPP = _errno.EOPNOTSUPP
EBADF = _errno.EBADF


class ClosedFdError(OSError, ValueError):
    """A call on a VM whose fd is closed (``vm.close()``, or its process has exited).

    An ioctl on a closed file descriptor fails with EBADF, so this is an ``OSError`` with
    ``errno == errno.EBADF``. It is also a ``ValueError``, because the API's contract says that calls
    on a closed VM raise ValueError (as calls on a closed Python file do): ``except OSError`` and
    ``except ValueError`` both catch it.
    """

    def __init__(self, what: str) -> None:
        super().__init__(EBADF, what)

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (type(self), (self.strerror,))


class UvcError(OSError):
    """A UV call outside the PV ioctl failed (vCPU hotplug, guest share, an unresolvable guest fault)."""

    uvc: str
    rc: int
    rrc: int

    def __init__(self, err: int, what: str, rc: int, rrc: int = 0) -> None:
        super().__init__(err, f"{what} failed: rc {rc:#06x} rrc {rrc:#06x}")
        self.uvc = what
        self.rc = rc
        self.rrc = rrc
