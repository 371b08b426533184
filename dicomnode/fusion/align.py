"""Choose how to put the moving volume on the reference grid.

In order: a shared frame of reference (resample by patient coordinates); a Spatial Registration
object (REG) relating both frames (its matrix); otherwise rigid registration by mutual information,
refused when implausible.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from dicomnode.fusion.pipeline import FusionError
from dicomnode.fusion.spatial_registration import SpatialRegistration, find_transform
from dicomnode.fusion.volume import Volume


def align(
    reference: Volume,
    moving: Volume,
    device: str = "auto",
    registrations: Sequence[SpatialRegistration] = (),
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """(transform reference->moving patient mm or None, audit details); FusionError if implausible."""
    ref_for, mov_for = reference.frame_of_reference_uid, moving.frame_of_reference_uid
    if ref_for and ref_for == mov_for:
        return None, {"alignment": "same frame of reference: resampled by patient coordinates"}
    found = find_transform(list(registrations), ref_for, mov_for) if ref_for and mov_for else None
    if found is not None:
        matrix, reg_uid = found
        return matrix, {
            "alignment": f"spatial registration object {reg_uid}",
            "registration": {"source": "REG", "sop_instance_uid": reg_uid, "matrix": matrix.tolist()},
        }
    try:
        from dicomnode.fusion.registration import register_rigid  # noqa: PLC0415
    except ImportError:
        raise FusionError(
            "series are in different frames of reference and registration is not available"
        ) from None
    result = register_rigid(reference, moving, device=device)
    rot = ", ".join(f"{v:.2f}" for v in np.asarray(result.rotation_deg))
    trans = ", ".join(f"{v:.1f}" for v in np.asarray(result.translation_mm))
    summary = (
        f"rotation ({rot}) deg, translation ({trans}) mm, mutual information "
        f"{result.initial_similarity:.3f} -> {result.similarity:.3f}, {result.iterations} iterations"
    )
    info = {
        "alignment": f"different frames of reference: rigid registration (mutual information): {summary}",
        "registration": json.loads(result.to_json()),
    }
    if not result.plausible:
        raise FusionError(f"registration result implausible ({summary}): {result.reason}")
    return np.asarray(result.matrix), info
