"""DICOM Part 10 file preamble and File Meta Information, encoded directly (no dataset round trip).

The received dataset bytes follow this prefix unchanged, so the stored file is exactly what
the SCU sent, wrapped as a Part 10 file.
"""

from __future__ import annotations

import os
import struct

from dicomnode import __version__

# 2.25 root + a fixed UUID-derived integer: stable identity of this implementation.
IMPLEMENTATION_CLASS_UID = "2.25.103833852120880317319698369148378998019"
IMPLEMENTATION_VERSION_NAME = f"DICOMNODE_{__version__}"[:16]


def _pad(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002."""
    if vr in (b"OB", b"UN", b"UT", b"SQ", b"OW", b"UC", b"UR"):
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid(value: str) -> bytes:
    return _pad(value.strip().encode("ascii"), b"\x00")


def _text(value: str) -> bytes:
    return _pad(value.encode("ascii", "replace"), b" ")


def encode_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_aet: str = ""
) -> bytes:
    """128-byte preamble + b"DICM" + group 0002 for the given UIDs (group length included)."""
    body = b"".join(
        [
            _element(0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, b"UI", _uid(sop_class_uid)),
            _element(0x0003, b"UI", _uid(sop_instance_uid)),
            _element(0x0010, b"UI", _uid(transfer_syntax_uid)),
            _element(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _element(0x0013, b"SH", _text(IMPLEMENTATION_VERSION_NAME)),
        ]
        + ([_element(0x0016, b"AE", _text(source_aet.strip()))] if source_aet.strip() else [])
    )
    group_length = _element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + group_length + body


def stored_dataset_is(path: str | os.PathLike[str], raw: bytes) -> bool:
    """True when the spool file at ``path`` holds exactly ``raw`` after its File Meta Information.

    The file is one this module's prefix started (group length first), so the data set begins at
    144 + group length. Sizes are compared before any content is read.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(144)
            if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
                return False
            start = 144 + struct.unpack_from("<I", head, 140)[0]
            if os.fstat(f.fileno()).st_size - start != len(raw):
                return False
            f.seek(start)
            view = memoryview(raw)
            pos = 0
            while pos < len(raw):
                chunk = f.read(min(1 << 20, len(raw) - pos))
                if not chunk or chunk != view[pos : pos + len(chunk)]:
                    return False
                pos += len(chunk)
            return True
    except OSError:
        return False
