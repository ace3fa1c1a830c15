"""The job plane on the wire (round trips are in test_protocol via protocol_samples): hostile fields are
refused, and a host's offer is read from its profile (a bad one ignored, never an error)."""

from __future__ import annotations

import dataclasses

import pytest

from neuranet.protocol import messages as m
from neuranet.protocol.device_profile import DeviceProfile
from neuranet.protocol.errors import InvalidMessage

D = "ab" * 32


@pytest.mark.parametrize("body", [
    {"attempt": 0}, {"archive": "../../etc/passwd"}, {"cpus": 0}, {"ram_bytes": -1}, {"time_limit_s": 0},
    {"args": ["x"] * 10_000}, {"job_id": ""},
])
def test_hostile_assignments_are_refused(body: dict) -> None:
    good = m.JobAssign(job_id="j1", attempt=1, archive=D, archive_bytes=1, entry="t.py", cpus=1, ram_bytes=1,
                       disk_bytes=1, time_limit_s=1).envelope()
    bad = dataclasses.replace(good, body={**good.body, **body})
    with pytest.raises(InvalidMessage):
        m.parse(bad)


def test_a_hosts_offer_is_read_from_its_profile() -> None:
    offer = {"cpus": 2, "ram_bytes": 8 * 2**30, "disk_bytes": 20 * 2**30, "gpus": 0, "os": "linux",
             "arch": "x86_64", "python": "3.11", "torch": "2.13.0", "sandbox": "bubblewrap 0.8.0"}
    profile = DeviceProfile.of({"cpu_gflops": 3.0, "jobs": offer})
    assert profile.jobs is not None and profile.jobs.cpus == 2 and profile.jobs.ram_bytes == 8 * 2**30
    assert DeviceProfile.of({"cpu_gflops": 3.0}).jobs is None  # hosts nothing by default
    hostile = DeviceProfile.of({"cpu_gflops": 3.0, "jobs": {**offer, "cpus": -4}})
    assert hostile.jobs is None and hostile.cpu_gflops == 3.0  # a bad offer is no offer, the rest stands
