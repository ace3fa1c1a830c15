"""The protocol's exception tree: every error a peer can cause has its own type and code."""

from __future__ import annotations


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


class LinkRefused(ProtocolError):
    code = "link_refused"
    fatal = False


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
        LinkRefused,
        PeerUnavailable,
        TensorFormatError,
        UnexpectedMessage,
    )
}


def error_from_code(code: str, message: str) -> ProtocolError:
    """Rebuild the typed error a peer reported (unknown codes become ProtocolError)."""
    return ERRORS_BY_CODE.get(code, ProtocolError)(message)
