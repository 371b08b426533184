"""The output's character set: the reference's Specific Character Set, carried unchanged.

Patient and study text is copied byte for byte (see :mod:`dicomnode.output.modules`), so every
character set pydicom can read, including the ISO 2022 code extensions (Japanese, Korean,
Chinese) and the stand-alone multi-byte sets (UTF-8, GB18030, GBK), reaches the PACS as it came.
Text the node writes itself (descriptions, comments) is kept to characters that this character set
can carry; anything else is folded to ASCII or dropped, so nothing is written in a repertoire the
header does not declare.
"""

from __future__ import annotations

import re
import unicodedata
import warnings

from pydicom.charset import convert_encodings, decode_bytes, default_encoding, encode_string
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset

SPECIFIC_CHARACTER_SET = 0x00080005
_ESCAPE_SEQUENCE = re.compile(rb"\x1b[\x20-\x2f]*[\x30-\x7e]")


def charset_element(source: Dataset) -> DataElement | RawDataElement | None:
    """The source's Specific Character Set element as it was read (None: default repertoire)."""
    return source.get_item(SPECIFIC_CHARACTER_SET)


def charset_value(source: Dataset) -> list[str]:
    """The Specific Character Set values of ``source`` ([] for the default repertoire)."""
    value = source.get("SpecificCharacterSet")
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def python_encodings(charset: list[str]) -> list[str]:
    """pydicom's Python codecs for a Specific Character Set (ASCII-compatible default when empty)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a misspelt term is fixed up by pydicom with a warning
        return convert_encodings(charset or None)


def _encode(text: str, encodings: list[str]) -> bytes | None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return encode_string(text, encodings)
        except (UserWarning, UnicodeError, LookupError, ValueError):
            return None


def _char_writable(c: str, encodings: list[str]) -> bool:
    """One character: ASCII, or encodable by the declared sets (not by pydicom's latin-1 fallback)."""
    if c.isascii():
        return True
    encoded = _encode(c, encodings)
    if encoded is None:
        return False
    # pydicom's default codec is latin-1; DICOM's default repertoire is ASCII only.
    return encoded.startswith(b"\x1b") or encodings[0] != default_encoding


def _roundtrips(text: str, encodings: list[str]) -> bool:
    encoded = _encode(text, encodings)
    if encoded is None:
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return decode_bytes(encoded, encodings, set()) == text
        except (UserWarning, UnicodeError, LookupError, ValueError):
            return False


def _fold(c: str) -> str:
    """ASCII letters of a character's compatibility decomposition (Ü -> U), or nothing."""
    return "".join(x for x in unicodedata.normalize("NFKD", c) if x.isascii() and x.isprintable())


def writable_text(text: str, charset: list[str]) -> str:
    """``text`` reduced to what a dataset with this Specific Character Set can carry.

    Characters outside the declared repertoires are folded to ASCII (Ü -> U) or dropped; when
    pydicom cannot write the result faithfully (it mis-encodes ISO 2022 IR 58), ASCII is kept.
    """
    text = "".join(c for c in text if c.isprintable() and c != "\\")
    encodings = python_encodings(charset)
    if text.isascii():
        return text
    kept = " ".join("".join(c if _char_writable(c, encodings) else _fold(c) for c in text).split())
    if _roundtrips(kept, encodings):
        return kept
    return " ".join("".join(c if c.isascii() else _fold(c) for c in kept).split())


def encoded_length(text: str, charset: list[str]) -> int:
    """Bytes ``text`` takes in this character set (escape sequences included): what dicom3tools and
    PACS databases hold against a VR's maximum length."""
    encoded = _encode(text, python_encodings(charset))
    return len(encoded) if encoded is not None else len(text.encode("utf-8"))


def fit(text: str, max_bytes: int, charset: list[str]) -> str:
    """``text`` cut so its encoding takes at most ``max_bytes``."""
    while text and encoded_length(text, charset) > max_bytes:
        text = text[: max(len(text) - max(1, (encoded_length(text, charset) - max_bytes) // 4), 0)]
    return text


def source_text(ds: Dataset, keyword: str) -> str:
    """A text attribute of a source header as a string.

    pydicom 3.0 leaves the escape sequence's letters in text decoded from ISO 2022 IR 58
    (``$)A``); such text is decoded here: escape sequences removed, GB 2312 in G1, ASCII in G0.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        if "ISO 2022 IR 58" in charset_value(ds):
            return _ESCAPE_SEQUENCE.sub(b"", elem.value).decode("gb2312", "replace").strip(" \x00")
    value = ds.get(keyword)
    return "" if value is None else str(value)
