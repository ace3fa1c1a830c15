"""One or more valid instances of every protocol message, for round-trip tests (`test_protocol.py`
checks that every registered type has a sample here)."""

from __future__ import annotations

from neuranet.protocol import messages
from neuranet.protocol.messages import Message

_KEY = bytes(range(32))

D64 = "ab" * 32  # a SHA-256 hex digest

SAMPLES: dict[str, list[Message]] = {
    "hello": [
        messages.Hello(version=1, device_id="dev-1", agent_version="0.1.0"),
        messages.Hello(version=1, device_id="dev-1", server_nonce=_KEY),
        messages.Hello(
            version=1,
            enrol=messages.Enrolment(join_token="tok-12345678", public_key=_KEY, name="laptop"),
        ),
    ],
    "challenge": [
        messages.Challenge(nonce=_KEY * 2, device_id="dev-1"),
        messages.Challenge(nonce=_KEY, device_id="dev-1", server_key=_KEY, server_signature=bytes(64)),
    ],
    "auth": [messages.Auth(signature=bytes(64))],
    "welcome": [
        messages.Welcome(
            device_id="dev-1",
            user_id="u-1",
            heartbeat_interval=5.0,
            offline_after=20.0,
            max_message_bytes=1 << 20,
            max_queued_bytes=1 << 26,
        )
    ],
    "error": [messages.Error(code="too_large", message="nope", ref=12), messages.Error(code="x", message="")],
    "heartbeat": [messages.Heartbeat(seq=3)],
    "heartbeat_ack": [messages.HeartbeatAck(seq=3)],
    "profile": [messages.Profile(profile={"cpu": {"cores": 8}, "gpus": [], "ram": 1 << 34, "name": "box"})],
    "telemetry": [
        messages.Telemetry(
            samples=[
                messages.TelemetrySample(
                    ts=1.5, cpu_percent=12.5, mem_percent=40.0, mem_used=1 << 30, net_sent=10, net_recv=20
                ),
                messages.TelemetrySample(
                    ts=2.5,
                    cpu_percent=800.0,
                    mem_percent=0.0,
                    mem_used=0,
                    net_sent=0,
                    net_recv=0,
                    battery_percent=55.0,
                    power_plugged=False,
                ),
            ]
        ),
        messages.Telemetry(samples=[]),
    ],
    "echo": [messages.Echo(), messages.Echo(reply=True)],
    "link_open": [messages.LinkOpen(link_id="l-1", peer="dev-2")],
    "link_grant": [
        messages.LinkGrant(
            link_id="l-1",
            peer="dev-2",
            initiator=True,
            peer_addrs=[("10.0.0.2", 7000), ("fe80::1", 7001)],
            secret=bytes(16),
        ),
        messages.LinkGrant(link_id="l-1", peer="dev-2", initiator=False, secret=bytes(16), peer_key=_KEY,
                           peer_cert=b"0\x82" + bytes(300)),
    ],
    "link_refused": [messages.LinkRefusedMsg(link_id="l-1", peer="dev-2", code="offline", reason="the peer is not connected")],
    "peer_down": [messages.PeerDown(peer="dev-2")],
    "link_data": [
        messages.LinkData(link="l-1", seq=0, off=0, end=False, meta={"kind": "tensor", "shape": [2, 3]}),
        messages.LinkData(link="l-1", seq=5, off=4096, end=True),
    ],
    "link_ack": [messages.LinkAck(link="l-1", seq=-1, consumed=0), messages.LinkAck(link="l-1", seq=9, consumed=99)],
    "link_close": [messages.LinkClose(link="l-1")],
    "direct_start_tls": [messages.DirectStartTls(link="l-1")],
    "direct_hello": [messages.DirectHello(link="l-1", proof=_KEY)],
    "direct_ok": [messages.DirectOk(link="l-1")],
    "ping": [messages.Ping()],
    "pong": [messages.Pong()],
    "linktest_start": [messages.LinkTestStart(test_id="t", peer="dev-2", total_bytes=1 << 20, message_bytes=4096)],
    "linktest_progress": [messages.LinkTestProgress(test_id="t", sent_bytes=100, path="direct")],
    "linktest_done": [
        messages.LinkTestDone(test_id="t", ok=False, error="peer went away"),
        messages.LinkTestDone(test_id="t", ok=True, bytes=10, seconds=0.5, path="relay", paths_used=["relay", "direct"]),
    ],
    "stage_assign": [
        messages.StageAssign(run_id="r", stage=0, num_stages=2, model="mlp-digits", seed=1, start=0, stop=2,
                             next="dev-2", steps=5, batch_size=8, model_options={"hidden": 16}),
    ],
    "stage_progress": [messages.StageProgress(run_id="r", stage=1, attempt=2, step=3, loss=2.25),
                       messages.StageProgress(run_id="r", stage=0, attempt=0, step=3)],
    "stage_state": [messages.StageState(run_id="r", attempt=1, part=0, parts=2)],
    "stage_abort": [messages.StageAbort(run_id="r", reason="device d went offline")],
    "serve_assign": [messages.ServeAssign(run_id="r", stage=1, num_stages=3, model="all-minilm-l6-v2", start=3,
                                          stop=6, prev="a", next="c", weights_parts=2)],
    "serve_weights": [messages.ServeWeights(run_id="r", part=0, parts=2)],
    "serve_status": [messages.ServeStatus(run_id="r", stage=0, ok=True),
                     messages.ServeStatus(run_id="r", stage=2, ok=False, error="OSError: no such file")],
    "serve_input": [messages.ServeInput(run_id="r", request=7, part=0, parts=2,
                                        tensor={"dtype": "int64", "shape": [4, 2, 9]})],
    "serve_output": [messages.ServeOutput(run_id="r", stage=2, request=7, tensor={"dtype": "float32", "shape": [4, 384]}),
                     messages.ServeOutput(run_id="r", stage=1, request=8, error="ValueError: bad shape")],
    "serve_stop": [messages.ServeStop(run_id="r", reason="stopped by its owner")],
    "chunk_put": [messages.ChunkPut(request=1, chunk="a" * 64)],
    "chunk_fetch": [messages.ChunkFetch(request=2, chunk="0123456789abcdef" * 4)],
    "chunk_copy": [messages.ChunkCopy(request=3, chunk="e" * 64, target="device-b")],
    "chunk_delete": [messages.ChunkDelete(chunks=[]), messages.ChunkDelete(chunks=["b" * 64, "c" * 64]),
                     messages.ChunkDelete(chunks=["b" * 64], grace=600.0)],
    "chunk_reply": [messages.ChunkReply(request=1, chunk="a" * 64, ok=True, free_bytes=10),
                    messages.ChunkReply(request=2, chunk="a" * 64, ok=False, held=False, error="not held here"),
                    messages.ChunkReply(request=3, chunk="e" * 64, ok=True, free_bytes=5, target_free_bytes=7)],
    "chunk_place": [messages.ChunkPlace(request=4, chunk="a" * 64, size=10, replicas=3),
                    messages.ChunkPlace(request=5, chunk="a" * 64, size=10, replicas=2, exclude=["d1"])],
    "chunk_stored": [messages.ChunkStored(request=6, chunk="a" * 64, size=10, devices=["d1", "d2"])],
    "chunk_placed": [messages.ChunkPlaced(request=4, chunk="a" * 64, holders=["d0"], targets=["d1", "d2"]),
                     messages.ChunkPlaced(request=7, chunk="a" * 64, error="storage quota full")],
    "chunk_lost": [messages.ChunkLost(chunks=["f" * 64])],
    "chunk_inventory": [messages.ChunkInventory(quota_bytes=2 ** 30, used_bytes=0, chunks=["d" * 64]),
                        messages.ChunkInventory(quota_bytes=2 ** 30, used_bytes=64, chunks=["d" * 64], last=False)],
    "stage_weights": [messages.StageWeights(run_id="r", stage=1, attempt=0, part=0, parts=3)],
    "stage_done": [messages.StageDone(run_id="r", stage=1, attempt=0, ok=True),
                   messages.StageDone(run_id="r", stage=0, attempt=1, ok=False, error="ValueError: boom")],
    "job_assign": [messages.JobAssign(job_id="j1", attempt=2, archive=D64, archive_bytes=10, entry="train.py",
                                      args=["--epochs", "2"], requirements=["tinypkg==1.0"], cpus=2,
                                      ram_bytes=2**30, disk_bytes=2**31, time_limit_s=60, checkpoint=D64,
                                      checkpoint_bytes=5, checkpoint_dir="ckpt"),
                   messages.JobAssign(job_id="j1", attempt=1, archive=D64, archive_bytes=1, entry="t.py", cpus=0.5,
                                      ram_bytes=1, disk_bytes=1, time_limit_s=1)],
    "job_fetch": [messages.JobFetch(job_id="j1", attempt=2, what="checkpoint", offset=1024)],
    "job_data": [messages.JobData(job_id="j1", attempt=2, what="archive", offset=0, last=True),
                 messages.JobData(job_id="j1", attempt=2, what="checkpoint", error="no such checkpoint")],
    "job_status": [messages.JobStatus(job_id="j1", attempt=2, state="running", detail="step 3")],
    "job_log": [messages.JobLog(job_id="j1", attempt=2, stream="stderr", offset=99)],
    "job_upload": [messages.JobUpload(job_id="j1", attempt=2, kind="outputs", digest=D64, size=3, part=0, parts=1)],
    "job_done": [messages.JobDone(job_id="j1", attempt=2, outcome="failed", exit_code=1,
                                  reason="killed: memory limit 1 GiB", cpu_seconds=1.5, wall_seconds=2.0,
                                  max_rss_bytes=2**20),
                 messages.JobDone(job_id="j1", attempt=3, outcome="succeeded", exit_code=0, outputs=D64)],
    "job_stop": [messages.JobStop(job_id="j1", attempt=2, reason="cancelled by its owner")],
}
