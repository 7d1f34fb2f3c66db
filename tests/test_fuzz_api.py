"""API fuzzing: random and malformed arguments to every public call.

Contract (pvfast's API): misuse raises ``TypeError``/``ValueError`` naming the argument,
a failed ioctl raises ``PvError``, a UV failure outside the ioctl raises ``UvcError``; nothing may
crash the interpreter or panic across the Rust boundary. The documented exceptions beyond those:
``FileNotFoundError`` (unknown sysfs path), ``PermissionError`` (0444 module parameters).
``OverflowError`` is accepted only from the raw native module (``host.uv.native``), whose stub
(_native.pyi) documents it for ints that do not fit u64; the public API must turn such numbers
into ``ValueError`` first, which is checked here.

The raw UVC dispatcher ``host.uv.native.call(bytes)`` must never raise for a byte string (it answers
rc 0x0005/0x0002 for bad lengths/commands) and must raise ``TypeError`` for anything else.
"""

from __future__ import annotations

import contextlib
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import pvfast
import pvfast.image
from pvfast import PvCmd, PvError, Uvc, UvcError

GiB = 1 << 30
MiB = 1 << 20
PAGE = 4096

API_ERRORS = (PvError, UvcError, TypeError, ValueError)
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck))

# Values that are wrong in type or range for some argument.
weird = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.sampled_from(
        [-1, 0, 1, PAGE, MiB, GiB, 2 * GiB, 3 * GiB, (1 << 32) - 1, 1 << 32, (1 << 64) - 1, 1 << 64, 1 << 100]
    ),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=32),
    st.lists(st.integers(0, 3), max_size=3),
    st.just(object()),
    st.sampled_from(list(PvCmd)),
)
small_int = st.one_of(st.integers(-3, 20), st.sampled_from([255, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 64, -(1 << 63)]))
DATA_KEYS = [
    "header",
    "length",
    "addr",
    "size",
    "tweak",
    "id",
    "len_max",
    "subcmd",
    "buff_len",
    "gaddr",
    "bogus",
    "data",
]


def _image() -> pvfast.image.Image:
    return pvfast.image.build([(0x10000, b"k" * 5000), (0x20000, b"i" * 100)])


IMAGE = _image()


@st.composite
def headers(draw: st.DrawFn) -> bytes:
    """Random bytes, or a real SE header with a few bytes flipped, truncated or extended."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(st.binary(max_size=10000))
    hdr = bytearray(IMAGE.header)
    if kind == 1:
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(hdr) - 1))
            hdr[i] ^= draw(st.integers(1, 255))
        return bytes(hdr)
    if kind == 2:
        return bytes(hdr[: draw(st.integers(0, len(hdr)))])
    return bytes(hdr) + draw(st.binary(min_size=1, max_size=64))


class Env:
    """One host with a non-protected VM and a protected VM (recreated when a call closes them)."""

    def __init__(self) -> None:
        self.host = pvfast.Host()
        self.proc = self.host.spawn_process()
        self.vms: list[pvfast.Vm] = []
        self.refresh()

    def refresh(self) -> None:
        if not self.proc.alive:
            self.proc = self.host.spawn_process()
        self.vms = [vm for vm in self.vms if not vm.closed]
        while len(self.vms) < 2:
            vm = self.proc.create_vm(3 * GiB, vcpus=1)
            if len(self.vms) == 1:
                vm.pv_command(PvCmd.ENABLE)
            self.vms.append(vm)


_ENV: list[Env] = []


def env() -> Env:
    if not _ENV:
        _ENV.append(Env())
    e = _ENV[0]
    e.refresh()
    return e


def _names_argument(exc: BaseException, names: list[str]) -> bool:
    text = str(exc)
    return any(n in text for n in names)


# ---------------------------------------------------------------------------------------------- ioctl


@FUZZ
@given(
    which=st.integers(0, 1),
    cmd=st.one_of(small_int, weird),
    flags=st.one_of(st.just(0), small_int, weird),
    rc=st.one_of(st.just(0), small_int),
    rrc=st.one_of(st.just(0), small_int),
    data=st.dictionaries(st.sampled_from(DATA_KEYS), st.one_of(small_int, weird, headers()), max_size=4),
)
def test_pv_command_any_arguments(which: int, cmd: Any, flags: Any, rc: Any, rrc: Any, data: dict[str, Any]) -> None:
    e = env()
    vm = e.vms[which]
    try:
        res = vm.pv_command(cmd, flags=flags, rc=rc, rrc=rrc, **data)
    except PvError as err:
        assert err.errno in (1, 4, 5, 11, 12, 14, 22, 25, 6), err  # EPERM..ENOTTY family the kernel uses
        assert 0 <= err.rc <= 0xFFFF
        assert 0 <= err.rrc <= 0xFFFF
        str(err)
    except (TypeError, ValueError) as err:
        assert str(err), "an exception without a message"
    else:
        assert 0 <= res.rc <= 0xFFFF
        assert 0 <= res.rrc <= 0xFFFF
    if not vm.closed:
        st_ = vm.pv_state()
        assert st_.protected_count >= 0
        assert st_.need_cleanup >= 0


@FUZZ
@given(name=st.sampled_from(["flags", "rc", "rrc"]), value=weird)
def test_pv_command_bad_header_fields_name_the_argument(name: str, value: Any) -> None:
    assume(not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << 16)))
    vm = env().vms[0]
    try:
        vm.pv_command(PvCmd.INFO, id=0, len_max=80, **{name: value})
    except PvError:
        assert name == "flags"  # a non-zero u32 flags word is EINVAL, as in the kernel
    except (TypeError, ValueError) as err:
        assert _names_argument(err, [name]), err
    else:
        assert type(value) is int, (name, value)
        assert value == 0, (name, value)  # only a real 0 passes


@FUZZ
@given(
    key=st.sampled_from(["addr", "size", "tweak", "id", "len_max", "subcmd", "buff_len", "gaddr", "header"]),
    value=weird,
)
def test_pv_command_bad_data_names_the_argument(key: str, value: Any) -> None:
    cmd = {
        "addr": PvCmd.UNPACK,
        "size": PvCmd.UNPACK,
        "tweak": PvCmd.UNPACK,
        "id": PvCmd.INFO,
        "len_max": PvCmd.INFO,
        "subcmd": PvCmd.DUMP,
        "buff_len": PvCmd.DUMP,
        "gaddr": PvCmd.DUMP,
        "header": PvCmd.SET_SEC_PARMS,
    }[key]
    vm = env().vms[1]
    try:
        vm.pv_command(cmd, **{key: value})
    except PvError:
        pass
    except (TypeError, ValueError) as err:
        assert _names_argument(err, [key]), err


@FUZZ
@given(header=headers())
def test_set_sec_parms_random_headers(header: bytes) -> None:
    """Random and mutated SE headers: EINVAL/ENOMEM/EFAULT with the UV's rc, never a crash; the
    genuine header passes on a fresh configuration."""
    e = env()
    vm = e.proc.create_vm(3 * GiB, vcpus=1)
    try:
        vm.pv_command(PvCmd.ENABLE)
        try:
            res = vm.pv_command(PvCmd.SET_SEC_PARMS, header=header)
            assert header[: len(IMAGE.header)] == IMAGE.header or len(header) > 0
            assert res.rc == 1
        except PvError as err:
            assert err.errno in (22, 12, 14), err
            assert header != IMAGE.header
        with pytest.raises(PvError):
            vm.pv_command(PvCmd.VERIFY)  # nothing unpacked: VERIFY cannot succeed
    finally:
        vm.close()


# ---------------------------------------------------------------------------------------------- memory


@FUZZ
@given(
    which=st.integers(0, 1),
    op=st.sampled_from(["guest_access", "guest_read", "guest_write", "guest_share", "host_read", "host_write"]),
    gaddr=st.one_of(small_int, weird, st.integers(0, 3 * GiB)),
    size=st.one_of(small_int, weird, st.integers(-PAGE, 64 * PAGE)),
    data=st.one_of(st.binary(max_size=3 * PAGE), weird),
    write=weird,
)
def test_memory_calls_any_arguments(which: int, op: str, gaddr: Any, size: Any, data: Any, write: Any) -> None:
    # valid but huge ranges would touch gigabytes of real memory; they are not misuse anyway
    assume(not (type(size) is int and 256 * PAGE < size <= 3 * GiB))
    vm = env().vms[which]
    fn = getattr(vm, op)
    try:
        if op == "guest_access":
            fn(gaddr, size, write=write)
        elif op in ("guest_write", "host_write"):
            fn(gaddr, data)
        elif op == "guest_share":
            fn(gaddr, size)
        else:
            out = fn(gaddr, size)
            assert isinstance(out, bytes)
            assert len(out) == size
    except (PvError, UvcError):
        pass
    except (TypeError, ValueError) as err:
        assert _names_argument(err, ["gaddr", "size", "data", "write", "guest", "process", "closed"]), err


# ---------------------------------------------------------------------------------------------- host, processes, VMs


@FUZZ
@given(
    kwargs=st.dictionaries(
        st.sampled_from(
            [
                "async_destroy",
                "prot_virt",
                "destroy_fast",
                "feature_misc",
                "feature_aiv",
                "dump",
                "use_gisa",
                "walk_threads",
                "bogus",
            ]
        ),
        st.one_of(small_int, weird),
        max_size=3,
    )
)
def test_host_constructor_any_arguments(kwargs: dict[str, Any]) -> None:
    try:
        host = pvfast.Host(**kwargs)
    except (TypeError, ValueError) as err:
        assert str(err)
        return
    assert host.read_sysfs("/sys/module/kvm/parameters/async_destroy") in (f"{host.module_params['async_destroy']}\n",)
    assert host.check_extension(224) in (0, 1)


@FUZZ
@given(
    cap=st.one_of(small_int, weird),
    path=st.one_of(st.text(max_size=40), weird),
    name=st.one_of(st.text(max_size=10), weird),
)
def test_host_calls_any_arguments(cap: Any, path: Any, name: Any) -> None:
    host = env().host
    with contextlib.suppress(TypeError, ValueError):
        assert host.check_extension(cap) in (0, 1)
    with contextlib.suppress(TypeError, FileNotFoundError):
        host.read_sysfs(path)
    try:
        proc = host.spawn_process(name)
        proc.exit()
    except TypeError:
        assert not isinstance(name, str)
    with pytest.raises((TypeError, PermissionError)):
        host.module_params = {"async_destroy": 0}
    with pytest.raises(TypeError):
        host.module_params["async_destroy"] = 0  # type: ignore[index]


@FUZZ
@given(
    uvc=st.one_of(st.sampled_from(list(Uvc)), small_int, weird),
    rc=st.one_of(st.sampled_from([0x3, 0x104, 0x8003]), small_int, weird),
    rrc=st.one_of(st.just(0), small_int, weird),
    count=st.one_of(st.integers(1, 3), small_int, weird),
    handle=st.one_of(st.none(), small_int, weird),
)
def test_uv_view_any_arguments(uvc: Any, rc: Any, rrc: Any, count: Any, handle: Any) -> None:
    host = pvfast.Host()
    try:
        host.uv.inject_failure(uvc, rc, rrc=rrc, count=count)
    except (TypeError, ValueError) as err:
        assert _names_argument(err, ["uvc", "rc", "rrc", "count"]), err
    host.uv.clear_failures()
    try:
        n = host.uv.secure_pages(handle)
        assert n == 0
    except (TypeError, ValueError) as err:
        assert _names_argument(err, ["handle"]), err
    assert isinstance(host.uv.stats(), dict)
    assert host.uv.config_handles() == set()


@FUZZ
@given(
    memory_size=st.one_of(st.sampled_from([MiB, 2 * GiB, 3 * GiB, 1 << 40]), small_int, weird),
    vcpus=st.one_of(st.integers(0, 3), small_int, weird),
    memory_limit=st.one_of(st.none(), small_int, weird, st.just(1 << 50)),
    helper_name=st.one_of(st.none(), st.text(max_size=5), weird),
)
def test_process_calls_any_arguments(memory_size: Any, vcpus: Any, memory_limit: Any, helper_name: Any) -> None:
    host = env().host
    proc = host.spawn_process()
    try:
        try:
            vm = proc.create_vm(memory_size, vcpus, memory_limit=memory_limit)
        except (TypeError, ValueError) as err:
            assert _names_argument(err, ["memory_size", "vcpus", "memory_limit"]), err
        else:
            assert vm.memory_size == memory_size
            assert vm.vcpus == vcpus
            assert vm.asce_type in ("segment", "region3", "region2", "region1")
            vm.close()
            vm.close()  # closing twice is a no-op
            with pytest.raises(ValueError, match="VM is closed"):
                vm.pv_command(PvCmd.ENABLE)
            with pytest.raises(ValueError, match="VM is closed"):
                vm.guest_access(0)
        try:
            helper = proc.clone_vm(helper_name)
            helper.exit()
        except TypeError:
            assert helper_name is not None
            assert not isinstance(helper_name, str)
    finally:
        proc.kill()
        proc.kill()  # twice is harmless
    with pytest.raises(ValueError, match="has exited"):
        proc.create_vm(3 * GiB)


# ---------------------------------------------------------------------------------------------- boot images


@FUZZ
@given(
    components=st.one_of(
        weird,
        st.lists(
            st.one_of(
                st.tuples(st.one_of(st.integers(0, 1 << 20), weird), st.one_of(st.binary(max_size=9000), weird)),
                st.tuples(
                    st.integers(0, 16).map(lambda x: x * PAGE),
                    st.binary(min_size=1, max_size=100),
                    st.one_of(small_int, weird),
                ),
                weird,
            ),
            max_size=4,
        ),
    ),
    host_key=st.one_of(st.none(), st.binary(min_size=30, max_size=34), weird),
    image_key=st.one_of(st.none(), st.binary(min_size=62, max_size=66), weird),
)
def test_image_build_any_arguments(components: Any, host_key: Any, image_key: Any) -> None:
    try:
        img = pvfast.image.build(components, host_key=host_key, image_key=image_key)
    except (TypeError, ValueError) as err:
        assert str(err)
        return
    info = pvfast.image.Image.parse(img.header, host_key=host_key)
    assert len(info["components"]) == len(img.components)


@FUZZ
@given(header=headers(), host_key=st.one_of(st.none(), st.binary(min_size=32, max_size=32), weird))
def test_image_parse_random_headers(header: bytes, host_key: Any) -> None:
    try:
        info = pvfast.image.Image.parse(header, host_key=host_key)
    except ValueError as err:
        assert getattr(err, "rc", None) is not None or "host_key" in str(err), err
    except TypeError as err:
        assert "host_key" in str(err), err
    else:
        assert info["length"] == len(header) or info["length"] <= len(header)


@FUZZ
@given(
    header=headers(),
    tweak0=st.one_of(small_int, weird),
    tweak1=st.one_of(small_int, weird),
    page=st.one_of(st.binary(min_size=PAGE, max_size=PAGE), st.binary(max_size=64), weird),
    pages=st.one_of(
        weird,
        st.lists(
            st.one_of(st.tuples(small_int, small_int, small_int, st.binary(max_size=PAGE + 1)), weird), max_size=3
        ),
    ),
)
def test_image_decrypt_and_verify_any_arguments(header: Any, tweak0: Any, tweak1: Any, page: Any, pages: Any) -> None:
    try:
        out = pvfast.image.decrypt_page(header, tweak0, tweak1, page)
        assert isinstance(out, bytes)
        assert len(out) == PAGE
    except (TypeError, ValueError) as err:
        assert str(err)
    try:
        rc = pvfast.image.verify(header, pages)
        assert rc in (1, 0x102, 0x103, 0x104)
    except (TypeError, ValueError) as err:
        assert str(err)


# ---------------------------------------------------------------------------------------------- raw UVC dispatcher

KNOWN_CMDS = [int(u) for u in Uvc] + [0x0000, 0x0003, 0x0150, 0x1002, 0xFFFF]


@st.composite
def uvcbs(draw: st.DrawFn) -> bytes:
    """A UVC block: header (len, cmd, rc, rrc) plus a payload whose handles/addresses are sometimes
    real ones, so the dispatcher reaches the UVC bodies and not only the length check."""
    host = env().host
    cmd = draw(st.sampled_from(KNOWN_CMDS))
    length = draw(
        st.one_of(st.sampled_from([0x20, 0x28, 0x40, 0x48, 0x50, 0x60, 0x80, 0xD8, 0x100]), st.integers(0, 0x1000))
    )
    handles = sorted(host.uv.config_handles()) or [0]
    regions = [vm.region.base for vm in env().vms]
    words = draw(
        st.lists(
            st.one_of(
                st.integers(0, (1 << 64) - 1),
                st.sampled_from([*handles, 0, 1]),
                st.sampled_from(regions).flatmap(lambda b: st.integers(0, 64).map(lambda k: b + k * PAGE)),
                st.integers(0, 64).map(lambda k: k * PAGE),
            ),
            min_size=0,
            max_size=max(0, length // 8),
        )
    )
    body = struct.pack(">HHHH", length & 0xFFFF, cmd, 0, 0) + b"".join(struct.pack(">Q", w) for w in words)
    cut = draw(st.integers(0, len(body)))
    return body if draw(st.booleans()) else body[:cut]


@FUZZ
@given(block=st.one_of(st.binary(max_size=600), uvcbs()))
def test_raw_dispatcher_never_raises_for_bytes(block: bytes) -> None:
    uv = env().host.uv.native
    res = uv.call(block)
    cc, out = res.cc, res.block
    assert cc in (0, 1, 2, 3)
    assert isinstance(out, bytes)
    if len(block) >= 8:
        rc = struct.unpack(">H", out[4:6])[0]
        assert (cc == 0) == (rc == 1), (hex(rc), cc)


@FUZZ
@given(value=st.one_of(weird.filter(lambda v: not isinstance(v, bytes)), st.lists(st.integers(-300, 300), max_size=40)))
def test_raw_dispatcher_rejects_non_bytes(value: Any) -> None:
    """Not a byte string: TypeError. PyO3's ``Vec<u8>`` argument also takes any sequence of ints
    in 0..255 (as bytes) and answers OverflowError for an element out of that range (F1 in
    docs/VERIFICATION.md: allowed for the raw native module, whose stub documents OverflowError)."""
    uv = env().host.uv.native
    if isinstance(value, list) and all(isinstance(v, int) and 0 <= v <= 255 for v in value):
        assert uv.call(value).cc in (0, 1)  # type: ignore[arg-type]
        return
    with pytest.raises((TypeError, OverflowError)):
        uv.call(value)


def test_raw_dispatcher_accepts_buffers() -> None:
    uv = env().host.uv.native
    block = struct.pack(">HHHH", 0x20, int(Uvc.DESTR_SEC_STOR), 0, 0) + bytes(24)
    for buf in (block, bytearray(block)):
        res = uv.call(buf)  # type: ignore[arg-type]  # the stub says bytes; any buffer is taken
        assert res.cc in (0, 1)
        assert len(res.block) >= 8
