"""The receive stage's acceptor transport: bounded, timed and event driven around pynetdicom's protocol code.

pynetdicom (3.0) as an acceptor trusts its peer: it allocates whatever length a PDU header
declares, reads without a timeout, counts associations from accept against one global limit and
holds a connection's thread until the ACSE timeout even after the peer left, and its upper-layer
and association loops poll (sleep a millisecond, look again), so idle connections burn CPU.
This module keeps pynetdicom's state machine, ACSE and DIMSE code and replaces what surrounds them:

- a PDU whose declared length exceeds what the node negotiated (P-DATA: ``node.max_pdu_size``;
  association PDUs 1 MiB; release and abort 64 bytes) ends the association before its body is
  read; so does a C-STORE data set over ``node.max_dataset_mb`` or a command over 64 KiB;
- every socket read carries the network timeout, so a peer that stops mid-PDU is dropped;
- connections are counted from accept, in total and per address (:class:`ConnectionSlots`);
  over a limit the peer gets A-ASSOCIATE-RJ (transient, local limit exceeded) and is closed;
  a slot is free again the moment its connection ends;
- the upper-layer thread blocks in ``poll()`` on its socket and an eventfd rung by its queues,
  the association thread waits on an Event rung by the upper layer: idle connections cost no CPU
  (only for 50 ms after a PDU does the upper layer look every 0.2 ms, see ACTIVE_LINGER);
- the TLS handshake runs in the connection's own thread under the ACSE timeout, never in the
  thread that accepts connections;
- each association request goes through the node's admission policy;
- a P-DATA-TF is split into views of the buffer it was read into (no copies), C-STORE requests
  and responses are read and written without pydicom (:mod:`.store_messages`), and pynetdicom's
  debug-line handlers are unbound unless its logger is at DEBUG (they cost CPU even when silent);
- a complete C-STORE request is served by the upper-layer thread that read it (pynetdicom's
  storage service class and the stage's handler, then the response), not handed to the
  association thread and back: two thread wake-ups less per instance. The association thread
  still serves everything else (C-ECHO, release, abort, other services);
- the stage may stream each data set into a spool file while its fragments arrive
  (``open_dataset_file`` on the policy), so the disk is writing while the network still is.
Whole PDUs are read with ``recv_into`` into one buffer and TCP_NODELAY is on, so the small
C-STORE-RSP does not wait for the peer's delayed ACK.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AddressInformation, AssociationSocket, ThreadedAssociationServer

from dicomnode.config import NodeConfig
from dicomnode.receive.policy import ConnectionSlots, Refusal
from dicomnode.receive.store_messages import StoreDIMSEProvider

log = logging.getLogger("dicomnode.receive")

ASSOCIATE_PDU_LIMIT = 1 << 20  # A-ASSOCIATE-RQ/AC/RJ: 128 contexts with every transfer syntax fit
SMALL_PDU_LIMIT = 64  # A-RELEASE-RQ/RP and A-ABORT have a 4-byte body
COMMAND_LIMIT = 64 * 1024  # a DIMSE command set is a few hundred bytes
MAX_REFUSING = 16  # connections being refused at once; more are closed without an answer
_PDU_HEADER = struct.Struct(">BBL")
_WAIT_CAP = 5.0  # seconds: the longest any loop here sleeps without a reason to wake
# While PDUs flow, the upper layer looks again every 0.2 ms (as pynetdicom always does) instead of
# blocking: on a virtual machine a blocked process's vCPU halts, and every wake-up (the next PDU, the
# fsync that ends a C-STORE) then costs more than the look. 50 ms after the last PDU it blocks.
ACTIVE_LINGER = 0.05
ACTIVE_POLL = 0.0002
# Looking instead of blocking only pays while a core would otherwise idle: with more associations
# busy than spare cores, the looks of each steal the CPU the others need. So at most this many
# associations of a process look at once; the others block in poll() (their cores are not idle).
LOOKING_SLOTS = max(1, (os.cpu_count() or 1) - 1)
_LOOKING = threading.BoundedSemaphore(LOOKING_SLOTS)
_DEBUG_HANDLERS = (
    (evt.EVT_DIMSE_RECV, standard_dimse_recv_handler),
    (evt.EVT_DIMSE_SENT, standard_dimse_sent_handler),
    (evt.EVT_PDU_RECV, standard_pdu_recv_handler),
    (evt.EVT_PDU_SENT, standard_pdu_sent_handler),
)


@dataclass(frozen=True)
class TransportLimits:
    """The bounds one connection lives within (from ``node.*``)."""

    max_pdu: int
    max_dataset_bytes: int
    acse_timeout: float
    dimse_timeout: float
    network_timeout: float
    max_associations: int
    max_per_address: int

    @classmethod
    def from_config(cls, node: NodeConfig) -> TransportLimits:
        return cls(
            max_pdu=node.max_pdu_size,
            max_dataset_bytes=node.max_dataset_mb * 1024 * 1024,
            acse_timeout=node.acse_timeout_seconds,
            dimse_timeout=node.dimse_timeout_seconds,
            network_timeout=node.network_timeout_seconds,
            max_associations=node.max_associations,
            max_per_address=node.max_associations_per_address,
        )

    def pdu_limit(self, pdu_type: int) -> int | None:
        """The largest body a PDU of this type may declare; None for an unknown type."""
        if pdu_type == 0x04:
            return self.max_pdu
        if pdu_type in (0x01, 0x02, 0x03):
            return ASSOCIATE_PDU_LIMIT
        if pdu_type in (0x05, 0x06, 0x07):
            return SMALL_PDU_LIMIT
        return None


class AcceptorPolicy(Protocol):
    """What the transport asks of the receive stage: admission, and where refusals are written.

    A policy may also have ``open_dataset_file(assoc, context_id, request)`` (see
    :class:`.store_messages.StoreDIMSEProvider`): a sink each data set is written to as it arrives."""

    def admit(self, calling_aet: str, called_aet: str, address: str) -> Refusal | None: ...

    def connection_refused(
        self, address: str, port: int, reason: str, calling_aet: str = "", called_aet: str = ""
    ) -> None: ...

    def protocol_violation(self, assoc: Association, reason: str, accepted: bool) -> None: ...


class _RingingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that rings a bell on every put, so that its reader can sleep instead of polling."""

    def __init__(self, ring: Callable[[], None]) -> None:
        super().__init__()
        self._ring = ring

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._ring()


class BoundedSocket(AssociationSocket):
    """Whole-PDU reads into one buffer; readiness by ``poll`` (no 1024-descriptor limit of select)."""

    def recv(self, nr_bytes: int) -> bytearray:
        buf = bytearray(nr_bytes)
        got = self.recv_into(memoryview(buf))
        return buf if got == nr_bytes else buf[:got]

    def recv_into(self, view: memoryview, deadline: float | None = None) -> int:
        """Fill ``view``; returns fewer bytes only when the peer closed. TimeoutError when a read
        waits longer than the socket's timeout or, with ``deadline`` (monotonic), the whole is late."""
        sock = self.socket
        assert sock is not None
        timeout = sock.gettimeout()
        got, total = 0, len(view)
        try:
            while got < total:
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError("deadline passed")
                    sock.settimeout(left if timeout is None else min(left, timeout))
                n = sock.recv_into(view[got:], total - got)
                if not n:
                    break
                got += n
        finally:
            if deadline is not None:
                sock.settimeout(timeout)
        return got

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or not self._is_connected:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            poller = select.poll()
            poller.register(sock, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            self.event_queue.put("Evt17")
            return False


class BoundedDUL(DULServiceProvider):
    """The upper layer of one acceptor connection: checked PDU lengths, blocking waits, one line a problem."""

    def __init__(self, assoc: AcceptorAssociation, limits: TransportLimits) -> None:
        super().__init__(assoc)
        self._limits = limits
        self._wake_lock = threading.Lock()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.event_queue = _RingingQueue(self.wake)
        self.to_provider_queue = _RingingQueue(self.wake)
        self.to_user_queue = _RingingQueue(assoc.ring)
        self.opened = False  # the state machine has left Sta1 (the connection was taken on)
        self.violation: str | None = None
        self.mid_pdu = False  # a PDU has started to arrive and is not complete yet
        self._active_until = 0.0  # monotonic time until which the loop looks instead of blocking
        self._looking = False  # holds one of the LOOKING_SLOTS
        self._command_bytes = 0
        self._dataset_bytes = 0
        self._command_started = 0.0
        self._dataset_started = 0.0

    # -- waking -----------------------------------------------------------------------------

    def wake(self) -> None:
        """Wake the upper-layer thread if it waits in poll()."""
        with self._wake_lock:
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def _close_wake(self) -> None:
        with self._wake_lock:
            fd, self._wake_fd = self._wake_fd, -1
        if fd >= 0:
            os.close(fd)

    def kill_dul(self) -> None:
        self._kill_thread = True
        self.wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state != "Sta1":
            return False
        self.kill_dul()
        if threading.current_thread() is not self and self.is_alive():
            self.join(timeout=_WAIT_CAP)
        return True

    # -- the loop ---------------------------------------------------------------------------

    def run_reactor(self) -> None:
        """pynetdicom's DUL loop, sleeping in poll() whenever there is nothing to do."""
        self._idle_timer.start()
        poller = select.poll()
        with self._wake_lock:
            poller.register(self._wake_fd, select.POLLIN)
        watched = -1
        self.assoc._dul_ready.set()
        try:
            while not self._kill_thread:
                if self.artim_timer.expired:
                    if self.state_machine.current_state == "Sta2":
                        self.note_violation(
                            f"no association request within {self.artim_timer.timeout:g} s "
                            "(node.acse_timeout_seconds)"
                        )
                    self.event_queue.put("Evt18")
                try:
                    if self._process_recv_primitive():
                        pass
                    elif self._is_transport_event():
                        self._idle_timer.restart()
                    try:
                        event = self.event_queue.get_nowait()
                    except queue.Empty:
                        watched = self._watch(poller, watched)
                        self._sleep(poller, watched)
                        continue
                    before = self.state_machine.current_state
                    self.state_machine.do_action(event)
                    self._active_until = time.monotonic() + ACTIVE_LINGER
                except Exception as exc:  # a broken peer must not leave a half-dead thread behind
                    self._give_up(exc)
                    return
                if self.state_machine.current_state != "Sta1":
                    self.opened = True
                if self.state_machine.current_state != before:
                    # The association thread may wait for this state change. Nothing else it waits
                    # for needs a ring from here: the queues it reads ring on every put, so a
                    # P-DATA fragment (Sta6 to Sta6) does not wake it, only a complete message does.
                    self.assoc.ring()
        finally:
            self._stop_looking()
            self._close_wake()
            dimse = self.assoc.dimse
            if isinstance(dimse, StoreDIMSEProvider):
                dimse.discard_streamed()  # a data set that will never be completed
            self.assoc.ring()

    def _stop_looking(self) -> None:
        if self._looking:
            self._looking = False
            _LOOKING.release()

    def _watch(self, poller: select.poll, watched: int) -> int:
        sock = self.socket.socket if self.socket is not None else None
        fd = sock.fileno() if sock is not None else -1
        if fd != watched:
            if watched >= 0:
                try:
                    poller.unregister(watched)
                except KeyError:
                    pass
            if fd >= 0:
                poller.register(fd, select.POLLIN | select.POLLPRI)
        return fd

    def _sleep(self, poller: select.poll, watched: int) -> None:
        if time.monotonic() < self._active_until:
            if self._looking or _LOOKING.acquire(blocking=False):
                self._looking = True
                time.sleep(ACTIVE_POLL)
                return
        else:
            self._stop_looking()
        timer = self.artim_timer
        running = timer.timeout is not None and timer._start_time is not None and timer._end_time is None
        timeout = min(max(timer.remaining, 0.0), _WAIT_CAP) if running else _WAIT_CAP
        for fd, mask in poller.poll(int(timeout * 1000) + 1):
            if fd == watched and mask & select.POLLNVAL:
                poller.unregister(fd)
            elif fd != watched:
                try:
                    os.eventfd_read(fd)
                except (BlockingIOError, OSError):
                    pass

    def _give_up(self, exc: Exception) -> None:
        """After an unexpected error: abort hard, as pynetdicom does, but in one line."""
        self.note_violation(f"upper layer error: {type(exc).__name__}: {exc}")
        log.debug("upper layer error", exc_info=True)
        sock = self.socket
        if sock is not None and sock.socket is not None:
            try:
                sock.socket.sendall(b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x00")  # A-ABORT, provider
            except OSError:
                pass
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True

    # -- reading PDUs -----------------------------------------------------------------------

    def note_violation(self, reason: str) -> None:
        """Remember the first protocol problem of this connection: its end reason, reported at the end."""
        if self.violation is None:
            self.violation = reason

    def _read_pdu_data(self) -> None:
        sock = self.socket
        assert isinstance(sock, BoundedSocket)
        head = bytearray(6)
        self.mid_pdu = True
        try:
            return self._read_pdu(sock, head)
        finally:
            self.mid_pdu = False

    def _read_pdu(self, sock: BoundedSocket, head: bytearray) -> None:
        deadline = time.monotonic() + self._limits.network_timeout  # for the whole PDU: no trickling
        try:
            if sock.recv_into(memoryview(head), deadline) < 6:
                self.event_queue.put("Evt17")  # closed by the peer
                return
            pdu_type, _, length = _PDU_HEADER.unpack(head)
            limit = self._limits.pdu_limit(pdu_type)
            if limit is None:
                self.note_violation(f"unknown PDU type 0x{pdu_type:02X}")
                self.event_queue.put("Evt19")
                return
            if length > limit:
                self.note_violation(
                    f"PDU type 0x{pdu_type:02X} declares {length} bytes, more than the {limit} "
                    "this node accepts"
                )
                self.event_queue.put("Evt19")
                return
            pdu = bytearray(6 + length)
            pdu[:6] = head
            got = sock.recv_into(memoryview(pdu)[6:], deadline)
        except TimeoutError:
            self.note_violation(
                f"stopped in the middle of a PDU: not complete after {self._limits.network_timeout:g} s "
                "(node.network_timeout_seconds)"
            )
            self.event_queue.put("Evt17")
            return
        except OSError as exc:
            log.debug("receive: connection error: %s", exc)
            self.event_queue.put("Evt17")
            return
        if got < length:
            self.event_queue.put("Evt17")  # the peer closed in the middle of a PDU
            return
        if pdu_type == 0x04:
            problem = self._count_message_bytes(pdu)
            if problem:
                self.note_violation(problem)
                self.event_queue.put("Evt19")
                return
        if pdu_type == 0x04 and not self._pdu_watched():
            items = _pdata_items(pdu)
            if items is None:
                self.note_violation("PDU type 0x04 cannot be decoded (its items do not fit its length)")
                self.event_queue.put("Evt19")
                return
            self.event_queue.put("Evt10")
            self._recv_pdu.put(_ReceivedPData(items))
            return
        try:
            decoded, event = self._decode_pdu(pdu)
        except Exception as exc:
            self.note_violation(f"PDU type 0x{pdu_type:02X} cannot be decoded ({type(exc).__name__})")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(decoded)

    def _pdu_watched(self) -> bool:
        """Whether a handler wants pynetdicom's decoded PDUs (then they are decoded its way)."""
        assoc = self.assoc
        return bool(assoc.get_handlers(evt.EVT_PDU_RECV) or assoc.get_handlers(evt.EVT_DATA_RECV))

    def _count_message_bytes(self, pdu: bytearray) -> str | None:
        """Add a P-DATA-TF's fragments to the command / data set being received; a reason when one
        grows past its size limit or has taken longer than the DIMSE timeout."""
        now = time.monotonic()
        pos, end = 6, len(pdu)
        while pos + 6 <= end:
            item_length = int.from_bytes(pdu[pos : pos + 4], "big")
            control = pdu[pos + 5]
            size = max(item_length - 2, 0)
            pos += 4 + item_length
            if control & 0x01:
                if self._command_bytes == 0:
                    self._command_started = now
                self._command_bytes += size
                if self._command_bytes > COMMAND_LIMIT:
                    return f"a DIMSE command of more than {COMMAND_LIMIT} bytes"
                started = self._command_started
                if control & 0x02:
                    self._command_bytes = 0
            else:
                if self._dataset_bytes == 0:
                    self._dataset_started = now
                self._dataset_bytes += size
                if self._dataset_bytes > self._limits.max_dataset_bytes:
                    return (
                        f"a data set of more than {self._limits.max_dataset_bytes // (1024 * 1024)} MB "
                        "(node.max_dataset_mb)"
                    )
                started = self._dataset_started
                if control & 0x02:
                    self._dataset_bytes = 0
            if now - started > self._limits.dimse_timeout:
                return (
                    f"a DIMSE message not complete after {self._limits.dimse_timeout:g} s "
                    "(node.dimse_timeout_seconds)"
                )
        return None


class _ReceivedPData:
    """A received P-DATA-TF as the state machine's data transfer actions use it (``to_primitive``)."""

    __slots__ = ("items",)

    def __init__(self, items: list[list[Any]]) -> None:
        self.items = items

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        # Views, not bytes (P_DATA's setter wants bytes): its reader, StoreDIMSEProvider, copies
        # a fragment to bytes before any of pynetdicom's code sees it.
        primitive._presentation_data_value_list = self.items  # type: ignore[assignment]
        return primitive


def _pdata_items(pdu: bytearray) -> list[list[Any]] | None:
    """The (context ID, fragment) items of a P-DATA-TF, each fragment a view into ``pdu`` (no
    copy); None when an item is shorter than its header or runs past the PDU."""
    view = memoryview(pdu)
    items: list[list[Any]] = []
    pos, end = 6, len(pdu)
    while pos < end:
        if pos + 6 > end:
            return None
        length = int.from_bytes(pdu[pos : pos + 4], "big")
        if length < 2 or pos + 4 + length > end:
            return None
        items.append([pdu[pos + 4], view[pos + 5 : pos + 4 + length]])
        pos += 4 + length
    return items


class AcceptorAssociation(Association):
    """An acceptor association that sleeps until something happens and hands its slot back when it ends."""

    def __init__(self, server: BoundedAssociationServer, address: str) -> None:
        super().__init__(server.ae, MODE_ACCEPTOR)
        self._server = server
        self.peer_address = address
        self.refusal: str | None = None
        self._bell = threading.Event()
        self._slot_returned = False
        self._accepted = False  # an A-ASSOCIATE-AC was sent
        # Set once negotiation is over and the EVT_ACCEPTED handlers have run (the stage records
        # the association there): the upper layer serves no C-STORE before.
        self._negotiated = threading.Event()
        limits = server.limits
        self.dul = BoundedDUL(self, limits)
        self.dimse = StoreDIMSEProvider(self)
        self.dimse.msg_queue = _RingingQueue(self.ring)
        self.dimse.serve_inline = self._serve_store
        open_dataset_file = getattr(server.policy, "open_dataset_file", None)
        if open_dataset_file is not None:
            self.dimse.open_dataset_file = lambda context_id, request: open_dataset_file(
                self, context_id, request
            )
        # The timers live on the upper layer: give the new one the node's timeouts.
        self.acse_timeout = limits.acse_timeout
        self.dimse_timeout = limits.dimse_timeout
        self.network_timeout = limits.network_timeout

    def _serve_store(self, context_id: int, request: C_STORE) -> bool:
        """Serve a complete C-STORE request in the upper-layer thread that received it, as
        pynetdicom's association thread would (its storage service class, the bound handler, the
        response); False leaves it to that thread (anything but a plain storage request on an
        accepted context of an established association)."""
        # The peer may send its first request the moment it has the A-ASSOCIATE-AC, while this
        # association's thread is still in the EVT_ACCEPTED handlers: wait for them.
        self._negotiated.wait(self.acse_timeout or _WAIT_CAP)
        context = self._accepted_cx.get(context_id)
        class_uid = request.AffectedSOPClassUID
        if (
            not self._negotiated.is_set()
            or not self.is_established
            or self._sent_release
            or self.is_aborted
            or context is None
            or class_uid in self.acceptor.accepted_common_extended
            or _config.UNRESTRICTED_STORAGE_SERVICE
            or uid_to_service_class(class_uid) is not StorageServiceClass
        ):
            streamed, request.streamed = getattr(request, "streamed", None), None
            if streamed is not None:  # that thread may never serve it: its data set stays in memory
                streamed.discard()
            return False
        StorageServiceClass(self).SCP(request, context)
        return True

    def ring(self) -> None:
        """Wake the association thread. A bell already rung is not rung again (set() takes a lock and
        notifies): its waiter clears it before it looks for work, so it sees what came before."""
        if not self._bell.is_set():
            self._bell.set()

    @property
    def violation(self) -> str | None:
        """The protocol problem that ended this association, if one did."""
        dul = self.dul
        return dul.violation if isinstance(dul, BoundedDUL) else None

    def kill(self) -> None:
        """pynetdicom's kill, waiting for the upper layer to reach Sta1 on the bell, not by polling."""
        self._reactor_checkpoint.set()
        self._kill = True
        self.is_established = False
        self._is_paused = True
        while self.dul.is_alive() and not self.dul.stop_dul():
            self._bell.wait(_WAIT_CAP)
            self._bell.clear()

    def run_reactor(self) -> None:
        try:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
            request = self._association_request()
            if request is None:
                self.kill()
                return
            self.requestor.primitive = request
            evt.trigger(self, evt.EVT_REQUESTED, {})
            calling, called = str(request.calling_ae_title).strip(), str(request.called_ae_title).strip()
            refusal = self._server.policy.admit(calling, called, self.peer_address)
            if refusal is not None:
                self.refusal = refusal.reason
                self.requestor.ae_title = calling
                self.acse.send_reject(refusal.result, refusal.source, refusal.diagnostic)
                self.is_rejected = True
                evt.trigger(self, evt.EVT_REJECTED, {})
                self.kill()
                return
            if not self.is_aborted and not self.is_rejected:
                self.acse.negotiate_association()
                self._accepted = self.is_established
            self._negotiated.set()
            if self.is_established:
                self._run_reactor()
        finally:
            self._negotiated.set()
            self._end()

    def _association_request(self) -> A_ASSOCIATE | None:
        """The peer's A-ASSOCIATE-RQ, or None when it left, sent garbage or said nothing in time."""
        dul = self.dul
        assert isinstance(dul, BoundedDUL)
        deadline = time.monotonic() + (self.acse_timeout or _WAIT_CAP)
        while True:
            self._bell.clear()
            if dul.peek_next_pdu() is not None:
                primitive = dul.receive_pdu(wait=False)
                if isinstance(primitive, A_ASSOCIATE):
                    return primitive
                return None
            if (dul.opened and dul.state_machine.current_state == "Sta1") or not dul.is_alive():
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                dul.note_violation(
                    f"no association request within {self.acse_timeout:g} s (node.acse_timeout_seconds)"
                )
                return None
            self._bell.wait(min(left, _WAIT_CAP))

    def _run_reactor(self) -> None:
        """pynetdicom's acceptor loop, waiting on the bell between events."""
        self._is_paused = False
        while not self._kill:
            self._bell.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]
                continue
            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # fires EVT_ACSE_RECV for the abort
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                assert isinstance(self.dul, BoundedDUL)
                where = "in the middle of a PDU" if self.dul.mid_pdu else "idle"
                self.dul.note_violation(
                    f"no data for {self.network_timeout:g} s, {where} (node.network_timeout_seconds)"
                )
                self.abort()
                self.kill()
                return
            idle_left = self.dul._idle_timer.remaining if self.network_timeout else _WAIT_CAP
            self._bell.wait(min(max(idle_left, 0.0), _WAIT_CAP))

    def _end(self) -> None:
        """Stop the upper layer, close the connection and free this connection's slot (once)."""
        dul = self.dul
        if dul.is_alive():
            dul.kill_dul()
            if threading.current_thread() is not dul:
                dul.join(timeout=_WAIT_CAP)
        sock = dul.socket
        if sock is not None and sock.socket is not None:
            self._server.shutdown_request(sock.socket)
        if not self._slot_returned:
            self._slot_returned = True
            self._server.slots.give_back(self.peer_address)
            if self.violation:
                self._server.policy.protocol_violation(self, self.violation, self._accepted)


def _recv_some(sock: socket.socket, n: int) -> bytes:
    """Up to ``n`` bytes (fewer when the peer closes or stalls past the socket's timeout)."""
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _drain(sock: socket.socket, limit: int) -> None:
    """Read and drop up to ``limit`` bytes, until the peer closes or stalls."""
    buf = bytearray(65536)
    left = limit
    while left > 0:
        n = sock.recv_into(buf, min(left, len(buf)))
        if not n:
            return
        left -= n


def _reject_pdu(refusal: Refusal) -> bytes:
    return bytes([0x03, 0, 0, 0, 0, 4, 0, refusal.result, refusal.source, refusal.diagnostic])


class BoundedAssociationServer(ThreadedAssociationServer):
    """Accepts connections within ConnectionSlots and serves each in its own thread."""

    def __init__(
        self,
        ae: Any,
        address: tuple[str, int],
        evt_handlers: list[Any],
        limits: TransportLimits,
        policy: AcceptorPolicy,
        ssl_context: ssl.SSLContext | None = None,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port  # read by server_bind, which the base class calls
        self.limits = limits
        self.policy = policy
        self.slots = ConnectionSlots(limits.max_associations, limits.max_per_address)
        self._refusing = 0
        self._refusing_lock = threading.Lock()
        super().__init__(
            ae,
            address,
            ae.ae_title,
            ae.supported_contexts,
            ssl_context=ssl_context,
            evt_handlers=evt_handlers,
        )
        self.daemon_threads = True

    def server_bind(self) -> None:
        """Bind; with ``reuse_port`` other receive processes of this user may bind the port too
        (SO_REUSEPORT: the kernel spreads incoming connections over their listening sockets)."""
        assert self.socket is not None
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def serve_in_background(self) -> BoundedAssociationServer:
        """Serve in a daemon thread (like ``AE.start_server(block=False)``); returns self."""
        thread = threading.Thread(target=self.serve_forever, name="dicomnode-receive-server", daemon=True)
        thread.start()
        self.ae._servers.append(self)  # so AE.shutdown() also stops it
        return self

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        return self.socket.accept()  # TLS is negotiated later, in the connection's own thread

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        refusal = self.slots.take(host)
        if refusal is not None:
            with self._refusing_lock:
                busy = self._refusing >= MAX_REFUSING
                if not busy:
                    self._refusing += 1
            if busy:
                self.shutdown_request(request)
                self.policy.connection_refused(host, int(client_address[1]), refusal.reason)
                return
        name = f"dicomnode-connection-{host}:{client_address[1]}"
        threading.Thread(
            target=self._serve, args=(request, client_address, refusal), name=name, daemon=True
        ).start()

    def _serve(self, sock: socket.socket, client_address: Any, refusal: Refusal | None) -> None:
        host, port = str(client_address[0]), int(client_address[1])
        handed_over = False
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.limits.acse_timeout)
            if self.ssl_context is not None:
                tls = self._handshake(sock, host, port)
                if tls is None:
                    return
                sock = tls
            if refusal is not None:
                self._refuse(sock, host, port, refusal)
                return
            sock.settimeout(self.limits.network_timeout)
            assoc = self._create_association(sock, client_address)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": client_address})
            assoc.start()
            handed_over = True
        except Exception as exc:
            log.warning("receive: connection from %s:%d failed: %s: %s", host, port, type(exc).__name__, exc)
        finally:
            if not handed_over:
                self.shutdown_request(sock)
                if refusal is None:
                    self.slots.give_back(host)
                else:
                    with self._refusing_lock:
                        self._refusing -= 1

    def _handshake(self, sock: socket.socket, host: str, port: int) -> ssl.SSLSocket | None:
        assert self.ssl_context is not None
        tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or type(exc).__name__
            self.policy.connection_refused(host, port, f"TLS handshake failed ({reason})")
            self.shutdown_request(tls)
            return None
        return tls

    def _refuse(self, sock: socket.socket, host: str, port: int, refusal: Refusal) -> None:
        """A-ASSOCIATE-RJ for a peer over a connection limit: read its request's AE titles, answer, close."""
        calling = called = ""
        sock.settimeout(min(_WAIT_CAP, self.limits.acse_timeout))
        try:
            head = _recv_some(sock, 6)
            if len(head) == 6 and head[0] == 0x01:
                body = _recv_some(sock, 36)  # protocol version, reserved, called AE, calling AE
                called = body[4:20].decode("ascii", "replace").strip()
                calling = body[20:36].decode("ascii", "replace").strip()
            sock.sendall(_reject_pdu(refusal))
            sock.shutdown(socket.SHUT_WR)
            _drain(sock, ASSOCIATE_PDU_LIMIT)  # until the peer closes: no RST that could eat the RJ
        except OSError:
            pass
        self.policy.connection_refused(host, port, refusal.reason, calling, called)

    def _create_association(self, sock: socket.socket, client_address: Any) -> AcceptorAssociation:
        """pynetdicom's RequestHandler._create_association with the bounded classes."""
        assoc = AcceptorAssociation(self, str(client_address[0]))
        assoc.name = f"AcceptorThread@{datetime.now():%Y%m%d%H%M%S}"
        assoc.set_socket(BoundedSocket(assoc, client_socket=sock))
        ae = self.ae
        assoc.acceptor.maximum_length = self.limits.max_pdu
        assoc.acceptor.ae_title = self.ae_title
        assoc.acceptor.address_info = AddressInformation.from_tuple(self.server_address)
        assoc.acceptor.implementation_class_uid = ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = ae.implementation_version_name
        # Shared, not deep-copied as pynetdicom does (60-180 ms of CPU per connection with every
        # storage class and transfer syntax): negotiation only reads them and nothing here changes them.
        assoc.acceptor.supported_contexts = self.contexts
        assoc.requestor.address_info = AddressInformation.from_tuple(client_address)
        for event, handlers in self._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler, args in handlers:  # type: ignore[misc]
                    assoc.bind(event, handler, args)
        if not logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
            # pynetdicom's standard handlers only write debug lines, but they build them (and
            # decode every PDU and message for them) whether or not debug is on.
            for event, handler in _DEBUG_HANDLERS:
                assoc.unbind(event, handler)
        return assoc
