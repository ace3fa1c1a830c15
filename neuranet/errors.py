"""NeuraNet's domain errors: one small tree that books raise in the user's terms.

A book (runs, serving, files, the store) says *what* went wrong by the class it raises; the REST
edge maps each class to an HTTP status in one place (`neuranet.server.app`), so no book carries a
status code. A book's own error class (``FileError``, ``ServeError``, ...) derives from the kind
that fits, and a book with several kinds derives one subclass per kind.
"""
from __future__ import annotations


class NeuraNetError(Exception):
    """A request NeuraNet refuses; the message says what to change."""


class Invalid(NeuraNetError):
    """The request itself is wrong (a bad name, an option out of range, inputs a model cannot take)."""


class NotFound(NeuraNetError):
    """The request names something that is not there, or not the caller's."""


class Conflict(NeuraNetError):
    """The request clashes with the present state (a name taken, a device offline, a run not finished)."""


class Gone(NeuraNetError):
    """What the request names existed but is lost for good (a chunk with no replica left)."""


class TooLarge(NeuraNetError):
    """The request is bigger than NeuraNet accepts."""


class Unauthorized(NeuraNetError):
    """The request carries no valid credentials."""


class Forbidden(NeuraNetError):
    """The caller is known but may not do this."""


class Unavailable(NeuraNetError):
    """A device or deployment needed for the request is not available now; trying later may work."""


class TimedOut(NeuraNetError):
    """A device needed for the request did not answer in time."""


class BadUpstream(NeuraNetError):
    """A device answered with something unusable."""


class NoSpace(NeuraNetError):
    """The devices that would hold the data have no room for it."""
