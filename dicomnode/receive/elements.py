"""A minimal little-endian DICOM element scanner: the raw bytes of a few top-level tags, fast.

Walks the dataset up to a stop tag, stepping over sequences (defined or undefined length)
without decoding them. Anything it does not expect raises ValueError, and the caller falls back
to pydicom; sequences nested deeper than ``MAX_DEPTH`` raise NestingTooDeep, which the caller
refuses outright. About 20x cheaper than pydicom's reader for a CT header.
"""

from __future__ import annotations

import struct

_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
MAX_DEPTH = 32  # nested sequences; real objects (SR trees included) stay far below
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class NestingTooDeep(ValueError):
    """Sequences nested deeper than MAX_DEPTH: refused rather than walked."""


def _header(data: bytes, pos: int, implicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, vr, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise ValueError("truncated element header")
    group, elem = _TAG.unpack_from(data, pos)
    tag = group << 16 | elem
    if implicit or group == 0xFFFE:
        return tag, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = data[pos + 4 : pos + 6]
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise ValueError("truncated element header")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
        raise ValueError(f"invalid VR at offset {pos}")
    return tag, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8


def _skip_items(data: bytes, pos: int, implicit: bool, depth: int = 1) -> int:
    """Skip the items of an undefined-length sequence starting at ``pos``; returns the end offset."""
    if depth > MAX_DEPTH:
        raise NestingTooDeep(f"sequences nested deeper than {MAX_DEPTH} levels")
    while True:
        tag, _vr, length, pos = _header(data, pos, implicit)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise ValueError(f"expected an item at offset {pos - 8}")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _skip_dataset(data, pos, implicit, depth)


def _skip_dataset(data: bytes, pos: int, implicit: bool, depth: int) -> int:
    """Skip the elements of an undefined-length item up to its Item Delimitation Item."""
    while True:
        tag, _vr, length, pos = _header(data, pos, implicit)
        if tag == _ITEM_END:
            return pos
        pos = _skip_items(data, pos, implicit, depth + 1) if length == _UNDEFINED else pos + length
        if pos > len(data):
            raise ValueError("element runs past the end of the dataset")


def scan_elements(data: bytes, implicit: bool, wanted: frozenset[int], stop_after: int) -> dict[int, bytes]:
    """Raw value bytes of the ``wanted`` top-level tags found before any tag > ``stop_after``."""
    found: dict[int, bytes] = {}
    pos, end = 0, len(data)
    last = -1
    while pos < end:
        tag, _vr, length, value_at = _header(data, pos, implicit)
        if tag > stop_after:
            break
        if tag <= last:
            raise ValueError("tags out of order")
        last = tag
        if length == _UNDEFINED:
            pos = _skip_items(data, value_at, implicit)
            continue
        pos = value_at + length
        if pos > end:
            raise ValueError("element runs past the end of the dataset")
        if tag in wanted:
            found[tag] = data[value_at:pos]
    return found
