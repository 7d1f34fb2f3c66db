"""The modelled clock (pvfast.clock) and the cost model (pvfast.costs): deterministic modelled times,
waits that move a thread to the clock of the thread it waits for, TOML cost files, and the fit."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import pvfast
from pvfast import PvCmd, cli, clock, experiments
from pvfast.costs import CostModel, Observation, fit
from pvfast.experiments import HostOptions, Measurement

from .conftest import MiB

SECURE = 96 * MiB  # walks larger than one 64 MiB task, so they run on the pool workers


def _modelled(result: dict) -> dict:
    """Everything in a result that comes from the modelled clock or from counting work."""
    out: dict = {"model": result["model"]}
    if "accounting" in result:
        out["accounting"] = {
            phase: [{k: v for k, v in t.items() if "cpu" not in k and k != "worker_tasks"} for t in threads]
            for phase, threads in result["accounting"].items()
        }
    for phase in ("vmm_exit", "helper_exit"):
        if phase in result:
            out[phase] = {
                "model_seconds": result[phase]["model_seconds"],
                "uvcs": result[phase]["uvcs"],
                "accounting": [
                    {k: v for k, v in t.items() if "cpu" not in k and k != "worker_tasks"}
                    for t in result[phase]["accounting"]
                ],
            }
    if "memory_timeline" in result:
        # Marked samples are deterministic, except what the async_cleanup thread has destroyed by
        # the time the main thread marks "guest running again" (it runs concurrently).
        out["events"] = [
            {
                k: v
                for k, v in e.items()
                if k != "wall_seconds" and not (k == "secure_bytes" and "running" in e["event"])
            }
            for e in result["memory_timeline"]["events"]
        ]
    out["uvcs"] = result.get("uvcs")
    return out


@pytest.mark.parametrize(
    "run",
    [
        lambda opt: experiments.reboot(experiments.auto_memory(SECURE), SECURE, mode="sync", options=opt),
        lambda opt: experiments.reboot(experiments.auto_memory(SECURE), SECURE, mode="async", options=opt),
        lambda opt: experiments.shutdown(experiments.auto_memory(SECURE), SECURE, helper=True, options=opt),
        lambda opt: experiments.shutdown(experiments.auto_memory(SECURE), SECURE, helper=False, options=opt),
    ],
    ids=["reboot-sync", "reboot-async", "shutdown-helper", "shutdown-no-helper"],
)
def test_modelled_times_identical_across_runs_and_walk_threads(run):
    """Same scenario, same modelled times, exactly: two runs, and 1 against 2 walk threads (the
    model charges the kernel's single-threaded walk, not pvfast's parallel one)."""
    results = [run(HostOptions(walk_threads=threads)) for threads in (1, 2, 2)]
    modelled = [_modelled(r) for r in results]
    assert modelled[0] == modelled[1] == modelled[2]
    model = results[0]["model"]
    assert model.get("unprotect_seconds", model.get("vmm_exit_seconds")) > 0


def test_modelled_times_do_not_depend_on_how_memory_is_backed():
    real, state = (
        experiments.reboot(
            experiments.auto_memory(SECURE), SECURE, mode="async", options=HostOptions(guest_memory=mode)
        )
        for mode in ("real", "state")
    )
    assert _modelled(real)["model"] == _modelled(state)["model"]
    assert real["uvcs"] == state["uvcs"]


def test_async_reboot_model_matches_the_cost_table():
    """The modelled PERFORM is exactly its work priced: per present page a destroy UVC and a PTE
    visit, per secure page one page cleared, and (newest kernels) one export per page of the
    running new guest that the walk could not destroy."""
    r = experiments.reboot(experiments.auto_memory(SECURE), SECURE, mode="async")
    costs = CostModel.default()
    cleanup = next(t for t in r["accounting"]["teardown"] if t["thread"] == "async_cleanup")
    present, zeroed = cleanup["ptes"], cleanup["zeroed_pages"]
    assert cleanup["uvcs"]["DESTR_SEC_STOR"] == present
    assert set(cleanup["uvcs"]) <= {"DESTR_SEC_STOR", "CONV_FROM_SEC_STOR"}
    uvc_ns = sum(n * costs.uvcs[name].fixed_ns for name, n in cleanup["uvcs"].items())
    expected = (uvc_ns + present * costs.pte_ns + zeroed * costs.zero_page_ns) / 1e9
    assert cleanup["model_seconds"] == pytest.approx(expected, rel=1e-12)
    # the async_cleanup thread starts where the main thread's unprotect ended
    assert r["model"]["cleanup_seconds"] == pytest.approx(
        r["model"]["unprotect_seconds"] + cleanup["model_seconds"], rel=1e-12
    )
    assert r["model"]["running_seconds"] < r["model"]["cleanup_seconds"]


def test_a_thread_waiting_for_kvm_lock_moves_to_the_holders_clock():
    """B holds kvm->lock for a DISABLE; A's INFO, issued at a modelled time inside B's hold,
    ends no earlier than B's DISABLE ended. It does not matter when A ran on the wall clock."""
    host = pvfast.Host()
    proc = host.spawn_process("qemu")
    vm = experiments.boot_guest(proc, experiments.auto_memory(SECURE), SECURE)
    start = clock.now_ps()
    b_end: list[int] = []

    def disable() -> None:
        vm.pv_command(PvCmd.DISABLE)
        b_end.append(clock.now_ps())

    b = threading.Thread(target=disable, name="b")
    b.start()
    while not vm.lock.locked() and b.is_alive():
        pass
    vm.pv_command(PvCmd.INFO, id=0, len_max=256)
    b.join()
    assert b_end[0] > start
    assert clock.now_ps() == b_end[0]  # INFO itself issues no UVC
    proc.exit()


def test_kernel_mutex_bookkeeping_delays_nobody():
    """A hold without modelled work (an empty interval) moves no one's clock."""
    host = pvfast.Host()
    proc = host.spawn_process("qemu")
    vm = experiments.boot_guest(proc, experiments.auto_memory(4 * MiB), 4 * MiB)
    mine = clock.now_ps()

    def bookkeeping() -> None:  # a thread far ahead in modelled time, holding the lock for nothing
        clock.inherit(mine + 10**12)
        proc._fdget(vm)
        try:
            with vm.lock:
                pass
        finally:
            proc._fdput(vm)

    t = threading.Thread(target=bookkeeping)
    t.start()
    t.join()
    with vm.lock:
        pass
    assert clock.now_ps() == mine
    proc.exit()


def test_join_moves_the_joiner_to_the_joined_threads_clock():
    host = pvfast.Host()
    proc = host.spawn_process("qemu")
    vm = experiments.boot_guest(proc, experiments.auto_memory(SECURE), SECURE)
    vm.pv_command(PvCmd.ASYNC_CLEANUP_PREPARE)
    before = clock.now_ps()
    t = threading.Thread(target=vm.pv_command, args=(PvCmd.ASYNC_CLEANUP_PERFORM,), name="async_cleanup")
    t.start()
    assert clock.join(t, 60)
    end = host.accounting.thread_clock_ps(t)
    assert end is not None
    assert end > before
    assert clock.now_ps() == end
    proc.exit()


# ------------------------------------------------------------------ costs


def test_default_costs_are_documented_and_round_trip_through_toml(tmp_path: Path):
    from pvfast.costs import DEFAULT_SOURCES

    model = CostModel.default()
    for param in model.parameters():
        assert param in DEFAULT_SOURCES, param
        assert "assumption" in DEFAULT_SOURCES[param]
    path = tmp_path / "costs.toml"
    path.write_text(model.with_values({"pte_ns": 12.5}, name="mine").to_toml())
    back = CostModel.from_toml(path)
    assert back.get("pte_ns") == 12.5
    assert back.uvcs == model.uvcs
    assert back.name == "mine"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pte = 3", "pte: unknown key"),
        ("[uvc.NOPE]\nfixed_ns = 1", "uvc.NOPE: unknown UVC"),
        ("[uvc.QUI]\nper_page_ns = 1", "no per-page work in QUI"),
        ("[uvc.QUI]\nfixed = 1", "uvc.QUI.fixed: unknown key"),
        ("pte_ns = -1", "pte_ns: -1"),
        ("pte_ns = 'x'", "pte_ns: expected a number"),
        ("pte_ns = 1e30", "pte_ns: 1e.30 ns is more than"),
        ("[uvc.DESTR_SEC_STOR]\nfixed_ns = 1e20", "fixed_ns: 1e.20 ns is more than"),
        ("pte_ns = ", "not valid TOML"),
    ],
)
def test_bad_cost_files_name_the_problem(tmp_path: Path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises((ValueError, TypeError), match=message):
        CostModel.from_toml(path)


def test_a_cost_model_changes_the_modelled_times():
    doubled = CostModel.default().with_values(
        {p: 2 * CostModel.default().get(p) for p in CostModel.parameters()}, name="doubled"
    )
    one = experiments.reboot(experiments.auto_memory(SECURE), SECURE, mode="sync")
    two = experiments.reboot(experiments.auto_memory(SECURE), SECURE, mode="sync", options=HostOptions(costs=doubled))
    assert two["model"]["costs"] == "doubled"
    assert two["model"]["unprotect_seconds"] == pytest.approx(2 * one["model"]["unprotect_seconds"], rel=1e-9)


def test_fit_recovers_a_known_per_page_cost():
    """A synthetic measurement made under a known per-page cost of Destroy Config: the fit, started
    from the defaults, recovers that cost."""
    known = CostModel.default().with_values({"uvc.DESTROY_SEC_CONF.per_page_ns": 777.0})
    secure = 256 * MiB
    measured = known.price(experiments.phase_usage("disable", secure).cost_counts())
    fitted, report = experiments.calibrate(
        [Measurement("disable", secure, measured)], params=["uvc.DESTROY_SEC_CONF.per_page_ns"]
    )
    assert fitted.model.get("uvc.DESTROY_SEC_CONF.per_page_ns") == pytest.approx(777.0, rel=1e-9)
    assert report["measurements"][0]["model_seconds_after"] == pytest.approx(measured, rel=1e-12)


def test_fit_recovers_fixed_and_per_page_costs_from_two_sizes():
    known = CostModel.default().with_values({"uvc.DESTR_SEC_STOR.fixed_ns": 2500.0, "zero_page_ns": 90.0})
    obs = []
    for secure in (64 * MiB, 256 * MiB):
        usage = experiments.phase_usage("perform", secure)
        obs.append(Observation(usage.cost_counts(), known.price(usage.cost_counts()), f"perform {secure}"))
    result = fit(obs, ["uvc.DESTR_SEC_STOR.fixed_ns", "zero_page_ns"])
    assert result.values["uvc.DESTR_SEC_STOR.fixed_ns"] == pytest.approx(2500.0, rel=1e-6)
    assert result.values["zero_page_ns"] == pytest.approx(90.0, rel=1e-6)
    with pytest.raises(ValueError, match="cannot separate"):
        fit(obs[:1] * 2, ["uvc.DESTR_SEC_STOR.fixed_ns", "pte_ns"])


def test_calibrate_command_writes_a_cost_file_that_reproduces_the_measurement(tmp_path: Path):
    import io

    out_path = tmp_path / "fitted.toml"
    out = io.StringIO()
    code = cli.main(
        ["calibrate", "--measure", "disable:128M=0.5", "--output", str(out_path), "--json"], out=out, err=io.StringIO()
    )
    assert code == 0
    report = json.loads(out.getvalue())
    assert set(report["fitted"]) == {"uvc.DESTROY_SEC_CONF.per_page_ns"}
    model = CostModel.from_toml(out_path)
    usage = experiments.phase_usage("disable", 128 * MiB)
    assert model.price(usage.cost_counts()) == pytest.approx(0.5, rel=1e-9)
    # and --costs uses it: the sync reboot's DISABLE is modelled at the measured time
    out = io.StringIO()
    code = cli.main(
        ["reboot", "--memory", "3G", "--secure", "128M", "--sync", "--costs", str(out_path), "--json"],
        out=out,
        err=io.StringIO(),
    )
    assert code == 0
    assert json.loads(out.getvalue())["model"]["unprotect_seconds"] == pytest.approx(0.5, rel=1e-9)


def test_the_performance_doc_lists_every_default_cost():
    doc = (Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md").read_text(encoding="utf-8")
    model = CostModel.default()
    for param in model.parameters():
        value = model.get(param)
        shown = f"{value:,.0f}" if value == int(value) else str(value)
        assert f"| `{param}` | {shown} |" in doc, param


def test_kernel_mutex_behaves_like_threading_lock():
    import _thread

    m = clock.KernelMutex()
    assert m.acquire()
    assert m.locked()
    assert not m.acquire(False)
    assert not m.acquire(timeout=0.05)
    with pytest.raises(ValueError, match="non-blocking"):
        m.acquire(False, 1.0)
    timer = threading.Timer(0.1, _thread.interrupt_main)
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        m.acquire()  # a blocked wait ends with the signal handler's exception
    timer.join()
    m.release()
    with pytest.raises(RuntimeError, match="release unlocked lock"):
        m.release()
    with m:
        assert m.locked()
    assert not m.locked()


@pytest.mark.parametrize("phase", list(experiments.PHASES))
def test_every_calibration_phase_measures_its_work(phase):
    usage = experiments.phase_usage(phase, 16 * MiB)
    counts = usage.cost_counts()
    assert experiments.DEFAULT_FIT[phase] in counts  # the default fit parameter prices some of it
    if phase != "helper-exit":
        assert usage.uvc_total > 0
    else:
        assert usage.ptes >= 16 * MiB // 4096  # the helper's unmap
    assert Measurement.parse(f"{phase}:16M=2ms") == Measurement(phase, 16 * MiB, 0.002)
