"""Boot images: seal/parse round trip, header rcs, page decryption and the VERIFY digests."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvfast import image
from pvfast.image import Component, EncryptedComponent, Image

PAGE = image.PAGE_SIZE
IMAGE_KEY = bytes(range(64))


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % PAGE)


def plaintext_pages(img: Image) -> list[tuple[int, int, int, bytes]]:
    """What the UV feeds its verifier after UNPACK of every page."""
    return [(g, t0, t1, image.decrypt_page(img.header, t0, t1, ct)) for g, t0, t1, ct in img.pages()]


@pytest.fixture(scope="module")
def sample() -> tuple[list[Component], Image]:
    comps = [
        Component(0x10000, bytes(range(256)) * 40),  # 10240 bytes: 3 pages after padding
        Component(0x0, b"root=/dev/vda console=ttysclp0"),
        Component(0x8000, b"\xa5" * (2 * PAGE), tweak=0x1234),
    ]
    return comps, image.build(comps, image_key=IMAGE_KEY)


def test_round_trip(sample: tuple[list[Component], Image]) -> None:
    comps, img = sample
    info = Image.parse(img.header)
    assert info["version"] == 0x100
    assert info["length"] == len(img.header) == 0xF0 + 24 * 3 + 80
    assert info["pages"] == 6
    assert info["components"] == [
        (0x10000, 3 * PAGE, image.default_tweak(0)),
        (0x0, PAGE, image.default_tweak(1)),
        (0x8000, 2 * PAGE, 0x1234),
    ]
    assert all(len(info[d]) == 128 for d in ("pld", "ald", "tld"))  # type: ignore[literal-required]
    assert [(c.addr, c.tweak, c.size) for c in img.components] == [(a, t, s) for a, s, t in info["components"]]
    for comp, enc in zip(comps, img.components, strict=True):
        assert isinstance(enc, EncryptedComponent)
        assert len(enc.data) == len(padded(comp.data))
        assert enc.data[: len(comp.data)] != comp.data
    assert img.header.startswith(b"IBMSecEx")


def test_default_tweaks_are_nonzero_distinct_and_deterministic() -> None:
    tweaks = [image.default_tweak(i) for i in range(image.MAX_COMPONENTS)]
    assert 0 not in tweaks
    assert len(set(tweaks)) == len(tweaks)
    a = image.build([(0, b"x"), (0x1000, b"y")])
    b = image.build([(0, b"x"), (0x1000, b"y")])
    assert [c.tweak for c in a.components] == [c.tweak for c in b.components] == tweaks[:2]
    # Random image keys: same plaintext, different ciphertext.
    assert a.components[0].data != b.components[0].data


def test_decrypt_page_returns_the_plaintext(sample: tuple[list[Component], Image]) -> None:
    comps, img = sample
    for comp, enc in zip(comps, img.components, strict=True):
        want = padded(comp.data)
        for gaddr, t0, t1, ct in enc.pages():
            assert gaddr == enc.addr + t1
            assert t0 == enc.tweak
            assert image.decrypt_page(img.header, t0, t1, ct) == want[t1 : t1 + PAGE]
            assert image.decrypt_page(img.header, t0 + 1, t1, ct) != want[t1 : t1 + PAGE]


def test_verify_accepts_the_full_image(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    assert image.verify(img.header, plaintext_pages(img)) == image.RC_EXECUTED


def test_verify_rejects_a_missing_component(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    pages = [p for p in plaintext_pages(img) if p[1] != img.components[1].tweak]
    assert len(pages) == 5
    assert image.verify(img.header, pages) == image.RC_VERIFY_PLD
    assert image.verify(img.header, []) == image.RC_VERIFY_PLD


def test_verify_rejects_a_tampered_page(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    pages = list(img.pages())
    g, t0, t1, ct = pages[2]
    pages[2] = (g, t0, t1, ct[:100] + bytes([ct[100] ^ 1]) + ct[101:])
    unpacked = [(g, t0, t1, image.decrypt_page(img.header, t0, t1, ct)) for g, t0, t1, ct in pages]
    assert image.verify(img.header, unpacked) == image.RC_VERIFY_PLD


def test_verify_address_and_tweak_digests(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    pages = plaintext_pages(img)
    g, t0, t1, p = pages[4]
    moved = [*pages[:4], (g + 0x100000, t0, t1, p), *pages[5:]]
    assert image.verify(img.header, moved) == image.RC_VERIFY_ALD
    retweaked = [*pages[:4], (g, t0 ^ 1, t1, p), *pages[5:]]
    assert image.verify(img.header, retweaked) == image.RC_VERIFY_TLD


def test_wrong_host_key_is_rc_0x108(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    with pytest.raises(ValueError, match=r"rc 0x0108") as exc:
        Image.parse(img.header, host_key=b"\x01" * 32)
    assert exc.value.rc == image.RC_HDR_KEY_UNWRAP == 0x108  # type: ignore[attr-defined]
    other = image.build([(0, b"guest")], host_key=b"\x02" * 32)
    assert Image.parse(other.header, host_key=b"\x02" * 32)["pages"] == 1
    with pytest.raises(ValueError, match="invalid SE header") as exc:
        Image.parse(other.header)
    assert exc.value.rc == 0x108  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("offset", "rc"),
    [
        (0x03, image.RC_HDR_BAD_MAGIC),
        (0x0B, image.RC_HDR_BAD_VERSION),
        (0x0F, image.RC_HDR_BAD_LENGTH),
        (0x13, image.RC_HDR_BAD_LENGTH),  # component count disagrees with the length
        (0x17, image.RC_HDR_RESERVED),
        (0x1F, image.RC_HDR_BAD_COMPONENT),  # page count
        (0xF0 + 24 + 7, image.RC_HDR_BAD_COMPONENT),  # component 1 address unaligned
        (0x40, image.RC_HDR_KEY_UNWRAP),  # PLD: well formed, only the AEAD notices
        (0x80, image.RC_HDR_KEY_UNWRAP),  # ALD
        (0xC0, image.RC_HDR_KEY_UNWRAP),  # TLD
        (0xF0 + 2 * 24 + 23, image.RC_HDR_KEY_UNWRAP),  # component 2 tweak
        (-1, image.RC_HDR_KEY_UNWRAP),  # GCM tag
    ],
)
def test_tampered_header_rc(sample: tuple[list[Component], Image], offset: int, rc: int) -> None:
    _, img = sample
    hdr = bytearray(img.header)
    hdr[offset] ^= 0x01
    with pytest.raises(ValueError, match=f"rc {rc:#06x}") as exc:
        Image.parse(bytes(hdr))
    assert exc.value.rc == rc  # type: ignore[attr-defined]


def test_truncated_or_oversized_header(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    for cut, rc in [
        (0, image.RC_HDR_TOO_SHORT),
        (343, image.RC_HDR_TOO_SHORT),
        (len(img.header) - 1, image.RC_HDR_BAD_LENGTH),
    ]:
        with pytest.raises(ValueError, match="invalid SE header") as exc:
            Image.parse(img.header[:cut])
        assert exc.value.rc == rc  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="invalid SE header") as exc:
        Image.parse(img.header + bytes(image.MAX_HEADER_LEN))
    assert exc.value.rc == image.RC_HDR_BAD_LENGTH  # type: ignore[attr-defined]


@given(st.binary(max_size=image.MAX_HEADER_LEN + 16))
def test_random_headers_never_crash(blob: bytes) -> None:
    with pytest.raises(ValueError, match="invalid SE header") as exc:
        Image.parse(blob)
    assert 0x0101 <= exc.value.rc <= 0x010F  # type: ignore[attr-defined]


@given(
    st.lists(st.binary(min_size=1, max_size=3 * PAGE), min_size=1, max_size=5),
    st.lists(st.integers(min_value=0, max_value=3), min_size=5, max_size=5),
)
def test_any_layout_round_trips(datas: list[bytes], gaps: list[int]) -> None:
    comps, addr = [], 0
    for data, gap in zip(datas, gaps, strict=False):  # gaps: always 5, datas: 1 to 5
        addr += gap * PAGE
        comps.append(Component(addr, data))
        addr += len(padded(data))
    img = image.build(comps[::-1])  # unpack order need not be address order
    assert image.verify(img.header, plaintext_pages(img)) == image.RC_EXECUTED
    got = b"".join(p for *_, p in plaintext_pages(img))
    assert got == b"".join(padded(c.data) for c in comps[::-1])


def test_max_components() -> None:
    comps = [(i * PAGE, b"\x00") for i in range(image.MAX_COMPONENTS)]
    img = image.build(comps)
    assert len(img.header) == image.MAX_HEADER_LEN == 8192
    assert Image.parse(img.header)["pages"] == image.MAX_COMPONENTS
    with pytest.raises(ValueError, match="components: 329 given, at most 328"):
        image.build([*comps, (image.MAX_COMPONENTS * PAGE, b"\x00")])


@pytest.mark.parametrize(
    ("components", "kwargs", "exc", "match"),
    [
        ([], {}, ValueError, r"^components: empty"),
        (b"abc", {}, TypeError, r"^components: expected a list"),
        ([42], {}, TypeError, r"^components\[0\]: expected Component"),
        ([(0, b"a"), (0x1001, b"b")], {}, ValueError, r"^components\[1\]\.addr: 0x1001 is not 4 KiB aligned"),
        ([(-4096, b"a")], {}, ValueError, r"^components\[0\]\.addr: -4096 is out of range"),
        ([(1 << 64, b"a")], {}, ValueError, r"^components\[0\]\.addr: .* out of range"),
        ([("0", b"a")], {}, TypeError, r"^components\[0\]\.addr: expected int"),
        ([(0, b"")], {}, ValueError, r"^components\[0\]\.data: empty"),
        ([(0, "text")], {}, TypeError, r"^components\[0\]\.data: expected bytes"),
        ([(0x1000, b"a"), (0, b"a" * 4097)], {}, ValueError, r"^components\[1\]: overlaps components\[0\]"),
        ([(0, b"a", 7), (0x1000, b"b", 7)], {}, ValueError, r"^components\[1\]\.tweak: 0x7 is also"),
        ([(0, b"a", -1)], {}, ValueError, r"^components\[0\]\.tweak"),
        ([((1 << 64) - PAGE, b"a" * 4097)], {}, ValueError, r"^components\[0\]: .*past 2\*\*64"),
        ([(0, b"a")], {"host_key": b"short"}, ValueError, r"^host_key: must be 32 bytes, got 5"),
        ([(0, b"a")], {"host_key": "x" * 32}, TypeError, r"^host_key: expected bytes"),
        ([(0, b"a")], {"image_key": bytes(63)}, ValueError, r"^image_key: must be 64 bytes"),
        ([(0, b"a")], {"image_key": bytes(64)}, ValueError, r"^image_key: its two halves"),
    ],
)
def test_build_misuse(components: object, kwargs: dict[str, object], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        image.build(components, **kwargs)  # type: ignore[arg-type]


def test_native_checks_too() -> None:
    """The glue validates on its own (it must never panic on what Python hands it)."""
    from pvfast import _native

    with pytest.raises(ValueError, match=r"components\[1\]: overlaps component 0"):
        _native.image_seal([(0x1000, 1, b"a"), (0x1000, 2, b"b")])
    with pytest.raises(ValueError, match=r"components\[0\]\.addr: -1 is out of range"):
        _native.image_seal([(-1, 1, b"a")])
    with pytest.raises(TypeError, match=r"components\[0\]: expected a tuple"):
        _native.image_seal([[0, 1, b"a"]])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"components\[0\]: expected a tuple .* got 2 items"):
        _native.image_seal([(0, b"a")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^page: must be 4096 bytes"):
        _native.image_decrypt_page(_native.image_seal([(0, 1, b"a")]).header, 1, 0, b"short")
    with pytest.raises(TypeError, match=r"pages\[0\]\.plaintext: expected bytes"):
        _native.image_verify(_native.image_seal([(0, 1, b"a")]).header, [(0, 1, 0, None)])  # type: ignore[list-item]
    assert _native.HOST_KEY_DEFAULT == image.HOST_KEY_DEFAULT == b"pvfast-emulated-ultravisor-key-1"


def test_image_is_frozen(sample: tuple[list[Component], Image]) -> None:
    _, img = sample
    with pytest.raises(AttributeError):
        img.header = b""  # type: ignore[misc]


def test_boot_through_kvm() -> None:
    """The whole path: the VMM loads the image, SET_SEC_PARMS, UNPACK, VERIFY; the guest sees plaintext."""
    import pvfast
    from pvfast import vmm

    kernel, parm = bytes(range(256)) * 30, b"root=/dev/vda"
    img = image.build([Component(0x10000, kernel), Component(0x0, parm)])
    vm = pvfast.Host().create_vm(64 << 20)
    vmm.protect(vm, img)
    assert vm.pv_state().protected
    assert vm.guest_read(0x10000, len(kernel)) == kernel
    assert vm.guest_read(0, PAGE) == padded(parm)
    vm.process.exit()


@pytest.mark.parametrize(
    ("host_key", "unpacked", "cmd", "rc"),
    [
        (b"\x01" * 32, 2, "SET_SEC_PARMS", image.RC_HDR_KEY_UNWRAP),
        (None, 1, "VERIFY", image.RC_VERIFY_PLD),  # the second component never unpacked
    ],
)
def test_kvm_reports_image_rcs(host_key: bytes | None, unpacked: int, cmd: str, rc: int) -> None:
    import errno

    import pvfast
    from pvfast.errors import PvError

    img = image.build([(0x10000, b"kernel"), (0x0, b"parm")], host_key=host_key)
    vm = pvfast.Host().create_vm(64 << 20)
    for comp in img.components:
        vm.host_write(comp.addr, comp.data)
    vm.pv_command(pvfast.PvCmd.ENABLE)

    def boot() -> None:  # QEMU's sequence after ENABLE; the step under test fails
        vm.pv_command(pvfast.PvCmd.SET_SEC_PARMS, header=img.header)
        for comp in img.components[:unpacked]:
            vm.pv_command(pvfast.PvCmd.UNPACK, addr=comp.addr, size=comp.size, tweak=comp.tweak)
        vm.pv_command(pvfast.PvCmd.VERIFY)

    with pytest.raises(PvError) as exc:
        boot()
    assert exc.value.cmd == pvfast.PvCmd[cmd]
    assert (exc.value.errno, exc.value.rc) == (errno.EINVAL, rc)
    vm.process.exit()
