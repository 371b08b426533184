"""Output stage: Secondary Capture datasets from fused arrays plus source metadata (sends nothing)."""

from dicomnode.output.secondary_capture import (
    RESEARCH_NOTICE,
    OutputError,
    build_fused_series,
    patient_orientation,
    series_description,
)

__all__ = [
    "RESEARCH_NOTICE",
    "OutputError",
    "build_fused_series",
    "patient_orientation",
    "series_description",
]
