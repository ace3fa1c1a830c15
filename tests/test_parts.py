"""protocol.parts: split and reassemble multi-part payloads; in order, fixed count, bounded, or refused."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neuranet.protocol.errors import InvalidMessage
from neuranet.protocol.parts import PartsRefused, Reassembler, join_bytes, split


def joiner(**kw) -> Reassembler[str, bytes, bytes]:
    return Reassembler(join_bytes, **{"max_parts": 16, "max_bytes": 1 << 20, **kw})


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=5000), st.integers(1, 700))
def test_split_then_reassemble_is_the_identity(blob: bytes, size: int) -> None:
    parts = split(blob, size)
    assert parts and all(len(p) <= size for p in parts)
    r = Reassembler(join_bytes, max_parts=len(parts), max_bytes=max(1, len(blob)))
    out = [r.add("k", i, len(parts), p) for i, p in enumerate(parts)]
    assert out[:-1] == [None] * (len(parts) - 1) and out[-1] == blob
    assert len(r) == 0


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=8), st.integers(1, 5))
def test_any_out_of_order_sequence_is_refused_and_forgotten(order: list[int], parts: int) -> None:
    """Whatever order parts come in, the payload is joined only from 0..parts-1 in order; the first
    part out of order is refused and nothing of that payload is kept."""
    r = joiner()
    expected = 0
    for part in order:
        if part == expected and part < parts:
            result = r.add("k", part, parts, bytes([part]))
            expected += 1
            if expected == parts:
                assert result == bytes(range(parts))
                expected = 0
            else:
                assert result is None
        else:
            with pytest.raises(PartsRefused):
                r.add("k", part, parts, bytes([part]))
            assert "k" not in r
            expected = 0


def test_empty_blob_is_one_empty_part() -> None:
    assert split(b"", 10) == [b""]
    assert joiner().add("k", 0, 1, b"") == b""


def test_split_refuses_a_size_below_one() -> None:
    with pytest.raises(ValueError):
        split(b"abc", 0)


def test_a_part_out_of_order_is_refused_with_what_was_expected() -> None:
    r = joiner(what="stage state")
    r.add("run1", 0, 3, b"a")
    with pytest.raises(PartsRefused, match=r"stage state run1: part 2 of 3 arrived after 1 parts \(expected part 1\)"):
        r.add("run1", 2, 3, b"c")
    assert "run1" not in r  # forgotten: a restart from part 0 works
    r.add("run1", 0, 3, b"a")
    r.add("run1", 1, 3, b"b")
    assert r.add("run1", 2, 3, b"c") == b"abc"


def test_a_repeated_part_is_refused() -> None:
    r = joiner()
    r.add("k", 0, 2, b"a")
    with pytest.raises(PartsRefused, match="part 0 of 2 arrived after 1 parts"):
        r.add("k", 0, 2, b"a")


def test_a_first_part_that_is_not_part_0_is_refused() -> None:
    with pytest.raises(PartsRefused, match="part 1 of 2 arrived before part 0"):
        joiner().add("k", 1, 2, b"b")


def test_a_changed_count_is_refused() -> None:
    r = joiner()
    r.add("k", 0, 3, b"a")
    with pytest.raises(PartsRefused, match="part 1 says 2 parts, but 3 were announced"):
        r.add("k", 1, 2, b"b")
    assert len(r) == 0


def test_an_expected_count_is_enforced() -> None:
    r = joiner()
    r.expect("w", 2)
    with pytest.raises(PartsRefused, match="part 0 says 3 parts, but 2 were announced"):
        r.add("w", 0, 3, b"a")


@pytest.mark.parametrize("parts", [0, -1, 17])
def test_a_count_out_of_bounds_is_refused(parts: int) -> None:
    with pytest.raises(PartsRefused, match="between 1 and 16 are accepted"):
        joiner().add("k", 0, parts, b"a")


def test_total_bytes_are_bounded() -> None:
    r = joiner(max_bytes=5)
    r.add("k", 0, 3, b"abc")
    with pytest.raises(PartsRefused, match="6 bytes after part 1, over the limit of 5"):
        r.add("k", 1, 3, b"def")
    assert "k" not in r


def test_payloads_in_progress_are_bounded_and_free_a_slot_when_done() -> None:
    r = joiner(max_pending=2)
    r.add("a", 0, 2, b"1")
    r.add("b", 0, 2, b"1")
    with pytest.raises(PartsRefused, match="2 payloads are already being received; the limit is 2"):
        r.add("c", 0, 2, b"1")
    assert r.add("a", 1, 2, b"2") == b"12"
    assert r.add("c", 0, 1, b"x") == b"x"


def test_keys_are_independent_and_drop_forgets_one() -> None:
    r = joiner()
    r.add("a", 0, 2, b"a0")
    r.add("b", 0, 2, b"b0")
    r.drop("a")
    assert "a" not in r and "b" in r
    assert r.add("b", 1, 2, b"b1") == b"b0b1"


def test_a_refusal_is_an_invalid_message_not_fatal_to_the_connection() -> None:
    assert issubclass(PartsRefused, InvalidMessage) and not PartsRefused.fatal


def test_a_custom_join_and_size() -> None:
    r: Reassembler[int, list[int], list[int]] = Reassembler(lambda ps: [x for p in ps for x in p], max_parts=4,
                                                            max_bytes=3, size=len)
    assert r.add(1, 0, 2, [1, 2]) is None
    assert r.add(1, 1, 2, [3]) == [1, 2, 3]


async def test_an_agent_refuses_resume_state_parts_out_of_order_saying_why(tmp_path, caplog) -> None:
    """The stage worker's resume state goes through the one reassembler: a part out of order is refused
    (logged, and the stage waiting for the state fails with why) instead of being dropped silently."""
    from neuranet.agent import stage_worker
    from neuranet.agent.runtime import Agent
    from neuranet.config import AgentConfig
    from neuranet.protocol import messages as m

    agent = Agent(AgentConfig(server_url="http://127.0.0.1:1", data_dir=tmp_path / "agent", join_token="jt",
                              measure=False, listen_host="127.0.0.1"))
    stage_worker.install(agent)
    state_part = agent._handlers[m.StageState]
    await state_part(agent, m.StageState(run_id="run1", attempt=0, part=1, parts=2), b"late")
    assert "run run1: resume state of ('run1', 0): part 1 of 2 arrived before part 0" in caplog.text
    await state_part(agent, m.StageState(run_id="run1", attempt=0, part=0, parts=2), b"ignored")  # failed already
