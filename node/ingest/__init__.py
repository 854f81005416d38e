"""Stage ``ingest``: how instances enter the node. Every path ends in ONE admission (``admit.Admission``).

- ``scp``: the C-STORE SCP (and C-ECHO), TLS, caller checks at association time;
- ``lean``: the SCP's lean C-STORE receive path (``[node] receive_path``): plain C-STORE P-DATA-TF parsed in the
  DUL thread, the data set written straight to ``incoming/``, the response from a template;
- ``server``: the SCP's listening server: a gate with deadlines (TLS handshake, first bytes of the A-ASSOCIATE-RQ)
  before a connection becomes an association, so silent peers never lock callers out;
- ``reactor`` / ``association``: pynetdicom's DUL and association threads without their millisecond polling;
- ``stow``: STOW-RS multipart bodies (the HTTP route lives in ``node.app.http``);
- ``pull``: retrieval by UID from a configured source (C-MOVE, C-GET, WADO-RS, Orthanc REST);
- ``listing``: a series' instances at a DICOM source by C-FIND, its slices told from non-image objects (for ``pull``);
- ``follower``: the Orthanc ``/changes`` follower;
- ``inflate``: admission's deflate-bomb guard: a Deflated data set inflated in chunks to a scratch copy;
- ``resend``: a known SOPInstanceUID sent again: duplicate or conflict;
- ``reindex``: spool files the index lacks, recorded again (start-up, ``srnode reindex``).

To add a source: a module here that turns the source's objects into files or bytes and calls
``Admission.admit_file`` / ``admit_bytes`` with a ``Caller`` naming it.
"""

from node.ingest.admit import (
    STORAGE_SOP_CLASSES,
    Admission,
    Caller,
    Header,
    caller_rules,
    find_caller,
    read_header,
    size_hint,
)
from node.ingest.follower import ChangesFollower, is_own_output, start_followers
from node.ingest.pull import FetchError, FetchResult, fetch, source_caller
from node.ingest.reindex import REINDEXED_CALLER, ReindexResult, reindex_spool
from node.ingest.scp import StoreSCP
from node.ingest.stow import (
    MultipartError,
    MultipartStream,
    StowReceiver,
    StowResult,
    TooManyParts,
    UnsupportedMediaType,
    boundary_of,
    multipart_close,
    multipart_part,
)

__all__ = [
    "REINDEXED_CALLER",
    "STORAGE_SOP_CLASSES",
    "Admission",
    "Caller",
    "ChangesFollower",
    "FetchError",
    "FetchResult",
    "Header",
    "MultipartError",
    "TooManyParts",
    "ReindexResult",
    "MultipartStream",
    "StoreSCP",
    "StowReceiver",
    "StowResult",
    "UnsupportedMediaType",
    "boundary_of",
    "caller_rules",
    "fetch",
    "find_caller",
    "is_own_output",
    "multipart_close",
    "multipart_part",
    "read_header",
    "reindex_spool",
    "size_hint",
    "source_caller",
    "start_followers",
]
