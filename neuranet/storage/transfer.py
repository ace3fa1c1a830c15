"""Moving a file between a local disk and the fabric, a chunk at a time, a few chunks in flight.

`upload` reads the file piece by piece (sealing each piece when encrypting), sends up to `PARALLEL`
chunks at once and commits the manifest; `download` fetches up to `PARALLEL` chunks at once (through
this machine's agent when one is given, else from the coordinator), checks each against its name,
opens it, writes the pieces in order to a temporary file next to the target, checks the whole
file's SHA-256 (the plaintext's from the sealed manifest when encrypted, and the ciphertext's from
the record) and only then renames it into place. Neither ever holds more than
about `PARALLEL` chunks in memory.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

from pydantic import ValidationError

from neuranet.net.local_api import LocalAgent, LocalRequestError
from neuranet.protocol.chunk_channel import (MAX_HOLDERS, BadChunkRequest, LocalChunk, LocalPut,
                                             parse_local_chunk_answer, parse_local_put_answer)
from neuranet.storage.chunks import CHUNK_SIZE, ChunkRef, Manifest, split, verify
from neuranet.storage.sealing import SEALING_OVERHEAD, SealedFacts, Sealer

PARALLEL = 8  # chunks in flight (4 measured 10-20% slower on loopback; each costs 1 MiB of memory)
Progress = Callable[[int], None]  # called with the plaintext bytes just moved


class TransferError(Exception):
    """A download produced the wrong bytes, or a file cannot be read or written."""


def _bounded(executor: ThreadPoolExecutor, jobs: Iterator[Callable[[], Any]], limit: int) -> Iterator[Any]:
    """Results of ``jobs`` in order, with at most ``limit`` running or waiting at once."""
    window: list[Future[Any]] = []
    for job in jobs:
        window.append(executor.submit(job))
        if len(window) >= limit:
            yield window.pop(0).result()
    for fut in window:
        yield fut.result()


def upload(client: Any, stream: BinaryIO, name: str, replicas: int = 3, sealer: Sealer | None = None,
           overwrite: bool = False, progress: Progress | None = None, chunk_size: int = CHUNK_SIZE,
           agent: LocalAgent | None = None) -> dict[str, Any]:
    """Store ``stream`` on the fabric as ``name``; the server's view of the committed file, with
    ``paths``: how the replicas went ("local", "direct", "relay" from this machine's agent when one is
    given; "server" through the coordinator, which is also the fallback) and ``plaintext_size``."""
    reader = _Hashing(stream)
    stored_hash = hashlib.sha256()
    refs: list[ChunkRef] = []
    paths = _Paths()

    def put(chunk: str, stored: bytes) -> None:
        if agent is not None:
            try:
                answer, _ = agent.request(LocalPut(chunk=chunk, replicas=replicas).meta(), stored)
                paths.add(parse_local_put_answer(answer).paths or {"agent": 1})
                return
            except (OSError, LocalRequestError, BadChunkRequest, ValidationError):
                pass  # the coordinator can place it itself
        client.put_chunk(chunk, stored, replicas)
        paths.add({"server": 1})

    def pieces() -> Iterator[Callable[[], int]]:
        seal = sealer.seal if sealer is not None else None
        for ref, stored in split(reader, seal, chunk_size):
            refs.append(ref)
            stored_hash.update(stored)
            plain = len(stored) - (SEALING_OVERHEAD if sealer is not None else 0)

            def send(ref: ChunkRef = ref, stored: bytes = stored, plain: int = plain) -> int:
                put(ref.id, stored)
                return plain

            yield send

    with ThreadPoolExecutor(PARALLEL) as pool:
        for moved in _bounded(pool, pieces(), PARALLEL):
            if progress:
                progress(moved)
    if sealer is None:
        manifest = Manifest(name, reader.count, tuple(refs), reader.digest.hexdigest())
    else:  # the coordinator learns the ciphertext's size and hash; the plaintext's go sealed
        facts = SealedFacts(name, reader.count, reader.digest.hexdigest(), len(refs))
        manifest = Manifest(name, sum(r.size for r in refs), tuple(refs), stored_hash.hexdigest(),
                            sealer.describe(facts))
    return {**client.commit_file({**manifest.to_json(), "replicas": replicas, "overwrite": overwrite}),
            "paths": paths.counts, "plaintext_size": reader.count}


class _Paths:
    """How many chunks (or replicas) went which way; shared by a transfer's threads."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def add(self, counts: dict[str, int]) -> None:
        with self._lock:
            for way, n in counts.items():
                self.counts[way] = self.counts.get(way, 0) + int(n)


class _Hashing:
    """A reader that hashes what passes through it (the whole file's SHA-256, in one pass)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.digest, self.count = stream, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.digest.update(data)
        self.count += len(data)
        return data


def plaintext_size(info: dict[str, Any]) -> int:
    """A file's size in plaintext bytes, from the coordinator's view of it with its ``sealing`` (a
    sealed file's record gives the ciphertext's size: each chunk is `SEALING_OVERHEAD` longer)."""
    sealing = info.get("sealing")
    if isinstance(sealing, dict) and sealing.get("version", 1) != 1:
        return int(info["size"]) - SEALING_OVERHEAD * int(info["chunks"])
    return int(info["size"])  # plain, or sealed in the first format (which recorded the plaintext's)


def _open_record(info: dict[str, Any], name: str, opener: Callable[[dict[str, Any]], Sealer] | None
                 ) -> tuple[Sealer | None, str, str | None]:
    """The sealer of a file (None when it is plain), the SHA-256 its plaintext must have and the one
    its stored bytes must have when those differ; checks the record against the sealed manifest."""
    if not info.get("sealing"):
        return None, str(info["sha256"]), None
    if opener is None:
        raise TransferError(f"{name} is encrypted: give its passphrase or key file")
    sealer = opener(info["sealing"])
    facts = sealer.facts
    if facts is None:  # the first sealing format: the record itself holds the plaintext's hash
        return sealer, str(info["sha256"]), None
    if facts.name != name:
        raise TransferError(f"the coordinator answered for {name!r} with the sealed file {facts.name!r}")
    stored = sum(int(c["size"]) for c in info["chunk_list"])
    if facts.chunks != len(info["chunk_list"]) or stored != facts.size + SEALING_OVERHEAD * facts.chunks:
        raise TransferError(f"{name}: the coordinator's record lists {len(info['chunk_list'])} chunk(s) of {stored} "
                            f"bytes; the sealed manifest says {facts.chunks} holding {facts.size} bytes")
    return sealer, facts.sha256, str(info["sha256"])


def download(client: Any, name: str, target: Path, opener: Callable[[dict[str, Any]], Sealer] | None = None,
             progress: Progress | None = None, agent: LocalAgent | None = None) -> dict[str, Any]:
    """Fetch ``name`` into ``target`` (atomically); ``opener(sealing)`` gives the sealer of an encrypted
    file. With ``agent`` (this machine's agent) each chunk comes through it, from its own store or
    over a PeerLink from a holder, and from the coordinator only when that fails. Returns the file's
    info, with ``paths``: how many chunks came which way ("local", "direct", "relay" through the
    agent; "server" from the coordinator)."""
    info = client.file_info(name)
    sealer, sha256, stored_sha256 = _open_record(info, name, opener)
    target = Path(target)
    tmp = target.with_name(f".{target.name}.part-{os.getpid()}")
    whole, stored = hashlib.sha256(), hashlib.sha256()
    chunks = info["chunk_list"]

    paths = _Paths()

    def fetch(chunk: dict[str, Any]) -> bytes:
        path, data = "server", b""
        if agent is not None:
            try:
                online = [h["device"] for h in chunk["holders"] if h["online"]]
                ask = LocalChunk(chunk=chunk["id"], holders=online[:MAX_HOLDERS])
                answer, data = agent.request(ask.meta())
                # The agent checked the bytes against the chunk's name (and failed over if they were
                # wrong); the whole file's hash below is checked all the same.
                path = parse_local_chunk_answer(answer).path
            except (OSError, LocalRequestError, BadChunkRequest, ValidationError):
                data = b""  # the coordinator has its own way to the holders
        if path == "server":
            data = verify(chunk["id"], client.get_chunk(chunk["id"]))
        paths.add({path: 1})
        return data

    def jobs() -> Iterator[Callable[[], tuple[bytes, bytes]]]:
        for index, c in enumerate(chunks):
            def get(index: int = index, chunk: dict[str, Any] = c) -> tuple[bytes, bytes]:
                data = fetch(chunk)
                return data, sealer.open(index, data) if sealer is not None else data

            yield get

    try:
        with open(tmp, "wb") as out, ThreadPoolExecutor(PARALLEL) as pool:
            for data, piece in _bounded(pool, jobs(), PARALLEL):
                out.write(piece)
                whole.update(piece)
                if stored_sha256 is not None:
                    stored.update(data)
                if progress:
                    progress(len(piece))
        if whole.hexdigest() != sha256:
            raise TransferError(f"{name}: the downloaded bytes do not match the file's SHA-256")
        if stored_sha256 is not None and stored.hexdigest() != stored_sha256:
            raise TransferError(f"{name}: the stored bytes do not match the SHA-256 in the coordinator's record")
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {**info, "paths": paths.counts}
