"""dicomnode: a DICOM node that fuses multi-modal studies and pushes the result back to PACS."""

__version__ = "0.1.0"
