"""The lanes (eventbus.consuming.lanes), pure logic: any interleaving of admit, take, finish and stop keeps their promises."""

from __future__ import annotations

from collections import defaultdict
from itertools import count

from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.consuming.lanes import Lanes, MixedKeys, RecentIds

Ident = tuple[int, int]  # (batch, index in the batch)


def batch_of(ident: Ident) -> int:
    return ident[0]


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[Ident, str]]:
    """Batches of messages as a broker sends them: whole, in order; one key per batch (key-based batching)."""
    out = []
    for batch in range(draw(st.integers(1, 8))):
        key = draw(st.sampled_from("abc"))
        out += [((batch, index), key) for index in range(draw(st.integers(1, 4)))]
    return out


@settings(max_examples=400, deadline=None)
@given(stream=streams(), ordered=st.booleans(), data=st.data())
def test_any_interleaving_keeps_order_runs_a_lane_once_and_finishes_every_begun_batch(
    stream: list[tuple[Ident, str]], ordered: bool, data: st.DataObject
) -> None:
    lanes: Lanes[str, Ident] = Lanes(batch_of)
    unique = count()
    lane_of: dict[Ident, object] = {}
    position = 0  # the next message of the stream the "receive thread" would hand over
    running: dict[object, Ident] = {}  # lane -> the message running on it
    taken: list[Ident] = []
    acked: set[Ident] = set()
    unacked_finish: set[int] = set()  # batches with a message finished without acknowledgement
    left_total = 0
    admitted = 0
    stopped = False

    def admit(ident: Ident, key: str) -> None:
        nonlocal admitted, left_total
        lane = lane_of.setdefault(ident, key if ordered else next(unique))
        verdict = lanes.admit(f"m{ident}", ident, lane)
        if verdict == "queued":
            admitted += 1
        elif verdict == "left_at_stop":
            left_total += 1
        else:  # a copy: refused while running or queued, or once acknowledged
            assert verdict in ("running", "acknowledged")

    def take() -> None:
        item = lanes.take()
        if item is None:
            assert not lanes.ready
            return
        lane, message, ident = item
        assert message == f"m{ident}"
        assert lane not in running, "a lane runs one message at a time"
        running[lane] = ident
        taken.append(ident)

    def finish(lane: object, acknowledged: bool) -> None:
        ident = running.pop(lane)
        if acknowledged:
            acked.add(ident)
        else:
            unacked_finish.add(ident[0])
        lanes.finish(lane, ident, acknowledged)

    for _ in range(data.draw(st.integers(0, 60))):
        step = data.draw(st.sampled_from(["receive", "copy", "take", "finish", "stop"]))
        if step == "receive" and position < len(stream) and not stopped:
            for _ in range(data.draw(st.integers(1, 3))):
                if position < len(stream):
                    admit(*stream[position])
                    position += 1
        elif step == "copy" and position:
            admit(*stream[data.draw(st.integers(0, position - 1))])
        elif step == "take":
            take()
        elif step == "finish" and running:
            finish(data.draw(st.sampled_from(sorted(running, key=str))), True)
        elif step == "stop":
            left_total += lanes.stop()
            stopped = True
        assert lanes.active == lanes.waiting + len(running)

    # The stop, then the drain: the receive thread hands over the rest of begun batches, the workers finish all.
    left_total += lanes.stop()
    while position < len(stream) and lanes.begun(stream[position][0]):
        admit(*stream[position])
        position += 1
    # A drain that times out cancels every handler: what runs then is finished unacknowledged, nothing more is taken.
    if data.draw(st.booleans()):
        for lane in list(running):
            finish(lane, False)
        assert lanes.active == lanes.waiting
        return
    while running or lanes.ready:
        take()
        for lane in list(running):
            finish(lane, True)
    assert lanes.empty and lanes.active == 0

    # Each message taken once, copies refused.
    assert len(taken) == len(set(taken))
    # Per key, in stream order (ordered subscriptions).
    if ordered:
        by_key: dict[str, list[Ident]] = defaultdict(list)
        for ident in taken:
            by_key[dict(stream)[ident]].append(ident)
        for idents in by_key.values():
            assert idents == sorted(idents), idents
    # No batch left half-acknowledged: the broker would send all of it again, the handled ones included.
    received = {ident for ident, _ in stream[:position]}
    for batch in {ident[0] for ident in acked}:
        mates = {ident for ident, _ in stream if ident[0] == batch}
        assert mates <= acked, f"batch {batch}: acknowledged {sorted(acked & mates)} of {sorted(mates)}"
        assert mates <= received


@given(st.lists(st.integers(0, 50), max_size=300), st.integers(1, 20))
def test_recent_ids_are_bounded_and_hold_the_last_one_added(added: list[int], size: int) -> None:
    recent: RecentIds[int] = RecentIds(size)
    for value in added:
        recent.add(value)
        assert value in recent
        assert len(recent) <= size
    assert 51 not in recent
    distinct_tail = list(dict.fromkeys(reversed(added)))[: min(size, 1)]
    assert all(value in recent for value in distinct_tail)


ids = st.tuples(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(-1, 100), st.integers(-1, 2000))


@given(ids, ids)
def test_entry_of_a_serialized_id_names_its_entry_exactly(first: tuple[int, int, int, int], second: tuple[int, int, int, int]) -> None:
    # The consumer's lanes key a stop's begun batches by it: two messages share a batch exactly when
    # ledger, entry and partition agree, whatever their batch index.
    from eventbus.broker.client import entry_of, new_message_id

    def key(ident: tuple[int, int, int, int]) -> bytes:
        ledger, entry, partition, index = ident
        return new_message_id(ledger, entry, partition, index).serialize()

    same_entry = first[:3] == second[:3]
    assert (entry_of(key(first)) == entry_of(key(second))) == same_entry
    sibling = (*first[:3], (first[3] + 1) % 1000)
    assert entry_of(key(first)) == entry_of(key(sibling))


batches_of_keys = st.lists(st.lists(st.sampled_from("abc"), min_size=1, max_size=5), max_size=30)


@given(batches_of_keys)
def test_mixed_key_batches_are_noticed_once_each_and_never_invented(batches: list[list[str]]) -> None:
    """`MixedKeys` fed a stream of batches: a flag only for a batch of several keys, at most once per batch; and
    every such batch whose first key differs from the message before it is flagged (the cheap check sees it)."""
    mixed = MixedKeys[tuple[int, int]](lambda ident: ident[0])
    flagged: list[int] = []
    before: str | None = None
    must: set[int] = set()
    for entry, keys in enumerate(batches):
        if len(set(keys)) > 1 and keys[0] != before:
            must.add(entry)
        for index, key in enumerate(keys):
            if mixed.seen((entry, index), key):
                flagged.append(entry)
            before = key
    assert len(flagged) == len(set(flagged)) == mixed.count
    assert all(len(set(batches[entry])) > 1 for entry in flagged)
    assert must <= set(flagged)
