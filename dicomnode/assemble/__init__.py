"""Assemble: series stability, grouping by patient, modality-set rules, job creation."""

from dicomnode.assemble.stage import AssembleStage

__all__ = ["AssembleStage"]
