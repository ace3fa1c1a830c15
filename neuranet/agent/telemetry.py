"""Telemetry samples: CPU load, memory, network bytes and power state, via psutil."""

from __future__ import annotations

import time

import psutil

from neuranet.protocol.messages import TelemetrySample


class TelemetrySampler:
    def __init__(self) -> None:
        psutil.cpu_percent(None)  # the first call only starts the measurement window

    def sample(self) -> TelemetrySample:
        vm = psutil.virtual_memory()
        net = psutil.net_io_counters()
        battery = None
        try:
            battery = psutil.sensors_battery()
        except (AttributeError, NotImplementedError, OSError):
            pass
        return TelemetrySample(
            ts=time.time(),
            cpu_percent=psutil.cpu_percent(None),
            mem_percent=vm.percent,
            mem_used=vm.total - vm.available,
            net_sent=net.bytes_sent if net else 0,
            net_recv=net.bytes_recv if net else 0,
            battery_percent=battery.percent if battery else None,
            power_plugged=battery.power_plugged if battery else None,
        )
