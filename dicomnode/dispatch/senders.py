"""How a destination is reached, chosen by its type: a C-STORE association (``dimse``) or
STOW-RS requests (``dicomweb``). Both have the same life cycle (open, send, close), so the outbox
records, retries and audits deliveries to either the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit

from dicomnode.config import DestinationConfig
from dicomnode.dispatch.dicomweb import StowSession
from dicomnode.dispatch.scu import StoreSession

Sender = StoreSession | StowSession


def make_sender(
    calling_aet: str, dest: DestinationConfig, contexts: Mapping[str, list[str]], timeout: float
) -> Sender:
    """The sender for ``dest``: StowSession for DICOMweb, StoreSession (C-STORE) otherwise."""
    if dest.type == "dicomweb":
        return StowSession(dest, timeout)
    return StoreSession(calling_aet, dest, contexts, timeout)


def peer_address(dest: DestinationConfig) -> tuple[str, str, int]:
    """(called AE title, host, port) of ``dest`` for its outbound association row."""
    if dest.type == "dicomweb":
        parts = urlsplit(str(dest.url))
        return "", parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    return str(dest.ae_title), str(dest.host), int(dest.port or 0)
