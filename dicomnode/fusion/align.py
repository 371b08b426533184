"""Choose how to put the moving volume on the reference grid: shared frame of reference or registration."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from dicomnode.fusion.pipeline import FusionError
from dicomnode.fusion.volume import Volume


def align(
    reference: Volume, moving: Volume, device: str = "auto"
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(transform reference->moving patient mm or None, audit details); FusionError if implausible."""
    if reference.frame_of_reference_uid and reference.frame_of_reference_uid == moving.frame_of_reference_uid:
        return None, {"alignment": "same frame of reference: resampled by patient coordinates"}
    try:
        from dicomnode.fusion.registration import register_rigid  # noqa: PLC0415
    except ImportError:
        raise FusionError(
            "series are in different frames of reference and registration is not available"
        ) from None
    result = register_rigid(reference, moving, device=device)
    info = {
        "alignment": "different frames of reference: rigid registration (mutual information)",
        "registration": json.loads(result.to_json()),
    }
    if not result.plausible:
        raise FusionError(f"registration result implausible: {result.reason}")
    return np.asarray(result.matrix), info
