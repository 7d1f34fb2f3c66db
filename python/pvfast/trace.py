"""Chrome/Perfetto trace-event output for ``pvfast --trace``: spans, PV commands, UVC counters.

The file is ``{"traceEvents": [...]}`` in the Trace Event Format (open it in ui.perfetto.dev or
chrome://tracing): "X" complete events (``ts``/``dur`` in µs), "C" counter events and "M" metadata
naming the process and threads. Tracing is opt-in: code that is not given a ``Tracer`` pays nothing.

``Tracer(clock="model")`` places every event on the modelled clock of the thread that records it
(pvfast.clock) instead of wall time, so a trace shows where the modelled hardware time goes.
"""

from __future__ import annotations

import json
import os
import threading
import time
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
        self._named_threads: set[int] = set()
        self.events: list[dict[str, Any]] = [
            {"ph": "M", "name": "process_name", "pid": self.pid, "tid": 0, "ts": 0, "args": {"name": process_name}}
        ]

    # -- clocks --
    def now_ns(self) -> int:
        """Now on the trace's clock (the calling thread's modelled clock with clock="model")."""
        if self.clock == "model":
            return _clock.now_ps() // 1000
        return time.perf_counter_ns()

    def ts_for(self, *, wall_ns: int, model_ns: int) -> int:
        """Of a moment known on both clocks, its time on the trace's clock (for samplers)."""
        return model_ns if self.clock == "model" else wall_ns

    def _us(self, t_ns: int) -> float:
        return (t_ns - self._origin_ns) / 1000.0

    # -- events --
    def _add(self, event: dict[str, Any]) -> None:
        tid = event["tid"]
        with self._lock:
            if tid not in self._named_threads:
                self._named_threads.add(tid)
                self.events.append(
                    {
                        "ph": "M",
                        "name": "thread_name",
                        "pid": self.pid,
                        "tid": tid,
                        "ts": 0,
                        "args": {"name": threading.current_thread().name},
                    }
                )
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
            "tid": threading.get_native_id(),
            "ts": self._us(start_ns),
            "dur": max(0.0, (end_ns - start_ns) / 1000.0),
        }
        if args:
            event["args"] = dict(args)
        self._add(event)

    @contextmanager
    def span(self, name: str, *, cat: str = "phase", **args: Any) -> Iterator[dict[str, Any]]:
        """Time the ``with`` body as one complete event; the yielded dict becomes (more of) its args."""
        extra: dict[str, Any] = dict(args)
        start = self.now_ns()
        try:
            yield extra
        finally:
            self.complete(name, start, self.now_ns(), cat=cat, args=extra)

    def counter(self, name: str, values: Mapping[str, int | float], *, ts_ns: int | None = None) -> None:
        """A "C" counter event: one track per key of ``values`` under ``name``, now or at ``ts_ns``
        (on the trace's clock)."""
        self._add(
            {
                "ph": "C",
                "name": name,
                "pid": self.pid,
                "tid": threading.get_native_id(),
                "ts": self._us(self.now_ns() if ts_ns is None else ts_ns),
                "args": dict(values),
            }
        )

    def instant(self, name: str, **args: Any) -> None:
        self._add(
            {
                "ph": "i",
                "s": "t",
                "name": name,
                "pid": self.pid,
                "tid": threading.get_native_id(),
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
        with self._lock:
            return {"traceEvents": list(self.events), "displayTimeUnit": "ms", "otherData": {"clock": self.clock}}

    def write(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.document()) + "\n", encoding="utf-8")
