"""The room on its own: relay rules, eviction, and the join/leave invariant.

Members here are plain recorders (no Trio, no sockets): the room must work
with anything that accepts lines into a bounded queue.
"""

from __future__ import annotations

import random

import attrs
import pytest
import trio
import trio.testing

from trionet.services.chat.room import ChannelMember, ChatError, Room


@attrs.define(eq=False)
class Rec:
    """A member that records what it is sent; ``limit`` bounds pending bytes."""

    nick: str | None = None
    limit: int = 1 << 20
    lines: list[str] = attrs.Factory(list)
    pending: int = 0
    evicted: bool = False

    def deliver(self, data: bytes) -> bool:
        assert not self.evicted, "delivered to an evicted member"
        if self.pending + len(data) > self.limit:
            return False
        self.pending += len(data)
        self.lines.extend(data.decode().splitlines())
        return True

    def evict(self) -> None:
        self.evicted = True

    def take(self) -> list[str]:
        out, self.lines = self.lines, []
        self.pending = 0
        return out


def joined(room: Room, nick: str, **kw: int) -> Rec:
    m = Rec(**kw)
    room.set_nick(m, nick)
    assert m.take() == [f"OK nick {nick}"]
    return m


def test_join_msg_action_priv_who_nick_leave() -> None:
    room = Room()
    alice = joined(room, "alice")
    bob = joined(room, "bob")
    assert alice.take() == ["JOIN bob"]
    room.say(alice, "hello all")
    room.act(alice, "waves")
    assert alice.take() == []  # no copy of one's own messages
    assert bob.take() == ["MSG alice hello all", "ACTION alice waves"]
    carol = joined(room, "carol")
    room.whisper(alice, "BOB", "psst")
    assert bob.take() == ["JOIN carol", "PRIV alice psst"]
    assert carol.take() == []
    room.who(carol)
    assert carol.take() == ["WHO alice bob carol"]
    room.set_nick(alice, "alicia")
    assert alice.take() == ["JOIN carol", "OK nick alicia"]
    assert bob.take() == carol.take() == ["NICK alice alicia"]
    room.leave(alice, "gotta go")
    assert bob.take() == carol.take() == ["LEAVE alicia gotta go"]
    assert room.nicks() == ["bob", "carol"]
    room.leave(alice, "again")  # not in the room: nothing happens
    assert bob.take() == []


def test_nick_rules() -> None:
    room = Room()
    alice = joined(room, "alice")
    other = Rec()
    with pytest.raises(ChatError) as err:
        room.set_nick(other, "ALICE")
    assert err.value.line == "ERR nick-taken ALICE"
    for bad in ["", "a b", "x" * 33, "é"]:
        with pytest.raises(ChatError) as err:
            room.set_nick(other, bad)
        assert err.value.line == "ERR bad-nick"
    assert other not in room and other.lines == []
    # Changing only the case of one's own nick is a rename; the same nick is a no-op.
    room.set_nick(alice, "Alice")
    room.set_nick(alice, "Alice")
    bob = joined(room, "bob")
    assert alice.take() == ["OK nick Alice", "OK nick Alice", "JOIN bob"]
    room.set_nick(alice, "alice")
    assert bob.take() == ["NICK Alice alice"]
    # The old nick is free again after a rename.
    room.set_nick(alice, "al")
    room.set_nick(other, "alice")
    assert room.nicks() == ["al", "alice", "bob"]


def test_no_nick_errors_and_no_traffic() -> None:
    room = Room()
    alice = joined(room, "alice")
    lurker = Rec()
    for op in (
        lambda: room.say(lurker, "hi"),
        lambda: room.act(lurker, "hi"),
        lambda: room.whisper(lurker, "alice", "hi"),
        lambda: room.who(lurker),
    ):
        with pytest.raises(ChatError) as err:
            op()
        assert err.value.line == "ERR no-nick"
    room.say(alice, "nobody hears")
    assert lurker.lines == [] and alice.lines == []


def test_sanitized_and_empty_messages() -> None:
    room = Room()
    alice, bob = joined(room, "alice"), joined(room, "bob")
    room.say(alice, "\x1b[1mbold\u202e\tok")
    room.say(alice, "\x07\x00")
    room.act(alice, "\u2066")
    room.whisper(alice, "bob", "\r")
    room.leave(alice, "\x1bbye")
    assert bob.take() == ["MSG alice [1mbold\tok", "LEAVE alice bye"]
    with pytest.raises(ChatError) as err:
        room.whisper(bob, "zed\x1b", "x")
    assert err.value.line == "ERR no-such-nick zed"


def test_private_to_self() -> None:
    room = Room()
    alice = joined(room, "alice")
    room.whisper(alice, "alice", "note")
    assert alice.take() == ["PRIV alice note"]


def test_over_bound_member_is_evicted_and_announced() -> None:
    room = Room()
    alice = joined(room, "alice")
    slow = joined(room, "slow", limit=40)
    bob = joined(room, "bob")
    alice.take()
    slow.take()
    room.say(alice, "x" * 20)  # 29 bytes: fits
    room.say(alice, "y" * 20)  # would be 58: evicted
    assert slow.evicted and slow not in room
    assert bob.take() == [
        "MSG alice " + "x" * 20,
        "MSG alice " + "y" * 20,
        "LEAVE slow slow-consumer",
    ]
    assert alice.take() == ["LEAVE slow slow-consumer"]
    room.leave(slow)  # the handler's finally: no second LEAVE
    assert bob.take() == []


def test_eviction_cascade_announces_each_once() -> None:
    room = Room()
    alice = joined(room, "alice")
    b1 = joined(room, "b1", limit=20)
    b2 = joined(room, "b2", limit=40)
    for m in (alice, b1, b2):
        m.take()
    # 22 bytes: too many for b1; b2 has room for it but not for the
    # 24-byte "LEAVE b1 slow-consumer" that follows.
    room.say(alice, "hello world")
    assert b1.evicted and b2.evicted
    assert b2.take() == ["MSG alice hello world"]
    assert alice.take() == ["LEAVE b1 slow-consumer", "LEAVE b2 slow-consumer"]
    assert room.nicks() == ["alice"]


def test_reply_over_bound_evicts_the_asker() -> None:
    room = Room()
    alice = joined(room, "alice", limit=30)
    bob = joined(room, "bob")
    alice.take()
    for _ in range(3):
        room.who(alice)  # "WHO alice bob\n" is 14 bytes; never read
    assert alice.evicted
    assert bob.take() == ["LEAVE alice slow-consumer"]


# -- the invariant under a random schedule --------------------------------------


class Observer:
    """Replays one member's stream and checks it against what it was told."""

    def __init__(self, member: Rec, initial: list[str]) -> None:
        self.member = member
        self.known = set(initial) - {member.nick}
        self.read = 0

    def check(self) -> None:
        lines = self.member.lines[self.read :]
        self.read = len(self.member.lines)
        for line in lines:
            word, _, rest = line.partition(" ")
            args = rest.split(" ")
            if word == "JOIN":
                assert args[0] not in self.known, line
                self.known.add(args[0])
            elif word == "LEAVE":
                self.known.remove(args[0])
            elif word == "NICK":
                self.known.remove(args[0])
                self.known.add(args[1])
            elif word in ("MSG", "ACTION", "PRIV"):
                assert args[0] in self.known or args[0] == self.member.nick, line
            else:
                assert word in ("OK", "WHO"), line


@pytest.mark.parametrize("seed", range(20))
def test_join_leave_invariant_random_schedule(seed: int) -> None:
    rng = random.Random(seed)
    room = Room()
    names = [f"n{i}" for i in range(12)]
    observers: dict[int, Observer] = {}

    def present() -> list[Observer]:
        return [o for o in observers.values() if o.member in room]

    for step in range(400):
        op = rng.random()
        live = present()
        if op < 0.2 or not live:
            m = Rec(limit=rng.choice([60, 200, 1 << 20]))
            # The newcomer's starting view is who was there as it joined (what
            # /who answers); its JOIN may evict some of them, and then it is
            # told they left.
            before = room.nicks()
            try:
                room.set_nick(m, rng.choice(names))
            except ChatError:
                continue
            observers[id(m)] = Observer(m, before)
        else:
            o = rng.choice(live)
            try:
                if op < 0.3:
                    room.set_nick(o.member, rng.choice(names))
                elif op < 0.6:
                    room.say(o.member, f"m{step}")
                elif op < 0.65:
                    room.act(o.member, f"a{step}")
                elif op < 0.7:
                    room.whisper(o.member, rng.choice(names), f"p{step}")
                elif op < 0.8:
                    room.leave(o.member, rng.choice(["", "bye"]))
                else:
                    o.member.pending = 0  # the client read everything queued
            except ChatError:
                pass
        for o in observers.values():
            o.check()
        for o in present():
            assert o.known == set(room.nicks()) - {o.member.nick}
    # Everyone leaves; the last one left was told of every departure.
    live = present()
    for o in live[:-1]:
        live[-1].member.pending = 0  # keep reading, so the last one stays
        room.leave(o.member)
    for o in observers.values():
        o.check()
    if live:
        assert live[-1].member in room
        assert live[-1].known == set()
    # The schedule must exercise evictions and renames, or it proves little.
    assert any(o.member.evicted for o in observers.values())


# -- ChannelMember: the queue and the coalescing writer --------------------------


async def test_channel_member_coalesces_queued_lines() -> None:
    m = ChannelMember(sendq=100)
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.pump, send)
        await trio.testing.wait_all_tasks_blocked()
        assert m.deliver(b"a\n") and m.deliver(b"b\n") and m.deliver(b"c\n")
        assert m.pending == 6
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [b"a\nb\nc\n"]  # one send for the whole burst
        assert m.pending == 0
        assert m.deliver(b"d\n")
        m.close()
        assert m.deliver(b"dropped\n")  # after close: accepted and dropped
    assert sent == [b"a\nb\nc\n", b"d\n"]


async def test_channel_member_bound_counts_bytes_being_sent() -> None:
    release = trio.Event()
    m = ChannelMember(sendq=10)

    async def send(data: bytes) -> None:
        await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.pump, send)
        assert m.deliver(b"12345678\n")  # 9 bytes
        await trio.testing.wait_all_tasks_blocked()
        # The writer holds those 9 bytes in a stalled send: they still count.
        assert m.pending == 9
        assert not m.deliver(b"ab\n")
        evicted = []
        m.on_evict = lambda: evicted.append(True)
        m.evict()
        m.evict()
        assert evicted == [True] and m.evicted
        release.set()


def test_channel_member_rejects_bad_sendq() -> None:
    with pytest.raises(ValueError):
        ChannelMember(sendq=0)
