#!/usr/bin/env python3
"""Soak: long runs must not grow (issue 13 item 5). Not a timed benchmark.

Phase 1 runs ENABLE/DISABLE cycles on one VM (every 8th cycle the guest writes a page and the
host reads it, so the page is exported while the configuration lives and the next one finds it);
phase 2 creates a VM, protects it, has the guest write a page and closes it (the close tears the
protected VM down, with Destroy-Fast and orphaned pages when the host has it). At the start
(after a warm-up), the middle and the end of each phase it prints the process RSS, the UV's
configuration tables (records kept, dead ones kept for their pages, id slots ever used, free
ids, CPUs), the emulated host's process registry, kernel memory and accounts, then whether they
stayed flat (accounts: within the bound ``host.accounting`` keeps).

    python benches/soak.py                 # 10**6 ENABLE/DISABLE cycles, 10**5 VMs
    python benches/soak.py --quick         # 2,000 and 500: a few seconds
    python benches/soak.py --cycles N --vms M

Exit status 1 if something grew: a table size or the registry between the start and the end,
or the RSS by more than --rss-slack MiB between the middle and the end, or the accounts past
their bound.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass

import pvfast
from pvfast import PvCmd
from pvfast.accounting import Accounting

MiB = 1 << 20
PAGE = 4096
# Accounting keeps at most RETAIN_DEAD dead threads and as many closed VMs, PRUNE_EVERY more
# between two prunes, and a few live ones.
ACCOUNTS_BOUND = 2 * Accounting.RETAIN_DEAD + Accounting.PRUNE_EVERY + 16


def rss_mib() -> float:
    """Resident set size now (not the peak)."""
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


@dataclass(frozen=True)
class Sample:
    label: str
    done: int
    seconds: float
    rss: float
    tables: dict[str, int]
    processes: int
    kernel_memory: int
    accounts: int  # emulated threads and VM accounts host.accounting keeps

    def line(self) -> str:
        t = self.tables
        return (
            f"{self.label:<16} {self.done:>9} cycles {self.seconds:8.1f} s  rss {self.rss:7.1f} MiB  "
            f"configs {t['configs']} (live {t['live']}, dead {t['dead']})  id_slots {t['id_slots']} "
            f"free_ids {t['free_ids']}  cpus {t['cpus']}  processes {self.processes}  "
            f"kernel_memory {self.kernel_memory}  accounts {self.accounts}"
        )


def sample(host: pvfast.Host, label: str, done: int, start: float) -> Sample:
    gc.collect()
    return Sample(
        label=label,
        done=done,
        seconds=time.perf_counter() - start,
        rss=rss_mib(),
        tables=host.uv.native.table_sizes(),
        processes=len(host.processes),
        kernel_memory=host.kernel_memory(),
        accounts=len(host.accounting.emulated_threads()) + len(host.accounting.snapshot().vms),
    )


def enable_disable(host: pvfast.Host, n: int) -> list[Sample]:
    vm = host.create_vm(16 * MiB)
    start = time.perf_counter()
    out: list[Sample] = []
    marks = {max(1, n // 100): "enable/disable start", n // 2: "enable/disable mid", n: "enable/disable end"}
    for i in range(1, n + 1):
        vm.pv_command(PvCmd.ENABLE)
        if i % 8 == 0:
            page = (i // 8) % 64 * PAGE
            vm.guest_write(page, b"guest data")
            vm.host_read(page, 16)  # the page is exported (or pinned) while the config lives
        vm.pv_command(PvCmd.DISABLE)
        if i in marks:
            out.append(sample(host, marks[i], i, start))
            print(out[-1].line(), flush=True)
    vm.close()
    return out


def create_close(host: pvfast.Host, n: int) -> list[Sample]:
    start = time.perf_counter()
    out: list[Sample] = []
    marks = {max(1, n // 100): "create/close start", n // 2: "create/close mid", n: "create/close end"}
    for i in range(1, n + 1):
        vm = host.create_vm(16 * MiB)
        vm.pv_command(PvCmd.ENABLE)
        vm.guest_write(i % 64 * PAGE, b"guest data")
        vm.close()
        if i in marks:
            out.append(sample(host, marks[i], i, start))
            print(out[-1].line(), flush=True)
    return out


def flat(samples: list[Sample], rss_slack: float) -> list[str]:
    """What grew between the first and the last sample (RSS: between the middle and the end)."""
    first, mid, last = samples[0], samples[len(samples) // 2], samples[-1]
    grew = [f"tables[{k}] {first.tables[k]} -> {v}" for k, v in last.tables.items() if v > first.tables[k]]
    if last.processes > first.processes:
        grew.append(f"processes {first.processes} -> {last.processes}")
    if last.kernel_memory > first.kernel_memory:
        grew.append(f"kernel_memory {first.kernel_memory} -> {last.kernel_memory}")
    if last.accounts > ACCOUNTS_BOUND:
        grew.append(f"accounts {last.accounts} (more than the {ACCOUNTS_BOUND} kept)")
    if last.rss - mid.rss > rss_slack:
        grew.append(f"rss {mid.rss:.1f} -> {last.rss:.1f} MiB")
    return grew


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2,000 cycles and 500 VMs")
    ap.add_argument("--cycles", type=int, default=None, help="ENABLE/DISABLE cycles (default 10**6)")
    ap.add_argument("--vms", type=int, default=None, help="create/close VM cycles (default 10**5)")
    ap.add_argument("--rss-slack", type=float, default=2.0, help="RSS growth allowed, MiB (default 2)")
    args = ap.parse_args(argv)
    cycles = args.cycles if args.cycles is not None else (2_000 if args.quick else 1_000_000)
    vms = args.vms if args.vms is not None else (500 if args.quick else 100_000)
    if cycles < 2 or vms < 2:
        ap.error("--cycles and --vms must be at least 2")
    host = pvfast.Host()
    print(f"soak: {cycles} ENABLE/DISABLE cycles, {vms} create/close VM cycles (pvfast {pvfast.__version__})")
    failed = False
    for name, samples in (("enable/disable", enable_disable(host, cycles)), ("create/close", create_close(host, vms))):
        grew = flat(samples, args.rss_slack)
        print(f"{name}: " + ("flat" if not grew else "GREW: " + "; ".join(grew)), flush=True)
        failed |= bool(grew)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
