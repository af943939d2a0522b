"""The two kinds of update failure, as the update loop treats them (DESIGN.md §12).

- :class:`TransientUpdateError`: the update cannot go on *now* (the disk is full, another process
  holds the store, the broker is away). Nothing is given up: the update loop backs off (with jitter)
  and tries again, and the attempt does not count against the target.
- :class:`FatalUpdateError`: this target cannot be installed here (the bundle does not verify, load
  or pass probation). It is recorded as failed and not taken again until the fleet pushes it again.

Decisions are made on the class and the ``reason`` word, never on message text.
"""

from __future__ import annotations

from edgepack.errors import EdgepackError


class UpdateError(EdgepackError):
    """An update step that did not finish; ``reason`` is a short machine-readable word."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class TransientUpdateError(UpdateError):
    """Try again later (backoff); the target is not counted as failed."""


class FatalUpdateError(UpdateError):
    """This target fails here; recorded, not retried until pushed again."""
