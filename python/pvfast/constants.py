"""Kernel and UV constants, spelled as in include/uapi/linux/kvm.h and arch/s390/include/asm/uv.h.

The one Python definition of each; values the Rust Ultravisor owns (page size, UV return codes)
are taken from the native module.
"""

from __future__ import annotations

import enum
from typing import Final, Literal

from . import _native

PAGE_SIZE: Final[int] = _native.PAGE_SIZE  # 4096
SZ_1M = 1 << 20
SZ_2G = 1 << 31
HPAGE_SIZE = SZ_1M  # DUMP_BUFF_LEN
CRST_TABLE_SIZE = 4 * PAGE_SIZE  # CRST_ALLOC_ORDER = 2
SEC_PARMS_MAX_LEN = 2 * PAGE_SIZE  # v6.2 header size limit for SET_SEC_PARMS
MAX_GUEST_MEMORY: Final = 1 << 46  # 64 TiB: the largest guest memory the emulated UV maps for one VM
ASYNC_RRC = 42  # KVM-made rrc for PREPARE success and an interrupted PERFORM

KVMIO = 0xAE
KVM_CHECK_EXTENSION = 0xAE03
KVM_S390_PV_COMMAND = 0xC020AEC5
KVM_S390_PV_CPU_COMMAND = 0xC020AED0


class PvCmd(enum.IntEnum):
    """enum pv_cmd_id."""

    ENABLE = 0
    DISABLE = 1
    SET_SEC_PARMS = 2
    UNPACK = 3
    VERIFY = 4
    PREP_RESET = 5
    UNSHARE_ALL = 6
    INFO = 7
    DUMP = 8
    ASYNC_CLEANUP_PREPARE = 9
    ASYNC_CLEANUP_PERFORM = 10


# The kernel spellings as plain ints, typed as their literal values so that the typed overloads of
# Vm.pv_command accept them as they accept the PvCmd members (tests check both agree).
KVM_PV_ENABLE: Final = 0
KVM_PV_DISABLE: Final = 1
KVM_PV_SET_SEC_PARMS: Final = 2
KVM_PV_UNPACK: Final = 3
KVM_PV_VERIFY: Final = 4
KVM_PV_PREP_RESET: Final = 5
KVM_PV_UNSHARE_ALL: Final = 6
KVM_PV_INFO: Final = 7
KVM_PV_DUMP: Final = 8
KVM_PV_ASYNC_CLEANUP_PREPARE: Final = 9
KVM_PV_ASYNC_CLEANUP_PERFORM: Final = 10


class Cap(enum.IntEnum):
    """KVM capabilities that concern protected virtualization."""

    S390_PROTECTED = 180
    S390_PROTECTED_DUMP = 217
    S390_PROTECTED_ASYNC_DISABLE = 224


KVM_CAP_S390_PROTECTED = int(Cap.S390_PROTECTED)
KVM_CAP_S390_PROTECTED_DUMP = int(Cap.S390_PROTECTED_DUMP)
KVM_CAP_S390_PROTECTED_ASYNC_DISABLE = int(Cap.S390_PROTECTED_ASYNC_DISABLE)


class PvInfoId(enum.IntEnum):
    """enum pv_cmd_info_id."""

    VM = 0
    DUMP = 1


class PvDumpSubcmd(enum.IntEnum):
    """enum pv_cmd_dmp_id."""

    INIT = 0
    CONFIG_STOR_STATE = 1
    COMPLETE = 2
    CPU = 3


class Uvc(enum.IntEnum):
    """UVC command codes (the kernel's UVC_CMD_* without the prefix)."""

    QUI = 0x0001
    INIT_UV = 0x000F
    CREATE_SEC_CONF = 0x0100
    DESTROY_SEC_CONF = 0x0101
    DESTROY_SEC_CONF_FAST = 0x0102
    CREATE_SEC_CPU = 0x0120
    DESTROY_SEC_CPU = 0x0121
    CONV_TO_SEC_STOR = 0x0200
    CONV_FROM_SEC_STOR = 0x0201
    DESTR_SEC_STOR = 0x0202
    SET_SEC_CONF_PARAMS = 0x0300
    UNPACK_IMG = 0x0301
    VERIFY_IMG = 0x0302
    CPU_RESET = 0x0310
    CPU_RESET_INITIAL = 0x0311
    PREPARE_RESET = 0x0320
    CPU_RESET_CLEAR = 0x0321
    CPU_SET_STATE = 0x0330
    SET_UNSHARE_ALL = 0x0340
    PIN_PAGE_SHARED = 0x0341
    UNPIN_PAGE_SHARED = 0x0342
    DUMP_INIT = 0x0400
    DUMP_CONF_STOR_STATE = 0x0401
    DUMP_CPU = 0x0402
    DUMP_COMPLETE = 0x0403
    SET_SHARED_ACCESS = 0x1000
    REMOVE_SHARED_ACCESS = 0x1001


# UV return codes the kernel layer interprets (asm/uv.h; 0x0104 is the literal of pv.c's
# Destroy-Fast warning since v6.6), as the Rust Ultravisor defines them.
UVC_RC_EXECUTED: Final[int] = _native.RC_EXECUTED  # 0x0001
UVC_RC_INV_CMD: Final[int] = _native.RC_INV_CMD  # 0x0002
UVC_RC_INV_STATE: Final[int] = _native.RC_INV_STATE  # 0x0003
UVC_RC_INV_LEN: Final[int] = _native.RC_INV_LEN  # 0x0005
UVC_RC_NO_RESUME: Final = 0x0007  # asm/uv.h; the emulated UV never answers it
UVC_RC_NEED_DESTROY: Final[int] = _native.RC_NEED_DESTROY  # 0x8000 flag of a Create Config rc
UVC_RC_DESTROY_FAST_APQN: Final[int] = _native.RC_APQN_BOUND  # 0x0104

# Installed-call bits (MSB-0) and feature bits.
BIT_UVC_CMD_DESTROY_SEC_CONF_FAST = 23
BIT_UVC_CMD_DUMP_INIT = 24
BIT_UVC_CMD_DUMP_CONF_STOR_STATE = 25
BIT_UVC_CMD_DUMP_CPU = 26
BIT_UVC_CMD_DUMP_COMPLETE = 27
BIT_UV_FEAT_MISC = 0
BIT_UV_FEAT_AIV = 1

# struct kvm_s390_pv_info sizes
PV_INFO_HEADER_LEN = 16
PV_INFO_VM_LEN = 64
PV_INFO_DUMP_LEN = 24


def test_bit_inv(bit: int, words: tuple[int, ...] | int) -> bool:
    """The kernel's MSB-0 bit test over a list of u64 words (or one word)."""
    if isinstance(words, int):
        words = (words,)
    word = bit // 64
    if word >= len(words):
        return False
    return bool(words[word] & (1 << (63 - bit % 64)))


# ASCE designation types (bits 60-61 of the ASCE) and the limits that select them.
ASCE_TYPE_SEGMENT = 0x0
ASCE_TYPE_REGION3 = 0x4
ASCE_TYPE_REGION2 = 0x8
ASCE_TYPE_REGION1 = 0xC
_REGION3_SIZE = 1 << 31
_REGION2_SIZE = 1 << 42
_REGION1_SIZE = 1 << 53


#: The designation type of a guest ASCE, as ``Vm.asce_type`` names it.
AsceType = Literal["segment", "region3", "region2", "region1"]


def asce_type_for_limit(limit: int) -> AsceType:
    """gmap_create: the ASCE type for a gmap whose highest address is limit - 1."""
    top = limit - 1
    if top < _REGION3_SIZE:
        return "segment"
    if top < _REGION2_SIZE:
        return "region3"
    if top < _REGION1_SIZE:
        return "region2"
    return "region1"


ASCE_TYPE_BITS: dict[AsceType, int] = {
    "segment": ASCE_TYPE_SEGMENT,
    "region3": ASCE_TYPE_REGION3,
    "region2": ASCE_TYPE_REGION2,
    "region1": ASCE_TYPE_REGION1,
}
