"""The API's in-process cache of verified keys: what it keeps, for how long,
and what forgets a key at once."""
from __future__ import annotations

import time

from genq.keys import KeyCache, Verified


def verified(prefix="gq_aaaaaaa"):
    return Verified("t1", "acme", "user", prefix)


def test_a_key_is_kept_for_its_seconds_then_verified_again():
    cache = KeyCache(0.2)
    cache.put("gq_raw-one", verified())
    assert cache.get("gq_raw-one") == verified() and cache.get("gq_raw-two") is None
    time.sleep(0.25)  # past the bound
    assert cache.get("gq_raw-one") is None


def test_forget_drops_a_prefix_at_once_and_zero_keeps_nothing():
    cache = KeyCache(60)
    cache.put("gq_aaaaaaa-1", verified("gq_aaaaaaa"))
    cache.put("gq_bbbbbbb-1", verified("gq_bbbbbbb"))
    cache.forget("gq_aaaaaaa")
    assert cache.get("gq_aaaaaaa-1") is None and cache.get("gq_bbbbbbb-1") is not None
    off = KeyCache(0)
    off.put("gq_x", verified())
    assert off.get("gq_x") is None


def test_the_cache_is_bounded_and_holds_no_raw_key():
    cache = KeyCache(60, max_entries=3)
    for i in range(10):
        cache.put(f"gq_key-{i}", verified())
    assert len(cache._entries) <= 3
    assert not any("gq_key" in digest for digest in cache._entries)
