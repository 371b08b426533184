"""Admission, connection slots and refusal rate limits: the decisions, without a network."""

from __future__ import annotations

import pytest

from dicomnode.config import ConfigError, load_settings
from dicomnode.receive.policy import (
    REJECT_CALLED_AET,
    REJECT_CALLING_AET,
    REJECT_LOCAL_LIMIT,
    ConnectionSlots,
    admission,
)
from dicomnode.receive.refusals import RefusalLimiter


def settings(**node: object):  # type: ignore[no-untyped-def]
    return load_settings(None, node={"ae_title": "NODE", **node})


def rsd(refusal) -> tuple[int, int, int] | None:  # type: ignore[no-untyped-def]
    return None if refusal is None else (refusal.result, refusal.source, refusal.diagnostic)


def test_without_an_allow_list_any_peer_calling_the_node_is_admitted() -> None:
    s = settings()
    assert admission(s, "ANY", "NODE", "10.1.2.3") is None
    assert rsd(admission(s, "ANY", "OTHER", "10.1.2.3")) == REJECT_CALLED_AET
    assert admission(settings(check_called_aet=False), "ANY", "OTHER", "10.1.2.3") is None


def test_allowed_peers_match_title_address_or_both() -> None:
    s = settings(
        allowed_peers=[
            {"ae_title": "CT1", "address": "10.0.0.0/24"},
            {"address": "192.168.7.9"},
            {"ae_title": "MR1"},
        ],
        allowed_calling_aets=["PET1"],
    )
    assert admission(s, "CT1", "NODE", "10.0.0.77") is None
    assert rsd(admission(s, "CT1", "NODE", "10.0.1.77")) == REJECT_CALLING_AET
    assert admission(s, "ANYONE", "NODE", "192.168.7.9") is None
    assert admission(s, "MR1", "NODE", "172.16.0.1") is None
    assert admission(s, "PET1", "NODE", "172.16.0.1") is None
    assert rsd(admission(s, "ANYONE", "NODE", "172.16.0.1")) == REJECT_CALLING_AET
    assert rsd(admission(s, "CT1", "NODE", "not an address")) == REJECT_CALLING_AET
    assert admission(s, "CT1", "NODE", "::ffff:10.0.0.5") is None  # an IPv4 peer on a dual-stack socket


@pytest.mark.parametrize(
    ("node", "key"),
    [
        ({"allowed_peers": [{}]}, "node.allowed_peers.0"),
        ({"allowed_peers": [{"address": "10.0.0.300"}]}, "node.allowed_peers.0.address"),
        ({"allowed_peers": [{"ae_title": "X" * 17}]}, "node.allowed_peers.0.ae_title"),
        ({"max_pdu_size": 0}, "node.max_pdu_size"),
        ({"max_associations": 0}, "node.max_associations"),
        ({"acse_timeout_seconds": 0}, "node.acse_timeout_seconds"),
        ({"network_timeout_seconds": -1}, "node.network_timeout_seconds"),
    ],
)
def test_bad_access_settings_name_the_key(node: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(None, node=node)


def test_connection_slots_per_address_and_in_total() -> None:
    slots = ConnectionSlots(total=3, per_address=2)
    assert slots.take("a") is None and slots.take("a") is None
    refused = slots.take("a")
    assert refused is not None and rsd(refused) == REJECT_LOCAL_LIMIT and "per_address" in refused.reason
    assert slots.take("b") is None
    refused = slots.take("c")
    assert refused is not None and "node.max_associations)" in refused.reason
    slots.give_back("a")
    assert slots.take("c") is None
    assert (slots.open_connections(), slots.open_connections("a")) == (3, 1)


def test_refusals_beyond_the_burst_are_counted_and_summarised_once() -> None:
    now = [0.0]
    limiter = RefusalLimiter(burst=3, window=60, clock=lambda: now[0])
    written = [limiter.allow("10.0.0.1", "bad header", f"r{i}") for i in range(10)]
    assert written == [True] * 3 + [False] * 7
    assert limiter.allow("10.0.0.2", "bad header")  # another peer has its own share
    assert limiter.due() == []
    now[0] = 61
    assert limiter.allow("10.0.0.1", "bad header")  # a new window
    (summary,) = limiter.due()
    assert (summary.peer, summary.count, summary.last_reason) == ("10.0.0.1", 7, "r9")
    assert summary.reason.startswith("7 more refusals like this from 10.0.0.1")
    assert limiter.due() == []


def test_the_limiter_forgets_the_oldest_peers_beyond_its_memory() -> None:
    limiter = RefusalLimiter(burst=1, window=60, max_keys=10, clock=lambda: 0.0)
    for peer in range(50):
        limiter.allow(f"10.0.0.{peer}", "x")
        limiter.allow(f"10.0.0.{peer}", "x")
    assert len(limiter._windows) == 10
    assert sum(s.count for s in limiter.due(flush_all=True)) == 50  # nothing counted is lost
