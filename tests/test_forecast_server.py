"""The coordinator's forecasts: imported traces, retraining, REST/CLI, and real agents coming and going."""

from __future__ import annotations

import signal
import time

import numpy as np
import pytest

from fabric_helpers import free_port
from neuranet.client import ClientError
from neuranet.fabric import LocalFabric

pytestmark = pytest.mark.slow
DAY = 86400
FAST = '{"epochs": 2, "hidden": 32, "members": 1, "min_steps": 300, "augment": 0}'  # small: the tests check behaviour, bench/forecast.py quality


def office_and_roamer_trace(hosts: int = 4, days: int = 8, seed: int = 0, shift: float = 0.0) -> str:
    """Office hosts online every day from about 08:00 to 18:00 (a little jitter); roamers online for
    sessions of 1-6 h at any hour with 0.5-4 h gaps: together they teach both time of day and persistence.
    ``shift`` moves the office day (08:00 + shift to 18:00 + shift) and the trace's end (midnight + shift)."""
    rng = np.random.default_rng(seed)
    rows = ["client_id,event_type,event_start,event_end"]
    end_of_trace = days * DAY + shift
    for h in range(hosts):
        t = 0.0
        for d in range(days):
            on = d * DAY + 8 * 3600 + shift + rng.integers(-1800, 1800)
            off = d * DAY + 18 * 3600 + shift + rng.integers(-1800, 1800)
            rows += [f"office{h},0,{t:.0f},{on:.0f}", f"office{h},1,{on:.0f},{off:.0f}"]
            t = off
        rows.append(f"office{h},0,{t:.0f},{end_of_trace:.0f}")
        # Drawn back from the trace's end, so that what the roamers do before "now" is the same whatever
        # the shift, that is whatever the hour the test runs at.
        t, state, sessions = end_of_trace, 1, []
        while t > 0:
            start = max(0.0, t - (rng.uniform(1, 6) if state else rng.uniform(0.5, 4)) * 3600)
            sessions.append(f"roamer{h},{state},{start:.0f},{t:.0f}")
            t, state = start, 1 - state
        rows += reversed(sessions)
    return "\n".join(rows) + "\n"


def office_shift(now: float | None = None) -> float:
    """Seconds to move the office day by so that ``now`` (UTC) falls at 03:00 office time."""
    now = time.time() if now is None else now
    return float((now % DAY - 3 * 3600) % DAY)


@pytest.fixture(scope="module")
def fabric(tmp_path_factory: pytest.TempPathFactory):
    with LocalFabric(tmp_path_factory.mktemp("forecast"), server_args=["--forecast-options", FAST]) as f:
        f.start_server(port=free_port())
        yield f


def test_before_the_first_fit_forecasts_say_they_are_persistence(fabric: LocalFabric) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    # First in this module: the server fits its first model a minute after it starts, or on demand.
    with fabric.client() as c:
        c.import_trace(b"client_id,event_type,event_start,event_end\n0,0,0,3600\n0,1,3600,7200\n", prefix="early")
        row = next(r for r in c.forecast() if r["name"] == "early-0")
    assert row["method"] == "persistence" == row["model"]["kind"] and row["model"]["trained_at"] is None
    assert row["online"] and row["expected_online_seconds"] is None  # unknown, not "0 s" next to P = 1
    assert all(h["p_online"] == 1.0 for h in row["horizons"])  # persistence: as it is now
    result = CliRunner().invoke(app, ["forecast", "early-0", "--server", fabric.url, "--token", fabric.token])
    assert result.exit_code == 0, result.output
    assert "no forecast model trained yet" in result.output and "showing persistence" in result.output
    assert "0.0 h" not in result.output, result.output


@pytest.mark.timeout(150)  # the retrain takes seconds with FAST and this trace (it once took 300 s)
def test_imported_trace_trains_the_forecaster_and_forecasts_follow_the_schedule(fabric: LocalFabric) -> None:
    with fabric.client() as c:
        # The office day is placed so that the next tests' real agent, forecast at the wall clock's time
        # of day, sits in the offices' night (03:00 office time): at 07:45 UTC an unshifted office day
        # would rightly expect a device back by 08:00.
        shift = office_shift()
        out = c.import_trace(office_and_roamer_trace(shift=shift).encode(), prefix="sim")
        assert out["devices"] == 8 and out["days"] == pytest.approx(8 + shift / DAY, abs=0.01)
        refreshed = c.events(kinds=["forecast"], reconnect=False)
        assert next(refreshed).kind == "stream.open"
        info = c.retrain_forecaster()
        assert info["devices"] >= 8 and info["kind"] == "mlp"
        told = next(refreshed)  # every user hears of the refresh, which names no one's devices
        assert (told.kind, told.data) == ("forecast.refreshed", {"trained_at": info["trained_at"]})
        refreshed.close()
        rows = c.forecast()
    office = [r for r in rows if r["name"].startswith("sim-office")]
    assert len(office) == 4 and all(r["simulated"] for r in office)
    for r in office:  # the trace ends at midnight: every host is offline and comes back around 08:00
        p = {h["seconds"]: h["p_online"] for h in r["horizons"]}
        assert not r["online"] and r["expected_online_seconds"] == 0
        assert p[900] < 0.2 and p[3600] < 0.2 and p[21600] < 0.3  # 00:15, 01:00, 06:00: still asleep
        assert p[86400] < 0.3  # midnight again


def test_a_real_agent_coming_and_going_moves_its_forecast(fabric: LocalFabric) -> None:
    fabric.start_agent("comer", extra=["--no-measure"])
    devices = fabric.wait_online(["comer"])
    device_id = devices["comer"]["id"]
    with fabric.client() as c:
        online = c.forecast(device_id)
        assert online["online"] and online["model"]["kind"] == "mlp"
        fabric.kill_agent("comer", signal.SIGKILL)
        deadline = time.monotonic() + 60
        while c.forecast(device_id)["online"]:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        offline = c.forecast(device_id)
    p_on = {h["seconds"]: h["p_online"] for h in online["horizons"]}
    p_off = {h["seconds"]: h["p_online"] for h in offline["horizons"]}
    # The next 15 minutes follow what the device is doing now. The margin is small: a device seconds old
    # has no past for the small FAST model to go on, and how far it moves depends on the hour the test
    # runs at (the trace ends at a week boundary before now); 0.3 failed at 12:00 UTC.
    assert p_on[900] - p_off[900] > 0.05
    assert online["expected_online_seconds"] > 0 == offline["expected_online_seconds"]
    assert offline["history"] and offline["history"][-1][1] is not None  # its online stretch has ended


def test_cli_forecast_table_and_plot(fabric: LocalFabric, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    auth = ["--server", fabric.url, "--token", fabric.token]
    result = CliRunner().invoke(app, ["forecast", *auth])
    assert result.exit_code == 0, result.output
    assert "sim-office0" in result.output and "24h" in result.output
    png = tmp_path / "f.png"
    result = CliRunner().invoke(app, ["forecast", "sim-office3", "--plot", str(png), *auth])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = CliRunner().invoke(app, ["forecast", "no-such-device", *auth])
    assert bad.exit_code == 1 and "no device matches 'no-such-device'" in bad.output


def test_bad_traces_and_unknown_devices_get_clear_errors(fabric: LocalFabric, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    with fabric.client() as c:
        with pytest.raises(ClientError, match="422: .*line 3.*event_type must be 0"):
            c.import_trace(b"client_id,event_type,event_start,event_end\n1,1,0,10\n1,7,10,20\n")
        with pytest.raises(ClientError, match="422: .*overlap"):
            c.import_trace(b"client_id,event_type,event_start,event_end\n1,1,0,100\n1,0,50,200\n")
        with pytest.raises(ClientError, match="422: .*header must be"):
            c.import_trace(b"a,b,c\n1,2,3\n")
        with pytest.raises(ClientError, match="422: .*numbers"):
            c.import_trace(b"client_id,event_type,event_start,event_end\n1,1,zero,10\n")
        with pytest.raises(ClientError, match="404: no device nope"):
            c.forecast("nope")
    missing = CliRunner().invoke(app, ["trace", "import", str(tmp_path / "absent.csv"),
                                       "--server", fabric.url, "--token", fabric.token])
    assert missing.exit_code == 1 and "absent.csv" in missing.output


def test_importing_a_trace_twice_is_refused_replace_swaps_it_and_rm_removes_it(fabric: LocalFabric, tmp_path) -> None:
    from typer.testing import CliRunner

    from neuranet.cli import app

    auth = ["--server", fabric.url, "--token", fabric.token]
    trace = tmp_path / "dup.csv"
    trace.write_text(office_and_roamer_trace(hosts=2, days=3))
    cli = CliRunner()
    first = cli.invoke(app, ["trace", "import", str(trace), "--prefix", "dup", *auth])
    assert first.exit_code == 0 and "imported 4 simulated devices" in first.output, first.output
    again = cli.invoke(app, ["trace", "import", str(trace), "--prefix", "dup", *auth])
    assert again.exit_code == 1 and "--replace" in again.output and "trace rm dup" in again.output, again.output
    replaced = cli.invoke(app, ["trace", "import", str(trace), "--prefix", "dup", "--replace", *auth])
    assert replaced.exit_code == 0, replaced.output
    one = cli.invoke(app, ["forecast", "dup-office1", "--json", *auth])  # one device of that name, not two
    assert one.exit_code == 0 and '"name": "dup-office1"' in one.output, one.output
    listed = cli.invoke(app, ["trace", "ls", *auth])
    assert listed.exit_code == 0 and "dup\t4 devices" in listed.output, listed.output
    removed = cli.invoke(app, ["trace", "rm", "dup", *auth])
    assert removed.exit_code == 0 and "removed 4 simulated devices of dup" in removed.output, removed.output
    with fabric.client() as c:
        assert not [d for d in c.devices() if d["name"].startswith("dup-")]
    gone = cli.invoke(app, ["trace", "rm", "dup", *auth])
    assert gone.exit_code == 1 and "no trace imported as 'dup'" in gone.output
