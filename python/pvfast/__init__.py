"""pvfast: an emulated s390 Ultravisor and KVM protected-VM interface, with asynchronous destroy.

Start with ``pvfast.Host()``; see README.md and docs/ARCHITECTURE.md. This module only gathers the
public names; the layers below it import one way: constants/errors -> costs -> accounting ->
clock -> host -> gmap -> mm -> fault -> pv -> kvm -> vmm/image/trace/timeline/experiments/cli
(tests/test_layers.py checks it).
"""

from __future__ import annotations

from . import _native, image, racepoints, vmm
from ._version import __version__
from .accounting import AccountingSnapshot, ThreadUsage, Usage
from .constants import (
    KVM_CAP_S390_PROTECTED,
    KVM_CAP_S390_PROTECTED_ASYNC_DISABLE,
    KVM_CAP_S390_PROTECTED_DUMP,
    KVM_CHECK_EXTENSION,
    KVM_PV_ASYNC_CLEANUP_PERFORM,
    KVM_PV_ASYNC_CLEANUP_PREPARE,
    KVM_PV_DISABLE,
    KVM_PV_DUMP,
    KVM_PV_ENABLE,
    KVM_PV_INFO,
    KVM_PV_PREP_RESET,
    KVM_PV_SET_SEC_PARMS,
    KVM_PV_UNPACK,
    KVM_PV_UNSHARE_ALL,
    KVM_PV_VERIFY,
    KVM_S390_PV_COMMAND,
    KVM_S390_PV_CPU_COMMAND,
    PAGE_SIZE,
    AsceType,
    Cap,
    PvCmd,
    PvDumpSubcmd,
    PvInfoId,
    Uvc,
)
from .costs import CostModel
from .errors import ClosedFdError, PvError, UvcError
from .host import Host, KernelWarning, LeakEntry, UltravisorView, UvInfo
from .kvm import PvResult, PvState, Vm
from .mm import AddressSpace, Process
from .racepoints import RacePoint, RaceTimeout

build_profile: str = _native.build_profile

__all__ = [
    "KVM_CAP_S390_PROTECTED",
    "KVM_CAP_S390_PROTECTED_ASYNC_DISABLE",
    "KVM_CAP_S390_PROTECTED_DUMP",
    "KVM_CHECK_EXTENSION",
    "KVM_PV_ASYNC_CLEANUP_PERFORM",
    "KVM_PV_ASYNC_CLEANUP_PREPARE",
    "KVM_PV_DISABLE",
    "KVM_PV_DUMP",
    "KVM_PV_ENABLE",
    "KVM_PV_INFO",
    "KVM_PV_PREP_RESET",
    "KVM_PV_SET_SEC_PARMS",
    "KVM_PV_UNPACK",
    "KVM_PV_UNSHARE_ALL",
    "KVM_PV_VERIFY",
    "KVM_S390_PV_COMMAND",
    "KVM_S390_PV_CPU_COMMAND",
    "PAGE_SIZE",
    "AccountingSnapshot",
    "AddressSpace",
    "AsceType",
    "Cap",
    "ClosedFdError",
    "CostModel",
    "Host",
    "KernelWarning",
    "LeakEntry",
    "Process",
    "PvCmd",
    "PvDumpSubcmd",
    "PvError",
    "PvInfoId",
    "PvResult",
    "PvState",
    "RacePoint",
    "RaceTimeout",
    "ThreadUsage",
    "UltravisorView",
    "Usage",
    "UvInfo",
    "Uvc",
    "UvcError",
    "Vm",
    "__version__",
    "build_profile",
    "image",
    "racepoints",
    "vmm",
]
