"""Two extraction jobs on one cache URI: they split the units (never both writing one, both writing some) and finish
what a dead one abandoned; plus the claim protocol itself (races, stale leases, the write fence) on the local fs and
on moto S3. The jobs extract in-process (``extract.num_actors: 0``: the claims are the driver's either way), so a
killed job's work dies with it and its claims are provably stale."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from infra import storage
from stages.cache import ClaimLostError, array_shapes, new_owner_id
from stages.cache import create_arrays as _create
from stages.extract import ExtractResult, prepare, run_extract
from tests.faults.conftest import (
    assert_markers_kept,
    assert_same_cache,
    claimed_units,
    claims_by_pid,
    fault_seed,
    kill_group,
    markers,
    spawn_paused_extract,
    wait_until,
)
from tests.fixtures.extract import make_job

UNIT = 8
IN_FLIGHT = 2  # units an in-process extraction keeps in flight: what a killed job can lose


@pytest.fixture(params=["local", "s3"])
def cache_url(request, tmp_path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_url")
    return str(tmp_path / "cache")


@pytest.fixture
def small_cache(cache_url, fmnist_manifest, base_checkpoint):
    """An empty 48-image cache (6 units) at ``cache_url``, created through the extract stage's ``prepare``."""
    _, cache = prepare(make_job(cache_url, fmnist_manifest(48), base_checkpoint, unit_size=UNIT))
    return cache


def _claim_race(cache, contenders: int, units: list[int]) -> dict[int, list[str]]:
    """``contenders`` owners claim ``units`` at the same instant; returns unit → owners that believe they hold it."""
    barrier = threading.Barrier(contenders)
    won: dict[int, list[str]] = {u: [] for u in units}
    lock = threading.Lock()

    def contend() -> None:
        owner = new_owner_id()
        barrier.wait()
        outcome = cache.claim_units(units, owner, want=len(units), confirm_delay_s=0.5)
        with lock:
            for unit in outcome.claimed:
                won[unit].append(owner)

    threads = [threading.Thread(target=contend) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


@pytest.mark.faults
def test_simultaneous_claims_leave_each_unit_to_at_most_one_owner(small_cache, cache_url, record_figures):
    contenders = 4
    won = _claim_race(small_cache, contenders, list(range(small_cache.n_units)))
    assert all(len(owners) <= 1 for owners in won.values()), won
    assert any(won.values()), "nobody got any unit"
    winners = {o for holders in won.values() for o in holders}
    record_figures(kind=f"claim race, {contenders} owners at one instant ({_store(cache_url)})", faults=contenders,
                   survived=contenders, units=len(won), winners=len(winners), claimed=sum(len(h) for h in won.values()),
                   double_claimed=sum(len(h) > 1 for h in won.values()),
                   lost=sum(len(h) > 1 for h in won.values()))


def _store(url: str) -> str:
    return url.split(":")[0] if "://" in url else "local"


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.faults
def test_stale_claims_are_taken_over_and_live_ones_respected(small_cache, cache_url, record_figures):
    cache, claims = small_cache, storage.join(small_cache.url, "claims")
    live_other = new_owner_id()
    assert cache.claim_units([0], live_other, want=1, confirm_delay_s=0.01).claimed == [0]
    dead = json.loads(storage.read_bytes(storage.join(claims, "0.json")))
    dead.update(unit=1, owner="gone", pid=_dead_pid(), pid_start=None)  # same host, process gone
    storage.write_bytes(storage.join(claims, "1.json"), json.dumps(dead).encode())
    expired = dict(dead, unit=2, owner="elsewhere", host="another-host", expires=time.time() - 1)
    storage.write_bytes(storage.join(claims, "2.json"), json.dumps(expired).encode())
    remote_live = dict(expired, unit=3, owner="remote", expires=time.time() + 600)
    storage.write_bytes(storage.join(claims, "3.json"), json.dumps(remote_live).encode())

    planted = claimed_units(cache.url) - {0}  # the dead, expired and live remote claims
    me = new_owner_id()
    outcome = cache.claim_units([0, 1, 2, 3, 4], me, want=5, confirm_delay_s=0.01)
    assert outcome.claimed == [1, 2, 4] and outcome.taken_over == [1, 2] and outcome.busy == [0, 3]
    assert cache.renew_claims([1, 2, 4], me) == []
    cache.release_claim(0, me)  # not ours: left alone
    assert cache.read_claim(0).owner == live_other
    cache.release_claim(4, me)
    assert cache.read_claim(4) is None
    record_figures(kind=f"stale claims: dead pid, expired, live ({_store(cache_url)})", faults=len(planted),
                   survived=len(set(outcome.taken_over) | (set(outcome.busy) & planted)),
                   taken_over=len(outcome.taken_over), live_respected=len(outcome.busy),
                   lost=int(cache.read_claim(0).owner != live_other))


@pytest.mark.faults
def test_a_writer_whose_claim_was_taken_over_writes_nothing(small_cache, cache_url, record_figures):
    cache, me, other = small_cache, new_owner_id(), new_owner_id()
    assert cache.claim_units([5], me, want=1, confirm_delay_s=0.01).claimed == [5]
    claim = json.loads(storage.read_bytes(storage.join(cache.url, "claims", "5.json")))
    storage.write_bytes(storage.join(cache.url, "claims", "5.json"), json.dumps(dict(claim, owner=other)).encode())
    overwritten = int(cache.read_claim(5).owner == other)
    zeros = _zero_unit(cache, 5)
    with pytest.raises(ClaimLostError, match=r"unit 5 is claimed by"):
        cache.write_unit(5, *zeros, owner=me)
    keys = storage.list_objects(cache.url)
    written = [k for k in keys if k.startswith(("features/c/5/", "views/c/5/"))]
    assert not cache.is_complete(5) and not written
    record_figures(kind=f"a writer whose claim was taken over ({_store(cache_url)})", faults=overwritten,
                   survived=overwritten * int(not written), objects_written=len(written), lost=len(written))


def _zero_unit(cache, unit: int) -> list[np.ndarray]:
    n = len(cache.unit_range(unit))
    return [np.zeros((n, *shape[1:]), dtype) for shape, dtype in array_shapes(cache.spec).values()]


@pytest.mark.faults
def test_a_late_concurrent_creator_keeps_the_units_already_written(small_cache):
    """Job B finds the arrays but not yet the group attribute (job A is mid-creation) and creates them too."""
    cache, url = small_cache, small_cache.url
    marker = cache.write_unit(2, *_zero_unit(cache, 2))
    group_meta = json.loads(storage.read_bytes(storage.join(url, "zarr.json")))
    storage.write_bytes(storage.join(url, "zarr.json"), json.dumps(dict(group_meta, attributes={})).encode())
    _create(url, cache.spec, "shuffle")
    assert cache.is_complete(2) and cache.marker(2) == marker
    assert cache.read_unit(2).valid.shape == (len(cache.unit_range(2)),)
    assert all(storage.exists(storage.join(url, key)) for key in cache.unit_objects(2))


def _run_in_thread(job, out: dict, key: str, barrier: threading.Barrier) -> threading.Thread:
    def go() -> None:
        barrier.wait()
        try:
            out[key] = run_extract(job, num_actors=0)
        except BaseException as exc:
            out[key] = exc

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


@pytest.mark.faults
def test_two_jobs_at_once_split_the_units_and_match_an_uninterrupted_cache(
    cache_url, fmnist_manifest, base_checkpoint, reference_cache, record_figures
):
    n_images = 160
    job = make_job(cache_url, fmnist_manifest(n_images), base_checkpoint, unit_size=UNIT)
    out: dict[str, ExtractResult | BaseException] = {}
    barrier = threading.Barrier(2)
    threads = [_run_in_thread(job, out, name, barrier) for name in ("a", "b")]
    for t in threads:
        t.join(timeout=300)
    a, b = out["a"], out["b"]
    assert isinstance(a, ExtractResult) and isinstance(b, ExtractResult), (a, b)
    n_units = n_images // UNIT
    both = set(a.units_written) & set(b.units_written)
    assert not both, f"units written by both jobs: {sorted(both)}"
    assert a.units_written and b.units_written, (f"one job did everything (a {a.units_written}, b "
                                                 f"{b.units_written}): not a concurrent run")
    assert sorted(a.units_written + b.units_written) == list(range(n_units))
    assert set(a.units_by_others) <= set(b.units_written) and set(b.units_by_others) <= set(a.units_written)
    assert claimed_units(cache_url) == set()
    same = assert_same_cache(cache_url, reference_cache(n_images, UNIT))
    record_figures(kind=f"two concurrent extract jobs ({_store(cache_url)})",
                   faults=len(out) - 1, survived=len(out) - 1, jobs=len(out), units=n_units,
                   written_a=len(a.units_written), written_b=len(b.units_written), written_by_both=len(both),
                   by_others=len(a.units_by_others) + len(b.units_by_others), recomputed=len(both),
                   lost=same["objects_differing"], **same)


@pytest.mark.faults
def test_second_job_finishes_the_units_a_killed_first_job_abandoned(
    fmnist_manifest, base_checkpoint, reference_cache, fault_rng, record_figures, tmp_path
):
    """The first job's k-th unit (k seeded) hangs, holding its claim; once the second job has claimed a unit beside
    it, the first is SIGKILLed: the second takes over every unit the first held and finishes the cache."""
    n_images = 160
    manifest, cache = fmnist_manifest(n_images), str(tmp_path / "cache")
    log, event = tmp_path / "first.log", tmp_path / "first.hung"
    hang_at = int(fault_rng.integers(3, 6))
    first = spawn_paused_extract(cache, manifest, base_checkpoint, event, log, pause_at_call=hang_at, unit_size=UNIT)
    wait_until(lambda: event.exists() and len(markers(cache)) >= 2, 180, first,
               f"the first job's first units and its hung unit (call {hang_at})", log)
    hung, by_first = int(event.read_text()), markers(cache)
    out: dict[str, ExtractResult | BaseException] = {}
    second = _run_in_thread(make_job(cache, manifest, base_checkpoint, unit_size=UNIT), out, "b",
                            threading.Barrier(1))
    wait_until(lambda: os.getpid() in claims_by_pid(cache).values(), 120, first, "the second job's first claim", log)
    assert first.poll() is None, f"the first job ended before its kill (seed {fault_seed()})"
    kill_group(first)
    at_kill = markers(cache)
    abandoned = {u for u, pid in claims_by_pid(cache).items() if pid == first.pid} - set(at_kill)
    assert hung in abandoned, f"the hung unit {hung} lost its claim before the kill: {sorted(abandoned)}"
    second.join(timeout=300)
    b = out["b"]
    assert isinstance(b, ExtractResult), b
    n_units = n_images // UNIT
    assert b.units_written, "the second job wrote nothing"
    assert abandoned <= set(b.units_taken_over), (f"abandoned {sorted(abandoned)}, taken over "
                                                  f"{sorted(b.units_taken_over)} (seed {fault_seed()})")
    kept = assert_markers_kept(cache, at_kill)
    assert sorted(set(b.units_written) | set(at_kill)) == list(range(n_units))
    assert not set(b.units_written) & set(by_first), "the second job rewrote units the first had completed"
    assert claimed_units(cache) == set()
    same = assert_same_cache(cache, reference_cache(n_images, UNIT))
    record_figures(kind="first of two concurrent extract jobs SIGKILLed", faults=int(first.returncode == -9),
                   survived=int(abandoned <= set(b.units_taken_over)), units=n_units,
                   abandoned_claims=len(abandoned), taken_over=len(b.units_taken_over),
                   recomputed=len(b.units_taken_over), bound=IN_FLIGHT,
                   written_first=len(at_kill) - len(set(at_kill) & set(b.units_written)),
                   written_second=len(b.units_written),
                   lost=kept["markers_rewritten"] + same["objects_differing"], **kept, **same)
