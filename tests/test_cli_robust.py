"""The command line against absurd input and hostile output (issue 13 item 7): huge numbers, a
reader that goes away, a closed or full standard output, a guest larger than the machine's RAM,
empty paths. Exit status: 0 success, 1 the experiment (or writing its output) failed, 2 bad
command line, 141 the reader went away; never a Python traceback."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from pvfast import cli, experiments
from pvfast.experiments import GiB, TiB

HUGE = "9" * 400
PVFAST = [sys.executable, "-m", "pvfast"]
SMALL_RUN = ["reboot", "--memory", "3G", "--secure", "0", "--sync"]


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv), out=io.StringIO(), err=io.StringIO())
    assert exc.value.code == 2
    return capsys.readouterr().err


def run_shell(command: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", command], capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)


def pvfast_cmd(*argv: str) -> str:
    return " ".join([*PVFAST, *argv])


# ------------------------------------------------------------------ huge numbers


@pytest.mark.parametrize("option", ["--memory", "--secure"])
def test_a_400_digit_size_is_a_usage_error(capsys, option: str):
    err = usage_error(capsys, "reboot", option, HUGE)
    assert "larger than 16777216T" in err
    assert "(400 characters)" in err  # not echoed in full
    assert HUGE not in err


@pytest.mark.parametrize("text", [HUGE, HUGE + "T", "0." + HUGE, HUGE + "." + HUGE + "K", "16777217T", "1e3G"])
def test_parse_size_never_overflows(text: str):
    with pytest.raises(ValueError, match="invalid size"):
        experiments.parse_size(text)
    assert experiments.parse_size("16777216T") == 1 << 64  # the 64-bit address space is the limit


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reboot", "--vcpus", HUGE], "invalid vCPU count"),
        (["reboot", "--walk-threads", HUGE], "invalid thread count"),
        (["reboot", "--repeat", HUGE], "invalid repeat count"),
        (["compare", "--repeat", "10001"], "expected 1..10000"),
        (["compare", "--secure", f"1G,{HUGE}"], "larger than 16777216T"),
        (["calibrate", "--measure", f"disable:{HUGE}G=1"], "larger than 16777216T"),
        (["calibrate", "--measure", "disable:8G=1e400"], "is not a positive time"),
    ],
)
def test_huge_numbers_elsewhere_are_usage_errors(capsys, argv: list[str], message: str):
    err = usage_error(capsys, *argv)
    assert message in err
    assert HUGE not in err


def test_a_400_digit_size_in_a_real_process(tmp_path: Path):
    proc = run_shell(pvfast_cmd("reboot", "--memory", HUGE), tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "larger than 16777216T" in proc.stderr


# ------------------------------------------------------------------ the reader goes away


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"], [*SMALL_RUN, "--json"], ["reboot", "--help"]])
def test_a_reader_that_went_away_ends_the_command_quietly(argv: list[str]):
    proc = subprocess.Popen([*PVFAST, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first byte is written
    err = proc.stderr.read().decode()
    code = proc.wait(timeout=120)
    assert err == ""
    assert code == cli.EXIT_BROKEN_PIPE == 141


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"]])
def test_head_c1(tmp_path: Path, argv: list[str]):
    proc = run_shell(pvfast_cmd(*argv) + " | head -c1", tmp_path)
    assert proc.returncode == 0
    assert proc.stdout in ("p", "{")
    assert proc.stderr == ""


# ------------------------------------------------------------------ closed or full stdout


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"], SMALL_RUN])
def test_closed_stdout_is_an_error_not_a_traceback(tmp_path: Path, argv: list[str]):
    proc = run_shell(pvfast_cmd(*argv) + " >&-", tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "error: standard output is closed" in proc.stderr


@pytest.mark.parametrize("argv", [["info"], ["info", "--json"], [*SMALL_RUN, "--csv"], ["--help"], ["--version"]])
def test_full_stdout_is_an_error_not_a_traceback(tmp_path: Path, argv: list[str]):
    proc = run_shell(pvfast_cmd(*argv) + " > /dev/full", tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "Exception ignored" not in proc.stderr
    assert "cannot write the output: No space left on device" in proc.stderr


def test_closed_or_full_stderr_does_not_stop_the_run(tmp_path: Path):
    for redirect in ("2>&-", "2>/dev/full"):
        proc = run_shell(pvfast_cmd(*SMALL_RUN, "--progress", "--log", "kvm_uv") + f" {redirect}", tmp_path)
        assert proc.returncode == 0, proc.stdout
        assert "reboot of a 3G protected guest" in proc.stdout


# ------------------------------------------------------------------ RAM


def test_a_guest_larger_than_the_machine_is_refused_before_it_starts(capsys, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(experiments, "mem_available", lambda: 8 * GiB)
    err = usage_error(capsys, "reboot", "--memory", "2T", "--secure", "1T")
    assert "--secure 1T needs about 1T of RAM with --guest-memory real" in err
    assert "this machine has 8G available (MemAvailable in /proc/meminfo)" in err
    assert "use --guest-memory state" in err
    assert "--no-memory-check" in err
    err = usage_error(capsys, "compare", "--secure", "1G,16G")
    need = experiments.format_size(experiments.ram_needed(16 * GiB))
    assert f"--secure 16G needs about {need} of RAM" in err  # the largest size of the list
    err = usage_error(capsys, "shutdown", "--guest-memory", "state", "--memory", "64T", "--secure", "64T")
    need = experiments.format_size(experiments.ram_needed(64 * TiB, "state"))
    assert f"needs about {need} of RAM with --guest-memory state" in err
    assert "use --guest-memory state" not in err


def test_memory_check_passes_what_fits_and_can_be_turned_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(experiments, "mem_available", lambda: 8 * GiB)
    parser = cli.build_parser()
    for argv in (
        ["reboot", "--memory", "2T", "--secure", "1T", "--no-memory-check"],
        ["reboot", "--guest-memory", "state", "--memory", "4T", "--secure", "4T"],  # 4G of state words
        ["compare", "--secure", "1G,4G"],
    ):
        args = parser.parse_args(argv)
        cli._guest_sizes(args, args.command_parser)  # no SystemExit
    monkeypatch.setattr(experiments, "mem_available", lambda: None)  # unknown: no check
    args = parser.parse_args(["reboot", "--memory", "2T", "--secure", "1T"])
    cli._guest_sizes(args, args.command_parser)


def test_mem_available_reads_proc_meminfo():
    have = experiments.mem_available()
    if not Path("/proc/meminfo").exists():
        assert have is None
        return
    assert have is not None
    assert 0 < have <= experiments.machine_info()["ram_bytes"]
    assert experiments.ram_needed(TiB, "real") > TiB
    assert experiments.ram_needed(4 * TiB, "state") == 4 * GiB + experiments.RAM_OVERHEAD


def test_the_real_2t_run_is_refused_here(tmp_path: Path):
    have = experiments.mem_available()
    if have is None or have >= TiB:
        pytest.skip("needs a machine with less than 1 TiB available")
    proc = run_shell(pvfast_cmd("reboot", "--memory", "2T", "--secure", "1T"), tmp_path)
    assert proc.returncode == 2
    assert "needs about 1T of RAM" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ empty paths


@pytest.mark.parametrize(
    "argv",
    [
        ["reboot", "--plot", ""],
        ["reboot", "--trace", ""],
        ["shutdown", "--plot", ""],
        ["shutdown", "--trace", ""],
        ["compare", "--plot", ""],
        ["compare", "--trace", ""],
        ["calibrate", "--measure", "disable:8G=1", "-o", ""],
    ],
)
def test_empty_paths_are_refused(capsys, argv: list[str]):
    err = usage_error(capsys, *argv)
    assert "empty file name" in err


def test_paths_in_missing_directories_are_refused(capsys, tmp_path: Path):
    err = usage_error(capsys, "reboot", "--trace", str(tmp_path / "missing" / "t.json"))
    assert "does not exist" in err
