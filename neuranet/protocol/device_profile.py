"""The device profile an agent reports, typed and bounded: unknown keys ignored, missing or hostile ones defaulted."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from neuranet.protocol.jobs import JobHostOffer

MAX_ADDRS = 32


class DeviceProfile(BaseModel):
    """What the books and the planner read of a device's profile (the raw JSON stays stored as sent)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    machine_id: str = ""
    cpu_gflops: float | None = None
    ram_available_bytes: int | None = None
    disk_free_bytes: int | None = None
    server_rtt_ms: float | None = None
    server_bandwidth_bps: float | None = None
    listen_addrs: tuple[tuple[str, int], ...] = ()
    jobs: JobHostOffer | None = None  # what it offers other users' jobs; None: it hosts none

    @classmethod
    def of(cls, raw: object) -> "DeviceProfile":
        """Type a reported profile field by field: a bad field falls back to its default, never an error."""
        if not isinstance(raw, dict):
            return cls()
        fields: dict[str, Any] = {}
        for name in cls.model_fields:
            if name not in raw or name == "listen_addrs":
                continue
            try:
                fields[name] = cls.model_validate({name: raw[name]}).__dict__[name]
            except ValidationError:
                continue
        fields["machine_id"] = fields.get("machine_id", "") if len(fields.get("machine_id", "")) <= 64 else ""
        for key in ("cpu_gflops", "ram_available_bytes", "disk_free_bytes", "server_rtt_ms", "server_bandwidth_bps"):
            value = fields.get(key)
            if value is not None and not (0 <= value < 1e18):
                fields[key] = None
        fields["listen_addrs"] = _addrs(raw.get("listen_addrs"))
        return cls(**fields)


def _addrs(listed: object) -> tuple[tuple[str, int], ...]:
    """The direct-link addresses a device advertised, keeping only well-formed (host, port) pairs, one by one."""
    out = []
    for item in listed if isinstance(listed, list) else []:
        if (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str) and 0 < len(item[0]) <= 255
                and type(item[1]) is int and 0 < item[1] < 65536):
            out.append((item[0], item[1]))
    return tuple(out[:MAX_ADDRS])
