"""The fault model (the host fault handlers and export before import: arch/s390/kernel/uv.c @
594ce0b8a998, arch/s390/mm/fault.c): imports, exports, pins, violations; the host never sees plaintext."""

from __future__ import annotations

import pytest

import pvfast
from pvfast import PvCmd

from .conftest import GiB, MiB, enable

SECRET = b"top secret guest data, never for the host " * 10


def test_guest_sees_plaintext_host_sees_ciphertext(host):
    vm = host.create_vm(64 * MiB)
    enable(vm)
    vm.guest_write(0x5000, SECRET)
    assert vm.guest_read(0x5000, len(SECRET)) == SECRET
    s0 = host.uv.stats()
    seen = vm.host_read(0x5000, len(SECRET))
    assert seen != SECRET
    assert SECRET[:16] not in seen
    assert host.uv.stats()["CONV_FROM_SEC_STOR"] - s0.get("CONV_FROM_SEC_STOR", 0) == 1
    assert vm.region.page_state(5).state == "exported"
    # the guest touches it again: import decrypts, the data is back
    assert vm.guest_read(0x5000, len(SECRET)) == SECRET
    assert vm.region.page_state(5).state == "secure"


def test_whole_range_never_returns_plaintext(host):
    vm = host.create_vm(64 * MiB)
    enable(vm)
    payload = bytes(range(256)) * 64  # 16 KiB, 4 pages
    vm.guest_write(0x100000, payload)
    raw = vm.host_read(0x100000, len(payload))
    for i in range(0, len(payload), 4096):
        assert raw[i : i + 4096] != payload[i : i + 4096]


def test_shared_page_needs_no_uvc(host):
    """The host reads a page the protected guest shared: the hardware raises no exception for a
    shared page, so no UVC at all (arch_make_page_accessible, and PIN_PAGE_SHARED with it, runs
    only from the secure-storage-access handler; do_secure_storage_access)."""
    vm = host.create_vm(64 * MiB)
    enable(vm)
    vm.guest_write(0x3000, b"virtio ring")
    vm.guest_share(0x3000)
    assert vm.region.page_state(3).state == "shared"
    s0 = host.uv.stats()
    assert vm.host_read(0x3000, 11) == b"virtio ring"
    s1 = host.uv.stats()
    assert s1 == s0
    assert vm.region.page_state(3).state == "shared"
    vm.host_write(0x3000, b"host reply!")
    assert vm.guest_read(0x3000, 11) == b"host reply!"


def test_host_tampering_with_exported_page_is_detected(host):
    vm = host.create_vm(64 * MiB)
    enable(vm)
    vm.guest_write(0x8000, SECRET)
    vm.host_read(0x8000, 16)  # exported now
    vm.host_write(0x8000, b"\xff" * 16)  # the host flips bytes of the ciphertext
    with pytest.raises(pvfast.UvcError, match="CONV_TO_SEC_STOR") as ei:
        vm.guest_read(0x8000, 16)
    assert ei.value.rc not in (0, 1)


def test_non_protected_guest_touching_old_pages_exports_them(host):
    vm = host.create_vm(3 * GiB)
    enable(vm)
    vm.guest_write(2 * GiB, SECRET)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    s0 = host.uv.stats()
    data = vm.guest_read(2 * GiB, len(SECRET))  # rebooted, not yet protected guest
    assert data != SECRET
    s1 = host.uv.stats()
    assert s1["CONV_FROM_SEC_STOR"] - s0.get("CONV_FROM_SEC_STOR", 0) == 1
    assert s1.get("DESTR_SEC_STOR", 0) == s0.get("DESTR_SEC_STOR", 0)


def test_new_protected_guest_resolves_violation_on_old_page():
    host = pvfast.Host(destroy_fast=False, feature_misc=True)
    vm = host.create_vm(3 * GiB)
    enable(vm)
    old = vm.pv_state().handle
    vm.guest_write(2 * GiB, SECRET)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    enable(vm)
    new = vm.pv_state().handle
    s0 = host.uv.stats()
    data = vm.guest_read(2 * GiB, len(SECRET))
    assert data == bytes(len(SECRET))  # fresh page for the new guest: zeroed, not the old secret
    s1 = host.uv.stats()
    assert s1["DESTR_SEC_STOR"] - s0.get("DESTR_SEC_STOR", 0) == 1  # secure-storage violation
    assert s1["CONV_TO_SEC_STOR"] - s0["CONV_TO_SEC_STOR"] == 1
    page = vm.region.page_state(2 * GiB // 4096)
    assert (page.state, page.owner) == ("secure", new)
    assert host.uv.secure_pages(old) == 0


def test_memory_is_touched_only_where_the_guest_touches(host):
    vm = host.create_vm(1 << 40)  # 1 TiB guest on a small machine
    enable(vm)
    vm.guest_access(0, 1 * MiB)
    vm.guest_access(512 * GiB, 64 * 1024)
    assert vm.region.present_pages() == 256 + 16
    assert host.uv.secure_pages() == 256 + 16
    vm.pv_command(PvCmd.DISABLE)
    assert host.uv.secure_pages() == 0


@pytest.mark.parametrize(
    ("call", "exc", "word"),
    [
        (lambda vm: vm.guest_access(-1), ValueError, "gaddr"),
        (lambda vm: vm.guest_access(64 * MiB), ValueError, "gaddr"),
        (lambda vm: vm.guest_access(0, 0), ValueError, "size"),
        (lambda vm: vm.guest_access(0, -5), ValueError, "size"),
        (lambda vm: vm.guest_access("0"), TypeError, "gaddr"),
        (lambda vm: vm.host_read(64 * MiB - 10, 11), ValueError, "gaddr"),
        (lambda vm: vm.host_read(0, 1.0), TypeError, "size"),
        (lambda vm: vm.host_write(0, "text"), TypeError, "data"),
        (lambda vm: vm.guest_write(0, 5), TypeError, "data"),
        (lambda vm: vm.guest_read(1 << 70, 1), ValueError, "gaddr"),
    ],
)
def test_bad_memory_arguments(host, call, exc, word):
    vm = host.create_vm(64 * MiB)
    enable(vm)
    before = (host.uv.stats(), vm.region.present_pages())
    with pytest.raises(exc, match=word):
        call(vm)
    assert (host.uv.stats(), vm.region.present_pages()) == before
