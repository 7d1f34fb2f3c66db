#!/usr/bin/env python3
"""Write the seed corpora of the two fuzz targets (UVCB layouts of arch/s390/include/asm/uv.h at v6.2, big-endian).

uv_dispatch: one block per input, every UVC with its expected length (docs/UV.md), some with
plausible fields. uv_sequence: `[len(2)] block` sequences with the placeholders of
fuzz_targets/uv_sequence.rs (0xFFFFFFFFFFFFFFxx: xx < 0x80 = a created handle, else a region page).
Run from the repository root: python3 fuzz/make_seeds.py
"""

from __future__ import annotations

import os
import struct

LENS = {
    0x0001: 0x100,
    0x000F: 0x48,
    0x0100: 0x80,
    0x0101: 0x40,
    0x0102: 0x48,
    0x0120: 0x60,
    0x0121: 0x40,
    0x0200: 0x28,
    0x0201: 0x20,
    0x0202: 0x20,
    0x0300: 0x50,
    0x0301: 0x50,
    0x0302: 0x40,
    0x0310: 0x40,
    0x0311: 0x40,
    0x0320: 0x40,
    0x0321: 0x40,
    0x0330: 0x50,
    0x0340: 0x40,
    0x0341: 0x20,
    0x0342: 0x28,
    0x0400: 0x40,
    0x0401: 0x50,
    0x0402: 0x50,
    0x0403: 0x50,
    0x1000: 0x30,
    0x1001: 0x30,
}
H = lambda k: 0xFFFF_FFFF_FFFF_FF00 | k  # noqa: E731 - k-th created handle
P = lambda k: 0xFFFF_FFFF_FFFF_FF80 | k  # noqa: E731 - host address of region page k


def block(cmd: int, fields: dict[int, int] | None = None, length: int | None = None) -> bytes:
    n = LENS.get(cmd, 0x40) if length is None else length
    b = bytearray(max(n, 8))
    struct.pack_into(">HHHH", b, 0, n, cmd, 0, 0)
    for off, val in (fields or {}).items():
        if off + 8 <= len(b):
            struct.pack_into(">Q", b, off, val)
    return bytes(b)


def create_conf(guest_len: int, asce: int) -> bytes:
    """Donation origins and SCA above the lowcore; asce must carry the private-space bit 0x100."""
    return block(0x0100, {0x20: 0x10_0000, 0x28: 0x20_0000, 0x38: 0, 0x40: guest_len, 0x48: 0x4000, 0x50: asce})


GUEST = 0x8000  # length-word flag of uv_sequence: issued by the guest of the first config


def seq(*blocks: bytes | tuple[str, bytes]) -> bytes:
    out = b""
    for b in blocks:
        flag, data = (GUEST, b[1]) if isinstance(b, tuple) else (0, b)
        out += struct.pack(">H", flag | len(data)) + data
    return out


def guest(b: bytes) -> tuple[str, bytes]:
    return ("guest", b)


def write(dirname: str, name: str, data: bytes) -> None:
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, name), "wb") as fh:
        fh.write(data)


def main() -> None:
    d = "fuzz/corpus/uv_dispatch"
    for cmd in LENS:
        write(d, f"cmd_{cmd:04x}", block(cmd, {0x18: 0x1000_0001, 0x20: 0x1000}))
    write(d, "create_conf", create_conf(16 << 20, 0x5000_0007))
    write(d, "bad_len", block(0x0101, length=0x38))
    write(d, "short", b"\x00\x40\x01\x01")
    write(d, "unknown_cmd", block(0x7777, length=0x40))
    write(d, "truncated_qui", block(0x0001)[:0x40])
    write(d, "qui_short", block(0x0001, length=0xA8))
    write(d, "qui_linux_6_4", block(0x0001, length=0x120))
    write(d, "cpu_set_state", block(0x0330, {0x18: 0x1000_0001, 0x20: 5}))  # state 5 at 0x27

    s = "fuzz/corpus/uv_sequence"
    conf = create_conf(4 << 20, 0x6000_0107)
    cpu = block(0x0120, {0x20: H(0), 0x28: 0x2000})
    imp = [block(0x0200, {0x18: H(0), 0x20: k * 4096}) for k in range(4)]
    write(s, "lifecycle", seq(conf, cpu, *imp, block(0x0121, {0x18: H(1)}), block(0x0101, {0x18: H(0)})))
    write(
        s,
        "fast_orphans",
        seq(
            conf,
            cpu,
            *imp,
            block(0x0121, {0x18: H(1)}),
            block(0x0102, {0x18: H(0)}),
            block(0x0202, {0x18: P(0)}),
            block(0x0201, {0x18: P(1)}),
        ),
    )
    write(s, "destroy_refused_with_cpu", seq(conf, cpu, *imp, block(0x0202, {0x18: P(2)}), block(0x0101, {0x18: H(0)})))
    write(
        s,
        "shared_pin_export",
        seq(
            conf,
            cpu,
            imp[0],
            guest(block(0x1000, {0x20: 0})),
            block(0x0341, {0x18: P(0)}),
            block(0x0201, {0x18: P(0)}),
            imp[0],
        ),
    )
    write(
        s,
        "unshare_all",
        seq(conf, cpu, imp[0], imp[1], guest(block(0x1000, {0x20: 4096})), block(0x0340, {0x18: H(0)})),
    )
    write(
        s,
        "dump",
        seq(conf, cpu, block(0x0400, {0x18: H(0)}), block(0x0401, {0x18: H(0), 0x28: 0}), block(0x0403, {0x18: H(0)})),
    )
    write(
        s,
        "two_configs",
        seq(
            conf,
            create_conf(4 << 20, 0x7000_0107),
            block(0x0200, {0x18: H(1), 0x20: 0}),
            block(0x0200, {0x18: H(0), 0x20: 0}),
            block(0x0101, {0x18: H(1)}),
        ),
    )


if __name__ == "__main__":
    main()
