"""Hostile and malformed C-STORE data sets, reproducible from a seed, with the statuses a node may answer.

Each :class:`HostileCase` is the raw data set bytes (Explicit VR Little Endian, written element by
element so that nothing is "fixed" on the way), the Affected SOP Instance UID for the request, and
the DICOM statuses that keep the node's promises: 0xC000 where the data set must be refused,
0x0000 where it is valid, either where a mutation may or may not hit what the node reads. No
case may ever get 0xA700 (that would be the node failing, not the input).
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
ROOT = "1.2.826.0.1.3680043.8.498.77"  # test UIDs live under this root
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
OK, REFUSED = 0x0000, 0xC000

# Values a UID must never be taken for: traversal, separators, collisions of old sanitisers, length.
BAD_UIDS = [
    "..",
    ".",
    "../../../../tmp/escaped",
    "1.2.3/../../../escaped",
    "X_7",
    "X/7",
    "X 7",
    "X\x007",
    "1.2.3.",
    ".1.2.3",
    "1..2",
    "1.2.abc",
    "1" * 65,
    "1.2\\3.4",
    "/etc/passwd",
    "C:\\windows",
    "1.2.3\n4",
    "１.２.３",
]
BAD_INTEGERS = ["inf", "-inf", "nan", "1e999", "-1e999", "9" * 23, "-" + "9" * 23, "2147483648", "1e10"]
BAD_DECIMALS = ["inf", "nan", "1e999", "-1e999", "0.5\\inf", "abc"]


@dataclass(frozen=True)
class HostileCase:
    """One data set to send, the SOP Instance UID the request names, and the acceptable statuses."""

    family: str
    sop_uid: str
    dataset: bytes
    expect: frozenset[int]


def element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (padded to even length)."""
    if len(value) % 2:
        value += b"\x00" if vr in (b"UI", b"OB", b"UN") else b" "
    group, elem = tag >> 16, tag & 0xFFFF
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _ct(rng: random.Random, sop: str, study: str, series: str, index: int) -> dict[int, tuple[bytes, bytes]]:
    """A small valid CT slice as {tag: (VR, value)}."""
    pixels = bytes(rng.getrandbits(8) for _ in range(16 * 16 * 2))
    return {
        0x00080016: (b"UI", CT_IMAGE_STORAGE.encode()),
        0x00080018: (b"UI", sop.encode()),
        0x00080020: (b"DA", b"20240305"),
        0x00080060: (b"CS", b"CT"),
        0x0008103E: (b"LO", b"HOSTILE SUITE"),
        0x00100010: (b"PN", b"Test^Hostile"),
        0x00100020: (b"LO", b"HOSTILE-1"),
        0x00180050: (b"DS", b"1.25"),
        0x0020000D: (b"UI", study.encode()),
        0x0020000E: (b"UI", series.encode()),
        0x00200013: (b"IS", str(index + 1).encode()),
        0x00200032: (b"DS", f"-120\\-110.5\\{-60 + 1.25 * index:g}".encode()),
        0x00200037: (b"DS", b"1\\0\\0\\0\\1\\0"),
        0x00200052: (b"UI", f"{ROOT}.1".encode()),
        0x00280002: (b"US", struct.pack("<H", 1)),
        0x00280004: (b"CS", b"MONOCHROME2"),
        0x00280010: (b"US", struct.pack("<H", 16)),
        0x00280011: (b"US", struct.pack("<H", 16)),
        0x00280030: (b"DS", b"0.5\\0.5"),
        0x00280100: (b"US", struct.pack("<H", 16)),
        0x00280101: (b"US", struct.pack("<H", 16)),
        0x00280102: (b"US", struct.pack("<H", 15)),
        0x00280103: (b"US", struct.pack("<H", 0)),
        0x7FE00010: (b"OW", pixels),
    }


def encode(elements: dict[int, tuple[bytes, bytes]], extra: bytes = b"", extra_before: int = 0) -> bytes:
    """Serialise in tag order; ``extra`` raw bytes go just before the first tag >= ``extra_before``."""
    out = bytearray()
    placed = not extra
    for tag in sorted(elements):
        if not placed and tag >= extra_before:
            out += extra
            placed = True
        vr, value = elements[tag]
        out += element(tag, vr, value)
    if not placed:
        out += extra
    return bytes(out)


def nested_sequence(depth: int, undefined: bool, tag: int = 0x00081140) -> bytes:
    """A sequence ``depth`` levels deep (each item holds the next sequence), undefined or defined lengths."""
    grp, elm = tag >> 16, tag & 0xFFFF
    if undefined:
        sq = struct.pack("<HH2sHI", grp, elm, b"SQ", 0, 0xFFFFFFFF)
        item = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        ends = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
        return (sq + item) * depth + ends * depth
    inner = b""
    for _ in range(depth):
        item = struct.pack("<HHI", 0xFFFE, 0xE000, len(inner)) + inner
        inner = struct.pack("<HH2sHI", grp, elm, b"SQ", 0, len(item)) + item
    return inner


class _Uids:
    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._n = 0

    def __call__(self) -> str:
        self._n += 1
        return f"{ROOT}.{self._rng.randrange(10**6)}.{self._n}"


def hostile_cases(seed: int, count: int = 300) -> list[HostileCase]:
    """``count`` cases drawn from every family below, the same for the same seed."""
    rng = random.Random(seed)
    uid = _Uids(rng)
    study, series = uid(), uid()
    families = list(_FAMILIES)
    cases: list[HostileCase] = []
    # Every family at least once, then at random.
    for i in range(count):
        family = families[i] if i < len(families) else rng.choice(families)
        cases.extend(_FAMILIES[family](rng, uid, study, series, i))
    return cases[:count] if len(cases) > count else cases


def _valid(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    yield HostileCase("valid", sop, encode(_ct(rng, sop, study, series, i)), frozenset({OK}))


def _truncated(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    data = encode(_ct(rng, sop, study, series, i))
    cut = rng.randrange(1, len(data))
    yield HostileCase("truncated", sop, data[:cut], frozenset({OK, REFUSED}))


def _wrong_vr(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    els = _ct(rng, sop, study, series, i)
    tag = rng.choice([t for t in els if t < 0x7FE00010])
    vr = rng.choice([b"US", b"UL", b"SQ", b"OB", b"UN", b"ZZ", b"\x00\x01", b"ae", b"FD", b"AT"])
    els[tag] = (vr, els[tag][1])
    yield HostileCase("wrong VR", sop, encode(els), frozenset({OK, REFUSED}))


def _byte_flips(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    data = bytearray(encode(_ct(rng, sop, study, series, i)))
    header_end = data.find(b"\xe0\x7f\x10\x00")  # flips in the header, where they matter
    for _ in range(rng.randrange(1, 8)):
        data[rng.randrange(max(header_end, 1))] = rng.getrandbits(8)
    yield HostileCase("byte flips", sop, bytes(data), frozenset({OK, REFUSED}))


def _deep_nesting(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    depth = rng.choice([33, 100, 1000, 3000, rng.randrange(34, 5000)])
    data = encode(_ct(rng, sop, study, series, i), nested_sequence(depth, undefined=True), 0x00081140)
    yield HostileCase("deep nesting", sop, data, frozenset({REFUSED}))


def _huge_length(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    length = rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0x10000000, rng.randrange(1 << 20, 0xFFFFFFFE)])
    huge = struct.pack("<HH2sHI", 0x0008, 0x0110, b"UN", 0, length) + b"\x01" * 64
    data = encode(_ct(rng, sop, study, series, i), huge, 0x00080110)
    yield HostileCase("huge length", sop, data, frozenset({REFUSED}))


def _overflow_numbers(
    rng: random.Random, uid: _Uids, study: str, series: str, i: int
) -> Iterator[HostileCase]:
    sop = uid()
    els = _ct(rng, sop, study, series, i)
    tag, bad = rng.choice(
        [
            (0x00200013, rng.choice(BAD_INTEGERS)),  # Instance Number (IS)
            (0x00280008, rng.choice(BAD_INTEGERS)),  # Number of Frames (IS)
            (0x00180050, rng.choice(BAD_DECIMALS)),  # Slice Thickness (DS)
            (0x00280030, rng.choice(BAD_DECIMALS)),  # Pixel Spacing (DS)
            (0x00200032, "0\\0\\" + rng.choice(BAD_DECIMALS)),  # Image Position (DS)
        ]
    )
    els[tag] = (b"IS" if tag in (0x00200013, 0x00280008) else b"DS", bad.encode())
    yield HostileCase("overflow numbers", sop, encode(els), frozenset({REFUSED}))


def _missing_uid(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    sop = uid()
    els = _ct(rng, sop, study, series, i)
    del els[rng.choice([0x00080018, 0x0020000D, 0x0020000E])]
    yield HostileCase("missing UID", sop, encode(els), frozenset({REFUSED}))


def _invalid_uid(rng: random.Random, uid: _Uids, study: str, series: str, i: int) -> Iterator[HostileCase]:
    bad = rng.choice(BAD_UIDS)
    which = rng.choice(["sop", "study", "series", "study+series"])
    sop = bad if which == "sop" else uid()
    st = bad if "study" in which else study
    se = bad if "series" in which else series
    els = _ct(rng, sop, st, se, i)
    yield HostileCase(f"invalid UID ({which})", sop, encode(els), frozenset({REFUSED}))


def _request_mismatch(
    rng: random.Random, uid: _Uids, study: str, series: str, i: int
) -> Iterator[HostileCase]:
    sop = uid()
    data = encode(_ct(rng, sop, study, series, i))
    yield HostileCase("request UID mismatch", uid(), data, frozenset({REFUSED}))


def _same_uid_other_content(
    rng: random.Random, uid: _Uids, study: str, series: str, i: int
) -> Iterator[HostileCase]:
    sop = f"{ROOT}.999.{rng.randrange(3)}"  # a few UIDs shared by many different data sets
    data = encode(_ct(rng, sop, study, series, i))
    yield HostileCase("same UID, other content", sop, data, frozenset({OK}))


_FAMILIES = {
    "valid": _valid,
    "truncated": _truncated,
    "wrong VR": _wrong_vr,
    "byte flips": _byte_flips,
    "deep nesting": _deep_nesting,
    "huge length": _huge_length,
    "overflow numbers": _overflow_numbers,
    "missing UID": _missing_uid,
    "invalid UID": _invalid_uid,
    "request UID mismatch": _request_mismatch,
    "same UID, other content": _same_uid_other_content,
}
