"""A faster pynetdicom acceptor transport: whole-PDU socket reads and a shorter DUL idle sleep.

pynetdicom reads PDUs in 4 KiB ``recv`` calls and sleeps 1 ms in its DUL loop whenever it is
idle; with 512 KiB CT instances both dominate the receive time. This keeps pynetdicom's
protocol machine and changes only how bytes are read and how long the DUL waits.
"""

from __future__ import annotations

import socket
import threading

from pynetdicom.association import Association
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from dicomnode.receive.shared_port import ReusePortMixin

DUL_IDLE_SLEEP = 0.0002  # seconds; pynetdicom's default is 0.001


class FastAssociationSocket(AssociationSocket):
    """``recv`` that fills the whole PDU with ``recv_into`` instead of 4 KiB appends."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:  # connection broken: return what arrived, as pynetdicom does
                del view
                return buf[:got]
            got += n
        return buf


class FastRequestHandler(RequestHandler):
    """Creates acceptor associations that use FastAssociationSocket and a short DUL sleep."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            sock.__class__ = FastAssociationSocket
        if sock is not None and sock.socket is not None:
            # pynetdicom leaves Nagle on: the small C-STORE-RSP would wait for the peer's delayed ACK.
            sock.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assoc.dul._run_loop_delay = DUL_IDLE_SLEEP
        return assoc


class SharedPortServer(ReusePortMixin, ThreadedAssociationServer):
    """A ThreadedAssociationServer whose port other receive processes may bind too."""


def start_threaded_server(
    ae: object, address: tuple[str, int], evt_handlers: list[object], reuse_port: bool = False
) -> ThreadedAssociationServer:
    """Like ``AE.start_server(block=False)`` but with FastRequestHandler (and SO_REUSEPORT if asked)."""
    server_class = SharedPortServer if reuse_port else ThreadedAssociationServer
    server = server_class(
        ae,  # type: ignore[arg-type]
        address,
        ae.ae_title,  # type: ignore[attr-defined]
        ae.supported_contexts,  # type: ignore[attr-defined]
        evt_handlers=evt_handlers,  # type: ignore[arg-type]
        request_handler=FastRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, name="dicomnode-receive-server", daemon=True)
    thread.start()
    ae._servers.append(server)  # type: ignore[attr-defined]  # so AE.shutdown() also stops it
    return server
