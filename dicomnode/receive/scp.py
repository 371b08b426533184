"""The receive stage: a pynetdicom C-ECHO / C-STORE SCP that spools instances durably and indexes them.

An instance is acknowledged with 0x0000 only after its file is durable in the spool and its
Instance row (with the Series upsert) is committed. The dataset is stored byte for byte as it
arrived; only its header is parsed.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
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
from dicomnode.receive.filemeta import encode_file_meta
from dicomnode.receive.header import HeaderError, parse_header
from dicomnode.receive.index import InstanceIndex
from dicomnode.receive.transport import start_threaded_server
from dicomnode.spool import Spool, incoming_path

log = logging.getLogger("dicomnode.receive")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000


@dataclass
class _AssocState:
    """What the stage remembers about one open association."""

    row_id: int | None
    calling_aet: str
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

    def __init__(self, settings: Settings, sessionmaker: sessionmaker[Session], spool: Spool) -> None:
        self.settings = settings
        self.spool = spool
        self.index = InstanceIndex(sessionmaker, receiver=f"{settings.storage.node_id}:{os.getpid()}")
        self.port: int | None = None
        self._server: Any = None
        self._claims = _UidClaims()
        self._assocs: dict[PynetAssociation, _AssocState] = {}
        self._assocs_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.maximum_pdu_size = node.max_pdu_size
        ae.require_calling_aet = list(node.allowed_calling_aets)
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
        ae = self._make_ae()
        shared = node.reuse_port or node.receive_processes > 1
        self._server = start_threaded_server(ae, (node.host, node.port), handlers, reuse_port=shared)
        self.port = int(self._server.server_address[1])
        log.info("receive: %s listening on %s:%d", node.ae_title, node.host, self.port)

    def stop(self) -> None:
        """Stop accepting, end the open associations and close the listening socket."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        for assoc in list(server.active_associations):
            assoc.abort()
        self.index.close()
        log.info("receive: stopped")

    # -- association policy and bookkeeping ------------------------------------------------

    @staticmethod
    def _peer(assoc: PynetAssociation) -> tuple[str, str, str, int]:
        req = assoc.requestor
        primitive = getattr(req, "primitive", None)
        called = str(getattr(primitive, "called_ae_title", "") or assoc.acceptor.ae_title).strip()
        return str(req.ae_title).strip(), called, str(req.address), int(req.port or 0)

    def _on_accepted(self, event: evt.Event) -> None:
        calling, called, host, port = self._peer(event.assoc)
        row_id: int | None = None
        try:
            row_id = self.index.open_association(calling, called, host, port)
        except Exception as exc:  # the DB is down: stores will fail with 0xA700 and say so
            log.error("receive: cannot record association from %s: %s", calling, exc)
        with self._assocs_lock:
            self._assocs[event.assoc] = _AssocState(row_id, calling)
        log.info("receive: association %s accepted from %s@%s:%d", row_id, calling, host, port)

    def _rejection_reason(self, calling: str, called: str) -> str:
        allowed = self.settings.node.allowed_calling_aets
        if allowed and calling not in allowed:
            return f"calling AE title {calling!r} is not in node.allowed_calling_aets"
        return f"association from {calling!r} to {called!r} rejected (too many associations or bad request)"

    def _on_rejected(self, event: evt.Event) -> None:
        calling, called, host, port = self._peer(event.assoc)
        reason = self._rejection_reason(calling, called)
        log.warning("receive: association from %s:%d rejected: %s", host, port, reason)
        try:
            self.index.reject_association(calling, called, host, port, reason)
        except Exception as exc:
            log.error("receive: cannot record rejected association: %s", exc)

    def _finish(self, assoc: PynetAssociation, state: str, reason: str) -> None:
        with self._assocs_lock:
            info = self._assocs.pop(assoc, None)
        if info is None:
            return
        log.info(
            "receive: association %s %s (%d stored, %d failed)",
            info.row_id,
            state,
            info.n_stored,
            info.n_failed,
        )
        if info.row_id is None:
            return
        try:
            self.index.close_association(info.row_id, state, info.n_stored, info.n_failed, reason)
        except Exception as exc:
            log.error("receive: cannot record end of association %s: %s", info.row_id, exc)

    def _on_released(self, event: evt.Event) -> None:
        self._finish(event.assoc, "released", "released by the peer")

    def _on_aborted(self, event: evt.Event) -> None:
        self._finish(event.assoc, "aborted", "aborted")

    def _on_conn_close(self, event: evt.Event) -> None:
        self._finish(event.assoc, "aborted", "connection closed without release")

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
        """Count, log and audit a refused instance; returns the failure status for the SCU."""
        self._count(assoc, ok=False)
        log.warning("receive: instance refused (0x%04X): %s", code, reason)
        try:
            self.index.event("instance", uid or "(unknown)", None, "failed", f"0x{code:04X}: {reason}")
        except Exception as exc:
            log.error("receive: cannot record failure event: %s", exc)
        return _status(code, reason)

    def _on_store(self, event: evt.Event) -> Dataset | int:
        try:
            return self._store(event)
        except Exception as exc:  # never let a bug turn into a silent 0xC211 without an event
            log.exception("receive: unexpected error while storing an instance")
            return self._fail(event.assoc, STATUS_OUT_OF_RESOURCES, "", f"internal error: {exc}")

    def _store(self, event: evt.Event) -> Dataset | int:
        assoc = event.assoc
        req = event.request
        ts = str(event.context.transfer_syntax)
        sop_class = str(req.AffectedSOPClassUID or "")
        sop_uid = str(req.AffectedSOPInstanceUID or "")
        raw = req.DataSet.getvalue() if req.DataSet is not None else b""
        try:
            header = parse_header(raw, ts, sop_class, sop_uid)
        except HeaderError as exc:
            return self._fail(assoc, STATUS_CANNOT_UNDERSTAND, sop_uid, str(exc))
        uid = header.sop_instance_uid
        info = self._assocs.get(assoc)
        calling = info.calling_aet if info else str(assoc.requestor.ae_title).strip()

        with self._claims.claim(uid):
            try:
                existing = self.index.known_path(uid)
            except Exception as exc:
                return self._fail(assoc, STATUS_OUT_OF_RESOURCES, uid, f"index unavailable: {exc}")
            if existing is not None:
                return self._duplicate(assoc, uid, calling)

            relpath = incoming_path(header.study_instance_uid, header.series_instance_uid, uid)
            prefix = encode_file_meta(sop_class or header.sop_class_uid, uid, ts, calling)
            try:
                size = self.spool.write(relpath, [prefix, raw])
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
                other = self.index.known_path(uid)
                if other != relpath:
                    self._remove(relpath)
                return self._duplicate(assoc, uid, calling)
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
