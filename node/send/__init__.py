"""Stage ``send``: the durable outbox, the senders, one per destination kind (C-STORE SCU, STOW-RS,
Orthanc REST, folder), and the delivery confirmation (``confirm``) with its per-kind peer queries (``query_*``).

To add a destination kind: its value in ``node.config.DestinationKind``, its config dataclass (with that
``kind``) in ``node.config.endpoints`` and the ``Destination`` union, and a module here exposing
``create(dest) -> Sender`` named in ``node.send.base.KIND_MODULES`` (a test checks the two registries agree);
if the kind can be asked what it holds, a module exposing ``query(dest) -> PeerQuery`` named in
``node.send.base.QUERY_MODULES`` (else its deliveries can only be ``confirm = "none"``).
"""

from node.send.base import Sender, make_sender
from node.send.outbox import Outbox, backoff_s

__all__ = ["Outbox", "Sender", "backoff_s", "make_sender"]
