"""Kernel-version profiles: which kernel's PV teardown code the emulated host runs.

Every behaviour that changed between v6.2 (the asynchronous-destroy series as merged:
fb491d5500a7, d9459922a15c, 8c516b25d6e9, afe20eb8df91, f7866f582b1c, cc726886079f) and the newest
mainline tree read (torvalds/linux at 7bb6284aa7b3) is one named switch, a *delta*; a profile is a
row selecting deltas. Adding a kernel version is adding a row to ``PROFILES``. The kernel code
tests the precomputed booleans of ``KernelProfile`` (``host.profile.<delta>``), never names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


@dataclass(frozen=True)
class Delta:
    """One change of the kernel's behaviour, with where it came from and what it changes."""

    name: str
    commit: str  # upstream commit (12 hex digits) or a title when the id is not known
    first: str  # first release that has it ("v6.4", "approx. v7.0")
    function: str  # where it is in the kernel
    effect: str  # what a user of the ioctl interface can observe


DELTAS: tuple[Delta, ...] = (
    Delta(
        "segment_asce_refused",
        "292a7d6fca33",
        "v6.4 (stable 6.3.3, 6.2.16)",
        "kvm_s390_pv_set_aside, s390_replace_asce",
        "ASYNC_CLEANUP_PREPARE on a VM with a segment ASCE (memory limit <= 2 GiB) fails with EINVAL after "
        "the secure CPUs are gone, Destroy-Fast or not; before, it succeeded and, without Destroy-Fast, "
        "left the gmap's host_to_guest entries pointing into the replaced segment table, a "
        "use-after-free once PERFORM or cleanup-all frees that table",
    ),
    Delta(
        "cleanup_all_skip_if_zero",
        "5ff92181577a",
        "v6.5 (stable 6.4.8)",
        "kvm_s390_pv_deinit_cleanup_all",
        "cleanup-all of an address space whose protected_count is 0 returns at once; before, it raised "
        "the counter 0 -> 1 for its duration, so a page-table teardown of the same mm meanwhile issued "
        "destroy-page UVCs (an oops on a machine without the Ultravisor)",
    ),
    Delta(
        "fast_0x104_no_warn",
        "b1e428615f15",
        "v6.6",
        "kvm_s390_pv_deinit_vm_fast",
        "Destroy-Fast failing with rc 0x0104 (APQNs still bound) gives no WARN; the errno, rc/rrc and "
        "state are unchanged",
    ),
    Delta(
        "notifier_register_first",
        '"KVM: s390: Fix incorrect usage of mmu_notifier_register()" (fixes ca2fd0609b5d)',
        "approx. v6.17",
        "kvm_s390_pv_init_vm",
        "ENABLE registers the mm notifier before it allocates anything and returns its error (EINTR "
        "with a signal pending); before, the error was ignored, the VM later unregistered a "
        "subscription that was never registered, and the extra mmdrop freed the mm too early",
    ),
    Delta(
        "walk_own_gmap",
        "a2c17f9270cc",
        "approx. v7.0",
        "gmap_pv_destroy_range (was __s390_uv_destroy_range)",
        "PERFORM's walk, cleanup-all's zap and PREPARE's [0, 2 GiB) pass walk the VM's own guest "
        "memory; before, PERFORM and the zap walked every present page of the whole address space, "
        "other VMs of the process included",
    ),
    Delta(
        "walk_export_fallback",
        "a2c17f9270cc",
        "approx. v7.0",
        "__kvm_s390_pv_destroy_page",
        "a destroy-page the UV refuses during those walks is followed by an export, so PERFORM "
        "exports the pages of the rebooted guest that runs on the same memory; before, the refusal "
        "was ignored and those pages stayed secure",
    ),
    Delta(
        "no_guest_handle",
        "a2c17f9270cc (field removed; imports moved to kvm->arch.pv.handle in 2025)",
        "approx. v7.0",
        "gmap_convert_to_secure / kvm_s390_pv_convert_to_secure",
        "fault-time imports use the VM's handle; before, they used gmap->guest_handle, which every "
        "configuration-destroy attempt zeroes, so after a failed destroy a secure vCPU's imports fail",
    ),
    Delta(
        "se_header_1m",
        "e3372ffb5f9e",
        "approx. v7.0",
        "kvm_s390_handle_pv (KVM_PV_SET_SEC_PARMS)",
        "SET_SEC_PARMS accepts headers up to 1 MiB; before, anything above 8 KiB was EINVAL",
    ),
    Delta(
        "clear_pv_state_resets_dump",
        "(after v7.0; commit id not found)",
        "after approx. v7.0",
        "kvm_s390_clear_pv_state",
        "every path that clears the PV state (DISABLE, PREPARE, a failed ENABLE) also ends a dump in "
        "progress and unblocks the vCPUs; before, `dumping` survived, so the next protected guest's "
        "DUMP_INIT failed with EINVAL",
    ),
    Delta(
        "create_cpu_fail_frees",
        "(after v7.0; commit id not found)",
        "after approx. v7.0",
        "kvm_s390_pv_create_cpu (kvm_s390_pv_dispose_cpu)",
        "a failed Create Secure CPU frees the CPU's donation and SIDA page; before, "
        "kvm_s390_pv_destroy_cpu returned early (no CPU handle) and both were leaked kernel memory",
    ),
)

DELTA_NAMES: tuple[str, ...] = tuple(d.name for d in DELTAS)
_BY_NAME = {d.name: d for d in DELTAS}

_V64 = frozenset({"segment_asce_refused"})
_V65 = _V64 | {"cleanup_all_skip_if_zero"}
_V66 = _V65 | {"fast_0x104_no_warn"}

#: The profiles, oldest first: each is the set of deltas that kernel has.
PROFILES: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "6.2": frozenset(),
        "6.4": _V64,
        "6.5": _V65,
        "6.6": _V66,
        "latest": frozenset(DELTA_NAMES),
    }
)

#: Other accepted names.
ALIASES: Mapping[str, str] = MappingProxyType({"mainline": "latest"})

DEFAULT = "latest"

#: What each profile stands for.
DESCRIPTIONS: Mapping[str, str] = MappingProxyType(
    {
        "6.2": "v6.2.0 to v6.2.15 (pv.c at f7866f582b1c, kvm-s390.c at cc726886079f)",
        "6.4": "v6.4.0 to v6.4.7 (+292a7d6fca33)",
        "6.5": "v6.5 (+5ff92181577a)",
        "6.6": "v6.6 (+b1e428615f15)",
        "latest": "newest mainline read: torvalds/linux at 7bb6284aa7b3 (after the gmap rewrite)",
    }
)


class KernelProfile:
    """One profile, with one boolean attribute per delta (precomputed for the kernel's paths)."""

    __slots__ = ("deltas", "name", *DELTA_NAMES)

    name: str
    deltas: frozenset[str]
    segment_asce_refused: bool
    cleanup_all_skip_if_zero: bool
    fast_0x104_no_warn: bool
    notifier_register_first: bool
    walk_own_gmap: bool
    walk_export_fallback: bool
    no_guest_handle: bool
    se_header_1m: bool
    clear_pv_state_resets_dump: bool
    create_cpu_fail_frees: bool

    def __init__(self, name: str) -> None:
        deltas = PROFILES[name]
        self.name = name
        self.deltas = deltas
        for delta in DELTA_NAMES:
            setattr(self, delta, delta in deltas)

    def __repr__(self) -> str:
        return f"<KernelProfile {self.name}: {', '.join(sorted(self.deltas)) or 'no deltas'}>"

    def table(self) -> list[dict[str, object]]:
        """Every delta with whether this profile has it (``pvfast info`` shows this)."""
        return [
            {
                "delta": d.name,
                "commit": d.commit,
                "first": d.first,
                "function": d.function,
                "effect": d.effect,
                "present": d.name in self.deltas,
            }
            for d in DELTAS
        ]


def resolve(name: object) -> str:
    """The profile ``name`` stands for; ValueError listing the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"kernel: expected str, got {type(name).__name__}")
    key = ALIASES.get(name, name)
    if key not in PROFILES:
        valid = ", ".join([*PROFILES, *ALIASES])
        raise ValueError(f"kernel: unknown kernel profile {name!r}; the profiles are {valid}")
    return key


def profile(name: object = DEFAULT) -> KernelProfile:
    return KernelProfile(resolve(name))


def delta(name: str) -> Delta:
    return _BY_NAME[name]
