"""DICOMweb destinations: STOW-RS to store the fused series, QIDO-RS to list a study's series.

:class:`StowSession` has the same life cycle as the C-STORE :class:`~dicomnode.dispatch.scu.StoreSession`
(open, send each file, close; every outcome a :class:`StoreResult`), so the outbox treats both
kinds of destination alike: same rows, retries, backoff and audit. Each instance is one STOW-RS
request over a keep-alive connection, so each delivery gets its own answer.

A STOW-RS answer (PS3.18 10.5.3) lists stored instances in the Referenced SOP Sequence (with a
Warning Reason when stored with a warning) and refused ones in the Failed SOP Sequence (with a
Failure Reason, a DICOM status such as 0xA700); HTTP 200 means all stored, 202 some, 409 none.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from pydicom.filereader import read_file_meta_info

from dicomnode.config import DestinationConfig
from dicomnode.dispatch.scu import FileInfo, StoreResult, status_text
from dicomnode.dispatch.web_client import HttpAnswer, HttpClient, HttpError

log = logging.getLogger("dicomnode.dispatch")

MAX_INSTANCE_BYTES = 2 << 30  # our own files; a bound all the same
_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_WARNING_REASON = "00081196"
_FAILURE_REASON = "00081197"
_SERIES_NUMBER = "00200011"


def _items(body: Any, tag: str) -> list[dict[str, Any]]:
    """The items of a sequence attribute of a DICOM JSON dataset (bounded, type-checked)."""
    if isinstance(body, list):  # some servers wrap the answer dataset in a list
        body = body[0] if body and isinstance(body[0], dict) else {}
    if not isinstance(body, dict):
        return []
    attr = body.get(tag)
    values = attr.get("Value") if isinstance(attr, dict) else None
    return [v for v in values[:100_000] if isinstance(v, dict)] if isinstance(values, list) else []


def _first(item: dict[str, Any], tag: str) -> Any:
    attr = item.get(tag)
    values = attr.get("Value") if isinstance(attr, dict) else None
    return values[0] if isinstance(values, list) and values else None


def _code(value: Any) -> int | None:
    return value if isinstance(value, int) and 0 <= value <= 0xFFFF else None


def stow_result(answer: HttpAnswer, sop_instance_uid: str, where: str) -> StoreResult:
    """What a STOW-RS answer says about one instance."""
    body = answer.json()
    for item in _items(body, _REFERENCED_SOP_SEQUENCE):
        if _first(item, _REFERENCED_SOP_INSTANCE_UID) == sop_instance_uid:
            warning = _code(_first(item, _WARNING_REASON))
            if warning is not None:
                return StoreResult(True, warning, f"stored with warning {status_text(warning)}")
            return StoreResult(True, 0)
    for item in _items(body, _FAILED_SOP_SEQUENCE):
        if _first(item, _REFERENCED_SOP_INSTANCE_UID) == sop_instance_uid:
            reason = _code(_first(item, _FAILURE_REASON))
            why = f"failure reason {status_text(reason)}" if reason is not None else "no failure reason given"
            return StoreResult(False, reason, f"{where} refused the instance (HTTP {answer.status}, {why})")
    if answer.status == 200:  # all stored; the answer need not list them
        return StoreResult(True, 0)
    if answer.status in (401, 403):
        return StoreResult(
            False, None, f"{where} refused the credentials (HTTP {answer.status} {answer.reason})"
        )
    detail = answer.short_body()
    return StoreResult(
        False,
        None,
        f"{where} answered HTTP {answer.status} {answer.reason}" + (f": {detail}" if detail else ""),
    )


class StowSession:
    """STOW-RS of files to one DICOMweb destination; the life cycle of a StoreSession."""

    def __init__(self, dest: DestinationConfig, timeout: float) -> None:
        self.dest = dest
        self.where = f"{dest.name} ({dest.url})"
        self.timeout = timeout
        self.client = HttpClient(str(dest.url), dest, timeout)
        self.error: str | None = None
        self.permanent = False  # HTTP has no association to refuse; per-instance answers decide
        self._lost: str | None = None

    def open(self) -> str | None:
        """Nothing to negotiate: the first request connects. Always None."""
        return None

    def send(self, info: FileInfo) -> StoreResult:
        """POST one file to ``{url}/studies``; the result says whether the server stored it."""
        if self._lost:
            return StoreResult(
                False, None, f"not sent: an earlier request to {self.where} failed ({self._lost})"
            )
        try:
            if info.path.stat().st_size > MAX_INSTANCE_BYTES:
                return StoreResult(
                    False, None, f"output file {info.path.name} is over {MAX_INSTANCE_BYTES} bytes"
                )
            data = info.path.read_bytes()
            sop_uid = str(read_file_meta_info(info.path).MediaStorageSOPInstanceUID)
        except Exception as exc:
            return StoreResult(False, None, f"cannot read output file {info.path.name}: {exc}")
        boundary = f"dicomnode-{uuid.uuid4().hex}"
        body = b"".join(
            (
                f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(),
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            )
        )
        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json",
        }
        try:
            answer = self.client.request("POST", "/studies", body, headers)
        except HttpError as exc:
            self._lost = self.error = str(exc)
            return StoreResult(False, None, str(exc))
        result = stow_result(answer, sop_uid, self.where)
        if not result.stored and answer.status >= 500:
            log.warning("STOW-RS to %s: HTTP %d", self.where, answer.status)
        return result

    def close(self) -> str:
        """Close the connection; ``released`` unless a request failed on the network (``aborted``)."""
        self.client.close()
        return "aborted" if self._lost else "released"

    def __enter__(self) -> StowSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def qido_series_numbers(dest: DestinationConfig, study_uid: str, timeout: float) -> set[int]:
    """Series Numbers of the study's series at a DICOMweb destination (QIDO-RS); raises HttpError."""
    client = HttpClient(str(dest.url), dest, timeout)
    try:
        answer = client.request(
            "GET",
            f"/studies/{study_uid}/series?includefield={_SERIES_NUMBER}",
            headers={"Accept": "application/dicom+json"},
        )
    finally:
        client.close()
    if answer.status == 204 or (answer.status == 404 and not answer.body):
        return set()
    if answer.status != 200:
        raise HttpError(f"QIDO-RS at {dest.url} answered HTTP {answer.status} {answer.reason}")
    body = answer.json()
    numbers: set[int] = set()
    for item in body[:10_000] if isinstance(body, list) else []:
        value = _first(item, _SERIES_NUMBER) if isinstance(item, dict) else None
        try:
            numbers.add(int(value))
        except (TypeError, ValueError):
            continue
    return numbers
