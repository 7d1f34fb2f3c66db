"""The command line against absurd input and hostile output (issue 13 item 7): huge numbers, a
reader that goes away, a closed or full standard output, a guest larger than the machine's RAM,
empty paths. Exit status: 0 success, 1 the experiment (or writing its output) failed, 2 bad
command line, 141 the reader went away; never a Python traceback."""

from __future__ import annotations

import io
import json
import os
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


def test_calibrate_checks_the_ram_of_its_largest_measurement(capsys, monkeypatch: pytest.MonkeyPatch):
    """calibrate emulates the phases in state-only memory; 64T secure is 64G of page states."""
    monkeypatch.setattr(experiments, "mem_available", lambda: 8 * GiB)
    err = usage_error(capsys, "calibrate", "--measure", "disable:8G=3.2", "--measure", "disable:64T@64T=100")
    need = experiments.format_size(experiments.ram_needed(64 * TiB, "state"))
    assert f"--measure disable:64T@64T: a guest with 64T secure needs about {need} of RAM" in err
    assert "--no-memory-check" in err
    parser = cli.build_parser()
    args = parser.parse_args(["calibrate", "--measure", "disable:1T=100"])  # 1G of page states fits
    cli._calibrate_ram(args, args.command_parser)
    args = parser.parse_args(["calibrate", "--measure", "disable:64T@64T=100", "--no-memory-check"])
    cli._calibrate_ram(args, args.command_parser)


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


# ------------------------------------------------------------------ unwritable paths (review finding 1)

PROC = Path("/proc")


def _no_run(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("the experiment ran although an output path cannot be written")


def _unwritable_cases(tmp_path: Path) -> list[tuple[list[str], str, str]]:
    """(argv, option, reason): each names a path that cannot be written."""
    cases = [
        (["reboot", *SMALL_RUN[1:], "--plot", str(tmp_path)], "--plot", "it is a directory"),
        (["reboot", *SMALL_RUN[1:], "--json", "--plot", str(tmp_path)], "--plot", "it is a directory"),
        (["reboot", *SMALL_RUN[1:], "--trace", str(tmp_path)], "--trace", "it is a directory"),
        (["shutdown", "--memory", "3G", "--secure", "0", "--plot", str(tmp_path)], "--plot", "it is a directory"),
        (["compare", "--secure", "0", "--memory", "3G", "--plot", str(tmp_path)], "--plot", "it is a directory"),
        (["calibrate", "--measure", "disable:8G=1", "-o", str(tmp_path)], "--output/-o", "it is a directory"),
    ]
    if PROC.is_dir():  # a directory that exists, in which no file can be created (even by root)
        cases += [
            (["reboot", *SMALL_RUN[1:], "--plot", "/proc/x.png"], "--plot", "No such file or directory"),
            (["reboot", *SMALL_RUN[1:], "--trace", "/proc/t.json"], "--trace", "No such file or directory"),
            (["compare", "--secure", "0", "--memory", "3G", "--json", "--trace", "/proc/t.json"], "--trace", ""),
            (["calibrate", "--measure", "disable:8G=1", "-o", "/proc/fit.toml"], "--output/-o", ""),
        ]
    return cases


def test_unwritable_output_paths_are_refused_before_the_run(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in ("reboot", "reboot_repeated", "shutdown", "compare", "calibrate"):
        monkeypatch.setattr(experiments, name, _no_run)
    for argv, option, reason in _unwritable_cases(tmp_path):
        err = usage_error(capsys, *argv)
        assert f"argument {option}: cannot write" in err, argv
        assert reason in err, argv
        assert "Traceback" not in err


def test_the_path_check_leaves_files_as_they_were(tmp_path: Path):
    new = tmp_path / "new.png"
    assert cli.path_arg(str(new)) == str(new)
    assert not new.exists()  # created to try it, removed again
    old = tmp_path / "old.json"
    old.write_text("keep me")
    assert cli.path_arg(str(old)) == str(old)
    assert old.read_text() == "keep me"  # opened for append: not truncated
    link = tmp_path / "dangling.png"
    link.symlink_to(tmp_path / "target.png")
    assert cli.path_arg(str(link)) == str(link)
    assert link.is_symlink()
    assert not (tmp_path / "target.png").exists()
    assert cli.path_arg(os.devnull) == os.devnull  # a device is taken as it is


def test_an_unwritable_plot_in_a_real_process_loses_no_result(tmp_path: Path):
    proc = run_shell(pvfast_cmd(*SMALL_RUN, "--json", "--plot", str(tmp_path)), tmp_path)
    assert proc.returncode == 2
    assert "argument --plot: cannot write" in proc.stderr
    assert "is a directory" in proc.stderr
    assert "Errno" not in proc.stderr
    assert proc.stdout == ""


# ------------------------------------------------------------------ guests above 64 TiB (finding 2)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["reboot", "--memory", "65T", "--guest-memory", "state", "--secure", "0"],
            "--memory 65T is more than the 64T",
        ),
        (
            ["shutdown", "--memory", "65T", "--guest-memory", "state", "--secure", "0"],
            "--memory 65T is more than the 64T",
        ),
        (
            ["compare", "--memory", "65T", "--guest-memory", "state", "--secure", "0"],
            "--memory 65T is more than the 64T",
        ),
        (["compare", "--guest-memory", "state", "--secure", "1G,64T"], "--memory auto for --secure 64T"),
        (["calibrate", "--measure", "disable:65T=100"], "argument --measure: invalid measurement 'disable:65T=100'"),
        (["calibrate", "--measure", "disable:1G@65T=100"], "argument --measure: invalid measurement"),
    ],
)
def test_a_guest_above_64t_is_a_usage_error(capsys, monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str):
    for name in ("reboot", "shutdown", "compare", "calibrate"):
        monkeypatch.setattr(experiments, name, _no_run)
    err = usage_error(capsys, *argv)
    assert message in err
    assert "64T one VM can have" in err
    assert "memory_size" not in err


def test_a_64t_guest_is_still_allowed(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(experiments, "mem_available", lambda: None)
    parser = cli.build_parser()
    for argv in (
        ["reboot", "--memory", "64T", "--guest-memory", "state", "--secure", "0"],
        ["compare", "--memory", "64T", "--guest-memory", "state", "--secure", "64T"],
    ):
        args = parser.parse_args(argv)
        cli._guest_sizes(args, args.command_parser)  # no SystemExit
    assert parser.parse_args(["calibrate", "--measure", "disable:64T@64T=100"]).measure[0].memory == 64 * TiB


# ------------------------------------------------------------------ compare's size list (finding 3)


@pytest.mark.parametrize(("text", "message"), [("1G,,2G", "item 2 of 3 is empty"), ("1G,", "item 2 of 2 is empty")])
def test_an_empty_item_of_the_secure_list_is_refused(capsys, text: str, message: str):
    err = usage_error(capsys, "compare", "--secure", text)
    assert f"invalid size list {text!r}: {message}" in err


def test_one_distinct_size_has_no_slope():
    out, err = io.StringIO(), io.StringIO()
    argv = ["compare", "--secure", "16M,16M", "--memory", "3G", "--no-plot"]
    assert cli.main([*argv, "--json"], out=out, err=err) == 0, err.getvalue()
    doc = json.loads(out.getvalue())
    assert len(doc["rows"]) == 2
    for key in ("seconds_per_gib", "model_seconds_per_gib"):
        assert doc[key] == {"sync_running": None, "async_running": None, "async_cleanup": None}
    out = io.StringIO()
    assert cli.main(argv, out=out, err=io.StringIO()) == 0
    assert "a slope needs at least two different secure sizes" in out.getvalue()
    assert "per GiB" not in out.getvalue()


# ------------------------------------------------------------------ formatting (finding 4)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (-0.0183, "-18.3 ms"),
        (0.0184, "18.4 ms"),
        (-2.5, "-2.50 s"),
        (-5e-6, "-5 µs"),
        (0.0, "0 µs"),
        (-0.0, "0 µs"),
        (-1e-7, "0 µs"),
    ],
)
def test_format_seconds_switches_units_whatever_the_sign(seconds: float, text: str):
    assert cli.format_seconds(seconds) == text


def test_a_falling_slope_is_printed_in_its_unit():
    result = {
        "host": experiments.HostOptions().as_dict(),
        "vcpus": 2,
        "rows": [],
        "seconds_per_gib": {"sync_running": 0.0184, "async_running": 0.0001, "async_cleanup": -0.0183},
    }
    out = io.StringIO()
    cli.print_compare(result, out)
    assert "async background cleanup    -18.3 ms per GiB" in out.getvalue()


@pytest.mark.parametrize(
    ("size", "text"),
    [(5000, "5000"), (4097 * 1024 * 1024, "4097M"), (13 * GiB // 4, "3.25G"), (4 * GiB, "4G"), (0, "0"), (TiB, "1T")],
)
def test_format_size_exact_never_rounds(size: int, text: str):
    assert experiments.format_size_exact(size) == text
    assert experiments.parse_size(text, allow_zero=True) == size


def test_sizes_are_echoed_as_typed(capsys):
    err = usage_error(capsys, "reboot", "--memory", "4G", "--secure", "5000")
    assert "--secure 5000 is not a multiple of 4K" in err
    err = usage_error(capsys, "reboot", "--memory", "4097M", "--secure", "4098M")
    assert "--secure 4098M does not fit in --memory 4097M" in err
    err = usage_error(capsys, "calibrate", "--measure", "disable:5000=1")
    assert "--secure 5000 is not a multiple of 4K" in err


def test_a_headline_does_not_round_the_guest_size():
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["reboot", "--memory", "4097M", "--secure", "0", "--sync"], out=out, err=err) == 0, err.getvalue()
    assert "reboot of a 4097M protected guest with 0 of secure memory" in out.getvalue()
    out = io.StringIO()
    assert cli.main(["shutdown", "--memory", "4097M", "--secure", "4100K", "--no-helper"], out=out, err=err) == 0
    assert "VMM exit with a running 4097M protected guest, 4100K secure memory" in out.getvalue()
