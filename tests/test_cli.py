"""The ``pvfast`` command line: every subcommand runs, --json parses, errors exit 2, plot and trace files are valid."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import pvfast
from pvfast import cli, experiments
from pvfast.experiments import GiB, KiB, MiB, TiB

SMALL = ["--memory", "3G", "--secure", "64M"]
SMALL_PAGES = 64 * MiB // 4096


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def run_json(*argv: str) -> dict:
    code, out, err = run(*argv, "--json")
    assert code == 0, err
    return json.loads(out)


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv), out=io.StringIO(), err=io.StringIO())
    assert exc.value.code == 2
    return capsys.readouterr().err


# ------------------------------------------------------------------ sizes


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("3.25G", 13 * GiB // 4),
        ("64K", 64 * KiB),
        ("64M", 64 * MiB),
        ("8G", 8 * GiB),
        ("1T", TiB),
        ("1.5G", 3 * GiB // 2),
        ("2g", 2 * GiB),
        ("2GiB", 2 * GiB),
        ("512MB", 512 * MiB),
    ],
)
def test_parse_size(text, value):
    assert experiments.parse_size(text) == value
    assert experiments.parse_size(experiments.format_size(value)) == value


@pytest.mark.parametrize("text", ["", "G", "12Q", "-1G", "0", "1.3K", "1 G B", "0x10M"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="invalid size"):
        experiments.parse_size(text)


# ------------------------------------------------------------------ help, usage errors


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for command in ("info", "reboot", "shutdown", "compare"):
        assert command in text
    assert "pvfast compare --secure 1G,2G,4G --plot compare.png" in text


@pytest.mark.parametrize("command", ["info", "reboot", "shutdown", "compare"])
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    assert "--async-destroy" in text
    assert "--no-destroy-fast" in text
    assert "--no-misc" in text
    if command != "info":
        assert "--trace" in text
        assert "--json" in text


def test_python_dash_m():
    proc = subprocess.run([sys.executable, "-m", "pvfast", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "usage: pvfast" in proc.stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["reboot", "--secure", "12Q"], "invalid size '12Q'"),
        (["reboot", "--memory=-1G"], "invalid size '-1G'"),
        (["reboot", "--memory", "3G", "--secure", "4G"], "--secure 4G does not fit in --memory 3G"),
        (["reboot", "--memory", "3G", "--secure", "1000"], "not a multiple of 4K"),
        (["reboot", "--memory", "3000K", "--secure", "4K"], "not a multiple of 1M"),
        (["shutdown", "--memory", "2G", "--secure", "3G"], "does not fit in --memory 2G"),
        (["compare", "--secure", "1G,x"], "invalid size 'x'"),
        (["compare", "--secure", ","], "invalid size list"),
        (["compare", "--secure", "4G", "--memory", "3G"], "--secure 4G does not fit in --memory 3G"),
        (["reboot", "--guest-memory", "virtual"], "invalid choice: 'virtual'"),
        (["reboot", "--clock", "cpu"], "invalid choice: 'cpu'"),
        (["reboot", "--walk-threads", "-1"], "invalid thread count '-1'"),
        (["reboot", "--costs", "/nonexistent/costs.toml"], "cannot read cost file"),
        (["calibrate"], "the following arguments are required: --measure"),
        (["calibrate", "--measure", "disable:8G"], "invalid measurement 'disable:8G'"),
        (["calibrate", "--measure", "boot:8G=1"], "'boot' is not one of"),
        (["calibrate", "--measure", "disable:8G=1", "--fit", "uvc.QUI.per_page_ns"], "no per-page work in QUI"),
        (["reboot", "--sync", "--async"], "not allowed with argument"),
        (["info", "--async-destroy", "2"], "expected 0 or 1"),
        (["info", "--kernel", "6.3"], "unknown kernel profile '6.3'; the profiles are 6.2, 6.4, 6.5, 6.6, latest"),
        (["reboot", "--kernel", "5.15"], "unknown kernel profile '5.15'"),
        (["reboot", "--vcpus", "0"], "invalid vCPU count"),
        (["compare", "--repeat", "0"], "invalid repeat count"),
        (["reboot", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice"),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(capsys, argv, message):
    err = usage_error(capsys, *argv)
    assert message in err
    assert "usage: pvfast" in err


# ------------------------------------------------------------------ info


def test_info_table():
    code, out, _ = run("info")
    assert code == 0
    assert "KVM_CAP_S390_PROTECTED_ASYNC_DISABLE" in out
    assert "/sys/module/kvm/parameters/async_destroy" in out


def test_info_json_follows_host_options():
    info = run_json("info")
    assert info["capabilities"]["S390_PROTECTED_ASYNC_DISABLE"] == {"cap": 224, "value": 1}
    assert info["capabilities"]["S390_PROTECTED"]["value"] == 1
    assert info["module_params"] == {"async_destroy": 1}
    assert info["sysfs"]["/sys/module/kvm/parameters/async_destroy"] == "1"
    assert info["uv"]["destroy_fast"]
    assert info["uv"]["feature_misc"]

    info0 = run_json("info", "--async-destroy", "0", "--no-destroy-fast", "--no-misc")
    assert info0["capabilities"]["S390_PROTECTED_ASYNC_DISABLE"]["value"] == 0
    assert info0["sysfs"]["/sys/module/kvm/parameters/async_destroy"] == "0"
    assert not info0["uv"]["destroy_fast"]
    assert not info0["uv"]["feature_misc"]


def test_info_shows_the_kernel_profile_and_its_deltas():
    code, out, _ = run("info", "--kernel", "6.2")
    assert code == 0
    assert "kernel 6.2," in out
    assert "kernel profile 6.2: v6.2.0 to v6.2.15" in out
    assert "no  segment_asce_refused" in out
    code, out, _ = run("info")
    assert "kernel profile latest" in out
    assert "yes segment_asce_refused" in out
    doc = run_json("info", "--kernel", "6.5")
    assert doc["host"]["kernel"] == "6.5"
    kernel = doc["kernel"]
    assert kernel["profile"] == "6.5"
    present = {d["delta"] for d in kernel["deltas"] if d["present"]}
    assert present == {"segment_asce_refused", "cleanup_all_skip_if_zero"}
    assert {d["delta"]: d["commit"] for d in kernel["deltas"]}["cleanup_all_skip_if_zero"] == "5ff92181577a"
    assert run_json("info", "--kernel", "mainline")["kernel"]["profile"] == "latest"


@pytest.mark.parametrize("command", ["info", "reboot", "shutdown", "compare"])
def test_every_command_takes_kernel(command):
    out = io.StringIO()
    with pytest.raises(SystemExit):
        cli.main([command, "--help"], out=out, err=io.StringIO())
    assert "--kernel NAME" in out.getvalue()


# ------------------------------------------------------------------ reboot


def test_reboot_kernel_6_2_json():
    """6.2's PERFORM ignores the destroys the UV refuses: the rebooted guest's image stays secure."""
    r = run_json("reboot", *SMALL, "--async", "--kernel", "6.2")
    assert r["host"]["kernel"] == "6.2"
    assert r["mode"] == "async"
    assert r["secure_pages_left"] == 0
    assert r["secure_pages_now"] > 0
    assert r["uvcs"].get("CONV_FROM_SEC_STOR", 0) == 0


def test_reboot_async_json():
    r = run_json("reboot", *SMALL, "--async")
    assert r["mode"] == "async"
    assert "error" not in r["perform"]  # rc 0 with Destroy-Fast (nothing left to destroy), 1 without
    assert r["secure_pages_before"] >= SMALL_PAGES
    assert r["secure_pages_left"] == 0
    # the rebooted guest's image is secure again, unless the newest kernels' PERFORM, which walks
    # the same gmap, exported it meanwhile (the guest imports it back when it touches it)
    assert r["secure_pages_now"] > 0 or r["uvcs"].get("CONV_FROM_SEC_STOR", 0) > 0
    assert r["uvcs"]["DESTR_SEC_STOR"] >= SMALL_PAGES
    assert r["uvcs_unprotect"].get("DESTROY_SEC_CONF_FAST") == 1
    assert "DESTR_SEC_STOR" not in r["uvcs_unprotect"] or r["uvcs_unprotect"]["DESTR_SEC_STOR"] < SMALL_PAGES
    assert 0 < r["unprotect_seconds"] <= r["running_seconds"] <= r["cleanup_seconds"] + 1.0
    assert r["pv_state"] == {"protected": True, "set_aside": False, "need_cleanup": 0, "leaked": 0}


def test_reboot_sync_json():
    r = run_json("reboot", *SMALL, "--sync", "--no-destroy-fast")
    assert r["mode"] == "sync"
    assert r["perform"] is None
    assert r["secure_pages_left"] == 0
    assert r["uvcs_unprotect"]["DESTROY_SEC_CONF"] == 1
    assert "ASYNC" not in json.dumps(r["uvcs"])
    assert r["cleanup_seconds"] == r["unprotect_seconds"]


def test_reboot_async_refused_exits_1():
    code, out, _ = run("reboot", *SMALL, "--async", "--async-destroy", "0")
    assert code == 1
    assert "error: the reboot was synchronous" in out


def test_reboot_table_and_progress():
    code, out, err = run("reboot", *SMALL, "--progress")
    assert code == 0
    for text in ("unprotect returned", "guest running again", "old guest's memory clean", "DESTR_SEC_STOR"):
        assert text in out
    assert "guest dirties secure memory" in err
    assert "100.0%" in err


# ------------------------------------------------------------------ shutdown


def test_shutdown_both_variants():
    doc = run_json("shutdown", *SMALL)
    runs = {r["helper"]: r for r in doc["runs"]}
    assert set(runs) == {False, True}
    for r in runs.values():
        assert r["secure_pages_left"] == 0
        assert r["configs_left"] == 0
        assert r["leaked"] == 0
        assert r["vmm_exit"]["seconds"] > 0
    assert "helper_exit" in runs[True]
    assert "helper_exit" not in runs[False]
    # without the helper the VMM's exit is the last mm user: it pays the page walk
    assert runs[False]["vmm_exit"]["uvcs"]["DESTR_SEC_STOR"] >= SMALL_PAGES


def test_shutdown_single_variant_table():
    code, out, _ = run("shutdown", *SMALL, "--no-helper")
    assert code == 0
    assert "without the CLONE_VM helper" in out
    assert "with the CLONE_VM helper" not in out


# ------------------------------------------------------------------ compare, plot, trace


def test_compare_json_and_png(tmp_path: Path):
    plot = tmp_path / "cmp.png"
    doc = run_json("compare", "--secure", "32M,64M", "--repeat", "2", "--plot", str(plot))
    assert [row["secure"] for row in doc["rows"]] == [32 * MiB, 64 * MiB]
    for row in doc["rows"]:
        assert len(row["samples"]["sync_running_seconds"]) == 2
        assert row["sync_running_seconds"] <= max(row["samples"]["sync_running_seconds"])
        assert row["memory"] == experiments.auto_memory(row["secure"])
        assert row["async_mode"] == "async"
        assert row["sync"]["mode"] == "sync"
        assert row["sync_running_seconds"] > 0
        assert row["async_cleanup_seconds"] > 0
    assert set(doc["seconds_per_gib"]) == {"sync_running", "async_running", "async_cleanup"}
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_table_default_plot_path(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run("compare", "--secure", "16M", "--memory", "3G")
    assert code == 0
    assert "sync/async" in out
    assert "16M" in out
    assert (tmp_path / cli.DEFAULT_PLOT).read_bytes()[:4] == b"\x89PNG"


def test_compare_unwritable_plot(tmp_path: Path, capsys):
    # a directory that does not exist: refused before the run (bad command line)
    err = usage_error(capsys, "compare", "--secure", "16M", "--plot", str(tmp_path / "no" / "such" / "dir.png"))
    assert "does not exist" in err
    # a directory: refused before the run too (it was exit 1 after the whole run)
    err = usage_error(capsys, "compare", "--secure", "16M", "--plot", str(tmp_path))
    assert "argument --plot: cannot write" in err
    assert "it is a directory" in err
    # a file that passes the check but cannot be written at the end (a full disk): the run failed
    if Path("/dev/full").exists():
        code, _, err = run("compare", "--secure", "16M", "--memory", "3G", "--plot", "/dev/full")
        assert code == 1
        assert "pvfast compare: error:" in err


def _trace_events(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    events = doc["traceEvents"]
    assert events
    for ev in events:
        assert {"ph", "ts", "pid", "tid", "name"} <= set(ev)
        assert isinstance(ev["ts"], (int, float))
        assert ev["ts"] >= 0
        if ev["ph"] == "X":
            assert ev["dur"] >= 0
    return events


def test_reboot_trace(tmp_path: Path):
    path = tmp_path / "trace.json"
    code, _, err = run("reboot", *SMALL, "--trace", str(path))
    assert code == 0, err
    events = _trace_events(path)
    names = {ev["name"] for ev in events if ev["ph"] == "X"}
    assert {"KVM_PV_ENABLE", "KVM_PV_ASYNC_CLEANUP_PREPARE", "KVM_PV_ASYNC_CLEANUP_PERFORM", "unprotect"} <= names
    thread_names = {ev["tid"]: ev["args"]["name"] for ev in events if ev["ph"] == "M" and ev["name"] == "thread_name"}
    perform = next(ev for ev in events if ev["name"] == "KVM_PV_ASYNC_CLEANUP_PERFORM")
    prepare = next(ev for ev in events if ev["name"] == "KVM_PV_ASYNC_CLEANUP_PREPARE")
    assert thread_names[perform["tid"]] == "async_cleanup"
    assert perform["tid"] != prepare["tid"]
    counters = [ev for ev in events if ev["ph"] == "C"]
    assert any("DESTR_SEC_STOR" in ev["args"] for ev in counters)


def test_shutdown_and_compare_trace(tmp_path: Path):
    for argv in (["shutdown", *SMALL, "--helper"], ["compare", "--secure", "16M", "--no-plot"]):
        path = tmp_path / f"{argv[0]}.json"
        code, _, err = run(*argv, "--trace", str(path))
        assert code == 0, err
        assert any(ev["ph"] == "X" for ev in _trace_events(path))


# ------------------------------------------------------------------ accounting, modelled clock, state memory


def test_reboot_model_clock_table_and_plot(tmp_path: Path):
    plot = tmp_path / "memory.png"
    code, out, err = run("reboot", *SMALL, "--clock", "model", "--plot", str(plot))
    assert code == 0, err
    assert "clock                   modelled (cost model: default), wall time beside" in out
    assert "where the work landed" in out
    assert "qemu/async_cleanup" in out
    assert "old guest's memory clean" in out
    assert "the old guest's memory over time" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_reboot_json_has_model_accounting_and_memory():
    r = run_json("reboot", *SMALL, "--guest-memory", "state", "--walk-threads", "1")
    assert r["host"]["guest_memory"] == "state"
    assert r["host"]["walk_threads"] == 1
    assert r["model"]["cleanup_seconds"] > r["model"]["running_seconds"] > 0
    threads = {t["thread"] for t in r["accounting"]["teardown"]}
    assert threads == {"MainThread", "async_cleanup"}
    events = [e["event"] for e in r["memory_timeline"]["events"]]
    assert events == ["start", "unprotect returned", "guest running again", "old guest's memory clean"]
    assert r["memory_timeline"]["events"][-1]["secure_bytes"] == 0
    assert r["peak_rss_bytes"] > 0


def test_shutdown_with_helper_shows_the_memory_window(tmp_path: Path):
    plot = tmp_path / "shutdown.png"
    r = run_json("shutdown", *SMALL, "--helper", "--plot", str(plot))
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert [t["process"] for t in r["vmm_exit"]["accounting"]] == ["qemu"]
    helper = r["helper_exit"]["accounting"]
    assert [t["process"] for t in helper] == [r["helper_exit"]["process"]]
    assert helper[0]["ptes"] >= SMALL_PAGES  # the helper unmaps the dead guest's memory
    vmm_gone, helper_gone = r["memory_timeline"]["events"][1:]
    assert vmm_gone["event"] == "VMM exited"
    assert vmm_gone["allocated_bytes"] >= SMALL_PAGES * 4096  # still allocated ...
    assert vmm_gone["held_by"] == [r["helper_exit"]["process"]]  # ... held by the helper alone
    assert vmm_gone["helpers_only"]
    assert helper_gone["allocated_bytes"] == 0
    assert r["model"]["held_after_vmm_exit_seconds"] == r["model"]["helper_exit_seconds"] > 0
    code, out, _ = run("shutdown", *SMALL, "--helper", "--clock", "model")
    assert code == 0
    assert "held only by the helper" in out


def test_compare_model_clock(tmp_path: Path):
    plot = tmp_path / "cmp.png"
    doc = run_json("compare", "--secure", "32M,64M", "--clock", "model", "--plot", str(plot))
    for row in doc["rows"]:
        assert row["model_sync_running_seconds"] > row["model_async_running_seconds"] > 0
    assert set(doc["model_seconds_per_gib"]) == {"sync_running", "async_running", "async_cleanup"}
    code, out, _ = run("compare", "--secure", "32M", "--clock", "model", "--no-plot")
    assert code == 0
    assert "times on the modelled clock" in out


def test_model_clock_trace(tmp_path: Path):
    path = tmp_path / "trace.json"
    r = run_json("reboot", *SMALL, "--clock", "model", "--trace", str(path))
    doc = json.loads(path.read_text())
    assert doc["otherData"]["clock"] == "model"
    perform = next(ev for ev in doc["traceEvents"] if ev["name"] == "KVM_PV_ASYNC_CLEANUP_PERFORM")
    cleanup = next(t for t in r["accounting"]["teardown"] if t["thread"] == "async_cleanup")
    assert perform["dur"] == pytest.approx(cleanup["model_seconds"] * 1e6, rel=1e-6)
    assert any(ev["ph"] == "C" and ev["name"] == "guest memory (MiB)" for ev in doc["traceEvents"])


# ------------------------------------------------------------------ logs


def test_log_kvm_uv_shows_the_debug_log():
    logger = logging.getLogger("pvfast.kvm_uv")
    level = logger.level
    code, _, err = run("reboot", *SMALL, "--log", "kvm_uv")
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("kvm_uv: vm ")]
    assert any("PROTVIRT CREATE VM: handle " in line for line in lines)
    assert any("PROTVIRT DESTROY VM FAST: rc 1 rrc 0" in line for line in lines)
    assert any("PROTVIRT SET ASIDE: handle 0 fast 1" in line for line in lines)
    assert logger.level == level  # put back after the command
    code, _, err = run("reboot", *SMALL)
    assert code == 0
    assert "PROTVIRT" not in err  # not without --log


def test_verbose_is_every_log():
    code, out, err = run("shutdown", *SMALL, "--no-helper", "-v", "--json")
    assert code == 0, err
    assert "kvm_uv: vm " in err
    json.loads(out)  # the logs stay off stdout
    assert cli.build_parser().parse_args(["reboot", "--log", "all"]).log == [list(cli.LOGGERS)]


def test_log_names_are_checked(capsys):
    assert "invalid log name 'kvm'" in usage_error(capsys, "reboot", "--log", "kvm")


def test_kernel_warnings_reach_stderr_without_flags():
    err = io.StringIO()
    with cli.logging_to(err, [], None):
        logging.getLogger("pvfast.kvm_uv").warning("vm %s: %s", "1:a", "destroy failed: rc 20 rrc 0")
        logging.getLogger("pvfast.kvm_uv").debug("vm %s: not shown", "1:a")
    assert err.getvalue() == "kvm_uv warning: vm 1:a: destroy failed: rc 20 rrc 0\n"


# ------------------------------------------------------------------ walk threads, repeat


def test_walk_threads_reach_the_host_and_leave_modelled_times_alone():
    one = run_json("reboot", *SMALL, "--walk-threads", "1")
    two = run_json("reboot", *SMALL, "--walk-threads", "2")
    assert (one["host"]["walk_threads"], two["host"]["walk_threads"]) == (1, 2)
    assert one["model"] == two["model"]


def test_reboot_repeat_json_and_table():
    doc = run_json("reboot", *SMALL, "--repeat", "3")
    assert doc["repeat"] == 3
    assert len(doc["runs"]) == 3
    median = doc["runs"][doc["median_run"]]
    for clock, pick in (("wall", lambda r: r), ("model", lambda r: r["model"])):
        for key, s in doc["summary"][clock].items():
            values = sorted(pick(r)[key] for r in doc["runs"])
            assert (s["min"], s["median"], s["max"]) == (values[0], values[1], values[2])
    assert median["running_seconds"] == doc["summary"]["wall"]["running_seconds"]["median"]
    assert all(r["mode"] == "async" and r["secure_pages_left"] == 0 for r in doc["runs"])
    code, out, _ = run("reboot", *SMALL, "--repeat", "2", "--sync")
    assert code == 0
    assert "the median run of 2" in out
    assert "over 2 reboots, each on a fresh host (median [min - max])" in out
    assert "sync in 2 of 2 runs" in out


# ------------------------------------------------------------------ CSV


def read_csv(*argv: str) -> list[dict[str, str]]:
    code, out, err = run(*argv, "--csv")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split(",") == cli.CSV_COLUMNS[argv[0]]
    return list(csv.DictReader(io.StringIO(out)))


def test_reboot_csv():
    rows = read_csv("reboot", *SMALL, "--repeat", "2", "--async")
    assert [r["run"] for r in rows] == ["1", "2"]
    for r in rows:
        assert (r["experiment"], r["mode_requested"], r["mode"], r["fallback"], r["error"]) == (
            "reboot",
            "async",
            "async",
            "",
            "",
        )
        assert int(r["secure"]) == 64 * MiB
        assert int(r["memory"]) == 3 * GiB
        assert r["destroy_fast"] == "true"
        assert r["perform_rc"] == "0"
        assert float(r["model_cleanup_seconds"]) > float(r["model_running_seconds"]) > 0
        assert f"DESTR_SEC_STOR={r['uvcs'].split('DESTR_SEC_STOR=')[1].split()[0]}" in r["uvcs"]
        assert int(r["secure_pages_left"]) == 0
    sync = read_csv("reboot", *SMALL, "--sync")[0]
    assert (sync["mode"], sync["perform_rc"], sync["perform_rrc"]) == ("sync", "", "")


def test_shutdown_csv():
    rows = read_csv("shutdown", *SMALL)
    assert [r["helper"] for r in rows] == ["false", "true"]
    without, with_ = rows
    assert without["helper_exit_seconds"] == ""
    assert without["model_helper_exit_seconds"] == ""
    assert float(with_["helper_exit_seconds"]) > 0
    assert float(with_["model_held_after_vmm_exit_seconds"]) > 0
    assert all(r["secure_pages_left"] == "0" and r["leaked"] == "0" for r in rows)


def test_compare_csv():
    rows = read_csv("compare", "--secure", "16M,32M", "--repeat", "2", "--no-plot")
    assert [int(r["secure"]) for r in rows] == [16 * MiB, 32 * MiB]
    for r in rows:
        assert r["repeat"] == "2"
        assert r["async_mode"] == "async"
        for key in ("sync_running_seconds", "async_cleanup_seconds", "model_async_running_seconds"):
            assert float(r[f"{key}_min"]) <= float(r[key]) <= float(r[f"{key}_max"])


def test_csv_and_json_exclude_each_other(capsys):
    assert "not allowed with argument" in usage_error(capsys, "reboot", "--csv", "--json")


# ------------------------------------------------------------------ provenance


def test_every_json_document_says_what_produced_it():
    for argv in (
        ("info",),
        ("reboot", *SMALL, "--no-misc", "--walk-threads", "1"),
        ("shutdown", *SMALL, "--helper"),
        ("compare", "--secure", "16M", "--no-plot"),
        ("calibrate", "--measure", "disable:8G=3.2"),
    ):
        doc = run_json(*argv)
        assert doc["command"] == shlex.join(["pvfast", *argv, "--json"])
        assert doc["pvfast"]["version"] == pvfast.__version__
        assert doc["pvfast"]["build_profile"] == pvfast.build_profile
        assert "kernel" not in doc["pvfast"] or doc["pvfast"]["kernel"]
        assert doc["machine"]["cpus"] == os.cpu_count()
        assert doc["machine"]["ram_bytes"] > 0
        assert set(doc["host"]) >= {"async_destroy", "destroy_fast", "feature_misc", "guest_memory", "costs"}
    doc = run_json("reboot", *SMALL, "--no-misc", "--walk-threads", "1")
    assert (doc["host"]["feature_misc"], doc["host"]["walk_threads"]) == (False, 1)


def test_kernel_profile_is_reported_when_the_host_has_one(monkeypatch: pytest.MonkeyPatch):
    from pvfast.host import Host

    if not hasattr(Host(), "kernel"):  # until hosts have kernel profiles: a stand-in profile
        monkeypatch.setattr(Host, "kernel", type("Profile", (), {"name": "v6.6+"})(), raising=False)
    expected = experiments.about(Host())["kernel"]
    assert isinstance(expected, str)
    assert expected
    assert run_json("reboot", *SMALL)["pvfast"]["kernel"] == expected
    assert read_csv("reboot", *SMALL)[0]["kernel"] == expected


# ------------------------------------------------------------------ small guests, nothing dirtied


def test_small_guest_async_reboot_is_qemus_fallback_not_an_error():
    code, out, err = run("reboot", "--memory", "2G", "--secure", "4K", "--async")
    assert code == 0, err
    assert "must be at least" not in out + err
    assert "QEMU's fallback from the asynchronous reboot" in out
    assert "not larger than 2G" in out
    assert "error" not in out
    r = run_json("reboot", "--memory", "2G", "--secure", "4K", "--async")
    assert (r["mode_requested"], r["mode"]) == ("async", "sync")
    assert "not larger than 2G" in r["fallback"]
    assert "error" not in r
    assert r["uvcs_unprotect"].get("DESTROY_SEC_CONF") == 1  # DISABLE, not PREPARE
    assert r["secure_pages_left"] == 0
    auto = run_json("reboot", "--memory", "1G", "--secure", "4K")
    assert auto["mode"] == "sync"
    assert auto["fallback"]
    assert run_json("reboot", *SMALL)["fallback"] is None
    assert run_json("reboot", *SMALL, "--sync")["fallback"] is None  # asked for DISABLE: no fallback


def test_async_reboot_the_host_cannot_take_is_still_an_error():
    r = run_json_code(1, "reboot", *SMALL, "--async", "--async-destroy", "0")
    assert r["mode"] == "sync"
    assert "capability 224" in r["fallback"]
    assert "capability 224" in r["error"]


def run_json_code(expected: int, *argv: str) -> dict:
    code, out, err = run(*argv, "--json")
    assert code == expected, err
    return json.loads(out)


@pytest.mark.parametrize("mode", ["--sync", "--async"])
def test_secure_0_is_a_guest_that_dirtied_nothing(mode: str):
    r = run_json("reboot", "--memory", "3G", "--secure", "0", mode)
    assert r["secure"] == 0
    assert r["mode"] == mode.lstrip("-")
    assert 0 < r["secure_pages_before"] < 100  # the boot image only
    assert r["secure_pages_left"] == 0
    code, out, _ = run("reboot", "--memory", "3G", "--secure", "0", mode)
    assert code == 0
    assert "with 0 of secure memory" in out


def test_secure_0_in_shutdown_and_compare():
    doc = run_json("shutdown", "--memory", "3G", "--secure", "0")
    assert [r["secure_pages_left"] for r in doc["runs"]] == [0, 0]
    rows = run_json("compare", "--secure", "0,16M", "--no-plot")["rows"]
    assert [row["secure"] for row in rows] == [0, 16 * MiB]
    assert rows[0]["memory"] == experiments.auto_memory(0)


# ------------------------------------------------------------------ plots


def test_plot_titles_say_guest_machine_and_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    titles: list[str] = []
    monkeypatch.setattr(cli, "plot_memory", lambda *a, title="", **k: titles.append(title))
    assert run("reboot", *SMALL, "--plot", str(tmp_path / "r.png"))[0] == 0
    assert run("shutdown", *SMALL, "--helper", "--plot", str(tmp_path / "s.png"))[0] == 0
    for title in titles:
        assert "3G guest" in title
        assert f"{os.cpu_count()} CPUs" in title
        assert f"pvfast {pvfast.__version__} ({pvfast.build_profile} build)" in title


def test_compare_plot_shows_the_spread_of_the_median(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    from matplotlib.axes import Axes

    bars: list[object] = []
    errorbar = Axes.errorbar

    def counted(self: Axes, *args: object, **kwargs: object) -> object:
        bars.append(kwargs)
        return errorbar(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Axes, "errorbar", counted)
    doc = run_json("compare", "--secure", "16M,32M", "--repeat", "3", "--plot", str(tmp_path / "c.png"))
    assert len(bars) == 6  # three curves on each of the two panels
    title = experiments.compare_title(doc)
    assert "median of 3 runs, bars min–max" in title
    assert "guest = secure + 3G" in title
    assert f"{os.cpu_count()} CPUs" in title
    assert f"{pvfast.build_profile} build" in title
    assert "guest 8G" in experiments.compare_title({**doc, "memory": 8 * GiB, "repeat": 1})
    assert "one run each" in experiments.compare_title({**doc, "repeat": 1})
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ documented command lines


def documented_command_lines() -> list[str]:
    """The ``pvfast COMMAND ...`` lines of the README's and docs' shell blocks and code spans."""
    root = Path(__file__).resolve().parents[1]
    lines: list[str] = []
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        in_block = False
        for raw in doc.read_text(encoding="utf-8").splitlines():
            if raw.startswith("```"):
                in_block = raw.strip() in ("```sh", "```console", "```bash")
                continue
            candidates = [raw.lstrip("$ ")] if in_block else re.findall(r"`(pvfast [^`]+)`", raw)
            for text in candidates:
                text = text.split(" #")[0].strip()
                words = text.split()
                if (
                    len(words) > 1
                    and words[0] == "pvfast"
                    and words[1] in cli.CSV_COLUMNS.keys() | {"info", "calibrate"}
                ):
                    lines.append(text)
    return sorted(set(lines))


def test_documented_command_lines_parse(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # docs/compare.png is relative to the root
    lines = documented_command_lines()
    assert len(lines) > 20
    parser = cli.build_parser()
    checked = 0
    for line in lines:
        if any(mark in line for mark in ("[", "\\", "|", " N", "--costs")):  # placeholders, pipes, files
            continue
        if line == "pvfast calibrate":  # the command's name in prose, not a command line
            continue
        parser.parse_args(shlex.split(line)[1:])  # SystemExit (a usage error) fails the test
        checked += 1
    assert checked > 20


# ------------------------------------------------------------------ docs that quote the command's output


ROOT = Path(__file__).resolve().parents[1]


def _accounting_key(line: str) -> tuple[str, ...]:
    """A line of the accounting section without its host CPU times (they differ run to run)."""
    if "host CPU" in line:
        return ("cpu", line.split("host CPU")[0].strip(), line.rsplit("modelled", 1)[1].strip())
    return ("line", " ".join(line.split()))


def test_performance_section_6_sample_is_the_current_output():
    text = (ROOT / "docs/PERFORMANCE.md").read_text(encoding="utf-8")
    command = "$ pvfast reboot --memory 7G --secure 4G --clock model\n"
    sample = text.split(command, 1)[1].split("```", 1)[0].splitlines()
    # state-only memory: the same UVCs, pages and modelled times as real memory, without 4G of RAM
    code, out, err = run(*shlex.split(command[2:])[1:], "--guest-memory", "state")
    assert code == 0, err
    keys = {_accounting_key(line) for line in out.splitlines() if line.strip()}
    shown = [line for line in sample if line.strip() and line.strip() != "..."]
    assert any("CONV_FROM_SEC_STOR" in line for line in shown)
    for line in shown:
        assert _accounting_key(line) in keys, line


def test_secure_pages_now_is_documented_per_profile():
    now = {
        kernel: run_json("reboot", *SMALL, "--async", "--kernel", kernel)["secure_pages_now"]
        for kernel in ("6.6", "latest")
    }
    sync = run_json("reboot", *SMALL, "--sync")["secure_pages_now"]
    assert now["latest"] == 0  # PERFORM exported the new guest's image pages (walk_export_fallback)
    assert now["6.6"] == sync > 0  # the new guest's image
    row = next(
        line
        for line in (ROOT / "docs/OUTPUT.md").read_text(encoding="utf-8").splitlines()
        if "`secure_pages_now` |" in line
    )
    assert "`latest`" in row
    assert "walk_export_fallback" in row
    assert "0 after an async reboot" in row


def test_readme_says_what_info_kernel_prints():
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    match = re.search(r"`pvfast info --kernel 6\.2` lists the profile's deltas \((.*?)\), `--json`([^.]*)\.", readme)
    assert match, "README no longer describes pvfast info --kernel 6.2"
    table_claim, json_claim = match.groups()
    code, out, _ = run("info", "--kernel", "6.2")
    assert code == 0
    doc = run_json("info", "--kernel", "6.2")
    for delta in doc["kernel"]["deltas"]:
        line = next(line for line in out.splitlines() if f" {delta['delta']} " in line)
        if "commit" in table_claim:
            assert delta["commit"] in line
        if "first release" in table_claim:
            assert delta["first"] in line
        if "effect" in table_claim:
            assert delta["effect"] in line
        if "effect" in json_claim:
            assert delta["effect"]
