"""Secure-Execution-style boot images: seal components for a host key, inspect a header.

A VMM writes ``Image.components`` to guest memory, passes ``Image.header`` to
KVM_PV_SET_SEC_PARMS, issues KVM_PV_UNPACK for each component (addr, size, tweak) in order,
then KVM_PV_VERIFY. Byte layout and rc tables: docs/IMAGE.md. The cryptography runs in Rust.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, TypedDict

from . import _native
from ._util import check_bytes, check_int
from .constants import PAGE_SIZE as PAGE_SIZE  # also pvfast.image.PAGE_SIZE
from .constants import UVC_RC_EXECUTED as RC_EXECUTED

HOST_KEY_DEFAULT: Final[bytes] = _native.HOST_KEY_DEFAULT
MAX_HEADER_LEN: Final[int] = _native.IMAGE_MAX_HEADER_LEN
MAX_COMPONENTS: Final[int] = _native.IMAGE_MAX_COMPONENTS
HOST_KEY_LEN: Final = 32
IMAGE_KEY_LEN: Final = 64
#: Default component tweaks are TWEAK_BASE + index + 1 ("pvfast" in the top six bytes).
TWEAK_BASE: Final = 0x7076_6661_7374_0000

# rc of SET_SEC_CONF_PARAMS (KVM_PV_SET_SEC_PARMS) for a refused header, with cc 1.
RC_HDR_TOO_SHORT: Final = 0x0101
RC_HDR_BAD_MAGIC: Final = 0x0102
RC_HDR_BAD_VERSION: Final = 0x0107  # 0x0103 is "header not readable" on real machines
RC_HDR_BAD_LENGTH: Final = 0x0104
RC_HDR_BAD_COMPONENT: Final = 0x0105
RC_HDR_RESERVED: Final = 0x0106
RC_HDR_KEY_UNWRAP: Final = 0x0108  # wrong host key or tampered header
# rc of VERIFY_IMG (KVM_PV_VERIFY), checked in this order.
RC_VERIFY_PLD: Final = 0x0102
RC_VERIFY_ALD: Final = 0x0103
RC_VERIFY_TLD: Final = 0x0104


class HeaderInfo(TypedDict):
    """What ``Image.parse`` reports about an authenticated header (digests as hex)."""

    version: int
    length: int
    pages: int
    components: list[tuple[int, int, int]]  # (addr, size, tweak)
    pld: str
    ald: str
    tld: str


@dataclass(frozen=True, slots=True)
class Component:
    """Plaintext to seal, loaded at guest absolute ``addr`` (4 KiB aligned).

    ``data`` is padded with zeros to a multiple of 4 KiB. ``tweak`` defaults to
    ``default_tweak(index)``.
    """

    addr: int
    data: bytes
    tweak: int | None = None


@dataclass(frozen=True, slots=True)
class EncryptedComponent:
    """A sealed component: what the VMM copies to ``addr`` before KVM_PV_UNPACK."""

    addr: int
    tweak: int
    data: bytes

    @property
    def size(self) -> int:
        """Bytes to unpack (a multiple of 4 KiB): the ``size`` of KVM_PV_UNPACK."""
        return len(self.data)

    def pages(self) -> Iterator[tuple[int, int, int, bytes]]:
        """(gaddr, tweak0, tweak1, ciphertext) for each page, as the UNPACK loop issues them."""
        for offset in range(0, len(self.data), PAGE_SIZE):
            yield self.addr + offset, self.tweak, offset, self.data[offset : offset + PAGE_SIZE]


@dataclass(frozen=True, slots=True)
class Image:
    """A sealed boot image: the SE header and the encrypted components in unpack order."""

    header: bytes
    components: tuple[EncryptedComponent, ...]

    @staticmethod
    def parse(header: bytes, *, host_key: bytes | None = None) -> HeaderInfo:
        """Parse and authenticate ``header`` as the UV does for SET_SEC_CONF_PARAMS.

        ValueError (with attribute ``rc``, the UV rc) if the UV would refuse it.
        """
        info = _native.image_parse(check_bytes("header", header), _host_key(host_key))
        return HeaderInfo(
            version=int(info["version"]),
            length=int(info["length"]),
            pages=int(info["pages"]),
            components=[(int(a), int(s), int(t)) for a, s, t in info["components"]],
            pld=str(info["pld"]),
            ald=str(info["ald"]),
            tld=str(info["tld"]),
        )

    def pages(self) -> Iterator[tuple[int, int, int, bytes]]:
        """Every page of every component, in unpack order: (gaddr, tweak0, tweak1, ciphertext)."""
        for component in self.components:
            yield from component.pages()


def default_tweak(index: int) -> int:
    """The tweak ``build`` gives component ``index`` when none is given: nonzero, distinct."""
    return TWEAK_BASE + check_int("index", index, bits=16) + 1


def _padded(size: int) -> int:
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def _host_key(host_key: object) -> bytes:
    if host_key is None:
        return HOST_KEY_DEFAULT
    key = check_bytes("host_key", host_key)
    if len(key) != HOST_KEY_LEN:
        raise ValueError(f"host_key: must be {HOST_KEY_LEN} bytes, got {len(key)}")
    return key


def _image_key(image_key: object) -> bytes | None:
    if image_key is None:
        return None
    key = check_bytes("image_key", image_key)
    if len(key) != IMAGE_KEY_LEN:
        raise ValueError(f"image_key: must be {IMAGE_KEY_LEN} bytes, got {len(key)}")
    if key[:32] == key[32:]:
        raise ValueError("image_key: its two halves (XTS data and tweak keys) must differ")
    return key


def _component(index: int, item: object) -> tuple[int, bytes, int]:
    name = f"components[{index}]"
    tweak: object
    if isinstance(item, Component):
        addr, data, tweak = item.addr, item.data, item.tweak
    elif isinstance(item, tuple) and len(item) in (2, 3):
        addr, data = item[0], item[1]
        tweak = item[2] if len(item) == 3 else None
    else:
        raise TypeError(f"{name}: expected Component or (addr, data) tuple, got {type(item).__name__}")
    addr = check_int(f"{name}.addr", addr)
    if addr % PAGE_SIZE:
        raise ValueError(f"{name}.addr: {addr:#x} is not 4 KiB aligned")
    data = check_bytes(f"{name}.data", data)
    if not data:
        raise ValueError(f"{name}.data: empty")
    if addr + _padded(len(data)) > 1 << 64:
        raise ValueError(f"{name}: addr {addr:#x} + {len(data)} bytes goes past 2**64")
    tweak = default_tweak(index) if tweak is None else check_int(f"{name}.tweak", tweak)
    return addr, data, tweak


def build(
    components: Sequence[Component | tuple[int, bytes] | tuple[int, bytes, int]],
    *,
    host_key: bytes | None = None,
    image_key: bytes | None = None,
) -> Image:
    """Seal ``components`` (unpack order) for ``host_key`` (default: the emulated machine's).

    ``image_key`` is the 64-byte AES-256-XTS key, random when None. Raises TypeError or
    ValueError naming the argument: unaligned, negative or overlapping addresses, empty data,
    duplicate tweaks, too many components, keys of the wrong size.
    """
    if isinstance(components, (str, bytes, bytearray)) or not isinstance(components, Sequence):
        raise TypeError(f"components: expected a list of Component, got {type(components).__name__}")
    if not components:
        raise ValueError("components: empty")
    if len(components) > MAX_COMPONENTS:
        raise ValueError(f"components: {len(components)} given, at most {MAX_COMPONENTS} fit in a header")
    parts = [_component(i, item) for i, item in enumerate(components)]
    by_addr = sorted(range(len(parts)), key=lambda i: parts[i][0])
    for first, second in itertools.pairwise(by_addr):
        if parts[first][0] + _padded(len(parts[first][1])) > parts[second][0]:
            a, b = sorted((first, second))
            raise ValueError(f"components[{b}]: overlaps components[{a}] (after padding to 4 KiB)")
    seen: dict[int, int] = {}
    for i, (_, _, tweak) in enumerate(parts):
        if tweak in seen:
            raise ValueError(f"components[{i}].tweak: {tweak:#x} is also the tweak of components[{seen[tweak]}]")
        seen[tweak] = i
    sealed = _native.image_seal(
        [(addr, tweak, data) for addr, data, tweak in parts], _host_key(host_key), _image_key(image_key)
    )
    return Image(
        header=sealed.header,
        components=tuple(
            EncryptedComponent(addr=addr, tweak=tweak, data=enc)
            for (addr, _, tweak), enc in zip(parts, sealed.components, strict=True)
        ),
    )


def decrypt_page(header: bytes, tweak0: int, tweak1: int, page: bytes, *, host_key: bytes | None = None) -> bytes:
    """What UNPACK_IMG writes to a page: ``page`` (4096 bytes) decrypted with the header's key."""
    return _native.image_decrypt_page(
        check_bytes("header", header),
        check_int("tweak0", tweak0),
        check_int("tweak1", tweak1),
        check_bytes("page", page),
        _host_key(host_key),
    )


def verify(header: bytes, pages: Sequence[tuple[int, int, int, bytes]], *, host_key: bytes | None = None) -> int:
    """The rc VERIFY_IMG gives after UNPACK of ``pages`` = [(gaddr, tweak0, tweak1, plaintext)]
    in that order: RC_EXECUTED, or RC_VERIFY_PLD / _ALD / _TLD for the first digest that differs."""
    if not isinstance(pages, list):
        pages = list(pages)
    return _native.image_verify(check_bytes("header", header), pages, _host_key(host_key))


__all__ = [
    "HOST_KEY_DEFAULT",
    "MAX_COMPONENTS",
    "MAX_HEADER_LEN",
    "RC_EXECUTED",
    "RC_HDR_BAD_COMPONENT",
    "RC_HDR_BAD_LENGTH",
    "RC_HDR_BAD_MAGIC",
    "RC_HDR_BAD_VERSION",
    "RC_HDR_KEY_UNWRAP",
    "RC_HDR_RESERVED",
    "RC_HDR_TOO_SHORT",
    "RC_VERIFY_ALD",
    "RC_VERIFY_PLD",
    "RC_VERIFY_TLD",
    "Component",
    "EncryptedComponent",
    "HeaderInfo",
    "Image",
    "build",
    "decrypt_page",
    "default_tweak",
    "verify",
]
