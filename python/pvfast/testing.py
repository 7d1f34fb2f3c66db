"""Testing support for VMM code: a pytest plugin, a QEMU-shaped VMM, and host-level checks.

pvfast registers this module as a pytest plugin (entry point ``pytest11``, name ``pvfast``), so in
an environment where pvfast is installed every pytest run has these fixtures:

* ``pvfast_host``: a fresh ``pvfast.Host`` per test. Its options come from the
  ``@pytest.mark.pvfast_host(async_destroy=0, destroy_fast=False, ...)`` marker or from indirect
  parametrisation (``@pytest.mark.parametrize("pvfast_host", [{"async_destroy": 0}],
  indirect=True)``). After the test every process still alive on it is killed.
* ``pvfast_qemu``: a ``Qemu`` on ``pvfast_host`` whose protected guest is booted. Options
  (``memory``, ``vcpus``, ``memory_limit``, ``async_teardown``, ``dirty``, ``name``) come from
  ``@pytest.mark.pvfast_qemu(...)`` or indirect parametrisation, as for the host.
* ``pvfast_vm``: ``pvfast_qemu.vm``, the booted protected VM.

Outside pytest, ``Qemu``, ``assert_host_clean`` and ``assert_no_warnings`` are plain functions
and classes. docs/EXAMPLES.md and examples/vmm_suite/ show them in use.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from . import image as _image
from . import vmm
from .constants import PAGE_SIZE, SZ_2G
from .host import Host
from .kvm import Vm
from .mm import Process

__all__ = ["Qemu", "assert_host_clean", "assert_no_warnings", "boot_image", "host_problems"]

GiB = 1 << 30
MiB = 1 << 20


@functools.lru_cache(maxsize=1)
def boot_image() -> _image.Image:
    """A small sealed boot image (a kernel and its command line, both below 2 GiB)."""
    kernel = bytes(range(256)) * 256  # 64 KiB
    cmdline = b"root=/dev/vda1 console=ttysclp0\0"
    return _image.build([(0x10000, kernel), (0x8000, cmdline)])


class Qemu:
    """A VMM process driving one protected guest the way QEMU does (target/s390x/kvm/pv.c,
    hw/s390x/s390-virtio-ccw.c, system/async-teardown.c).

    The constructor is QEMU's start-up: the process, the CLONE_VM helper ``cleanup/<pid>`` when
    ``async_teardown`` is set (``-run-with async-teardown=on``: the helper is cloned before KVM is
    opened, so it holds no VM fd), then the VM with ``memory`` bytes (memory limit
    ``memory_limit``, default the same) and ``vcpus`` vCPUs. ``boot()`` is the protected boot
    (diag 308 subcode 10), ``reboot()`` a guest re-IPL, ``shutdown()`` the end of the VMM.
    A failing PERFORM in the ``async_cleanup`` thread makes the VMM exit with status 1, as QEMU's
    ``_exit`` flavour of the PV command does.
    """

    def __init__(
        self,
        host: Host,
        *,
        memory: int = 4 * GiB,
        vcpus: int = 2,
        memory_limit: int | None = None,
        async_teardown: bool = False,
        image: _image.Image | None = None,
        name: str = "qemu",
    ) -> None:
        if not isinstance(host, Host):
            raise TypeError(f"host: expected pvfast.Host, got {type(host).__name__}")
        if image is not None and not isinstance(image, _image.Image):
            raise TypeError(f"image: expected pvfast.image.Image, got {type(image).__name__}")
        self.host = host
        self.image = image if image is not None else boot_image()
        self.process: Process = host.spawn_process(name)
        self.helper: Process | None = self.process.clone_vm() if async_teardown else None
        self.vm: Vm = self.process.create_vm(memory, vcpus, memory_limit=memory_limit)
        self.cleanup_threads: list[vmm.AsyncCleanupThread] = []
        self._holds: list[threading.Event] = []

    def __repr__(self) -> str:
        return f"<Qemu pid={self.process.pid} alive={self.alive} helper={self.helper is not None} vm={self.vm!r}>"

    # -- the guest's life --
    def boot(self) -> None:
        """The protected boot: load the image, ENABLE, SET_SEC_PARMS, UNPACK each component, VERIFY."""
        vmm.protect(self.vm, self.image)

    def run(self, secure: int, *, start: int = SZ_2G) -> None:
        """The protected guest writes ``secure`` bytes from guest address ``start`` on (they become
        secure pages; above 2 GiB by default, where PREPARE leaves them to PERFORM)."""
        if secure % PAGE_SIZE:
            raise ValueError(f"secure: {secure} is not a multiple of {PAGE_SIZE}")
        done = 0
        while done < secure:
            step = min(64 * MiB, secure - done)
            self.vm.guest_access(start + done, step)
            done += step

    def unprotect(self, *, hold: threading.Event | None = None) -> vmm.AsyncCleanupThread | None:
        """s390_machine_unprotect: PREPARE and an ``async_cleanup`` thread running PERFORM (returned),
        or DISABLE (None) when QEMU would not go asynchronous or PREPARE fails. The thread waits for
        ``hold`` before it enters the ioctl (the window of QEMU's double-reboot race)."""
        thread = vmm.unprotect(self.vm, hold=hold)
        if thread is not None:
            self.cleanup_threads.append(thread)
            if hold is not None:
                self._holds.append(hold)
        return thread

    def reboot(self, *, hold: threading.Event | None = None) -> vmm.AsyncCleanupThread | None:
        """A re-IPL of the protected guest: ``unprotect``, then ``boot`` again."""
        thread = self.unprotect(hold=hold)
        self.boot()
        return thread

    def wait_cleanup(self, timeout: float | None = None) -> None:
        """Join every ``async_cleanup`` thread started so far (QEMU never does; a test may)."""
        for thread in self.cleanup_threads:
            thread.join(timeout)

    # -- the end of the VMM --
    def shutdown(self, *, helper_exits: bool = True) -> None:
        """QEMU exits (no PV ioctl: the kernel tears the VM down with the fd and the mm). With the
        async-teardown helper the last user of the address space is the helper, which exits once
        QEMU is gone; ``helper_exits=False`` leaves it alive, to look at the state in between."""
        self.process.exit(0)
        self._release_held_threads()
        if helper_exits:
            self.exit_helper()

    def kill(self) -> None:
        """SIGKILL to QEMU: interruptible work (PERFORM's walk) stops, then the process is torn
        down as by exit. The helper, if any, then exits as after ``shutdown``."""
        self.process.kill()
        self._release_held_threads()
        self.exit_helper()

    def exit_helper(self) -> None:
        """The async-teardown helper notices that QEMU is gone and exits (no-op without one)."""
        if self.helper is not None and self.helper.alive:
            self.helper.exit(0)

    def _release_held_threads(self) -> None:
        # A thread still waiting for its hold never entered the ioctl: it dies with the process
        # (here: it finds the VM closed and ends).
        for hold in self._holds:
            hold.set()
        self.wait_cleanup()

    @property
    def alive(self) -> bool:
        """Whether the QEMU process still runs."""
        return self.process.alive

    @property
    def exit_status(self) -> int | None:
        """QEMU's exit status (1 after a failed PERFORM or DISABLE), None while it runs or if killed."""
        return self.process.exit_status


# ------------------------------------------------------------------------- host-level checks


def _size(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (1024, "KiB")):
        if n >= unit and n % (unit // 4) == 0:
            return f"{n / unit:g} {name}"
    return f"{n} bytes"


def host_problems(host: Host) -> list[str]:
    """What is left on ``host`` that a complete teardown frees, one line per kind (empty: clean).

    Checked: live processes, secure pages (secure, shared or orphaned: the host cannot read them),
    configurations in the UV, storage donated to the UV, kernel memory (by kind), and leak-ledger
    entries (what the kernel leaves to the UV after a failed destroy).
    """
    problems: list[str] = []
    live = [p for p in host.processes if p.alive]
    if live:
        problems.append("live processes: " + ", ".join(f"{p.name} (pid {p.pid})" for p in live))
    secure = host.uv.secure_pages()
    if secure:
        configs = sorted(host.uv.config_handles())
        by_owner = ", ".join(f"{h:#x}: {host.uv.secure_pages(h)}" for h in configs if host.uv.secure_pages(h))
        problems.append(f"{secure} secure page(s)" + (f" (live owners {by_owner})" if by_owner else ""))
    configs = sorted(host.uv.config_handles())
    if configs:
        problems.append(f"{len(configs)} configuration(s) in the UV: " + ", ".join(f"{h:#x}" for h in configs))
    donated = host.uv.donated_bytes()
    if donated:
        problems.append(f"{_size(donated)} donated to the UV")
    allocations = host.kernel_allocations()
    if allocations:
        parts = ", ".join(f"{kind} {count} x ({_size(total)})" for kind, (count, total) in sorted(allocations.items()))
        problems.append(f"{_size(host.kernel_memory())} of kernel memory: {parts}")
    leaks = host.leaked()
    if leaks:
        parts = ", ".join(f"{e['kind']} at {e['addr']:#x} ({_size(e['size'])}, handle {e['handle']:#x})" for e in leaks)
        problems.append(f"{len(leaks)} leak-ledger entr{'y' if len(leaks) == 1 else 'ies'}: {parts}")
    return problems


def assert_host_clean(host: Host) -> None:
    """Raise AssertionError naming what is left on ``host`` (see ``host_problems``)."""
    problems = host_problems(host)
    if problems:
        raise AssertionError("host is not clean:\n  " + "\n  ".join(problems))


def assert_no_warnings(host: Host) -> None:
    """Raise AssertionError listing the kernel WARNs ``host`` has recorded, if any."""
    warnings = host.warnings()
    if warnings:
        lines = [f"{w.function}: vm {w.vm}: {w.message}" for w in warnings]
        raise AssertionError(f"{len(warnings)} kernel warning(s):\n  " + "\n  ".join(lines))


# ------------------------------------------------------------------------- the pytest plugin

# Every keyword pvfast.Host takes (kernel, guest_memory, costs, ...), read from its signature.
_HOST_OPTIONS = frozenset(
    name for name, p in inspect.signature(Host.__init__).parameters.items() if p.kind is p.KEYWORD_ONLY
)
_QEMU_OPTIONS = frozenset({"memory", "vcpus", "memory_limit", "async_teardown", "dirty", "name", "image"})


def pytest_configure(config: pytest.Config) -> None:
    """Register the markers that set the fixtures' options."""
    config.addinivalue_line("markers", "pvfast_host(**options): pvfast.Host(...) options for the pvfast_host fixture")
    config.addinivalue_line(
        "markers",
        "pvfast_qemu(**options): pvfast.testing.Qemu options (memory, vcpus, memory_limit, async_teardown, "
        "dirty, name, image) for the pvfast_qemu fixture",
    )


def _options(request: pytest.FixtureRequest, marker: str, allowed: frozenset[str]) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for mark in reversed(list(request.node.iter_markers(marker))):  # the closest marker wins
        if mark.args:
            raise TypeError(f"@pytest.mark.{marker} takes keyword options only")
        options.update(mark.kwargs)
    param = getattr(request, "param", None)
    if param is not None:
        if not isinstance(param, Mapping):
            raise TypeError(f"{marker}: an indirect parameter must be a dict of options, got {type(param).__name__}")
        options.update(param)
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(
            f"{marker}: unknown option(s) {', '.join(unknown)}; expected some of {', '.join(sorted(allowed))}"
        )
    return options


@pytest.fixture
def pvfast_host(request: pytest.FixtureRequest) -> Iterator[Host]:
    """A fresh emulated host; every process still alive on it is killed after the test."""
    host = Host(**_options(request, "pvfast_host", _HOST_OPTIONS))
    yield host
    for proc in list(host.processes):
        if proc.alive:
            proc.kill()


@pytest.fixture
def pvfast_qemu(request: pytest.FixtureRequest, pvfast_host: Host) -> Qemu:
    """A QEMU-shaped VMM on ``pvfast_host`` with its protected guest booted (and ``dirty`` bytes of
    secure memory above 2 GiB, default none)."""
    options = _options(request, "pvfast_qemu", _QEMU_OPTIONS)
    dirty = options.pop("dirty", 0)
    qemu = Qemu(pvfast_host, **options)
    qemu.boot()
    if dirty:
        qemu.run(dirty)
    return qemu


@pytest.fixture
def pvfast_vm(pvfast_qemu: Qemu) -> Vm:
    """The booted protected VM of ``pvfast_qemu``."""
    return pvfast_qemu.vm
