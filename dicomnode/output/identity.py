"""Series identity of a fused series: a Series Number no other series of the study has, and a
Series Description that tells fused series apart in a PACS series list.

The description names both modalities with their source series, the method, whether a
registration was applied, the site's notice and, for a re-fusion, the series it replaces, e.g.
``FUSED MR T1 3D AX + CT HEAD [li2021-cnn] RESEARCH USE ONLY REPLACES 9100``. It fits the 64
characters (or bytes, in a multi-byte character set) of an LO: the source series names are
shortened first (trailing words, then the reference's name), the method last.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

MAX_LO = 64
MAX_SERIES_NUMBER = 2**31 - 1


def _clean(text: str) -> str:
    """One line of printable text without backslash (LO delimiter) and with single spaces."""
    return " ".join("".join(c if c.isprintable() and c != "\\" else " " for c in text).split())


def _label(modality: str, series_description: str) -> str:
    """The source series' own name without a leading repeat of its modality (``CT HEAD`` -> ``HEAD``)."""
    label = _clean(series_description)
    head, _, rest = label.partition(" ")
    if head.upper() == modality:
        label = rest
    return label


MIN_WORD = 6  # a source name's first word is cut no shorter than this before the name is dropped


def _fit_labels(
    compose: Callable[[str, str], str], ref: str, mov: str, fits: Callable[[str], bool]
) -> tuple[str, str] | None:
    """Shorten the two source names until ``compose(ref, mov)`` fits; None when only dropping helps.

    Trailing words go first, from the longer name; then the longer name's single word is cut
    (to MIN_WORD characters). Which name is dropped afterwards is the caller's choice.
    """
    words = [ref.split(), mov.split()]

    def text() -> tuple[str, str]:
        return " ".join(words[0]), " ".join(words[1])

    while not fits(compose(*text())):
        lengths = [len(" ".join(w)) for w in words]
        longer = 0 if lengths[0] >= lengths[1] else 1
        for side in (longer, 1 - longer):
            if len(words[side]) > 1:
                words[side].pop()
                break
            if words[side] and len(words[side][0]) > MIN_WORD:
                words[side][0] = words[side][0][: len(words[side][0]) - 1]
                break
        else:
            return None
    return text()


def series_description(
    reference_modality: str,
    moving_modality: str,
    method_name: str,
    registered: bool = False,
    *,
    reference_label: str = "",
    moving_label: str = "",
    notice: str = "",
    replaces: str = "",
    measure: Callable[[str], int] = len,
) -> str:
    """The Series Description (an LO: ``measure(text) <= 64``) of a fused series.

    ``reference_label`` / ``moving_label`` are the source Series Descriptions, ``notice`` the
    site's notice (empty: none) and ``replaces`` the re-fusion marker (e.g. ``REPLACES 9100``).
    ``measure`` is the length that must stay within 64: characters by default; the encoded bytes
    for a multi-byte character set, as dicom3tools and many PACS databases count them.
    """
    ref, mov = _clean(reference_modality).upper(), _clean(moving_modality).upper()
    ref_label, mov_label = _label(ref, reference_label), _label(mov, moving_label)
    extras = [x for x in ("REG" if registered else "", _clean(notice), _clean(replaces)) if x]
    method = _clean(method_name)

    def compose(method_text: str, ref_text: str, mov_text: str) -> str:
        left = " ".join(x for x in (ref, ref_text) if x)
        right = " ".join(x for x in (mov, mov_text) if x)
        return " ".join(["FUSED", f"{left} + {right}", f"[{method_text}]", *extras])

    def fits(text: str) -> bool:
        return measure(text) <= MAX_LO

    labels = _fit_labels(lambda r, m: compose(method, r, m), ref_label, mov_label, fits)
    if labels is None:  # the reference is usually the study's one MR: its name goes first
        labels = _fit_labels(lambda r, m: compose(method, r, m), "", mov_label, fits) or ("", "")
    text = compose(method, *labels)
    method_w = len(method)
    while not fits(text) and method_w > 1:  # even without the source names: the method gives way
        method_w -= 1
        text = compose(method[:method_w], "", "")
    while not fits(text):  # the notice and marker alone are too long: cut the end
        text = text[:-1].rstrip()
    return text


def replaces_marker(template: str, series_number: int | None) -> str:
    """The re-fusion marker from ``output.replaces_text`` (empty template: no marker)."""
    if not template:
        return ""
    return template.format(series_number="" if series_number is None else series_number).strip()


def choose_series_number(base: int, taken: Iterable[int | None]) -> int:
    """The first number from ``base`` upwards that no series of the study uses."""
    used = {n for n in taken if n is not None}
    number = max(1, base)
    while number in used and number < MAX_SERIES_NUMBER:
        number += 1
    return number
