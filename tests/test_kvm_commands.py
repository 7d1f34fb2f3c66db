"""KVM_S390_PV_COMMAND: the ioctl prologue (kvm_arch_vm_ioctl) and the synchronous commands
(kvm_s390_handle_pv: ENABLE .. DUMP; arch/s390/kvm/kvm-s390.c @ cc726886079f)."""

from __future__ import annotations

import errno
import logging
import struct

import pytest

import pvfast
from pvfast import Cap, PvCmd, PvDumpSubcmd, PvError, PvInfoId, Uvc

from .conftest import GiB, MiB, enable


def raises_errno(err: int):
    return pytest.raises(PvError, match=f"IOCTL rc: -{err}$")


# ---------------------------------------------------------------- constants and host


def test_constants_match_kernel():
    assert pvfast.KVM_S390_PV_COMMAND == 0xC020AEC5
    assert pvfast.KVM_PV_ASYNC_CLEANUP_PREPARE == 9
    assert pvfast.KVM_PV_ASYNC_CLEANUP_PERFORM == 10
    assert pvfast.KVM_CAP_S390_PROTECTED_ASYNC_DISABLE == 224
    assert Uvc.DESTROY_SEC_CONF_FAST.value == 0x0102
    assert Uvc.DESTR_SEC_STOR.value == 0x0202
    from pvfast import kvm

    assert kvm.PvCmd is PvCmd
    assert kvm.KVM_PV_DUMP == 8


@pytest.mark.parametrize(
    ("kwargs", "c180", "c224"),
    [
        ({}, 1, 1),
        ({"async_destroy": 0}, 1, 0),
        ({"async_destroy": 7}, 1, 1),
        ({"prot_virt": False}, 0, 0),
        ({"prot_virt": False, "async_destroy": 0}, 0, 0),
    ],
)
def test_check_extension_formulas(kwargs, c180, c224):
    host = pvfast.Host(**kwargs)
    assert host.check_extension(Cap.S390_PROTECTED) == c180
    assert host.check_extension(224) == c224
    assert host.check_extension(12345) == 0
    vm = host.create_vm(64 * MiB)
    assert vm.check_extension(224) == c224
    assert vm.check_extension(180) == c180


def test_dump_capability_needs_dump_uvcs():
    assert pvfast.Host().check_extension(217) == 1
    assert pvfast.Host(dump=False).check_extension(217) == 0
    assert pvfast.Host(prot_virt=False).check_extension(217) == 0


def test_module_param_is_read_only_and_in_sysfs():
    host = pvfast.Host(async_destroy=0)
    assert host.module_params == {"async_destroy": 0}
    assert host.read_sysfs("/sys/module/kvm/parameters/async_destroy") == "0\n"
    assert pvfast.Host().read_sysfs("/sys/module/kvm/parameters/async_destroy") == "1\n"
    with pytest.raises(TypeError):
        host.module_params["async_destroy"] = 1  # type: ignore[index]
    with pytest.raises((TypeError, PermissionError)):
        host.module_params = {"async_destroy": 1}
    with pytest.raises(PermissionError):
        host.async_destroy = 1
    with pytest.raises(FileNotFoundError):
        host.read_sysfs("/sys/module/kvm/parameters/nope")
    assert host.module_params["async_destroy"] == 0


def test_host_rejects_bad_options():
    with pytest.raises(TypeError, match="async_destroy"):
        pvfast.Host(async_destroy="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="prot_virt"):
        pvfast.Host(prot_virt="yes")  # type: ignore[arg-type]


# ---------------------------------------------------------------- prologue (kvm_arch_vm_ioctl)


def test_unknown_command_is_enotty_and_sets_cpu_state_ctrl(host):
    vm = host.create_vm(64 * MiB)
    assert not vm.pv_state().user_cpu_state_ctrl
    with raises_errno(errno.ENOTTY) as ei:
        vm.pv_command(99, rc=5, rrc=6)
    assert ei.value.errno == errno.ENOTTY
    assert (ei.value.rc, ei.value.rrc) == (5, 6)
    assert vm.pv_state().user_cpu_state_ctrl


def test_flags_nonzero_is_einval_before_the_handler(host):
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.ENABLE, flags=1)
    assert not vm.pv_state().protected
    with raises_errno(errno.EINVAL):  # flags are checked before the command number
        vm.pv_command(99, flags=1)


def test_no_pv_host_is_einval_for_every_command():
    host = pvfast.Host(prot_virt=False)
    vm = host.create_vm(64 * MiB)
    for cmd in [*PvCmd, 99]:
        with raises_errno(errno.EINVAL):
            vm.pv_command(cmd, rc=3, rrc=4)
    assert vm.pv_state().user_cpu_state_ctrl


def test_rc_rrc_passed_in_are_returned_when_untouched(host):
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL) as ei:
        vm.pv_command(PvCmd.DISABLE, rc=0x1234, rrc=0x55)
    assert (ei.value.rc, ei.value.rrc) == (0x1234, 0x55)


def test_pverror_str_reads_like_qemu(host):
    vm = host.create_vm(64 * MiB)
    with pytest.raises(PvError) as ei:
        vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    assert str(ei.value) == ("KVM PV command 9 (KVM_PV_ASYNC_CLEANUP_PREPARE) failed: header rc 0 rrc 0 IOCTL rc: -22")
    assert isinstance(ei.value, OSError)
    assert ei.value.cmd is PvCmd.ASYNC_CLEANUP_PREPARE


def test_python_misuse_is_typeerror_and_changes_nothing(host):
    vm = host.create_vm(64 * MiB)
    with pytest.raises(TypeError, match="cmd"):
        vm.pv_command("ENABLE")
    with pytest.raises(TypeError, match="header"):
        vm.pv_command(PvCmd.SET_SEC_PARMS, header="text")
    with pytest.raises(TypeError, match="addr"):
        vm.pv_command(PvCmd.UNPACK, addr="0", size=4096, tweak=0)
    with pytest.raises(ValueError, match="addr"):
        vm.pv_command(PvCmd.UNPACK, addr=-1, size=4096, tweak=0)
    with pytest.raises(TypeError, match="bogus"):
        vm.pv_command(PvCmd.ENABLE, bogus=1)
    with pytest.raises(TypeError, match="header"):
        vm.pv_command(PvCmd.UNPACK, header=b"x")
    with pytest.raises(ValueError, match="flags"):
        vm.pv_command(PvCmd.ENABLE, flags=-1)
    state = vm.pv_state()
    assert not state.user_cpu_state_ctrl
    assert not state.protected


def test_closed_vm_raises_valueerror(host):
    vm = host.create_vm(64 * MiB)
    vm.close()
    vm.close()  # twice is a no-op
    with pytest.raises(ValueError, match="VM is closed"):
        vm.pv_command(PvCmd.ENABLE)
    with pytest.raises(ValueError, match="VM is closed"):
        vm.guest_access(0)


def test_create_vm_validates_sizes(host):
    proc = host.spawn_process()
    for bad in (0, -MiB, MiB + 1, 4096):
        with pytest.raises(ValueError, match="memory_size"):
            proc.create_vm(bad)
    with pytest.raises(TypeError, match="memory_size"):
        proc.create_vm(1.5 * MiB)


def test_asce_type_follows_memory_limit(host):
    assert host.create_vm(2 * GiB).asce_type == "segment"
    assert host.create_vm(2 * GiB + MiB).asce_type == "region3"
    assert host.create_vm(1 << 42).asce_type == "region3"
    assert host.create_vm((1 << 42) + MiB).asce_type == "region2"
    vm = host.spawn_process().create_vm(64 * MiB, memory_limit=4 * GiB)
    assert vm.memory_limit == 4 * GiB
    assert vm.asce_type == "region3"


# ---------------------------------------------------------------- ENABLE / DISABLE


def test_enable_disable_roundtrip(any_host):
    host = any_host
    vm = host.create_vm(4 * GiB, vcpus=2)
    res = enable(vm)
    assert (res.rc, res.rrc) == (1, 0)
    st = vm.pv_state()
    assert st.protected
    assert st.handle in host.uv.config_handles()
    assert st.protected_count == 1
    assert st.service_irq_masked
    assert all(st.vcpu_handles)
    assert len(st.vcpu_handles) == 2
    with raises_errno(errno.EINVAL):
        enable(vm)  # already protected
    res = vm.pv_command(PvCmd.DISABLE)
    assert res.rc == 1
    st = vm.pv_state()
    assert not st.protected
    assert st.protected_count == 0
    assert not st.service_irq_masked
    assert not any(st.vcpu_handles)
    assert host.uv.config_handles() == set()
    stats = host.uv.stats()
    assert stats["CREATE_SEC_CONF"] == 1
    assert stats["DESTROY_SEC_CONF"] == 1
    assert stats["CREATE_SEC_CPU"] == 2
    assert stats["DESTROY_SEC_CPU"] == 2
    assert stats.get("DESTROY_SEC_CONF_FAST", 0) == 0  # DISABLE never uses Destroy-Fast


def test_disable_not_protected_is_einval(host):
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.DISABLE)


def test_enable_create_config_failure_is_eio_and_undone(host):
    vm = host.create_vm(64 * MiB)
    host.uv.inject_failure(Uvc.CREATE_SEC_CONF, 0x0106, rrc=3)
    with raises_errno(errno.EIO) as ei:
        enable(vm)
    assert (ei.value.rc, ei.value.rrc) == (0x0106, 3)
    st = vm.pv_state()
    assert not st.protected
    assert st.protected_count == 0
    assert st.leaked == 0
    assert not st.service_irq_masked  # init_vm failed: the mask is not set
    assert host.kernel_memory() == _baseline_kmem(vm)


def _baseline_kmem(vm: pvfast.Vm) -> int:
    # top table (16 KiB) + SCA page: what a non-protected VM owns
    return 16384 + 4096


def test_enable_cpu_failure_undoes_cpus_and_config(host):
    vm = host.create_vm(64 * MiB, vcpus=3)
    host.uv.inject_failure(Uvc.CREATE_SEC_CPU, 0x0103, rrc=1, count=1)
    with raises_errno(errno.EIO) as ei:
        enable(vm)
    assert (ei.value.rc, ei.value.rrc) == (0x0103, 1)
    st = vm.pv_state()
    assert not st.protected
    assert st.protected_count == 0
    assert st.service_irq_masked  # ENABLE masks service interrupts even when cpus_to_pv failed
    assert host.uv.config_handles() == set()
    assert host.uv.stats()["DESTROY_SEC_CONF"] == 1


def test_vcpu_created_while_protected_gets_a_secure_cpu(host):
    vm = host.create_vm(64 * MiB, vcpus=1)
    enable(vm)
    vm.create_vcpu()
    st = vm.pv_state()
    assert len(st.vcpu_handles) == 2
    assert all(st.vcpu_handles)
    assert len(host.uv.cpu_handles(st.handle)) == 2 if hasattr(host.uv, "cpu_handles") else True


def test_disable_cpu_destroy_failure_stops_and_leaks_cpu(host):
    vm = host.create_vm(64 * MiB, vcpus=2)
    enable(vm)
    host.uv.inject_failure(Uvc.DESTROY_SEC_CPU, 0x0021, rrc=7)
    with raises_errno(errno.EIO) as ei:
        vm.pv_command(PvCmd.DISABLE)
    assert (ei.value.rc, ei.value.rrc) == (0x0021, 7)
    st = vm.pv_state()
    assert st.protected
    assert st.service_irq_masked  # stopped before cleanup-all
    assert st.leaked == 1
    assert st.leaks[0]["kind"] == "cpu_stor"
    assert host.uv.stats()["DESTROY_SEC_CONF"] == 0  # no config destroy was tried
    # the UV still has that CPU, so a retry fails in Destroy Config and leaks the donations
    with raises_errno(errno.EIO):
        vm.pv_command(PvCmd.DISABLE)
    st = vm.pv_state()
    assert st.protected
    assert st.protected_count == 1  # a failed Destroy Config keeps the handle and the count (deinit_vm)
    assert {leak["kind"] for leak in st.leaks} == {"cpu_stor", "stor_base", "stor_var", "crst"}


def test_disable_config_destroy_failure_keeps_handle_and_counter(host):
    vm = host.create_vm(4 * GiB)
    enable(vm)
    handle = vm.pv_state().handle
    host.uv.inject_failure(Uvc.DESTROY_SEC_CONF, 0x0003, rrc=9)
    with raises_errno(errno.EIO) as ei:
        vm.pv_command(PvCmd.DISABLE)
    assert (ei.value.rc, ei.value.rrc) == (0x0003, 9)
    st = vm.pv_state()
    assert st.handle == handle
    assert st.protected_count == 1
    assert not st.service_irq_masked
    assert st.leaked == 3  # base, variable storage, old top table
    assert handle in host.uv.config_handles()


# ---------------------------------------------------------------- SET_SEC_PARMS, UNPACK, VERIFY …


def test_set_sec_parms_errnos(host):
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=b"x" * 64)  # not protected
    enable(vm)
    with raises_errno(errno.EFAULT):
        vm.pv_command(PvCmd.SET_SEC_PARMS)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=b"\0" * 8193)
    with raises_errno(errno.ENOMEM):
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=b"")
    with raises_errno(errno.EFAULT):
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=b"abc", length=64)
    with raises_errno(errno.EINVAL) as ei:  # the UV rejects garbage: EINVAL, not EIO
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=b"garbage!" * 16)
    assert ei.value.rc not in (0, 1)


def test_unpack_checks(host):
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.UNPACK, addr=0, size=4096, tweak=0)
    enable(vm)
    with raises_errno(errno.EFAULT):
        vm.pv_command(PvCmd.UNPACK)
    for addr, size in ((1, 4096), (0, 0), (0, 100)):
        with raises_errno(errno.EINVAL):
            vm.pv_command(PvCmd.UNPACK, addr=addr, size=size, tweak=0)


@pytest.mark.parametrize(
    ("cmd", "uvc"),
    [(PvCmd.VERIFY, Uvc.VERIFY_IMG), (PvCmd.PREP_RESET, Uvc.PREPARE_RESET), (PvCmd.UNSHARE_ALL, Uvc.SET_UNSHARE_ALL)],
)
def test_nodata_commands(host, cmd, uvc):
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL):
        vm.pv_command(cmd)
    enable(vm)
    host.uv.inject_failure(uvc, 0x0107, rrc=2)
    with raises_errno(errno.EINVAL) as ei:  # UV error → EINVAL, not EIO (invariant 22)
        vm.pv_command(cmd)
    assert (ei.value.rc, ei.value.rrc) == (0x0107, 2)
    if cmd != PvCmd.VERIFY:
        assert vm.pv_command(cmd).rc == 1


def test_info(host):
    vm = host.create_vm(64 * MiB)  # works on a non-protected VM
    with raises_errno(errno.EFAULT):
        vm.pv_command(PvCmd.INFO)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.INFO, id=PvInfoId.VM, len_max=15)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.INFO, id=PvInfoId.VM, len_max=79)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.INFO, id=PvInfoId.DUMP, len_max=39)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.INFO, id=2, len_max=4096)
    res = vm.pv_command(PvCmd.INFO, id=PvInfoId.VM, len_max=4096, rc=7, rrc=8)
    assert (res.rc, res.rrc) == (7, 8)  # INFO leaves rc/rrc untouched
    assert res.data is not None
    assert len(res.data) == 80
    info_id, len_max, written, _ = struct.unpack(">4I", res.data[:16])
    assert (info_id, len_max, written) == (0, 4096, 80)
    words = struct.unpack(">4Q", res.data[16:48])
    assert words[0] & (1 << (63 - 23))  # Destroy-Fast installed
    res = vm.pv_command(PvCmd.INFO, id=PvInfoId.DUMP, len_max=40)
    assert res.data is not None
    assert len(res.data) == 40


@pytest.mark.parametrize("kernel", ["6.6", "latest"])
def test_dump_sequence_and_dumping_after_disable(kernel):
    host = pvfast.Host(kernel=kernel)
    vm = host.create_vm(64 * MiB)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)
    enable(vm)
    with raises_errno(errno.EFAULT):
        vm.pv_command(PvCmd.DUMP)
    with raises_errno(errno.EINVAL):  # not dumping yet
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=4096, gaddr=0)
    with raises_errno(errno.ENOTTY):
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CPU)
    with raises_errno(errno.ENOTTY):
        vm.pv_command(PvCmd.DUMP, subcmd=77)
    assert vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT).rc == 1
    assert vm.pv_state().dumping
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)  # already dumping
    chunk = host.uv.info()["conf_dump_storage_state_len"]
    # argument errors leave through kvm_s390_pv_dump_stor_state's exit, which copies the
    # (zero) UVC header: rc = rrc = 0 whatever was passed in
    with raises_errno(errno.EINVAL) as ei:
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=chunk, gaddr=4096, rc=7, rrc=8)
    assert (ei.value.rc, ei.value.rrc) == (0, 0)
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=chunk + 1, gaddr=0)
    before = host.uv.stats().get("DUMP_CONF_STOR_STATE", 0)
    res = vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=4 * chunk, gaddr=0)
    assert res.data is not None
    assert len(res.data) == 4 * chunk
    assert res.gaddr == 4 * MiB
    assert host.uv.stats()["DUMP_CONF_STOR_STATE"] - before == 4
    # Up to the newest kernels DISABLE does not end the dump (kvm_s390_clear_pv_state leaves
    # `dumping`), so the next protected guest cannot start one; the newest kernels reset it.
    vm.pv_command(PvCmd.DISABLE)
    assert vm.pv_state().dumping == (kernel != "latest")
    enable(vm)
    if kernel == "latest":
        assert vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT).rc == 1
    else:
        with raises_errno(errno.EINVAL):
            vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)  # "already dumping"


def test_dump_complete(host):
    vm = host.create_vm(64 * MiB)
    enable(vm)
    vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT)
    fin = host.uv.info()["conf_dump_finalize_len"]
    with raises_errno(errno.EINVAL):
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.COMPLETE, buff_len=fin - 1)
    res = vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.COMPLETE, buff_len=fin)
    assert res.data is not None
    assert len(res.data) == fin
    assert not vm.pv_state().dumping


def test_kvm_uv_debug_log(host, caplog):
    vm = host.create_vm(64 * MiB)
    with caplog.at_level(logging.DEBUG, logger="pvfast.kvm_uv"):
        enable(vm)
        vm.pv_command(PvCmd.DISABLE)
    msgs = [r.getMessage() for r in caplog.records if r.name == "pvfast.kvm_uv"]
    assert any("CREATE VM" in m and "rc 1" in m for m in msgs)
    assert any("DESTROY VCPU 0" in m for m in msgs)
    assert any("DESTROY VM: rc 1" in m for m in msgs)
