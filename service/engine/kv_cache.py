"""The external KV cache: one preallocated buffer per layer and kind, shared by all slots.

Layout per layer: keys[i], values[i] of shape (slots, kv_heads, capacity, head_dim). A slot is one row of
the batch axis, so any contiguous range of slots is a contiguous view that can be bound to onnxruntime
without a copy. Buffers are anonymous mmaps with small pages: pages are committed only when a slot first writes
them, so resident memory follows use, while the reservation is bounded by config (slots x capacity).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, slots=True)
class KVLayout:
    """Shapes discovered from the graph (session.py) and sizes from config."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: np.dtype[np.generic]
    slots: int
    capacity: int  # positions per slot

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.dtype.itemsize


def _lazy_zeros(shape: tuple[int, ...], dtype: np.dtype[np.generic]) -> np.ndarray:
    """Zeroed anonymous memory committed 4 KiB at a time. np.zeros asks for 2 MiB transparent huge pages on
    large arrays, so the first write to a head's (capacity, head_dim) region would commit all of it."""
    count = int(np.prod(shape))
    mem = mmap.mmap(-1, max(1, count * dtype.itemsize))
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
        mem.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mem, dtype=dtype, count=count).reshape(shape)


class KVCache:
    """Owns the buffers, which slot is free, and how many positions each slot holds."""

    def __init__(self, layout: KVLayout) -> None:
        self.layout = layout
        shape = (layout.slots, layout.kv_heads, layout.capacity, layout.head_dim)
        # (slots, kv_heads, capacity, head_dim) per layer
        self.keys = [_lazy_zeros(shape, layout.dtype) for _ in range(layout.num_layers)]
        self.values = [_lazy_zeros(shape, layout.dtype) for _ in range(layout.num_layers)]
        self.lengths = np.zeros(layout.slots, dtype=np.int64)  # valid positions per slot
        self._free = set(range(layout.slots))

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        """Takes the lowest free slot (keeps the active range short, so batched steps stay small)."""
        if not self._free:
            raise RuntimeError("no free KV slot")
        slot = min(self._free)
        self._free.remove(slot)
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0
        self._free.add(slot)

    def offset(self, slot: int) -> int:
        return int(self.lengths[slot])

    def append(self, slot: int, n: int) -> None:
        """Records that the model wrote `n` more positions into `slot`."""
        new = int(self.lengths[slot]) + n
        if new > self.layout.capacity:
            raise ValueError(f"slot {slot} would hold {new} positions, capacity {self.layout.capacity}")
        self.lengths[slot] = new

    def trim(self, slot: int, length: int) -> None:
        """Forgets positions past `length` (their memory is simply overwritten later)."""
        self.lengths[slot] = min(int(self.lengths[slot]), length)

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Copies the first `length` positions of slot `src` into `dst` (reuse of a shared prompt prefix)."""
        for buf in (*self.keys, *self.values):
            buf[dst, :, :length] = buf[src, :, :length]
        self.lengths[dst] = length

    def active_range(self) -> int:
        """1 + the highest allocated slot: batched decode steps run over rows [0, active_range)."""
        used = set(range(self.layout.slots)) - self._free
        return max(used) + 1 if used else 0

    def nbytes_used(self) -> int:
        return int(self.lengths.sum()) * self.layout.bytes_per_token

    def nbytes_reserved(self) -> int:
        return self.layout.slots * self.layout.capacity * self.layout.bytes_per_token

    def usage_ratio(self) -> float:
        return self.nbytes_used() / max(1, self.nbytes_reserved())
