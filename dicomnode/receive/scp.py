"""The receive stage: a pynetdicom C-ECHO / C-STORE SCP that spools instances durably and indexes them.

An instance is acknowledged with 0x0000 only after its file is durable in the spool and its
Instance row (with the Series upsert) is committed. The dataset is stored byte for byte as it
arrived; only its header is parsed. On the node's own acceptor the data set is written to a spool
partial file while its fragments arrive (:meth:`ReceiveStage.open_dataset_file`) and given its
name only once the complete header is checked; a refused or abandoned one is removed. The same
store path takes the C-STORE sub-operations of a C-GET the node itself requested
(``adopt_retrieve_association``), so retrieved instances get the same durability, index rows and
audit as sent ones. A SOP Instance UID that arrives again with the same data set is a duplicate;
with a different one the new data set is kept in quarantine (file, row, event), never dropped and
never written over the first. Refusals (of instances, associations and broken connections) are
each one audit record and one log line, limited per peer (:mod:`.refusals`).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import AllTransferSyntaxes
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association as PynetAssociation
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.config import Settings
from dicomnode.db.leases import WorkerLeases, close_orphaned_associations
from dicomnode.logs import log_context
from dicomnode.partial_writes import sweep_partials
from dicomnode.receive.filemeta import encode_file_meta, stored_dataset_is
from dicomnode.receive.header import HeaderError, InstanceHeader, parse_header
from dicomnode.receive.index import InstanceIndex
from dicomnode.receive.policy import Refusal, admission
from dicomnode.receive.refusals import RefusalLimiter, quiet_library_logs
from dicomnode.receive.transport import BoundedAssociationServer, TransportLimits
from dicomnode.spool import PartialFile, Spool, incoming_path, quarantine_path
from dicomnode.tls import server_context

log = logging.getLogger("dicomnode.receive")

# Rate-limit kinds whose records are written in full elsewhere: only their log lines are limited.
_ENDED = "association ended by a protocol problem"
_INTERNAL = "internal error"
_LOG_ONLY = frozenset({_ENDED, _INTERNAL})

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass
class _AssocState:
    """What the stage remembers about one open association."""

    row_id: int | None
    calling_aet: str
    host: str = ""
    n_stored: int = 0
    n_failed: int = 0


class _UidClaims:
    """In-process claims on SOP Instance UIDs so that one UID is stored by one thread at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._held: set[str] = set()

    @contextmanager
    def claim(self, uid: str) -> Iterator[None]:
        with self._cond:
            while uid in self._held:
                self._cond.wait()
            self._held.add(uid)
        try:
            yield
        finally:
            with self._cond:
                self._held.discard(uid)
                self._cond.notify_all()


class _StreamedDataSet:
    """A data set written to a spool partial file while it arrives, behind its File Meta header."""

    __slots__ = ("part", "prefix")

    def __init__(self, part: PartialFile, prefix: bytes) -> None:
        self.part = part
        self.prefix = prefix
        part.write(prefix)

    def write(self, fragment: memoryview | bytes) -> None:
        self.part.write(fragment)

    def finish(self) -> None:
        """The last fragment arrived: its pages go to disk while the header is checked."""
        self.part.start_writeback()

    def discard(self) -> None:
        self.part.discard()


def _status(code: int, comment: str = "") -> Dataset | int:
    """A C-STORE response status, with an Error Comment (LO, 64 chars) for failures."""
    if not comment:
        return code
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class ReceiveStage:
    """C-ECHO and C-STORE SCP on settings.node.host:port; writes spool files and index rows."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: sessionmaker[Session],
        spool: Spool,
        *,
        leases: WorkerLeases | None = None,
    ) -> None:
        self.settings = settings
        self.spool = spool
        self.sessionmaker = sessionmaker
        self._own_leases = leases is None
        self.leases = leases or WorkerLeases(
            sessionmaker, settings.workers.lease_seconds, settings.workers.worker_id, stages=("receive",)
        )
        self.index = InstanceIndex(sessionmaker, receiver=f"{settings.storage.node_id}:{os.getpid()}")
        self.port: int | None = None
        self._server: BoundedAssociationServer | None = None
        self._claims = _UidClaims()
        self._assocs: dict[PynetAssociation, _AssocState] = {}
        self._assocs_lock = threading.Lock()
        self.refusals = RefusalLimiter()

    # -- lifecycle -------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        # Connections are limited by the transport's ConnectionSlots; pynetdicom's own count never binds.
        ae.maximum_associations = 2 * node.max_associations
        ae.add_supported_context(Verification)
        syntaxes = list(AllTransferSyntaxes)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        return ae

    def start(self) -> None:
        """Start the SCP in background threads (non-blocking); sets ``port`` to the bound port."""
        if self._server is not None:
            raise RuntimeError("receive stage already started")
        node = self.settings.node
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        self.leases.start()
        self.remove_leftovers()
        self.leases.add_sweep(self.remove_leftovers)
        quiet_library_logs()
        tls = server_context(node.tls) if node.tls is not None else None
        limits = TransportLimits.from_config(node)
        shared = node.reuse_port or node.receive_processes > 1
        self._server = BoundedAssociationServer(
            self._make_ae(), (node.host, node.port), handlers, limits, self, tls, reuse_port=shared
        ).serve_in_background()
        self.port = int(self._server.server_address[1])
        log.info(
            "receive: %s listening on %s:%d%s", node.ae_title, node.host, self.port, " (TLS)" if tls else ""
        )

    def remove_leftovers(self) -> None:
        """Close inbound associations and remove partial writes of receivers whose lease expired."""
        try:
            with self.sessionmaker() as s:
                close_orphaned_associations(s, self.leases.clock(), "in", "receive")
            sweep_partials(self.sessionmaker, self.spool.root, self.leases)
        except Exception as exc:  # the DB is busy or down: the next sweep tries again
            log.warning("receive: cannot clean up after stopped receivers: %s", exc)

    def stop(self) -> None:
        """Stop accepting, end the open associations and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        self._write_summaries(flush_all=True)
        # Abort in parallel: each abort may wait up to the ACSE timeout for its peer to close.
        aborts = [threading.Thread(target=a.abort, daemon=True) for a in server.active_associations]
        for t in aborts:
            t.start()
        for t in aborts:
            t.join(timeout=self.settings.node.acse_timeout_seconds + 5)
        self._write_summaries(flush_all=True)
        self.index.close()
        if self._own_leases:
            self.leases.stop()
        log.info("receive: stopped")

    # -- association policy (called by the transport) and bookkeeping -----------------------

    def admit(self, calling_aet: str, called_aet: str, address: str) -> Refusal | None:
        """The admission decision for one association request (see :func:`policy.admission`)."""
        return admission(self.settings, calling_aet, called_aet, address)

    def connection_refused(
        self, address: str, port: int, reason: str, calling_aet: str = "", called_aet: str = ""
    ) -> None:
        """A connection closed before any association (over a limit, failed TLS): audited, rate-limited."""
        self._reject(calling_aet, called_aet, address, port, reason, kind="connection")

    def protocol_violation(self, assoc: PynetAssociation, reason: str, accepted: bool) -> None:
        """A connection ended because its peer broke the protocol or a limit (reported once, at its end).

        An accepted association's row was closed with this reason; one that never got that far is
        recorded as a rejected connection."""
        calling, called, host, port = self._peer(assoc)
        if accepted:
            if self.refusals.allow(host, _ENDED, reason):
                log.warning("receive: association from %s@%s:%d ended: %s", calling, host, port, reason)
            self._write_summaries()
            return
        reason = f"connection ended before association: {reason}"
        self._reject(calling, called, host, port, reason, "protocol")

    def _reject(self, calling: str, called: str, host: str, port: int, reason: str, kind: str) -> None:
        if self.refusals.allow(host, kind, reason):
            log.warning("receive: %s:%d refused: %s", host, port, reason)
            try:
                self.index.reject_association(calling, called, host, port, reason)
            except Exception as exc:
                log.error("receive: cannot record rejected association: %s", exc)
        self._write_summaries()

    def _write_summaries(self, flush_all: bool = False) -> None:
        """One event and one log line for each peer whose refusals were counted but not written."""
        for summary in self.refusals.due(flush_all):
            log.warning("receive: %s", summary.reason)
            if summary.kind in _LOG_ONLY:
                continue  # their records are written in full elsewhere (association rows, instance events)
            entity, state = (
                ("instance", "failed") if summary.kind.startswith("instance") else ("association", "rejected")
            )
            try:
                self.index.event(entity, summary.peer, None, state, summary.reason)
            except Exception as exc:
                log.error("receive: cannot record refusal summary: %s", exc)

    @staticmethod
    def _peer(assoc: PynetAssociation) -> tuple[str, str, str, int]:
        req = assoc.requestor
        primitive = getattr(req, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", "") or assoc.acceptor.ae_title).strip()
        calling = str(getattr(primitive, "calling_ae_title", "") or req.ae_title).strip()
        return calling, called, str(req.address), int(req.port or 0)

    def _on_accepted(self, event: evt.Event) -> None:
        calling, called, host, port = self._peer(event.assoc)
        row_id: int | None = None
        try:
            row_id = self.index.open_association(
                calling, called, host, port, self.leases.owner, self.leases.expiry()
            )
            self.leases.hold("association", [row_id])
        except Exception as exc:  # the DB is down: stores will fail with 0xA700 and say so
            log.error("receive: cannot record association from %s: %s", calling, exc)
        with self._assocs_lock:
            self._assocs[event.assoc] = _AssocState(row_id, calling, host)
        log_context.set(stage="receive", association_id=row_id)  # this association's thread
        log.info("receive: association %s accepted from %s@%s:%d", row_id, calling, host, port)

    def _on_rejected(self, event: evt.Event) -> None:
        calling, called, host, port = self._peer(event.assoc)
        reason = (
            getattr(event.assoc, "refusal", None) or f"association from {calling!r} to {called!r} rejected"
        )
        self._reject(calling, called, host, port, reason, kind="association")

    def _finish(self, assoc: PynetAssociation, state: str, reason: str) -> None:
        with self._assocs_lock:
            info = self._assocs.pop(assoc, None)
        if info is None:
            return
        violation = getattr(assoc, "violation", None)
        if violation and state != "released":
            reason = violation
        log.info(
            "receive: association %s %s (%d stored, %d failed)",
            info.row_id,
            state,
            info.n_stored,
            info.n_failed,
        )
        self._write_summaries()
        if info.row_id is None:
            return
        self.leases.drop("association", [info.row_id])
        try:
            self.index.close_association(info.row_id, state, info.n_stored, info.n_failed, reason)
        except Exception as exc:
            log.error("receive: cannot record end of association %s: %s", info.row_id, exc)

    def adopt_retrieve_association(self, assoc: PynetAssociation, peer_aet: str) -> None:
        """Take the C-STORE sub-operations of a C-GET on ``assoc`` (requested by the node, bound with
        ``retrieve_handlers``) through this stage's store path; recorded as an inbound association."""
        host, port = str(assoc.acceptor.address), int(assoc.acceptor.port or 0)
        row_id: int | None = None
        try:
            note = f"C-GET to {peer_aet}@{host}:{port}: its C-STORE sub-operations arrive here"
            row_id = self.index.open_association(
                peer_aet,
                self.settings.node.ae_title,
                host,
                port,
                self.leases.owner,
                self.leases.expiry(),
                note=note,
            )
            self.leases.hold("association", [row_id])
        except Exception as exc:
            log.error("receive: cannot record C-GET association with %s: %s", peer_aet, exc)
        with self._assocs_lock:
            self._assocs[assoc] = _AssocState(row_id, peer_aet, host)

    def retrieve_handlers(self) -> list[tuple[evt.EventType, Callable[[evt.Event], Any]]]:
        """Event handlers for an association the node requests for C-GET (see adopt_retrieve_association)."""
        return [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_aborted),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]

    def _on_released(self, event: evt.Event) -> None:
        self._finish(event.assoc, "released", "released by the peer")

    def _on_aborted(self, event: evt.Event) -> None:
        self._finish(event.assoc, "aborted", "aborted")

    def _on_conn_close(self, event: evt.Event) -> None:
        self._finish(event.assoc, "aborted", "connection closed without release")

    def open_dataset_file(
        self, assoc: PynetAssociation, context_id: int, request: Any
    ) -> _StreamedDataSet | None:
        """A spool partial file for the data set of a C-STORE whose first fragment just arrived
        (called by the transport's upper-layer thread). Its pages reach the disk while the rest
        arrives; :meth:`_store` places it once the header is checked, or discards it. None (the
        data set is then written after it arrived) when the spool cannot take it now."""
        context = assoc._accepted_cx.get(context_id)
        if context is None or not context.transfer_syntax:
            return None
        try:
            prefix = encode_file_meta(
                str(request.AffectedSOPClassUID),
                str(request.AffectedSOPInstanceUID),
                str(context.transfer_syntax[0]),
                self._peer(assoc)[0],
            )
            return _StreamedDataSet(self.spool.open_partial(), prefix)
        except Exception as exc:  # the store itself reports what is wrong with the spool
            log.debug("receive: no streamed spool file: %s", exc)
            return None

    # -- DIMSE services ---------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _count(self, assoc: PynetAssociation, ok: bool) -> _AssocState | None:
        info = self._assocs.get(assoc)
        if info is not None:
            if ok:
                info.n_stored += 1
            else:
                info.n_failed += 1
        return info

    def _fail(self, assoc: PynetAssociation, code: int, uid: str, reason: str) -> Dataset | int:
        """Count, log and audit (rate-limited per peer) a refused instance; returns the failure status."""
        self._count(assoc, ok=False)
        host = str(assoc.requestor.address)
        kind = f"instance 0x{code:04X}, {reason.split(':', 1)[0][:60]}"
        if self.refusals.allow(host, kind, reason):
            log.warning("receive: instance from %s refused (0x%04X): %s", host, code, reason)
            try:
                self.index.event("instance", uid or "(unknown)", None, "failed", f"0x{code:04X}: {reason}")
            except Exception as exc:
                log.error("receive: cannot record failure event: %s", exc)
        self._write_summaries()
        return _status(code, reason)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        if "association_id" not in log_context.get():  # served in the connection's upper-layer thread
            info = self._assocs.get(event.assoc)
            log_context.set(stage="receive", association_id=info.row_id if info else None)
        streamed = getattr(event.request, "streamed", None)
        try:
            return self._store(event, streamed)
        except Exception as exc:  # never let a bug turn into a silent 0xC211 without an event
            if self.refusals.allow("(node)", _INTERNAL):
                log.exception("receive: unexpected error while storing an instance")
            return self._fail(event.assoc, STATUS_OUT_OF_RESOURCES, "", f"internal error: {exc}")
        finally:
            if streamed is not None:
                streamed.discard()  # unless it was placed

    def _store(self, event: evt.Event, streamed: _StreamedDataSet | None = None) -> Dataset | int:
        assoc = event.assoc
        req = event.request
        ts = str(event.context.transfer_syntax)
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        raw = req.DataSet.getvalue() if req.DataSet is not None else b""
        try:
            header = parse_header(raw, ts, sop_class, sop_uid)
        except HeaderError as exc:
            return self._fail(assoc, STATUS_CANNOT_UNDERSTAND, sop_uid[:64], str(exc))
        uid = header.sop_instance_uid
        info = self._assocs.get(assoc)
        calling = info.calling_aet if info else str(assoc.requestor.ae_title).strip()
        prefix = encode_file_meta(sop_class or header.sop_class_uid, uid, ts, calling)

        with self._claims.claim(uid):
            try:
                existing = self.index.known_path(uid)
            except Exception as exc:
                return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"index unavailable: {exc}")
            if existing is not None:
                return self._again(assoc, header, existing, prefix, raw, ts, calling)

            wanted = incoming_path(header.study_instance_uid, header.series_instance_uid, uid)
            try:
                relpath, size = self._write_incoming(wanted, prefix, raw, streamed)
            except OSError as exc:
                return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"cannot write to the spool: {exc}")
            try:
                added = self.index.add_instance(
                    header,
                    relpath=relpath,
                    size=size,
                    transfer_syntax_uid=ts,
                    association_id=info.row_id if info else None,
                )
            except Exception as exc:
                self._remove(relpath)
                return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"cannot index the instance: {exc}")
            if not added:  # another process indexed the same UID between our check and insert
                self._remove(relpath)
                other = self.index.known_path(uid)
                if other is not None:
                    return self._again(assoc, header, other, prefix, raw, ts, calling)
                return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, "the index refused the instance")
        self._count(assoc, ok=True)
        return STATUS_SUCCESS

    def _write_incoming(
        self, wanted: str, prefix: bytes, raw: bytes, streamed: _StreamedDataSet | None
    ) -> tuple[str, int]:
        """The data set durably in the spool: its streamed partial file placed when that holds
        exactly these bytes, else (or when placing it fails short of a name clash) written anew."""
        if streamed is not None:
            part = streamed.part
            if part.ok and streamed.prefix == prefix and part.size == len(prefix) + len(raw):
                try:
                    return self.spool.place_partial(part, wanted)
                except FileExistsError:
                    raise
                except OSError as exc:
                    log.debug("receive: streamed spool file not placed (%s); writing it again", exc)
            streamed.discard()
        return self.spool.write_new(wanted, [prefix, raw])

    def _again(
        self,
        assoc: PynetAssociation,
        header: InstanceHeader,
        stored: str,
        prefix: bytes,
        raw: bytes,
        ts: str,
        calling: str,
    ) -> Dataset | int:
        """A SOP Instance UID already stored: a duplicate when the data set is the same, else quarantined."""
        uid = header.sop_instance_uid
        try:
            kept = [stored, *self.index.quarantined_paths(uid)]
        except Exception as exc:
            return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"index unavailable: {exc}")
        if any(stored_dataset_is(self.spool.abspath(path), raw) for path in kept):
            return self._duplicate(assoc, uid, calling)
        host = str(assoc.requestor.address)
        info = self._assocs.get(assoc)
        wanted = quarantine_path(header.study_instance_uid, header.series_instance_uid, uid)
        try:
            relpath, size = self.spool.write_new(wanted, [prefix, raw])
        except FileExistsError:
            return self._fail(
                assoc,
                STATUS_OUT_OF_RESOURCES,
                uid,
                "too many different data sets under this SOP Instance UID",
            )
        except OSError as exc:
            return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"cannot write to the spool: {exc}")
        reason = (
            f"SOP Instance UID already stored with a different data set (sent by {calling}@{host}): "
            f"kept as {relpath}, not used for fusion; the stored {stored} is unchanged"
        )
        try:
            self.index.add_quarantined(
                header,
                relpath=relpath,
                size=size,
                transfer_syntax_uid=ts,
                calling_aet=calling,
                peer_host=host,
                association_id=info.row_id if info else None,
                reason=reason,
            )
        except Exception as exc:
            self._remove(relpath)
            return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"cannot index the instance: {exc}")
        log.warning("receive: %s", reason)
        self._count(assoc, ok=True)
        return STATUS_SUCCESS

    def _duplicate(self, assoc: PynetAssociation, uid: str, calling: str) -> int:
        self._count(assoc, ok=True)
        log.info("receive: duplicate instance ignored (from %s)", calling)
        try:
            self.index.event(
                "instance",
                uid,
                "stored",
                "stored",
                f"duplicate ignored: SOP Instance UID already stored (sent again by {calling})",
            )
        except Exception as exc:
            log.error("receive: cannot record duplicate event: %s", exc)
        return STATUS_SUCCESS

    def _remove(self, relpath: str) -> None:
        try:
            self.spool.abspath(relpath).unlink(missing_ok=True)
        except OSError as exc:
            log.error("receive: cannot remove unindexed spool file: %s", exc)
