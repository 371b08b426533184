"""Decode stored pixel data of any transfer syntax into frames of stored values, only when fusing.

Compressed syntaxes are decoded by pydicom's plugins (pylibjpeg with libjpeg/openjpeg/rle, pyjpegls);
a syntax that cannot be decoded raises ``VolumeError`` naming it, so the job fails and the node stays up.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID


class VolumeError(ValueError):
    """The series cannot be made into a volume; the message says why."""


def transfer_syntax(ds: Dataset) -> UID | None:
    """The dataset's transfer syntax UID, or None when it has no file meta."""
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return UID(str(ts)) if ts else None


def describe_transfer_syntax(ds: Dataset) -> str:
    """``Name (UID)`` of the dataset's transfer syntax, for error messages."""
    ts = transfer_syntax(ds)
    if ts is None:
        return "unknown transfer syntax (no file meta)"
    name = ts.name if ts.is_transfer_syntax else "unrecognised transfer syntax"
    return f"{name} ({ts})"


def decode_frames(ds: Dataset) -> np.ndarray:
    """Stored pixel values as ``(frames, rows, columns)``; VolumeError naming the syntax on failure."""
    spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
    if spp != 1:
        photometric = getattr(ds, "PhotometricInterpretation", "?")
        raise VolumeError(f"colour image (Samples per Pixel {spp}, {photometric}) cannot be fused as volume")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise VolumeError("image has no pixel data")
    ts = transfer_syntax(ds)
    if ts is not None and not ts.is_transfer_syntax:
        raise VolumeError(f"cannot decode pixel data: {describe_transfer_syntax(ds)} is not supported")
    try:
        arr = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoder missing, corrupt stream: a value the job can report
        raise VolumeError(f"cannot decode pixel data ({describe_transfer_syntax(ds)}): {exc}") from exc
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.shape != (frames, rows, cols):
        raise VolumeError(
            f"decoded pixel data has shape {arr.shape}, header says {frames} frames of {rows}x{cols}"
            f" ({describe_transfer_syntax(ds)})"
        )
    return arr


def stored_range(ds: Dataset) -> tuple[int, int]:
    """Smallest and largest storable value from Bits Stored and Pixel Representation."""
    bits = int(getattr(ds, "BitsStored", 0) or getattr(ds, "BitsAllocated", 16) or 16)
    if int(getattr(ds, "PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1
