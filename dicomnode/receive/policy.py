"""Association policy: who may associate with the node, decided in one place from the settings.

An association request is admitted when the called AE title is the node's own (unless
``node.check_called_aet`` is off) and, when an allow-list is configured (``node.allowed_peers``,
``node.allowed_calling_aets``), the calling AE title and the peer address match one entry.
Connection limits (:class:`ConnectionSlots`) are counted from accept, before any PDU is read.
"""

from __future__ import annotations

import ipaddress
import threading
from collections import Counter
from dataclasses import dataclass

from dicomnode.config import AllowedPeer, Settings

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_CALLING_AET = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
REJECT_CALLED_AET = (0x01, 0x01, 0x07)  # permanent, service user, called AE title not recognised
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)  # transient, service provider (presentation), local limit exceeded


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused, and the A-ASSOCIATE-RJ fields that say so to the peer."""

    reason: str
    result: int
    source: int
    diagnostic: int

    @classmethod
    def of(cls, reason: str, rsd: tuple[int, int, int]) -> Refusal:
        return cls(reason, *rsd)


def allowed_peers(settings: Settings) -> list[AllowedPeer]:
    """The allow-list entries; empty means any peer may associate."""
    node = settings.node
    return [*node.allowed_peers, *(AllowedPeer(ae_title=aet) for aet in node.allowed_calling_aets)]


def _matches(peer: AllowedPeer, calling_aet: str, address: str) -> bool:
    if peer.ae_title is not None and peer.ae_title != calling_aet:
        return False
    if peer.address is not None:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
        return ip in ipaddress.ip_network(peer.address)
    return True


def _ip_or_none(host: str) -> str | None:
    """``host`` when it is an IP address (then the source must connect from it), else None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return None


def admission(settings: Settings, calling_aet: str, called_aet: str, address: str) -> Refusal | None:
    """None when an association request from ``calling_aet``@``address`` to ``called_aet`` is admitted."""
    node = settings.node
    calling_aet, called_aet = calling_aet.strip(), called_aet.strip()
    if node.check_called_aet and called_aet != node.ae_title:
        return Refusal.of(
            f"called AE title {called_aet!r} is not this node's ({node.ae_title!r}; node.check_called_aet)",
            REJECT_CALLED_AET,
        )
    configured = allowed_peers(settings)
    if not configured:
        return None  # no allow-list: any peer may associate
    # Peers trusted through other settings join here, without opening the list: the PACS sources,
    # whose C-MOVE sub-operations arrive as C-STORE from their own AE title.
    admitted = configured + [
        AllowedPeer(ae_title=src.ae_title, address=_ip_or_none(src.host)) for src in settings.sources
    ]
    if not any(_matches(rule, calling_aet, address) for rule in admitted):
        return Refusal.of(
            f"calling AE title {calling_aet!r} from {address} is not in node.allowed_peers "
            "or node.allowed_calling_aets",
            REJECT_CALLING_AET,
        )
    return None


class ConnectionSlots:
    """Open connections in total and per peer address, so that idle or slow peers cannot lock others out."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self._lock = threading.Lock()
        self._by_address: Counter[str] = Counter()
        self._open = 0

    def take(self, address: str) -> Refusal | None:
        """Claim a slot for a new connection from ``address``; a Refusal when a limit is reached."""
        with self._lock:
            if self._by_address[address] >= self.per_address:
                return Refusal.of(
                    f"{address} already has {self.per_address} connections open "
                    "(node.max_associations_per_address)",
                    REJECT_LOCAL_LIMIT,
                )
            if self._open >= self.total:
                return Refusal.of(
                    f"{self.total} connections open (node.max_associations)", REJECT_LOCAL_LIMIT
                )
            self._by_address[address] += 1
            self._open += 1
            return None

    def give_back(self, address: str) -> None:
        """Release a slot taken by :meth:`take`."""
        with self._lock:
            self._open -= 1
            self._by_address[address] -= 1
            if self._by_address[address] <= 0:
                del self._by_address[address]

    def open_connections(self, address: str | None = None) -> int:
        """Connections open now, in total or from one address."""
        with self._lock:
            return self._open if address is None else self._by_address[address]
