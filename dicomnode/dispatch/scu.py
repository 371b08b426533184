"""One outbound association to one destination: open, C-STORE files, close; every outcome a value.

Nothing here touches the database; :mod:`dicomnode.dispatch.outbox` turns the outcomes into rows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.status import code_to_category

from dicomnode.config import DestinationConfig

log = logging.getLogger("dicomnode.dispatch")

MAX_CONTEXTS = 128  # DICOM limit of presentation contexts per association
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class FileProblem(Exception):
    """An outbox file cannot be read or has no usable file meta; the message says why."""


@dataclass(frozen=True)
class FileInfo:
    """What the association needs to know about one file before opening."""

    path: Path
    sop_class_uid: str
    transfer_syntax_uid: str


@dataclass
class StoreResult:
    """Outcome of one C-STORE: ``stored`` means the PACS took it (success or warning status)."""

    stored: bool
    status: int | None
    error: str | None = None


@dataclass
class _Peer:
    """What the ACSE events told us about the peer while associating."""

    connected: bool = False
    rejection: str | None = None
    abort: str | None = None
    notes: list[str] = field(default_factory=list)


def inspect_file(path: Path) -> FileInfo:
    """Read only the file meta of ``path`` (SOP class, transfer syntax) to plan presentation contexts."""
    if not path.is_file():
        raise FileProblem(f"output file is missing: {path}")
    try:
        meta = read_file_meta_info(path)
    except Exception as exc:  # pydicom raises several types for a bad preamble/meta
        raise FileProblem(f"output file {path.name} is not a DICOM file: {exc}") from exc
    sop_class = str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "")
    if not sop_class or not ts:
        raise FileProblem(f"output file {path.name} has no SOP class or transfer syntax in its file meta")
    return FileInfo(path=path, sop_class_uid=sop_class, transfer_syntax_uid=ts)


def presentation_contexts(files: list[FileInfo]) -> dict[str, list[str]]:
    """SOP class -> transfer syntaxes to propose: each file's own, plus both uncompressed little
    endian syntaxes when the file is uncompressed (pynetdicom can convert between those)."""
    contexts: dict[str, list[str]] = {}
    for f in files:
        wanted = contexts.setdefault(f.sop_class_uid, [])
        options = [f.transfer_syntax_uid]
        if f.transfer_syntax_uid in _UNCOMPRESSED:
            options += list(_UNCOMPRESSED)
        for ts in options:
            if ts not in wanted:
                wanted.append(ts)
    return contexts


def status_text(status: int) -> str:
    """``0xA700 (Failure)`` style text for a DIMSE status."""
    return f"0x{status:04X} ({code_to_category(status)})"


def classify_status(status: int) -> StoreResult:
    """Success and Warning statuses mean stored; everything else is a failed attempt."""
    category = code_to_category(status)
    if category == "Success":
        return StoreResult(stored=True, status=status)
    if category == "Warning":
        return StoreResult(stored=True, status=status, error=f"stored with warning {status_text(status)}")
    return StoreResult(stored=False, status=status, error=f"destination answered {status_text(status)}")


class StoreSession:
    """One association from ``calling_aet`` to ``dest`` proposing ``contexts``; use as a context manager."""

    def __init__(
        self,
        calling_aet: str,
        dest: DestinationConfig,
        contexts: Mapping[str, list[str]],
        timeout: float,
    ) -> None:
        self.dest = dest
        self.where = f"{dest.ae_title}@{dest.host}:{dest.port}"
        self.timeout = timeout
        self._peer = _Peer()
        self.ae = AE(ae_title=calling_aet)
        self.ae.acse_timeout = timeout
        self.ae.dimse_timeout = timeout
        self.ae.network_timeout = timeout
        self.ae.connection_timeout = timeout
        for sop_class, syntaxes in list(contexts.items())[:MAX_CONTEXTS]:
            self.ae.add_requested_context(sop_class, syntaxes)
        self.assoc = None
        self.error: str | None = None

    def _on_conn_open(self, event: evt.Event) -> None:
        self._peer.connected = True

    def _on_acse(self, event: evt.Event) -> None:
        prim = event.primitive
        if isinstance(prim, A_ASSOCIATE) and prim.result in (0x01, 0x02):
            self._peer.rejection = f"{prim.result_str}, source: {prim.source_str}, reason: {prim.reason_str}"
        elif isinstance(prim, A_ABORT | A_P_ABORT):
            src = getattr(prim, "abort_source", None)
            reason = getattr(prim, "provider_reason", None)
            self._peer.abort = f"abort source {src}" + (f", reason {reason}" if reason is not None else "")

    def open(self) -> str | None:
        """Associate; returns None when established, else the reason it failed (for the audit)."""
        handlers = [(evt.EVT_CONN_OPEN, self._on_conn_open), (evt.EVT_ACSE_RECV, self._on_acse)]
        try:
            self.assoc = self.ae.associate(
                self.dest.host, self.dest.port, ae_title=self.dest.ae_title, evt_handlers=handlers
            )
        except Exception as exc:  # bad host name etc.: pynetdicom raises before connecting
            self.error = f"cannot associate with {self.where}: {exc}"
            return self.error
        if self.assoc.is_established:
            return None
        if not self._peer.connected:
            self.error = f"cannot connect to {self.where} (connection refused, unreachable or timed out)"
        elif self._peer.rejection:
            self.error = f"association rejected by {self.where} ({self._peer.rejection})"
        elif self.assoc.is_aborted and self._peer.abort:
            self.error = f"association aborted by {self.where} ({self._peer.abort})"
        elif self.assoc.is_aborted and not self.assoc.accepted_contexts:
            self.error = f"{self.where} accepted none of the proposed presentation contexts"
        else:
            self.error = f"no answer from {self.where} to the association request within {self.timeout:g} s"
        return self.error

    @property
    def rejected(self) -> bool:
        return bool(self.assoc is not None and self.assoc.is_rejected)

    @property
    def established(self) -> bool:
        return bool(self.assoc is not None and self.assoc.is_established)

    def send(self, info: FileInfo) -> StoreResult:
        """C-STORE one file; the result says whether the PACS stored it and why not."""
        if not self.established:
            why = self._peer.abort or "released"
            return StoreResult(False, None, f"association with {self.where} ended before sending ({why})")
        try:
            ds = pydicom.dcmread(info.path)
        except Exception as exc:
            return StoreResult(False, None, f"cannot read output file {info.path.name}: {exc}")
        try:
            rsp = self.assoc.send_c_store(ds)  # type: ignore[union-attr]
        except ValueError as exc:
            ts = UID(info.transfer_syntax_uid)
            return StoreResult(
                False, None,
                f"{self.where} did not accept SOP class {info.sop_class_uid} with {ts.name}: {exc}",
            )
        except (AttributeError, RuntimeError) as exc:
            return StoreResult(False, None, f"cannot send {info.path.name} to {self.where}: {exc}")
        status = getattr(rsp, "Status", None)
        if status is None:
            if self.assoc is not None and self.assoc.is_aborted:
                return StoreResult(False, None, f"association aborted by {self.where} during C-STORE")
            why = f"no C-STORE response from {self.where} within {self.timeout:g} s"
            return StoreResult(False, None, why)
        return classify_status(int(status))

    def close(self) -> str:
        """Release (or note the abort); returns the association's final state."""
        if self.assoc is None:
            return "aborted"  # never connected; the reason says so
        if self.assoc.is_established:
            self.assoc.release()
            return "released"
        if self.assoc.is_rejected:
            return "rejected"
        return "aborted"

    def __enter__(self) -> StoreSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc is not None and self.assoc.is_established:
            self.assoc.abort() if exc[0] is not None else self.assoc.release()
