"""The ``pvfast`` command line: every subcommand runs, --json parses, errors exit 2, plot and trace files are valid."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        (["reboot", "--walk-threads", "-1"], "invalid thread count -1"),
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
def test_every_command_takes_kernel(capsys, command):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"], out=io.StringIO(), err=io.StringIO())
    assert "--kernel NAME" in capsys.readouterr().out


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


def test_compare_unwritable_plot_exits_1(tmp_path: Path):
    code, _, err = run("compare", "--secure", "16M", "--plot", str(tmp_path / "no" / "such" / "dir.png"))
    assert code == 1
    assert "error" in err


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
