"""Generic trio helpers: nothing here knows about sandboxes, pools or profiles.

* `Reply`, `call`, `close_mailbox`, `fail_pending`: one-shot replies and actor mailboxes.
* `bounded_cleanup`, `collapse_exception_groups`, `clone_exception`: bounded, shielded cleanup
  and the one meaningful error of an internal exception group.
* `Portal`: a trio loop on its own thread, serving calls from other threads and event loops;
  `PortalHost`: an async context manager kept open on one, for callers outside trio.
"""

from hermes_actors._trio._cleanup import (
    bounded_cleanup,
    clone_exception,
    collapse,
    collapse_exception_groups,
)
from hermes_actors._trio._portal import Portal, PortalHost
from hermes_actors._trio._reply import Reply, call, close_mailbox, fail_pending

__all__ = [
    "Portal",
    "PortalHost",
    "Reply",
    "bounded_cleanup",
    "call",
    "clone_exception",
    "close_mailbox",
    "collapse",
    "collapse_exception_groups",
    "fail_pending",
]
