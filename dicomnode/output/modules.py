"""The Patient and Study modules of the source, copied completely into the fused series.

Which attributes belong to a module comes from the module tables highdicom ships (generated from
PS3.3), not from a hand-picked list: every top-level attribute of the Patient, Clinical Trial
Subject, General Study, Patient Study and Clinical Trial Study modules that the source has is
copied. Text (PN, LO, SH, ST, LT, UT, UC) is copied as the bytes that were received, so names in
any character set arrive unchanged (see :mod:`dicomnode.output.charset`).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

# The modules of the Patient and Study information entities in the SC Image IODs (PS3.3 A.8).
PATIENT_STUDY_MODULES = (
    "patient",
    "clinical-trial-subject",
    "general-study",
    "patient-study",
    "clinical-trial-study",
)
_TEXT_VRS = frozenset({"PN", "LO", "SH", "ST", "LT", "UT", "UC"})


def _module_attribute_map() -> dict[str, list[dict[str, Any]]]:
    """highdicom's module -> attributes table (its location moved between highdicom releases)."""
    try:
        from highdicom._standard_utils import get_module_attribute_map  # noqa: PLC0415

        return get_module_attribute_map()
    except ImportError:  # highdicom < 0.25
        from highdicom._modules import MODULE_ATTRIBUTE_MAP  # type: ignore[import-not-found]  # noqa: PLC0415

        return MODULE_ATTRIBUTE_MAP  # type: ignore[no-any-return]


@lru_cache(maxsize=8)
def module_keywords(modules: tuple[str, ...] = PATIENT_STUDY_MODULES) -> tuple[str, ...]:
    """Keywords of the top-level attributes of ``modules``, in table order, each once."""
    table = _module_attribute_map()
    seen: dict[str, None] = {}
    for module in modules:
        for attr in table[module]:
            if not attr["path"]:
                seen.setdefault(attr["keyword"], None)
    return tuple(seen)


def copy_modules(
    source: Dataset, target: Dataset, modules: tuple[str, ...] = PATIENT_STUDY_MODULES
) -> list[str]:
    """Copy every attribute of ``modules`` that ``source`` has into ``target``; returns their keywords.

    Text elements still in their received form are copied as raw bytes; ``target`` must then be
    written with the source's character set and Explicit VR Little Endian (the builder sets this).
    """
    copied = []
    for keyword in module_keywords(modules):
        tag = tag_for_keyword(keyword)
        if tag is None:
            continue
        elem = source.get_item(tag)
        if elem is None:
            continue
        if isinstance(elem, RawDataElement):
            vr = elem.VR or dictionary_VR(tag)
            if vr in _TEXT_VRS:
                target[tag] = elem._replace(VR=vr)
                copied.append(keyword)
                continue
            elem = source[tag]  # numbers, dates, codes, sequences: decoded and written anew
        target[tag] = copy.deepcopy(elem)
        copied.append(keyword)
    return copied
