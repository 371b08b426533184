"""C-STORE command sets read and written directly: the same messages pynetdicom reads and writes."""

from __future__ import annotations

import queue
import struct
from io import BytesIO
from typing import Any

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.receive.store_messages import StoreDIMSEProvider, decode_store_request, encode_store_response

CT = "1.2.840.10008.5.1.4.1.1.2"


def _request(
    uid: str = "1.2.3.4", originator: str | None = None, originator_id: int | None = None
) -> C_STORE:
    req = C_STORE()
    req.MessageID = 7
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = uid
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = originator
    req.MoveOriginatorMessageID = originator_id
    req.DataSet = BytesIO(b"\x08\x00\x18\x00")
    return req


def _command(primitive: Any, message: Any) -> bytes:
    msg = message()
    msg.primitive_to_message(primitive)
    return bytes(encode(msg.command_set, True, True))


def _pynetdicom_request(command: bytes) -> C_STORE:
    msg = C_STORE_RQ()
    msg.command_set = decode(BytesIO(command), True, True)
    msg.data_set = BytesIO()
    return msg.message_to_primitive()  # type: ignore[return-value]


@pytest.mark.parametrize(
    "uid,originator,originator_id",
    [
        ("1.2.3.4", None, None),
        ("1.2.3.45", "MOVER", 3),
        ("2.25.1234567890123456789", "AE_TITLE_16CHARS", 65535),
    ],
)
def test_store_request_decodes_as_pynetdicom_decodes_it(
    uid: str, originator: str | None, originator_id: int | None
) -> None:
    command = _command(_request(uid, originator, originator_id), C_STORE_RQ)
    ours, theirs = decode_store_request(command), _pynetdicom_request(command)
    assert ours is not None
    for name in (
        "MessageID",
        "AffectedSOPClassUID",
        "AffectedSOPInstanceUID",
        "Priority",
        "MoveOriginatorApplicationEntityTitle",
        "MoveOriginatorMessageID",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name


def _element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0, element, len(value)) + value


def test_other_commands_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    store = _command(_request(), C_STORE_RQ)
    no_data_set = store.replace(_element(0x0800, b"\x01\x00"), _element(0x0800, b"\x01\x01"))
    assert no_data_set != store
    with_status = store + _element(0x0900, b"\x00\x00")  # not an element of a C-STORE-RQ
    twice = store + _element(0x1000, b"1.2\x00")
    non_ascii_uid = store.replace(b"1.2.3.4\x00", b"1.2.3.\xe4")
    for command in (
        _command(echo, C_ECHO_RQ),
        no_data_set,
        with_status,
        twice,
        store[:-3],
        non_ascii_uid,
        b"",
    ):
        assert decode_store_request(command) is None


@pytest.mark.parametrize(
    "status,comment,sop_class,sop_instance",
    [
        (0x0000, None, CT, "1.2.3.4"),
        (0x0000, None, CT, "1.2.3.45"),
        (0xC000, "cannot understand: no Series Instance UID", CT, "1.2.3"),
        (0xA700, "odd", None, None),
        (0xB007, "even", CT, None),
    ],
)
def test_store_response_is_encoded_as_pynetdicom_encodes_it(
    status: int, comment: str | None, sop_class: str | None, sop_instance: str | None
) -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 12
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    rsp.ErrorComment = comment
    assert encode_store_response(rsp) == _command(rsp, C_STORE_RSP)


def test_responses_it_does_not_write_are_left_to_pynetdicom() -> None:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 1
    rsp.Status = 0xC000
    rsp.OffendingElement = [0x00100010]
    assert encode_store_response(rsp) is None
    rsp.OffendingElement = None
    rsp.ErrorComment = "Gr\u00fc\u00dfe"
    assert encode_store_response(rsp) is None


class _Assoc:
    """What the provider asks of its association: handlers, and the upper layer's event queue."""

    def __init__(self) -> None:
        self.dul = type("Dul", (), {"event_queue": queue.Queue()})()
        self.is_requestor = False

    def get_handlers(self, event: Any) -> list[Any]:
        return []


def _pdata(*items: tuple[int, bytes]) -> P_DATA:
    primitive = P_DATA()
    for cx, data in items:
        primitive.presentation_data_value_list.append([cx, data])
    return primitive


def test_fragments_of_commands_and_data_sets_make_one_request_each() -> None:
    assoc = _Assoc()
    provider = StoreDIMSEProvider(assoc)
    command = _command(_request(), C_STORE_RQ)
    data = bytes(range(256)) * 10
    provider.receive_primitive(_pdata((3, b"\x01" + command[:20])))
    provider.receive_primitive(_pdata((3, b"\x01" + command[20:50]), (3, b"\x03" + command[50:])))
    provider.receive_primitive(_pdata((3, b"\x00" + data[:1000]), (3, b"\x00" + data[1000:1001])))
    assert provider.msg_queue.empty()
    provider.receive_primitive(_pdata((3, memoryview(b"\x02" + data[1001:]))))
    cx, req = provider.msg_queue.get_nowait()
    assert cx == 3 and isinstance(req, C_STORE)
    assert req.AffectedSOPInstanceUID == "1.2.3.4" and req.DataSet.getvalue() == data

    echo = C_ECHO()
    echo.MessageID = 2
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    provider.receive_primitive(_pdata((1, b"\x03" + _command(echo, C_ECHO_RQ))))
    cx, req = provider.msg_queue.get_nowait()
    assert cx == 1 and isinstance(req, C_ECHO) and req.MessageID == 2
    assert assoc.dul.event_queue.empty()


def test_a_command_in_the_middle_of_a_data_set_ends_the_association() -> None:
    assoc = _Assoc()
    provider = StoreDIMSEProvider(assoc)
    command = _command(_request(), C_STORE_RQ)
    provider.receive_primitive(_pdata((1, b"\x03" + command), (1, b"\x00" + b"ab")))
    provider.receive_primitive(_pdata((1, b"\x03" + command)))
    assert assoc.dul.event_queue.get_nowait() == "Evt19"
    assert provider.msg_queue.empty()
