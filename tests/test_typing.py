"""The package is typed: mypy passes on it and the native stub matches the compiled module."""

from __future__ import annotations

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_native_stub_matches_module():
    out = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "pvfast._native"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_on_package():
    out = subprocess.run([sys.executable, "-m", "mypy", "python/pvfast"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_py_typed_is_shipped():
    import pvfast

    assert (pathlib.Path(pvfast.__file__).parent / "py.typed").exists()


# ---------------------------------------------------------------- typed PV commands under mypy --strict

# Calls every command with exactly its keywords, through the enum and the kernel spelling.
EVERY_COMMAND = """
import pvfast
from pvfast import PvCmd, PvDumpSubcmd, PvInfoId, PvResult


def run(vm: pvfast.Vm, header: bytes) -> list[PvResult]:
    out = [
        vm.pv_command(PvCmd.ENABLE),
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=header),
        vm.pv_command(PvCmd.SET_SEC_PARMS, header=header, length=len(header)),
        vm.pv_command(PvCmd.UNPACK, addr=0x10000, size=4096, tweak=1),
        vm.pv_command(PvCmd.VERIFY),
        vm.pv_command(PvCmd.PREP_RESET),
        vm.pv_command(PvCmd.UNSHARE_ALL),
        vm.pv_command(PvCmd.INFO, id=PvInfoId.VM, len_max=80),
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.INIT),
        vm.pv_command(PvCmd.DUMP, subcmd=PvDumpSubcmd.CONFIG_STOR_STATE, buff_len=4096, gaddr=0),
        vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE),
        vm.pv_command(PvCmd.ASYNC_CLEANUP_PERFORM),
        vm.pv_command(PvCmd.DISABLE, rc=0, rrc=0, flags=0),
        vm.pv_command(pvfast.KVM_PV_UNPACK, addr=0, size=4096, tweak=0),
        vm.pv_command(pvfast.KVM_PV_INFO, id=0, len_max=80),
        vm.pv_command(pvfast.KVM_PV_DISABLE),
        vm.pv_command(PvCmd.UNPACK),  # no data at all: type-checks, and the kernel says EFAULT
        vm.pv_command(99),  # an unknown command number: ENOTTY at run time
    ]
    state = vm.pv_state()
    for leak in state.leaks:
        kind: str = leak["kind"]
        size: int = leak["size"]
        assert kind and size >= 0
    info = vm.host.uv.info()
    words: tuple[int, int, int, int] = info["inst_calls_list"]
    cpus: int = info["max_guest_cpu_id"] + 1
    assert words and cpus
    return out
"""

WRONG_KEYWORDS = {
    "misspelled": "vm.pv_command(PvCmd.UNPACK, adr=0, size=4096, tweak=0)",
    "other command's": "vm.pv_command(PvCmd.DISABLE, header=b'x')",
    "missing field": "vm.pv_command(PvCmd.UNPACK, addr=0, size=4096)",
    "wrong type": "vm.pv_command(PvCmd.INFO, id='vm', len_max=80)",
    "header as str": "vm.pv_command(PvCmd.SET_SEC_PARMS, header='hdr')",
    "int spelling": "vm.pv_command(pvfast.KVM_PV_VERIFY, addr=0)",
    "asce type": "t: Literal['segment', 'region3'] = vm.asce_type",
    "uv info key": "vm.host.uv.info()['max_cpus']",
    "leak key": "vm.pv_state().leaks[0]['owner']",
}


def _mypy_strict(tmp_path: pathlib.Path, name: str, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / f"{name}.py"
    path.write_text(source, encoding="utf-8")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            "/dev/null",
            "--cache-dir",
            str(tmp_path.parent / "mypy-cache"),
            str(path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )


def test_mypy_strict_accepts_every_command_with_its_keywords(tmp_path):
    out = _mypy_strict(tmp_path, "every_command", EVERY_COMMAND)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_strict_rejects_a_wrong_keyword(tmp_path):
    body = "\n".join(f"    {line}  # {why}" for why, line in WRONG_KEYWORDS.items())
    source = (
        "from typing import Literal\n\nimport pvfast\nfrom pvfast import PvCmd\n\n\n"
        f"def run(vm: pvfast.Vm) -> None:\n{body}\n"
    )
    out = _mypy_strict(tmp_path, "wrong_keywords", source)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = source.splitlines()
    flagged = {int(line.split(":")[1]) for line in out.stdout.splitlines() if ": error:" in line}
    for why, call in WRONG_KEYWORDS.items():
        lineno = next(i for i, text in enumerate(lines, 1) if call in text)
        assert lineno in flagged, f"mypy --strict accepted the {why} call: {call}\n{out.stdout}"


def test_kernel_spellings_agree_with_the_enum():
    import pvfast

    for cmd in pvfast.PvCmd:
        assert getattr(pvfast, f"KVM_PV_{cmd.name}") == cmd
        assert type(getattr(pvfast, f"KVM_PV_{cmd.name}")) is int
