"""Object-store faults against moto on loopback: 5xx, dropped connections, slow responses, server restarts.

Faults go through :class:`tests.faults.s3_faults.FaultProxy` (or stop the moto server itself). What must hold:
transient faults are retried with bounded back-off and lose nothing; a unit whose data did not all land is never
marked complete; a persistent failure ends in :class:`infra.storage.StorageError` naming the operation and the URL;
and a re-run after any of these leaves a cache identical to one extracted without faults.

The in-process extraction path (:class:`stages.extract.UnitExtractor`, the code every Ray actor runs) is used, so the
endpoint can change per test; the Ray driver adds nothing between the actor and the store.
"""

from __future__ import annotations

import io
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from infra import retry, storage
from stages.cache import ARRAYS, TargetCache, UnitIncompleteError, open_cache
from stages.extract import ExtractJob, UnitExtractor, prepare
from stages.images import BadImageError, ImageSource
from stages.manifest import validate_manifest, write_manifest
from stages.uri_policy import UriPolicy
from tests.faults import s3_faults
from tests.faults.s3_faults import FaultyS3, faulty_s3, record  # noqa: F401 - faulty_s3 is a fixture
from tests.fixtures.extract import make_job

FAST = storage.RetryPolicy(attempts=4, base_delay_s=0.05, max_delay_s=0.2)
N_IMAGES = 16
UNIT = {"unit_size": 8, "batch_size": 8}  # two units of 8 images


@pytest.fixture(autouse=True)
def quick_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default policy's 5 attempts with 4x shorter waits (0.05-0.4 s), to keep the suite within its budget."""
    monkeypatch.setattr(retry, "DEFAULT_RETRY", storage.RetryPolicy(attempts=5, base_delay_s=0.05, max_delay_s=0.4))


def extract_all(job: ExtractJob, units: list[int] | None = None) -> TargetCache:
    """Create or open the job's cache and extract ``units`` (default: every incomplete one) in this process."""
    spec, cache = prepare(job)
    extractor = UnitExtractor(job, spec, device="cpu", threads=1)
    for unit in units if units is not None else range(cache.n_units):
        extractor.run_unit(unit)
    return cache


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, fmnist_manifest: Callable[[int], str],
              base_checkpoint: Path) -> TargetCache:
    """The same extraction on a local path, without faults: what every faulted run must reproduce exactly."""
    root = tmp_path_factory.mktemp("reference")
    return extract_all(make_job(root / "cache", fmnist_manifest(N_IMAGES), base_checkpoint, **UNIT))


def assert_same_cache(cache: TargetCache, reference: TargetCache) -> int:
    """Assert every unit of ``cache`` is complete and equal to ``reference``; return the images compared."""
    fresh = open_cache(cache.url)
    assert fresh.complete_units() == list(range(reference.n_units))
    for unit in range(reference.n_units):
        got, want = fresh.read_unit(unit), reference.read_unit(unit)
        for name in ARRAYS:
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"unit {unit} {name}")
        assert fresh.marker(unit)["sha256"] == reference.marker(unit)["sha256"]
    return reference.spec.n_images


def lost_images(cache_url: str, reference: TargetCache) -> int:
    """Images of complete units whose stored targets differ from the reference (a marker over bad data)."""
    cache, lost = open_cache(cache_url), 0
    for unit in cache.complete_units():
        got, want = cache.read_unit(unit), reference.read_unit(unit)
        same = np.ones(len(got.indices), bool)
        for name in ARRAYS:
            a, b = getattr(got, name), getattr(want, name)
            same &= (a == b).reshape(len(a), -1).all(axis=1)
        lost += int((~same).sum())
    return lost


# ------------------------------------------------------------------------------------------ storage helpers
CASES = {
    # name: (rule kwargs, operation)
    "http_503_put": ({"kind": "status", "method": "PUT", "status": 503, "count": 3}, "write"),
    "http_500_put": ({"kind": "status", "method": "PUT", "status": 500, "count": 3}, "write"),
    "http_503_get": ({"kind": "status", "method": "GET", "status": 503, "count": 3}, "read"),
    "http_502_head": ({"kind": "status", "method": "HEAD", "status": 502, "count": 3}, "size"),
    "http_503_list": ({"kind": "status", "method": "GET", "path": r"^/[^/]+/?$", "status": 503, "count": 3}, "list"),
    "drop_mid_body_get": ({"kind": "drop", "method": "GET", "count": 3}, "read"),
    "drop_put": ({"kind": "drop", "method": "PUT", "count": 3}, "write"),
    "slow_put": ({"kind": "delay", "method": "PUT", "delay_s": 0.5, "count": 1}, "write"),
    "put_timeout": ({"kind": "delay", "method": "PUT", "delay_s": 1.6, "count": 1}, "write"),
    "read_timeout_get": ({"kind": "delay", "method": "GET", "delay_s": 1.6, "count": 1}, "read"),
}


@pytest.mark.faults
@pytest.mark.parametrize("case", sorted(CASES))
def test_transient_faults_on_each_operation_are_retried(faulty_s3: FaultyS3, case: str,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each fault outlasts botocore's own attempts (2 here), so infra.storage's back-off must absorb it."""
    monkeypatch.setenv("TEC_S3_READ_TIMEOUT_S", "1")
    storage.clear_filesystem_cache()
    url = storage.join(faulty_s3.url, "dir", "obj.bin")
    payload = np.random.default_rng(0).bytes(300_000)
    storage.write_bytes(url, payload)
    rule_kwargs, op = CASES[case]
    rule = faulty_s3.proxy.add(**rule_kwargs)
    if op == "write":
        storage.write_bytes(url, payload[::-1], FAST)
        expected = payload[::-1]
    else:
        expected = payload
        got: Any = {"read": lambda: storage.read_bytes(url, FAST), "size": lambda: storage.size(url, FAST),
                    "list": lambda: storage.list_objects(faulty_s3.url, FAST)}[op]()
        assert got == {"read": payload, "size": len(payload), "list": {"dir/obj.bin": len(payload)}}[op]
    assert rule.fired == rule.count, f"{case}: fault fired {rule.fired} of {rule.count} times"
    stored = faulty_s3.objects()["data/dir/obj.bin"]
    assert stored == expected
    record("fault", case=case, kind=case, injected=rule.fired, survived=True, bytes_compared=len(expected),
           data_lost=int(stored != expected))


@pytest.mark.faults
def test_persistent_outage_ends_in_a_clear_bounded_error(faulty_s3: FaultyS3) -> None:  # noqa: F811
    """A store answering 503 forever: exactly attempts x botocore-attempts requests, then one clear StorageError."""
    url = storage.join(faulty_s3.url, "never.bin")
    rule = put_rule = faulty_s3.proxy.add("status", "PUT", count=None)
    started = time.monotonic()
    with pytest.raises(storage.StorageError) as info:
        storage.write_bytes(url, b"x" * 1000, FAST)
    elapsed = time.monotonic() - started
    message = str(info.value)
    assert message.startswith(f"write {url} failed after {FAST.attempts} attempts")
    assert "503" in message and info.value.transient
    assert "Traceback" not in message and "aiobotocore" not in message
    assert rule.fired == FAST.attempts * 2  # AWS_MAX_ATTEMPTS=2 per storage attempt: bounded
    assert elapsed < 15
    partial = int("data/never.bin" in faulty_s3.objects())
    assert not partial

    faulty_s3.proxy.clear()
    storage.write_bytes(url, b"ok")
    rule = faulty_s3.proxy.add("status", "GET", count=None, status=500)
    store = storage.zarr_store(faulty_s3.url, read_only=True)
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.sync import sync

    with pytest.raises(storage.StorageError, match=r"read s3://.*/data/never\.bin failed after 5 attempts"):
        sync(store.get("never.bin", default_buffer_prototype()))
    assert rule.fired == retry.DEFAULT_RETRY.attempts * 2
    faulty_s3.proxy.clear()
    kept = storage.read_bytes(url)
    record("fault", case="persistent_503_put", kind="persistent_http_503", injected=put_rule.fired,
           survived=False, clear_errors=1, seconds_to_error=round(elapsed, 2), data_lost=partial)
    record("fault", case="persistent_500_zarr_get", kind="persistent_http_500", injected=rule.fired, survived=False,
           clear_errors=1, bytes_compared=len(kept), data_lost=int(kept != b"ok"))


# ---------------------------------------------------------------------------------------- unit extraction
@pytest.mark.faults
def test_a_shard_that_fails_to_land_never_gets_a_marker(faulty_s3: FaultyS3, reference: TargetCache,  # noqa: F811
                                                        fmnist_manifest: Callable[[int], str],
                                                        base_checkpoint: Path) -> None:
    """503 on every PUT of unit 0's attn_logits shard: features landed, marker must not; the re-run completes."""
    job = make_job(faulty_s3.url, fmnist_manifest(N_IMAGES), base_checkpoint, **UNIT)
    spec, cache = prepare(job)
    extractor = UnitExtractor(job, spec, device="cpu", threads=1)
    rule = faulty_s3.proxy.add("status", "PUT", path=r"/attn_logits/c/0/", count=None)
    with pytest.raises(storage.StorageError, match=rf"write {faulty_s3.url}/attn_logits\[0:8\] failed after 5"):
        extractor.run_unit(0)
    keys = faulty_s3.objects()
    assert "data/features/c/0/0/0/0" in keys  # part of the unit is there ...
    assert "data/units/0.done" not in keys  # ... but it is not marked complete
    assert cache.complete_units() == []
    with pytest.raises(UnitIncompleteError):
        open_cache(faulty_s3.url).read_unit(0)
    injected = rule.fired
    faulty_s3.proxy.clear()
    extractor.run_unit(0)
    extractor.run_unit(1)
    compared = assert_same_cache(cache, reference)
    record("fault", case="persistent_503_shard_put", kind="persistent_http_503", injected=injected, survived=False,
           clear_errors=1, images_compared=compared, data_lost=lost_images(faulty_s3.url, reference))


@pytest.mark.faults
def test_transient_faults_during_extraction_and_reading_lose_nothing(
    faulty_s3: FaultyS3, reference: TargetCache, fmnist_manifest: Callable[[int], str],  # noqa: F811
    base_checkpoint: Path,
) -> None:
    """Bursts of 5xx, drops and delays on every kind of request an extraction and a training read make."""
    job = make_job(faulty_s3.url, fmnist_manifest(N_IMAGES), base_checkpoint, **UNIT)
    proxy = faulty_s3.proxy
    rules = [
        proxy.add("status", "PUT", path=r"/features/c/1/", count=3, status=503),
        proxy.add("status", "PUT", path=r"/units/1\.done$", count=3, status=500),
        proxy.add("drop", "PUT", path=r"/failures/0\.parquet$", count=3),
        proxy.add("status", "HEAD", path=r"/units/", count=3, status=503),
        proxy.add("delay", "PUT", path=r"/topk_index/", count=2, delay_s=0.2),
    ]
    cache = extract_all(job)
    assert [r.fired for r in rules] == [r.count for r in rules]
    compared = assert_same_cache(cache, reference)
    reads = [
        proxy.add("status", "GET", path=r"/features/c/0/", count=3, status=503),
        proxy.add("drop", "GET", path=r"/attn_logits/c/1/", count=2),
    ]
    fresh = open_cache(faulty_s3.url)
    idx = np.arange(N_IMAGES)
    views = idx % 2
    got, want = fresh.read_samples(idx, views), reference.read_samples(idx, views)
    for name in ARRAYS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert [r.fired for r in reads] == [r.count for r in reads]
    lost = lost_images(faulty_s3.url, reference)
    for r in rules + reads:
        kind = r.kind if r.kind != "status" else f"http_{r.status}"
        record("fault", case=f"extract_{r.method}_{r.path}", kind=f"{kind}_{r.method.lower()}", injected=r.fired,
               survived=True, images_compared=compared if r in rules else len(idx), data_lost=lost)


def _outage_on(moto: Any, marker: str, down_s: float | None,
               monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """Stop moto the first time a storage write whose URL contains ``marker`` starts; restart after ``down_s``."""
    real, fired = storage.with_retries, threading.Event()

    def hooked(op: str, url: str, func: Callable[[], Any], policy: storage.RetryPolicy = retry.DEFAULT_RETRY):
        if op == "write" and marker in url and not fired.is_set():
            fired.set()
            moto.stop()
            if down_s is not None:
                threading.Thread(target=lambda: (time.sleep(down_s), moto.start()), daemon=True).start()
        return real(op, url, func, policy)

    monkeypatch.setattr(storage, "with_retries", hooked)
    return fired


@pytest.mark.faults
@pytest.mark.parametrize("down_s", [1.0, None], ids=["short_outage", "outage_outlasts_retries"])
def test_moto_restart_in_the_middle_of_a_unit(faulty_s3: FaultyS3, reference: TargetCache,  # noqa: F811
                                              fmnist_manifest: Callable[[int], str], base_checkpoint: Path,
                                              monkeypatch: pytest.MonkeyPatch, down_s: float | None) -> None:
    """The S3 server goes away after unit 0's features shard and before its attn_logits shard (connections refused).

    A short outage is ridden out by the retries; a long one ends the unit with a clear StorageError and no marker. In
    both cases extracting the incomplete units again gives exactly the reference cache.
    """
    for name in ("TEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"):
        monkeypatch.setenv(name, faulty_s3.moto.endpoint)  # straight to moto: a refused connection, no proxy
    storage.clear_filesystem_cache()
    job = make_job(faulty_s3.url, fmnist_manifest(N_IMAGES), base_checkpoint, **UNIT)
    spec, cache = prepare(job)
    extractor = UnitExtractor(job, spec, device="cpu", threads=1)
    fired = _outage_on(faulty_s3.moto, "/attn_logits[0:", down_s, monkeypatch)
    if down_s is not None:
        extractor.run_unit(0)
    else:
        with pytest.raises(storage.StorageError, match=r"write s3://.*/attn_logits\[0:8\] failed after 5 attempts"):
            extractor.run_unit(0)
        assert "data/units/0.done" not in _keys_when_back(faulty_s3)
    assert fired.is_set()
    pending = [u for u in range(cache.n_units) if u not in open_cache(faulty_s3.url).complete_units()]
    for unit in pending:
        extractor.run_unit(unit)
    compared = assert_same_cache(cache, reference)
    record("fault", case=f"moto_restart_{down_s}", kind="server_restart_mid_unit", injected=int(fired.is_set()),
           survived=down_s is not None, clear_errors=int(down_s is None), images_compared=compared,
           data_lost=lost_images(faulty_s3.url, reference))


def _keys_when_back(faulty: FaultyS3) -> dict[str, bytes]:
    faulty.moto.start()
    return faulty.objects()


# ---------------------------------------------------------------------------------------------- image reads
def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.faults
def test_an_unavailable_image_store_is_not_recorded_as_a_bad_image(faulty_s3: FaultyS3) -> None:  # noqa: F811
    """5xx bursts on image reads are retried; an outage raises StorageError (unit fails), never a 'missing' skip."""
    url = storage.join(faulty_s3.url, "images", "a.png")
    storage.write_bytes(url, _png(7))
    source = ImageSource(in_chans=1, retry=FAST)
    burst = faulty_s3.proxy.add("status", "GET", path=r"/images/", count=3)
    pixels = source.read(url)
    assert pixels.max() == 7
    assert burst.fired == 3
    faulty_s3.proxy.clear()
    outage = faulty_s3.proxy.add("status", "GET", path=r"/images/", count=None)
    with pytest.raises(storage.StorageError) as info:
        source.read(url)
    assert not isinstance(info.value, BadImageError) and info.value.transient
    with pytest.raises(BadImageError, match="missing"):  # a permanent error stays a recorded skip
        faulty_s3.proxy.clear()
        source.read(storage.join(faulty_s3.url, "images", "absent.png"))
    record("fault", case="image_get_burst", kind="http_503_get", injected=burst.fired, survived=True,
           images_compared=1, data_lost=int(pixels.max() != 7))
    record("fault", case="image_get_outage", kind="persistent_http_503", injected=outage.fired, survived=False,
           clear_errors=int(isinstance(info.value, storage.StorageError)),
           data_lost=int(isinstance(info.value, BadImageError)))


# Store errors on image reads: each ends the unit in StorageError naming the URL, never in "missing" skips.
STORE_ERRORS = {
    # name: (HTTP status the proxy answers image GETs with, the S3 error code; None: the bucket does not exist)
    "access_denied": (403, "AccessDenied"),
    "expired_token": (400, "ExpiredToken"),
    "slowdown_beyond_retries": (503, "SlowDown"),
    "no_such_bucket": (None, None),
}


@pytest.mark.faults
@pytest.mark.parametrize("case", sorted(STORE_ERRORS))
def test_store_errors_on_image_reads_stop_the_unit_instead_of_skipping_images(
    faulty_s3: FaultyS3, case: str, tmp_path: Path, base_checkpoint: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Access denied, an expired token, throttling that outlives the retries, a bucket that does not exist: the unit
    raises StorageError naming the image's URL and gets no marker; once the store is fine the same unit completes
    with every image valid (nothing was recorded as missing)."""
    status, code = STORE_ERRORS[case]
    bucket_url = faulty_s3.url if status else f"s3://tec-absent-{uuid.uuid4().hex[:12]}/data"
    uris = [storage.join(bucket_url, "images", f"{i}.png") for i in range(8)]
    if status:
        for i, uri in enumerate(uris):
            storage.write_bytes(uri, _png(10 + i))
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(validate_manifest(pa.table({"index": np.arange(8, dtype=np.int64), "uri": uris})), manifest)
    job = make_job(tmp_path / "cache", manifest, base_checkpoint, unit_size=8, batch_size=8)
    spec, cache = prepare(job)
    extractor = UnitExtractor(job, spec, device="cpu", threads=1)
    monkeypatch.setattr(retry, "DEFAULT_RETRY", storage.RetryPolicy(attempts=2, base_delay_s=0.05, max_delay_s=0.1))
    rule = None
    if status:
        monkeypatch.setitem(s3_faults._ERROR_CODES, status, code)
        rule = faulty_s3.proxy.add("status", "GET", path=r"/images/", count=None, status=status)
    sent = sum(faulty_s3.proxy.stats.requests.values())
    with pytest.raises(storage.StorageError) as info:
        extractor.run_unit(0)
    requests_refused = sum(faulty_s3.proxy.stats.requests.values()) - sent  # all answered with an error
    message = str(info.value)
    assert not isinstance(info.value, BadImageError)
    assert message.startswith(f"read {uris[0]} failed"), message
    assert info.value.transient == (code == "SlowDown")
    assert "does not exist" in message if status is None else (rule is not None and rule.fired > 0)
    assert cache.complete_units() == [] and not (tmp_path / "cache" / "units" / "0.done").exists()
    skips = cache.failures().num_rows
    assert skips == 0
    valid = 0
    if status:
        faulty_s3.proxy.clear()
        extractor.run_unit(0)
        assert cache.complete_units() == [0] and cache.failures().num_rows == 0
        valid = int(cache.read_unit(0).valid.sum())
        assert valid == len(uris)
    record("fault", case=f"image_get_{case}", kind=f"image_read_{case}", survived=False, clear_errors=1,
           injected=rule.fired if rule else requests_refused, skips_recorded=skips, images_valid_on_rerun=valid,
           data_lost=skips)


@pytest.mark.faults
def test_facts_about_one_object_stay_recorded_skips(faulty_s3: FaultyS3) -> None:  # noqa: F811
    """An empty object (its ranged GET is unsatisfiable), an absent key, an object over max_image_bytes: skips."""
    source = ImageSource(in_chans=1, retry=FAST, policy=UriPolicy(max_image_bytes=100))
    storage.write_bytes(storage.join(faulty_s3.url, "images", "empty.png"), b"")
    storage.write_bytes(storage.join(faulty_s3.url, "images", "big.png"), _png(1) + bytes(200))
    for name, reason in (("empty.png", "empty"), ("absent.png", "missing"), ("big.png", "too_large")):
        with pytest.raises(BadImageError) as info:
            source.read(storage.join(faulty_s3.url, "images", name))
        assert info.value.reason == reason, name


# ------------------------------------------------------------------------------------------------- soak (full)
@pytest.mark.faults_full
def test_sustained_partial_faults_over_a_whole_extraction(
    faulty_s3: FaultyS3, reference: TargetCache, fmnist_manifest: Callable[[int], str],  # noqa: F811
    base_checkpoint: Path,
) -> None:
    """Every 3rd PUT 503, every 4th HEAD 500, every 5th GET dropped mid-body, every 7th PUT slow, for the whole run."""
    proxy = faulty_s3.proxy
    rules = [
        proxy.add("status", "PUT", count=None, every=3, status=503),
        proxy.add("status", "HEAD", count=None, every=4, status=500),
        proxy.add("drop", "GET", count=None, every=5),
        proxy.add("delay", "PUT", count=None, every=7, delay_s=0.2),
    ]
    job = make_job(faulty_s3.url, fmnist_manifest(N_IMAGES), base_checkpoint, **UNIT)
    cache = extract_all(job)
    for _ in range(3):
        fresh = open_cache(faulty_s3.url)
        idx = np.random.default_rng(1).permutation(N_IMAGES)
        got, want = fresh.read_samples(idx, idx % 2), reference.read_samples(idx, idx % 2)
        np.testing.assert_array_equal(got.features, want.features)
    proxy.clear()
    assert all(r.fired > 0 for r in rules)
    compared, lost = assert_same_cache(cache, reference), lost_images(faulty_s3.url, reference)
    for r in rules:
        kind = r.kind if r.kind != "status" else f"http_{r.status}"
        record("fault", case="soak", kind=f"{kind}_{r.method.lower()}", injected=r.fired, survived=True,
               images_compared=compared, data_lost=lost)
