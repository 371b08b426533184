"""Fusers by name (config ``fusion.method``), resolved lazily.

Each entry names the module and the class that implement a fuser; the module is imported only when
that fuser is asked for. The registry therefore imports none of its members and they do not import
it: the fusers depend on :mod:`dicomnode.fusion.base` only, and listing the names costs no import.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from dicomnode.fusion.base import Fuser

DEFAULT_MODEL = "li2021-cnn"
# The shipped weights of the default model (dicomnode.fusion.model.WEIGHTS_FILE), looked up here
# without importing the model.
_DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / f"{DEFAULT_MODEL}.pt"
FALLBACK = "laplacian-pyramid"

FUSERS: dict[str, str] = {
    DEFAULT_MODEL: "dicomnode.fusion.model:CNNFuser",
    "average": "dicomnode.fusion.classical:AverageFuser",
    "max": "dicomnode.fusion.classical:MaxFuser",
    "laplacian-pyramid": "dicomnode.fusion.classical:LaplacianPyramidFuser",
    "guided-filter": "dicomnode.fusion.classical:GuidedFilterFuser",
    "gradient-domain": "dicomnode.fusion.classical:GradientDomainFuser",
}


def available_fusers() -> list[str]:
    """Names accepted by :func:`get_fuser` (besides ``default``)."""
    return sorted(FUSERS)


def default_fuser_name() -> str:
    """The learned model when its weights ship with the package, else the classical baseline."""
    return DEFAULT_MODEL if _DEFAULT_WEIGHTS.is_file() else FALLBACK


def fuser_class(name: str) -> type[Fuser]:
    """The class registered as ``name``, its module imported on first use."""
    try:
        module_name, _, attr = FUSERS[name].partition(":")
    except KeyError:
        raise KeyError(f"unknown fusion method {name!r}; available: {', '.join(sorted(FUSERS))}") from None
    return getattr(importlib.import_module(module_name), attr)


def get_fuser(name: str = "default", device: str = "cpu") -> Fuser:
    """Instantiate a fuser by name; ``default`` picks :func:`default_fuser_name`."""
    if name == "default":
        name = default_fuser_name()
    return fuser_class(name)(device)
