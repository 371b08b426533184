"""What the node asks a source (C-FIND identifiers) and what it accepts from the answers.

Matches are hostile input: text is cut to the index's column sizes, UIDs must look like UIDs,
and a study is a candidate only when its Patient ID (and its Issuer, when the source returns
one) are the patient's own: a PACS may treat ``*`` or ``?`` in a Patient ID as wildcards, or
ignore a key it does not support. Candidate series become transient ``Series`` rows (never
added to a session) so the rule's own ``SeriesSelector`` ranks them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime

from pydicom.dataset import Dataset

from dicomnode.db import Series
from dicomnode.receive.header import parse_study_datetime

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str:
    """A match value as bounded printable text ('' when absent or unreadable)."""
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element in the answer
        return ""
    if value is None:
        return ""
    if isinstance(value, list | tuple) or type(value).__name__ == "MultiValue":
        value = "\\".join(str(v) for v in value)
    return _CONTROL.sub(" ", str(value)).strip()[:limit]


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = _text(ds, keyword, 65).rstrip("\x00")
    return value if 0 < len(value) <= 64 and _UID.match(value) else None


def study_query(patient_id: str, issuer: str, modality: str, first: date, last: date) -> Dataset:
    """Study-level identifier: the patient's studies holding ``modality`` dated first..last."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = issuer  # '' = a return key: the answer says which issuer it is
    ds.StudyDate = f"{first:%Y%m%d}-{last:%Y%m%d}"
    ds.ModalitiesInStudy = modality
    ds.StudyInstanceUID = ""
    ds.StudyTime = ""
    ds.StudyDescription = ""
    return ds


def series_query(study_instance_uid: str, modality: str) -> Dataset:
    """Series-level identifier: the ``modality`` series of one study, with what the selector reads."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_instance_uid
    ds.Modality = modality
    ds.SeriesInstanceUID = ""
    ds.SeriesNumber = ""
    ds.SeriesDescription = ""
    ds.ProtocolName = ""
    ds.SequenceName = ""
    ds.BodyPartExamined = ""
    ds.ImageType = ""
    ds.MRAcquisitionType = ""
    ds.NumberOfSeriesRelatedInstances = ""
    return ds


def retrieve_identifier(study_instance_uid: str, series_instance_uid: str) -> Dataset:
    """Series-level C-MOVE / C-GET identifier."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "SERIES"
    ds.StudyInstanceUID = study_instance_uid
    ds.SeriesInstanceUID = series_instance_uid
    return ds


@dataclass(frozen=True)
class StudyMatch:
    """A study a source holds for the patient."""

    source: str
    study_instance_uid: str
    study_datetime: datetime | None
    description: str


def accept_study(source: str, ds: Dataset, patient_id: str, issuer: str) -> StudyMatch | str:
    """The study when it belongs to the patient, else why it is not used."""
    study_uid = _uid(ds, "StudyInstanceUID")
    if study_uid is None:
        return "a study match without a valid Study Instance UID"
    if _text(ds, "PatientID") != patient_id.strip():
        return f"study {study_uid[-12:]}: Patient ID differs"
    returned_issuer = _text(ds, "IssuerOfPatientID")
    if returned_issuer and returned_issuer != issuer.strip():
        return f"study {study_uid[-12:]}: Issuer of Patient ID differs"
    when = parse_study_datetime(_text(ds, "StudyDate", 8), _text(ds, "StudyTime", 16))
    return StudyMatch(source, study_uid, when, _text(ds, "StudyDescription"))


@dataclass(frozen=True)
class SeriesCandidate:
    """A series a source offers: where it is, and a transient ``Series`` row for the selector."""

    study: StudyMatch
    series: Series
    n_instances_known: bool

    @property
    def source(self) -> str:
        return self.study.source


def accept_series(
    ds: Dataset, study: StudyMatch, modality: str, anchor: Series, min_slices: int
) -> SeriesCandidate | str:
    """The series as a candidate for ``anchor``'s patient, else why it is not used.

    When the source does not return Number of Series Related Instances the series counts as
    ``min_slices`` (unknown, not refused); the fuse stage still refuses what is not a volume.
    """
    series_uid = _uid(ds, "SeriesInstanceUID")
    if series_uid is None:
        return f"study {study.study_instance_uid[-12:]}: a series match without a valid Series Instance UID"
    found = _text(ds, "Modality", 16).upper()
    if found and found != modality:
        return f"series {series_uid[-12:]}: modality {found}, not {modality}"
    count = _text(ds, "NumberOfSeriesRelatedInstances", 12)
    known = count.isdigit()
    row = Series(
        series_instance_uid=series_uid,
        study_instance_uid=study.study_instance_uid,
        patient_key=anchor.patient_key,
        patient_id=anchor.patient_id,
        issuer_of_patient_id=anchor.issuer_of_patient_id,
        modality=modality,
        series_description=_text(ds, "SeriesDescription"),
        protocol_name=_text(ds, "ProtocolName"),
        sequence_name=_text(ds, "SequenceName"),
        body_part=_text(ds, "BodyPartExamined").upper(),
        acquisition_type=_text(ds, "MRAcquisitionType", 8).upper(),
        image_type=_text(ds, "ImageType", 200).upper(),
        study_datetime=study.study_datetime,
        n_instances=min(int(count), 1_000_000) if known else min_slices,
    )
    return SeriesCandidate(study, row, known)
