"""Test data: a realistic multi-modal head study generator (MR, CT, PET, SPECT) and real DICOM peers.

Used by tests, benchmarks and the demo; the pipeline stages never import it.
"""

from dicomnode.testing.generator import (
    GeneratedSeries,
    GeneratedStudy,
    generate_ct_series,
    generate_study,
)
from dicomnode.testing.grid import Grid, default_grids
from dicomnode.testing.phantom import HeadPhantom

__all__ = [
    "GeneratedSeries",
    "GeneratedStudy",
    "Grid",
    "HeadPhantom",
    "default_grids",
    "generate_ct_series",
    "generate_study",
]
