"""The ``pvfast`` command: inspect the emulated host and time protected-guest reboot and shutdown.

Each subcommand runs one experiment of ``pvfast.experiments`` and prints a table, or one JSON
document with ``--json``. Exit status: 0 success, 1 the experiment failed, 2 bad command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from . import experiments, profiles
from ._version import __version__
from .errors import PvError
from .experiments import HostOptions, format_size, parse_size
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


def describe_host(options: HostOptions) -> str:
    return (
        f"kernel {options.kernel}, async_destroy={options.async_destroy}, "
        f"Destroy-Fast {'installed' if options.destroy_fast else 'not installed'}, "
        f"MISC {'on' if options.feature_misc else 'off'}"
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
        parents=[host, guest, output],
        help="reboot a protected guest the way QEMU does and time it",
        description="Boot a protected guest, let it dirty --secure bytes above 2G, then reboot it as "
        "QEMU's s390_machine_unprotect does (PREPARE + an async_cleanup thread running "
        "PERFORM, or DISABLE) and boot it protected again. Reports the time until the guest "
        "runs again, when the old guest's memory was clean, the UVCs issued and the secure "
        "pages left.",
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
        parents=[host, guest, output],
        help="exit the VMM with and without QEMU's async-teardown helper",
        description="Boot a protected guest, let it dirty --secure bytes, then exit the VMM process, "
        "with and/or without the CLONE_VM helper of '-run-with async-teardown=on'. Reports "
        "where the teardown cost landed: the VMM's own exit or the helper's.",
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
        parents=[host, output],
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
    return parser


# ------------------------------------------------------------------------------------- commands


def host_options(args: argparse.Namespace) -> HostOptions:
    return HostOptions(
        async_destroy=args.async_destroy,
        destroy_fast=args.destroy_fast,
        feature_misc=args.feature_misc,
        kernel=args.kernel,
    )


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    info = experiments.host_info(host_options(args))
    if args.json:
        json.dump(info, out, indent=2)
        out.write("\n")
        return 0
    w = out.write
    w(f"pvfast emulated host ({describe_host(host_options(args))}; native build: {info['build_profile']})\n\n")
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


def print_reboot(r: dict[str, Any], out: TextIO) -> None:
    w = out.write
    how = (
        "asynchronous: KVM_PV_ASYNC_CLEANUP_PREPARE, then PERFORM in the async_cleanup thread"
        if r["mode"] == "async"
        else "synchronous: KVM_PV_DISABLE"
    )
    w(
        f"reboot of a {format_size(r['memory'])} protected guest with {format_size(r['secure'])} of secure "
        f"memory above 2G, {r['vcpus']} vCPUs\n"
    )
    w(f"  reboot path             {how}\n")
    w(f"  host                    {describe_host(HostOptions(**r['host']))}\n")
    w(f"  boot + guest dirtying   {format_seconds(r['boot_seconds'])} (setup, not part of the reboot)\n\n")
    w("  from the start of the reboot:\n")
    w(f"    unprotect returned              {format_seconds(r['unprotect_seconds']):>10}\n")
    w(
        f"    guest running again             {format_seconds(r['running_seconds']):>10}"
        f"   (image load {format_seconds(r['load_seconds'])}, ENABLE..VERIFY {format_seconds(r['protect_seconds'])})\n"
    )
    done = "async_cleanup thread finished" if r["mode"] == "async" else "DISABLE returned"
    w(f"    old guest's memory clean        {format_seconds(r['cleanup_seconds']):>10}   ({done})\n\n")
    w(f"  secure pages of the old guest     {r['secure_pages_before']:,} before, {r['secure_pages_left']:,} left\n")
    w(f"  secure pages now (new guest)      {r['secure_pages_now']:,}\n")
    w(f"  UVCs in unprotect                 {format_uvcs(r['uvcs_unprotect'])}\n")
    w(f"  UVCs in the whole reboot          {format_uvcs(r['uvcs'])}\n")
    if r.get("perform") and "error" in r["perform"]:
        w(f"  PERFORM failed                    {r['perform']['error']}\n")
    if r.get("error"):
        w(f"  error: {r['error']}\n")


def print_shutdown(results: list[dict[str, Any]], out: TextIO) -> None:
    w = out.write
    first = results[0]
    w(
        f"VMM exit with a running {format_size(first['memory'])} protected guest, "
        f"{format_size(first['secure'])} secure memory above 2G, {first['vcpus']} vCPUs\n"
    )
    w(f"  host: {describe_host(HostOptions(**first['host']))}\n\n")
    for r in results:
        w(
            f"{'with' if r['helper'] else 'without'} the CLONE_VM helper (-run-with async-teardown="
            f"{'on' if r['helper'] else 'off'}):\n"
        )
        phases = [("vmm_exit", "VMM (qemu) exit")] + ([("helper_exit", "helper exit")] if r["helper"] else [])
        for key, label in phases:
            p = r[key]
            share = p["seconds"] / r["total_seconds"] * 100 if r["total_seconds"] else 100.0
            w(
                f"  {label:<18} {format_seconds(p['seconds']):>10}  {share:5.1f}% of the teardown   "
                f"secure pages left {p['secure_pages_after']:,}\n"
            )
            w(f"  {'':<18} UVCs: {format_uvcs(p['uvcs'])}\n")
        w(
            f"  {'total':<18} {format_seconds(r['total_seconds']):>10}   "
            f"left over: {r['secure_pages_left']:,} secure pages, {r['configs_left']} configurations, "
            f"{r['leaked']} leaked\n\n"
        )
    if len(results) == 2:
        without, with_ = (results[0], results[1]) if not results[0]["helper"] else (results[1], results[0])
        a, b = without["vmm_exit"]["seconds"], with_["vmm_exit"]["seconds"]
        w(
            f"the VMM's own exit took {format_seconds(b)} with the helper and {format_seconds(a)} without "
            f"({a / b if b else float('inf'):.1f}x)\n"
        )


def print_compare(result: dict[str, Any], out: TextIO) -> None:
    w = out.write
    repeat = result.get("repeat", 1)
    w(
        f"protected-guest reboot, sync (DISABLE) vs async (PREPARE + PERFORM); host: "
        f"{describe_host(HostOptions(**result['host']))}; {result['vcpus']} vCPUs"
        f"{f'; medians of {repeat} runs' if repeat > 1 else ''}\n\n"
    )
    head = (
        f"{'secure':>7} {'memory':>7}  {'sync: running':>14}  {'async: running':>15}  "
        f"{'async: cleanup':>15}  {'sync/async':>10}\n"
    )
    w(head)
    w("-" * (len(head) - 1) + "\n")
    for row in result["rows"]:
        ratio = f"{row['ratio']:.0f}x" if row["ratio"] is not None else "-"
        note = "" if row["async_mode"] == "async" else "  (async not possible: went sync)"
        w(
            f"{format_size(row['secure']):>7} {format_size(row['memory']):>7}  "
            f"{format_seconds(row['sync_running_seconds']):>14}  {format_seconds(row['async_running_seconds']):>15}  "
            f"{format_seconds(row['async_cleanup_seconds']):>15}  {ratio:>10}{note}\n"
        )
    growth = result.get("seconds_per_gib")
    if growth:
        w("\ngrowth with secure memory (least-squares slope):\n")
        w(f"  sync time until running     {format_seconds(growth['sync_running'])} per GiB\n")
        w(f"  async time until running    {format_seconds(growth['async_running'])} per GiB\n")
        w(f"  async background cleanup    {format_seconds(growth['async_cleanup'])} per GiB\n")
    if result.get("plot"):
        w(f"\nplot written to {result['plot']}\n")


class Session:
    """What every measuring command shares: progress bar, optional tracer, output."""

    def __init__(self, args: argparse.Namespace, err: TextIO) -> None:
        show = args.progress or (err.isatty() and not args.json)
        self.bar = ProgressBar(err) if show else None
        self.tracer = Tracer() if args.trace else None
        self.trace_path: str | None = args.trace
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
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        print_reboot(result, out)
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
    if args.json:
        json.dump(results[0] if len(results) == 1 else {"experiment": "shutdown", "runs": results}, out, indent=2)
        out.write("\n")
    else:
        print_shutdown(results, out)
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
        experiments.plot_compare(result, args.plot)
    result["wall_seconds"] = time.perf_counter() - start
    if args.json:
        json.dump(result, out, indent=2)
        out.write("\n")
    else:
        print_compare(result, out)
    return 0


def main(argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return int(args.run(args, out))
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
