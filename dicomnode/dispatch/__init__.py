"""Dispatch stage: C-STORE SCU of output instances to the configured destinations, with an outbox."""

from dicomnode.dispatch.outbox import DispatchOutbox
from dicomnode.dispatch.scu import StoreResult, StoreSession, classify_status

__all__ = ["DispatchOutbox", "StoreResult", "StoreSession", "classify_status"]
