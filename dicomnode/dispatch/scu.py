"""One outbound association to one destination: open, C-STORE files, close; every outcome a value.

Nothing here touches the database; :mod:`dicomnode.dispatch.outbox` turns the outcomes into rows.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.status import code_to_category

from dicomnode.config import DestinationConfig
from dicomnode.tls import client_context

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
    """Outcome of one C-STORE: ``stored`` means the PACS took it (success or warning status);
    ``permanent`` means the destination's answer will not change on retry (no further attempts)."""

    stored: bool
    status: int | None
    error: str | None = None
    permanent: bool = False


@dataclass
class _Peer:
    """What the ACSE events told us about the peer while associating."""

    connected: bool = False
    rejection: str | None = None
    rejected_permanently: bool = False
    abort: str | None = None
    notes: list[str] = field(default_factory=list)


# Failure statuses whose answer does not change when the same instance is sent again (PS3.4 C.4.2,
# PS3.7 C): refused SOP class, not authorized, invalid instance, unrecognised/mistyped request,
# attribute errors, data set does not match the SOP class (A9xx), cannot understand (Cxxx).
# Everything else (A7xx out of resources, 0110 processing failure, 0213 resource limitation,
# unknown codes) is worth retrying.
_PERMANENT_STATUSES = {0x0105, 0x0106, 0x0117, 0x0122, 0x0124, 0x0211, 0x0212}


def status_is_permanent(status: int) -> bool:
    """True for a C-STORE failure status that a retry of the same instance cannot change."""
    return status in _PERMANENT_STATUSES or (status & 0xFF00) == 0xA900 or (status & 0xF000) == 0xC000


def rejection_is_permanent(result: int | None, source: int | None, reason: int | None) -> bool:
    """A-ASSOCIATE-RJ "rejected permanent" (result 1), except a provider's congestion or local
    limit (source 3, reason 1 or 2), which are transient whatever the result says."""
    return result == 0x01 and not (source == 0x03 and reason in (0x01, 0x02))


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
    """Success and Warning statuses mean stored; everything else is a failed attempt, permanent
    when the status says a retry cannot change it."""
    category = code_to_category(status)
    if category == "Success":
        return StoreResult(stored=True, status=status)
    if category == "Warning":
        return StoreResult(stored=True, status=status, error=f"stored with warning {status_text(status)}")
    if status_is_permanent(status):
        return StoreResult(
            stored=False,
            status=status,
            error=f"destination refused the instance with {status_text(status)}, which a retry cannot change",
            permanent=True,
        )
    return StoreResult(stored=False, status=status, error=f"destination answered {status_text(status)}")


def set_nodelay(assoc: object) -> None:
    """Switch Nagle off on the association's socket: pynetdicom does not, and the command PDU
    followed by the data PDUs otherwise waits on the peer's delayed ACK (~20 ms per instance)."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # not a TCP socket; nothing to tune


def guard_reactor_race(assoc: object, in_flight: Callable[[], bool]) -> None:
    """Give C-STORE responses stolen by pynetdicom's reactor back to the waiting send_c_store.

    pynetdicom 3.0's reactor pause has a check-then-act gap: now and then the reactor thread takes
    the response off the DIMSE queue ("Received unexpected C-STORE service message"), the sender
    hits the DIMSE timeout and the association is aborted although the PACS stored the instance.
    While a request is in flight we put such a message back on the queue.
    """
    original = getattr(assoc, "_serve_request", None)
    queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if original is None or queue is None:
        return

    def serve(msg: object, context_id: int) -> None:
        if in_flight() and not getattr(msg, "is_valid_request", True):
            queue.put((context_id, msg))
            log.debug("gave a DIMSE response taken by the pynetdicom reactor back to the sender")
            return
        original(msg, context_id)

    assoc._serve_request = serve  # type: ignore[attr-defined]


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
        self.permanent = False  # the open failed in a way a retry cannot change
        self._in_flight = False
        self._msg_id = 0
        self._lost: str | None = None

    def _on_conn_open(self, event: evt.Event) -> None:
        self._peer.connected = True
        set_nodelay(event.assoc)

    def _on_acse(self, event: evt.Event) -> None:
        prim = event.primitive
        if isinstance(prim, A_ASSOCIATE) and prim.result in (0x01, 0x02):
            self._peer.rejection = f"{prim.result_str}, source: {prim.source_str}, reason: {prim.reason_str}"
            self._peer.rejected_permanently = rejection_is_permanent(
                prim.result, prim.result_source, prim.diagnostic
            )
        elif isinstance(prim, A_ABORT | A_P_ABORT):
            src = getattr(prim, "abort_source", None)
            reason = getattr(prim, "provider_reason", None)
            self._peer.abort = f"abort source {src}" + (f", reason {reason}" if reason is not None else "")

    def _on_pdu_recv(self, event: evt.Event) -> None:
        if isinstance(event.pdu, A_ASSOCIATE_RJ):  # the DUL thread sees it even if a close races it
            rj = event.pdu
            self._peer.rejection = f"{rj.result_str}, source: {rj.source_str}, reason: {rj.reason_str}"
            self._peer.rejected_permanently = rejection_is_permanent(
                rj.result, rj.source, rj.reason_diagnostic
            )
        elif isinstance(event.pdu, A_ABORT_RQ):  # seen in the DUL thread, before the DIMSE wait ends
            self._peer.abort = f"A-ABORT, source {event.pdu.source}, reason {event.pdu.reason_diagnostic}"
            self._wake_sender()

    def _on_conn_close(self, event: evt.Event) -> None:
        if self._in_flight:
            self._peer.abort = self._peer.abort or "connection closed by the peer"
            self._wake_sender()

    def _wake_sender(self) -> None:
        """A request in flight will get no answer: end its DIMSE wait now instead of at the timeout."""
        queue = getattr(getattr(self.assoc, "dimse", None), "msg_queue", None)
        if self._in_flight and queue is not None:
            queue.put((None, None))

    def open(self) -> str | None:
        """Associate; returns None when established, else the reason it failed (for the audit)."""
        handlers = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_ACSE_RECV, self._on_acse),
            (evt.EVT_PDU_RECV, self._on_pdu_recv),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        try:
            tls_args = (client_context(self.dest.tls), self.dest.host) if self.dest.tls else None
            self.assoc = self.ae.associate(
                self.dest.host,
                self.dest.port,
                ae_title=self.dest.ae_title,
                evt_handlers=handlers,
                tls_args=tls_args,
            )
        except Exception as exc:  # bad host name, unreadable certificate: raised before connecting
            self.error = f"cannot associate with {self.where}: {exc}"
            return self.error
        if self.assoc.is_established:
            guard_reactor_race(self.assoc, lambda: self._in_flight)
            return None
        if self._peer.rejection:
            self.error = f"association rejected by {self.where} ({self._peer.rejection})"
            self.permanent = self._peer.rejected_permanently
        elif not self._peer.connected:
            why = "connection refused, unreachable or timed out"
            if self.dest.tls:
                why += ", or the TLS handshake failed (certificate not trusted?)"
            self.error = f"cannot connect to {self.where} ({why})"
        elif self.assoc.is_aborted and self._peer.abort:
            self.error = f"association aborted by {self.where} ({self._peer.abort})"
        elif self.assoc.is_aborted and not self.assoc.accepted_contexts:
            self.error = f"{self.where} accepted none of the proposed presentation contexts"
            self.permanent = True
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
        if self._lost or not self.established:
            return self._ended()
        try:
            ds = pydicom.dcmread(info.path)
        except Exception as exc:
            return StoreResult(False, None, f"cannot read output file {info.path.name}: {exc}")
        self._msg_id = self._msg_id % 65535 + 1
        self._in_flight = True
        try:
            rsp = self.assoc.send_c_store(ds, msg_id=self._msg_id)  # type: ignore[union-attr]
        except ValueError as exc:
            ts = UID(info.transfer_syntax_uid)
            return StoreResult(
                False,
                None,
                f"{self.where} did not accept SOP class {info.sop_class_uid} with {ts.name}: {exc}",
                permanent=True,
            )
        except RuntimeError:  # the association ended between the check above and the call
            return self._ended()
        except AttributeError as exc:
            return StoreResult(False, None, f"cannot send {info.path.name} to {self.where}: {exc}")
        finally:
            self._in_flight = False
        status = getattr(rsp, "Status", None)
        if status is None:
            if self._peer.abort is not None:
                why = f"association aborted by {self.where} during C-STORE ({self._peer.abort})"
            else:
                why = f"no C-STORE response from {self.where} within {self.timeout:g} s"
            self._lost = why
            return StoreResult(False, None, why)
        return classify_status(int(status))

    def _ended(self) -> StoreResult:
        why = self._lost or self._peer.abort or "no longer established"
        return StoreResult(False, None, f"association with {self.where} ended before sending ({why})")

    def close(self) -> str:
        """Release (or note the abort); returns the association's final state."""
        if self._peer.rejection or (self.assoc is not None and self.assoc.is_rejected):
            return "rejected"
        if self.assoc is None:
            return "aborted"  # never connected; the reason says so
        if self._lost or self._peer.abort:
            if self.assoc.is_established:
                self.assoc.abort()
            return "aborted"
        if self.assoc.is_established:
            self.assoc.release()
            return "released"
        return "aborted"

    def __enter__(self) -> StoreSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.assoc is not None and self.assoc.is_established:
            if exc[0] is not None:
                self._lost = self._lost or "aborted locally after an error"
            self.close()
