"""How an agent knows it talks to the coordinator it enrolled with, before it accepts anything.

Two checks, either of which an impostor at the coordinator's address fails:

- TLS: when the agent has a certificate fingerprint (``--server-fingerprint``, or the one pinned at
  enrolment) it compares the certificate against it instead of asking a CA, before the WebSocket
  request goes out. Without one, the certificate must be signed by a CA the device trusts.
- Identity: the challenge carries the coordinator's Ed25519 key and its signature over the agent's
  fresh nonce. The key must be the one pinned at enrolment (or match ``--server-fingerprint`` over
  plain HTTP), so even over ``ws://`` a coordinator without the key cannot instruct the device.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection

from neuranet.protocol import messages as m
from neuranet.protocol.auth import coordinator_payload, coordinator_signature_valid, fingerprint
from neuranet.protocol.errors import CoordinatorUnverified

PROBE_TIMEOUT = 5.0


def tls_context(ws_url: str, ca_cert: str | None, pin: str | None) -> ssl.SSLContext | None:
    """CA verification without a pin; with one, no CA (the pin is checked by ``PinnedConnection``)."""
    if not ws_url.startswith("wss://"):
        return None
    if pin is None:
        return ssl.create_default_context(cafile=ca_cert)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False  # the pin names the certificate itself, whatever host it was made for
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_connection(url: str, pin: str, source: str) -> type[ClientConnection]:
    """A connection class that refuses a certificate other than ``pin`` before sending anything."""

    class PinnedConnection(ClientConnection):
        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            ssl_object = self.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            seen = fingerprint(der) if der else "no certificate"
            if seen != pin:
                raise CoordinatorUnverified(
                    f"{url} presented TLS certificate {seen}, but this device expects {pin} ({source}); refusing it. "
                    "If the coordinator's certificate really changed, pass --server-fingerprint with the one "
                    "`neuranet server` prints")
            await super().handshake(*args, **kwargs)

    return PinnedConnection


async def probe_certificate(ws_url: str) -> str | None:
    """The fingerprint of the certificate at ``ws_url``, unverified: only to show the user."""
    parts = urlsplit(ws_url)
    ctx = tls_context(ws_url, None, "any")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port or 443, ssl=ctx), PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return None
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return fingerprint(der) if der else None
    finally:
        writer.close()


async def untrusted_certificate(url: str, ws_url: str, exc: ssl.SSLCertVerificationError) -> CoordinatorUnverified:
    """Explain a certificate no CA vouches for, with the fingerprint to compare and pin."""
    seen = await probe_certificate(ws_url)
    how = (f"its certificate is {seen}: if that is the fingerprint `neuranet server` printed, pass "
           f"--server-fingerprint {seen}" if seen else "pass --server-fingerprint with the fingerprint "
           "`neuranet server` printed")
    return CoordinatorUnverified(f"the TLS certificate of {url} is not signed by a CA this device trusts ({exc}); "
                                 f"{how} (or --ca-cert FILE)")


def verify_coordinator(url: str, challenge: m.Challenge, agent_nonce: bytes, pinned_key: bytes | None,
                       key_fingerprint: str | None) -> bytes:
    """The coordinator's key, once its challenge proves it holds the one this device expects.

    ``pinned_key``: pinned at enrolment; ``key_fingerprint``: given by the user (plain HTTP). With
    neither (first enrolment), any key that signs the nonce is accepted, to be pinned.
    """
    key, signature = challenge.server_key, challenge.server_signature
    if key is None or signature is None:
        raise CoordinatorUnverified(f"{url} did not prove it is a NeuraNet coordinator (its challenge carries no "
                                    "identity key and signature); refusing its instructions")
    if pinned_key is not None and key != pinned_key:
        raise CoordinatorUnverified(
            f"{url} presented coordinator key {fingerprint(key)}, but this device pinned {fingerprint(pinned_key)} "
            "at enrolment; refusing it. If the coordinator really has a new identity (its data dir was replaced), "
            "delete device.json in this agent's data dir and enrol again with --join-token")
    if key_fingerprint is not None and fingerprint(key) != key_fingerprint:
        raise CoordinatorUnverified(f"{url} presented coordinator key {fingerprint(key)}, but --server-fingerprint "
                                    f"is {key_fingerprint}; refusing it")
    if not coordinator_signature_valid(key, signature, coordinator_payload(agent_nonce, challenge.nonce,
                                                                           challenge.device_id)):
        raise CoordinatorUnverified(f"{url} presented coordinator key {fingerprint(key)} without a valid signature "
                                    "over this connection's nonce; refusing it")
    return key
