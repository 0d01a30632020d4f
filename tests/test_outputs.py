"""The pure parts of effectively-once outputs: their sequence ids and the order their inputs may send in."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eventbus.consuming.roster import EXPIRY, Roster, share
from eventbus.consuming.outputs import (
    BATCH_BITS, ENTRY_BITS, MAX_OUTPUTS, PublishedLate, Slot, TooManyOutputs, Turns, producer_name, sequence_id,
)

places = st.tuples(
    st.integers(0, 2**40), st.integers(0, (1 << ENTRY_BITS) - 1), st.integers(-1, (1 << BATCH_BITS) - 1),
    st.integers(0, MAX_OUTPUTS - 1),
)


@given(st.lists(places, min_size=2, max_size=20))
def test_sequence_ids_grow_as_input_places_and_output_indexes_do(items: list[tuple[int, int, int, int]]) -> None:
    """Within a ledger (one producer name), an id orders as (entry, batch index, output index): never two alike."""
    ids = {(entry, max(batch, 0), output): sequence_id((ledger, entry, batch), output)
           for ledger, entry, batch, output in items}
    ordered = sorted(ids)
    assert [ids[k] for k in ordered] == sorted(ids.values())
    assert len(set(ids.values())) == len(ids)
    assert all(0 <= i < 2**63 for i in ids.values())


def test_an_input_past_the_ids_room_goes_at_least_once_and_too_many_outputs_are_refused() -> None:
    assert sequence_id((1, 1 << ENTRY_BITS, 0), 0) is None
    assert sequence_id((1, 5, 1 << BATCH_BITS), 0) is None
    with pytest.raises(TooManyOutputs, match="more than 4,096 outputs for one message"):
        sequence_id((1, 5, 0), MAX_OUTPUTS)


def test_a_producer_name_is_the_group_the_partition_and_the_ledger() -> None:
    assert producer_name("billing", "persistent://acme/prod/orders-partition-3", 812) == (
        "eventbus-once:billing:acme/prod/orders-partition-3:812"
    )


inputs = st.lists(
    st.tuples(st.integers(0, 2), st.integers(0, 6), st.booleans(), st.booleans()),  # partition, yields, sends, abandons
    min_size=1, max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(inputs, st.randoms(use_true_random=False))
def test_each_partitions_outputs_go_in_the_order_received_and_an_abandoned_input_holds_the_rest(
    items: list[tuple[int, int, bool, bool]], rng: object
) -> None:
    """Handlers finish in any order; an input sends only once every earlier one of its partition is done."""
    sent: list[tuple[str, tuple[int, int, int]]] = []

    async def scenario() -> dict[str, tuple[int, int, int] | None]:
        turns = Turns()
        placed = []
        for entry, (partition, yields, sends, abandons) in enumerate(items):
            where, position = f"p{partition}", (7, entry, -1)
            turns.admit(where, position)
            placed.append((where, position, yields, sends, abandons))

        async def handle(where: str, position: tuple[int, int, int], yields: int, sends: bool, abandons: bool) -> None:
            for _ in range(yields):
                await asyncio.sleep(0)
            if sends:
                waiting = turns.turn(where, position)
                if waiting is not None:
                    await waiting
                sent.append((where, position))
            turns.finish(where, position, abandoned=abandons)

        tasks = [asyncio.ensure_future(handle(*p)) for p in placed]
        for _ in range(8 * len(tasks) + 10):  # every task's yields and wake-ups, with room: the rest are held
            await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        return {where: next((p for w, p, _, _, a in placed if w == where and a), None) for where, *_ in placed}

    first_abandoned = asyncio.run(scenario())
    for where, held in first_abandoned.items():
        mine = [position for w, position in sent if w == where]
        assert mine == sorted(mine), "sent out of the order received"
        expected = [p for w, p in ((f"p{i[0]}", (7, e, -1)) for e, i in enumerate(items) if i[2]) if w == where]
        if held is None:
            assert mine == expected, "an input whose earlier ones all finished did not get its turn"
        else:
            assert mine == [p for p in expected if p <= held], "an input after an abandoned one sent"


def test_an_output_after_its_attempt_ended_is_refused() -> None:
    async def scenario() -> None:
        turns = Turns()
        turns.admit("p", (1, 1, -1))
        turns.finish("p", (1, 1, -1))
        with pytest.raises(PublishedLate, match="await every publish in the handler"):
            turns.turn("p", (1, 1, -1))

    asyncio.run(scenario())


@pytest.mark.parametrize("count", [1, 3, 16, 1000])
def test_key_slots_cover_every_key_hash_once(count: int) -> None:
    """A key_shared group's slots (sticky ranges, both ends included) leave no hash out and share none."""
    ranges = [Slot(index, count).hashes for index in range(count)]
    assert ranges[0][0] == 0 and ranges[-1][1] == 65535
    assert all(end + 1 == start for (_, end), (start, _) in zip(ranges, ranges[1:]))
    assert all(start <= end for start, end in ranges)


members_ids = st.sets(st.text(st.characters(codec="utf-8"), min_size=1, max_size=12), min_size=1, max_size=24)


@given(members_ids, st.integers(1, 32))
def test_members_hearing_each_other_split_the_slots_between_them_each_slot_once_and_evenly(
    members: set[str], count: int
) -> None:
    shares = [share(members, me, count) for me in members]
    assert sorted(slot for mine in shares for slot in mine) == list(range(count))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


heartbeats = st.lists(
    st.tuples(st.sampled_from(["a", "b", "c", "me"]), st.sets(st.integers(0, 15), max_size=4), st.booleans(),
              st.floats(0, 3 * EXPIRY)),
    max_size=30,
)


@given(heartbeats)
def test_a_roster_holds_the_members_heard_lately_that_did_not_say_they_leave(events: list) -> None:
    """A model of the roster: each member's last heartbeat (and the slots it holds), unless it said it leaves or was
    unheard for `EXPIRY`; this member is always one; a change to a group's members or held slots is reported."""
    roster, key, now = Roster("me"), ("persistent://t/n/x", "g"), 0.0
    last: dict[str, tuple[float, frozenset[int]]] = {}
    for member, held, leaving, step in events:
        now += step
        expired = roster.expire(now)
        gone = {m for m, (at, _) in last.items() if now - at > EXPIRY and m != "me"}
        assert (key in expired) == bool(gone)
        for m in gone:
            del last[m]
        changed = roster.heard(member, {key: held}, leaving, now)
        before = last.get(member)
        if leaving:
            last.pop(member, None)
            assert (key in changed) == (before is not None)
        else:
            last[member] = (now, frozenset(held))
            assert (key in changed) == (before is None or before[1] != frozenset(held))
        assert roster.members(key) == sorted({*last, "me"})
        assert roster.share(key, 16) == share(last.keys() | {"me"}, "me", 16)
        assert roster.held_elsewhere(key) == {slot for m, (_, held) in last.items() if m != "me" for slot in held}


def test_a_member_that_stops_running_a_group_leaves_it_but_not_the_others() -> None:
    roster, one, two = Roster("me"), ("t", "g1"), ("t", "g2")
    roster.heard("a", {one: [1], two: [2]}, False, 0.0)
    assert roster.heard("a", {two: [2]}, False, 1.0) == {one}
    assert roster.members(one) == ["me"] and roster.members(two) == ["a", "me"]
