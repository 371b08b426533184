"""Series identity of a fused series: a Series Number no other series of the study has, and a
Series Description that tells fused series apart in a PACS series list.

The description names both modalities with their source series, the method, whether a
registration was applied, the site's notice and, for a re-fusion, the series it replaces, e.g.
``FUSED MR T1 3D AX + CT HEAD [li2021-cnn] RESEARCH USE ONLY REPLACES 9100``. It fits the 64
characters of an LO: the source series names are shortened first, the method last.
"""

from __future__ import annotations

from collections.abc import Iterable

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


def _shorten(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters, at a word boundary when one is near."""
    if len(text) <= width:
        return text
    if width <= 0:
        return ""
    cut = text[:width]
    space = cut.rfind(" ")
    if space >= width // 2:
        return cut[:space].rstrip()
    return cut.rstrip() if width >= 4 else ""  # a 1-3 letter stump of a word says nothing


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
) -> str:
    """The Series Description (at most 64 characters) of a fused series.

    ``reference_label`` / ``moving_label`` are the source Series Descriptions, ``notice`` the
    site's notice (empty: none) and ``replaces`` the re-fusion marker (e.g. ``REPLACES 9100``).
    """
    ref, mov = _clean(reference_modality).upper(), _clean(moving_modality).upper()
    ref_label, mov_label = _label(ref, reference_label), _label(mov, moving_label)
    extras = [x for x in ("REG" if registered else "", _clean(notice), _clean(replaces)) if x]
    method = _clean(method_name)

    def compose(method_text: str, ref_text: str, mov_text: str) -> str:
        left = " ".join(x for x in (ref, ref_text) if x)
        right = " ".join(x for x in (mov, mov_text) if x)
        return " ".join(["FUSED", f"{left} + {right}", f"[{method_text}]", *extras])

    bare = compose(method, "", "")
    if len(bare) > MAX_LO:  # even without the source names: the method name gives way
        method = _shorten(method, max(len(method) - (len(bare) - MAX_LO), 1))
        return compose(method, "", "")[:MAX_LO]
    budget = MAX_LO - len(bare)
    # each source name takes a space; split what is left, giving one name's unused share to the other
    need_ref = len(ref_label) + 1 if ref_label else 0
    need_mov = len(mov_label) + 1 if mov_label else 0
    if need_ref + need_mov > budget:
        half = budget // 2
        if need_ref <= half:
            need_mov = budget - need_ref
        elif need_mov <= half:
            need_ref = budget - need_mov
        else:
            need_ref, need_mov = half, budget - half
    ref_label = _shorten(ref_label, need_ref - 1)
    mov_label = _shorten(mov_label, need_mov - 1)
    return compose(method, ref_label, mov_label)[:MAX_LO]


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
