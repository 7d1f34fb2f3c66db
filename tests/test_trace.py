"""Trace output: per-track monotonic timestamps in file order, one named track per thread and run,
no placeholder counter samples, runs named by what they were."""

from __future__ import annotations

import io
import itertools
import json
import threading
from collections import defaultdict
from pathlib import Path

import pytest

from pvfast import cli
from pvfast.trace import Tracer


def run_cli(*argv: str) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out=out, err=err)
    return code, err.getvalue()


def load(path: Path) -> list[dict]:
    doc = json.loads(path.read_text())
    return doc["traceEvents"]


def assert_monotonic_per_track(events: list[dict]) -> None:
    """On every (pid, tid) track, the timestamps of the timed events never go back in file order."""
    last: dict[tuple[int, int], float] = {}
    seen_timed = False
    for index, ev in enumerate(events):
        if ev["ph"] == "M":
            assert not seen_timed, f"metadata event {index} after timed events"
            continue
        seen_timed = True
        key = (ev["pid"], ev["tid"])
        assert ev["ts"] >= last.get(key, float("-inf")), f"event {index} {ev['name']!r} goes back on track {key}"
        last[key] = ev["ts"]


def assert_nested_per_track(events: list[dict]) -> None:
    """On every track the complete events nest: each starts after the enclosing one ended or
    ends inside it (what Perfetto needs to draw them as a stack)."""
    stacks: dict[tuple[int, int], list[tuple[float, str]]] = defaultdict(list)
    eps = 1e-3  # µs: rounding of the µs floats
    for ev in events:
        if ev["ph"] != "X":
            continue
        stack = stacks[(ev["pid"], ev["tid"])]
        while stack and ev["ts"] >= stack[-1][0] - eps:
            stack.pop()  # this event starts at or after the top one's end
        if stack:
            assert ev["ts"] + ev["dur"] <= stack[-1][0] + eps, f"{ev['name']!r} overlaps {stack[-1][1]!r}"
        stack.append((ev["ts"] + ev["dur"], ev["name"]))


def thread_names(events: list[dict]) -> dict[int, str]:
    return {ev["tid"]: ev["args"]["name"] for ev in events if ev["ph"] == "M" and ev["name"] == "thread_name"}


@pytest.fixture(scope="module")
def compare_trace(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    path = tmp_path_factory.mktemp("trace") / "compare.json"
    code, err = run_cli("compare", "--secure", "16M,32M", "--repeat", "2", "--no-plot", "--trace", str(path))
    assert code == 0, err
    return load(path)


@pytest.mark.parametrize("clock", ["wall", "model"])
def test_reboot_trace_is_monotonic_per_thread(tmp_path: Path, clock: str):
    path = tmp_path / "reboot.json"
    code, err = run_cli("reboot", "--memory", "3G", "--secure", "64M", "--clock", clock, "--trace", str(path))
    assert code == 0, err
    events = load(path)
    assert_monotonic_per_track(events)
    assert_nested_per_track(events)
    # an enclosing event comes before what it encloses: the run before its unprotect
    names = [ev["name"] for ev in events if ev["ph"] == "X"]
    run = next(i for i, n in enumerate(names) if n.startswith("async reboot"))
    assert run < names.index("unprotect")


def test_compare_trace_is_monotonic_per_thread(compare_trace: list[dict]):
    assert_monotonic_per_track(compare_trace)
    assert_nested_per_track(compare_trace)


def test_model_clock_runs_follow_one_another(tmp_path: Path):
    """Every host's modelled clocks start at 0; on the trace each run comes after the one before."""
    path = tmp_path / "compare-model.json"
    code, err = run_cli(
        "compare", "--secure", "16M", "--repeat", "2", "--no-plot", "--clock", "model", "--trace", str(path)
    )
    assert code == 0, err
    events = load(path)
    assert_monotonic_per_track(events)
    assert_nested_per_track(events)
    runs = [ev for ev in events if ev["ph"] == "X" and " reboot " in f" {ev['name']}"]
    assert len(runs) == 4
    for before, after in itertools.pairwise(runs):
        assert after["ts"] >= before["ts"] + before["dur"] - 1e-3
    assert runs[0]["ts"] == 0


def test_compare_trace_names_each_run_s_tracks(compare_trace: list[dict]):
    names = thread_names(compare_trace)
    cleanup = sorted(name for name in names.values() if name.startswith("async_cleanup"))
    # 2 sizes x 2 runs of the async reboot: four async_cleanup threads, four distinct tracks
    assert cleanup == [
        "async_cleanup [16M async, run 1]",
        "async_cleanup [16M async, run 2]",
        "async_cleanup [32M async, run 1]",
        "async_cleanup [32M async, run 2]",
    ]
    assert len(set(names.values())) == len(names)  # every track has its own name
    assert "MainThread" in names.values()  # the experiments' own thread: one track, no run label
    performs = {ev["tid"] for ev in compare_trace if ev["name"] == "KVM_PV_ASYNC_CLEANUP_PERFORM"}
    assert {names[tid] for tid in performs} == set(cleanup)


def test_compare_trace_names_runs_by_what_they_were(compare_trace: list[dict]):
    runs = [ev["name"] for ev in compare_trace if ev["ph"] == "X" and "reboot" in ev["name"]]
    assert not [name for name in runs if "auto" in name]
    assert runs.count("sync reboot (DISABLE) of a 3.02G guest, 16M secure") == 2
    assert runs.count("async reboot (PREPARE, PERFORM in async_cleanup) of a 3.03G guest, 32M secure") == 2


def test_no_placeholder_counter_samples(compare_trace: list[dict]):
    counters = [ev for ev in compare_trace if ev["ph"] == "C"]
    assert counters
    for ev in counters:
        assert ev["args"], ev
        assert "none" not in ev["args"], ev
    assert {"UVCs", "secure pages", "guest memory (MiB)", "UVCs by thread"} <= {ev["name"] for ev in counters}


def test_small_guest_fallback_run_is_named(tmp_path: Path):
    path = tmp_path / "small.json"
    code, err = run_cli("reboot", "--memory", "2G", "--secure", "0", "--async", "--trace", str(path))
    assert code == 0, err
    names = [ev["name"] for ev in load(path) if ev["ph"] == "X"]
    assert "sync reboot (DISABLE: QEMU's fallback from async) of a 2G guest, 0B secure" in names


def test_tracer_sorts_out_of_order_events_and_drops_empty_counters():
    tracer = Tracer()
    tracer.complete("inner", 2_000, 3_000)  # recorded first: it ends first
    tracer.complete("outer", 1_000, 5_000)
    tracer.complete("same start, shorter", 1_000, 2_000)
    tracer.counter("nothing yet", {})
    tracer.counter("x", {"a": 1}, ts_ns=500)
    doc = tracer.document()
    timed = [ev for ev in doc["traceEvents"] if ev["ph"] != "M"]
    assert [ev["name"] for ev in timed] == ["x", "outer", "same start, shorter", "inner"]
    assert "nothing yet" not in {ev["name"] for ev in doc["traceEvents"]}


def test_tracer_gives_every_thread_its_own_track_even_with_a_reused_thread_id():
    tracer = Tracer(clock="wall")

    def work() -> None:
        with tracer.span("work"):
            pass

    with tracer.labelled("run 1"):
        t1 = threading.Thread(target=work, name="async_cleanup")
        t1.start()
        t1.join()
    reused = t1.native_id

    class ReusedId(threading.Thread):
        @property
        def native_id(self) -> int | None:  # as if the OS had reused the first thread's id
            return reused

    with tracer.labelled("run 2"):
        t2 = ReusedId(target=work, name="async_cleanup")
        t2.start()
        t2.join()
    with tracer.span("main"):
        pass
    events = tracer.document()["traceEvents"]
    names = thread_names(events)
    assert sorted(names.values()) == ["MainThread", "async_cleanup [run 1]", "async_cleanup [run 2]"]
    by_track = defaultdict(list)
    for ev in events:
        if ev["ph"] == "X":
            by_track[names[ev["tid"]]].append(ev["name"])
    assert by_track == {"async_cleanup [run 1]": ["work"], "async_cleanup [run 2]": ["work"], "MainThread": ["main"]}
