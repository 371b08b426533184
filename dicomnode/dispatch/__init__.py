"""Dispatch stage: C-STORE SCU (or DICOMweb STOW-RS) of output instances to the configured
destinations, with an outbox; deletion of replaced fused series where a destination allows it."""

from dicomnode.dispatch.dicomweb import StowSession
from dicomnode.dispatch.outbox import DispatchOutbox
from dicomnode.dispatch.removal import SeriesRemover
from dicomnode.dispatch.scu import StoreResult, StoreSession, classify_status

__all__ = ["DispatchOutbox", "SeriesRemover", "StoreResult", "StoreSession", "StowSession", "classify_status"]
