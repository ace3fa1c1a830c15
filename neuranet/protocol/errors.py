"""The protocol's exception tree: every error a peer can cause has its own type and code."""

from __future__ import annotations

MAX_SHOWN_CHARS = 80  # of a peer's string repeated in an error or a log line
MAX_ERROR_CHARS = 1000  # of an error message sent to a peer


def shown(text: object, limit: int = MAX_SHOWN_CHARS) -> str:
    """A peer-supplied value as an error or a log line may repeat it: quoted with control characters
    (and lone surrogates) escaped, cut to ``limit`` characters with the rest counted. Echoing a peer's
    input then costs it as much as us, and cannot forge log lines."""
    text = text if isinstance(text, str) else str(text)
    more = f"... ({len(text) - limit} more characters)" if len(text) > limit else ""
    return repr(text[:limit]) + more


class ProtocolError(Exception):
    """A peer sent something this side cannot accept.

    ``code`` is the stable, machine-readable name carried in ``error`` replies.
    """

    code = "protocol_error"
    fatal = True  # whether the connection that caused it must be closed


class MalformedFrame(ProtocolError):
    code = "malformed_frame"


class VersionMismatch(ProtocolError):
    code = "version_mismatch"


class UnknownMessageType(ProtocolError):
    code = "unknown_type"
    fatal = False


class InvalidMessage(ProtocolError):
    code = "invalid_message"
    fatal = False


class MessageTooLarge(ProtocolError):
    code = "too_large"


class QueueLimitExceeded(ProtocolError):
    code = "queue_limit"


class AuthenticationFailed(ProtocolError):
    code = "auth_failed"


class CoordinatorUnverified(ProtocolError):
    """What answered at the coordinator's address did not prove it is the coordinator this device
    trusts (a different certificate or identity key, or no proof at all)."""

    code = "coordinator_unverified"


class LinkError(Exception):
    """A link to a peer device failed or ended. Not a `ProtocolError`: nobody broke the protocol, a peer
    went away, the server would not relay, or a path failed; the work over the link decides what to do
    (a training stage reports it, and the coordinator re-plans the run)."""


class LinkRefused(LinkError):
    """The server would not grant or relay the link (not allowed, or the peer is offline)."""


class PeerUnreachable(LinkError):
    """The peer has been away longer than a link waits for it."""


class PeerUnavailable(ProtocolError):
    code = "peer_unavailable"
    fatal = False


class UnexpectedMessage(ProtocolError):
    code = "unexpected"
    fatal = False


class TensorFormatError(ProtocolError):
    code = "bad_tensor"
    fatal = False


ERRORS_BY_CODE: dict[str, type[ProtocolError]] = {
    cls.code: cls
    for cls in (
        ProtocolError,
        MalformedFrame,
        VersionMismatch,
        UnknownMessageType,
        InvalidMessage,
        MessageTooLarge,
        QueueLimitExceeded,
        AuthenticationFailed,
        CoordinatorUnverified,
        PeerUnavailable,
        TensorFormatError,
        UnexpectedMessage,
    )
}


def error_from_code(code: str, message: str) -> ProtocolError:
    """Rebuild the typed error a peer reported (unknown codes become ProtocolError)."""
    return ERRORS_BY_CODE.get(code, ProtocolError)(message)
