"""Retrieve: query (C-FIND) and retrieve (C-MOVE / C-GET) a rule's missing partner series from PACS."""

from dicomnode.retrieve.stage import RetrieveStage

__all__ = ["RetrieveStage"]
