"""Chrome/Perfetto trace-event output for ``pvfast --trace``: spans, PV commands, UVC counters.

The file is ``{"traceEvents": [...]}`` in the Trace Event Format (open it in ui.perfetto.dev or
chrome://tracing): "X" complete events (``ts``/``dur`` in µs), "C" counter events and "M" metadata
naming the process and threads. Tracing is opt-in: code that is not given a ``Tracer`` pays nothing.

Each Python thread is one track, even where the OS reuses a thread id; a thread first seen inside
``with tracer.labelled("4G async, run 2"):`` is named ``async_cleanup [4G async, run 2]``, so the
tracks of repeated runs are told apart. The file lists the metadata first, then every event in
timestamp order (an enclosing event before the ones it contains), so each track's timestamps
rise in file order. A counter event without values is not written.

``Tracer(clock="model")`` places every event on the modelled clock of the thread that records it
(pvfast.clock) instead of wall time, so a trace shows where the modelled hardware time goes.
Each emulated host is a machine whose clocks start at 0: the events of a run on a fresh host
(``with tracer.machine() as start:``) are placed after everything recorded before it, so the runs
of a compare follow one another on the modelled clock as they do on the wall clock.
"""

from __future__ import annotations

import json
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import clock as _clock

CLOCKS = ("wall", "model")


class Tracer:
    """Collects trace events from any thread; ``write`` saves them. Timestamps are µs since creation
    (``clock="wall"``) or on the recording thread's modelled clock (``clock="model"``)."""

    def __init__(self, *, pid: int | None = None, process_name: str = "pvfast", clock: str = "wall") -> None:
        if clock not in CLOCKS:
            raise ValueError(f"clock: expected 'wall' or 'model', got {clock!r}")
        self.clock = clock
        self.pid = os.getpid() if pid is None else pid
        self._origin_ns = time.perf_counter_ns() if clock == "wall" else 0
        self._lock = threading.Lock()
        self._tids: weakref.WeakKeyDictionary[threading.Thread, int] = weakref.WeakKeyDictionary()
        self._used_tids: set[int] = set()
        self._next_tid = 1 << 24  # above every Linux thread id: for a thread whose id was reused
        self._owner = threading.current_thread()  # the thread running the experiments: no label
        self.label: str | None = None
        self._offset_ns = 0  # clock="model": where the current machine's time 0 is on the trace
        self.events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0, "ts": 0, "args": {"name": process_name}}
        ]

    # -- clocks --
    def now_ns(self) -> int:
        """Now on the trace's clock (the calling thread's modelled clock with clock="model")."""
        if self.clock == "model":
            return _clock.now_ps() // 1000 + self._offset_ns
        return time.perf_counter_ns()

    def ts_for(self, *, wall_ns: int, model_ns: int) -> int:
        """Of a moment known on both clocks, its time on the trace's clock (for samplers)."""
        return model_ns + self._offset_ns if self.clock == "model" else wall_ns

    @contextmanager
    def machine(self) -> Iterator[int]:
        """The events from here on are of a fresh emulated host, whose modelled clocks start at 0:
        with clock="model" they are placed after every event recorded so far. Yields the
        machine's start on the trace's clock (ns; with clock="wall": now)."""
        if self.clock == "model":
            self._offset_ns = max(self._offset_ns, self.frontier_ns())
            yield self._offset_ns
        else:
            yield self.now_ns()

    def frontier_ns(self) -> int:
        """Where an event that encloses runs on fresh hosts starts: with clock="model" the end of
        everything recorded so far (the calling thread's own clock may still be a previous
        host's), with clock="wall" now."""
        if self.clock != "model":
            return self.now_ns()
        with self._lock:
            ends = [ev["ts"] + ev.get("dur", 0.0) for ev in self.events if ev["ph"] != "M"]
        return round(max(ends, default=0.0) * 1000)

    def _us(self, t_ns: int) -> float:
        return (t_ns - self._origin_ns) / 1000.0

    # -- tracks --
    @contextmanager
    def labelled(self, label: str) -> Iterator[None]:
        """Threads first seen inside the ``with`` (other than the one that made the tracer) get
        ``label`` in their track's name, e.g. one run of a repeated experiment."""
        previous, self.label = self.label, label
        try:
            yield
        finally:
            self.label = previous

    def _tid(self, thread: threading.Thread) -> int:
        """The track of ``thread`` (caller holds the lock); a new one gets its name event."""
        tid = self._tids.get(thread)
        if tid is not None:
            return tid
        tid = thread.native_id or threading.get_native_id()
        if tid in self._used_tids:
            tid, self._next_tid = self._next_tid, self._next_tid + 1
        self._used_tids.add(tid)
        self._tids[thread] = tid
        name = thread.name
        if self.label and thread is not self._owner:
            name = f"{name} [{self.label}]"
        self.events.append(
            {"ph": "M", "name": "thread_name", "pid": self.pid, "tid": tid, "ts": 0, "args": {"name": name}}
        )
        return tid

    # -- events --
    def _add(self, event: dict[str, Any]) -> None:
        """Record ``event`` on the calling thread's track."""
        thread = threading.current_thread()
        with self._lock:
            event["tid"] = self._tid(thread)
            self.events.append(event)

    def complete(
        self, name: str, start_ns: int, end_ns: int, *, cat: str = "phase", args: Mapping[str, Any] | None = None
    ) -> None:
        """An "X" event on the calling thread from ``start_ns`` to ``end_ns`` (perf_counter_ns)."""
        event: dict[str, Any] = {
            "ph": "X",
            "name": name,
            "cat": cat,
            "pid": self.pid,
            "ts": self._us(start_ns),
            "dur": max(0.0, (end_ns - start_ns) / 1000.0),
        }
        if args:
            event["args"] = dict(args)
        self._add(event)

    @contextmanager
    def span(
        self, name: str, *, cat: str = "phase", start_ns: int | None = None, **args: Any
    ) -> Iterator[dict[str, Any]]:
        """Time the ``with`` body as one complete event (from ``start_ns`` if given); the yielded
        dict becomes (more of) its args."""
        extra: dict[str, Any] = dict(args)
        start = self.now_ns() if start_ns is None else start_ns
        try:
            yield extra
        finally:
            self.complete(name, start, self.now_ns(), cat=cat, args=extra)

    def counter(self, name: str, values: Mapping[str, int | float], *, ts_ns: int | None = None) -> None:
        """A "C" counter event: one track per key of ``values`` under ``name``, now or at ``ts_ns``
        (on the trace's clock). Without values nothing is recorded (no placeholder track)."""
        if not values:
            return
        self._add(
            {
                "ph": "C",
                "name": name,
                "pid": self.pid,
                "ts": self._us(self.now_ns() if ts_ns is None else ts_ns),
                "args": dict(values),
            }
        )

    def instant(self, name: str, **args: Any) -> None:
        """An "i" instant event on the calling thread's track, now."""
        self._add(
            {
                "ph": "i",
                "s": "t",
                "name": name,
                "pid": self.pid,
                "ts": self._us(self.now_ns()),
                "args": args,
            }
        )

    def wrap(self, func: Callable[..., Any], name: Callable[..., str], *, cat: str) -> Callable[..., Any]:
        """``func`` traced: each call is one complete event named ``name(*args)``, errors in args."""

        def traced(*args: Any, **kwargs: Any) -> Any:
            start = self.now_ns()
            info: dict[str, Any] = {}
            try:
                result = func(*args, **kwargs)
            except BaseException as err:
                info["error"] = str(err)
                raise
            finally:
                self.complete(name(*args), start, self.now_ns(), cat=cat, args=info)
            return result

        return traced

    # -- output --
    def document(self) -> dict[str, Any]:
        """The trace as a Trace Event Format document: metadata first, then the events by
        timestamp (at equal timestamps the longer complete event first: it encloses the other)."""
        with self._lock:
            events = list(self.events)
        meta = [ev for ev in events if ev["ph"] == "M"]
        timed = sorted((ev for ev in events if ev["ph"] != "M"), key=lambda ev: (ev["ts"], -ev.get("dur", 0.0)))
        return {"traceEvents": meta + timed, "displayTimeUnit": "ms", "otherData": {"clock": self.clock}}

    def write(self, path: str | os.PathLike[str]) -> None:
        """Save ``document()`` as JSON."""
        Path(path).write_text(json.dumps(self.document()) + "\n", encoding="utf-8")
