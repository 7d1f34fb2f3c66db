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

import functools
import re
import resource
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import _native, clock, profiles, vmm
from . import image as _image
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


def parse_size(text: str) -> int:
    """``"8G"`` → 8 GiB. Binary suffixes K/M/G/T (``KiB``/``GB`` spellings accepted), bytes without one."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional K/M/G/T suffix, e.g. 8G")
    number, suffix = match.groups()
    value = float(number) * _SUFFIX[suffix.upper()]
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    if value <= 0:
        raise ValueError(f"invalid size {text!r}: must be positive")
    return int(value)


def format_size(size: int) -> str:
    """8589934592 → ``"8G"``; sizes that are not whole units keep up to two decimals (``"3.25G"``)."""
    for suffix, unit in (("T", TiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if size >= unit:
            value = size / unit
            return f"{value:.2f}".rstrip("0").rstrip(".") + suffix
    return f"{size}B"


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
    they must fit in ``memory`` (a multiple of 1 MiB)."""
    if memory % MiB:
        raise ValueError(f"--memory {format_size(memory)} is not a multiple of 1M")
    if secure % PAGE_SIZE:
        raise ValueError(f"--secure {format_size(secure)} is not a multiple of 4K")
    if secure > memory:
        raise ValueError(
            f"--secure {format_size(secure)} does not fit in --memory {format_size(memory)}: "
            f"the guest can make at most all of its memory secure"
        )


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
        return self.costs if self.costs is not None else CostModel.default()

    def as_dict(self) -> dict[str, Any]:
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
        "host": options.as_dict(),
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
        tracer.counter("UVCs", uvc_delta(host.uv.stats(), base) or {"none": 0})
        tracer.counter("secure pages", {"secure pages": host.uv.secure_pages()})


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
    ``"sync"`` forces KVM_PV_DISABLE, ``"async"`` is ``auto`` but reports an error result if QEMU
    would not have gone asynchronous. Times are from the start of the unprotect:
    ``unprotect_seconds`` (the reset path can go on), ``running_seconds`` (the new protected guest
    runs: image loaded, ENABLE..VERIFY done; ``load_seconds`` + ``protect_seconds`` after the
    unprotect), ``cleanup_seconds`` (the old guest's memory is clean). ``model`` has the same on
    the modelled clock; ``accounting`` the work of the teardown (main thread's unprotect and the
    async_cleanup thread) and of the new guest's boot, per thread; ``memory`` the old guest's
    memory over time (``timeline=False`` skips the sampler).
    """
    if mode not in ("auto", "sync", "async"):
        raise ValueError(f"mode: expected 'auto', 'sync' or 'async', got {mode!r}")
    check_sizes(memory, secure)
    host = options.build()
    proc = host.spawn_process("qemu")
    try:
        with _span(tracer, f"reboot {mode} {format_size(secure)}", memory=memory, secure=secure):
            return _reboot(host, proc, memory, secure, mode, options, vcpus, progress, tracer, timeline)
    finally:
        with _span(tracer, "process exit (not measured)"):
            proc.exit()


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
    main = _main_key(proc)
    # The teardown: everything in the unprotect (only the main thread runs then; async_cleanup
    # waits for `counted`), and everything the other threads did until the end.
    teardown = (acc1 - acc0).busy().threads + _only(acc3 - acc0, lambda t: t.key != main).busy().threads
    boot_new = _only(acc2 - acc1, lambda t: t.key == main).busy().threads
    result: dict[str, Any] = {
        "experiment": "reboot",
        "host": options.as_dict(),
        "memory": memory,
        "secure": secure,
        "vcpus": vcpus,
        "mode_requested": mode,
        "mode": "async" if went_async else "sync",
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
    if mode == "async" and not went_async:
        result["error"] = (
            "the reboot was synchronous: QEMU goes asynchronous only with capability 224 "
            f"(= {host.check_extension(Cap.S390_PROTECTED_ASYNC_DISABLE)}) and a memory limit above 2G"
        )
    return result


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
    with _span(tracer, f"shutdown {'with' if helper else 'without'} helper {format_size(secure)}"):
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
        "host": options.as_dict(),
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
    that many times (sync and async alternating) and the row reports medians. ``model_*`` columns
    are the same times on the modelled clock."""
    sizes = list(sizes)
    if repeat < 1:
        raise ValueError(f"repeat: must be at least 1, got {repeat}")
    for size in sizes:
        check_sizes(memory if memory is not None else auto_memory(size), size)
    rows = []
    for size in sizes:
        mem = memory if memory is not None else auto_memory(size)
        syncs, asyncs = [], []
        with _span(tracer, f"compare {format_size(size)}"):
            for _ in range(repeat):
                kw: dict[str, Any] = {
                    "options": options,
                    "vcpus": vcpus,
                    "progress": progress,
                    "tracer": tracer,
                    "timeline": tracer is not None,  # the sampler feeds the trace's counters
                }
                syncs.append(reboot(mem, size, mode="sync", **kw))
                asyncs.append(reboot(mem, size, mode="auto", **kw))
        sync_running = statistics.median(r["running_seconds"] for r in syncs)
        async_running = statistics.median(r["running_seconds"] for r in asyncs)
        model_sync = statistics.median(r["model"]["running_seconds"] for r in syncs)
        model_async = statistics.median(r["model"]["running_seconds"] for r in asyncs)
        row = {
            "secure": size,
            "memory": mem,
            "repeat": repeat,
            "sync_running_seconds": sync_running,
            "async_running_seconds": async_running,
            "async_cleanup_seconds": statistics.median(r["cleanup_seconds"] for r in asyncs),
            "model_sync_running_seconds": model_sync,
            "model_async_running_seconds": model_async,
            "model_async_cleanup_seconds": statistics.median(r["model"]["cleanup_seconds"] for r in asyncs),
            "async_mode": "async" if all(r["mode"] == "async" for r in asyncs) else "sync",
            "ratio": sync_running / async_running if async_running else None,
            "model_ratio": model_sync / model_async if model_async else None,
            "sync": _median_run(syncs, "running_seconds"),
            "async": _median_run(asyncs, "running_seconds"),
        }
        if repeat > 1:
            row["samples"] = {
                "sync_running_seconds": [r["running_seconds"] for r in syncs],
                "async_running_seconds": [r["running_seconds"] for r in asyncs],
                "async_cleanup_seconds": [r["cleanup_seconds"] for r in asyncs],
            }
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return {
        "experiment": "compare",
        "host": options.as_dict(),
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
    """Least-squares slope (seconds per GiB) of each curve: how cost grows with the guest's secure memory."""
    if len(rows) < 2:
        return {}
    xs = [row["secure"] / GiB for row in rows]

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
        if not self.seconds > 0:
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
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), dpi=110)
    for ax, log in zip(axes, (False, True), strict=True):
        for key, style, color, label in curves:
            ax.plot(xs, [row[prefix + key] for row in rows], style, color=color, label=label)
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
        ax.set_xlim(0, max(xs) * 1.05)
        ax.set_xlabel("secure guest memory above 2 GiB, dirtied before the reboot")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel(("modelled " if clock_kind == "model" else "") + "time from the start of the reboot")
    host = result.get("host", {})
    flags = [f"async_destroy={host.get('async_destroy', 1)}"]
    flags.append("Destroy-Fast" if host.get("destroy_fast", True) else "no Destroy-Fast")
    flags.append("MISC" if host.get("feature_misc", True) else "no MISC")
    if clock_kind == "model":
        flags.append(f"modelled clock, costs: {host.get('costs', 'default')}")
    repeat = result.get("repeat", 1)
    fig.suptitle(
        f"pvfast compare: protected-guest reboot, sync vs async ({', '.join(flags)}"
        + (f"; median of {repeat}" if repeat > 1 else "")
        + ")"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)


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
