"""Measured transfers over a PeerLink: the sender streams tensors, the receiver checks them.

The server asks a device to run a test (``linktest_start``); the device opens a
link on the ``linktest`` channel, measures round trips, streams numbered tensor
messages with a running CRC, and reports progress and the result back.
"""

from __future__ import annotations

import logging
import statistics
import time
import zlib

import torch
import websockets

from neuranet.agent.runtime import Agent
from neuranet.net.peerlink import PeerLink
from neuranet.protocol import messages as m

log = logging.getLogger("neuranet.linktest")

CHANNEL = "linktest"
PROGRESS_EVERY = 0.25
RTT_ROUNDS = 10


async def serve_linktest(link: PeerLink) -> None:
    """Receiver: echo pings, verify order and CRC of tensors, answer the final tally."""
    expected, crc, received = 0, 0, 0
    while True:
        msg = await link.recv()
        meta = msg.meta
        if "ping" in meta:
            await link.send(b"", {"pong": meta["ping"]})
        elif "tensor" in meta:
            ok_order = meta.get("i") == expected
            expected += 1
            crc = zlib.crc32(msg.payload, crc) if ok_order else -1
            received += len(msg.payload)
        elif meta.get("done"):
            ok = meta.get("count") == expected and meta.get("crc") == crc
            await link.send(b"", {"ok": ok, "count": expected, "crc": crc, "bytes": received})
            return


async def run_linktest(agent: Agent, start: m.LinkTestStart, payload: bytes = b"") -> None:
    """Sender side of a test the server asked for; always reports a result."""
    result = m.LinkTestDone(test_id=start.test_id, ok=False)
    try:
        result = await _measure(agent, start)
    except Exception as exc:  # any failure is the test's result, reported to the user
        result = m.LinkTestDone(test_id=start.test_id, ok=False, error=f"{type(exc).__name__}: {exc}")
    try:
        await agent.send(result)
    except (ConnectionError, websockets.ConnectionClosed):
        log.warning("could not report the result of link test %s: not connected", start.test_id)


async def _measure(agent: Agent, start: m.LinkTestStart) -> m.LinkTestDone:
    link = await agent.links.open(start.peer, channel=CHANNEL)
    try:
        rtts = []
        for i in range(RTT_ROUNDS):
            t0 = time.perf_counter()
            await link.send(b"", {"ping": i})
            await link.recv()
            rtts.append(time.perf_counter() - t0)
        count = max(1, start.total_bytes // start.message_bytes)
        block = torch.arange(start.message_bytes // 4, dtype=torch.float32)
        crc, sent, last_report = 0, 0, 0.0
        t0 = time.perf_counter()
        for i in range(count):
            block[0] = float(i)
            await link.send_tensor(block, {"i": i})
            crc = zlib.crc32(memoryview(block.numpy()).cast("B"), crc)
            sent += block.numel() * 4
            now = time.perf_counter()
            if now - last_report > PROGRESS_EVERY:
                last_report = now
                await agent.send(m.LinkTestProgress(test_id=start.test_id, sent_bytes=sent, path=link.path))
        await link.send(b"", {"done": True, "count": count, "crc": crc})
        reply = (await link.recv()).meta
        seconds = time.perf_counter() - t0
        ok = bool(reply.get("ok")) and reply.get("bytes") == sent
        return m.LinkTestDone(
            test_id=start.test_id, ok=ok, bytes=sent, seconds=seconds, path=link.path,
            paths_used=sorted(link.paths_used), rtt_ms=round(statistics.median(rtts) * 1000, 3),
            error="" if ok else f"receiver counted {reply.get('count')} messages (crc {reply.get('crc')}), sent {count} (crc {crc})",
        )
    finally:
        await link.close()


def install(agent: Agent) -> None:
    agent.links.serve(CHANNEL, serve_linktest)
    agent.on(m.LinkTestStart, run_linktest)
