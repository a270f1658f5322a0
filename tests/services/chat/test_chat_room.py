"""The room on its own: relay rules, the log, eviction, and the join/leave invariant.

No sockets here: :meth:`Member.take` reads what a member's writer would send,
at once, so every ordering can be checked step by step.
"""

from __future__ import annotations

import random

import pytest
import trio
import trio.testing

from trionet.services.chat.room import MAX_WRITE, ChatError, Member, Room


def new(room: Room, limit: int = 1 << 20) -> Member:
    return Member(room, limit)


def take(m: Member) -> list[str]:
    """Everything due to ``m`` now, as lines (what its writer would send)."""
    return m.take().decode().splitlines()


def joined(room: Room, nick: str, limit: int = 1 << 20) -> Member:
    m = new(room, limit)
    room.set_nick(m, nick)
    assert take(m) == [f"OK nick {nick}"]
    return m


def test_join_msg_action_priv_who_nick_leave() -> None:
    room = Room()
    alice = joined(room, "alice")
    bob = joined(room, "bob")
    assert take(alice) == ["JOIN bob"]
    room.say(alice, "hello all")
    room.act(alice, "waves")
    assert take(alice) == []  # no copy of one's own messages
    assert take(bob) == ["MSG alice hello all", "ACTION alice waves"]
    carol = joined(room, "carol")
    room.whisper(alice, "BOB", "psst")
    assert take(bob) == ["JOIN carol", "PRIV alice psst"]
    assert take(carol) == []
    room.who(carol)
    assert take(carol) == ["WHO alice bob carol"]
    room.set_nick(alice, "alicia")
    assert take(alice) == ["JOIN carol", "OK nick alicia"]
    assert take(bob) == take(carol) == ["NICK alice alicia"]
    room.leave(alice, "gotta go")
    assert take(bob) == take(carol) == ["LEAVE alicia gotta go"]
    assert room.nicks() == ["bob", "carol"]
    room.leave(alice, "again")  # not in the room: nothing happens
    assert take(bob) == []


def test_nick_rules() -> None:
    room = Room()
    alice = joined(room, "alice")
    other = new(room)
    with pytest.raises(ChatError) as err:
        room.set_nick(other, "ALICE")
    assert err.value.line == "ERR nick-taken ALICE"
    for bad in ["", "a b", "x" * 33, "é"]:
        with pytest.raises(ChatError) as err:
            room.set_nick(other, bad)
        assert err.value.line == "ERR bad-nick"
    assert other not in room and take(other) == []
    # Changing only the case of one's own nick is a rename; the same nick is a no-op.
    room.set_nick(alice, "Alice")
    room.set_nick(alice, "Alice")
    bob = joined(room, "bob")
    assert take(alice) == ["OK nick Alice", "OK nick Alice", "JOIN bob"]
    room.set_nick(alice, "alice")
    assert take(bob) == ["NICK Alice alice"]
    # The old nick is free again after a rename.
    room.set_nick(alice, "al")
    room.set_nick(other, "alice")
    assert room.nicks() == ["al", "alice", "bob"]


def test_no_nick_errors_and_no_traffic() -> None:
    room = Room()
    alice = joined(room, "alice")
    lurker = new(room)
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
    assert take(lurker) == [] and take(alice) == []


def test_sanitized_and_empty_messages() -> None:
    room = Room()
    alice, bob = joined(room, "alice"), joined(room, "bob")
    room.say(alice, "\x1b[1mbold\u202e\tok")
    room.say(alice, "\x07\x00")
    room.act(alice, "\u2066")
    room.whisper(alice, "bob", "\r")
    room.leave(alice, "\x1bbye")
    assert take(bob) == ["MSG alice [1mbold\tok", "LEAVE alice bye"]
    with pytest.raises(ChatError) as err:
        room.whisper(bob, "zed\x1b", "x")
    assert err.value.line == "ERR no-such-nick zed"


def test_private_to_self() -> None:
    room = Room()
    alice = joined(room, "alice")
    room.whisper(alice, "alice", "note")
    assert take(alice) == ["PRIV alice note"]


def test_over_bound_member_is_evicted_and_announced() -> None:
    room = Room()
    alice = joined(room, "alice")
    slow = joined(room, "slow", limit=40)
    bob = joined(room, "bob")
    take(alice)
    take(slow)
    room.say(alice, "x" * 20)  # 29 bytes: fits
    room.say(alice, "y" * 20)  # would be 58: evicted
    assert slow.evicted and slow not in room
    assert take(bob) == [
        "MSG alice " + "x" * 20,
        "MSG alice " + "y" * 20,
        "LEAVE slow slow-consumer",
    ]
    assert take(alice) == ["LEAVE slow slow-consumer"]
    room.leave(slow)  # the handler's finally: no second LEAVE
    assert take(bob) == []


def test_eviction_cascade_announces_each_once() -> None:
    room = Room()
    alice = joined(room, "alice")
    b1 = joined(room, "b1", limit=20)
    b2 = joined(room, "b2", limit=40)
    for m in (alice, b1, b2):
        take(m)
    # 22 bytes: too many for b1; b2 has room for it but not for the
    # 24-byte "LEAVE b1 slow-consumer" that follows.
    room.say(alice, "hello world")
    assert b1.evicted and b2.evicted
    assert take(b2) == []  # an evicted member is sent nothing more
    assert take(alice) == ["LEAVE b1 slow-consumer", "LEAVE b2 slow-consumer"]
    assert room.nicks() == ["alice"]


def test_reply_over_bound_evicts_the_asker() -> None:
    room = Room()
    alice = joined(room, "alice", limit=30)
    bob = joined(room, "bob")
    take(alice)
    for _ in range(3):
        room.who(alice)  # "WHO alice bob\n" is 14 bytes; never read
    assert alice.evicted
    assert take(bob) == ["LEAVE alice slow-consumer"]


# -- ordering: one stream per member, in the order the room produced it -------------


def test_newcomer_gets_ok_nick_before_any_traffic_and_others_join_before_msg() -> None:
    room = Room()
    alice, bob = joined(room, "alice"), joined(room, "bob")
    take(alice)
    new = Member(room, 1 << 20)
    room.reply(new, "WELCOME")
    room.say(alice, "before")
    room.reply(new, "ERR no-nick")  # still no traffic for it
    room.set_nick(new, "new")
    room.say(alice, "after")
    room.say(new, "hi")
    assert take(new) == ["WELCOME", "ERR no-nick", "OK nick new", "MSG alice after"]
    assert take(bob) == ["MSG alice before", "JOIN new", "MSG alice after", "MSG new hi"]
    assert take(alice) == ["JOIN new", "MSG new hi"]


def test_private_lines_keep_their_place_among_relayed_ones() -> None:
    room = Room()
    alice, bob = joined(room, "alice"), joined(room, "bob")
    room.say(alice, "one")
    room.whisper(alice, "bob", "two")
    room.act(alice, "three")
    room.who(bob)
    room.say(alice, "four")
    room.whisper(alice, "bob", "five")
    assert take(bob) == [
        "MSG alice one",
        "PRIV alice two",
        "ACTION alice three",
        "WHO alice bob",
        "MSG alice four",
        "PRIV alice five",
    ]
    # Renames and leaves too; after leaving, nothing more but private lines.
    room.set_nick(alice, "al")
    room.leave(bob, "bye")
    room.say(alice, "gone")
    room.reply(bob, "BYE")
    assert take(bob) == ["NICK alice al", "BYE"]
    assert take(alice) == ["JOIN bob", "OK nick al", "LEAVE bob bye"]


async def test_writer_keeps_order_when_joining_during_a_send() -> None:
    """Replies queued before the nick, still being written when it joins, go first."""
    room = Room()
    alice = joined(room, "alice")
    new = Member(room, 1 << 20)
    release = trio.Event()
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)
        if len(sent) == 1:
            await release.wait()  # the first write stalls

    async with trio.open_nursery() as nursery:
        nursery.start_soon(new.pump, send)
        room.reply(new, "WELCOME")
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [b"WELCOME\n"]
        room.set_nick(new, "new")
        room.say(alice, "hello")
        release.set()
        await trio.testing.wait_all_tasks_blocked()
        new.close()
        room.leave(new)
    assert b"".join(sent) == b"WELCOME\nOK nick new\nMSG alice hello\n"
    assert new.pending == 0


def test_own_lines_are_skipped_and_do_not_count_as_behind() -> None:
    room = Room()
    alice, bob = joined(room, "alice", limit=100), joined(room, "bob")
    take(alice)
    for i in range(50):  # alice alone could never read 50 of her own lines
        room.say(alice, f"line {i}")
    assert not alice.evicted and alice.pending == 0
    assert take(alice) == []
    assert len(take(bob)) == 50


def test_the_log_is_held_once_and_trimmed_to_the_slowest_cursor() -> None:
    room = Room()
    sender = joined(room, "sender")
    readers = [joined(room, f"r{i}") for i in range(20)]
    for r in readers:
        take(r)
    take(sender)
    text = "x" * 990
    for i in range(200):  # 200 KB relayed to 20 members
        room.say(sender, text)
        if i % 10 == 0:
            for r in readers[1:]:
                take(r)
    # Held once, not 20 times: the log is what readers[0] has not read (it
    # never did), and the others' cursors are not copies.
    assert readers[0].pending == 200 * 1002
    assert room.log_bytes == 200 * 1002
    # Once everyone reads, the log is trimmed at the next check (every 64 KiB).
    for _ in range(70):
        room.say(sender, text)
        for r in readers:
            take(r)
    assert room.log_bytes < 66 * 1002


# -- /history and /help ---------------------------------------------------------


def test_history_keeps_public_messages_with_time_stamps() -> None:
    now = [1700000000.0]
    room = Room(history=3, clock=lambda: now[0])
    alice, bob = joined(room, "alice"), joined(room, "bob")
    take(alice)
    for text in ("one", "two\x1b", "\x07"):  # the last is empty once sanitized
        room.say(alice, text)
        now[0] += 0.25
    room.act(bob, "waves")
    room.whisper(alice, "bob", "private: never kept")
    room.set_nick(alice, "al")
    room.say(alice, "three")
    take(alice), take(bob)
    room.history(bob)
    assert take(bob) == [
        "HIST 1700000000250 MSG alice two",
        "HIST 1700000000750 ACTION bob waves",
        "HIST 1700000000750 MSG al three",
        "OK history 3",
    ]
    room.history(bob, 1)
    room.history(bob, 0)
    room.history(bob, 10**6)
    assert take(bob) == [
        "HIST 1700000000750 MSG al three",
        "OK history 1",
        "OK history 0",
        "HIST 1700000000250 MSG alice two",
        "HIST 1700000000750 ACTION bob waves",
        "HIST 1700000000750 MSG al three",
        "OK history 3",
    ]
    with pytest.raises(ChatError) as err:
        room.history(Member(room, 100))
    assert err.value.line == "ERR no-nick"


def test_history_default_count_and_zero_keeps_none() -> None:
    room = Room(clock=lambda: 1.0)
    alice, bob = joined(room, "alice"), joined(room, "bob")
    for i in range(30):
        room.say(alice, f"m{i}")
    take(bob)
    room.history(bob)
    lines = take(bob)
    assert lines[:-1] == [f"HIST 1000 MSG alice m{i}" for i in range(10, 30)]
    assert lines[-1] == "OK history 20"
    none = Room(history=0)
    alice, bob = joined(none, "alice"), joined(none, "bob")
    none.say(alice, "hi")
    take(bob)
    none.history(bob)
    assert take(bob) == ["OK history 0"]
    with pytest.raises(ValueError):
        Room(history=-1)


# -- the invariant under a random schedule --------------------------------------


class Observer:
    """Reads one member's stream and checks it against what it was told."""

    def __init__(self, member: Member, initial: list[str]) -> None:
        self.member = member
        self.known = set(initial) - {member.nick}
        self.me: str | None = None  # its own nick as its stream tells it

    def read(self) -> None:
        for line in take(self.member):
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
            elif word in ("MSG", "ACTION"):
                assert args[0] in self.known, line
            elif word == "PRIV":
                assert args[0] in self.known or args[0] == self.me, line
            elif word == "OK":
                assert args[0] == "nick", line
                self.me = args[1]
            else:
                assert word == "WHO", line


@pytest.mark.parametrize("seed", range(20))
def test_join_leave_invariant_random_schedule(seed: int) -> None:
    """Random operations; members read at random times, some rarely (and get evicted)."""
    rng = random.Random(seed)
    room = Room()
    names = [f"n{i}" for i in range(12)]
    observers: dict[int, Observer] = {}
    eager: set[int] = set()  # members that read after every step

    def present() -> list[Observer]:
        return [o for o in observers.values() if o.member in room]

    for step in range(400):
        op = rng.random()
        live = present()
        if op < 0.2 or not live:
            m = new(room, limit=rng.choice([60, 200, 1 << 20]))
            # The newcomer's starting view is who was there as it joined (what
            # /who answers); its JOIN may evict some of them, and then it is
            # told they left.
            before = room.nicks()
            try:
                room.set_nick(m, rng.choice(names))
            except ChatError:
                continue
            observers[id(m)] = Observer(m, before)
            if rng.random() < 0.5:
                eager.add(id(m))
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
                    o.read()  # what was due before it left
                    room.forget(o.member)
                else:
                    o.read()  # the client read everything due
            except ChatError:
                pass
        for o in observers.values():
            if id(o.member) in eager:
                o.read()
                if o.member in room:
                    assert o.known == set(room.nicks()) - {o.member.nick}
                else:
                    assert take(o.member) == []  # nothing after leaving
        # The log holds no more than the slowest member's share, plus one
        # scan step: bytes relayed are held once, whatever the members.
        assert (
            room.log_bytes
            <= max((m.pending for m in (o.member for o in present())), default=0) + 65536
        )
    # Everyone leaves; the last one left was told of every departure.
    live = present()
    for o in live[:-1]:
        live[-1].read()  # keep reading, so the last one stays
        room.leave(o.member)
    for o in observers.values():
        o.read()
    if live:
        assert live[-1].member in room
        assert live[-1].known == set()
    # The schedule must exercise evictions and renames, or it proves little.
    assert any(o.member.evicted for o in observers.values())


# -- the writer ----------------------------------------------------------------------


async def test_writer_coalesces_queued_lines() -> None:
    room = Room()
    m = joined(room, "m", limit=1000)
    other = joined(room, "other")
    assert take(m) == ["JOIN other"]
    sent: list[bytes] = []

    async def send(data: bytes) -> None:
        sent.append(data)
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.pump, send)
        await trio.testing.wait_all_tasks_blocked()
        room.say(other, "a")
        room.whisper(other, "m", "b")
        room.say(other, "c")
        assert m.pending == 12 + 13 + 12
        await trio.testing.wait_all_tasks_blocked()
        assert sent == [b"MSG other a\nPRIV other b\nMSG other c\n"]  # one send
        assert m.pending == 0
        room.say(other, "d")
        room.leave(m)
        room.say(other, "after leaving")
        room.reply(m, "BYE")
        m.close()
        room.reply(m, "dropped")  # after close: accepted and dropped
    assert sent[1:] == [b"MSG other d\nBYE\n"]


async def test_writer_bound_counts_bytes_being_sent() -> None:
    release = trio.Event()
    room = Room()
    m = joined(room, "m", limit=30)
    other = joined(room, "other")
    assert take(m) == ["JOIN other"]
    evicted: list[bool] = []
    m.on_evict = lambda: evicted.append(True)

    async def send(data: bytes) -> None:
        await release.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.pump, send)
        room.say(other, "12345678")  # 19 bytes
        await trio.testing.wait_all_tasks_blocked()
        # The writer holds those 19 bytes in a stalled send: they still count.
        assert m.pending == 19
        room.say(other, "9")  # 12 more: over 30
        assert evicted == [True] and m.evicted and m not in room
        assert take(other) == ["LEAVE m slow-consumer"]
        release.set()
    assert room.nicks() == ["other"]


async def test_writer_sends_a_backlog_in_bounded_writes() -> None:
    room = Room()
    m = joined(room, "m")
    other = joined(room, "other")
    assert take(m) == ["JOIN other"]
    text = "x" * 3990
    for _ in range(40):  # 160 KB: three writes of at most MAX_WRITE + one line
        room.say(other, text)
    sizes: list[int] = []

    async def send(data: bytes) -> None:
        sizes.append(len(data))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(m.pump, send)
        await trio.testing.wait_all_tasks_blocked()
        m.close()
    assert sum(sizes) == 40 * 4001 and len(sizes) == 3
    assert all(size < MAX_WRITE + 4001 for size in sizes)


async def test_writer_skips_its_own_lines_inside_a_bounded_backlog() -> None:
    """A sender behind the log: its own lines split the runs a write copies."""
    room = Room()
    alice, bob = joined(room, "alice"), joined(room, "bob")
    assert take(alice) == ["JOIN bob"]
    expected: list[str] = []
    for i in range(200):  # about 200 KB: four bounded writes
        room.say(bob, f"b{i} " + "y" * 1000)
        expected.append(f"MSG bob b{i} " + "y" * 1000)
        if i % 3 == 0:
            room.say(alice, f"a{i}")  # alice has not read: her line is in the log
        if i == 50:
            room.who(alice)  # a private reply, in its place
            expected.append("WHO alice bob")
    chunks: list[bytes] = []

    async def send(data: bytes) -> None:
        chunks.append(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(alice.pump, send)
        await trio.testing.wait_all_tasks_blocked()
        alice.close()
    assert b"".join(chunks).decode().splitlines() == expected
    assert len(chunks) >= 4 and all(len(c) < MAX_WRITE + 1100 for c in chunks)
    assert alice.pending == 0 and take(alice) == []
    # bob, reading everything once, got alice's lines and none of his own.
    got = take(bob)
    assert got == [f"MSG alice a{i}" for i in range(0, 200, 3)]


def test_member_rejects_bad_sendq() -> None:
    with pytest.raises(ValueError):
        Member(Room(), sendq=0)
