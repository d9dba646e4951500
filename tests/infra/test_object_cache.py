"""infra.object_cache (the node-local directory cache of whole objects) and the target cache's local tier on it
(stages.cache.local_tier), on moto S3 behind the fault proxy, which counts the bytes it serves."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from infra.object_cache import ObjectCache, ObjectVerifyError, fixed_set
from stages.cache import ARRAYS, open_cache
from stages.cache.local_tier import LocalCacheSettings
from tests.faults.s3_faults import faulty_s3  # noqa: F401
from tests.fixtures.local_cache import DATA_PATH, V, data_bytes, write_small_cache

DATA = np.random.default_rng(0).bytes(1 << 20)
KEY = "features/c/3/0/0/0"
NS = "k" * 16


def _verify(key: str, data: bytes) -> None:
    if hashlib.sha256(data).digest() != hashlib.sha256(DATA).digest():
        raise ObjectVerifyError(f"{key}: wrong bytes")


def _logged_fetch(log: Path, delay: float = 0.0):
    def fetch() -> bytes:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(delay)
        return DATA
    return fetch


def _child_get(root: str, log: str, flag: str, delay: float) -> None:
    Path(flag).touch()
    ObjectCache(root, NS).get(KEY, _logged_fetch(Path(log), delay), _verify)


def _child_stalls_in_write(root: str, log: str, flag: str) -> None:
    """Fetch, then stall inside the data file's fsync (after its bytes are written, before the rename)."""
    import infra.object_cache as oc

    real = os.fsync

    def stall(fd: int) -> None:
        if os.fstat(fd).st_size >= len(DATA):
            Path(flag).touch()
            time.sleep(60)
        real(fd)

    oc.os.fsync = stall
    ObjectCache(root, NS).get(KEY, _logged_fetch(Path(log)), _verify)


def _wait_for(path: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_two_processes_fetch_an_object_once(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    log = tmp_path / "fetches.log"
    procs = [ctx.Process(target=_child_get, args=(str(tmp_path / "lc"), str(log), str(tmp_path / f"s{i}"), 0.5))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(log.read_text().split()) == 1, "the second process fetched again instead of waiting for the first"
    assert ObjectCache(tmp_path / "lc", NS).path(KEY).read_bytes() == DATA


def test_fetcher_killed_mid_write_leaves_nothing_served(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    root, log = tmp_path / "lc", tmp_path / "fetches.log"
    killed = ctx.Process(target=_child_stalls_in_write, args=(str(root), str(log), str(tmp_path / "stalled")))
    killed.start()
    _wait_for(tmp_path / "stalled")
    cache = ObjectCache(root, NS)
    assert not cache.path(KEY).exists(), "a partial object is visible under its name"
    assert list((cache.dir / ".tmp").iterdir()), "the write in progress should be in .tmp/"
    waiter = ctx.Process(target=_child_get, args=(str(root), str(log), str(tmp_path / "waiting"), 0.0))
    waiter.start()
    _wait_for(tmp_path / "waiting")
    time.sleep(0.5)  # the waiter is blocked on the object's lock, held by the stalled writer
    assert len(log.read_text().split()) == 1
    os.kill(killed.pid, signal.SIGKILL)
    killed.join(10)
    waiter.join(60)
    assert waiter.exitcode == 0
    assert len(log.read_text().split()) == 2, "the waiter fetched once the killed writer's lock was released"
    assert cache.path(KEY).read_bytes() == DATA
    assert not list((cache.dir / ".tmp").iterdir()), "the killed writer's temporary file was not removed"


def test_corrupt_or_truncated_local_file_is_fetched_again(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    log = tmp_path / "fetches.log"
    path = ObjectCache(tmp_path, NS).get(KEY, _logged_fetch(log), _verify)
    with open(path, "r+b") as f:  # same size, one byte flipped: only a hash finds it
        f.seek(1000)
        f.write(bytes([DATA[1000] ^ 0xFF]))
    assert ObjectCache(tmp_path, NS).get(KEY, _logged_fetch(log), _verify) == path  # size check only: kept
    assert len(log.read_text().split()) == 1
    with caplog.at_level(logging.WARNING, logger="infra.object_cache"):
        fresh = ObjectCache(tmp_path, NS, verify_local=True)
        assert fresh.get(KEY, _logged_fetch(log), _verify).read_bytes() == DATA
    assert fresh.counters.refetched == 1 and str(path) in caplog.text and "SHA-256" in caplog.text
    os.truncate(path, 4096)
    fresh = ObjectCache(tmp_path, NS)
    assert fresh.get(KEY, _logged_fetch(log), _verify).read_bytes() == DATA
    assert fresh.counters.refetched == 1 and len(log.read_text().split()) == 3


def test_unverified_object_is_never_stored(tmp_path: Path) -> None:
    cache = ObjectCache(tmp_path, NS)
    with pytest.raises(ObjectVerifyError):
        cache.get(KEY, lambda: DATA[:-1] + b"x", _verify)
    assert not cache.path(KEY).exists() and not list((cache.dir / ".tmp").iterdir())


def test_fixed_set_and_the_bound(tmp_path: Path) -> None:
    assert fixed_set([("a", 5), ("b", 7), ("c", 3), ("d", 2)], 10) == {"a": 5, "c": 3, "d": 2}
    assert fixed_set([("a", 5), ("b", 7)], None) == {"a": 5, "b": 7}
    other = ObjectCache(tmp_path, "other")
    for i, key in enumerate(["old", "new"]):
        other.get(key, lambda: b"x" * 400, lambda k, d: None)
        os.utime(other.dir / f"{key}@meta", (1000 + i, 1000 + i))  # "old" used least recently
    mine = ObjectCache(tmp_path, "mine", max_bytes=1000)
    with pytest.raises(ValueError, match="exceeds max_bytes"):
        mine.reserve({"a": 600, "b": 600})
    mine.reserve({"a": 500})
    assert not other.path("old").exists() and other.path("new").exists()  # 400 + 500 fit, 800 + 500 did not
    with pytest.raises(KeyError, match="keep set"):
        mine.get("b", lambda: b"", lambda k, d: None)


# ------------------------------------------------------------------------------- the target cache's local tier
def _epoch(url: str, view: int, settings: LocalCacheSettings | None):
    """One pass over every image at one view (as an epoch's loader worker reads), through a new reader."""
    cache = open_cache(url, local_cache=settings)
    n = cache.spec.n_images
    return cache.read_samples(np.arange(n), views=np.full(n, view), check_complete=False), cache


def test_local_tier_on_s3(faulty_s3, tmp_path: Path) -> None:  # noqa: F811
    url, proxy = faulty_s3.url, faulty_s3.proxy
    sizes, features = write_small_cache(url)
    plain = _epoch(url, 0, None)[0]
    # bound >= the cache: the first epoch fetches every object once, whole; the second nothing
    roomy = LocalCacheSettings(dir=str(tmp_path / "lc"), epochs=V)
    proxy.stats.get_bytes.clear()
    got, cache = _epoch(url, 0, roomy)
    assert data_bytes(proxy) == sum(sizes.values()), "every object of the cache fetched exactly once, whole"
    assert cache.local.counters()[0] >= sum(sizes.values())
    proxy.stats.get_bytes.clear()
    again, cache = _epoch(url, 1, roomy)  # a new reader (the next epoch's loader worker)
    assert data_bytes(proxy) == 0, "the second epoch fetched cache data from the object store"
    assert cache.local.counters()[1] >= features[:, 1].nbytes // 4
    for name in ARRAYS:
        assert getattr(got, name).tobytes() == getattr(plain, name).tobytes()
    assert again.features.tobytes() == features[:, 1].tobytes()
    # a local copy corrupted in place (same size) is found by its hash on first use and fetched again
    victim = cache.local.store.cache.path("features/c/1/0/0/0")
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    proxy.stats.get_bytes.clear()
    checked, cache = _epoch(url, 1, LocalCacheSettings(dir=str(tmp_path / "lc"), epochs=V, verify_local=True))
    assert checked.features.tobytes() == features[:, 1].tobytes()
    assert data_bytes(proxy) == sizes["features/c/1/0/0/0"] and cache.local.store.cache.counters.refetched == 1
    # a bound below the cache: a fixed set (objects an epoch reads whole first), the rest by byte range each pass
    feature_keys = sorted(k for k in sizes if k.startswith("features/"))
    whole = {k for k in sizes if k.split("/")[0] in ("topk_index", "views", "valid")}
    small = LocalCacheSettings(dir=str(tmp_path / "small"), epochs=V,
                               max_bytes=sum(sizes[k] for k in whole) + sizes[feature_keys[0]] + 1)
    _, first = _epoch(url, 0, small)
    keep = first.local.store.cache.keep
    assert set(keep) == whole | {feature_keys[0]}
    stored = sum(p.stat().st_size for p in first.local.store.cache.dir.iterdir() if p.is_file()
                 and "@" not in p.name and not p.name.startswith("."))
    assert stored == sum(keep.values()) <= small.max_bytes
    proxy.stats.get_bytes.clear()
    _, second = _epoch(url, 1, small)
    assert second.local.store.cache.keep == keep  # every process computes the same set alone
    outside = {p.split("/data/", 1)[1] for p in proxy.stats.get_bytes if DATA_PATH.search(p)}
    assert outside == set(sizes) - set(keep)
    # an object damaged in the store (same size) is refused: never stored, never served
    client, key = faulty_s3.client(), f"data/{feature_keys[1]}"
    body = bytearray(client.get_object(Bucket=faulty_s3.bucket, Key=key)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    client.put_object(Bucket=faulty_s3.bucket, Key=key, Body=bytes(body))
    fresh = LocalCacheSettings(dir=str(tmp_path / "fresh"), epochs=V)
    with pytest.raises(ObjectVerifyError, match=feature_keys[1]):
        _epoch(url, 0, fresh)
    assert not open_cache(url, local_cache=fresh).local.store.cache.path(feature_keys[1]).exists()
