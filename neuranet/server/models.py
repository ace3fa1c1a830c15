"""SQLAlchemy 2 table models of the coordinator (schema changes go through Alembic)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Double, ForeignKey, Index, Integer, LargeBinary, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Double)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)  # its tokens and devices are refused


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float | None] = mapped_column(Double, nullable=True)  # None: never


class JoinToken(Base):
    __tablename__ = "join_tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Double)
    expires_at: Mapped[float] = mapped_column(Double)
    used_by: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Device(Base):
    __tablename__ = "devices"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    profile: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Double)
    last_seen: Mapped[float | None] = mapped_column(Double, nullable=True)
    # One name per owner: names pick devices (`--devices NAME`), so two alike would be ambiguous.
    __table_args__ = (Index("ix_devices_user_name", "user_id", "name", unique=True),)


class PresenceInterval(Base):
    """One stretch of time a device was connected; ``end`` is NULL while it lasts."""

    __tablename__ = "presence_intervals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    start: Mapped[float] = mapped_column(Double)
    end: Mapped[float | None] = mapped_column(Double, nullable=True)
    __table_args__ = (Index("ix_presence_device_start", "device_id", "start"),)


class TelemetryRow(Base):
    __tablename__ = "telemetry"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[float] = mapped_column(Double)
    cpu_percent: Mapped[float] = mapped_column(Double)
    mem_percent: Mapped[float] = mapped_column(Double)
    mem_used: Mapped[int] = mapped_column(BigInteger)
    net_sent: Mapped[int] = mapped_column(BigInteger)
    net_recv: Mapped[int] = mapped_column(BigInteger)
    battery_percent: Mapped[float | None] = mapped_column(Double, nullable=True)
    power_plugged: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    __table_args__ = (Index("ix_telemetry_device_ts", "device_id", "ts"),)


class Run(Base):
    """A set of devices the server has put to work together (pipelines, jobs)."""

    __tablename__ = "runs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[float] = mapped_column(Double)
    # Persisted work (None for runs recorded before it was): "running", "recovering", "finished", "failed" for
    # training; "loading", "ready", "failed", "stopped" for deployments.
    state: Mapped[str | None] = mapped_column(String(16), nullable=True, index=True)
    attempt: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    spec: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)  # what restarts it (RunState.record)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[float | None] = mapped_column(Double, nullable=True)


class RunDevice(Base):
    __tablename__ = "run_devices"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True)


class RunCheckpoint(Base):
    """One stage's state after ``step`` steps of a run, a blob named by its sha256 (`server/blobs.py`)."""

    __tablename__ = "run_checkpoints"
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    stage: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer)
    digest: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class StoredFile(Base):
    """A user's file: its chunks in order are `FileChunk` rows; ``sealing`` says how it was encrypted.

    ``size`` and ``sha256`` are of the stored bytes, so a sealed file's are its ciphertext's
    (files sealed in the first format recorded the plaintext's: `neuranet.storage.sealing`)."""

    __tablename__ = "files"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    replicas: Mapped[int] = mapped_column(Integer)
    sealing: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Double)
    __table_args__ = (Index("ix_files_user_name", "user_id", "name", unique=True),)


class FileChunk(Base):
    __tablename__ = "file_chunks"
    file_id: Mapped[str] = mapped_column(ForeignKey("files.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    chunk_id: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    __table_args__ = (Index("ix_file_chunks_chunk", "chunk_id"),)


class ChunkReplica(Base):
    """A device that holds a copy of one of a user's chunks (chunks are kept once per user)."""

    __tablename__ = "chunk_replicas"
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    chunk_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True, index=True)
    size: Mapped[int] = mapped_column(Integer)
    stored_at: Mapped[float] = mapped_column(Double)
