"""Patient names and text in every Specific Character Set pydicom can decode, encoded as scanners send them.

Each case is a name, a description and a series name written in its character set: the single-byte
sets (ISO_IR 100 ... 166 and ISO_IR 13), the ISO 2022 code extensions (Japanese IR 87 and IR 159,
Korean IR 149, Chinese IR 58) and the stand-alone multi-byte sets (UTF-8, GB18030, GBK). The
names of the Japanese, Korean and Chinese cases are the examples of PS3.5 Annexes H, I, J and K.
``encode`` gives the bytes a conformant sender writes; for ISO 2022 IR 58, which pydicom 3.0
encodes without its escape sequence, and for ISO_IR 13 text mixing katakana and Roman letters,
which pydicom refuses, the bytes are built here (as PS3.5 K.2 shows them for IR 58).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.charset import convert_encodings, encode_string
from pydicom.valuerep import PersonName

_IR58_ESCAPE = b"\x1b$)A"


@dataclass(frozen=True)
class CharsetCase:
    """One character set with text in it."""

    id: str
    charset: tuple[str, ...]  # Specific Character Set values; "" = default repertoire first
    patient_name: str
    description: str  # e.g. a Study Description or a comment
    series_label: str  # the reference series' Series Description

    @property
    def value(self) -> str | list[str] | None:
        """The Specific Character Set attribute's value (None: absent)."""
        if not self.charset:
            return None
        return self.charset[0] if len(self.charset) == 1 else list(self.charset)

    def encode(self, text: str, person_name: bool = False) -> bytes:
        """``text`` as a sender using this character set writes it (PN: component groups escaped)."""
        if "ISO 2022 IR 58" in self.charset:
            return _encode_ir58(text, person_name)
        if self.charset == ("ISO_IR 13",):  # JIS X 0201: Roman in G0, katakana in G1, no escapes
            return text.encode("shift_jis")
        encodings = convert_encodings(list(self.charset) or None)
        if person_name:
            return bytes(PersonName(text).encode(encodings))
        return encode_string(text, encodings)


def _encode_ir58(text: str, person_name: bool) -> bytes:
    """GB 2312 in G1 behind ESC $ ) A, re-designated after each delimiter (PS3.5 6.1.2.5.3)."""
    out = bytearray()
    delimiters = "^=" if person_name else ""
    run = ""
    for c in text + "\0":
        if c in delimiters or c == "\0" or (run and run[-1].isascii() != c.isascii()):
            if run:
                out += run.encode("ascii") if run.isascii() else _IR58_ESCAPE + run.encode("gb2312")
            run = ""
            if c != "\0" and c in delimiters:
                out += c.encode("ascii")
                continue
        if c != "\0":
            run += c
    return bytes(out)


CASES: tuple[CharsetCase, ...] = (
    CharsetCase("default-ascii", (), "Smith^John", "HEAD MRI", "T1 AX"),
    CharsetCase("latin1-german", ("ISO_IR 100",), "Müller^Jürgen", "Schädel MRT", "T1 3D Kopf"),
    CharsetCase("latin2-czech", ("ISO_IR 101",), "Dvořák^Antonín", "Hlava MR", "T1 řez"),
    CharsetCase("latin3-maltese", ("ISO_IR 109",), "Żammit^Ġużeppi", "Ras MR", "T1 ħafif"),
    CharsetCase("latin4-latvian", ("ISO_IR 110",), "Bērziņš^Jānis", "Galva MR", "T1 šķērsgriezums"),
    CharsetCase("cyrillic-russian", ("ISO_IR 144",), "Иванов^Иван", "Голова МРТ", "T1 аксиальная"),
    CharsetCase("arabic", ("ISO_IR 127",), "قباني^لنزار", "رأس", "T1 محوري"),
    CharsetCase("greek", ("ISO_IR 126",), "Παπαδόπουλος^Διονύσιος", "Κεφάλι MR", "T1 αξονική"),
    CharsetCase("hebrew", ("ISO_IR 138",), "שרון^דבורה", "ראש MR", "T1 צירי"),
    CharsetCase("latin5-turkish", ("ISO_IR 148",), "Öztürk^Şükrü", "Baş MR", "T1 eksenel"),
    CharsetCase("thai", ("ISO_IR 166",), "สมชาย^ใจดี", "ศีรษะ MR", "T1 แนวแกน"),
    CharsetCase("japanese-katakana", ("ISO_IR 13",), "ﾔﾏﾀﾞ^ﾀﾛｳ", "ｱﾀﾏ MR", "T1 ｼﾞｸ"),
    CharsetCase(
        "japanese-ir87",
        ("", "ISO 2022 IR 87"),
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "頭部 MRI",
        "T1強調 3D",
    ),
    CharsetCase(
        "japanese-ir6-ir87",
        ("ISO 2022 IR 6", "ISO 2022 IR 87"),
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "頭部 MRI",
        "T1強調 3D",
    ),
    CharsetCase(
        "japanese-ir13-ir87",
        ("ISO 2022 IR 13", "ISO 2022 IR 87"),
        "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
        "頭部 MRI",
        "T1強調 3D",
    ),
    CharsetCase("japanese-ir159", ("", "ISO 2022 IR 159"), "Ogawa^Ken=丂^丄", "Head 丂", "T1 丄"),
    CharsetCase(
        "korean-ir149", ("", "ISO 2022 IR 149"), "Hong^Gildong=洪^吉洞=홍^길동", "머리 MRI", "T1 축상"
    ),
    CharsetCase("chinese-ir58", ("", "ISO 2022 IR 58"), "Zhang^XiaoDong=张^小东=", "头部 MR", "T1 轴位"),
    CharsetCase(
        "japanese-utf8", ("ISO_IR 192",), "Yamada^Tarou=山田^太郎=やまだ^たろう", "頭部 MRI", "T1強調 3D"
    ),
    CharsetCase("korean-utf8", ("ISO_IR 192",), "Hong^Gildong=洪^吉洞=홍^길동", "머리 MRI", "T1 축상"),
    CharsetCase("chinese-gb18030", ("GB18030",), "Wang^XiaoDong=王^小东=", "头部 MR", "T1 轴位"),
    CharsetCase("chinese-gbk", ("GBK",), "Wang^XiaoDong=王^小东=", "头部 MR", "T1 轴位"),
)


def case(case_id: str) -> CharsetCase:
    """The case named ``case_id``."""
    for c in CASES:
        if c.id == case_id:
            return c
    raise KeyError(case_id)
