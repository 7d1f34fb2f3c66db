"""What each PV command hands back in rc/rrc, as Vm.pv_command's docstring and docs/COMMANDS.md say.

Every call passes sentinel values in rc/rrc (``RC_IN``/``RRC_IN``): KVM copies the whole
``struct kvm_pv_cmd`` back, so a field it does not write comes back as user space set it. Each
case names the row of docs/COMMANDS.md it checks.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

import pvfast
from pvfast import PvCmd, PvDumpSubcmd, PvError, PvInfoId, Uvc, image, vmm

GiB = 1 << 30
RC_IN, RRC_IN = 0x1111, 0x2222
SENT = (RC_IN, RRC_IN)
OK = (0x0001, 0)
ASYNC = (0x0001, 42)


def small_image() -> image.Image:
    return image.build([(0x10000, b"kernel" * 1000)])


def call(vm: pvfast.Vm, cmd: int, **data: object) -> tuple[int, int, int]:
    """(errno or 0, rc, rrc) of the ioctl, called with the sentinels."""
    try:
        res = vm.pv_command(cmd, rc=RC_IN, rrc=RRC_IN, **data)  # type: ignore[call-overload]
    except PvError as err:
        return (err.errno or 0, err.rc, err.rrc)
    return (0, res.rc, res.rrc)


def protected(host: pvfast.Host, size: int = 4 * GiB, vcpus: int = 2) -> pvfast.Vm:
    vm = host.create_vm(size, vcpus=vcpus)
    vm.pv_command(PvCmd.ENABLE)
    return vm


# ------------------------------------------------------------------ the prologue


def test_prologue_refusals_write_nothing():
    vm = pvfast.Host(prot_virt=False).create_vm(GiB)
    assert call(vm, PvCmd.ENABLE) == (errno.EINVAL, *SENT)
    host = pvfast.Host()
    vm = host.create_vm(GiB)
    with pytest.raises(PvError) as info:
        vm.pv_command(PvCmd.ENABLE, flags=1, rc=RC_IN, rrc=RRC_IN)
    assert (info.value.errno, info.value.rc, info.value.rrc) == (errno.EINVAL, *SENT)
    assert call(vm, 99) == (errno.ENOTTY, *SENT)


# ------------------------------------------------------------------ ENABLE


def test_enable(host):
    vm = host.create_vm(4 * GiB, vcpus=2)
    assert call(vm, PvCmd.ENABLE) == (0, *OK)
    assert call(vm, PvCmd.ENABLE) == (errno.EINVAL, *SENT)  # already protected


def test_enable_without_memory_writes_nothing(host):
    vm = host.create_vm(4 * GiB)
    host.inject_alloc_failure()
    assert call(vm, PvCmd.ENABLE) == (errno.ENOMEM, *SENT)


def test_enable_hands_back_the_failing_uv_call(host):
    vm = host.create_vm(4 * GiB, vcpus=2)
    host.uv.inject_failure(Uvc.CREATE_SEC_CONF, 0x0106, rrc=3)
    assert call(vm, PvCmd.ENABLE) == (errno.EIO, 0x0106, 3)
    host.uv.inject_failure(Uvc.CREATE_SEC_CPU, 0x0105, rrc=4)
    assert call(vm, PvCmd.ENABLE) == (errno.EIO, 0x0105, 4)
    assert not vm.pv_state().protected


# ------------------------------------------------------------------ DISABLE


def test_disable(host):
    vm = host.create_vm(4 * GiB)
    assert call(vm, PvCmd.DISABLE) == (errno.EINVAL, *SENT)
    vm.pv_command(PvCmd.ENABLE)
    assert call(vm, PvCmd.DISABLE) == (0, *OK)


def test_disable_hands_back_the_first_failing_destroy(host):
    vm = protected(host)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0107, rrc=5)
    assert call(vm, PvCmd.DISABLE) == (errno.EIO, 0x0107, 5)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0108, rrc=6)
    assert call(vm, PvCmd.DISABLE) == (errno.EIO, 0x0108, 6)


# ------------------------------------------------------------------ SET_SEC_PARMS, UNPACK, VERIFY, ...


def test_set_sec_parms(host):
    vm = host.create_vm(4 * GiB)
    img = small_image()
    assert call(vm, PvCmd.SET_SEC_PARMS, header=img.header) == (errno.EINVAL, *SENT)  # not protected
    vm.pv_command(PvCmd.ENABLE)
    assert call(vm, PvCmd.SET_SEC_PARMS) == (errno.EFAULT, *SENT)
    limit = (1 << 20) if host.profile.se_header_1m else 2 * 4096  # the newest kernels allow 1 MiB
    assert call(vm, PvCmd.SET_SEC_PARMS, header=img.header, length=limit + 4096) == (errno.EINVAL, *SENT)
    assert call(vm, PvCmd.SET_SEC_PARMS, header=img.header, length=0) == (errno.ENOMEM, *SENT)
    assert call(vm, PvCmd.SET_SEC_PARMS, header=img.header[:16], length=64) == (errno.EFAULT, *SENT)
    refused = call(vm, PvCmd.SET_SEC_PARMS, header=bytes(64))
    assert refused[0] == errno.EINVAL
    assert refused[1:] not in (SENT, OK)  # the UV's refusal code
    assert call(vm, PvCmd.SET_SEC_PARMS, header=img.header) == (0, *OK)


def test_unpack(host):
    vm = host.create_vm(4 * GiB)
    img = small_image()
    comp = img.components[0]
    args = {"addr": comp.addr, "size": comp.size, "tweak": comp.tweak}
    assert call(vm, PvCmd.UNPACK, **args) == (errno.EINVAL, *SENT)  # not protected
    for c in img.components:
        vm.host_write(c.addr, c.data)
    vm.pv_command(PvCmd.ENABLE)
    vm.pv_command(PvCmd.SET_SEC_PARMS, header=img.header)
    assert call(vm, PvCmd.UNPACK) == (errno.EFAULT, *SENT)
    assert call(vm, PvCmd.UNPACK, addr=comp.addr + 1, size=comp.size, tweak=comp.tweak) == (errno.EINVAL, *SENT)
    assert call(vm, PvCmd.UNPACK, addr=comp.addr, size=0, tweak=comp.tweak) == (errno.EINVAL, *SENT)
    assert call(vm, PvCmd.UNPACK, **args) == (0, *OK)
    assert call(vm, PvCmd.VERIFY) == (0, *OK)


@pytest.mark.parametrize("cmd", [PvCmd.VERIFY, PvCmd.PREP_RESET, PvCmd.UNSHARE_ALL])
def test_nodata_commands(host, cmd):
    vm = host.create_vm(4 * GiB)
    assert call(vm, cmd) == (errno.EINVAL, *SENT)
    vm.pv_command(PvCmd.ENABLE)
    uvc = {PvCmd.VERIFY: Uvc.VERIFY_IMG, PvCmd.PREP_RESET: Uvc.PREPARE_RESET, PvCmd.UNSHARE_ALL: Uvc.SET_UNSHARE_ALL}
    host.uv.inject_failure(uvc[cmd], 0x0109, rrc=7)
    assert call(vm, cmd) == (errno.EINVAL, 0x0109, 7)  # a UV refusal is EINVAL, not EIO
    if cmd != PvCmd.VERIFY:  # VERIFY of nothing unpacked is refused by the UV itself
        assert call(vm, cmd) == (0, *OK)


def test_info_never_writes(host):
    vm = host.create_vm(4 * GiB)
    assert call(vm, PvCmd.INFO, id=PvInfoId.VM, len_max=80) == (0, *SENT)
    assert call(vm, PvCmd.INFO, id=PvInfoId.VM, len_max=79) == (errno.EINVAL, *SENT)
    assert call(vm, PvCmd.INFO) == (errno.EFAULT, *SENT)


def test_dump(host):
    vm = protected(host)
    assert call(vm, PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=4096) == (errno.EINVAL, *SENT)
    assert call(vm, PvCmd.DUMP, subcmd=PvDumpSubcmd.CPU) == (errno.ENOTTY, *SENT)
    assert call(vm, PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT) == (0, *OK)
    assert call(vm, PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=4096) == (0, *OK)
    finalize = host.uv.info()["conf_dump_finalize_len"]
    assert call(vm, PvCmd.DUMP, subcmd=PvDumpSubcmd.COMPLETE, buff_len=finalize) == (0, *OK)


# ------------------------------------------------------------------ PREPARE


def test_prepare(any_host):
    vm = protected(any_host)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (0, *ASYNC)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.EINVAL, *SENT)  # not protected now


def test_a_refused_prepare_writes_nothing_although_it_destroyed_the_cpus(any_host):
    vm = protected(any_host)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    vm.pv_command(PvCmd.ENABLE)  # protected again, one record set aside
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.EINVAL, *SENT)
    assert not any(vm.pv_state().vcpu_handles)  # the secure CPUs are gone all the same
    small = protected(any_host, size=2 * GiB)  # segment ASCE
    assert call(small, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.EINVAL, *SENT)


def test_prepare_refused_by_the_host(host):
    vm = protected(pvfast.Host(async_destroy=0))
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.EINVAL, *SENT)
    vm = protected(host)
    host.inject_alloc_failure()
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.ENOMEM, *SENT)


def test_prepare_hands_back_a_failing_cpu_or_destroy_fast(host):
    vm = protected(host)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0107, rrc=1)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.EIO, 0x0107, 1)
    vm = protected(host)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF_FAST, 0x0104)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PREPARE) == (errno.EIO, 0x0104, 0)
    assert vm.pv_state().protected  # Destroy-Fast refused: the VM stays protected


# ------------------------------------------------------------------ PERFORM


def test_perform_with_destroy_fast_hands_back_what_was_passed_in(host):
    vm = protected(host)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PERFORM) == (0, *SENT)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PERFORM) == (errno.EINVAL, *SENT)  # nothing set aside


def test_perform_without_destroy_fast_hands_back_destroy_config():
    host = pvfast.Host(destroy_fast=False)
    vm = protected(host)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PERFORM) == (0, *OK)
    vm.pv_command(PvCmd.ENABLE)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0108, rrc=2)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PERFORM) == (errno.EIO, 0x0108, 2)


def test_perform_refused_when_async_destroy_is_off():
    vm = pvfast.Host(async_destroy=0).create_vm(4 * GiB)
    assert call(vm, PvCmd.ASYNC_CLEANUP_PERFORM) == (errno.EINVAL, *SENT)


def test_perform_stopped_by_a_fatal_signal_is_async_rrc(any_host):
    vm = any_host.create_vm(4 * GiB, vcpus=1)
    vmm.protect(vm, small_image())
    vm.guest_access(3 * GiB, 1 << 20)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    vm.process.fatal_signal.set()  # a fatal signal is pending when the walk checks for one
    assert call(vm, PvCmd.ASYNC_CLEANUP_PERFORM) == (0, *ASYNC)
    assert vm.pv_state().need_cleanup == 1
    vm.process.kill()
    assert any_host.uv.secure_pages() == 0


def test_every_command_has_a_row():
    """Each command of PvCmd is checked above (a new command needs its row)."""
    checked: dict[PvCmd, Callable[..., object]] = {
        PvCmd.ENABLE: test_enable,
        PvCmd.DISABLE: test_disable,
        PvCmd.SET_SEC_PARMS: test_set_sec_parms,
        PvCmd.UNPACK: test_unpack,
        PvCmd.VERIFY: test_nodata_commands,
        PvCmd.PREP_RESET: test_nodata_commands,
        PvCmd.UNSHARE_ALL: test_nodata_commands,
        PvCmd.INFO: test_info_never_writes,
        PvCmd.DUMP: test_dump,
        PvCmd.ASYNC_CLEANUP_PREPARE: test_prepare,
        PvCmd.ASYNC_CLEANUP_PERFORM: test_perform_with_destroy_fast_hands_back_what_was_passed_in,
    }
    assert set(checked) == set(PvCmd)
