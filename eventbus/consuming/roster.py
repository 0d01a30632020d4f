"""Who runs each key_shared group's key slots: the members heard lately, and each one's share of the slots."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: A (full topic, group) whose key slots its members share.
GroupKey = tuple[str, str]

#: How often a member says which groups it runs and which of their slots it holds.
HEARTBEAT = 2.0
#: A member unheard this long has left (three heartbeats: one lost to a reconnect is not a departure).
EXPIRY = 6.5


def share(members: Iterable[str], me: str, count: int) -> frozenset[int]:
    """The slots `me` should hold of `count`: slot i goes to the (i mod n)-th of the n members in sorted order.

    Every member that hears the same members computes the same split, so each slot has one owner and the shares
    differ by at most one slot; which member a slot has does not matter, only that it has one.
    """
    ordered = sorted({*members, me})
    return frozenset(range(ordered.index(me), count, len(ordered)))


class Roster:
    """The members heard per group and when, with the slots each said it holds; pure, fed by `Presence`."""

    def __init__(self, me: str) -> None:
        self.me = me
        #: Per group, each member heard: when last, and the slots it said it holds.
        self._members: dict[GroupKey, dict[str, tuple[float, frozenset[int]]]] = {}

    def heard(self, member: str, groups: Mapping[GroupKey, Iterable[int]], leaving: bool, now: float) -> set[GroupKey]:
        """A member's heartbeat (`leaving`: its last); returns the groups whose members or held slots it changed."""
        changed: set[GroupKey] = set()
        for key in set(self._members) | set(groups):
            members = self._members.setdefault(key, {})
            if leaving or key not in groups:
                if members.pop(member, None) is not None:
                    changed.add(key)
                continue
            slots, before = frozenset(groups[key]), members.get(member)
            if before is None or before[1] != slots:
                changed.add(key)
            members[member] = (now, slots)
        return changed

    def expire(self, now: float) -> set[GroupKey]:
        """Forget the members unheard for `EXPIRY` (never this one); returns the groups that lost one."""
        changed: set[GroupKey] = set()
        for key, members in self._members.items():
            for member in [m for m, (at, _) in members.items() if now - at > EXPIRY and m != self.me]:
                del members[member]
                changed.add(key)
        return changed

    def members(self, key: GroupKey) -> list[str]:
        """The members of the group heard lately, this one included, sorted."""
        return sorted({*self._members.get(key, ()), self.me})

    def held_elsewhere(self, key: GroupKey) -> frozenset[int]:
        """The slots other members last said they hold."""
        members = self._members.get(key, {})
        return frozenset(slot for member, (_, held) in members.items() if member != self.me for slot in held)

    def share(self, key: GroupKey, count: int) -> frozenset[int]:
        """This member's share of the group's `count` slots."""
        return share(self.members(key), self.me, count)
