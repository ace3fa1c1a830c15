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
