"""The ``pvfast`` command: inspect the emulated host, time protected-guest reboot and shutdown on
the wall clock and on the modelled clock, and calibrate the cost model.

Each subcommand runs one experiment of ``pvfast.experiments`` and prints a table, one JSON
document with ``--json`` or CSV rows with ``--csv`` (docs/OUTPUT.md explains every field and
column). ``-v``/``--log NAME`` shows pvfast's logs on stderr (the kvm-uv debug log is
``--log kvm_uv``). Exit status: 0 success, 1 the experiment failed (or its output could not be
written), 2 bad command line; when the reader of the output goes away (``pvfast info | head -1``)
the command stops quietly with status 141, as a command killed by SIGPIPE does in a shell.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import shlex
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Protocol, TextIO

from . import experiments, profiles
from ._version import __version__
from .constants import MAX_GUEST_MEMORY
from .costs import CostModel
from .errors import PvError
from .experiments import HostOptions, Measurement, format_size, format_size_exact, parse_size, quote_input
from .timeline import plot_memory
from .trace import Tracer

DEFAULT_PLOT = "pvfast-compare.png"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 130, 141
#: ``--log`` names: the loggers pvfast writes to (``kvm_uv``: the kernel's kvm-uv debug feature).
LOGGERS: Mapping[str, str] = {
    "kvm_uv": "pvfast.kvm_uv",
    "vmm": "pvfast.vmm",
    "host": "pvfast.host",
}


# ------------------------------------------------------------------------------------- argument types


def size_arg(text: str) -> int:
    """argparse ``type=``: a size with a binary K/M/G/T suffix."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def secure_arg(text: str) -> int:
    """argparse ``type=``: a size, or 0 (a guest that dirties nothing)."""
    try:
        return parse_size(text, allow_zero=True)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def size_list_arg(text: str) -> list[int]:
    """argparse ``type=``: comma-separated sizes (0 allowed), e.g. ``1G,2G,4G``; an empty item
    (``1G,,2G``, ``1G,``) is refused, not dropped."""
    items = text.split(",")
    if not any(item.strip() for item in items):
        raise argparse.ArgumentTypeError(f"invalid size list {quote_input(text)}: expected e.g. 1G,2G,4G")
    for number, item in enumerate(items, 1):
        if not item.strip():
            raise argparse.ArgumentTypeError(
                f"invalid size list {quote_input(text)}: item {number} of {len(items)} is empty "
                "(expected e.g. 1G,2G,4G)"
            )
    return [secure_arg(item) for item in items]


def path_arg(text: str) -> str:
    """argparse ``type=``: a file to write, checked before the run: not empty, not a directory, in
    a directory that exists, and one that can be opened for writing. The check opens it for
    append (which changes nothing in a file that exists) and removes it again if it did not exist;
    a device or pipe (``/dev/null``, ``/dev/stdout``) is taken as it is."""
    if not text:
        raise argparse.ArgumentTypeError("empty file name: give the path of the file to write")
    path = Path(text)
    if path.is_symlink() and not path.exists():  # a dangling link: the file made is its target
        path = path.resolve()
    parent = path.parent
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a directory")
    existed = path.exists()
    if existed and not path.is_file():
        return text
    try:
        with path.open("a", encoding="utf-8"):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {err.strerror or err}") from None
    if not existed:
        with suppress(OSError):
            path.unlink()
    return text


def log_arg(text: str) -> list[str]:
    """argparse ``type=``: comma-separated logger names (``LOGGERS``) or ``all``."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"invalid log name {text!r}: expected one of {', '.join(LOGGERS)} or all")
    for name in names:
        if name != "all" and name not in LOGGERS:
            raise argparse.ArgumentTypeError(f"invalid log name {name!r}: expected one of {', '.join(LOGGERS)} or all")
    return list(LOGGERS) if "all" in names else names


def memory_arg(text: str) -> int | None:
    """argparse ``type=``: ``auto`` (None) or a size."""
    return None if text.strip().lower() == "auto" else size_arg(text)


def async_destroy_arg(text: str) -> int:
    """argparse ``type=``: the async_destroy module parameter, 0 or 1."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected 0 or 1")
    return int(text)


def _int_arg(text: str, what: str, low: int, high: int, hint: str = "") -> int:
    """A whole number in [low, high] for argparse, errors naming ``what`` (long input shortened)."""
    shown = quote_input(text)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {what} {shown}: expected a whole number") from None
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"invalid {what} {shown}: expected {low}..{high}{hint}")
    return value


MAX_REPEAT = 10_000


def repeat_arg(text: str) -> int:
    """argparse ``type=``: a run count, 1..``MAX_REPEAT``."""
    return _int_arg(text, "repeat count", 1, MAX_REPEAT)


def walk_threads_arg(text: str) -> int:
    """argparse ``type=``: walk threads, 0..1024 (0: one per CPU)."""
    return _int_arg(text, "thread count", 0, 1024, " (0 = one per CPU)")


def costs_arg(text: str) -> CostModel:
    """argparse ``type=``: a TOML cost file."""
    try:
        return CostModel.from_toml(text)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read cost file {text!r}: {err.strerror or err}") from None
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"invalid cost file {text!r}: {err}") from None


def measurement_arg(text: str) -> Measurement:
    """argparse ``type=``: ``PHASE:SECURE[@MEMORY]=SECONDS`` (``Measurement.parse``), its guest
    at most the ``MAX_GUEST_MEMORY`` (64T) one VM can have."""
    try:
        measurement = Measurement.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    limit = format_size(MAX_GUEST_MEMORY)
    if measurement.memory is not None and measurement.memory > MAX_GUEST_MEMORY:
        raise argparse.ArgumentTypeError(
            f"invalid measurement {quote_input(text)}: its guest memory @{format_size_exact(measurement.memory)} "
            f"is more than the {limit} one VM can have"
        )
    memory = experiments.auto_memory(measurement.secure)
    if measurement.memory is None and memory > MAX_GUEST_MEMORY:
        hint = (
            f"give @MEMORY, at most {limit}" if measurement.secure <= MAX_GUEST_MEMORY else f"SECURE is at most {limit}"
        )
        raise argparse.ArgumentTypeError(
            f"invalid measurement {quote_input(text)}: its guest memory, SECURE + 3G = {format_size_exact(memory)}, "
            f"is more than the {limit} one VM can have ({hint})"
        )
    return measurement


def param_arg(text: str) -> str:
    """argparse ``type=``: the name of a cost parameter."""
    try:
        CostModel.default().get(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def vcpus_arg(text: str) -> int:
    """argparse ``type=``: a vCPU count, 1..248."""
    return _int_arg(text, "vCPU count", 1, 248)


# ------------------------------------------------------------------------------------- output helpers


def format_seconds(seconds: float) -> str:
    """A time for a table: ``1.23 s``, ``4.5 ms``, ``67 µs``; a negative one (a slope that falls)
    in the unit of its magnitude, ``-18.3 ms`` (one that rounds to zero is ``0 µs``)."""
    sign, magnitude = ("-" if seconds < 0 else ""), abs(seconds)
    if magnitude >= 1:
        return f"{sign}{magnitude:.2f} s"
    if magnitude >= 1e-3:
        return f"{sign}{magnitude * 1e3:.1f} ms"
    text = f"{magnitude * 1e6:.0f} µs"
    return text if text == "0 µs" else sign + text


def format_uvcs(uvcs: Mapping[str, int]) -> str:
    """UVC counts, the most frequent first: ``DESTR_SEC_STOR 16,384, ...`` (``none`` if empty)."""
    return ", ".join(f"{name} {count:,}" for name, count in sorted(uvcs.items(), key=lambda kv: -kv[1])) or "none"


def kernel_arg(text: str) -> str:
    """argparse type for ``--kernel``: the canonical profile name, or a usage error listing the valid ones."""
    try:
        return profiles.resolve(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err).removeprefix("kernel: ")) from None


def describe_host(host: Mapping[str, Any]) -> str:
    """One line for the ``host`` section of a result (``HostOptions.as_dict()``)."""
    text = (
        f"kernel {host.get('kernel', profiles.DEFAULT)}, async_destroy={host['async_destroy']}, "
        f"Destroy-Fast {'installed' if host['destroy_fast'] else 'not installed'}, "
        f"MISC {'on' if host['feature_misc'] else 'off'}"
    )
    if host.get("guest_memory", "real") != "real":
        text += f", guest memory: {host['guest_memory']}"
    if host.get("walk_threads"):
        text += f", {host['walk_threads']} walk threads"
    return text


def format_bytes(n: int) -> str:
    """A byte count for a table: ``0`` or a size (``264K``)."""
    return format_size(n) if n else "0"


def print_accounting(rows: list[dict[str, Any]], out: Stream, *, indent: str = "    ", phase: str = "") -> None:
    """Where the work landed: one line per thread (UVCs, host CPU time, modelled time)."""
    w = out.write
    if not rows:
        w(f"{indent}{phase + '  ' if phase else ''}(no UV work)\n")
        return
    for t in rows:
        who = f"{t['process']}/{t['thread']}"
        cpu = format_seconds(t["cpu_seconds"])
        if t["worker_cpu_seconds"]:
            cpu += f" ({format_seconds(t['worker_cpu_seconds'])} on pool workers)"
        lead = f"{indent}{phase + '  ' if phase else ''}"
        w(f"{lead}{who:<26} host CPU {cpu:<32} modelled {format_seconds(t['model_seconds'])}\n")
        w(f"{' ' * len(lead)}{'':<26} UVCs: {format_uvcs(t['uvcs'])}\n")


def print_memory_timeline(timeline: dict[str, Any] | None, out: Stream, *, what: str) -> None:
    """The marked samples of a memory timeline: both clocks, allocated, secure, held by."""
    if not timeline:
        return
    w = out.write
    w(f"\n  {what} over time (events; --json has every sample, --plot draws them):\n")
    w(f"    {'modelled':>10} {'wall':>10}  {'event':<28} {'allocated':>10} {'secure':>10}  held by\n")
    for s in timeline["events"]:
        held = ", ".join(s["held_by"]) or "-"
        if s["helpers_only"] and s["allocated_bytes"]:
            held += "  (only the helper: the VMM is gone)"
        w(
            f"    {format_seconds(s['model_seconds']):>10} {format_seconds(s['wall_seconds']):>10}  "
            f"{s['event']:<28} {format_bytes(s['allocated_bytes']):>10} {format_bytes(s['secure_bytes']):>10}  {held}\n"
        )


class Stream(Protocol):
    """What the command writes its table, progress and logs to: a text stream."""

    def write(self, text: str, /) -> int:
        """Write ``text``; returns its length."""
        ...

    def flush(self) -> None:
        """Push what was written to the file."""
        ...

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        ...


class GuardedStream:
    """A text stream whose failures end its output, not the run: a closed, full or broken
    stderr must not stop an experiment half-way (``None``: a closed stream, nothing is written)."""

    def __init__(self, stream: Stream | None) -> None:
        self.stream = stream
        self.failed = stream is None

    def write(self, text: str, /) -> int:
        """Write ``text`` unless the stream has failed (then drop it)."""
        if not self.failed and self.stream is not None:
            try:
                self.stream.write(text)
            except (OSError, ValueError):
                self.failed = True
        return len(text)

    def flush(self) -> None:
        """Flush unless the stream has failed."""
        if not self.failed and self.stream is not None:
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.failed = True

    def isatty(self) -> bool:
        """Whether the stream is a terminal (False once it has failed)."""
        try:
            return not self.failed and self.stream is not None and self.stream.isatty()
        except (OSError, ValueError):
            return False


class ProgressBar:
    """A one-line progress bar on a text stream, redrawn at most ~10 times a second."""

    WIDTH = 30

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self.clear = "\x1b[K" if stream.isatty() else ""  # erase the rest of the line on a terminal
        self.label: str | None = None
        self.last_draw = 0.0
        self._lock = threading.Lock()  # a log line from another thread ends the bar's line first

    def __call__(self, label: str, done: int, total: int, unit: str) -> None:
        with self._lock:
            now = time.monotonic()
            finished = done >= total
            if label != self.label:
                self._end_line()
                self.label = label
            elif not finished and now - self.last_draw < 0.1:
                return
            self.last_draw = now
            frac = min(1.0, done / total) if total else 1.0
            filled = int(frac * self.WIDTH)
            if unit == "bytes":
                amount = f"{format_size(done) if done else '0'}/{format_size(total)}"
            else:
                amount = f"{done:,}/{total:,} {unit}"
            bar = "#" * filled + "." * (self.WIDTH - filled)
            self.stream.write(f"\r[{bar}] {frac * 100:5.1f}% {amount} {label}{self.clear}")
            self.stream.flush()

    def _end_line(self) -> None:
        if self.label is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.label = None

    def close(self) -> None:
        """End the bar's line (the next call draws a new bar)."""
        with self._lock:
            self._end_line()


class LogHandler(logging.Handler):
    """pvfast's log records on the command's stderr, one line each (``kvm_uv: vm ...``), the
    progress bar's line ended first."""

    def __init__(self, stream: Stream, bar: ProgressBar | None) -> None:
        super().__init__(logging.DEBUG)
        self.stream = stream
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        """Write one record."""
        try:
            name = record.name.removeprefix("pvfast.")
            level = "" if record.levelno < logging.WARNING else f" {record.levelname.lower()}"
            line = f"{name}{level}: {record.getMessage()}\n"
            if self.bar is not None:
                self.bar.close()
            self.stream.write(line)  # Handler.handle holds the handler's lock
            self.stream.flush()
        except (TypeError, ValueError):  # a record whose arguments do not fit its format
            self.handleError(record)


@contextmanager
def logging_to(stream: Stream, names: Sequence[str], bar: ProgressBar | None) -> Iterator[None]:
    """While the ``with`` runs: pvfast's warnings, and the DEBUG lines of the loggers ``names``
    (keys of ``LOGGERS``), go to ``stream``; levels and handlers are put back after."""
    handler = LogHandler(stream, bar)
    top = logging.getLogger("pvfast")
    loggers = [logging.getLogger(LOGGERS[name]) for name in names]
    levels = [logger.level for logger in loggers]
    top.addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
        top.removeHandler(handler)


# ------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``pvfast`` argument parser (every subcommand and option)."""
    host = argparse.ArgumentParser(add_help=False)
    group = host.add_argument_group("emulated host (load-time settings)")
    group.add_argument(
        "--kernel",
        type=kernel_arg,
        default=profiles.DEFAULT,
        metavar="NAME",
        help=f"the kernel whose PV teardown code the host runs: {', '.join(profiles.PROFILES)} "
        f"(default {profiles.DEFAULT}; 'pvfast info --kernel NAME' lists its deltas)",
    )
    group.add_argument(
        "--async-destroy",
        type=async_destroy_arg,
        default=1,
        metavar="0|1",
        help="kvm module parameter async_destroy (default 1; 0 hides capability 224, so reboots are synchronous)",
    )
    group.add_argument(
        "--no-destroy-fast",
        dest="destroy_fast",
        action="store_false",
        help="the Ultravisor lacks the Destroy-Fast UVC (0x0102): teardown destroys the configuration the slow way",
    )
    group.add_argument(
        "--no-misc",
        dest="feature_misc",
        action="store_false",
        help="the Ultravisor lacks the MISC feature (export before import when two guests share the mm)",
    )

    model = argparse.ArgumentParser(add_help=False)
    mg = model.add_argument_group("emulation and modelled clock")
    mg.add_argument(
        "--guest-memory",
        choices=("real", "state"),
        default="real",
        help="how guest memory is backed: real (every touched page is host RAM, the default) or state "
        "(a page costs only its 4-byte state until it holds data: guests of many TiB fit in little RAM)",
    )
    mg.add_argument(
        "--walk-threads",
        type=walk_threads_arg,
        default=0,
        metavar="N",
        help="worker threads of the UV's walks (default 0: one per CPU); modelled times do not depend on it",
    )
    mg.add_argument(
        "--costs",
        type=costs_arg,
        default=None,
        metavar="FILE",
        help="TOML cost model for the modelled clock (default: the built-in table; see pvfast calibrate)",
    )

    clocks = argparse.ArgumentParser(add_help=False)
    clocks.add_argument(
        "--clock",
        choices=("wall", "model"),
        default="wall",
        help="which clock tables, plots and traces lead with: wall (measured here) or model "
        "(modelled hardware time from the cost model; the same on every machine)",
    )

    diagnostics = argparse.ArgumentParser(add_help=False)
    dg = diagnostics.add_argument_group("logs (on stderr)")
    dg.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="show every pvfast log at debug level: the kvm-uv debug log (each UV call of the PV code, "
        "as the kernel's KVM_UV_EVENT lines), QEMU's messages (vmm) and the host's",
    )
    dg.add_argument(
        "--log",
        type=log_arg,
        action="append",
        default=[],
        metavar="NAME",
        help=f"show one log at debug level: {', '.join(LOGGERS)} or all (repeatable, or comma-separated); "
        "kernel warnings are shown without it",
    )

    output = argparse.ArgumentParser(add_help=False)
    out = output.add_argument_group("output")
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    fmt.add_argument(
        "--csv",
        action="store_true",
        help="print CSV instead of the table: a header, then one row per run (docs/OUTPUT.md lists the columns)",
    )
    out.add_argument(
        "--trace",
        type=path_arg,
        metavar="FILE",
        help="write a Chrome/Perfetto trace (trace-event JSON) of the run: phases, PV commands, UVC counters",
    )
    out.add_argument(
        "--progress",
        action="store_true",
        help="draw progress bars on stderr even when it is not a terminal (they are on for a terminal)",
    )

    guest = argparse.ArgumentParser(add_help=False)
    g = guest.add_argument_group("guest")
    g.add_argument(
        "--memory",
        type=size_arg,
        default=parse_size("16G"),
        metavar="SIZE",
        help="guest memory, reserved but only touched where the guest touches it (default 16G)",
    )
    g.add_argument(
        "--secure",
        type=secure_arg,
        default=parse_size("2G"),
        metavar="SIZE",
        help="secure memory the guest dirties above 2G before the reboot/exit (default 2G; 0: nothing, "
        "only the boot image is secure); what does not fit above 2G goes below it; at most --memory",
    )
    g.add_argument(
        "--vcpus",
        type=vcpus_arg,
        default=experiments.DEFAULT_VCPUS,
        metavar="N",
        help=f"vCPUs of the guest (default {experiments.DEFAULT_VCPUS})",
    )
    g.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        help="run even if the guest's dirtied memory needs more RAM than the machine has available "
        "(MemAvailable in /proc/meminfo); without it such a run is refused before it starts",
    )

    parser = argparse.ArgumentParser(
        prog="pvfast",
        description=(
            "pvfast emulates the IBM Z Ultravisor and the Linux KVM s390 protected-VM teardown "
            "interface, including Linux 6.2 asynchronous destroy. These commands boot emulated "
            "protected guests the way QEMU does and measure how long reboot and shutdown take."
        ),
        epilog=(
            "sizes take binary suffixes K, M, G, T (8G = 8 GiB). examples:\n"
            "  pvfast info\n"
            "  pvfast info --kernel 6.2\n"
            "  pvfast reboot --memory 64G --secure 8G --async --repeat 5 --csv\n"
            "  pvfast shutdown --memory 16G --secure 4G\n"
            "  pvfast compare --secure 1G,2G,4G --plot compare.png\n"
            "  pvfast reboot --guest-memory state --memory 4T --secure 4T --async --clock model\n"
            "  pvfast calibrate --measure disable:8G=3.2\n"
            "  pvfast reboot --memory 4G --secure 1G --log kvm_uv    # the kvm-uv debug log on stderr\n"
            "run 'pvfast COMMAND --help' for the options of a command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"pvfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = sub.add_parser(
        "info",
        parents=[host],
        help="show the emulated host as a VMM sees it",
        description="Show the emulated host as a VMM sees it: KVM capabilities 180/217/224, the kvm "
        "module parameters and UV sysfs files, the Ultravisor's features and limits.",
    )
    info.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    info.set_defaults(run=cmd_info, command_parser=info)

    reboot = sub.add_parser(
        "reboot",
        parents=[host, model, guest, clocks, output, diagnostics],
        help="reboot a protected guest the way QEMU does and time it",
        description="Boot a protected guest, let it dirty --secure bytes above 2G, then reboot it as "
        "QEMU's s390_machine_unprotect does (PREPARE + an async_cleanup thread running "
        "PERFORM, or DISABLE) and boot it protected again. Reports the time until the guest "
        "runs again, when the old guest's memory was clean, the UVCs issued and the secure "
        "pages left, where the work landed (thread, host CPU time, modelled time) and the old "
        "guest's memory over time.",
    )
    reboot.add_argument(
        "--plot",
        type=path_arg,
        metavar="FILE.png",
        default=None,
        help="write a plot of the old guest's memory over time (with --repeat: of the median run)",
    )
    reboot.add_argument(
        "--repeat",
        type=repeat_arg,
        default=1,
        metavar="N",
        help="reboot N times, each on a fresh host, and report the median run with the spread "
        "(median, min, max) of every time (default 1)",
    )
    mode = reboot.add_mutually_exclusive_group()
    mode.add_argument(
        "--sync", dest="mode", action="store_const", const="sync", help="force KVM_PV_DISABLE (the synchronous reboot)"
    )
    mode.add_argument(
        "--async",
        dest="mode",
        action="store_const",
        const="async",
        help="the asynchronous reboot (PREPARE + PERFORM) where QEMU takes it: for a guest of 2G or "
        "less QEMU falls back to DISABLE, and the output says so; exit status 1 if the host cannot "
        "go asynchronous (capability 224 is 0, e.g. --async-destroy 0)",
    )
    reboot.set_defaults(mode="auto", run=cmd_reboot, command_parser=reboot)

    shutdown = sub.add_parser(
        "shutdown",
        parents=[host, model, guest, clocks, output, diagnostics],
        help="exit the VMM with and without QEMU's async-teardown helper",
        description="Boot a protected guest, let it dirty --secure bytes, then exit the VMM process, "
        "with and/or without the CLONE_VM helper of '-run-with async-teardown=on'. Reports "
        "where the teardown cost landed: the VMM's own exit or the helper's, and how long the "
        "dead guest's memory stayed allocated, and by which process.",
    )
    shutdown.add_argument(
        "--plot",
        type=path_arg,
        metavar="FILE.png",
        default=None,
        help="write a plot of the dead guest's memory over time (with --helper/--no-helper: that run; "
        "else the run with the helper)",
    )
    shutdown.add_argument(
        "--helper",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="only with (--helper) or only without (--no-helper) the helper; default: both",
    )
    shutdown.set_defaults(run=cmd_shutdown, command_parser=shutdown)

    compare = sub.add_parser(
        "compare",
        parents=[host, model, clocks, output, diagnostics],
        help="sync against async reboot over several sizes; table and plot",
        description="Reboot protected guests synchronously (DISABLE) and asynchronously (PREPARE + "
        "PERFORM) for each --secure size, print a table and write a PNG plot of the time "
        "until the guest runs again and of the background cleanup time.",
    )
    compare.add_argument(
        "--secure",
        type=size_list_arg,
        default=size_list_arg("1G,2G,4G"),
        metavar="LIST",
        help="comma-separated secure sizes (default 1G,2G,4G; 0 allowed)",
    )
    compare.add_argument(
        "--memory",
        type=memory_arg,
        default=None,
        metavar="auto|SIZE",
        help="guest memory; auto (default) = secure + 2G + 1G, reserved not touched",
    )
    compare.add_argument(
        "--vcpus",
        type=vcpus_arg,
        default=experiments.DEFAULT_VCPUS,
        metavar="N",
        help=f"vCPUs of each guest (default {experiments.DEFAULT_VCPUS})",
    )
    compare.add_argument(
        "--repeat",
        type=repeat_arg,
        default=1,
        metavar="N",
        help="run each reboot N times and report medians with their spread (min, max) (default 1)",
    )
    compare.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        help="run even if the largest guest needs more RAM than the machine has available (MemAvailable)",
    )
    compare.add_argument(
        "--plot",
        type=path_arg,
        metavar="FILE.png",
        default=DEFAULT_PLOT,
        help=f"where to write the plot (default {DEFAULT_PLOT})",
    )
    compare.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="do not write a plot")
    compare.set_defaults(run=cmd_compare, command_parser=compare)

    calibrate = sub.add_parser(
        "calibrate",
        parents=[host, diagnostics],
        help="fit the cost model to times you measured on real hardware",
        description="Fit cost parameters so that the modelled times of the phases you measured match "
        "your measurements, and print the cost model as TOML (for --costs). Each --measure is "
        "PHASE:SECURE[@MEMORY]=SECONDS: the phase of a guest with SECURE bytes of secure memory "
        "(MEMORY: guest size, default SECURE + 3G) took SECONDS (or ...ms). Phases: "
        + "; ".join(f"{k}: {v}" for k, v in experiments.PHASES.items())
        + ". The phases are emulated in state-only memory (the counts of work are the same), so a "
        "measurement of any size runs here.",
    )
    calibrate.add_argument(
        "--measure",
        type=measurement_arg,
        action="append",
        required=True,
        metavar="PHASE:SECURE=SECONDS",
        help="a measured phase, e.g. disable:8G=3.2 or perform:1T@1T=95s (repeatable)",
    )
    calibrate.add_argument(
        "--fit",
        type=param_arg,
        action="append",
        default=None,
        metavar="PARAM",
        help="a cost parameter to fit (repeatable; default: the one that dominates each measured phase: "
        + ", ".join(f"{k} -> {v}" for k, v in experiments.DEFAULT_FIT.items())
        + "). Parameters: uvc.NAME.fixed_ns, uvc.NAME.per_page_ns, pte_ns, zero_page_ns, fault_page_ns",
    )
    calibrate.add_argument(
        "--costs",
        type=costs_arg,
        default=None,
        metavar="FILE",
        help="cost model to start from (default: the built-in table); what is not fitted is kept",
    )
    calibrate.add_argument(
        "--output", "-o", type=path_arg, metavar="FILE", default=None, help="write the fitted TOML here"
    )
    calibrate.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    calibrate.add_argument(
        "--no-memory-check",
        dest="memory_check",
        action="store_false",
        help="run even if the largest measured guest's page states need more RAM than is available",
    )
    calibrate.set_defaults(run=cmd_calibrate, command_parser=calibrate)
    return parser


# ------------------------------------------------------------------------------------- commands


def host_options(args: argparse.Namespace) -> HostOptions:
    """The emulated host the command line asks for."""
    return HostOptions(
        async_destroy=args.async_destroy,
        destroy_fast=args.destroy_fast,
        feature_misc=args.feature_misc,
        guest_memory=getattr(args, "guest_memory", "real"),
        walk_threads=getattr(args, "walk_threads", 0),
        costs=getattr(args, "costs", None),
        kernel=args.kernel,
    )


def cmd_info(args: argparse.Namespace, out: Stream) -> int:
    """``pvfast info``: the emulated host as a VMM sees it (the table; main prints --json)."""
    info = experiments.host_info(host_options(args))
    if args.json:
        _dump_json(info, args, out)
        return 0
    w = out.write
    host = describe_host(host_options(args).as_dict())
    w(f"pvfast emulated host ({host}; native build: {info['build_profile']})\n\n")
    w("KVM_CHECK_EXTENSION\n")
    for name, cap in info["capabilities"].items():
        w(f"  {cap['cap']:>3}  KVM_CAP_{name:<34} {cap['value']}\n")
    w("\nkvm module parameters\n")
    for name, value in info["module_params"].items():
        w(f"  {name:<38} {value}\n")
    w("\nsysfs\n")
    for path, text in info["sysfs"].items():
        w(f"  {path:<50} {' '.join(text.split())}\n")
    uv = info["uv"]
    w("\nUltravisor\n")
    for key in ("destroy_fast", "feature_misc", "feature_aiv", "dump"):
        w(f"  {key:<38} {'yes' if uv[key] else 'no'}\n")
    for key, value in uv.items():
        if key in ("destroy_fast", "feature_misc", "feature_aiv", "dump"):
            continue
        if isinstance(value, list):
            shown = " ".join(f"{v:016x}" for v in value)
        elif key.endswith(("_addr", "indications")):
            shown = f"{value:#x}"
        elif key.endswith("_len"):
            shown = f"{value:,} bytes"
        else:
            shown = f"{value:,}" if isinstance(value, int) else str(value)
        w(f"  {key:<38} {shown}\n")
    kernel = info["kernel"]
    w(f"\nkernel profile {kernel['profile']}: {kernel['description']}\n")
    for delta in kernel["deltas"]:
        mark = "yes" if delta["present"] else "no "
        w(f"  {mark} {delta['delta']:<28} {delta['first']:<28} {delta['commit']}\n")
    return 0


def _guest_sizes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """The guest sizes of the command line, checked before the run: they fit together, no guest
    is larger than one VM can have (``MAX_GUEST_MEMORY``), and the machine has the RAM."""
    sizes = [(args.memory, args.secure)]
    if args.command == "compare":
        sizes = [(args.memory if args.memory is not None else experiments.auto_memory(s), s) for s in args.secure]
    limit = format_size(MAX_GUEST_MEMORY)
    for memory, secure in sizes:
        if memory > MAX_GUEST_MEMORY:
            if args.memory is not None:
                parser.error(f"--memory {format_size_exact(memory)} is more than the {limit} one VM can have")
            hint = f"--memory {limit} or a smaller --secure" if secure <= MAX_GUEST_MEMORY else "a smaller --secure"
            parser.error(
                f"--memory auto for --secure {format_size_exact(secure)} is secure + 3G = {format_size_exact(memory)}, "
                f"more than the {limit} one VM can have: give {hint}"
            )
        try:
            experiments.check_sizes(memory, secure)
        except ValueError as err:
            parser.error(str(err))
    if not args.memory_check:
        return
    mode = args.guest_memory
    secure = max(s for _, s in sizes)
    need, have = experiments.ram_needed(secure, mode), experiments.mem_available()
    if have is None or need <= have:
        return
    hint = (
        f"--guest-memory state (a dirtied page then costs its 4-byte state word: about "
        f"{format_size(experiments.ram_needed(secure, 'state'))} in all), a smaller --secure"
        if mode == "real"
        else "a smaller --secure"
    )
    parser.error(
        f"--secure {format_size_exact(secure)} needs about {format_size(need)} of RAM with --guest-memory {mode} "
        f"({'every page the guest dirties is a page of host RAM' if mode == 'real' else '4 bytes per dirtied page'}), "
        f"and this machine has {format_size(have)} available (MemAvailable in /proc/meminfo): use {hint}, "
        "or --no-memory-check to run it anyway"
    )


def _calibrate_ram(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """calibrate emulates each measured phase in state-only memory: refuse, before anything runs,
    a measurement whose page states alone need more RAM than the machine has available."""
    if not args.memory_check:
        return
    largest = max(args.measure, key=lambda m: m.secure)
    need, have = experiments.ram_needed(largest.secure, "state"), experiments.mem_available()
    if have is None or need <= have:
        return
    parser.error(
        f"--measure {largest.label}: a guest with {format_size_exact(largest.secure)} secure needs about "
        f"{format_size(need)} of RAM for its page states (4 bytes per secure page), and this machine has "
        f"{format_size(have)} available (MemAvailable in /proc/meminfo): measure a smaller guest, or "
        "--no-memory-check to run it anyway"
    )


def _times(r: dict[str, Any], key: str, clock: str) -> str:
    """A time of a result on the leading clock, the other beside it."""
    wall, model = r[key], r["model"][key]
    if clock == "model":
        return f"{format_seconds(model):>10}   (wall {format_seconds(wall)})"
    return f"{format_seconds(wall):>10}   (modelled {format_seconds(model)})"


def print_reboot(r: dict[str, Any], out: Stream, *, clock: str = "wall") -> None:
    """The table of one reboot result (``experiments.reboot``)."""
    w = out.write
    how = (
        "asynchronous: KVM_PV_ASYNC_CLEANUP_PREPARE, then PERFORM in the async_cleanup thread"
        if r["mode"] == "async"
        else "synchronous: KVM_PV_DISABLE"
    )
    w(
        f"reboot of a {format_size_exact(r['memory'])} protected guest with {format_size_exact(r['secure'])} of "
        f"secure memory, {r['vcpus']} vCPUs\n"
    )
    w(f"  reboot path             {how}\n")
    if r.get("fallback"):
        text = f"QEMU's fallback from the asynchronous reboot: {r['fallback']}"
        w("".join(f"{'':26}{line}\n" for line in textwrap.wrap(text, 74)))
    w(f"  host                    {describe_host(r['host'])}\n")
    w(f"  clock                   {_clock_line(r, clock)}\n")
    w(f"  boot + guest dirtying   {format_seconds(r['boot_seconds'])} (setup, not part of the reboot)\n\n")
    w("  from the start of the reboot:\n")
    w(f"    unprotect returned              {_times(r, 'unprotect_seconds', clock)}\n")
    w(f"    guest running again             {_times(r, 'running_seconds', clock)}\n")
    lead = r["model"] if clock == "model" else r
    w(
        f"      of which image load {format_seconds(lead['load_seconds'])}, "
        f"ENABLE..VERIFY {format_seconds(lead['protect_seconds'])}\n"
    )
    done = "async_cleanup thread finished" if r["mode"] == "async" else "DISABLE returned"
    w(f"    old guest's memory clean        {_times(r, 'cleanup_seconds', clock)}   ({done})\n\n")
    w(f"  secure pages of the old guest     {r['secure_pages_before']:,} before, {r['secure_pages_left']:,} left\n")
    w(f"  secure pages now (new guest)      {r['secure_pages_now']:,}\n")
    w(f"  UVCs in unprotect                 {format_uvcs(r['uvcs_unprotect'])}\n")
    w(f"  UVCs in the whole reboot          {format_uvcs(r['uvcs'])}\n")
    w("\n  where the work landed (per emulated thread):\n")
    print_accounting(r["accounting"]["teardown"], out, phase="teardown ")
    print_accounting(r["accounting"]["boot_new_guest"], out, phase="new guest")
    print_memory_timeline(r.get("memory_timeline"), out, what="the old guest's memory")
    w(f"\n  peak RSS of this process          {format_size(r['peak_rss_bytes'])}\n")
    if r.get("perform") and "error" in r["perform"]:
        w(f"  PERFORM failed                    {r['perform']['error']}\n")
    if r.get("error"):
        w(f"  error: {r['error']}\n")


def _clock_line(r: dict[str, Any], clock: str) -> str:
    costs = r["model"]["costs"]
    if clock == "model":
        return f"modelled (cost model: {costs}), wall time beside"
    return f"wall, modelled time beside (cost model: {costs})"


def print_reboot_summary(doc: dict[str, Any], out: Stream, *, clock: str = "wall") -> None:
    """The spread of a repeated reboot (``experiments.reboot_repeated``): per time the median,
    minimum and maximum over the runs, on both clocks."""
    w = out.write
    n = doc["repeat"]
    w(f"\nover {n} reboots, each on a fresh host (median [min - max]):\n")
    labels = {
        "unprotect_seconds": "unprotect returned",
        "running_seconds": "guest running again",
        "cleanup_seconds": "old guest's memory clean",
    }
    lead, other = ("model", "wall") if clock == "model" else ("wall", "model")
    for key, label in labels.items():
        a, b = doc["summary"][lead][key], doc["summary"][other][key]
        w(
            f"    {label:<28} {format_seconds(a['median']):>10} [{format_seconds(a['min'])} - "
            f"{format_seconds(a['max'])}]   ({'modelled' if other == 'model' else 'wall'} "
            f"{format_seconds(b['median'])} [{format_seconds(b['min'])} - {format_seconds(b['max'])}])\n"
        )
    modes = sorted({r["mode"] for r in doc["runs"]})
    w(f"    reboot path taken            {', '.join(modes)} in {n} of {n} runs\n" if len(modes) == 1 else "")
    if len(modes) > 1:
        counts = {m: sum(r["mode"] == m for r in doc["runs"]) for m in modes}
        w(f"    reboot path taken            {', '.join(f'{m} {c}x' for m, c in counts.items())}\n")


def print_shutdown(results: list[dict[str, Any]], out: Stream, *, clock: str = "wall") -> None:
    """The table of the shutdown results (``experiments.shutdown``; one or both variants)."""
    w = out.write
    first = results[0]
    w(
        f"VMM exit with a running {format_size_exact(first['memory'])} protected guest, "
        f"{format_size_exact(first['secure'])} secure memory, {first['vcpus']} vCPUs\n"
    )
    w(f"  host: {describe_host(first['host'])}\n")
    w(f"  clock: {_clock_line(first, clock)}\n\n")
    for r in results:
        w(
            f"{'with' if r['helper'] else 'without'} the CLONE_VM helper (-run-with async-teardown="
            f"{'on' if r['helper'] else 'off'}):\n"
        )
        phases = [("vmm_exit", "VMM (qemu) exit")] + ([("helper_exit", "helper exit")] if r["helper"] else [])
        key = "model_seconds" if clock == "model" else "seconds"
        total = sum(r[k][key] for k, _ in phases)
        for phase_key, label in phases:
            p = r[phase_key]
            share = p[key] / total * 100 if total else 100.0
            other = (
                f"wall {format_seconds(p['seconds'])}"
                if clock == "model"
                else f"modelled {format_seconds(p['model_seconds'])}"
            )
            w(
                f"  {label:<18} {format_seconds(p[key]):>10}  {share:5.1f}% of the teardown ({other})   "
                f"secure pages left {p['secure_pages_after']:,}\n"
            )
            w(f"  {'':<18} UVCs: {format_uvcs(p['uvcs'])}\n")
            print_accounting(p["accounting"], out, indent=f"  {'':<18} ")
        w(
            f"  {'total':<18} {format_seconds(total):>10}   "
            f"left over: {r['secure_pages_left']:,} secure pages, {r['configs_left']} configurations, "
            f"{r['leaked']} leaked\n"
        )
        if r["helper"]:
            w(
                f"  the dead guest's memory stays allocated, held only by the helper, for "
                f"{format_seconds(r['model']['held_after_vmm_exit_seconds'])} (modelled) / "
                f"{format_seconds(r['helper_exit']['seconds'])} (wall) after the VMM is gone\n"
            )
        print_memory_timeline(r.get("memory_timeline"), out, what="the dead guest's memory")
        w("\n")
    if len(results) == 2:
        without, with_ = (results[0], results[1]) if not results[0]["helper"] else (results[1], results[0])
        key = "model_seconds" if clock == "model" else "seconds"
        a, b = without["vmm_exit"][key], with_["vmm_exit"][key]
        w(
            f"the VMM's own exit took {format_seconds(b)} with the helper and {format_seconds(a)} without "
            f"({a / b if b else float('inf'):.1f}x)\n"
        )


def print_compare(result: dict[str, Any], out: Stream, *, clock: str = "wall") -> None:
    """The table of a compare result (``experiments.compare``)."""
    w = out.write
    repeat = result.get("repeat", 1)
    p = "model_" if clock == "model" else ""
    w(
        f"protected-guest reboot, sync (DISABLE) vs async (PREPARE + PERFORM); host: "
        f"{describe_host(result['host'])}; {result['vcpus']} vCPUs"
        f"{f'; medians of {repeat} runs' if repeat > 1 else ''}\n"
    )
    w(f"times on the modelled clock (cost model: {result['host']['costs']})\n\n" if clock == "model" else "\n")
    head = (
        f"{'secure':>7} {'memory':>7}  {'sync: running':>14}  {'async: running':>15}  "
        f"{'async: cleanup':>15}  {'sync/async':>10}\n"
    )
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for row in result["rows"]:
        ratio_value = row[p + "ratio"]
        ratio = f"{ratio_value:.0f}x" if ratio_value is not None else "-"
        note = "" if row["async_mode"] == "async" else "  (QEMU's fallback: went sync)"
        w(
            f"{format_size_exact(row['secure']):>7} {format_size_exact(row['memory']):>7}  "
            f"{format_seconds(row[p + 'sync_running_seconds']):>14}  "
            f"{format_seconds(row[p + 'async_running_seconds']):>15}  "
            f"{format_seconds(row[p + 'async_cleanup_seconds']):>15}  {ratio:>10}{note}\n"
        )
    if repeat > 1:
        w(f"\nspread over the {repeat} runs of each (min - max):\n")
        for row in result["rows"]:
            cells = []
            for key in ("sync_running_seconds", "async_running_seconds", "async_cleanup_seconds"):
                lo, hi = row["spread"][p + key]["min"], row["spread"][p + key]["max"]
                cells.append(f"{format_seconds(lo)} - {format_seconds(hi)}")
            w(
                f"{format_size_exact(row['secure']):>7} {format_size_exact(row['memory']):>7}  "
                + "   ".join(cells)
                + "\n"
            )
    fallback = next((row["fallback"] for row in result["rows"] if row.get("fallback")), None)
    if fallback:
        w("\n" + textwrap.fill(f"QEMU's fallback: {fallback}", 100) + "\n")
    growth = result.get(p + "seconds_per_gib")
    if growth:
        w("\ngrowth with secure memory (least-squares slope):\n")
        if growth["sync_running"] is None:
            w("  not computed: a slope needs at least two different secure sizes (every --secure item is the same)\n")
        else:
            w(f"  sync time until running     {format_seconds(growth['sync_running'])} per GiB\n")
            w(f"  async time until running    {format_seconds(growth['async_running'])} per GiB\n")
            w(f"  async background cleanup    {format_seconds(growth['async_cleanup'])} per GiB\n")
    if result.get("plot"):
        w(f"\nplot written to {result['plot']}\n")


def print_calibrate(report: dict[str, Any], out: Stream) -> None:
    """The table of a calibration report (``experiments.calibrate``)."""
    w = out.write
    w(f"cost model fitted to {len(report['measurements'])} measurement(s), starting from {report['base']}\n\n")
    for param, value in report["fitted"].items():
        w(f"  {param:<36} {report['defaults'][param]:>12,.3f} ns  ->  {value:>14,.3f} ns\n")
    w("\n  measurement                     measured    modelled before    modelled after\n")
    for m in report["measurements"]:
        w(
            f"  {m['measurement']:<28} {format_seconds(m['measured_seconds']):>11} "
            f"{format_seconds(m['model_seconds_before']):>18} {format_seconds(m['model_seconds_after']):>17}\n"
        )
    if report.get("output"):
        w(f"\nfitted cost model written to {report['output']} (use it with --costs)\n")


# ------------------------------------------------------------------------------------- CSV


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={v}" for k, v in value.items())
    return value


def _common_row(r: Mapping[str, Any]) -> dict[str, Any]:
    meta, host = r.get("pvfast", {}), r["host"]
    return {
        "experiment": r["experiment"],
        "pvfast_version": meta.get("version"),
        "build_profile": meta.get("build_profile"),
        "kernel": meta.get("kernel"),
        "async_destroy": host["async_destroy"],
        "destroy_fast": host["destroy_fast"],
        "feature_misc": host["feature_misc"],
        "guest_memory": host["guest_memory"],
        "walk_threads": host["walk_threads"],
        "costs": host["costs"],
        "vcpus": r["vcpus"],
    }


def reboot_error(r: Mapping[str, Any]) -> str | None:
    """Why a reboot result failed: its ``error``, else its PERFORM's (None: it did not fail)."""
    error: str | None = r.get("error") or (r.get("perform") or {}).get("error")
    return error


def reboot_row(r: Mapping[str, Any], run: int = 1) -> dict[str, Any]:
    """One CSV row of a reboot result (``CSV_COLUMNS["reboot"]``)."""
    perform = r.get("perform") or {}
    return {
        **_common_row(r),
        "run": run,
        "memory": r["memory"],
        "secure": r["secure"],
        "mode_requested": r["mode_requested"],
        "mode": r["mode"],
        "fallback": r.get("fallback"),
        "boot_seconds": r["boot_seconds"],
        **{key: r[key] for key in experiments.REBOOT_TIMES},
        **{f"model_{key}": r["model"][key] for key in experiments.REBOOT_TIMES},
        "secure_pages_before": r["secure_pages_before"],
        "secure_pages_left": r["secure_pages_left"],
        "secure_pages_now": r["secure_pages_now"],
        "uvcs_unprotect": r["uvcs_unprotect"],
        "uvcs": r["uvcs"],
        "perform_rc": perform.get("rc"),
        "perform_rrc": perform.get("rrc"),
        "peak_rss_bytes": r["peak_rss_bytes"],
        "error": reboot_error(r),
    }


def shutdown_row(r: Mapping[str, Any]) -> dict[str, Any]:
    """One CSV row of a shutdown result (``CSV_COLUMNS["shutdown"]``)."""
    helper = r.get("helper_exit") or {}
    return {
        **_common_row(r),
        "memory": r["memory"],
        "secure": r["secure"],
        "helper": r["helper"],
        "boot_seconds": r["boot_seconds"],
        "vmm_exit_seconds": r["vmm_exit"]["seconds"],
        "vmm_exit_wall_seconds": r["vmm_exit"]["wall_seconds"],
        "model_vmm_exit_seconds": r["model"]["vmm_exit_seconds"],
        "helper_exit_seconds": helper.get("seconds"),
        "helper_exit_wall_seconds": helper.get("wall_seconds"),
        "model_helper_exit_seconds": r["model"]["helper_exit_seconds"] if r["helper"] else None,
        "total_seconds": r["total_seconds"],
        "model_total_seconds": r["model"]["total_seconds"],
        "vmm_share": r["vmm_share"],
        "model_held_after_vmm_exit_seconds": r["model"]["held_after_vmm_exit_seconds"],
        "secure_pages_before": r["secure_pages_before"],
        "secure_pages_left": r["secure_pages_left"],
        "configs_left": r["configs_left"],
        "leaked": r["leaked"],
        "vmm_exit_uvcs": r["vmm_exit"]["uvcs"],
        "helper_exit_uvcs": helper.get("uvcs"),
        "peak_rss_bytes": r["peak_rss_bytes"],
    }


_COMPARE_TIMES = (
    "sync_running_seconds",
    "async_running_seconds",
    "async_cleanup_seconds",
    "model_sync_running_seconds",
    "model_async_running_seconds",
    "model_async_cleanup_seconds",
)


def compare_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The CSV rows of a compare result, one per secure size (``CSV_COLUMNS["compare"]``)."""
    rows = []
    for row in result["rows"]:
        times: dict[str, Any] = {}
        for key in _COMPARE_TIMES:
            times[key] = row[key]
            times[f"{key}_min"] = row["spread"][key]["min"]
            times[f"{key}_max"] = row["spread"][key]["max"]
        rows.append(
            {
                **_common_row(result),
                "memory": row["memory"],
                "secure": row["secure"],
                "repeat": row["repeat"],
                "async_mode": row["async_mode"],
                "fallback": row.get("fallback"),
                **times,
                "ratio": row["ratio"],
                "model_ratio": row["model_ratio"],
            }
        )
    return rows


_COMMON_COLUMNS = list(
    _common_row({"experiment": "", "host": dict.fromkeys(HostOptions().as_dict()), "vcpus": 0}).keys()
)
#: The CSV columns of each command, in order: the same whatever the options (an empty cell
#: where a value does not apply). docs/OUTPUT.md explains each.
CSV_COLUMNS: Mapping[str, list[str]] = {
    "reboot": [
        *_COMMON_COLUMNS,
        "run",
        "memory",
        "secure",
        "mode_requested",
        "mode",
        "fallback",
        "boot_seconds",
        *experiments.REBOOT_TIMES,
        *(f"model_{key}" for key in experiments.REBOOT_TIMES),
        "secure_pages_before",
        "secure_pages_left",
        "secure_pages_now",
        "uvcs_unprotect",
        "uvcs",
        "perform_rc",
        "perform_rrc",
        "peak_rss_bytes",
        "error",
    ],
    "shutdown": [
        *_COMMON_COLUMNS,
        "memory",
        "secure",
        "helper",
        "boot_seconds",
        "vmm_exit_seconds",
        "vmm_exit_wall_seconds",
        "model_vmm_exit_seconds",
        "helper_exit_seconds",
        "helper_exit_wall_seconds",
        "model_helper_exit_seconds",
        "total_seconds",
        "model_total_seconds",
        "vmm_share",
        "model_held_after_vmm_exit_seconds",
        "secure_pages_before",
        "secure_pages_left",
        "configs_left",
        "leaked",
        "vmm_exit_uvcs",
        "helper_exit_uvcs",
        "peak_rss_bytes",
    ],
    "compare": [
        *_COMMON_COLUMNS,
        "memory",
        "secure",
        "repeat",
        "async_mode",
        "fallback",
        *(f"{key}{end}" for key in _COMPARE_TIMES for end in ("", "_min", "_max")),
        "ratio",
        "model_ratio",
    ],
}


def write_csv(command: str, rows: Sequence[Mapping[str, Any]], out: Stream) -> None:
    """The header of ``command``'s columns, then ``rows`` (each exactly those columns)."""
    columns = CSV_COLUMNS[command]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        if list(row) != columns:
            raise AssertionError(f"CSV row of {command} does not match its columns: {sorted(set(row) ^ set(columns))}")
        writer.writerow([_csv_value(row[c]) for c in columns])


# ------------------------------------------------------------------------------------- running


class Session:
    """What every measuring command shares: progress bar, optional tracer, logs, output."""

    def __init__(self, args: argparse.Namespace, err: Stream) -> None:
        show = getattr(args, "progress", False) or (err.isatty() and not args.json and not getattr(args, "csv", False))
        self.bar = ProgressBar(err) if show else None
        self.tracer = Tracer(clock=getattr(args, "clock", "wall")) if getattr(args, "trace", None) else None
        self.trace_path: str | None = getattr(args, "trace", None)
        names = list(LOGGERS) if getattr(args, "verbose", False) else []
        for group in getattr(args, "log", None) or []:
            names += [name for name in group if name not in names]
        self.log_names = names
        self.closed = False

    def label(self, text: str) -> Any:
        """Tracks of threads first seen inside the ``with`` carry ``text`` (see ``Tracer.labelled``)."""
        return experiments.labelled(self.tracer, text)

    def close(self) -> None:
        """End the progress bar and write the trace (once)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.tracer is not None and self.trace_path:
            self.tracer.write(self.trace_path)


def _plot_title(what: str, result: Mapping[str, Any]) -> str:
    return f"{what}\n{experiments.provenance_line(result)}"


def cmd_reboot(args: argparse.Namespace, out: Stream, session: Session) -> int:
    """``pvfast reboot``: one reboot, or ``--repeat N`` of them."""
    kw: dict[str, Any] = {
        "mode": args.mode,
        "options": host_options(args),
        "vcpus": args.vcpus,
        "progress": session.bar,
        "tracer": session.tracer,
    }
    if args.repeat > 1:
        doc = experiments.reboot_repeated(args.memory, args.secure, repeat=args.repeat, **kw)
        runs = doc["runs"]
        shown = runs[doc["median_run"]]
    else:
        doc = shown = experiments.reboot(args.memory, args.secure, **kw)
        runs = [doc]
    session.close()
    if args.plot:
        what = f"the median run of {args.repeat}" if args.repeat > 1 else "the old guest's memory"
        plot_memory(
            shown["memory_timeline"],
            args.plot,
            clock_kind=args.clock,
            title=_plot_title(
                f"{experiments.reboot_name(shown)}: {what}" + (", the old guest's memory" if args.repeat > 1 else ""),
                shown,
            ),
        )
        doc["plot"] = args.plot
    if args.json:
        _dump_json(doc, args, out)
    elif args.csv:
        write_csv("reboot", [reboot_row(r, i + 1) for i, r in enumerate(runs)], out)
    else:
        if args.repeat > 1:
            out.write(f"the median run of {args.repeat} (by the time until the guest runs again):\n\n")
        print_reboot(shown, out, clock=args.clock)
        if args.repeat > 1:
            print_reboot_summary(doc, out, clock=args.clock)
            for i, r in enumerate(runs):
                if r is not shown and (error := reboot_error(r)):
                    out.write(f"  run {i + 1}: error: {error}\n")
        if args.plot:
            out.write(f"\nplot written to {args.plot}\n")
    failed = any(reboot_error(r) for r in runs)
    return EXIT_FAILED if failed else EXIT_OK


def cmd_shutdown(args: argparse.Namespace, out: Stream, session: Session) -> int:
    """``pvfast shutdown``: the VMM's exit with and/or without the CLONE_VM helper."""
    variants = [False, True] if args.helper is None else [args.helper]
    results = []
    for helper in variants:
        with session.label("with the helper" if helper else "without a helper"):
            results.append(
                experiments.shutdown(
                    args.memory,
                    args.secure,
                    helper=helper,
                    options=host_options(args),
                    vcpus=args.vcpus,
                    progress=session.bar,
                    tracer=session.tracer,
                )
            )
    session.close()
    if args.plot:
        shown = next((r for r in results if r["helper"]), results[0])
        plot_memory(
            shown["memory_timeline"],
            args.plot,
            clock_kind=args.clock,
            title=_plot_title(
                f"VMM exit {'with' if shown['helper'] else 'without'} the CLONE_VM helper, "
                f"{format_size_exact(args.memory)} guest, {format_size_exact(args.secure)} secure: "
                "the dead guest's memory",
                shown,
            ),
        )
    if args.json:
        first = results[0]
        doc = (
            first
            if len(results) == 1
            else {
                "experiment": "shutdown",
                "pvfast": first["pvfast"],
                "machine": first["machine"],
                "host": first["host"],
                "runs": results,
            }
        )
        _dump_json(doc, args, out)
    elif args.csv:
        write_csv("shutdown", [shutdown_row(r) for r in results], out)
    else:
        print_shutdown(results, out, clock=args.clock)
        if args.plot:
            out.write(f"plot written to {args.plot}\n")
    return EXIT_OK


def cmd_compare(args: argparse.Namespace, out: Stream, session: Session) -> int:
    """``pvfast compare``: sync against async reboot for each secure size."""
    start = time.perf_counter()
    result = experiments.compare(
        args.secure,
        memory=args.memory,
        options=host_options(args),
        vcpus=args.vcpus,
        repeat=args.repeat,
        progress=session.bar,
        tracer=session.tracer,
    )
    session.close()
    result["plot"] = args.plot
    if args.plot:
        experiments.plot_compare(result, args.plot, clock_kind=args.clock)
    result["wall_seconds"] = time.perf_counter() - start
    if args.json:
        _dump_json(result, args, out)
    elif args.csv:
        write_csv("compare", compare_rows(result), out)
    else:
        print_compare(result, out, clock=args.clock)
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace, out: Stream, session: Session) -> int:
    """``pvfast calibrate``: fit cost parameters to measured phases."""
    options = HostOptions(
        async_destroy=args.async_destroy,
        destroy_fast=args.destroy_fast,
        feature_misc=args.feature_misc,
        guest_memory="state",
    )
    fitted, report = experiments.calibrate(args.measure, params=args.fit, base=args.costs, options=options)
    session.close()
    notes = {p: f"fitted by pvfast calibrate to {', '.join(m.label for m in args.measure)}" for p in fitted.values}
    toml = fitted.model.to_toml(comments=notes)
    report["toml"] = toml
    if args.output:
        Path(args.output).write_text(toml, encoding="utf-8")
        report["output"] = args.output
    if args.json:
        _dump_json(report, args, out)
    else:
        print_calibrate(report, out)
        if not args.output:
            out.write("\n" + toml)
    return EXIT_OK


def _dump_json(doc: dict[str, Any], args: argparse.Namespace, out: Stream) -> None:
    """``doc`` as the command's JSON document, with the command line that made it (``command``)."""
    doc = {"experiment": doc.get("experiment"), "command": args.command_line, **doc}
    json.dump(doc, out, indent=2)
    out.write("\n")


def _silence(stream: object) -> None:
    """Point the file descriptor under ``stream`` at /dev/null, so that what is still buffered
    for a reader that went away (or a full disk) is dropped at exit instead of raising again."""
    try:
        fd = stream.fileno()  # type: ignore[attr-defined]
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):
        return
    try:
        os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        os.close(devnull)


def _deliver(text: str, out: Stream, err: Stream, command: str) -> int:
    """Write the command's whole output; a reader that went away ends it quietly (141), any other
    write error (a full disk) is reported (1)."""
    try:
        out.write(text)
        out.flush()
    except BrokenPipeError:
        _silence(out)
        return EXIT_BROKEN_PIPE
    except (OSError, ValueError) as error:  # ValueError: the stream was closed
        _silence(out)
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        err.write(f"{' '.join(('pvfast', command)).strip()}: error: cannot write the output: {reason}\n")
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run the ``pvfast`` command line ``argv`` (default ``sys.argv[1:]``); returns the exit
    status. A bad command line exits through ``SystemExit(2)`` (``--help``: 0), as argparse does.
    ``out``/``err`` default to ``sys.stdout``/``sys.stderr``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stdout: Stream | None = out if out is not None else sys.stdout  # None: stdout closed (>&-)
    errors = GuardedStream(err if err is not None else sys.stderr)
    parser = build_parser()
    printed, capture = sys.stdout, io.StringIO()
    sys.stdout = capture  # what argparse prints (--help, --version) is written below, like the rest
    try:
        args = parser.parse_args(argv)
    except SystemExit:  # --help, --version (0) or a usage error (2, already on stderr)
        text = capture.getvalue()
        if text and stdout is None:
            errors.write("pvfast: error: standard output is closed: there is nowhere to write the help\n")
            return EXIT_FAILED
        delivered = _deliver(text, stdout, errors, "") if text and stdout is not None else EXIT_OK
        if delivered != EXIT_OK:
            return delivered
        raise
    finally:
        sys.stdout = printed
    args.command_line = shlex.join(["pvfast", *argv])
    command = args.command
    if stdout is None:
        errors.write(f"pvfast {command}: error: standard output is closed: there is nowhere to write the result\n")
        return EXIT_FAILED
    if command == "info":
        buffer = io.StringIO()
        code = int(args.run(args, buffer))
        delivered = _deliver(buffer.getvalue(), stdout, errors, command)
        return delivered if delivered != EXIT_OK else code
    if command == "calibrate":
        args.progress, args.trace, args.csv = False, None, False
        _calibrate_ram(args, args.command_parser)
    else:
        _guest_sizes(args, args.command_parser)
    session = Session(args, errors)
    buffer = io.StringIO()
    try:
        with logging_to(errors, session.log_names, session.bar):
            code = int(args.run(args, buffer, session))
    except (PvError, ValueError, OSError) as error:
        session.close()
        errors.write(f"pvfast {command}: error: {error}\n")
        return EXIT_FAILED
    except KeyboardInterrupt:
        session.close()
        errors.write("pvfast: interrupted\n")
        return EXIT_INTERRUPTED
    delivered = _deliver(buffer.getvalue(), stdout, errors, command)
    return delivered if delivered != EXIT_OK else code
