"""The one fusion interface and the registry of fusers by name.

A fuser takes two stacks of co-registered slices, float32 ``(N, H, W)`` in ``[0, 1]``
(``a`` = the anatomical reference, MR; ``b`` = CT, or the luma of a functional image),
and returns the fused stack, float32 ``(N, H, W)`` in ``[0, 1]``. It has a ``name`` and a
``version`` that go into the output series and the audit.
"""

from __future__ import annotations

import importlib
import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

# Modules that register fusers when imported.
_FUSER_MODULES = ("dicomnode.fusion.classical", "dicomnode.fusion.model")


class Fuser(ABC):
    """Arrays in, array out, plus a name and a version."""

    name: str = "abstract"
    version: str = "0"

    def __init__(self, device: str = "cpu") -> None:
        self.device = device

    @abstractmethod
    def fuse(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Fuse ``a`` (N,H,W) with ``b`` (N,H,W), both float32 in [0,1]; return (N,H,W) in [0,1]."""

    def for_modality(self, moving_modality: str) -> Fuser:
        """The fuser to use when ``b`` comes from ``moving_modality`` (CT, PT, NM); default: self.

        A learned fuser with per-modality weights returns its specialised variant here.
        """
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, device={self.device!r})"


_REGISTRY: dict[str, Callable[[str], Fuser]] = {}


def register_fuser(name: str) -> Callable[[type[Fuser]], type[Fuser]]:
    """Class decorator: make a fuser available by ``name`` (config ``fusion.method``)."""

    def deco(cls: type[Fuser]) -> type[Fuser]:
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_modules() -> None:
    for mod in _FUSER_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def available_fusers() -> list[str]:
    """Names accepted by :func:`get_fuser` (besides ``default``)."""
    _load_modules()
    return sorted(_REGISTRY)


def default_fuser_name() -> str:
    """The learned model when its weights ship with the package, else the classical baseline."""
    _load_modules()
    if importlib.util.find_spec("dicomnode.fusion.model") is None:
        return "laplacian-pyramid"
    model = importlib.import_module("dicomnode.fusion.model")
    name = getattr(model, "DEFAULT_MODEL_NAME", None)
    if name and name in _REGISTRY and getattr(model, "weights_available", lambda: False)():
        return str(name)
    return "laplacian-pyramid"


def get_fuser(name: str = "default", device: str = "cpu") -> Fuser:
    """Instantiate a fuser by name; ``default`` picks :func:`default_fuser_name`."""
    _load_modules()
    if name == "default":
        name = default_fuser_name()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown fusion method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    return factory(device)
