"""The device profile an agent reports, typed and bounded: unknown keys ignored, missing or hostile ones defaulted."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

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

    @classmethod
    def of(cls, raw: object) -> "DeviceProfile":
        """Type a reported profile field by field: a bad field falls back to its default, never an error."""
        if not isinstance(raw, dict):
            return cls()
        fields: dict[str, Any] = {}
        for name in cls.model_fields:
            if name not in raw:
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
        fields["listen_addrs"] = tuple((h, p) for h, p in fields.get("listen_addrs", ())
                                       if 0 < len(h) <= 255 and 0 < p < 65536)[:MAX_ADDRS]
        return cls(**fields)
