"""C-STORE messages read and written directly, beside pynetdicom's general DIMSE code.

pynetdicom decodes every command set with pydicom, copies each data set fragment into a
BytesIO, and encodes each response through a pydicom Dataset twice (group length, then the
message): for a C-STORE that is most of the network layer's CPU per instance. Here a C-STORE-RQ
command set is read element by element, its data set fragments are kept as they arrived and
joined once (and, when the stage asks for it, written to a spool file as they arrive), the
complete request can be served in the thread that received it (``serve_inline``), and the
C-STORE-RSP is written as bytes (the same bytes pydicom writes). Every
other message, any command set with an element this code does not expect, and any association
with handlers bound to the DIMSE events go through pynetdicom unchanged.
"""

from __future__ import annotations

import struct
from io import BytesIO
from typing import Any

from pynetdicom import _config, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_ELEMENT = struct.Struct("<HHI")
_US = struct.Struct("<H")
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
# (0000,eeee) elements a C-STORE-RQ may carry (PS3.7 9.3.1.1): any other goes to pynetdicom.
_RQ_ELEMENTS = frozenset({0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031})


def _text(value: bytes) -> str | None:
    """An ASCII UI/AE value without its padding; None when empty or not ASCII."""
    try:
        text = value.decode("ascii").rstrip("\x00 ").lstrip(" ")
    except UnicodeDecodeError:
        return None
    return text or None


def _us(value: bytes | None) -> int | None:
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def decode_store_request(command: bytes) -> C_STORE | None:
    """The C-STORE request primitive of a C-STORE-RQ command set that announces a data set, or
    None for anything else (another message, an unexpected element, a value pydicom would read
    differently): pynetdicom then decodes it as always."""
    fields: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if pos + 8 > end:
            return None
        group, element, length = _ELEMENT.unpack_from(command, pos)
        pos += 8
        if group != 0 or element not in _RQ_ELEMENTS or element in fields or pos + length > end:
            return None
        fields[element] = command[pos : pos + length]
        pos += length
    if _us(fields.get(0x0100)) != C_STORE_RQ:
        return None
    data_set_type = _us(fields.get(0x0800))
    message_id, priority = _us(fields.get(0x0110)), _us(fields.get(0x0700))
    sop_class, sop_instance = _text(fields.get(0x0002, b"")), _text(fields.get(0x1000, b""))
    if data_set_type in (None, NO_DATA_SET) or None in (message_id, priority, sop_class, sop_instance):
        return None
    req = C_STORE()
    try:
        req.MessageID = message_id
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_instance
        req.Priority = priority
        if 0x1030 in fields:
            originator = _text(fields[0x1030])
            if originator is None:
                return None
            req.MoveOriginatorApplicationEntityTitle = originator
        if 0x1031 in fields:
            originator_id = _us(fields[0x1031])
            if originator_id is None:
                return None
            req.MoveOriginatorMessageID = originator_id
    except (TypeError, ValueError):
        return None
    req._dataset_path = None
    req._dataset_file = None
    return req


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _uid(value: object) -> bytes:
    raw = str(value).encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_store_response(rsp: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP (Implicit VR Little Endian, as pydicom writes it), or None
    when it carries something this encoder leaves to pynetdicom (an Offending Element, a
    non-ASCII comment)."""
    status, responding_to = rsp.Status, rsp.MessageIDBeingRespondedTo
    if status is None or responding_to is None or rsp.OffendingElement is not None:
        return None
    try:
        parts = []
        if rsp.AffectedSOPClassUID is not None:
            parts.append(_element(0x0002, _uid(rsp.AffectedSOPClassUID)))
        parts.append(_element(0x0100, _US.pack(C_STORE_RSP)))
        parts.append(_element(0x0120, _US.pack(responding_to)))
        parts.append(_element(0x0800, _US.pack(NO_DATA_SET)))
        parts.append(_element(0x0900, _US.pack(status)))
        if rsp.ErrorComment is not None:
            comment = str(rsp.ErrorComment).encode("ascii")
            parts.append(_element(0x0902, comment + b" " if len(comment) % 2 else comment))
        if rsp.AffectedSOPInstanceUID is not None:
            parts.append(_element(0x1000, _uid(rsp.AffectedSOPInstanceUID)))
    except (UnicodeEncodeError, struct.error):
        return None
    body = b"".join(parts)
    return _element(0x0000, struct.pack("<I", len(body))) + body


class StoreDIMSEProvider(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider with C-STORE requests and responses read and written directly."""

    def __init__(self, assoc: Any) -> None:
        super().__init__(assoc)
        self._command = bytearray()
        self._store: C_STORE | None = None
        self._store_context = 0
        self._fragments: list[memoryview | bytes] = []
        # Set by an acceptor whose upper-layer thread serves a complete C-STORE itself (no hand-off
        # to the association thread and back for the response); None: queued as pynetdicom does.
        self.serve_inline: Any = None
        # Set by an acceptor whose stage writes a data set to the spool as its fragments arrive:
        # called with (context ID, request) at the first fragment, returns a sink (``write`` each
        # fragment, ``finish`` after the last, ``discard`` when it will not be completed) or None.
        # The sink travels on the request as ``streamed``; the joined bytes stay in ``DataSet``.
        self.open_dataset_file: Any = None
        self._streamed: Any = None

    def _direct(self) -> bool:
        """Whether messages may bypass pynetdicom's DIMSEMessage (no handler would miss them)."""
        return not _config.STORE_RECV_CHUNKED_DATASET and not self.assoc.get_handlers(evt.EVT_DIMSE_RECV)

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, data in primitive.presentation_data_value_list:
            self._receive_fragment(context_id, data)

    def _through_pynetdicom(self, context_id: int, data: bytes | memoryview) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append([context_id, bytes(data)])
        super().receive_primitive(primitive)

    def _receive_fragment(self, context_id: int, data: bytes | memoryview) -> None:
        if self.message is not None or not data:  # a message pynetdicom is assembling
            self._through_pynetdicom(context_id, data)
            return
        control = data[0]
        if control & 0x01:  # command
            if self._store is not None:
                self._store, self._fragments = None, []
                self.discard_streamed()
                self.dul.event_queue.put("Evt19")  # a command in the middle of a data set
                return
            self._command += data[1:]
            if not control & 0x02:
                return
            command, self._command = bytes(self._command), bytearray()
            store = decode_store_request(command) if self._direct() else None
            if store is None:
                self._through_pynetdicom(context_id, b"\x03" + command)
                return
            self._store, self._store_context, self._fragments = store, context_id, []
            return
        store = self._store
        if store is None:  # a data set without a command: pynetdicom's behaviour
            self._through_pynetdicom(context_id, data)
            return
        fragment = data[1:]
        self._fragments.append(fragment)
        if self.open_dataset_file is not None:
            if len(self._fragments) == 1:
                self._streamed = self.open_dataset_file(self._store_context, store)
            if self._streamed is not None:
                self._streamed.write(fragment)
        if control & 0x02:
            store.DataSet = BytesIO(b"".join(self._fragments))
            store._context_id = self._store_context
            if self._streamed is not None:
                self._streamed.finish()
            store.streamed, self._streamed = self._streamed, None
            self._store, self._fragments = None, []
            if self.serve_inline is None or not self.serve_inline(self._store_context, store):
                self.msg_queue.put((self._store_context, store))

    def discard_streamed(self) -> None:
        """Drop the spool file of a data set that will not be completed (the association ended)."""
        streamed, self._streamed = self._streamed, None
        if streamed is not None:
            streamed.discard()

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            type(primitive) is C_STORE
            and primitive.MessageIDBeingRespondedTo is not None
            and not self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
        ):
            command = encode_store_response(primitive)
            limit = self.maximum_pdu_size
            if command is not None and (not limit or len(command) + 6 <= limit):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append([context_id, b"\x03" + command])
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)
