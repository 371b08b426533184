"""Output stage: Secondary Capture datasets from fused arrays plus source metadata (sends nothing)."""

from dicomnode.output.identity import choose_series_number, replaces_marker, series_description
from dicomnode.output.secondary_capture import (
    DEFAULT_NOTICE,
    IODS,
    RESEARCH_NOTICE,
    OutputError,
    OutputOptions,
    build_fused_series,
    patient_orientation,
)

__all__ = [
    "DEFAULT_NOTICE",
    "IODS",
    "RESEARCH_NOTICE",
    "OutputError",
    "OutputOptions",
    "build_fused_series",
    "choose_series_number",
    "patient_orientation",
    "replaces_marker",
    "series_description",
]
