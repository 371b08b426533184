"""8-bit PNG slices (the Harvard atlas pairs, `dicomnode fuse --png`): read as gray or RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read_gray_or_rgb(path: Path) -> np.ndarray:
    """PNG as uint8 (H,W) for gray or (H,W,3) for colour; gray-looking RGB stays RGB."""
    with Image.open(path) as im:
        if im.mode in ("L", "I;16", "I", "F"):
            return np.asarray(im.convert("L"))
        return np.asarray(im.convert("RGB"))
