"""The raw UV interface as hardware answers it (issue 11), seen from Python: the host's and the
guest's view of the installed calls, the QUI lengths real kernels send, Init UV, and the KVM-level
values that follow (PV_INFO / sysfs call list, the gmap ASCE). The per-check ports of
kvm-unit-tests are in rust/pvfast-core/tests/kvm_unit_tests.rs."""

from __future__ import annotations

import struct

import pytest

import pvfast
from pvfast import PvCmd, PvInfoId, _native

from .conftest import MiB, enable


def block(cmd: int, length: int, size: int | None = None, **fields: int) -> bytes:
    b = bytearray(length if size is None else size)
    struct.pack_into(">HH", b, 0, length, cmd)
    for off, val in fields.items():
        struct.pack_into(">Q", b, int(off[1:], 16), val)
    return bytes(b)


def rc(b: bytes) -> int:
    return int(struct.unpack_from(">H", b, 4)[0])


def bit(words: tuple[int, ...] | bytes, n: int) -> bool:
    if isinstance(words, bytes):
        words = struct.unpack_from(">4Q", words, 0x10)
    return bool(words[n // 64] >> (63 - n % 64) & 1)


def test_host_view_hides_the_guest_calls(host: pvfast.Host) -> None:
    q = host.uv.native.call(block(0x0001, 0x100))
    assert (q.cc, rc(q.block)) == (0, 1)
    assert bit(q.block, 0)
    assert bit(q.block, 1)
    assert not bit(q.block, 8)
    assert not bit(q.block, 9)
    assert struct.unpack_from(">Q", q.block, 0x40)[0] == host.uv_info["uv_base_stor_len"] > 0
    # A host issuing the guest's share call: not offered.
    share = host.uv.native.call(block(0x1000, 0x30))
    assert (share.cc, rc(share.block)) == (1, 0x0002)
    # The kernel's copies of the list: KVM_PV_INFO and /sys/firmware/uv/query/facilities.
    vm = host.create_vm(64 * MiB)
    info = vm.pv_command(PvCmd.INFO, id=PvInfoId.VM, len_max=4096)
    assert info.data is not None
    words = struct.unpack_from(">4Q", info.data, 16)
    assert not bit(words, 8)
    assert not bit(words, 9)
    facilities = host.read_sysfs("/sys/firmware/uv/query/facilities").split()
    assert tuple(int(w, 16) for w in facilities) == words


def test_query_lengths_of_real_kernels(host: pvfast.Host) -> None:
    uv = host.uv.native
    assert rc(uv.call(block(0x0001, 0xA0)).block) == 0x0005
    short = uv.call(block(0x0001, 0xA8, 0x100))
    assert (short.cc, rc(short.block)) == (1, 0x0100)  # "more data": the fields that fit
    assert bit(short.block, 0)
    assert short.block[0xA8:] == bytes(0x100 - 0xA8)
    linux_64 = uv.call(block(0x0001, 0x120))  # Linux 6.4+ sizeof(struct uv_cb_qui)
    assert (linux_64.cc, rc(linux_64.block)) == (0, 1)


def test_guest_share_through_the_raw_call(host: pvfast.Host) -> None:
    vm = host.create_vm(64 * MiB)
    enable(vm)
    handle = vm.pv_state().handle
    vm.guest_share(0x3000)  # the KVM-level guest path (typed SET_SHARED_ACCESS) still works
    assert vm.region.page_state(3).state == "shared"
    uv = host.uv.native
    vm.guest_write(0x5000, b"guest data")  # the guest's own page: imported, secure
    res = uv.call(block(0x1000, 0x30, x20=0x5000), guest=handle)
    assert (res.cc, rc(res.block)) == (0, 1)
    assert vm.region.page_state(5).state == "shared"
    beyond = uv.call(block(0x1000, 0x30, x20=64 * MiB + 0x1000), guest=handle)
    assert rc(beyond.block) == 0x0101
    guest_qui = uv.call(block(0x0001, 0x100), guest=handle)
    assert struct.unpack_from(">Q", guest_qui.block, 0x10)[0] == (1 << 63) | (1 << 55) | (1 << 54)
    assert rc(uv.call(block(0x0101, 0x40, x18=handle), guest=handle).block) == 0x0002
    with pytest.raises(TypeError, match="guest"):
        uv.call(block(0x0001, 0x100), guest="1")  # type: ignore[arg-type]


def test_gmap_asce_carries_the_user_bits(host: pvfast.Host) -> None:
    vm = host.create_vm(64 * MiB)
    asce = vm.pv_state().asce
    assert asce & 0x1C0 == 0x1C0  # _ASCE_USER_BITS, as gmap_alloc sets them
    enable(vm)  # the UV takes it (it refuses an ASCE without the private-space bit)
    assert vm.pv_state().protected


def test_uninitialised_uv_and_init() -> None:
    uv = _native.Ultravisor(initialised=False, threads=1)
    assert not uv.is_initialised()
    region = uv.create_region(4 * MiB)
    info = uv.info()
    made = uv.create_config(region, guest_len=4 * MiB, asce=0x4100, sca=0x8000, base_stor_len=MiB, var_stor_len=MiB)
    assert (made.cc, made.rc, made.handle) == (1, 0x0003, 0)
    base_len = int(info["uv_base_stor_len"])  # type: ignore[arg-type]
    init = uv.call(block(0x000F, 0x48, x18=1 << 31, x20=base_len))
    assert (init.cc, rc(init.block)) == (0, 1)
    assert uv.is_initialised()
    assert uv.donated_bytes() == base_len
    again = uv.call(block(0x000F, 0x48, x18=1 << 32, x20=base_len))
    assert rc(again.block) == 0x0101
