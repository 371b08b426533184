"""DICOM Spatial Registration objects (REG): rigid matrices between frames of reference.

A REG instance has its own Frame of Reference (the registered space) and a Registration Sequence
whose items each name a source Frame of Reference and a 4x4 Frame of Reference Transformation
Matrix mapping that source's patient coordinates into the REG's space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

SPATIAL_REGISTRATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.1"


class RegistrationObjectError(ValueError):
    """A REG object that cannot be used; the message says why."""


@dataclass
class SpatialRegistration:
    sop_instance_uid: str
    target_frame_of_reference_uid: str
    to_target: dict[str, np.ndarray]  # source FoR UID -> 4x4 (source patient mm -> target mm)

    def transform(self, reference_for: str, moving_for: str) -> np.ndarray | None:
        """4x4 reference patient mm -> moving patient mm, when this object relates both."""
        mats = dict(self.to_target)
        mats.setdefault(self.target_frame_of_reference_uid, np.eye(4))
        if reference_for not in mats or moving_for not in mats:
            return None
        return np.linalg.inv(mats[moving_for]) @ mats[reference_for]


def _matrix(item: Dataset) -> np.ndarray:
    seq = getattr(item, "MatrixRegistrationSequence", None)
    if not seq:
        raise RegistrationObjectError("Registration Sequence item without Matrix Registration Sequence")
    total = np.eye(4)
    # Several matrices in one item are applied in order.
    for m in getattr(seq[0], "MatrixSequence", []):
        kind = str(getattr(m, "FrameOfReferenceTransformationMatrixType", "RIGID"))
        if kind not in ("RIGID", "RIGID_SCALE"):
            raise RegistrationObjectError(f"matrix type {kind} is not rigid; not used")
        values = [float(v) for v in m.FrameOfReferenceTransformationMatrix]
        if len(values) != 16:
            raise RegistrationObjectError("Frame of Reference Transformation Matrix must have 16 values")
        mat = np.array(values).reshape(4, 4)
        if not np.allclose(mat[3], [0, 0, 0, 1], atol=1e-6):
            raise RegistrationObjectError("matrix last row must be 0 0 0 1")
        total = mat @ total
    return total


def parse_registration(ds: Dataset) -> SpatialRegistration:
    """Read a Spatial Registration dataset; RegistrationObjectError when it is not usable."""
    if str(getattr(ds, "SOPClassUID", "")) != SPATIAL_REGISTRATION_STORAGE:
        raise RegistrationObjectError("not a Spatial Registration object")
    target = str(getattr(ds, "FrameOfReferenceUID", ""))
    if not target:
        raise RegistrationObjectError("REG object without Frame of Reference UID")
    mats: dict[str, np.ndarray] = {}
    for item in getattr(ds, "RegistrationSequence", []):
        source = str(getattr(item, "FrameOfReferenceUID", ""))
        if source:
            mats[source] = _matrix(item)
    if not mats:
        raise RegistrationObjectError("REG object has no usable Registration Sequence item")
    return SpatialRegistration(str(ds.SOPInstanceUID), target, mats)


def find_transform(
    registrations: list[SpatialRegistration], reference_for: str, moving_for: str
) -> tuple[np.ndarray, str] | None:
    """The first REG relating both frames: (reference -> moving matrix, REG SOP Instance UID)."""
    for reg in registrations:
        t = reg.transform(reference_for, moving_for)
        if t is not None:
            return t, reg.sop_instance_uid
    return None
