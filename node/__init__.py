"""srnode: a super-resolution DICOM node."""

__version__ = "0.1.0"
PIPELINE_VERSION = "1"  # bump when derived pixels change for the same input; it feeds the derived UIDs
