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
        self._heard: dict[GroupKey, dict[str, float]] = {}
        self._held: dict[GroupKey, dict[str, frozenset[int]]] = {}

    def heard(self, member: str, groups: Mapping[GroupKey, Iterable[int]], leaving: bool, now: float) -> set[GroupKey]:
        """A member's heartbeat (`leaving`: its last); returns the groups whose members or held slots it changed."""
        changed: set[GroupKey] = set()
        for key in set(self._heard) | set(groups):
            times, held = self._heard.setdefault(key, {}), self._held.setdefault(key, {})
            if leaving or key not in groups:
                if times.pop(member, None) is not None:
                    changed.add(key)
                held.pop(member, None)
                continue
            slots = frozenset(groups[key])
            if member not in times or held.get(member) != slots:
                changed.add(key)
            times[member], held[member] = now, slots
        return changed

    def expire(self, now: float) -> set[GroupKey]:
        """Forget the members unheard for `EXPIRY` (never this one); returns the groups that lost one."""
        changed: set[GroupKey] = set()
        for key, times in self._heard.items():
            for member in [m for m, at in times.items() if now - at > EXPIRY and m != self.me]:
                del times[member]
                self._held[key].pop(member, None)
                changed.add(key)
        return changed

    def members(self, key: GroupKey) -> list[str]:
        """The members of the group heard lately, this one included, sorted."""
        return sorted({*self._heard.get(key, ()), self.me})

    def held_elsewhere(self, key: GroupKey) -> frozenset[int]:
        """The slots other members last said they hold."""
        return frozenset(slot for member, held in self._held.get(key, {}).items() if member != self.me for slot in held)

    def share(self, key: GroupKey, count: int) -> frozenset[int]:
        """This member's share of the group's `count` slots."""
        return share(self.members(key), self.me, count)
