"""The base of every wire message: the registry of message types by wire name, and ``parse``.

Every message is a pydantic model with a wire ``TYPE``, registered when its class is defined.
``parse`` turns an :class:`Envelope` into the right model or raises a typed error; ``envelope`` goes
the other way. Bodies hold only msgpack-native values: no pickle anywhere.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from neuranet.protocol.envelope import Buffer, Envelope
from neuranet.protocol.errors import MAX_ERROR_CHARS, MAX_SHOWN_CHARS, InvalidMessage, UnknownMessageType, shown

MESSAGE_TYPES: dict[str, type["Message"]] = {}

# Errors and reasons a peer reports are repeated to users and in logs: kept to a readable length.
Text = Annotated[str, AfterValidator(lambda text: text[:MAX_ERROR_CHARS])]
INT64_MAX = 2 ** 63 - 1  # what a database BIGINT holds
MAX_ID_CHARS = 128  # of a device, link, run or test id
ID_FIELD = Field(min_length=1, max_length=MAX_ID_CHARS)  # a bounded, non-empty id


class Message(BaseModel):
    """Base of all wire messages; subclasses set ``TYPE`` and are registered."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    TYPE: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TYPE:
            if cls.TYPE in MESSAGE_TYPES:
                raise TypeError(f"message type {cls.TYPE!r} registered twice")
            MESSAGE_TYPES[cls.TYPE] = cls

    def envelope(self, *, id: int = 0, src: str = "", dst: str = "", payload: Buffer = b"") -> Envelope:
        return Envelope(type=self.TYPE, body=self.model_dump(mode="python"), id=id, src=src, dst=dst, payload=payload)


def parse(env: Envelope) -> Message:
    """Validate an envelope's body against its registered message type."""
    cls = MESSAGE_TYPES.get(env.type)
    if cls is None:
        raise UnknownMessageType(f"unknown message type {shown(env.type)}")
    try:
        return cls.model_validate(env.body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])[:MAX_SHOWN_CHARS] or "body"  # keys come from the peer
        raise InvalidMessage(f"{env.type}: {where}: {first['msg'][:MAX_SHOWN_CHARS * 4]}") from None
