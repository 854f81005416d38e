"""Stage ``send``: the durable outbox and the senders, one per destination kind (C-STORE SCU, STOW-RS,
Orthanc REST, folder).

To add a destination kind: a module here exposing ``create(dest) -> Sender``, its name in
``node.send.base._KIND_MODULES``, and its config dataclass in ``node.config``.
"""

from node.send.base import Sender, make_sender
from node.send.outbox import Outbox, backoff_s

__all__ = ["Outbox", "Sender", "backoff_s", "make_sender"]
