"""Argument checks shared by the public entry points: misuse raises TypeError/ValueError naming the argument.

Each check returns the value to use from then on, as a plain ``int``/``bool``/``bytes``: an ``int``
subclass is read through ``int.__index__`` (the C value, whatever its Python methods say), so a
subclass whose comparisons or ``__int__`` lie cannot pass a range check with one value and reach
the native layer with another.
"""

from __future__ import annotations

_as_int = int.__index__  # the int's own value, bypassing any override in a subclass


def check_int(name: str, value: object, *, bits: int = 64, signed: bool = False) -> int:
    """``value`` as a plain int that fits ``bits`` (unsigned unless ``signed``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    plain = _as_int(value)
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if not lo <= plain <= hi:
        raise ValueError(f"{name}: {plain} is out of range [{lo}, {hi}]")
    return plain


def check_bool(name: str, value: object) -> bool:
    """``value`` (a bool or an int) as a plain bool."""
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name}: expected bool, got {type(value).__name__}")
    return _as_int(value) != 0


def check_bytes(name: str, value: object) -> bytes:
    """``value`` (bytes, bytearray or memoryview) as plain bytes, copied through the buffer protocol."""
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: expected bytes, got {type(value).__name__}")
    return bytes(memoryview(value))
