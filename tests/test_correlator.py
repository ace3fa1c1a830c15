"""protocol.correlator: requests matched to answers by id; unknown ids ignored; all failed at once on loss."""

from __future__ import annotations

import asyncio

import pytest

from neuranet.errors import Unavailable
from neuranet.protocol.correlator import Correlator, TooManyPending


class Lost(Exception):
    pass


async def test_an_answer_resolves_its_request_only() -> None:
    c: Correlator[str] = Correlator("t")
    a, fa = c.new()
    b, fb = c.new()
    assert a != b
    assert c.resolve(b, "for b")
    assert await fb == "for b" and not fa.done()
    assert len(c) == 2  # answered but not discarded: the caller discards
    c.discard(b)
    assert b not in c and a in c


async def test_unknown_late_or_repeated_answers_are_ignored() -> None:
    c: Correlator[int] = Correlator()
    assert not c.resolve(99, 1) and not c.fail(99, Lost())
    i, f = c.new()
    assert c.resolve(i, 1) and not c.resolve(i, 2)  # a repeated answer changes nothing
    assert await f == 1
    c.discard(i)
    assert not c.resolve(i, 3)  # after the caller gave up on it
    assert not c.resolve("not an id", 3)


async def test_fail_delivers_the_error() -> None:
    c: Correlator[int] = Correlator()
    i, f = c.new()
    assert c.fail(i, Lost("gone"))
    with pytest.raises(Lost, match="gone"):
        await f


async def test_fail_all_ends_every_wait_or_only_those_tagged() -> None:
    c: Correlator[int] = Correlator()
    _, on_a = c.new(tag="conn-a")
    _, on_b = c.new(tag="conn-b")
    assert c.fail_all(lambda: Lost("a lost"), where=lambda tag: tag == "conn-a") == 1
    with pytest.raises(Lost, match="a lost"):
        await on_a
    assert not on_b.done()
    assert c.fail_all(Lost("all lost")) == 1  # the done one is not failed again
    with pytest.raises(Lost, match="all lost"):
        await on_b


async def test_pending_context_discards_on_exit_even_on_timeout() -> None:
    c: Correlator[int] = Correlator()
    with pytest.raises(TimeoutError):
        with c.pending(tag="x") as (i, f):
            assert c.tag(i) == "x"
            await asyncio.wait_for(f, 0)
    assert len(c) == 0 and c.tag(i) is None


async def test_given_ids_and_next_id() -> None:
    c: Correlator[int] = Correlator()
    i = c.next_id()
    assert c.new(id=i)[0] == i
    with pytest.raises(ValueError, match=f"request {i} is already waiting"):
        c.new(id=i)
    assert c.new()[0] == i + 1


async def test_the_count_in_flight_is_bounded() -> None:
    c: Correlator[int] = Correlator("chunk link", limit=2)
    a, _ = c.new()
    c.new()
    with pytest.raises(TooManyPending, match="chunk link: 2 requests already wait for answers; the limit is 2"):
        c.new()
    assert issubclass(TooManyPending, Unavailable)
    c.discard(a)
    c.new()


def test_a_bad_limit_is_refused() -> None:
    with pytest.raises(ValueError):
        Correlator(limit=0)


async def test_ids_off_the_wire_of_any_type_are_ignored() -> None:
    c: Correlator[int] = Correlator()
    i, f = c.new()
    for garbled in (None, [i], {"id": i}, str(i), float(i), True):
        assert not c.resolve(garbled, 1) and not c.fail(garbled, Lost()) and garbled not in c
        c.discard(garbled)
    assert i in c and not f.done()
