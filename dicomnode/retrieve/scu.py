"""One association with one PACS source: C-FIND, C-MOVE or C-GET; every outcome a value.

Nothing here touches the database; :mod:`dicomnode.retrieve.stage` turns the outcomes into rows
and audit events. What a source answers is bounded: the number of matches (the query is
cancelled beyond it), the wait for each response (``timeout_seconds``) and the whole retrieve
(``max_retrieve_seconds``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, StoragePresentationContexts, build_role, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    EnhancedPETImageStorage,
    MRImageStorage,
    NuclearMedicineImageStorage,
    PositronEmissionTomographyImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import code_to_category

from dicomnode.config import SourceConfig
from dicomnode.dispatch.scu import set_nodelay, status_text

log = logging.getLogger("dicomnode.retrieve")

FIND = StudyRootQueryRetrieveInformationModelFind
MOVE = StudyRootQueryRetrieveInformationModelMove
GET = StudyRootQueryRetrieveInformationModelGet
STATUS_PENDING = (0xFF00, 0xFF01)
MAX_CONTEXTS = 128
_UNCOMPRESSED = [
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
]
# The images rules fuse may be stored compressed in the PACS; C-GET offers those syntaxes for them
# (received byte for byte, decoded by the fuse stage) so the PACS need not transcode.
_COMPRESSED = [
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
]
_IMAGE_CLASSES = {
    str(uid)
    for uid in (
        CTImageStorage,
        MRImageStorage,
        PositronEmissionTomographyImageStorage,
        NuclearMedicineImageStorage,
        EnhancedCTImageStorage,
        EnhancedMRImageStorage,
        EnhancedPETImageStorage,
    )
}


@dataclass
class FindResult:
    """The matches of one C-FIND; ``error`` is set when the query did not complete."""

    matches: list[Dataset] = field(default_factory=list)
    status: int | None = None
    error: str | None = None
    truncated: bool = False


@dataclass
class RetrieveResult:
    """Outcome of one C-MOVE or C-GET: ``ok`` when every sub-operation succeeded."""

    ok: bool
    status: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    error: str | None = None


def _count(ds: Dataset | None, keyword: str) -> int | None:
    value = getattr(ds, keyword, None) if ds is not None else None
    try:
        return max(0, min(int(value), 1_000_000)) if value is not None else None
    except (TypeError, ValueError):
        return None


class SourceSession:
    """One association from ``calling_aet`` to a source for one service; use as a context manager.

    ``service`` is ``find``, ``c-move`` or ``c-get``. For C-GET the storage contexts are proposed
    with the SCP role and ``store_handlers`` take the C-STORE sub-operations on this association.
    """

    def __init__(
        self,
        calling_aet: str,
        source: SourceConfig,
        service: str,
        store_handlers: list[tuple[evt.EventType, Callable[[evt.Event], Any]]] | None = None,
    ) -> None:
        self.source = source
        self.where = f"{source.ae_title}@{source.host}:{source.port}"
        self.service = service
        self.timeout = source.timeout_seconds
        self.ae = AE(ae_title=calling_aet)
        for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
            setattr(self.ae, attr, self.timeout)
        self.roles: list[Any] = []
        if service == "find":
            self.ae.add_requested_context(FIND)
        elif service == "c-move":
            self.ae.add_requested_context(MOVE)
        elif service == "c-get":
            self.ae.add_requested_context(GET)
            for cx in StoragePresentationContexts[: MAX_CONTEXTS - 1]:
                uid = str(cx.abstract_syntax)
                syntaxes = _UNCOMPRESSED + (_COMPRESSED if uid in _IMAGE_CLASSES else [])
                self.ae.add_requested_context(uid, syntaxes)
                self.roles.append(build_role(uid, scp_role=True))
        else:
            raise ValueError(f"unknown service {service!r}")
        self.store_handlers = list(store_handlers or [])
        self.assoc: Association | None = None
        self._connected = False
        self._rejection: str | None = None

    def _on_conn_open(self, event: evt.Event) -> None:
        self._connected = True
        set_nodelay(event.assoc)

    def _on_acse(self, event: evt.Event) -> None:
        prim = event.primitive
        if isinstance(prim, A_ASSOCIATE) and prim.result in (0x01, 0x02):
            self._rejection = f"{prim.result_str}, source: {prim.source_str}, reason: {prim.reason_str}"

    def open(self) -> str | None:
        """Associate; returns None when established, else why not (for the audit)."""
        handlers = [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_ACSE_RECV, self._on_acse)]
        try:
            self.assoc = self.ae.associate(
                self.source.host,
                self.source.port,
                ae_title=self.source.ae_title,
                ext_neg=self.roles or None,
                evt_handlers=handlers + self.store_handlers,
            )
        except Exception as exc:  # e.g. a host name that does not resolve
            return f"cannot associate with {self.where}: {exc}"
        if self.assoc.is_established:
            return None
        if self._rejection:
            return f"association rejected by {self.where} ({self._rejection})"
        if not self._connected:
            return f"cannot connect to {self.where} (connection refused, unreachable or timed out)"
        if self.assoc.is_aborted and not self.assoc.accepted_contexts:
            return f"{self.where} accepted none of the proposed {self.service} presentation contexts"
        return f"no answer from {self.where} to the association request within {self.timeout:g} s"

    def close(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.release()

    def abort(self) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.abort()

    def __enter__(self) -> SourceSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            self.abort()
        self.close()

    # -- C-FIND ----------------------------------------------------------------------------------
    def find(self, identifier: Dataset, limit: int) -> FindResult:
        """C-FIND (Study Root) with at most ``limit`` matches; beyond it the query is cancelled."""
        assert self.assoc is not None
        result = FindResult()
        responses = self.assoc.send_c_find(identifier, FIND, msg_id=1)
        for status, match in responses:
            code = getattr(status, "Status", None)
            if code is None:
                result.error = f"no C-FIND response from {self.where} within {self.timeout:g} s"
                self.abort()
                return result
            code = int(code)
            if code in STATUS_PENDING:
                if len(result.matches) >= limit:
                    result.truncated = True
                    self._cancel_find(responses)
                    return result
                if match is not None:
                    result.matches.append(match)
                continue
            result.status = code
            if code_to_category(code) not in ("Success", "Warning"):
                result.error = f"{self.where} answered the C-FIND with {status_text(code)}"
            return result
        result.error = f"association with {self.where} ended during the C-FIND"
        return result

    def _cancel_find(self, responses: Iterator[tuple[Dataset, Dataset | None]]) -> None:
        """C-CANCEL the query and read what the source still sends, up to a bound, then give up."""
        assert self.assoc is not None
        try:
            self.assoc.send_c_cancel(1, query_model=FIND)
        except Exception:  # the association may already be gone
            self.abort()
            return
        for drained, (status, _match) in enumerate(responses):
            code = getattr(status, "Status", None)
            if code is None or int(code) not in STATUS_PENDING:
                return
            if drained >= 1000:
                break
        self.abort()

    # -- C-MOVE / C-GET --------------------------------------------------------------------------
    def retrieve(
        self,
        identifier: Dataset,
        move_destination: str | None,
        max_seconds: float,
        progress: Callable[[int | None, int | None], None] | None = None,
    ) -> RetrieveResult:
        """C-MOVE to ``move_destination`` (or C-GET when None); ``progress(completed, remaining)``
        is called on every pending response. Aborted after ``max_seconds``."""
        assert self.assoc is not None
        what = "C-MOVE" if move_destination else "C-GET"
        if move_destination:
            responses = self.assoc.send_c_move(identifier, move_destination, MOVE, msg_id=1)
        else:
            responses = self.assoc.send_c_get(identifier, GET, msg_id=1)
        deadline = time.monotonic() + max_seconds
        for status, _ident in responses:
            code = getattr(status, "Status", None)
            if code is None:
                self.abort()
                return RetrieveResult(
                    False, error=f"no {what} response from {self.where} within {self.timeout:g} s"
                )
            code = int(code)
            completed, failed, warning = (
                _count(status, "NumberOfCompletedSuboperations"),
                _count(status, "NumberOfFailedSuboperations"),
                _count(status, "NumberOfWarningSuboperations"),
            )
            if code in STATUS_PENDING:
                if progress is not None:
                    progress(completed, _count(status, "NumberOfRemainingSuboperations"))
                if time.monotonic() > deadline:
                    self.abort()
                    return RetrieveResult(
                        False, code, completed, failed, warning, f"{what} took longer than {max_seconds:g} s"
                    )
                continue
            category = code_to_category(code)
            if category == "Success" and not failed:
                return RetrieveResult(True, code, completed, failed, warning)
            if category == "Warning" and not failed:
                return RetrieveResult(True, code, completed, failed, warning, f"warning {status_text(code)}")
            return RetrieveResult(
                False,
                code,
                completed,
                failed,
                warning,
                f"{self.where} answered the {what} with {status_text(code)}",
            )
        return RetrieveResult(False, error=f"association with {self.where} ended during the {what}")
