"""The ``pvfast`` command: inspect the emulated host, time protected-guest reboot and shutdown on
the wall clock and on the modelled clock, and calibrate the cost model.

Each subcommand runs one experiment of ``pvfast.experiments`` and prints a table, or one JSON
document with ``--json``. Exit status: 0 success, 1 the experiment failed, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from . import experiments, profiles
from ._version import __version__
from .costs import CostModel
from .errors import PvError
from .experiments import HostOptions, Measurement, format_size, parse_size
from .timeline import plot_memory
from .trace import Tracer

DEFAULT_PLOT = "pvfast-compare.png"


# ------------------------------------------------------------------------------------- argument types


def size_arg(text: str) -> int:
    """argparse ``type=``: a size with a binary K/M/G/T suffix."""
    try:
        return parse_size(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def size_list_arg(text: str) -> list[int]:
    """argparse ``type=``: comma-separated sizes, e.g. ``1G,2G,4G``."""
    items = [item for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"invalid size list {text!r}: expected e.g. 1G,2G,4G")
    return [size_arg(item) for item in items]


def memory_arg(text: str) -> int | None:
    """argparse ``type=``: ``auto`` (None) or a size."""
    return None if text.strip().lower() == "auto" else size_arg(text)


def async_destroy_arg(text: str) -> int:
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected 0 or 1")
    return int(text)


def repeat_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid repeat count {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid repeat count {value}: must be at least 1")
    return value


def walk_threads_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid thread count {text!r}") from None
    if not 0 <= value <= 1024:
        raise argparse.ArgumentTypeError(f"invalid thread count {value}: expected 0..1024 (0 = one per CPU)")
    return value


def costs_arg(text: str) -> CostModel:
    """argparse ``type=``: a TOML cost file."""
    try:
        return CostModel.from_toml(text)
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot read cost file {text!r}: {err.strerror or err}") from None
    except (ValueError, TypeError) as err:
        raise argparse.ArgumentTypeError(f"invalid cost file {text!r}: {err}") from None


def measurement_arg(text: str) -> Measurement:
    try:
        return Measurement.parse(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def param_arg(text: str) -> str:
    try:
        CostModel.default().get(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def vcpus_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid vCPU count {text!r}") from None
    if not 1 <= value <= 248:
        raise argparse.ArgumentTypeError(f"invalid vCPU count {value}: expected 1..248")
    return value


# ------------------------------------------------------------------------------------- output helpers


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def format_uvcs(uvcs: dict[str, int]) -> str:
    return ", ".join(f"{name} {count:,}" for name, count in sorted(uvcs.items(), key=lambda kv: -kv[1])) or "none"


def kernel_arg(text: str) -> str:
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
    return format_size(n) if n else "0"


def print_accounting(rows: list[dict[str, Any]], out: TextIO, *, indent: str = "    ", phase: str = "") -> None:
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


def print_memory_timeline(timeline: dict[str, Any] | None, out: TextIO, *, what: str) -> None:
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


class ProgressBar:
    """A one-line progress bar on a text stream, redrawn at most ~10 times a second."""

    WIDTH = 30

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.clear = "\x1b[K" if stream.isatty() else ""  # erase the rest of the line on a terminal
        self.label: str | None = None
        self.last_draw = 0.0

    def __call__(self, label: str, done: int, total: int, unit: str) -> None:
        now = time.monotonic()
        finished = done >= total
        if label != self.label:
            self.close()
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

    def close(self) -> None:
        if self.label is not None:
            self.stream.write("\n")
            self.stream.flush()
            self.label = None


# ------------------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
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

    output = argparse.ArgumentParser(add_help=False)
    out = output.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    out.add_argument(
        "--trace",
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
        type=size_arg,
        default=parse_size("2G"),
        metavar="SIZE",
        help="secure memory the guest dirties above 2G before the reboot/exit (default 2G); "
        "needs SIZE + 2G <= --memory",
    )
    g.add_argument(
        "--vcpus",
        type=vcpus_arg,
        default=experiments.DEFAULT_VCPUS,
        metavar="N",
        help=f"vCPUs of the guest (default {experiments.DEFAULT_VCPUS})",
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
            "  pvfast reboot --memory 64G --secure 8G --async\n"
            "  pvfast shutdown --memory 16G --secure 4G\n"
            "  pvfast compare --secure 1G,2G,4G --plot compare.png\n"
            "  pvfast reboot --guest-memory state --memory 4T --secure 4T --async --clock model\n"
            "  pvfast calibrate --measure disable:8G=3.2\n"
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
        parents=[host, model, guest, clocks, output],
        help="reboot a protected guest the way QEMU does and time it",
        description="Boot a protected guest, let it dirty --secure bytes above 2G, then reboot it as "
        "QEMU's s390_machine_unprotect does (PREPARE + an async_cleanup thread running "
        "PERFORM, or DISABLE) and boot it protected again. Reports the time until the guest "
        "runs again, when the old guest's memory was clean, the UVCs issued and the secure "
        "pages left, where the work landed (thread, host CPU time, modelled time) and the old "
        "guest's memory over time.",
    )
    reboot.add_argument(
        "--plot", metavar="FILE.png", default=None, help="write a plot of the old guest's memory over time"
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
        help="require the asynchronous reboot; fail if QEMU would not take it",
    )
    reboot.set_defaults(mode="auto", run=cmd_reboot, command_parser=reboot)

    shutdown = sub.add_parser(
        "shutdown",
        parents=[host, model, guest, clocks, output],
        help="exit the VMM with and without QEMU's async-teardown helper",
        description="Boot a protected guest, let it dirty --secure bytes, then exit the VMM process, "
        "with and/or without the CLONE_VM helper of '-run-with async-teardown=on'. Reports "
        "where the teardown cost landed: the VMM's own exit or the helper's, and how long the "
        "dead guest's memory stayed allocated, and by which process.",
    )
    shutdown.add_argument(
        "--plot",
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
        parents=[host, model, clocks, output],
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
        help="comma-separated secure sizes (default 1G,2G,4G)",
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
        help="run each reboot N times and report medians (default 1)",
    )
    compare.add_argument(
        "--plot", metavar="FILE.png", default=DEFAULT_PLOT, help=f"where to write the plot (default {DEFAULT_PLOT})"
    )
    compare.add_argument("--no-plot", dest="plot", action="store_const", const=None, help="do not write a plot")
    compare.set_defaults(run=cmd_compare, command_parser=compare)

    calibrate = sub.add_parser(
        "calibrate",
        parents=[host],
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
    calibrate.add_argument("--output", "-o", metavar="FILE", default=None, help="write the fitted TOML here")
    calibrate.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    calibrate.set_defaults(run=cmd_calibrate, command_parser=calibrate)
    return parser


# ------------------------------------------------------------------------------------- commands


def host_options(args: argparse.Namespace) -> HostOptions:
    return HostOptions(
        async_destroy=args.async_destroy,
        destroy_fast=args.destroy_fast,
        feature_misc=args.feature_misc,
        guest_memory=getattr(args, "guest_memory", "real"),
        walk_threads=getattr(args, "walk_threads", 0),
        costs=getattr(args, "costs", None),
        kernel=args.kernel,
    )


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    info = experiments.host_info(host_options(args))
    if args.json:
        json.dump(info, out, indent=2)
        out.write("\n")
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
    try:
        experiments.check_sizes(args.memory, args.secure)
    except ValueError as err:
        parser.error(str(err))


def _times(r: dict[str, Any], key: str, clock: str) -> str:
    """A time of a result on the leading clock, the other beside it."""
    wall, model = r[key], r["model"][key]
    if clock == "model":
        return f"{format_seconds(model):>10}   (wall {format_seconds(wall)})"
    return f"{format_seconds(wall):>10}   (modelled {format_seconds(model)})"


def print_reboot(r: dict[str, Any], out: TextIO, *, clock: str = "wall") -> None:
    w = out.write
    how = (
        "asynchronous: KVM_PV_ASYNC_CLEANUP_PREPARE, then PERFORM in the async_cleanup thread"
        if r["mode"] == "async"
        else "synchronous: KVM_PV_DISABLE"
    )
    w(
        f"reboot of a {format_size(r['memory'])} protected guest with {format_size(r['secure'])} of secure "
        f"memory, {r['vcpus']} vCPUs\n"
    )
    w(f"  reboot path             {how}\n")
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


def print_shutdown(results: list[dict[str, Any]], out: TextIO, *, clock: str = "wall") -> None:
    w = out.write
    first = results[0]
    w(
        f"VMM exit with a running {format_size(first['memory'])} protected guest, "
        f"{format_size(first['secure'])} secure memory, {first['vcpus']} vCPUs\n"
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


def print_compare(result: dict[str, Any], out: TextIO, *, clock: str = "wall") -> None:
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
        note = "" if row["async_mode"] == "async" else "  (async not possible: went sync)"
        w(
            f"{format_size(row['secure']):>7} {format_size(row['memory']):>7}  "
            f"{format_seconds(row[p + 'sync_running_seconds']):>14}  "
            f"{format_seconds(row[p + 'async_running_seconds']):>15}  "
            f"{format_seconds(row[p + 'async_cleanup_seconds']):>15}  {ratio:>10}{note}\n"
        )
    growth = result.get(p + "seconds_per_gib")
    if growth:
        w("\ngrowth with secure memory (least-squares slope):\n")
        w(f"  sync time until running     {format_seconds(growth['sync_running'])} per GiB\n")
        w(f"  async time until running    {format_seconds(growth['async_running'])} per GiB\n")
        w(f"  async background cleanup    {format_seconds(growth['async_cleanup'])} per GiB\n")
    if result.get("plot"):
        w(f"\nplot written to {result['plot']}\n")


def print_calibrate(report: dict[str, Any], out: TextIO) -> None:
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


class Session:
    """What every measuring command shares: progress bar, optional tracer, output."""

    def __init__(self, args: argparse.Namespace, err: TextIO) -> None:
        show = getattr(args, "progress", False) or (err.isatty() and not args.json)
        self.bar = ProgressBar(err) if show else None
        self.tracer = Tracer(clock=getattr(args, "clock", "wall")) if getattr(args, "trace", None) else None
        self.trace_path: str | None = getattr(args, "trace", None)
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        if self.tracer is not None and self.trace_path:
            self.tracer.write(self.trace_path)


def cmd_reboot(args: argparse.Namespace, out: TextIO, session: Session) -> int:
    result = experiments.reboot(
        args.memory,
        args.secure,
        mode=args.mode,
        options=host_options(args),
        vcpus=args.vcpus,
        progress=session.bar,
        tracer=session.tracer,
    )
    session.close()
    if args.plot:
        plot_memory(
            result["memory_timeline"],
            args.plot,
            clock_kind=args.clock,
            title=f"reboot ({result['mode']}) of a {format_size(args.memory)} guest, "
            f"{format_size(args.secure)} secure: the old guest's memory",
        )
        result["plot"] = args.plot
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        print_reboot(result, out, clock=args.clock)
        if args.plot:
            out.write(f"\nplot written to {args.plot}\n")
    if result.get("error") or (result.get("perform") or {}).get("error"):
        return 1
    return 0


def cmd_shutdown(args: argparse.Namespace, out: TextIO, session: Session) -> int:
    variants = [False, True] if args.helper is None else [args.helper]
    results = [
        experiments.shutdown(
            args.memory,
            args.secure,
            helper=helper,
            options=host_options(args),
            vcpus=args.vcpus,
            progress=session.bar,
            tracer=session.tracer,
        )
        for helper in variants
    ]
    session.close()
    if args.plot:
        shown = next((r for r in results if r["helper"]), results[0])
        plot_memory(
            shown["memory_timeline"],
            args.plot,
            clock_kind=args.clock,
            title=f"VMM exit {'with' if shown['helper'] else 'without'} the CLONE_VM helper, "
            f"{format_size(args.memory)} guest, {format_size(args.secure)} secure: the dead guest's memory",
        )
    if args.json:
        json.dump(results[0] if len(results) == 1 else {"experiment": "shutdown", "runs": results}, out, indent=2)
        out.write("\n")
    else:
        print_shutdown(results, out, clock=args.clock)
        if args.plot:
            out.write(f"plot written to {args.plot}\n")
    return 0


def cmd_compare(args: argparse.Namespace, out: TextIO, session: Session) -> int:
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
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        print_compare(result, out, clock=args.clock)
    return 0


def cmd_calibrate(args: argparse.Namespace, out: TextIO, session: Session) -> int:
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
        json.dump(report, out, indent=2)
        out.write("\n")
    else:
        print_calibrate(report, out)
        if not args.output:
            out.write("\n" + toml)
    return 0


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return int(args.run(args, out))
    if args.command == "calibrate":
        args.progress, args.trace = False, None
    command_parser: argparse.ArgumentParser = args.command_parser
    if args.command in ("reboot", "shutdown"):
        _guest_sizes(args, command_parser)
    elif args.command == "compare":
        for size in args.secure:
            memory = args.memory if args.memory is not None else experiments.auto_memory(size)
            try:
                experiments.check_sizes(memory, size)
            except ValueError as error:
                command_parser.error(str(error))
    session = Session(args, err)
    try:
        return int(args.run(args, out, session))
    except (PvError, ValueError, OSError) as error:
        session.close()
        print(f"pvfast {args.command}: error: {error}", file=err)
        return 1
    except KeyboardInterrupt:
        session.close()
        print("pvfast: interrupted", file=err)
        return 130
