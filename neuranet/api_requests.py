"""The bodies the coordinator's REST API takes, typed: one model per request shape.

The routers validate requests with them (``/openapi.json`` documents them), `neuranet.client` builds
its requests from them, and a web UI can read them from ``/openapi.json``. Pydantic (and pure checks
from lower layers) only; no server, storage or network code. Their answers are in `api_models`.

Every field, whatever its type, holds only storable values (`ApiModel`): text that cannot be encoded
(lone surrogates), numbers that do not fit in 64 bits or are not finite, free-form values nested too
deep are refused here, before anything is stored or sent to a device.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator, model_validator

from neuranet.pipeline.schedules import OPTIMIZER_NAMES, SCHEDULES, UnknownSchedule
from neuranet.protocol.json_values import INT64_MAX, JsonBounds, JsonValueError, check_json_value
from neuranet.storage.chunks import MAX_CHUNK_SIZE, MAX_FILE_BYTES, MAX_FILE_CHUNKS
from neuranet.storage.sealing import SEALING_OVERHEAD, parse_description

# Free-form values inside a request body: the body limit bounds their size; depth is what breaks.
BODY_VALUE_BOUNDS = JsonBounds(max_depth=16, max_items=2_000_000, max_string=2_000_000)
API_TOKEN_TTL = 90 * 24 * 3600.0  # default life of a new API token
MAX_TOKEN_LIFE = 10 * 365 * 24 * 3600.0
# Seconds an API token stays valid; null: until revoked.
TokenLife = Field(API_TOKEN_TTL, gt=0, le=MAX_TOKEN_LIFE)
MAX_LINKTEST_BYTES = 4 * 1024**3
MAX_PROFILED_BYTES = 2 * 2**30  # the coordinator builds the model once to profile its layers
MAX_USER_MODEL_BYTES = 1_000_000
MODEL_OPTIONS_BOUNDS = JsonBounds(max_depth=4, max_items=1000, max_string=1000)
MAX_INPUTS = 4096
MAX_REPLICAS = 16


class ApiModel(BaseModel):
    """Base of REST request bodies: every field, whatever its type, holds only storable values."""

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, BaseModel):
            return value  # a nested ApiModel checked its own fields
        if isinstance(value, list) and value and isinstance(value[0], BaseModel):
            return value
        try:
            return check_json_value(value, BODY_VALUE_BOUNDS, info.field_name or "value")
        except JsonValueError as exc:
            raise ValueError(str(exc)) from None


# --- identity: users, tokens; link tests --------------------------------------------------


class TokenRequest(ApiModel):
    name: str = Field("cli", min_length=1, max_length=100)
    expires_in_seconds: float | None = TokenLife


class JoinTokenRequest(ApiModel):
    ttl_seconds: float = Field(24 * 3600, gt=0, le=30 * 24 * 3600)


class UserRequest(ApiModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")
    is_admin: bool = False
    token_expires_in_seconds: float | None = TokenLife  # of the user's first API token


class LinkTestRequest(ApiModel):
    src: str
    dst: str
    total_bytes: int = Field(64 * 1024 * 1024, gt=0, le=MAX_LINKTEST_BYTES)
    message_bytes: int = Field(1024 * 1024, gt=0, le=32 * 1024 * 1024)


# --- training runs ------------------------------------------------------------------------


class LayerProfileIn(ApiModel):
    name: str = Field(max_length=200)
    flops: float = Field(ge=0)
    activation_bytes: int = Field(ge=0)
    param_bytes: int = Field(ge=0, le=MAX_PROFILED_BYTES)
    saved_bytes: int = Field(ge=0)


class UserModel(ApiModel):
    """A model file of the user's own: its source runs only on the user's devices, never on the coordinator,
    which plans from the layer profiles the user's client measured."""

    source: str = Field(min_length=1, max_length=MAX_USER_MODEL_BYTES)
    layers: list[LayerProfileIn] = Field(min_length=1, max_length=10_000)

    @model_validator(mode="after")
    def _checkpointable(self) -> "UserModel":
        """The coordinator keeps the stages' checkpoints: the same bound as a built-in model it profiles."""
        total = sum(layer.param_bytes for layer in self.layers)
        if total > MAX_PROFILED_BYTES:
            raise ValueError(f"the model has {total / 2**30:.1f} GiB of parameters; the coordinator keeps "
                             f"checkpoints of models up to {MAX_PROFILED_BYTES / 2**30:.0f} GiB")
        return self


class RunRequest(ApiModel):
    model: str = Field(min_length=1, max_length=64)  # a built-in model, or the name of the user's model file
    devices: list[str] | int | None = None  # ids/names, a count, or None for all online devices
    steps: int = Field(100, ge=1, le=1_000_000)
    batch_size: int = Field(32, ge=1, le=65536)
    microbatches: int = Field(4, ge=1, le=1024)
    schedule: str = "1f1b"
    optimizer: str = "sgd"
    lr: float = Field(0.05, gt=0, le=10)
    seed: int = Field(0, ge=0, le=INT64_MAX)
    data_seed: int = Field(0, ge=0, le=INT64_MAX)
    model_options: dict[str, Any] = Field(default_factory=dict)
    use_all_devices: bool = False  # split over exactly the chosen devices, in order, instead of a planned subset
    # steps between stage checkpoints; 0: only the final state; None: from the devices' forecast availability
    checkpoint_every: int | None = Field(None, ge=0)
    user_model: UserModel | None = None
    data: str | None = Field(None, max_length=64)  # the dataset to train on; None: the model's own

    @model_validator(mode="after")
    def _bounded_options(self) -> "RunRequest":
        check_json_value(self.model_options, MODEL_OPTIONS_BOUNDS, "model_options")
        return self

    @field_validator("schedule")
    @classmethod
    def _known_schedule(cls, name: str) -> str:
        if name.lower() not in SCHEDULES:
            raise ValueError(str(UnknownSchedule(name)))
        return name.lower()

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        if name.lower() not in OPTIMIZER_NAMES:
            raise ValueError(f"unknown optimiser {name!r}; choose one of: {', '.join(OPTIMIZER_NAMES)}")
        return name.lower()


# --- deployments --------------------------------------------------------------------------


class DeployRequest(ApiModel):
    model: str | None = Field(None, min_length=1, max_length=64)  # a built-in model, or None with ``run``
    run: str | None = Field(None, min_length=1, max_length=64)  # serve the final weights of this training run
    devices: list[str] | int | None = None
    seed: int = Field(0, ge=0, le=INT64_MAX)
    model_options: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(8, ge=1, le=MAX_INPUTS)  # typical request size, for the latency plan
    use_all_devices: bool = False


class InferRequest(ApiModel):
    inputs: list[Any] = Field(min_length=1, max_length=MAX_INPUTS)


class GenerateRequest(ApiModel):
    prompt: str = Field(min_length=1, max_length=10_000)
    max_new_tokens: int = Field(100, ge=0, le=10_000)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    seed: int = Field(0, ge=0, le=INT64_MAX)


# --- files --------------------------------------------------------------------------------


class ChunkIn(ApiModel):
    id: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=MAX_CHUNK_SIZE)


class FileIn(ApiModel):
    name: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0, le=MAX_FILE_BYTES)  # stored bytes (the ciphertext's when sealed)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # of the stored bytes (the ciphertext's when sealed)
    replicas: int = Field(3, ge=1, le=MAX_REPLICAS)
    sealing: dict[str, Any] | None = None
    chunks: list[ChunkIn] = Field(max_length=MAX_FILE_CHUNKS)
    overwrite: bool = False

    @model_validator(mode="after")
    def _chunks_hold_the_file(self) -> "FileIn":
        """The chunks hold exactly the file's stored bytes. A sealed file is recorded by what its
        ciphertext shows: its chunks, their total size and hash, and the sealing (salt, KDF
        parameters, sealed manifest); its plaintext's size and hash stay sealed."""
        held = sum(c.size for c in self.chunks)
        sealed = "sealed " if self.sealing is not None else ""
        if held != self.size:
            raise ValueError(f"the {len(self.chunks)} {sealed}chunk(s) hold {held} bytes, not the file's {self.size}")
        if self.sealing is None:
            return self
        parse_description(self.sealing, legacy=False)
        short = next((c for c in self.chunks if c.size <= SEALING_OVERHEAD), None)
        if short is not None:
            raise ValueError(f"sealed chunk {short.id[:12]} holds {short.size} bytes; a sealed chunk holds at least "
                             f"{SEALING_OVERHEAD + 1}")
        return self
