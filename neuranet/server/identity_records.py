"""The coordinator's records of which devices may act: join tokens, enrolment, device login and removal.

`Store.identity`. Enrolment is two steps so that nothing is written before the agent proves it
holds its key: `check_enrolment` (read only) says which device id the key will get, the handshake
has the agent sign a challenge for it, and only then `enrol_device` spends the join token and
creates the device, in one transaction that checks everything again. Users and API tokens are
`Store.users` (`user_records.py`).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from neuranet.server.models import ChunkReplica, Device, JoinToken, User
from neuranet.server.records import Repository, StoreError, UnknownRecord, hash_secret, new_id

__all__ = ["EnrolmentOffer", "IdentityRecords", "JOIN_TOKEN_TTL", "RemovedDevice", "StoreError", "UnknownRecord",
           "duplicate_name_message"]

JOIN_TOKEN_TTL = 24 * 3600.0


@dataclass(frozen=True)
class EnrolmentOffer:
    """What a valid join token would enrol: the owner, and the id the device gets (or already has)."""

    user_id: str
    device_id: str


@dataclass(frozen=True)
class RemovedDevice:
    device_id: str
    name: str
    replicas: int  # chunk copies it held, now to be made elsewhere
    sole_copies: int  # of those, chunks no other device holds (lost unless the device comes back)


def duplicate_name_message(name: str) -> str:
    return (f"you already have a device named {name!r}: start this agent with another --name, or remove "
            f"the old device first with `neuranet devices remove {name}`")


class IdentityRecords(Repository):
    async def create_join_token(self, user_id: str, ttl: float = JOIN_TOKEN_TTL) -> tuple[str, float]:
        """A one-time join token of the user, valid ``ttl`` seconds; in clear, once, with its expiry."""
        token = "nj_" + secrets.token_urlsafe(24)
        now = time.time()
        async with self._tx() as s:
            s.add(JoinToken(id=new_id(), user_id=user_id, token_hash=hash_secret(token), created_at=now,
                            expires_at=now + ttl))
        return token, now + ttl

    async def check_enrolment(self, join_token: str, public_key: bytes, name: str) -> EnrolmentOffer:
        """Would this enrolment be accepted? Writes nothing; raises `StoreError` saying why not."""
        async with self.session() as s:
            jt = await _join_token(s, join_token)
            earlier = await _check(s, jt, public_key, name, time.time())
            return EnrolmentOffer(jt.user_id, earlier.id if earlier is not None else uuid.uuid4().hex)

    async def enrol_device(self, join_token: str, public_key: bytes, name: str, device_id: str | None = None) -> Device:
        """Spend a one-time join token to register a device (id ``device_id``, from `check_enrolment`)
        under the token's owner; call it only once the agent proved it holds ``public_key``."""
        try:
            async with self._tx() as s:
                jt = await _join_token(s, join_token, for_update=True)
                earlier = await _check(s, jt, public_key, name, time.time())
                if earlier is not None:
                    return earlier  # the agent enrolled but never heard back: same key, same device
                device = Device(id=device_id or uuid.uuid4().hex, user_id=jt.user_id, name=name,
                                public_key=public_key, profile={}, created_at=time.time())
                s.add(device)
                await s.flush()
                jt.used_by = device.id
            return device
        except IntegrityError:  # a concurrent enrolment took the key or the name: say which
            await self.check_enrolment(join_token, public_key, name)
            raise StoreError("a device with this public key or name was enrolled meanwhile") from None

    async def device_for_login(self, device_id: str) -> Device:
        """The device an agent says it is, if it may connect; `StoreError` if not."""
        async with self.session() as s:
            row = (await s.execute(select(Device, User.disabled).join(User, User.id == Device.user_id)
                                   .where(Device.id == device_id))).first()
        if row is None:
            raise UnknownRecord(f"unknown device {device_id}; it was removed, or never enrolled here: to "
                                "enrol it again, delete device.json in its data dir and give the agent a new "
                                "join token")
        if row[1]:
            raise StoreError("the owner of this device is disabled on this coordinator")
        return row[0]

    async def remove_device(self, user_id: str, device_id: str, force: bool = False) -> RemovedDevice:
        """Forget a device: its key is refused from now on and its chunk copies are dropped from the
        records (history, telemetry and replicas go with it), so repair copies them elsewhere. Refused
        while it holds the only copy of some chunk, unless ``force``."""
        async with self._tx() as s:
            device = await s.get(Device, device_id)
            if device is None or device.user_id != user_id:
                raise UnknownRecord(f"no device {device_id} among your devices")
            held = select(ChunkReplica.chunk_id).where(ChunkReplica.device_id == device_id)
            replicas = (await s.execute(select(func.count()).select_from(held.subquery()))).scalar_one()
            others = (select(ChunkReplica.chunk_id).where(ChunkReplica.user_id == user_id,
                                                          ChunkReplica.device_id != device_id,
                                                          ChunkReplica.chunk_id.in_(held)).distinct())
            shared = (await s.execute(select(func.count()).select_from(others.subquery()))).scalar_one()
            sole = int(replicas) - int(shared)
            if sole and not force:
                raise StoreError(
                    f"device {device.name!r} holds the only copy of {sole} chunk(s) of your files; bring it "
                    "online until repair has copied them (`neuranet files ls` shows the replicas), or remove "
                    "it anyway with --force (those files become unreadable)")
            await s.delete(device)  # cascades to its presence, telemetry, run membership and replicas
        return RemovedDevice(device_id, device.name, int(replicas), sole)


async def _join_token(s: AsyncSession, join_token: str, for_update: bool = False) -> JoinToken:
    q = select(JoinToken).where(JoinToken.token_hash == hash_secret(join_token))
    jt = (await s.execute(q.with_for_update() if for_update else q)).scalar_one_or_none()
    if jt is None:
        raise StoreError("unknown join token")
    return jt


async def _check(s: AsyncSession, jt: JoinToken, public_key: bytes, name: str, now: float) -> Device | None:
    """Why this enrolment is refused (`StoreError`), or the device it already made (a retry), or None."""
    if jt.used_by is not None:
        earlier = await s.get(Device, jt.used_by)
        if earlier is not None and earlier.public_key == public_key:
            return earlier
        raise StoreError("join token was already used; create a new one with `neuranet join-token`")
    if jt.expires_at < now:
        raise StoreError("join token has expired; create a new one with `neuranet join-token`")
    owner = await s.get(User, jt.user_id)
    if owner is None or owner.disabled:
        raise StoreError("the owner of this join token is disabled on this coordinator")
    if (await s.execute(select(Device.id).where(Device.public_key == public_key))).first():
        raise StoreError("a device with this public key is already enrolled")
    if (await s.execute(select(Device.id).where(Device.user_id == jt.user_id, Device.name == name))).first():
        raise StoreError(duplicate_name_message(name))
    return None

