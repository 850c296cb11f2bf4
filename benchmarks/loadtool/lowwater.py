"""The low-water mark of a room's subscribers: the lowest k that every subscriber has.

Messages of one room arrive in order, so a subscriber is summed up by the k of the last
message it got. `LowWater` keeps a histogram of subscribers per k; when the last
subscriber leaves the lowest k, the mark rises and `completed(old_low, low)` says that
publications old_low+1 .. low reached every subscriber (fanout, slow and
scale_client time them from there). `advanced` runs once per read that moved a
subscriber forward; `completed` only when the mark rises.
"""


class LowWater:
    __slots__ = ("at", "low")

    def __init__(self, subscribers: int = 0) -> None:
        self.at = {0: subscribers}   # k -> subscribers whose last message is k
        self.low = 0                 # every subscriber has every k <= low

    def advanced(self, old: int, new: int) -> None:
        """One subscriber moved from k = old to k = new (new > old)."""
        at = self.at
        at[new] = at.get(new, 0) + 1
        left = at[old] - 1
        if left:
            at[old] = left
            return
        del at[old]
        if old != self.low:
            return
        low = old
        while low not in at:   # stops at the lowest k still held (at most `new`)
            low += 1
        old_low = self.low
        self.low = low
        self.completed(old_low, low)

    def completed(self, old_low: int, low: int) -> None:
        """Hook: publications old_low+1 .. low reached every subscriber."""
