"""SendWindow / ReceiveWindow: go-back-N sequencing with byte credit (pure state, no I/O)."""

from __future__ import annotations

import collections
import pickle
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from neuranet.net.window import Delivered, ReceiveWindow, SendWindow, WindowError

# --- SendWindow ---------------------------------------------------------------------------


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        SendWindow(0)
    with pytest.raises(ValueError):
        SendWindow(-5)


def test_credit_accounting_follows_consumed_bytes_not_popped_frames() -> None:
    s = SendWindow(100)
    assert s.credit() == 100
    a = s.push(30, b"a")
    b = s.push(50, b"b")
    assert (a.seq, a.off, a.size) == (0, 0, 30)
    assert (b.seq, b.off, b.size) == (1, 30, 50)
    assert s.credit() == 20
    assert (s.unacked, s.unacked_bytes) == (2, 80)
    assert s.can_push(20) and not s.can_push(21)

    # The first frame is acknowledged but the application consumed nothing yet: no credit back.
    s.on_ack(0, 0)
    assert (s.unacked, s.unacked_bytes) == (1, 50)
    assert s.credit() == 20

    s.on_ack(0, 30)
    assert s.credit() == 50
    s.on_ack(1, 80)
    assert s.credit() == 100
    assert (s.unacked, s.unacked_bytes) == (0, 0)


def test_push_beyond_credit_is_refused_and_changes_nothing() -> None:
    s = SendWindow(10)
    s.push(8, b"x")
    with pytest.raises(WindowError, match="exceeds the credit of 2"):
        s.push(3, b"y")
    assert (s.next_seq, s.next_off, s.unacked, s.credit()) == (1, 8, 1, 2)
    s.push(2, b"z")  # exactly the remaining credit is fine
    assert s.credit() == 0
    s.push(0, b"empty")  # an empty frame needs no credit
    with pytest.raises(WindowError):
        s.push(1, b"w")


def test_acks_beyond_what_was_sent_are_refused() -> None:
    s = SendWindow(100)
    with pytest.raises(WindowError, match="beyond what was sent"):
        s.on_ack(0, 0)  # nothing was sent at all
    s.push(10, b"a")
    s.push(10, b"b")
    with pytest.raises(WindowError):
        s.on_ack(2, 20)  # seq 2 was never sent
    with pytest.raises(WindowError):
        s.on_ack(1, 21)  # more bytes consumed than were sent
    assert (s.unacked, s.credit()) == (2, 80)
    s.on_ack(1, 20)
    assert (s.unacked, s.credit()) == (0, 100)


def test_stale_ack_never_takes_credit_back() -> None:
    s = SendWindow(100)
    for _ in range(3):
        s.push(10, b"f")
    s.on_ack(2, 30)
    s.on_ack(0, 10)  # late ack from an old path
    assert s.peer_consumed == 30
    assert s.credit() == 100
    assert s.unacked == 0


def test_transmit_cursor_rewind_and_ack_skip() -> None:
    s = SendWindow(100)
    frames = [s.push(1, bytes([i])) for i in range(4)]
    got = []
    while (f := s.next_to_transmit()) is not None:
        got.append(f)
        s.advance()
    assert got == frames
    assert s.next_to_transmit() is None

    s.rewind()  # path change: everything unacked goes out again, unchanged
    assert s.next_to_transmit() is frames[0]
    s.advance()
    s.on_ack(2, 3)  # the peer had seq 0..2 all along: the cursor skips past them
    assert s.next_to_transmit() is frames[3]
    s.advance()
    assert s.next_to_transmit() is None

    s.rewind()
    assert s.next_to_transmit() is frames[3]
    s.on_ack(3, 4)
    s.rewind()  # nothing unacked: nothing to resend
    assert s.next_to_transmit() is None
    new = s.push(1, b"n")
    assert s.next_to_transmit() is new


# --- ReceiveWindow --------------------------------------------------------------------------


def test_multi_frame_message_reassembles_with_meta_from_first_frame_only() -> None:
    r = ReceiveWindow(100)
    assert r.accept(0, 0, False, {"kind": "first"}, b"abc") is None
    assert r.accept(1, 3, False, {"kind": "ignored"}, memoryview(b"de")) is None
    msg = r.accept(2, 5, True, None, b"fgh")
    assert isinstance(msg, Delivered)
    assert msg.payload == b"abcdefgh"
    assert msg.meta == {"kind": "first"}
    assert (msg.last_seq, msg.end_off) == (2, 8)

    # The next message starts clean: its own meta, not the previous one's.
    single = r.accept(3, 8, True, {"n": 2}, b"z")
    assert isinstance(single, Delivered)
    assert (single.meta, single.payload, single.last_seq, single.end_off) == ({"n": 2}, b"z", 3, 9)

    nometa = r.accept(4, 9, True, None, b"")
    assert isinstance(nometa, Delivered)
    assert (nometa.meta, nometa.payload) == (None, b"")


def test_duplicates_and_out_of_order_frames_are_dropped_without_effect() -> None:
    r = ReceiveWindow(100)
    assert r.accept(1, 3, True, {}, b"xyz") is False  # ahead of what is expected
    assert r.expected == 0
    first = r.accept(0, 0, True, {"a": 1}, b"abc")
    assert isinstance(first, Delivered)
    assert r.accept(0, 0, True, {"a": 1}, b"abc") is False  # duplicate
    assert r.accept(5, 50, True, {}, b"q") is False
    assert r.expected == 1
    second = r.accept(1, 3, True, {"b": 2}, b"xyz")
    assert isinstance(second, Delivered) and second.payload == b"xyz"


def test_receiver_refuses_frames_beyond_the_window() -> None:
    r = ReceiveWindow(10)
    m1 = r.accept(0, 0, True, {}, b"x" * 6)
    assert isinstance(m1, Delivered)
    assert r.accept(1, 6, False, {}, b"y" * 4) is None  # exactly fills the window
    with pytest.raises(WindowError, match="past its credit"):
        r.accept(2, 10, True, None, b"z")
    r.consume(m1)  # six bytes of credit come back
    m2 = r.accept(2, 10, True, None, b"z" * 6)
    assert isinstance(m2, Delivered) and m2.payload == b"y" * 4 + b"z" * 6


def test_ack_policy_thresholds() -> None:
    r = ReceiveWindow(100)  # threshold while more messages wait: 100 // 4 = 25 bytes
    assert not r.should_ack(True)  # nothing consumed yet
    msgs = []
    for seq in range(4):
        got = r.accept(seq, seq * 10, True, {}, b"m" * 10)
        assert isinstance(got, Delivered)
        msgs.append(got)

    r.consume(msgs[0])
    assert not r.should_ack(False)  # 10 < 25 and more are waiting: batch
    assert r.should_ack(True)  # the inbox ran dry: ack now
    r.consume(msgs[1])
    assert not r.should_ack(False)  # 20 < 25
    r.consume(msgs[2])
    assert r.should_ack(False)  # 30 >= 25
    assert r.ack() == (2, 30)
    assert not r.should_ack(True) and not r.should_ack(False)  # nothing new since the ack
    r.consume(msgs[3])
    assert r.should_ack(True) and not r.should_ack(False)
    assert r.ack() == (3, 40)
    assert not r.should_ack(True)


def test_ack_reports_last_consumed_message_not_last_received() -> None:
    r = ReceiveWindow(100)
    a = r.accept(0, 0, True, {}, b"aa")
    assert isinstance(a, Delivered)
    assert r.accept(1, 2, True, {}, b"bb")
    assert r.ack() == (-1, 0)  # nothing consumed: the sender may drop nothing
    r.consume(a)
    assert r.ack() == (0, 2)


def test_empty_message_is_acknowledged_so_the_sender_can_flush() -> None:
    """An empty message frees no credit, but the sender keeps its frame (and
    PeerLink.flush waits) until it is acknowledged."""
    s, r = SendWindow(16), ReceiveWindow(16)
    s.push(0, b"empty")
    msg = r.accept(0, 0, True, {"k": 1}, b"")
    assert isinstance(msg, Delivered)
    r.consume(msg)
    assert r.should_ack(True)
    s.on_ack(*r.ack())
    assert s.unacked == 0
    assert not r.should_ack(True)


@given(window=st.integers(1, 40), data=st.data())
def test_acks_in_any_order_keep_credit_exact(window: int, data: st.DataObject) -> None:
    """Acks overtake each other across paths; the credit is always set by the newest one."""
    s, r = SendWindow(window), ReceiveWindow(window)
    in_flight: list[tuple[int, int]] = []
    newest = 0

    def deliver_one() -> None:
        nonlocal newest
        seq, consumed = in_flight.pop(data.draw(st.integers(0, len(in_flight) - 1), label="ack"))
        s.on_ack(seq, consumed)
        newest = max(newest, consumed)
        assert s.credit() == window - (s.next_off - newest)
        assert 0 <= s.credit() <= window

    for size in data.draw(st.lists(st.integers(0, window), min_size=1, max_size=20), label="sizes"):
        while not s.can_push(size):
            deliver_one()  # blocked on credit: some ack must still be on its way
        f = s.push(size, b"")
        got = r.accept(f.seq, f.off, True, {}, b"x" * size)
        assert isinstance(got, Delivered)
        r.consume(got)
        in_flight.append(r.ack())
    while in_flight:
        deliver_one()
    assert (s.credit(), s.unacked) == (window, 0)


# --- property: go-back-N over flaky, changing paths -----------------------------------------


def _encode(seq: int, off: int, end: bool, meta: dict[str, Any] | None, chunk: bytes) -> bytes:
    return pickle.dumps((seq, off, end, meta, chunk))


MAX_PATHS = 4  # older paths than this are gone for good: whatever they still held is lost


class GoBackN(RuleBasedStateMachine):
    """A sender and a receiver joined by a sequence of paths.

    Each path is FIFO for data; it may lose any suffix of what it holds, and an old
    path may still deliver (late, stale, out of order w.r.t. the new path). A path
    change rewinds the sender and makes the receiver re-ack, as PeerLink does. Acks
    travel separately and may be lost, reordered or arrive late.
    """

    @initialize(window=st.integers(1, 32), frame_bytes=st.integers(1, 12))
    def setup(self, window: int, frame_bytes: int) -> None:
        self.W = window
        self.F = min(frame_bytes, window)
        self.tx = SendWindow(window)
        self.rx = ReceiveWindow(window)
        self.sent: list[tuple[dict[str, Any], bytes]] = []  # what the sender's app asked to send
        self.pending: collections.deque[tuple[dict[str, Any], bytes]] = collections.deque()
        self.pos = 0  # bytes of pending[0] already pushed as frames
        self.pushed_first = False  # whether pending[0]'s first frame was pushed
        self.paths: list[collections.deque[bytes]] = [collections.deque()]
        self.acks: list[tuple[int, int]] = []
        self.max_acked = 0  # the most consumed bytes any ack that reached the sender reported
        self.inbox: collections.deque[Delivered] = collections.deque()
        self.got: list[tuple[dict[str, Any] | None, bytes]] = []  # what the receiver's app took

    # -- sender application -----------------------------------------------------------

    @precondition(lambda self: len(self.sent) < 25)
    @rule(data=st.data())
    def app_send(self, data: st.DataObject) -> None:
        payload = data.draw(st.binary(max_size=self.W), label="payload")  # links cap messages at the window
        meta = {"i": len(self.sent), **data.draw(st.dictionaries(st.sampled_from("xyz"), st.integers(), max_size=2), label="meta")}
        self.sent.append((meta, payload))
        self.pending.append((meta, payload))
        self._push_frames(10**9)  # PeerLink.send pushes at once as far as credit allows

    def _push_frames(self, limit: int) -> None:
        """Split pending messages into frames while credit lasts (PeerLink.send)."""
        while self.pending and limit > 0:
            meta, payload = self.pending[0]
            chunk = payload[self.pos : self.pos + self.F]
            if not self.tx.can_push(len(chunk)):
                # the sender must never be able to exceed its credit
                with pytest.raises(WindowError):
                    self.tx.push(len(chunk), b"")
                return
            end = self.pos + len(chunk) >= len(payload)
            first = not self.pushed_first
            # Non-first frames carry junk meta: the receiver must take meta from the first frame only.
            frame_meta = meta if first else {"junk": self.tx.next_seq}
            self.tx.push(len(chunk), _encode(self.tx.next_seq, self.tx.next_off, end, frame_meta, chunk))
            self.pos += len(chunk)
            self.pushed_first = True
            limit -= 1
            if end:
                self.pending.popleft()
                self.pos, self.pushed_first = 0, False

    # -- network ------------------------------------------------------------------------

    @rule(n=st.integers(1, 8))
    def transmit(self, n: int) -> None:
        """The pump puts up to ``n`` frames on the current path."""
        for _ in range(n):
            f = self.tx.next_to_transmit()
            if f is None:
                return
            self.paths[-1].append(f.frame)
            self.tx.advance()

    def _deliver_frame(self, frame: bytes) -> None:
        seq, off, end, meta, chunk = pickle.loads(frame)
        got = self.rx.accept(seq, off, end, meta, chunk)
        if got is False:
            self.acks.append(self.rx.ack())  # a duplicate: our last ack may have been lost
        elif got is not None:
            self.inbox.append(got)

    @rule(data=st.data(), n=st.integers(1, 8))
    def deliver(self, data: st.DataObject, n: int) -> None:
        """Deliver from the head of any path: the current one, or late from an old one."""
        i = data.draw(st.integers(0, len(self.paths) - 1), label="path")
        path = self.paths[i]
        for _ in range(min(n, len(path))):
            self._deliver_frame(path.popleft())

    @rule(data=st.data())
    def drop_suffix(self, data: st.DataObject) -> None:
        i = data.draw(st.integers(0, len(self.paths) - 1), label="path")
        path = self.paths[i]
        keep = data.draw(st.integers(0, len(path)), label="keep")
        while len(path) > keep:
            path.pop()

    @rule()
    def change_path(self) -> None:
        self.paths.append(collections.deque())
        del self.paths[:-MAX_PATHS]
        self.tx.rewind()
        self.acks.append(self.rx.ack())  # both ends re-ack on a new path

    @rule(newest=st.booleans())
    def deliver_ack(self, newest: bool) -> None:
        """Acks arrive in order, or the newest overtakes older ones (which then arrive stale)."""
        if self.acks:
            self._on_ack(self.acks.pop(-1 if newest else 0))
            self._push_frames(10**9)  # a sender blocked on credit goes on at once

    def _on_ack(self, ack: tuple[int, int]) -> None:
        self.tx.on_ack(*ack)
        self.max_acked = max(self.max_acked, ack[1])

    @rule(data=st.data())
    def lose_ack(self, data: st.DataObject) -> None:
        if self.acks:
            del self.acks[data.draw(st.integers(0, len(self.acks) - 1), label="ack")]

    # -- receiver application ---------------------------------------------------------

    @rule(n=st.integers(1, 3))
    def consume(self, n: int) -> None:
        for _ in range(min(n, len(self.inbox))):
            msg = self.inbox.popleft()
            self.rx.consume(msg)
            self.got.append((msg.meta, msg.payload))
            if self.rx.should_ack(not self.inbox):
                self.acks.append(self.rx.ack())

    # -- safety, after every step ---------------------------------------------------------

    @invariant()
    def sender_within_credit(self) -> None:
        assert 0 <= self.tx.credit() <= self.W
        # exact accounting: a stale ack never takes credit back
        assert self.tx.credit() == self.W - (self.tx.next_off - self.max_acked)
        assert self.tx.next_off - self.tx.peer_consumed <= self.W
        assert self.tx.unacked_bytes <= self.W

    @invariant()
    def receive_buffer_within_window(self) -> None:
        assert 0 <= self.rx._buffered <= self.W
        assert sum(len(m.payload) for m in self.inbox) <= self.W

    @invariant()
    def app_gets_an_in_order_prefix_exactly_once(self) -> None:
        assert self.got == [tuple(m) for m in self.sent[: len(self.got)]]
        assert self.rx.consumed_off == sum(len(p) for _, p in self.got)

    # -- liveness: one more path that stays up delivers everything ------------------------

    def teardown(self) -> None:
        if not hasattr(self, "tx"):
            return
        self.change_path()
        for _ in range(4 * (len(self.sent) + 1) * (self.W + 1)):
            if not self.pending and self.tx.unacked == 0 and not self.inbox:
                break
            self._push_frames(10**9)
            self.transmit(10**9)
            while self.paths[-1]:
                self._deliver_frame(self.paths[-1].popleft())
            while self.acks:
                self._on_ack(self.acks.pop(0))
            while self.inbox:
                self.consume(1)
                while self.acks:
                    self._on_ack(self.acks.pop(0))
            self.sender_within_credit()
            self.receive_buffer_within_window()
        assert self.got == [tuple(m) for m in self.sent], "a steady path did not deliver every message"
        assert self.tx.unacked == 0, "sender still holds frames the receiver consumed (flush would hang)"
        assert self.tx.credit() == self.W
        assert self.rx._buffered == 0


GoBackN.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestGoBackN = GoBackN.TestCase
