"""Argument checks shared by the public entry points: misuse raises TypeError/ValueError naming the argument."""

from __future__ import annotations


def check_int(name: str, value: object, *, bits: int = 64, signed: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected int, got {type(value).__name__}")
    lo = -(1 << (bits - 1)) if signed else 0
    hi = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    if not lo <= value <= hi:
        raise ValueError(f"{name}: {value} is out of range [{lo}, {hi}]")
    return value


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, (bool, int)):
        raise TypeError(f"{name}: expected bool, got {type(value).__name__}")
    return bool(value)


def check_bytes(name: str, value: object) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: expected bytes, got {type(value).__name__}")
    return bytes(value)
