"""Who runs each key_shared group's key slots: the members heard lately, and each one's share of the slots."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: A (full topic, group) whose key slots its members share.
GroupKey = tuple[str, str]

#: How often a member says which groups it runs and which of their slots it holds.
HEARTBEAT = 2.0
#: A member unheard this long has left (three heartbeats: one lost to a reconnect is not a departure).
EXPIRY = 6.5
#: A member heard this long takes its share of the slots (see `Roster`).
SETTLED = 15.0


def share(members: Iterable[str], me: str, count: int) -> frozenset[int]:
    """The slots `me` should hold of `count`: slot i goes to the (i mod n)-th of the n members in sorted order.

    Every member that hears the same members computes the same split, so each slot has one owner and the shares
    differ by at most one slot; which member a slot has does not matter, only that it has one.
    """
    ordered = sorted({*members, me})
    return frozenset(range(ordered.index(me), count, len(ordered)))


@dataclass
class Member:
    """What a roster knows of a member of a group: when first and last heard, and the slots it said it holds."""

    first: float
    last: float
    held: frozenset[int]


class Roster:
    """The members heard per group and when, with the slots each said it holds; pure, fed by `Presence`.

    A member counts for the split once it has been heard for `SETTLED` seconds or holds a slot: one that joins
    takes no slots from the others before, so a member that dies young moves none (in a chaos run a slot's move
    stalled its keys about 7 s, and members replaced every few seconds moved half the slots each time). With no
    such member (a group starting), every member heard counts.
    """

    def __init__(self, me: str) -> None:
        self.me = me
        self._groups: dict[GroupKey, dict[str, Member]] = {}
        self._ticked = 0.0

    def heard(self, member: str, groups: Mapping[GroupKey, Iterable[int]], leaving: bool, now: float) -> set[GroupKey]:
        """A member's heartbeat (`leaving`: its last); returns the groups whose members or held slots it changed."""
        changed: set[GroupKey] = set()
        for key in set(self._groups) | set(groups):
            members = self._groups.setdefault(key, {})
            if leaving or key not in groups:
                if members.pop(member, None) is not None:
                    changed.add(key)
                continue
            slots, known = frozenset(groups[key]), members.get(member)
            if known is None:
                members[member] = Member(now, now, slots)
                changed.add(key)
                continue
            if known.held != slots:
                changed.add(key)
            known.last, known.held = now, slots
        return changed

    def tick(self, now: float) -> set[GroupKey]:
        """Forget the members unheard for `EXPIRY` (never this one); returns the groups that lost one or saw one
        settle since the last tick."""
        changed: set[GroupKey] = set()
        for key, members in self._groups.items():
            for name in [m for m, known in members.items() if now - known.last > EXPIRY and m != self.me]:
                del members[name]
                changed.add(key)
            if any(self._ticked - known.first < SETTLED <= now - known.first for known in members.values()):
                changed.add(key)
        self._ticked = now
        return changed

    def members(self, key: GroupKey) -> list[str]:
        """The members of the group heard lately, this one included, sorted."""
        return sorted({*self._groups.get(key, ()), self.me})

    def counted(self, key: GroupKey, now: float) -> list[str]:
        """The members the slots are split among (see the class), sorted."""
        members = self._groups.get(key, {})
        settled = [name for name, known in members.items() if known.held or now - known.first >= SETTLED]
        return sorted(settled or {*members, self.me})

    def held_elsewhere(self, key: GroupKey) -> frozenset[int]:
        """The slots other members last said they hold."""
        members = self._groups.get(key, {})
        return frozenset(slot for name, known in members.items() if name != self.me for slot in known.held)

    def share(self, key: GroupKey, count: int, now: float) -> frozenset[int]:
        """This member's share of the group's `count` slots (none while it does not count)."""
        counted = self.counted(key, now)
        return share(counted, self.me, count) if self.me in counted else frozenset()
