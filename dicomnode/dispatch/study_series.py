"""What a destination already holds of a study: the Series Numbers in use there.

Asked before a fused series is numbered, so its number collides with no series of the study in
the PACS either (series the node never received, earlier fused series). Destinations that can
answer: DICOMweb (QIDO-RS) and any destination with the Orthanc REST capability. A destination
that cannot be asked or does not answer costs nothing but a note.
"""

from __future__ import annotations

import re

from dicomnode.config import DestinationConfig
from dicomnode.dispatch.dicomweb import qido_series_numbers
from dicomnode.dispatch.orthanc_rest import OrthancRest
from dicomnode.dispatch.web_client import HttpError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def series_numbers_at(dest: DestinationConfig, study_uid: str, timeout: float) -> tuple[set[int], str]:
    """(Series Numbers in the study at ``dest``, a note when it could not be asked or answered)."""
    if not _UID.match(study_uid) or len(study_uid) > 64:
        return set(), f"{dest.name}: study UID not usable in a query"
    try:
        if dest.orthanc is not None:
            rest = OrthancRest(dest.orthanc, timeout)
            try:
                return rest.series_numbers(study_uid), ""
            finally:
                rest.close()
        if dest.type == "dicomweb":
            return qido_series_numbers(dest, study_uid, timeout), ""
    except HttpError as exc:
        return set(), f"{dest.name}: series numbers not known ({exc})"
    return set(), ""
