"""Every wire message by name: a re-export of the planes, so ``messages.X`` reaches any message.

Each plane has its own module: `control` (handshake, heartbeats, profile, telemetry, errors, echo),
`links` (link open / grant / refusal, data frames, peer down, link tests), `runs` (training stages),
`serving` (served stages and requests), `chunks` (the file chunk plane) and `jobs` (the compute market). The base class, the
registry and ``parse`` are in `message_base`.
"""

# ruff: noqa: F401  (everything here is re-exported)

from neuranet.protocol.message_base import ID_FIELD, INT64_MAX, MAX_ID_CHARS, MESSAGE_TYPES, Message, Text, parse
from neuranet.protocol.control import (  # noqa: F401
    MAX_CERT_BYTES, DEVICE_ID_PATTERN, DEVICE_NAME_MAX, Enrolment, Hello, Challenge, Auth, Welcome, Error,
    Heartbeat, HeartbeatAck, PROFILE_BOUNDS, Profile, TelemetrySample, Telemetry, Echo)
from neuranet.protocol.links import (  # noqa: F401
    LinkOpen, LinkGrant, LinkRefusalCode, LinkRefusedMsg, PeerDown, LinkData, LinkAck, LinkClose, DirectStartTls, DirectHello,
    DirectOk, Ping, Pong, LinkTestStart, LinkTestProgress, LinkTestDone)
from neuranet.protocol.runs import (  # noqa: F401
    StageAssign, StageProgress, StageWeights, STATE_PART_BYTES, state_parts, StageState, StageDone,
    StageAbort)
from neuranet.protocol.serving import (  # noqa: F401
    ServeAssign, ServeWeights, ServeStatus, ServeInput, ServeOutput, ServeStop)
from neuranet.protocol.chunks import (  # noqa: F401
    ChunkPut, ChunkFetch, ChunkName, MAX_CHUNK_NAMES, chunk_batches, ChunkDelete, ChunkCopy, ChunkReply,
    ChunkPlace, ChunkStored, ChunkPlaced, ChunkLost, ChunkInventory)
from neuranet.protocol.jobs import (  # noqa: F401
    JobHostOffer, JobAssign, JobFetch, JobData, JobStatus, JobLog, JobUpload, JobDone, JobStop, JOB_PART_BYTES,
    job_parts)
