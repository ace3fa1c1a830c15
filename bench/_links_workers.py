"""The worker processes of bench/links.py: raw-socket baselines, the direct path's framing (plaintext and
TLS) and PeerLink agents, driven by commands.

A driver (``blocking_driver``, ``asyncio_driver``, ``frames_driver``) or an ``agent_process`` (role ``tx`` or ``rx``) first puts
``("ready", ...)`` on ``out_q``, then answers each command from ``cmd_q`` with ``("ok", value)``, or puts
``("error", traceback)`` and exits if it fails. Commands: ``("prep", key, size)`` builds the messages and warms
up, ``("tput", key, n_max, secs)`` and ``("rtt", key, count, secs)`` measure, ``("stop",)`` ends the process;
``frames_driver`` also takes ``("handshake", count)``; agent processes also take ``open``, ``agg``, ``paths``
and ``close``. The other end (a raw responder, or the
links an ``rx`` agent accepts) answers every message whose flag (raw) or meta (PeerLink) asks for it with ``ACK``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
import traceback
from pathlib import Path
from typing import Any, Awaitable, Callable

from _stats import MB, MiB

from neuranet.runner import run_service

HDR = struct.Struct(">IB")  # raw baselines: payload length, flag (1 = answer with an ack)
ACK = b"ack!ack!"  # the 8-byte reply
ACK_META = {"a": 1}
CHANNEL = "bench"
ACK_TIMEOUT = 60.0  # no single message may take longer than this to be acknowledged


# --- the measurement loops (shared by every transport) ------------------------------------


def _tput_result(n: int, size: int, dt: float) -> dict[str, Any]:
    return {"msgs": n, "bytes": n * size, "seconds": dt, "mbps": n * size / dt / MB}


async def tput_async(send: Callable[[bool], Awaitable[None]], recv_ack: Callable[[], Awaitable[None]],
                     size: int, n_max: int, secs: float) -> dict[str, Any]:
    """Stream up to ``n_max`` messages (bounded by ``secs``); the last asks for an ack."""
    t0 = time.perf_counter()
    deadline, n = t0 + secs, 0
    while True:
        n += 1
        last = n >= n_max or time.perf_counter() > deadline
        await send(last)
        if last:
            break
    await recv_ack()
    return _tput_result(n, size, time.perf_counter() - t0)


async def rtt_async(send: Callable[[bool], Awaitable[None]], recv_ack: Callable[[], Awaitable[None]],
                    count: int, secs: float) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + secs
    for _ in range(count):
        t = time.perf_counter()
        await send(True)
        await recv_ack()
        out.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() > deadline:
            break
    return out


def tput_sync(send: Callable[[bool], None], recv_ack: Callable[[], None], size: int, n_max: int,
              secs: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    deadline, n = t0 + secs, 0
    while True:
        n += 1
        last = n >= n_max or time.perf_counter() > deadline
        send(last)
        if last:
            break
    recv_ack()
    return _tput_result(n, size, time.perf_counter() - t0)


def rtt_sync(send: Callable[[bool], None], recv_ack: Callable[[], None], count: int, secs: float) -> list[float]:
    out: list[float] = []
    deadline = time.perf_counter() + secs
    for _ in range(count):
        t = time.perf_counter()
        send(True)
        recv_ack()
        out.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() > deadline:
            break
    return out


def warm_count(size: int) -> int:
    return 2 if size >= MiB else 50


# --- (a) blocking sockets ------------------------------------------------------------------


def _recv_exact(sock: socket.socket, view: memoryview, n: int) -> bool:
    got = 0
    while got < n:
        r = sock.recv_into(view[got:n], n - got, socket.MSG_WAITALL)
        if r == 0:
            return False
        got += r
    return True


def blocking_responder(port_q: Any, max_size: int) -> None:
    """Receive into one preallocated buffer and parse messages in place: one recv per socket-buffer-full."""
    srv = socket.create_server(("127.0.0.1", 0))
    port_q.put(srv.getsockname()[1])
    srv.settimeout(60)
    conn, _ = srv.accept()
    srv.close()
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray(max_size + HDR.size + 4 * MiB)
    view = memoryview(buf)
    start = end = 0  # unparsed bytes are buf[start:end]

    def fill(need: int) -> bool:
        """Receive until buf[start:end] holds ``need`` bytes (moving them to the front if they would not fit)."""
        nonlocal start, end
        if start + need > len(buf):
            buf[: end - start] = view[start:end]
            start, end = 0, end - start
        while end - start < need:
            r = conn.recv_into(view[end:])
            if r == 0:
                return False
            end += r
        return True

    with conn:
        while fill(HDR.size):
            size, flag = HDR.unpack_from(buf, start)
            if not fill(HDR.size + size):
                break
            start += HDR.size + size
            if start == end:
                start = end = 0
            if flag:
                conn.sendall(ACK)


def blocking_driver(port: int, cmd_q: Any, out_q: Any) -> None:
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.settimeout(None)  # blocking: the parent bounds every command in time
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ack = memoryview(bytearray(len(ACK)))
        msgs: list[bytes] = []
        size = 0

        def send(last: bool) -> None:
            sock.sendall(msgs[last])

        def recv_ack() -> None:
            if not _recv_exact(sock, ack, len(ACK)):
                raise ConnectionError("responder closed the connection")

        out_q.put(("ready", None))
        while True:
            cmd = cmd_q.get()
            op = cmd[0]
            if op == "stop":
                break
            if op == "prep":  # key, size: build the messages, warm up
                _, _key, size = cmd
                payload = os.urandom(size)
                msgs = [HDR.pack(size, 0) + payload, HDR.pack(size, 1) + payload]
                for _ in range(warm_count(size)):
                    send(True)
                    recv_ack()
                out_q.put(("ok", None))
            elif op == "tput":
                _, _key, n_max, secs = cmd
                out_q.put(("ok", tput_sync(send, recv_ack, size, n_max, secs)))
            elif op == "rtt":
                _, _key, count, secs = cmd
                out_q.put(("ok", rtt_sync(send, recv_ack, count, secs)))
        sock.close()
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


# --- (b) asyncio streams --------------------------------------------------------------------


def asyncio_responder(port_q: Any, max_size: int) -> None:
    async def main() -> None:
        done = asyncio.Event()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    size, flag = HDR.unpack(await reader.readexactly(HDR.size))
                    await reader.readexactly(size)
                    if flag:
                        writer.write(ACK)
                        await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()
                done.set()

        # limit=1 MiB like neuranet's DirectListener
        server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=MiB)
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(done.wait(), 600)
        server.close()

    run_service(main())


async def _drive(cmd_q: Any, out_q: Any, send: Callable[[bytes], Awaitable[None]],
                 recv_ack: Callable[[], Awaitable[None]], frame: Callable[[int, int, bytes], bytes],
                 handshake: Callable[[], Awaitable[float]] | None = None) -> None:
    """The command loop of an async driver: ``send(msg)`` writes one prepared message (``frame(size,
    flag, payload)``), ``recv_ack()`` waits for the ack, ``handshake()`` times one new connection."""
    msgs: list[bytes] = []
    size = 0

    async def send_msg(last: bool) -> None:
        await send(msgs[last])

    out_q.put(("ready", None))
    while True:
        cmd = await asyncio.to_thread(cmd_q.get)
        op = cmd[0]
        if op == "stop":
            break
        if op == "prep":
            _, _key, size = cmd
            payload = os.urandom(size)
            msgs = [frame(size, 0, payload), frame(size, 1, payload)]
            for _ in range(warm_count(size)):
                await send_msg(True)
                await recv_ack()
            out_q.put(("ok", None))
        elif op == "tput":
            _, _key, n_max, secs = cmd
            out_q.put(("ok", await tput_async(send_msg, recv_ack, size, n_max, secs)))
        elif op == "rtt":
            _, _key, count, secs = cmd
            out_q.put(("ok", await rtt_async(send_msg, recv_ack, count, secs)))
        elif op == "handshake" and handshake is not None:  # count: time this many new connections (ms each)
            _, count = cmd
            out_q.put(("ok", [await handshake() for _ in range(count)]))
        else:
            raise ValueError(f"unknown command {op!r}")


def asyncio_driver(port: int, cmd_q: Any, out_q: Any) -> None:
    async def main() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=MiB)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def send(msg: bytes) -> None:
            writer.write(msg)
            await writer.drain()

        async def recv_ack() -> None:
            await asyncio.wait_for(reader.readexactly(len(ACK)), ACK_TIMEOUT)

        await _drive(cmd_q, out_q, send, recv_ack, lambda size, flag, payload: HDR.pack(size, flag) + payload)
        writer.close()

    try:
        run_service(main())
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


# --- (c, d) the direct path's framing, plaintext and TLS ------------------------------------
#
# neuranet.net.framing.FrameProtocol over TCP, as a direct link uses it, without the link on top:
# once in plaintext (what direct paths were before they were encrypted) and once after the same
# TLS 1.3 switch a direct path makes (neuranet.net.tls: device certificates, each side pinned to
# the other's), so the two figures show what the encryption costs. A frame is a flag byte and the
# payload; the responder answers a flagged frame with ACK.

GO = b"go"  # the listener's plaintext go-ahead, as in the direct handshake


def frames_responder(port_q: Any, max_size: int, tls: dict[str, Any] | None) -> None:
    from neuranet.net.framing import FrameProtocol
    from neuranet.net.tls import link_context

    async def main() -> None:
        done = asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()
        accepted = 0

        async def serve(proto: FrameProtocol, main_conn: bool) -> None:
            try:
                assert proto.transport is not None
                proto.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if tls:
                    await proto.start_tls(link_context(tls["rx"], tls["tx_pin"], server_side=True), True, 30, first=GO)
                while True:
                    frame = await proto.read_frame()
                    if frame[0]:
                        await proto.write_frame(ACK)
            except (ConnectionError, OSError):
                pass
            finally:
                if main_conn:
                    done.set()

        def connected(proto: FrameProtocol) -> None:
            nonlocal accepted
            accepted += 1
            task = asyncio.ensure_future(serve(proto, accepted == 1))  # later ones: handshake probes
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: FrameProtocol(max_size + 1, on_connected=connected), "127.0.0.1", 0)
        port_q.put(server.sockets[0].getsockname()[1])
        await asyncio.wait_for(done.wait(), 600)
        server.close()

    run_service(main())


def frames_driver(port: int, tls: dict[str, Any] | None, cmd_q: Any, out_q: Any) -> None:
    from neuranet.net.framing import FrameProtocol
    from neuranet.net.tls import check_peer, link_context

    async def connect() -> FrameProtocol:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: FrameProtocol(MiB), "127.0.0.1", port)
        assert proto.transport is not None
        proto.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            if bytes(await asyncio.wait_for(proto.read_frame(), 30)) != GO:
                raise ConnectionError("no go-ahead from the responder")
            await proto.start_tls(link_context(tls["tx"], tls["rx_pin"], server_side=False), False, 30)
            check_peer(proto.transport.get_extra_info("ssl_object"), tls["rx_pin"])
        return proto

    async def main() -> None:
        proto = await connect()

        async def send(msg: bytes) -> None:
            await proto.write_frame(msg)

        async def recv_ack() -> None:
            await asyncio.wait_for(proto.read_frame(), ACK_TIMEOUT)

        async def handshake() -> float:
            t = time.perf_counter()
            probe = await connect()
            await probe.write_frame(b"\x01")  # one round trip through the new connection
            await asyncio.wait_for(probe.read_frame(), ACK_TIMEOUT)
            elapsed = (time.perf_counter() - t) * 1e3
            assert probe.transport is not None
            probe.transport.close()
            return elapsed

        await _drive(cmd_q, out_q, send, recv_ack, lambda size, flag, payload: bytes([flag]) + payload, handshake)
        assert proto.transport is not None
        proto.transport.close()

    try:
        run_service(main())
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


# --- (e, f) PeerLink agents -----------------------------------------------------------------


def agent_process(role: str, server_url: str, specs: list[dict[str, Any]], cmd_q: Any, out_q: Any) -> None:
    """One process holding several agents. ``tx`` opens links and measures; ``rx`` accepts and acks."""
    try:
        run_service(_agent_main(role, server_url, specs, cmd_q, out_q))
    except BaseException:
        out_q.put(("error", traceback.format_exc()))


async def _agent_main(role: str, server_url: str, specs: list[dict[str, Any]], cmd_q: Any, out_q: Any) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format=f"[{role}] %(name)s %(levelname)s %(message)s")
    from neuranet.agent.runtime import Agent
    from neuranet.config import AgentConfig
    from neuranet.net.peerlink import LinkClosed, PeerLink
    from neuranet.protocol.errors import PeerUnavailable, ProtocolError

    links: dict[str, PeerLink] = {}
    accepted: dict[int, list[PeerLink]] = {}
    tasks: list[asyncio.Task[Any]] = []

    async def respond(link: PeerLink) -> None:
        with contextlib.suppress(LinkClosed, PeerUnavailable, ProtocolError, ConnectionError):
            while True:
                msg = await link.recv()
                if msg.meta.get("a"):
                    await link.send(ACK)

    async def acceptor(i: int, agent: Agent) -> None:
        while True:
            link = await agent.links.accept(CHANNEL)
            accepted.setdefault(i, []).append(link)
            tasks.append(asyncio.create_task(respond(link)))

    def endpoint(link: PeerLink, size: int) -> tuple[Callable[[bool], Awaitable[None]], Callable[[], Awaitable[None]]]:
        payload = os.urandom(size)

        async def send(last: bool) -> None:
            await link.send(payload, ACK_META if last else None)

        async def recv_ack() -> None:
            msg = await asyncio.wait_for(link.recv(), ACK_TIMEOUT)
            if bytes(msg.payload) != ACK:
                raise AssertionError(f"unexpected reply of {len(msg.payload)} bytes")

        return send, recv_ack

    def path_info(link: PeerLink) -> dict[str, Any]:
        return {"path": link.path, "paths_used": sorted(link.paths_used)}

    async with contextlib.AsyncExitStack() as stack:
        agents: list[Agent] = []
        for spec in specs:
            cfg = AgentConfig(server_url=server_url, data_dir=Path(spec["data_dir"]), name=spec["name"],
                              join_token=spec["join_token"], listen_host="127.0.0.1", measure=False,
                              advertise=spec["advertise"],
                              # should a dial ever fail, retry after 1s rather than the default 10s
                              direct_retry_interval=spec.get("direct_retry_interval", 1.0))
            agents.append(await stack.enter_async_context(Agent(cfg)))
        await asyncio.gather(*(a.wait_connected(60) for a in agents))
        if role == "rx":
            for i, a in enumerate(agents):
                tasks.append(asyncio.create_task(acceptor(i, a)))
        out_q.put(("ready", [a.device_id for a in agents]))
        eps: dict[str, tuple[int, Callable[[bool], Awaitable[None]], Callable[[], Awaitable[None]]]] = {}
        try:
            while True:
                cmd = await asyncio.to_thread(cmd_q.get)
                op = cmd[0]
                if op == "stop":
                    break
                if op == "open":  # key, agent index, peer device id, wanted path
                    _, key, i, peer, want = cmd
                    deadline = time.monotonic() + 15
                    link = await agents[i].links.open(peer, channel=CHANNEL)
                    while link.path != want and time.monotonic() < deadline:
                        await asyncio.sleep(0.02)
                    links[key] = link
                    out_q.put(("ok", {**path_info(link), "open_s": time.monotonic() - deadline + 15}))
                elif op == "prep":
                    _, key, size = cmd
                    eps[key] = (size, *endpoint(links[key], size))
                    for _ in range(warm_count(size)):
                        await eps[key][1](True)
                        await eps[key][2]()
                    out_q.put(("ok", None))
                elif op == "tput":
                    _, key, n_max, secs = cmd
                    size, send, recv_ack = eps[key]
                    res = await tput_async(send, recv_ack, size, n_max, secs)
                    out_q.put(("ok", {**res, **path_info(links[key])}))
                elif op == "rtt":
                    _, key, count, secs = cmd
                    _, send, recv_ack = eps[key]
                    out_q.put(("ok", await rtt_async(send, recv_ack, count, secs)))
                elif op == "agg":  # every link sends at once; one shared clock
                    _, keys, size, n_max, secs = cmd
                    agg_eps = [endpoint(links[k], size) for k in keys]
                    for send, recv_ack in agg_eps:
                        await send(True)
                        await recv_ack()
                    t0 = time.perf_counter()
                    per = await asyncio.gather(*(tput_async(s, r, size, n_max, secs) for s, r in agg_eps))
                    wall = time.perf_counter() - t0
                    total = sum(p["bytes"] for p in per)
                    out_q.put(("ok", {"per_link": per, "wall": wall, "bytes": total, "mbps": total / wall / MB,
                                      "paths": [path_info(links[k]) for k in keys]}))
                elif op == "paths":  # rx: paths of the links agent i accepted
                    _, i = cmd
                    out_q.put(("ok", [path_info(link) for link in accepted.get(i, [])]))
                elif op == "close":
                    _, key = cmd
                    await asyncio.wait_for(links.pop(key).close(), 15)
                    out_q.put(("ok", None))
                else:
                    raise ValueError(f"unknown command {op!r}")
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
