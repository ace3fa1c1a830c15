"""Fleet and DeviceProfile: online state, listeners in order, hostile profiles typed to defaults (no sockets)."""

from types import SimpleNamespace

from neuranet.protocol import messages as m
from neuranet.protocol.device_profile import DeviceProfile
from neuranet.server.fleet import Fleet


class _Conn(SimpleNamespace):
    def send(self, msg, *, payload=b""):
        self.sent.append(msg)


def test_online_host_send_and_listeners_in_order():
    conns = {}
    fleet = Fleet(conns)
    heard = []
    fleet.on_lost(lambda d: heard.append(("a", d)))
    fleet.on_lost(lambda d: 1 / 0)  # a failing listener does not stop the next
    fleet.on_lost(lambda d: heard.append(("b", d)))
    assert not fleet.online("d") and fleet.host("d") is None and not fleet.send("d", m.Heartbeat(seq=1))
    conns["d"] = _Conn(user_id="u", profile={"cpu_gflops": 5.0, "junk": 1}, sent=[])
    view = fleet.host("d")
    assert view is not None and view.online and view.profile.cpu_gflops == 5.0
    assert fleet.send("d", m.Heartbeat(seq=1)) and len(conns["d"].sent) == 1
    fleet.lost("d")
    assert heard == [("a", "d"), ("b", "d")]


def test_hostile_profiles_fall_back_to_defaults():
    assert DeviceProfile.of("nope") == DeviceProfile()
    p = DeviceProfile.of({"cpu_gflops": "fast", "ram_available_bytes": -5, "machine_id": "x" * 65,
                          "server_rtt_ms": float("inf"), "listen_addrs": [["h", 70000], ["ok", 1]] + [["a", 2]] * 99})
    assert p.cpu_gflops is None and p.ram_available_bytes is None and p.machine_id == "" and p.server_rtt_ms is None
    assert p.listen_addrs[0] == ("ok", 1) and len(p.listen_addrs) == 32


def test_views_carry_the_forecast_online_or_not():
    from neuranet.server.fleet import Outlook

    conns = {}
    outlooks = {"d": Outlook((0.9, 0.8, 0.5, 0.2), 3600.0)}
    fleet = Fleet(conns)
    assert fleet.view("d").p_online is None  # no forecast service wired: no forecast
    fleet.use_forecasts(outlooks.get)
    offline = fleet.view("d", "laptop", {"disk_free_bytes": 7}, user_id="u")
    assert not offline.online and offline.p_online == (0.9, 0.8, 0.5, 0.2) and offline.expected_online_seconds == 3600.0
    assert offline.profile.disk_free_bytes == 7 and offline.name == "laptop" and fleet.host("d") is None
    conns["d"] = _Conn(user_id="u", profile={"disk_free_bytes": 9}, sent=[])
    online = fleet.host("d", stored_profile={"disk_free_bytes": 7})
    assert online is not None and online.online and online.free_bytes == 9 and online.p_online == (0.9, 0.8, 0.5, 0.2)
    assert fleet.view("x").p_online is None and not fleet.view("x").online
