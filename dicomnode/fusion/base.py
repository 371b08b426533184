"""The one fusion interface.

A fuser takes two stacks of co-registered slices, float32 ``(N, H, W)`` in ``[0, 1]``
(``a`` = the anatomical reference, MR; ``b`` = CT, or the luma of a functional image),
and returns the fused stack, float32 ``(N, H, W)`` in ``[0, 1]``. It has a ``name`` and a
``version`` that go into the output series and the audit. Fusers are found by name in
:mod:`dicomnode.fusion.registry`; this module imports none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


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
