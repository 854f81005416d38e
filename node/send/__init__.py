"""Stage ``send``: the durable outbox and the senders, one per destination kind (C-STORE SCU, STOW-RS,
Orthanc REST, folder).

To add a destination kind: its value in ``node.config.DestinationKind``, its config dataclass (with that
``kind``) in ``node.config.endpoints`` and the ``Destination`` union, and a module here exposing
``create(dest) -> Sender`` named in ``node.send.base.KIND_MODULES`` (a test checks the two registries agree).
"""

from node.send.base import Sender, make_sender
from node.send.outbox import Outbox, backoff_s

__all__ = ["Outbox", "Sender", "backoff_s", "make_sender"]
