"""KVCache: slot allocation, lengths, bounds, byte accounting, prefix copies. Exact numbers on a tiny layout."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from service.engine.kv_cache import KVCache, KVLayout

# 2 layers x (K, V) x 1 head x 2 dims x 4 bytes = 32 bytes per token.
LAYOUT = KVLayout(num_layers=2, kv_heads=1, head_dim=2, dtype=np.dtype(np.float32), slots=4, capacity=8)


@pytest.fixture
def kv() -> KVCache:
    return KVCache(LAYOUT)


def test_buffers_have_the_layout_shape() -> None:
    cache = KVCache(LAYOUT)
    assert len(cache.keys) == len(cache.values) == 2
    assert all(b.shape == (4, 1, 8, 2) and b.dtype == np.float32 for b in (*cache.keys, *cache.values))
    assert LAYOUT.bytes_per_token == 32
    assert cache.nbytes_reserved() == 4 * 8 * 32


def test_allocate_takes_the_lowest_free_slot(kv: KVCache) -> None:
    assert [kv.allocate() for _ in range(3)] == [0, 1, 2]
    kv.release(1)
    assert kv.allocate() == 1  # the hole is reused before slot 3
    assert kv.allocate() == 3
    assert kv.free_slots == 0
    with pytest.raises(RuntimeError):
        kv.allocate()


def test_release_frees_the_slot_and_forgets_its_length(kv: KVCache) -> None:
    slot = kv.allocate()
    kv.append(slot, 5)
    kv.release(slot)
    assert kv.free_slots == 4 and kv.offset(slot) == 0
    assert kv.allocate() == slot and kv.offset(slot) == 0


def test_active_range_ends_after_the_highest_allocated_slot(kv: KVCache) -> None:
    assert kv.active_range() == 0
    a, b, c = kv.allocate(), kv.allocate(), kv.allocate()
    assert kv.active_range() == 3
    kv.release(b)
    assert kv.active_range() == 3  # a hole in the middle rides along as a dummy row
    kv.release(c)
    assert kv.active_range() == 1
    kv.release(a)
    assert kv.active_range() == 0


def test_append_counts_positions_up_to_capacity(kv: KVCache) -> None:
    slot = kv.allocate()
    kv.append(slot, 3)
    kv.append(slot, 5)
    assert kv.offset(slot) == 8
    with pytest.raises(ValueError, match="capacity 8"):
        kv.append(slot, 1)
    assert kv.offset(slot) == 8  # a refused append changes nothing


def test_trim_only_shortens(kv: KVCache) -> None:
    slot = kv.allocate()
    kv.append(slot, 6)
    kv.trim(slot, 4)
    assert kv.offset(slot) == 4
    kv.trim(slot, 7)
    assert kv.offset(slot) == 4


def test_bytes_used_and_usage_ratio(kv: KVCache) -> None:
    assert kv.nbytes_used() == 0 and kv.usage_ratio() == 0.0
    a, b = kv.allocate(), kv.allocate()
    kv.append(a, 8)
    kv.append(b, 4)
    assert kv.nbytes_used() == 12 * 32
    assert kv.usage_ratio() == 12 / 32  # 12 of 4 x 8 positions
    kv.release(a)
    assert kv.usage_ratio() == 4 / 32


def test_copy_prefix_copies_only_the_prefix_of_every_buffer(kv: KVCache) -> None:
    src, dst = kv.allocate(), kv.allocate()
    for n, buf in enumerate((*kv.keys, *kv.values)):
        buf[src] = np.arange(16, dtype=np.float32).reshape(1, 8, 2) + 100 * n  # (kv_heads, capacity, head_dim)
        buf[dst] = -1.0
    kv.append(src, 6)
    kv.copy_prefix(src, dst, 3)
    assert kv.offset(dst) == 3 and kv.offset(src) == 6
    for buf in (*kv.keys, *kv.values):
        np.testing.assert_array_equal(buf[dst, :, :3], buf[src, :, :3])
        assert (buf[dst, :, 3:] == -1.0).all()  # positions past the prefix are left alone


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_resident_memory_follows_written_positions() -> None:
    # 8 buffers of 2 slots x 4 heads x 8192 positions x 64 dims x 4 bytes = 16 MiB: 128 MiB reserved.
    layout = KVLayout(num_layers=4, kv_heads=4, head_dim=64, dtype=np.dtype(np.float32), slots=2, capacity=8192)
    before = _rss_bytes()
    cache = KVCache(layout)
    for buf in (*cache.keys, *cache.values):
        buf[0, :, :16] = 1.0  # what a 16-token prefill of slot 0 writes
    grown = _rss_bytes() - before
    # 16 positions x 256 bytes = one 4 KiB page per head and buffer (128 KiB in all). A 2 MiB transparent
    # huge page per head (numpy asks for them on large arrays) would make it 64 MiB: memory would follow
    # the slots' capacity, not their use.
    assert grown < 8 * 2**20, f"{grown / 2**20:.1f} MiB resident after writing 16 positions"
