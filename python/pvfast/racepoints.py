"""Deterministic interleaving: named points in the emulated kernel where a test stops a thread
and lets it go on again (``Host.race_point``).

A point is *armed* by a test; a kernel thread that reaches an armed point (a *hit*) pauses there,
holding whatever the kernel holds at that place (kvm->lock, a vCPU mutex, a claimed record ...),
until the test calls ``release()``, runs an optional action, and goes on. Every wait has a
timeout, so a test that waits for a hit that never comes, or forgets to release a paused thread,
fails with ``RaceTimeout`` instead of hanging.

Unarmed points cost one attribute test (``race.armed``) where the kernel code reaches them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ._util import check_bool
from .interrupts import keep_or_raise

#: The points, and where they are. Kernel function names are those of arch/s390/kvm and mm/.
POINTS: Mapping[str, str] = MappingProxyType(
    {
        "guest_access": (
            "a guest-side call (guest_access, guest_read, guest_write, guest_share) runs on its vCPU: "
            "it holds vcpu->mutex (KVM_RUN) and has chosen the configuration it runs as, before any "
            "fault is resolved"
        ),
        "enable_start": "KVM_PV_ENABLE under kvm->lock, before anything is registered or allocated",
        "perform_claimed": (
            "KVM_PV_ASYNC_CLEANUP_PERFORM (kvm_s390_pv_deinit_aside_vm) has claimed the set-aside "
            "record and dropped kvm->lock, before its walk"
        ),
        "walk_batch": (
            "between two batches of PERFORM's interruptible destroy walk, after the batch and before "
            "the fatal-signal test (while this point is armed the walk runs batch by batch on the "
            "calling thread)"
        ),
        "vm_destroy_vcpus_gone": (
            "kvm_arch_destroy_vm after the vCPUs are destroyed, before kvm_s390_pv_deinit_cleanup_all"
        ),
        "cleanup_all_counted": (
            "kvm_s390_pv_deinit_cleanup_all after it took its protected_count reference, before the "
            "current configuration is destroyed"
        ),
        "cleanup_all_deinit_vm": (
            "kvm_s390_pv_deinit_cleanup_all found a current configuration and is about to destroy it: "
            "kvm_s390_pv_deinit_vm reads the handle for its UVC next"
        ),
        "cleanup_all_before_zap": (
            "kvm_s390_pv_deinit_cleanup_all after the leftovers are disposed of, before the zap of "
            "the address space (mmget_not_zero)"
        ),
        "notifier_release": (
            "kvm_s390_pv_mmu_notifier_release after kvm_s390_cpus_from_pv and its test whether to "
            "Destroy-Fast (context: fast), before kvm_s390_pv_deinit_vm_fast reads the handle"
        ),
        "exit_before_mmput": (
            "process exit after the other threads' calls have returned, before the mm user is dropped (exit_mm)"
        ),
        "mm_teardown": "exit_mmap after the release notifiers, before the page-table teardown",
        "async_cleanup_start": (
            "pvfast.vmm's async_cleanup thread has started and not yet entered PERFORM "
            "(vmm.unprotect's hold event waits here)"
        ),
    }
)


class RaceTimeout(TimeoutError):
    """A race point waited longer than its timeout: no thread arrived, or a paused thread was
    never released (it went on by itself, and the test is wrong)."""


class _Arrival:
    __slots__ = ("context", "go", "timed_out")

    def __init__(self, context: dict[str, Any]) -> None:
        self.context = context
        self.go = threading.Event()
        self.timed_out = False


class RacePoint:
    """One armed point (made by ``Host.race_point``). A context manager: leaving the ``with``
    block disarms it and releases any thread still paused there."""

    def __init__(
        self,
        registry: RacePoints,
        name: str,
        *,
        match: Mapping[str, object],
        pause: bool,
        count: int | None,
        timeout: float,
        action: Callable[[dict[str, Any]], object] | None,
    ) -> None:
        self.name = name
        self._registry = registry
        self._match = dict(match)
        self.pause = pause
        self.count = count
        self.timeout = timeout
        self._action = action
        self._cond = threading.Condition()
        self._arrivals: list[_Arrival] = []
        self._waited = 0  # arrivals already handed out by wait()
        self._closed = False
        self.contexts: list[dict[str, Any]] = []  # every hit's context, paused or not

    def __repr__(self) -> str:
        return f"<RacePoint {self.name!r} hits={self.hits} armed={not self._closed}>"

    @property
    def hits(self) -> int:
        """How many times a matching thread reached the point while it was armed."""
        with self._cond:
            return len(self.contexts)

    def matches(self, context: Mapping[str, Any]) -> bool:
        """Whether a hit with ``context`` is one this point waits for (every ``vm=``/``process=``
        filter it was armed with equals the hit's)."""
        return all(context.get(key) == value for key, value in self._match.items())

    def _arrive(self, context: dict[str, Any]) -> None:
        """Run in the kernel thread at the point."""
        with self._cond:
            if self._closed:
                return
            self.contexts.append(context)
            pause = self.pause and (self.count is None or len(self._arrivals) < self.count)
            arrival = _Arrival(context) if pause else None
            if arrival is not None:
                self._arrivals.append(arrival)
            self._cond.notify_all()
        if arrival is not None and not arrival.go.wait(self.timeout):
            arrival.timed_out = True
        if self._action is not None:
            self._action(context)

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait until the next hit (for a pausing point: until a thread is paused there), and
        return its context (the keyword arguments the kernel passed, e.g. ``vm``, plus
        ``thread``: the ident of the thread that hit it). RaceTimeout after ``timeout`` seconds
        (default: the point's own timeout)."""
        limit = self.timeout if timeout is None else timeout
        with self._cond:
            seen = self._arrivals if self.pause else self.contexts
            if not self._cond.wait_for(lambda: len(seen) > self._waited, limit):
                raise RaceTimeout(f"race point {self.name!r}: no thread arrived within {limit} s")
            item = seen[self._waited]
            self._waited += 1
        return item.context if isinstance(item, _Arrival) else item

    def release(self) -> None:
        """Let every thread paused at this point go on."""
        with self._cond:
            arrivals = list(self._arrivals)
        for arrival in arrivals:
            arrival.go.set()

    def close(self) -> None:
        """Disarm and release; RaceTimeout if a paused thread had to go on by itself."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._registry._disarm(self)
        self.release()
        late = [a for a in self._arrivals if a.timed_out]
        if late:
            raise RaceTimeout(
                f"race point {self.name!r}: {len(late)} paused thread(s) were not released within {self.timeout} s"
            )

    def __enter__(self) -> RacePoint:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except RaceTimeout:
            if exc_type is None:
                raise


class _Gate:
    """An internal use of a point: threads matching ``predicate`` wait for ``event`` (no timeout)."""

    __slots__ = ("event", "predicate")

    def __init__(self, predicate: Callable[[Mapping[str, Any]], bool], event: threading.Event) -> None:
        self.predicate = predicate
        self.event = event


class RacePoints:
    """The points of one emulated host. ``armed`` is the one test on the kernel's paths."""

    __slots__ = ("_gates", "_lock", "_points", "armed")

    def __init__(self) -> None:
        self.armed = False
        self._lock = threading.Lock()
        self._points: dict[str, list[RacePoint]] = {}
        self._gates: dict[str, list[_Gate]] = {}

    def arm(
        self,
        name: str,
        *,
        pause: bool = True,
        count: int | None = 1,
        timeout: float = 10.0,
        action: Callable[[dict[str, Any]], object] | None = None,
        raises: type[BaseException] | BaseException | None = None,
        **match: object,
    ) -> RacePoint:
        """Arm point ``name`` for the next ``count`` hits (None: every hit) that match ``match``
        (``vm=``, ``process=``): each pauses until released (``pause``), runs ``action`` or raises
        ``raises`` in the kernel thread. ``Host.race_point`` is the public way to call this."""
        if not isinstance(name, str):
            raise TypeError(f"name: expected str, got {type(name).__name__}")
        if name not in POINTS:
            raise ValueError(f"name: unknown race point {name!r}; the points are {', '.join(sorted(POINTS))}")
        check_bool("pause", pause)
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise ValueError(f"count: {count!r} is not a positive int or None")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ValueError(f"timeout: {timeout!r} is not a positive number of seconds")
        if action is not None and not callable(action):
            raise TypeError(f"action: expected a callable, got {type(action).__name__}")
        if raises is not None:
            if not (
                isinstance(raises, BaseException) or (isinstance(raises, type) and issubclass(raises, BaseException))
            ):
                raise TypeError(f"raises: expected an exception, got {raises!r}")
            inner = action

            def action(context: dict[str, Any]) -> object:
                if inner is not None:
                    inner(context)
                raise raises

        point = RacePoint(
            self, name, match=match, pause=bool(pause), count=count, timeout=float(timeout), action=action
        )
        with self._lock:
            self._points.setdefault(name, []).append(point)
            self.armed = True
        return point

    def gate(self, name: str, predicate: Callable[[Mapping[str, Any]], bool], event: threading.Event) -> _Gate:
        """Make matching threads wait at ``name`` until ``event`` is set (kernel-internal uses)."""
        gate = _Gate(predicate, event)
        with self._lock:
            self._gates.setdefault(name, []).append(gate)
            self.armed = True
        return gate

    def ungate(self, name: str, gate: _Gate) -> None:
        """Remove a gate ``gate()`` put at point ``name``."""
        with self._lock:
            gates = self._gates.get(name, [])
            if gate in gates:
                gates.remove(gate)
            self._update()

    def _disarm(self, point: RacePoint) -> None:
        with self._lock:
            points = self._points.get(point.name, [])
            if point in points:
                points.remove(point)
            self._update()

    def _update(self) -> None:
        self.armed = any(self._points.values()) or any(self._gates.values())

    def is_armed(self, name: str) -> bool:
        """Whether a test armed ``name`` (the stepped walk asks this)."""
        return bool(self.armed and self._points.get(name))

    def hit(self, name: str, **context: Any) -> None:
        """The kernel reached ``name``. Callers test ``armed`` first; this is the slow path."""
        with self._lock:
            points = [p for p in self._points.get(name, ()) if p.matches(context)]
            gates = [g for g in self._gates.get(name, ()) if g.predicate(context)]
        try:
            for gate in gates:
                gate.event.wait()
            if points:
                context["thread"] = threading.get_ident()
                context["point"] = name
                for point in points:
                    point._arrive(context)
        except BaseException as exc:  # noqa: BLE001 - an interrupt landing at the point
            keep_or_raise(exc)  # held by an uninterruptible kernel step, else raised here
