"""Measurements the ``pvfast`` command and the benchmarks share: reboot, shutdown, sync/async
compare, and the calibration of the cost model.

Every function builds its own emulated host, runs one scenario the way QEMU drives the kernel
(``pvfast.vmm``), tears everything down and returns a plain, JSON-serialisable dict. Wall times
are ``time.perf_counter`` seconds; modelled times (the ``model`` sections) come from the modelled
clock (pvfast.clock) under the host's cost model and are the same on every machine and run. The
``accounting`` sections say where each phase's UVCs, CPU time and modelled time landed (which
process and thread), the ``memory`` sections how much of the old guest's memory was still
allocated or secure over time, and in which process. ``progress(label, done, total, unit)`` and
``tracer`` are optional; without them nothing extra runs on the measured path.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import re
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING, Any

from . import _native, clock, profiles, vmm
from . import image as _image
from ._version import __version__
from .accounting import AccountingSnapshot, ThreadUsage, Usage
from .constants import PAGE_SIZE, SZ_2G, Cap, PvCmd
from .costs import CostModel, Fit, Observation, fit
from .host import GUEST_MEMORY_MODES, Host
from .timeline import MemoryTimeline

if TYPE_CHECKING:
    from .kvm import Vm
    from .mm import Process
    from .trace import Tracer

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
HIGH = SZ_2G  # PREPARE cleans [0, 2 GiB) itself; the guest's secure memory goes above this
DIRTY_CHUNK = 64 * MiB  # guest_access granularity (progress updates; each call is one native walk)
POLL_SECONDS = 0.02  # progress poll period while the async_cleanup thread runs
DEFAULT_VCPUS = 2

Progress = Callable[[str, int, int, str], None]  # (label, done, total, unit)

_SUFFIX = {"": 1, "B": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


# ------------------------------------------------------------------------------------- sizes


MAX_SIZE = 1 << 64  # sizes are addresses of a 64-bit guest: nothing larger can be asked for


def quote_input(text: str) -> str:
    """What the user typed, for an error message; a very long input shortened (a 400-digit size
    is not echoed)."""
    return repr(text) if len(text) <= 40 else f"{text[:24]!r}... ({len(text)} characters)"


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """``"8G"`` → 8 GiB. Binary suffixes K/M/G/T (``KiB``/``GB`` spellings accepted), bytes
    without one. The number is read exactly (no float rounding); a size must be a whole number of
    bytes, positive (or 0 with ``allow_zero``) and at most 2^64 (16777216T). ValueError otherwise."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(
            f"invalid size {quote_input(text)}: expected a number with an optional K/M/G/T suffix, e.g. 8G"
        )
    number, suffix = match.groups()
    if len(number.split(".")[0].lstrip("0")) > 30:  # far above 2^64 whatever the suffix
        raise ValueError(f"invalid size {quote_input(text)}: larger than {format_size(MAX_SIZE)}")
    value = Fraction(number) * _SUFFIX[suffix.upper()]
    if value.denominator != 1:
        raise ValueError(f"invalid size {quote_input(text)}: not a whole number of bytes")
    if value > MAX_SIZE:
        raise ValueError(f"invalid size {quote_input(text)}: larger than {format_size(MAX_SIZE)}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"invalid size {quote_input(text)}: must be positive")
    return int(value)


def format_size(size: int) -> str:
    """8589934592 → ``"8G"``; sizes that are not whole units keep up to two decimals (``"3.25G"``)."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= unit:
            value = size / unit
            return f"{value:.2f}".rstrip("0").rstrip(".") + suffix
    return f"{size}B"


def format_size_exact(size: int) -> str:
    """A size as it could be typed, never rounded: the largest unit of which it is a whole number
    or one with up to two decimals (``"4097M"``, ``"3.25G"``), else bytes without a suffix
    (``"5000"``); ``parse_size`` reads it back to the same number."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= unit and size * 100 % unit == 0:
            whole, hundredths = divmod(size * 100 // unit, 100)
            return f"{whole}" + (f".{hundredths:02d}".rstrip("0") if hundredths else "") + suffix
    return f"{size}"


def auto_memory(secure: int) -> int:
    """Guest memory for ``secure`` dirtied bytes above 2 GiB: 2 GiB below, the secure part, and 1 GiB
    more that stays reserved and untouched (it costs no RAM)."""
    return HIGH + -(-secure // MiB) * MiB + GiB


def dirty_start(memory: int, secure: int) -> int:
    """Where the guest's ``secure`` dirtied bytes start: at 2 GiB when they fit above it, else as
    high as they fit (a guest that is secure all through starts at 0)."""
    return HIGH if secure + HIGH <= memory else memory - secure


def check_sizes(memory: int, secure: int) -> None:
    """The guest dirties ``secure`` bytes above 2 GiB, and what does not fit above 2 GiB below it:
    they must fit in ``memory`` (a multiple of 1 MiB). ``secure`` 0 is a guest that dirtied
    nothing (only its boot image is secure)."""
    if memory <= 0:
        raise ValueError(f"--memory {memory} is not a positive size")
    if secure < 0:
        raise ValueError(f"--secure {secure} is negative")
    if memory % MiB:
        raise ValueError(f"--memory {format_size_exact(memory)} is not a multiple of 1M")
    if secure % PAGE_SIZE:
        raise ValueError(f"--secure {format_size_exact(secure)} is not a multiple of 4K")
    if secure > memory:
        raise ValueError(
            f"--secure {format_size_exact(secure)} does not fit in --memory {format_size_exact(memory)}: "
            f"the guest can make at most all of its memory secure"
        )


# ------------------------------------------------------------------------------------- the machine

#: What a run costs in host RAM beside its guest's pages: the interpreter, the native tables, the
#: boot image and one configuration's UV storage.
RAM_OVERHEAD = 128 * MiB


def _meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes ({} where it cannot be read: not Linux, no /proc)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    values: dict[str, int] = {}
    for line in lines:
        name, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            values[name] = int(fields[0]) * (KiB if fields[1:] == ["kB"] else 1)
    return values


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo in bytes: what the machine can give a run without
    swapping (None where it is not known)."""
    return _meminfo().get("MemAvailable")


def ram_needed(secure: int, guest_memory: str = "real") -> int:
    """Host RAM, about, that a reboot or shutdown of a guest dirtying ``secure`` bytes needs:
    with real guest memory every page the guest dirties is a page of host RAM; in state-only
    memory (``guest_memory="state"``) it costs its 4-byte state word. Plus ``RAM_OVERHEAD``.
    The guest's size does not count: what it does not touch is only reserved."""
    pages = -(-secure // PAGE_SIZE)
    return (secure if guest_memory == "real" else 0) + 4 * pages + RAM_OVERHEAD


@functools.lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """The machine a run measures on: CPUs, CPU model, RAM, architecture, OS and Python (for
    reading a figure later: wall times depend on all of them, modelled times on none)."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:
            for line in file:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "cpu model", "machine", "Model"):
                    model = " ".join(value.split())
                    break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count() or 1,
        "cpu_model": model or platform.processor() or platform.machine(),
        "ram_bytes": _meminfo().get("MemTotal"),
        "arch": platform.machine(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def describe_machine(machine: Mapping[str, Any]) -> str:
    """One line for a machine (``machine_info()``), e.g. for a plot's title."""
    ram = machine.get("ram_bytes")
    return ", ".join(
        part
        for part in (
            f"{machine.get('cpus', '?')} CPUs",
            str(machine.get("cpu_model") or ""),
            f"{format_size(ram)} RAM" if ram else "",
            str(machine.get("arch") or ""),
        )
        if part
    )


def _kernel_profile(host: Host | None) -> str | None:
    """The host's kernel profile, where the host has one (``host.kernel``), as a name."""
    kernel = getattr(host, "kernel", None)
    if kernel is None:
        return None
    name = getattr(kernel, "name", None)
    return str(name if isinstance(name, str) else kernel)


def about(host: Host | None = None) -> dict[str, Any]:
    """What produced a result: pvfast's version, the native module's build profile (``release``
    or ``debug``: a debug build is many times slower) and, where the host has one, its kernel
    profile."""
    meta: dict[str, Any] = {"version": __version__, "build_profile": _build_profile()}
    kernel = _kernel_profile(host)
    if kernel is not None:
        meta["kernel"] = kernel
    return meta


def _provenance(host: Host | None, options: HostOptions) -> dict[str, Any]:
    """The fields every result starts with after ``experiment``: ``pvfast``, ``machine``, ``host``."""
    return {"pvfast": about(host), "machine": machine_info(), "host": options.as_dict()}


# ------------------------------------------------------------------------------------- host


@dataclass(frozen=True)
class HostOptions:
    """The load-time settings of the emulated host the command line can change, how its guest
    memory is backed, its walk threads and the cost model of its modelled clock (None: the
    defaults)."""

    async_destroy: int = 1
    destroy_fast: bool = True
    feature_misc: bool = True
    guest_memory: str = "real"
    walk_threads: int = 0
    costs: CostModel | None = field(default=None, compare=False)
    kernel: str = profiles.DEFAULT

    def __post_init__(self) -> None:
        if self.guest_memory not in GUEST_MEMORY_MODES:
            raise ValueError(
                f"guest_memory: expected one of {', '.join(GUEST_MEMORY_MODES)}, got {self.guest_memory!r}"
            )

    def build(self) -> Host:
        """A fresh emulated host with these settings."""
        return Host(
            kernel=self.kernel,
            async_destroy=self.async_destroy,
            destroy_fast=self.destroy_fast,
            feature_misc=self.feature_misc,
            guest_memory=self.guest_memory,
            walk_threads=self.walk_threads,
            costs=self.costs,
        )

    @property
    def cost_model(self) -> CostModel:
        """The cost model of the modelled clock (the built-in default when ``costs`` is None)."""
        return self.costs if self.costs is not None else CostModel.default()

    def as_dict(self) -> dict[str, Any]:
        """The settings as a result's ``host`` section (the cost model by name)."""
        return {
            "kernel": self.kernel,
            "async_destroy": self.async_destroy,
            "destroy_fast": self.destroy_fast,
            "feature_misc": self.feature_misc,
            "guest_memory": self.guest_memory,
            "walk_threads": self.walk_threads,
            "costs": self.cost_model.name,
        }


def host_info(options: HostOptions = HostOptions()) -> dict[str, Any]:
    """The emulated host as a VMM sees it: capabilities, sysfs files, UV features and limits."""
    host = options.build()
    uv = host.uv.info()
    return {
        "experiment": "info",
        **_provenance(host, options),
        "capabilities": {cap.name: {"cap": int(cap), "value": host.check_extension(cap)} for cap in Cap},
        "module_params": dict(host.module_params),
        "sysfs": {path: host.read_sysfs(path).rstrip("\n") for path in host.sysfs_paths()},
        "uv": {
            "destroy_fast": host.destroy_fast_available,
            "feature_misc": host.feature_misc,
            "feature_aiv": host.feature_aiv,
            "dump": host.dump_available,
            **{key: (list(value) if isinstance(value, tuple) else value) for key, value in uv.items()},
        },
        "kernel": kernel_info(host.kernel),
        "build_profile": _build_profile(),
    }


def kernel_info(name: str) -> dict[str, Any]:
    """A kernel profile: its name, what it stands for, and every delta with whether it has it."""
    profile = profiles.profile(name)
    return {
        "profile": profile.name,
        "description": profiles.DESCRIPTIONS[profile.name],
        "deltas": profile.table(),
    }


def _build_profile() -> str:
    return str(_native.build_profile)


# ------------------------------------------------------------------------------------- guest


@functools.lru_cache(maxsize=1)
def boot_image() -> _image.Image:
    """A small sealed image (kernel + command line below 2 GiB) that ``vmm.protect`` boots."""
    kernel = bytes(range(256)) * (256 * KiB // 256)
    cmdline = b"root=/dev/vda1 console=ttysclp0 pvfast\0"
    return _image.build([(0x10000, kernel), (0x8000, cmdline)])


def uvc_delta(after: Mapping[str, int], before: Mapping[str, int]) -> dict[str, int]:
    """UVCs issued between two ``host.uv.stats()`` snapshots (only the non-zero ones)."""
    return {name: after[name] - before.get(name, 0) for name in sorted(after) if after[name] - before.get(name, 0)}


def traced_vm(vm: Vm, tracer: Tracer | None) -> Vm:
    """With a tracer, every KVM_S390_PV_COMMAND on ``vm`` (from any thread) becomes a trace event."""
    if tracer is not None:

        def name(cmd: int, *_: Any) -> str:
            try:
                return f"KVM_PV_{PvCmd(cmd).name}"
            except ValueError:
                return f"KVM_PV_{cmd}"

        vm.pv_command = tracer.wrap(vm.pv_command, name, cat="pv")  # type: ignore[method-assign]
    return vm


def _span(tracer: Tracer | None, name: str, **args: Any) -> Any:
    return tracer.span(name, **args) if tracer is not None else _NULL_SPAN


def _machine_start(tracer: Tracer | None) -> contextlib.AbstractContextManager[int]:
    """``tracer.machine()``: the run on a fresh host starts here on the trace (0 without one)."""
    return tracer.machine() if tracer is not None else contextlib.nullcontext(0)


class _NullSpan:
    """A do-nothing ``with`` target (one shared instance; no per-phase allocation)."""

    def __enter__(self) -> dict[str, Any]:
        return {}

    def __exit__(self, *exc: object) -> None:
        return None


_NULL_SPAN = _NullSpan()


def dirty(vm: Vm, secure: int, *, progress: Progress | None = None, start: int = HIGH) -> None:
    """The running protected guest writes ``secure`` bytes from ``start`` up (imports them)."""
    done = 0
    while done < secure:
        step = min(DIRTY_CHUNK, secure - done)
        vm.guest_access(start + done, step)
        done += step
        if progress is not None:
            progress("guest dirties secure memory", done, secure, "bytes")


def boot_guest(
    proc: Process,
    memory: int,
    secure: int,
    *,
    vcpus: int = DEFAULT_VCPUS,
    progress: Progress | None = None,
    tracer: Tracer | None = None,
) -> Vm:
    """A protected guest of ``memory`` bytes in ``proc`` that has made ``secure`` bytes secure
    (above 2 GiB, and below it what does not fit above: ``dirty_start``)."""
    vm = traced_vm(proc.create_vm(memory, vcpus=vcpus), tracer)
    with _span(tracer, "boot (protect)"):
        vmm.protect(vm, boot_image())
    with _span(tracer, "guest dirties secure memory", bytes=secure):
        dirty(vm, secure, progress=progress, start=dirty_start(memory, secure))
    return vm


# ------------------------------------------------------------------------------------- accounting


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far (ru_maxrss)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _threads(delta: AccountingSnapshot) -> list[dict[str, Any]]:
    return [t.as_dict() for t in delta.busy().threads]


def _only(delta: AccountingSnapshot, keep: Callable[[ThreadUsage], bool]) -> AccountingSnapshot:
    return AccountingSnapshot(tuple(t for t in delta.threads if keep(t)), (), Usage())


def _main_key(proc: Process) -> tuple[int, str]:
    return (proc.pid, threading.current_thread().name)


def _counters(tracer: Tracer | None, host: Host, base: Mapping[str, int]) -> None:
    if tracer is not None:
        tracer.counter("UVCs", uvc_delta(host.uv.stats(), base))  # nothing before the first UVC
        tracer.counter("secure pages", {"secure pages": host.uv.secure_pages()})


def labelled(tracer: Tracer | None, label: str) -> contextlib.AbstractContextManager[None]:
    """With a tracer, the threads first seen inside the ``with`` get ``label`` in their track
    names (``async_cleanup [4G async, run 2]``): each run's threads are told apart."""
    return tracer.labelled(label) if tracer is not None else contextlib.nullcontext()


# ------------------------------------------------------------------------------------- reboot

SAMPLE_SECONDS = 0.01  # memory timeline: one sample per this many wall seconds


def reboot(
    memory: int,
    secure: int,
    *,
    mode: str = "auto",
    options: HostOptions = HostOptions(),
    vcpus: int = DEFAULT_VCPUS,
    progress: Progress | None = None,
    tracer: Tracer | None = None,
    timeline: bool = True,
) -> dict[str, Any]:
    """Reboot a protected guest as QEMU does and time it.

    ``mode``: ``"auto"`` is QEMU's ``s390_machine_unprotect`` (async when the host allows it),
    ``"sync"`` forces KVM_PV_DISABLE, ``"async"`` asks for the asynchronous path: where QEMU
    falls back to DISABLE because the guest is not larger than 2 GiB, the result says so
    (``fallback``) and is no error; where the host cannot go asynchronous (capability 224 is 0,
    or PREPARE failed) the result carries an ``error``. Times are from the start of the
    unprotect: ``unprotect_seconds`` (the reset path can go on), ``running_seconds`` (the new
    protected guest runs: image loaded, ENABLE..VERIFY done; ``load_seconds`` +
    ``protect_seconds`` after the unprotect), ``cleanup_seconds`` (the old guest's memory is
    clean). ``model`` has the same on the modelled clock; ``accounting`` the work of the teardown
    (main thread's unprotect and the async_cleanup thread) and of the new guest's boot, per
    thread; ``memory_timeline`` the old guest's memory over time (``timeline=False`` skips the
    sampler). docs/OUTPUT.md explains every field.
    """
    if mode not in ("auto", "sync", "async"):
        raise ValueError(f"mode: expected 'auto', 'sync' or 'async', got {mode!r}")
    check_sizes(memory, secure)
    host = options.build()
    proc = host.spawn_process("qemu")
    with _machine_start(tracer) as start:
        name = f"reboot of a {format_size(memory)} guest, {format_size(secure)} secure (failed)"
        try:
            result = _reboot(host, proc, memory, secure, mode, options, vcpus, progress, tracer, timeline)
            name = reboot_name(result)
            return result
        finally:
            if tracer is not None:
                args = {"memory": memory, "secure": secure, "mode": mode}
                tracer.complete(name, start, tracer.now_ns(), args=args)
            with _span(tracer, "process exit (not measured)"):
                proc.exit()


def reboot_name(result: Mapping[str, Any]) -> str:
    """What a reboot result was, in a few words: the path taken, why, and the guest."""
    guest = f"{format_size(result['memory'])} guest, {format_size(result['secure'])} secure"
    if result["mode"] == "async":
        return f"async reboot (PREPARE, PERFORM in async_cleanup) of a {guest}"
    if result.get("fallback"):
        return f"sync reboot (DISABLE: QEMU's fallback from async) of a {guest}"
    return f"sync reboot (DISABLE) of a {guest}"


def _fallback(host: Host, vm: Vm) -> str:
    """Why QEMU's s390_machine_unprotect did not go asynchronous for ``vm``."""
    if vm.memory_limit <= SZ_2G:
        return (
            f"the guest's memory ({format_size(vm.memory_limit)}) is not larger than 2G, so QEMU "
            "(s390_pv_vm_try_disable_async) does not try KVM_PV_ASYNC_CLEANUP_PREPARE and issues "
            "KVM_PV_DISABLE"
        )
    if not host.check_extension(Cap.S390_PROTECTED_ASYNC_DISABLE):
        return (
            "capability 224 (KVM_CAP_S390_PROTECTED_ASYNC_DISABLE) is 0 on this host "
            f"(async_destroy={host.module_params.get('async_destroy')}): QEMU issues KVM_PV_DISABLE"
        )
    return "KVM_PV_ASYNC_CLEANUP_PREPARE failed: QEMU logs the error and issues KVM_PV_DISABLE"


def _reboot(
    host: Host,
    proc: Process,
    memory: int,
    secure: int,
    mode: str,
    options: HostOptions,
    vcpus: int,
    progress: Progress | None,
    tracer: Tracer | None,
    sample: bool,
) -> dict[str, Any]:
    t_boot = time.perf_counter()
    vm = boot_guest(proc, memory, secure, vcpus=vcpus, progress=progress, tracer=tracer)
    boot_seconds = time.perf_counter() - t_boot
    old_handle = vm.pv_state().handle
    pages_before = host.uv.secure_pages(old_handle)
    stats0 = host.uv.stats()
    _counters(tracer, host, stats0)
    timeline = MemoryTimeline(host, proc.mm, [old_handle], interval=SAMPLE_SECONDS, tracer=tracer) if sample else None

    thread = None
    # The async_cleanup thread enters PERFORM once the new guest runs: its work never lands in
    # the unprotect's or the boot's counters, and what its walk meets (the new guest's pages,
    # which the newest kernels export) is the same in every run, so modelled times are
    # deterministic. It starts a few ms later on the wall clock than it would in QEMU; its
    # modelled clock starts where the unprotect left the main thread, as QEMU's thread would.
    counted = threading.Event()
    acc0 = host.accounting.snapshot()
    m0 = clock.now_ps()
    if timeline is not None:
        timeline.start()
    t0 = time.perf_counter()
    with _span(tracer, "unprotect"):
        if mode == "sync":
            vm.pv_command(PvCmd.DISABLE)  # QEMU's fallback, forced
        else:
            thread = vmm.unprotect(vm, hold=counted)
    t1 = time.perf_counter()
    m1 = clock.now_ps()
    stats_unprotect = host.uv.stats()
    acc1 = host.accounting.snapshot()
    if timeline is not None:
        timeline.mark("unprotect returned")
    # vmm.protect(vm, image) split in its two parts, so each gets its own time
    with _span(tracer, "IPL loads the image (host_write)"):
        for comp in boot_image().components:
            vm.host_write(comp.addr, comp.data)
    t_loaded = time.perf_counter()
    m_loaded = clock.now_ps()
    with _span(tracer, "protect: ENABLE..VERIFY"):
        vmm.protect(vm, boot_image(), load=False)
    t2 = time.perf_counter()
    m2 = clock.now_ps()
    acc2 = host.accounting.snapshot()
    if timeline is not None:
        timeline.mark("guest running again")
    counted.set()
    _counters(tracer, host, stats0)

    perform: dict[str, Any] | None = None
    if thread is not None:
        with _span(tracer, "wait for async_cleanup"):
            while not clock.join(thread, POLL_SECONDS):
                left = host.uv.secure_pages(old_handle)
                if progress is not None:
                    progress("async_cleanup tears down the old guest", pages_before - left, pages_before, "pages")
                _counters(tracer, host, stats0)
        t3 = time.perf_counter()
        m3 = host.accounting.thread_clock_ps(thread) or m1
        if thread.error is not None:
            perform = {"error": str(thread.error)}
        elif thread.result is not None:
            perform = {"rc": thread.result.rc, "rrc": thread.result.rrc}
    else:
        t3 = t1
        m3 = m1
        if progress is not None:
            progress("KVM_PV_DISABLE tore the old guest down", pages_before, pages_before, "pages")
    stats1 = host.uv.stats()
    acc3 = host.accounting.snapshot()
    if timeline is not None:
        timeline.mark("old guest's memory clean")
        timeline.stop()
    _counters(tracer, host, stats0)

    went_async = thread is not None
    fallback = _fallback(host, vm) if mode != "sync" and not went_async else None
    main = _main_key(proc)
    # The teardown: everything in the unprotect (only the main thread runs then; async_cleanup
    # waits for `counted`), and everything the other threads did until the end.
    teardown = (acc1 - acc0).busy().threads + _only(acc3 - acc0, lambda t: t.key != main).busy().threads
    boot_new = _only(acc2 - acc1, lambda t: t.key == main).busy().threads
    result: dict[str, Any] = {
        "experiment": "reboot",
        **_provenance(host, options),
        "memory": memory,
        "secure": secure,
        "vcpus": vcpus,
        "mode_requested": mode,
        "mode": "async" if went_async else "sync",
        "fallback": fallback,
        "boot_seconds": boot_seconds,
        "unprotect_seconds": t1 - t0,
        "load_seconds": t_loaded - t1,
        "protect_seconds": t2 - t_loaded,
        "running_seconds": t2 - t0,
        "cleanup_seconds": t3 - t0,
        "background_seconds": (t3 - t1) if went_async else 0.0,
        "model": {
            "costs": options.cost_model.name,
            "unprotect_seconds": (m1 - m0) / 1e12,
            "load_seconds": (m_loaded - m1) / 1e12,
            "protect_seconds": (m2 - m_loaded) / 1e12,
            "running_seconds": (m2 - m0) / 1e12,
            "cleanup_seconds": (m3 - m0) / 1e12,
            "background_seconds": (m3 - m1) / 1e12 if went_async else 0.0,
        },
        "old_handle": old_handle,
        "secure_pages_before": pages_before,
        "secure_pages_left": host.uv.secure_pages(old_handle),
        "secure_pages_now": host.uv.secure_pages(),
        "uvcs_unprotect": uvc_delta(stats_unprotect, stats0),
        "uvcs": uvc_delta(stats1, stats0),
        "accounting": {
            "teardown": [t.as_dict() for t in teardown],
            "boot_new_guest": [t.as_dict() for t in boot_new],
        },
        "perform": perform,
        "pv_state": {
            "protected": vm.pv_state().protected,
            "set_aside": vm.pv_state().set_aside,
            "need_cleanup": vm.pv_state().need_cleanup,
            "leaked": vm.pv_state().leaked,
        },
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if timeline is not None:
        result["memory_timeline"] = timeline.as_dict()
    if mode == "async" and fallback is not None and vm.memory_limit > SZ_2G:
        # The guest could have gone asynchronous; the host did not let it.
        result["error"] = f"the reboot was synchronous, not the asynchronous one asked for: {fallback}"
    return result


def reboot_repeated(
    memory: int,
    secure: int,
    *,
    repeat: int,
    mode: str = "auto",
    options: HostOptions = HostOptions(),
    vcpus: int = DEFAULT_VCPUS,
    progress: Progress | None = None,
    tracer: Tracer | None = None,
    timeline: bool = True,
) -> dict[str, Any]:
    """``reboot`` ``repeat`` times, each on a fresh host: every run (``runs``), the run whose time
    until the guest runs again is the (lower) median (``median_run``, an index into ``runs``), and
    per time its median, minimum and maximum on both clocks (``summary``)."""
    if repeat < 1:
        raise ValueError(f"repeat: must be at least 1, got {repeat}")
    check_sizes(memory, secure)
    runs = []
    for i in range(repeat):
        with labelled(tracer, f"run {i + 1} of {repeat}"):
            runs.append(
                reboot(
                    memory,
                    secure,
                    mode=mode,
                    options=options,
                    vcpus=vcpus,
                    progress=progress,
                    tracer=tracer,
                    timeline=timeline,
                )
            )
    median = _median_run(runs, "running_seconds")
    first = runs[0]
    return {
        "experiment": "reboot",
        "pvfast": first["pvfast"],
        "machine": first["machine"],
        "host": first["host"],
        "memory": memory,
        "secure": secure,
        "vcpus": vcpus,
        "mode_requested": mode,
        "repeat": repeat,
        "median_run": runs.index(median),
        "summary": {
            "wall": {key: spread([r[key] for r in runs]) for key in REBOOT_TIMES},
            "model": {key: spread([r["model"][key] for r in runs]) for key in REBOOT_TIMES},
        },
        "runs": runs,
    }


#: The times of a reboot result (wall; the same keys under ``model``).
REBOOT_TIMES = (
    "unprotect_seconds",
    "load_seconds",
    "protect_seconds",
    "running_seconds",
    "cleanup_seconds",
    "background_seconds",
)


def spread(values: Iterable[float]) -> dict[str, float]:
    """Median, minimum and maximum of some samples (the spread of a median of N)."""
    xs = list(values)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


# ------------------------------------------------------------------------------------- shutdown


def shutdown(
    memory: int,
    secure: int,
    *,
    helper: bool = True,
    options: HostOptions = HostOptions(),
    vcpus: int = DEFAULT_VCPUS,
    progress: Progress | None = None,
    tracer: Tracer | None = None,
    timeline: bool = True,
) -> dict[str, Any]:
    """QEMU exits with a protected guest running, with or without the ``-run-with async-teardown=on``
    CLONE_VM helper; reports how long the VMM's own exit took and what the helper's exit paid,
    where the work landed (``accounting`` per phase), the same on the modelled clock (``model``;
    the helper exits once the VMM is gone, as QEMU's helper waits for its parent's death), and
    the dead guest's memory over time (``memory_timeline``): with the helper, it stays allocated
    after the VMM has exited, held by the helper, until the helper's exit unmaps it."""
    check_sizes(memory, secure)
    host = options.build()
    proc = host.spawn_process("qemu")
    helper_proc = proc.clone_vm() if helper else None  # QEMU clones at start-up, before KVM exists
    what = "with the CLONE_VM helper" if helper else "without a helper"
    with (
        _machine_start(tracer) as start,
        _span(tracer, f"VMM exit {what}: {format_size(memory)} guest, {format_size(secure)} secure", start_ns=start),
    ):
        t_boot = time.perf_counter()
        vm = boot_guest(proc, memory, secure, vcpus=vcpus, progress=progress, tracer=tracer)
        boot_seconds = time.perf_counter() - t_boot
        handle = vm.pv_state().handle
        pages_before = host.uv.secure_pages()
        stats0 = host.uv.stats()
        _counters(tracer, host, stats0)
        sampler = MemoryTimeline(host, proc.mm, [handle], interval=SAMPLE_SECONDS, tracer=tracer) if timeline else None

        acc0 = host.accounting.snapshot()
        m0 = clock.now_ps()
        if sampler is not None:
            sampler.start()
        t0 = time.perf_counter()
        with _span(tracer, f"exit {proc.name} (pid {proc.pid})"):
            proc.exit()
        vmm_wall = time.perf_counter() - t0
        m1 = clock.now_ps()
        acc1 = host.accounting.snapshot()
        stats1 = host.uv.stats()
        pages_after_vmm = host.uv.secure_pages()
        if sampler is not None:
            sampler.mark("VMM exited")
        _counters(tracer, host, stats0)
        if progress is not None:
            progress("VMM exited", pages_before - pages_after_vmm, pages_before, "pages")

        phases: dict[str, Any] = {
            "vmm_exit": {
                "process": proc.name,
                "seconds": proc.exit_seconds,
                "wall_seconds": vmm_wall,
                "model_seconds": (m1 - m0) / 1e12,
                "uvcs": uvc_delta(stats1, stats0),
                "secure_pages_after": pages_after_vmm,
                "accounting": _threads(acc1 - acc0),
            }
        }
        m2 = m1
        if helper_proc is not None:
            t1 = time.perf_counter()
            with _span(tracer, f"exit {helper_proc.name} (pid {helper_proc.pid})"):
                helper_proc.exit()
            helper_wall = time.perf_counter() - t1
            m2 = clock.now_ps()
            acc2 = host.accounting.snapshot()
            stats2 = host.uv.stats()
            if sampler is not None:
                sampler.mark("helper exited")
            _counters(tracer, host, stats0)
            if progress is not None:
                progress("helper exited", pages_before - host.uv.secure_pages(), pages_before, "pages")
            phases["helper_exit"] = {
                "process": helper_proc.name,
                "seconds": helper_proc.exit_seconds,
                "wall_seconds": helper_wall,
                "model_seconds": (m2 - m1) / 1e12,
                "uvcs": uvc_delta(stats2, stats1),
                "secure_pages_after": host.uv.secure_pages(),
                "accounting": _threads(acc2 - acc1),
            }
        if sampler is not None:
            sampler.stop()
    total = sum(phase["seconds"] for phase in phases.values())
    result: dict[str, Any] = {
        "experiment": "shutdown",
        **_provenance(host, options),
        "memory": memory,
        "secure": secure,
        "vcpus": vcpus,
        "helper": helper,
        "boot_seconds": boot_seconds,
        "handle": handle,
        "secure_pages_before": pages_before,
        "secure_pages_left": host.uv.secure_pages(),
        "configs_left": len(host.uv.config_handles()),
        "leaked": len(host.leaked()),
        "total_seconds": total,
        "vmm_share": (phases["vmm_exit"]["seconds"] / total) if total else 1.0,
        "model": {
            "costs": options.cost_model.name,
            "vmm_exit_seconds": (m1 - m0) / 1e12,
            "helper_exit_seconds": (m2 - m1) / 1e12,
            "total_seconds": (m2 - m0) / 1e12,
            # The dead guest's memory is still allocated, held by the helper alone, this long
            # after the VMM is gone: the window in which a new guest can run the host short.
            "held_after_vmm_exit_seconds": (m2 - m1) / 1e12,
        },
        **phases,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    if sampler is not None:
        result["memory_timeline"] = sampler.as_dict()
    return result


# ------------------------------------------------------------------------------------- compare


def compare(
    sizes: Iterable[int],
    *,
    memory: int | None = None,
    options: HostOptions = HostOptions(),
    vcpus: int = DEFAULT_VCPUS,
    repeat: int = 1,
    progress: Progress | None = None,
    tracer: Tracer | None = None,
    on_row: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Sync (DISABLE) against async (PREPARE + PERFORM) reboot for each secure size, one fresh host
    per run. ``memory`` None: ``auto_memory(size)`` per guest. With ``repeat`` > 1 each reboot runs
    that many times (sync and async alternating) and the row reports medians, with every sample
    (``samples``) and their minimum and maximum (``spread``). ``model_*`` columns are the same
    times on the modelled clock."""
    sizes = list(sizes)
    if not sizes:
        raise ValueError("sizes: give at least one secure size")
    if repeat < 1:
        raise ValueError(f"repeat: must be at least 1, got {repeat}")
    for size in sizes:
        check_sizes(memory if memory is not None else auto_memory(size), size)
    rows = []
    first: dict[str, Any] | None = None
    for size in sizes:
        mem = memory if memory is not None else auto_memory(size)
        syncs, asyncs = [], []
        kw: dict[str, Any] = {
            "options": options,
            "vcpus": vcpus,
            "progress": progress,
            "tracer": tracer,
            "timeline": tracer is not None,  # the sampler feeds the trace's counters
        }
        where = f"{format_size(size)} secure, {format_size(mem)} guest"
        start = tracer.frontier_ns() if tracer is not None else 0
        with _span(tracer, f"compare {where}: sync and async reboot, {repeat} run(s) each", start_ns=start):
            for i in range(repeat):
                run = f", run {i + 1}" if repeat > 1 else ""
                with labelled(tracer, f"{format_size(size)} sync{run}"):
                    syncs.append(reboot(mem, size, mode="sync", **kw))
                with labelled(tracer, f"{format_size(size)} async{run}"):
                    asyncs.append(reboot(mem, size, mode="auto", **kw))
        first = first or syncs[0]
        samples = {
            "sync_running_seconds": [r["running_seconds"] for r in syncs],
            "async_running_seconds": [r["running_seconds"] for r in asyncs],
            "async_cleanup_seconds": [r["cleanup_seconds"] for r in asyncs],
            "model_sync_running_seconds": [r["model"]["running_seconds"] for r in syncs],
            "model_async_running_seconds": [r["model"]["running_seconds"] for r in asyncs],
            "model_async_cleanup_seconds": [r["model"]["cleanup_seconds"] for r in asyncs],
        }
        med = {key: statistics.median(values) for key, values in samples.items()}
        row = {
            "secure": size,
            "memory": mem,
            "repeat": repeat,
            **med,
            "async_mode": "async" if all(r["mode"] == "async" for r in asyncs) else "sync",
            "fallback": next((r["fallback"] for r in asyncs if r["fallback"]), None),
            "ratio": med["sync_running_seconds"] / med["async_running_seconds"]
            if med["async_running_seconds"]
            else None,
            "model_ratio": med["model_sync_running_seconds"] / med["model_async_running_seconds"]
            if med["model_async_running_seconds"]
            else None,
            "spread": {key: {"min": min(values), "max": max(values)} for key, values in samples.items()},
            "samples": samples,
            "sync": _median_run(syncs, "running_seconds"),
            "async": _median_run(asyncs, "running_seconds"),
        }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    assert first is not None
    return {
        "experiment": "compare",
        "pvfast": first["pvfast"],
        "machine": first["machine"],
        "host": options.as_dict(),
        "memory": memory,
        "vcpus": vcpus,
        "repeat": repeat,
        "rows": rows,
        **_growth(rows),
    }


def _median_run(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run whose ``key`` is the (lower) median: a real run to show UVCs and pages for."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def _growth(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Least-squares slope (seconds per GiB) of each curve: how cost grows with the guest's secure
    memory. Nothing for one row; each slope None when every row has the same size."""
    if len(rows) < 2:
        return {}
    xs = [row["secure"] / GiB for row in rows]
    if len(set(xs)) < 2:  # one size, measured twice or more: no slope (None, not 0)
        curves = ("sync_running", "async_running", "async_cleanup")
        return {"seconds_per_gib": dict.fromkeys(curves), "model_seconds_per_gib": dict.fromkeys(curves)}

    def slope(key: str) -> float:
        ys = [row[key] for row in rows]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0

    return {
        "seconds_per_gib": {
            "sync_running": slope("sync_running_seconds"),
            "async_running": slope("async_running_seconds"),
            "async_cleanup": slope("async_cleanup_seconds"),
        },
        "model_seconds_per_gib": {
            "sync_running": slope("model_sync_running_seconds"),
            "async_running": slope("model_async_running_seconds"),
            "async_cleanup": slope("model_async_cleanup_seconds"),
        },
    }


# ------------------------------------------------------------------------------------- calibrate

#: The phases a measurement can be of, for ``calibrate``.
PHASES: Mapping[str, str] = {
    "disable": "KVM_PV_DISABLE of a synchronous reboot (the VMM's main thread)",
    "prepare": "KVM_PV_ASYNC_CLEANUP_PREPARE of an asynchronous reboot (the main thread)",
    "perform": "KVM_PV_ASYNC_CLEANUP_PERFORM of an asynchronous reboot (the async_cleanup thread)",
    "exit": "the VMM's exit without the CLONE_VM helper (mm teardown and VM destruction)",
    "helper-exit": "the CLONE_VM helper's exit after the VMM's (the unmap of the dead guest's memory)",
}

#: What ``calibrate`` fits for a phase when not told: the cost that dominates that phase.
DEFAULT_FIT: Mapping[str, str] = {
    "disable": "uvc.DESTROY_SEC_CONF.per_page_ns",
    "prepare": "uvc.DESTROY_SEC_CONF_FAST.fixed_ns",
    "perform": "uvc.DESTR_SEC_STOR.fixed_ns",
    "exit": "uvc.DESTR_SEC_STOR.fixed_ns",
    "helper-exit": "pte_ns",
}

_MEASURE_RE = re.compile(r"^\s*([a-z-]+)\s*:\s*([^=@]+?)\s*(?:@\s*([^=]+?)\s*)?=\s*([0-9.eE+-]+)\s*(ms|s|us|µs)?\s*$")
_UNIT = {None: 1.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}


@dataclass(frozen=True)
class Measurement:
    """A time a user measured: ``phase`` (see ``PHASES``) of a guest with ``secure`` bytes of
    secure memory (``memory`` None: ``auto_memory(secure)``) took ``seconds``."""

    phase: str
    secure: int
    seconds: float
    memory: int | None = None

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase: {self.phase!r} is not one of {', '.join(PHASES)}")
        check_sizes(self.memory if self.memory is not None else auto_memory(self.secure), self.secure)
        if not (self.seconds > 0 and math.isfinite(self.seconds)):
            raise ValueError(f"seconds: {self.seconds} is not a positive time")

    @classmethod
    def parse(cls, text: str) -> Measurement:
        """``PHASE:SECURE[@MEMORY]=TIME``, e.g. ``disable:8G=3.2`` or ``perform:4G@64G=850ms``
        (TIME in s unless it ends in ms or us)."""
        match = _MEASURE_RE.match(text)
        if not match:
            raise ValueError(
                f"invalid measurement {text!r}: expected PHASE:SECURE[@MEMORY]=SECONDS, e.g. disable:8G=3.2"
            )
        phase, secure, memory, number, unit = match.groups()
        try:
            seconds = float(number) * _UNIT[unit]
        except ValueError:
            raise ValueError(f"invalid measurement {text!r}: {number!r} is not a number") from None
        return cls(phase, parse_size(secure), seconds, parse_size(memory) if memory else None)

    @property
    def label(self) -> str:
        """The measurement as ``PHASE:SECURE[@MEMORY]`` (without the time)."""
        where = format_size(self.secure) + (f"@{format_size(self.memory)}" if self.memory else "")
        return f"{self.phase}:{where}"


def phase_usage(
    phase: str,
    secure: int,
    *,
    memory: int | None = None,
    options: HostOptions = HostOptions(guest_memory="state"),
    vcpus: int = DEFAULT_VCPUS,
) -> Usage:
    """The work (counts of every kind) that ``phase`` of a guest with ``secure`` bytes of secure
    memory does, by the thread that does it. Counts do not depend on the cost model or on how
    memory is backed, so the default runs in state-only memory (any size, little RAM)."""
    if phase not in PHASES:
        raise ValueError(f"phase: {phase!r} is not one of {', '.join(PHASES)}")
    mem = memory if memory is not None else auto_memory(secure)
    check_sizes(mem, secure)
    host = options.build()
    proc = host.spawn_process("qemu")
    helper = proc.clone_vm() if phase == "helper-exit" else None
    try:
        vm = boot_guest(proc, mem, secure, vcpus=vcpus)
        who: Process = proc
        if phase == "perform":
            vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
        elif phase == "helper-exit":
            proc.exit()
            assert helper is not None
            who = helper
        before = host.accounting.snapshot()
        if phase == "disable":
            vm.pv_command(PvCmd.DISABLE)
        elif phase == "prepare":
            vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
        elif phase == "perform":
            vm.pv_command(PvCmd.ASYNC_CLEANUP_PERFORM)  # same work on whichever thread issues it
        else:
            who.exit()
        delta = host.accounting.snapshot() - before
        return delta.thread(threading.current_thread().name, who.pid).usage
    finally:
        for p in (proc, helper):
            if p is not None and p.alive:
                p.exit()


def calibrate(
    measurements: Iterable[Measurement],
    *,
    params: Iterable[str] | None = None,
    base: CostModel | None = None,
    options: HostOptions = HostOptions(guest_memory="state"),
) -> tuple[Fit, dict[str, Any]]:
    """Fit cost parameters so the modelled times of the measured phases match the measurements.
    ``params`` None: each phase's ``DEFAULT_FIT`` parameter. Returns the fit and a report (per
    measurement: measured seconds, modelled before and after)."""
    measured = list(measurements)
    if not measured:
        raise ValueError("measurements: give at least one measured phase")
    model = base if base is not None else CostModel.default()
    names = list(params) if params is not None else list(dict.fromkeys(DEFAULT_FIT[m.phase] for m in measured))
    observations = []
    for m in measured:
        usage = phase_usage(m.phase, m.secure, memory=m.memory, options=options)
        observations.append(Observation(usage.cost_counts(), m.seconds, m.label))
    result = fit(observations, names, base=model)
    report = {
        "experiment": "calibrate",
        **_provenance(options.build(), options),
        "base": model.name,
        "fitted": dict(result.values),
        "defaults": {p: model.get(p) for p in names},
        "measurements": [
            {
                "measurement": obs.label,
                "phase": m.phase,
                "secure": m.secure,
                "measured_seconds": m.seconds,
                "model_seconds_before": model.price(obs.counts),
                "model_seconds_after": result.model.price(obs.counts),
                "work": dict(obs.counts),
            }
            for m, obs in zip(measured, observations, strict=True)
        ],
        "costs": result.model.as_dict(),
    }
    return result, report


def plot_compare(result: Mapping[str, Any], path: str, *, clock_kind: str = "wall") -> None:
    """Two panels against secure memory: linear axes (sync grows linearly, async stays at the
    bottom) and log time (the flat async curve readable in milliseconds); wall or modelled time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator

    rows = result["rows"]
    xs = [row["secure"] / GiB for row in rows]
    prefix = "model_" if clock_kind == "model" else ""
    curves = [
        ("sync_running_seconds", "o-", "tab:red", "sync reboot (KVM_PV_DISABLE): guest running again"),
        (
            "async_running_seconds",
            "s-",
            "tab:green",
            "async reboot (PREPARE, PERFORM in a thread): guest running again",
        ),
        ("async_cleanup_seconds", "^--", "tab:blue", "async reboot: old guest's memory clean (async_cleanup done)"),
    ]
    repeat = result.get("repeat", 1)
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2), dpi=110)
    for ax, log in zip(axes, (False, True), strict=True):
        for key, style, color, label in curves:
            ys = [row[prefix + key] for row in rows]
            ax.plot(xs, ys, style, color=color, label=label)
            if repeat > 1 and all("spread" in row for row in rows):
                low = [y - row["spread"][prefix + key]["min"] for y, row in zip(ys, rows, strict=True)]
                high = [row["spread"][prefix + key]["max"] - y for y, row in zip(ys, rows, strict=True)]
                ax.errorbar(xs, ys, yerr=[low, high], fmt="none", ecolor=color, elinewidth=1, capsize=3)
        if log:
            ax.set_yscale("log")
            ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_title("log time")
        else:
            ax.set_ylim(bottom=0)
            ax.set_title("linear")
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: format_size(round(v * GiB))))
        ax.yaxis.set_major_formatter(FuncFormatter(_seconds_label))
        ax.set_xlim(0, max(xs) * 1.05 or 1.0)
        ax.set_xlabel("secure guest memory above 2 GiB, dirtied before the reboot")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(("modelled " if clock_kind == "model" else "") + "time from the start of the reboot")
    fig.suptitle(compare_title(result, clock_kind=clock_kind), fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)


def compare_title(result: Mapping[str, Any], *, clock_kind: str = "wall") -> str:
    """The title of a compare plot: what ran (guest size, vCPUs, host options, clock), how often
    (median of N with its min–max bars) and where (machine, build and kernel profile)."""
    host = result.get("host", {})
    flags = [f"async_destroy={host.get('async_destroy', 1)}"]
    flags.append("Destroy-Fast" if host.get("destroy_fast", True) else "no Destroy-Fast")
    flags.append("MISC" if host.get("feature_misc", True) else "no MISC")
    if host.get("guest_memory", "real") != "real":
        flags.append(f"{host['guest_memory']} guest memory")
    memory = result.get("memory")
    guest = f"guest {format_size(memory)}" if memory else "guest = secure + 3G (2G below, 1G untouched)"
    runs = f"median of {result['repeat']} runs, bars min–max" if result.get("repeat", 1) > 1 else "one run each"
    clock_text = f"modelled clock (costs: {host.get('costs', 'default')})" if clock_kind == "model" else "wall clock"
    line1 = f"pvfast compare: protected-guest reboot, sync vs async; {guest}, {result.get('vcpus', '?')} vCPUs"
    line2 = f"{', '.join(flags)}; {clock_text}; {runs}"
    return f"{line1}\n{line2}\n{provenance_line(result)}"


def provenance_line(result: Mapping[str, Any]) -> str:
    """Where a result was measured, for a plot's title: the machine, pvfast's version and build
    profile, and the kernel profile where there is one."""
    meta = result.get("pvfast", {})
    text = f"{describe_machine(result.get('machine', {}))}; pvfast {meta.get('version', '?')}"
    text += f" ({meta.get('build_profile', '?')} build)"
    if meta.get("kernel"):
        text += f", kernel profile {meta['kernel']}"
    return text


def _seconds_label(value: float, _pos: object) -> str:
    if value == 0:
        return "0"
    if value >= 1:
        return f"{value:g} s"
    if value >= 1e-3:
        return f"{value * 1e3:g} ms"
    return f"{value * 1e6:g} µs"


# ------------------------------------------------------------------------------------- floors


def zero_floor_seconds(size: int, *, repeat: int = 3, nontemporal: bool = True) -> tuple[float, str]:
    """Best time to zero ``size`` bytes of already-touched memory, and what measured it.

    The floor is the native zeroing loop (non-temporal stores by default, on the UV's worker
    pool like the walk) over a touched region of the same size, measured in the same run.
    """
    uv = _native.Ultravisor()
    region = uv.create_region(size)
    region.touch(0, size)  # the walk zeroes pages that are present
    best = min(region.bench_zero(nontemporal, True) for _ in range(repeat))
    uv.release_region(region)
    kind = "non-temporal" if nontemporal else "memset"
    return best, f"native {kind} zeroing of a touched region, same worker pool"
