"""The coordinator's records of users and their API tokens, and the login check behind every request.

Secrets are stored as SHA-256 hashes only. Valid logins are cached briefly; revoking a token or
disabling a user forgets them at once (`forget_logins`).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from neuranet.api_requests import API_TOKEN_TTL
from neuranet.server.models import ApiToken, User
from neuranet.server.records import Database, Repository, StoreError, UnknownRecord, hash_secret, new_id

# Logins are cached this long; revoking a token, removing a device or disabling a user in this process
# clears them at once, and this bounds how long another coordinator process sharing the database lags.
AUTH_CACHE_SECONDS = 1.0
AUTH_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    """The authenticated user behind a request (and the token it came with)."""

    user_id: str
    name: str
    is_admin: bool
    token_id: str = field(default="", compare=False)  # the same user whichever token it used


class UserRecords(Repository):
    def __init__(self, db: Database) -> None:
        super().__init__(db)
        # token hash -> (when looked up, user, token expiry)
        self._auth_cache: dict[str, tuple[float, Principal, float | None]] = {}

    async def user_count(self) -> int:
        async with self.session() as s:
            return (await s.execute(select(func.count()).select_from(User))).scalar_one()

    async def create_user(self, name: str, *, is_admin: bool = False,
                          token_expires_in: float | None = None) -> tuple[Principal, str]:
        """Create a user and its first API token (expiring in ``token_expires_in`` seconds, None: never);
        returns the token in clear, once."""
        try:
            async with self._tx() as s:
                if (await s.execute(select(User).where(User.name == name))).scalar_one_or_none():
                    raise StoreError(f"user {name!r} already exists")
                user = User(id=new_id(), name=name, is_admin=is_admin, created_at=time.time(), disabled=False)
                s.add(user)
        except IntegrityError:  # a concurrent create_user won the race for the name
            raise StoreError(f"user {name!r} already exists") from None
        token = await self.create_api_token(user.id, "initial", token_expires_in)
        return Principal(user.id, user.name, user.is_admin), token

    async def create_api_token(self, user_id: str, name: str, expires_in: float | None = API_TOKEN_TTL) -> str:
        """A new API token of the user, valid ``expires_in`` seconds (None: until revoked); in clear, once."""
        token = "nn_" + secrets.token_urlsafe(32)
        now = time.time()
        async with self._tx() as s:
            s.add(ApiToken(id=new_id(), user_id=user_id, name=name, token_hash=hash_secret(token), created_at=now,
                           expires_at=None if expires_in is None else now + expires_in))
        return token

    async def authenticate(self, token: str) -> Principal | None:
        """The user behind an API token, unless it expired or its user is disabled. A valid token is
        remembered for `AUTH_CACHE_SECONDS` (a file transfer makes a request per chunk); revocation
        forgets it at once (`forget_logins`); an invalid one is looked up every time."""
        key = hash_secret(token)
        cached = self._auth_cache.get(key)
        if cached is not None and time.monotonic() - cached[0] < AUTH_CACHE_SECONDS and (
                cached[2] is None or cached[2] > time.time()):
            return cached[1]
        self._auth_cache.pop(key, None)
        async with self.session() as s:
            row = (
                await s.execute(select(User, ApiToken.id, ApiToken.expires_at)
                                .join(ApiToken, ApiToken.user_id == User.id).where(ApiToken.token_hash == key))
            ).first()
        if row is None:
            return None
        user, token_id, expires_at = row
        if user.disabled or (expires_at is not None and expires_at <= time.time()):
            return None
        if len(self._auth_cache) >= AUTH_CACHE_SIZE:
            self._auth_cache.clear()
        who = Principal(user.id, user.name, user.is_admin, token_id)
        self._auth_cache[key] = (time.monotonic(), who, expires_at)
        return who

    async def list_tokens(self, user_id: str) -> list[ApiToken]:
        async with self.session() as s:
            rows = await s.execute(select(ApiToken).where(ApiToken.user_id == user_id).order_by(ApiToken.created_at))
            return list(rows.scalars())

    async def revoke_token(self, user_id: str, token_id: str) -> ApiToken:
        """Delete one of the user's API tokens; it is refused from now on (cache included)."""
        async with self._tx() as s:
            row = (await s.execute(select(ApiToken).where(ApiToken.id == token_id, ApiToken.user_id == user_id))
                   ).scalar_one_or_none()
            if row is None:
                raise UnknownRecord(f"no token {token_id} among yours (see `neuranet token ls`)")
            await s.delete(row)
        self._auth_cache.pop(row.token_hash, None)
        return row

    async def list_users(self) -> list[User]:
        async with self.session() as s:
            return list((await s.execute(select(User).order_by(User.created_at))).scalars())

    async def set_user_disabled(self, name: str, disabled: bool) -> User:
        """Disable (or enable again) a user: a disabled user's tokens and devices are refused."""
        async with self._tx() as s:
            user = (await s.execute(select(User).where(User.name == name))).scalar_one_or_none()
            if user is None:
                raise UnknownRecord(f"no user named {name!r}")
            user.disabled = disabled
        self.forget_logins(user.id)
        return user

    def forget_logins(self, user_id: str) -> None:
        """Drop the cached logins of a user, so a change to its rights holds from the next request."""
        for key in [k for k, (_, who, _) in self._auth_cache.items() if who.user_id == user_id]:
            self._auth_cache.pop(key, None)
