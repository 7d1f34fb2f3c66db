"""Memory held over time: while a teardown runs, how much of the dead or set-aside guest's memory
is still allocated and still secure, and which processes still map it.

A ``MemoryTimeline`` samples from its own thread every ``interval`` seconds (native walks release
the GIL, so it samples during a long synchronous DISABLE as well) and takes an extra sample at
every ``mark``. Each sample carries both clocks: wall seconds since the start, and modelled
seconds (``mark``: the marking thread's clock; periodic samples: the latest clock of any emulated
thread of the host, i.e. how far the modelled machine has got). Walk workers publish their
progress per chunk, so the samples advance during a walk. With a tracer, every sample is also
a trace counter (guest memory, and the UVCs of each thread so far).

Marked samples are deterministic in modelled time when nothing else runs at that moment (the
shutdown phases, the end of a reboot); periodic samples depend on when the sampler ran.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from . import clock
from .constants import PAGE_SIZE

if TYPE_CHECKING:
    from . import _native
    from .host import Host
    from .mm import AddressSpace
    from .trace import Tracer


@dataclass(frozen=True, slots=True)
class MemorySample:
    """Guest memory at one moment: bytes still mapped (``allocated``: present pages of the
    guest's mappings) and still secure (pages of the tracked configurations), the processes whose
    address space still maps them (``helpers_only``: all of them are CLONE_VM helpers, the VMM is
    gone), and the event a ``mark`` gave ("" for a periodic sample)."""

    wall_seconds: float
    model_seconds: float
    allocated_bytes: int
    secure_bytes: int
    holders: tuple[str, ...]
    helpers_only: bool = False
    event: str = ""

    def as_dict(self) -> dict[str, Any]:
        """The sample as JSON-serialisable data (a ``memory_timeline`` entry)."""
        return {
            "wall_seconds": self.wall_seconds,
            "model_seconds": self.model_seconds,
            "allocated_bytes": self.allocated_bytes,
            "secure_bytes": self.secure_bytes,
            "held_by": list(self.holders),
            "helpers_only": self.helpers_only,
            "event": self.event,
        }


class MemoryTimeline:
    """Samples the memory of one address space's guest (``mm``) and the secure pages of the
    configurations ``handles`` (dead handles still count their orphaned pages)."""

    def __init__(
        self,
        host: Host,
        mm: AddressSpace,
        handles: Iterable[int],
        *,
        interval: float = 0.01,
        tracer: Tracer | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError(f"interval: {interval} must be positive")
        self.host = host
        self.mm = mm
        self.regions: list[_native.Region] = list(mm.regions)
        self.handles = list(handles)
        self.interval = interval
        self.tracer = tracer
        self.samples: list[MemorySample] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wall0 = time.perf_counter()
        self._model0 = 0
        self._uvcs0: dict[tuple[int, str], int] = {}

    # -- what is measured --
    def _allocated(self) -> int:
        pages = 0
        for region in self.regions:
            try:
                pages += region.present_pages()
            except ValueError:  # released: unmapped
                continue
        return pages * PAGE_SIZE

    def _secure(self) -> int:
        return sum(self.host.uv.secure_pages(h) for h in self.handles) * PAGE_SIZE

    def _holders(self) -> tuple[tuple[str, ...], bool]:
        if self.mm.dead:
            return (), False
        procs = [p for p in list(self.host.processes) if p.mm is self.mm and p.alive]
        return tuple(p.name for p in procs), bool(procs) and all(p.helper_of is not None for p in procs)

    def _frontier_ps(self) -> int:
        return self.host.accounting.latest_clock_ps()

    def _sample(self, event: str, model_ps: int | None) -> MemorySample:
        # Read the memory first and the clocks after: a read that waits for an unmap in progress
        # then counts the memory as held until the moment the read returned.
        allocated, secure = self._allocated(), self._secure()
        holders, helpers_only = self._holders()
        if model_ps is None:
            model_ps = self._frontier_ps()
        sample = MemorySample(
            wall_seconds=time.perf_counter() - self._wall0,
            model_seconds=max(0, model_ps - self._model0) / 1e12,
            allocated_bytes=allocated,
            secure_bytes=secure,
            holders=holders,
            helpers_only=helpers_only,
            event=event,
        )
        with self._lock:
            self.samples.append(sample)
        if self.tracer is not None:
            self._trace(sample, model_ps)
        return sample

    def _trace(self, sample: MemorySample, model_ps: int) -> None:
        tracer = self.tracer
        assert tracer is not None
        ts = tracer.ts_for(wall_ns=time.perf_counter_ns(), model_ns=model_ps // 1000)
        tracer.counter(
            "guest memory (MiB)",
            {"allocated": sample.allocated_bytes / (1 << 20), "secure": sample.secure_bytes / (1 << 20)},
            ts_ns=ts,
        )
        uvcs = {
            f"{t.process}/{t.thread}": t.usage.uvc_total - self._uvcs0.get(t.key, 0)
            for t in self.host.accounting.snapshot().threads
        }
        tracer.counter("UVCs by thread", {k: v for k, v in uvcs.items() if v}, ts_ns=ts)  # none yet: no sample

    # -- control --
    def start(self) -> MemoryTimeline:
        """Start sampling (the first sample is the mark ``"start"``)."""
        self._wall0 = time.perf_counter()
        self._model0 = clock.now_ps()
        self._uvcs0 = {t.key: t.usage.uvc_total for t in self.host.accounting.snapshot().threads}
        self.mark("start")
        self._thread = threading.Thread(target=self._run, name="pvfast-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        # Sampling a guest of many TiB takes milliseconds (it sums the chunk summaries): the
        # sampler waits at least ten times as long as a sample took, so it stays a small load.
        wait = self.interval
        while not self._stop.wait(wait):
            t = time.perf_counter()
            self._sample("", None)
            wait = max(self.interval, 10 * (time.perf_counter() - t))

    def mark(self, event: str) -> MemorySample:
        """A sample now, labelled ``event``, at the calling thread's modelled clock."""
        return self._sample(event, clock.now_ps())

    def stop(self) -> tuple[MemorySample, ...]:
        """Stop sampling; returns every sample in wall-time order."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            return tuple(self.samples)

    # -- results --
    def events(self) -> tuple[MemorySample, ...]:
        """The marked samples (those with an ``event``), in order."""
        with self._lock:
            return tuple(s for s in self.samples if s.event)

    def as_dict(self) -> dict[str, Any]:
        """The timeline as JSON-serialisable data: the interval, the marked and all samples."""
        with self._lock:
            samples = list(self.samples)
        return {
            "interval_seconds": self.interval,
            "events": [s.as_dict() for s in samples if s.event],
            "samples": [s.as_dict() for s in samples],
        }


def plot_memory(timeline: dict[str, Any], path: str, *, clock_kind: str = "wall", title: str = "") -> None:
    """Plot a timeline's ``as_dict()``: allocated and secure guest memory against wall or modelled
    time, with the marked events; where only a helper still maps the memory, the area is shaded
    (the window in which a new guest may find the host short of memory)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "model_seconds" if clock_kind == "model" else "wall_seconds"
    samples: Sequence[dict[str, Any]] = sorted(timeline["samples"], key=lambda s: (s[key], s["wall_seconds"]))
    xs = [s[key] for s in samples]
    gib = float(1 << 30)
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    ax.step(xs, [s["allocated_bytes"] / gib for s in samples], where="post", label="allocated (still mapped)")
    ax.step(xs, [s["secure_bytes"] / gib for s in samples], where="post", label="still secure")
    ax.axvspan(0, 0, color="tab:red", alpha=0.12, lw=0, label="held only by the CLONE_VM helper (VMM gone)")
    top = max([s["allocated_bytes"] for s in samples] + [1]) / gib
    for a, b in itertools.pairwise(samples):
        if a["allocated_bytes"] and a["helpers_only"]:
            ax.axvspan(a[key], b[key], color="tab:red", alpha=0.12, lw=0)
    for s in samples:
        if s["event"] and s["event"] != "start":
            ax.axvline(s[key], color="grey", lw=0.6, ls=":")
            ax.text(s[key], top * 1.58, s["event"], rotation=90, fontsize=7, va="top", ha="right")
    ax.set_xlabel("modelled time (s)" if clock_kind == "model" else "wall time (s)")
    ax.set_ylabel("GiB of the guest's memory")
    ax.set_ylim(0, top * 1.6)  # room above the curves for the event labels
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)  # below: no label under it
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, format="png")
    plt.close(fig)
