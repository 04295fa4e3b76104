"""Pinned KV slots holding recurring prompt prefixes (e.g. the Llama Guard policy text).

A request that declares `cache_prefix_len = N` gets its first N positions copied from a pinned slot
when that exact prefix is cached, instead of prefilling them. The first request with a new prefix
prefills normally; once it has prefilled N positions they are copied into a pinned slot (if the budget
allows), evicting the least recently used entry at the budget. Only KV positions < N are ever copied,
and those depend only on the first N tokens, so chunk boundaries don't matter.
"""

from __future__ import annotations

from collections import OrderedDict

from service.engine.kv_cache import KVCache


class PrefixCache:
    def __init__(self, kv: KVCache, max_entries: int) -> None:
        self.kv = kv
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, ...], int] = OrderedDict()  # prefix ids -> pinned slot
        self.hits = 0
        self.misses = 0

    @property
    def pinned(self) -> int:
        return len(self._entries)

    def restore(self, prefix: tuple[int, ...], slot: int) -> int:
        """Copies a cached prefix into `slot`; returns the positions restored (0 on a miss)."""
        pinned = self._entries.get(prefix)
        if pinned is None:
            self.misses += 1
            return 0
        self._entries.move_to_end(prefix)
        self.kv.copy_prefix(pinned, slot, len(prefix))
        self.hits += 1
        return len(prefix)

    def store(self, prefix: tuple[int, ...], slot: int) -> bool:
        """Pins a copy of `slot`'s first len(prefix) positions. False when there is no room for it."""
        if self.max_entries <= 0 or prefix in self._entries:
            return False
        if len(self._entries) >= self.max_entries:
            _, old = self._entries.popitem(last=False)
            self.kv.release(old)
        if self.kv.free_slots == 0:
            return False
        pinned = self.kv.allocate()
        self.kv.copy_prefix(slot, pinned, len(prefix))
        self._entries[prefix] = pinned
        return True

    def has(self, prefix: tuple[int, ...]) -> bool:
        return prefix in self._entries
