"""SIGKILL the extract driver, and separately single extraction actors, at seeded random points; resume each time.

The promise checked: a crash costs at most the units in flight (``actors × in_flight_per_actor``), never rewrites a
complete unit, and the final cache is byte-identical (:func:`tests.fixtures.cache_content.cache_content`)
to an uninterrupted one.
"""

from __future__ import annotations

import threading
import time

import pytest

from stages.extract import run_extract
from tests.faults.conftest import (
    DRIVER_ROUNDS,
    ROUNDS,
    alive_actors,
    assert_markers_kept,
    assert_same_cache,
    claimed_units,
    fault_seed,
    kill_group,
    markers,
    spawn_extract,
    wait_until,
)
from tests.fixtures.extract import make_job

pytestmark = pytest.mark.usefixtures("ray_cluster")
UNIT = 8
IN_FLIGHT = 2  # run_extract's default in_flight_per_actor


def n_images_for(rounds: int) -> int:
    """Enough units that every round still finds work: each round completes at most 4 units before its kill."""
    return UNIT * max(24, 6 * rounds + 8)


@pytest.mark.parametrize("rounds", DRIVER_ROUNDS)
def test_driver_killed_repeatedly_then_resumed_is_byte_identical(
    rounds, fmnist_manifest, base_checkpoint, reference_cache, fault_rng, record_figures, tmp_path
):
    n_images = n_images_for(rounds)
    manifest, cache = fmnist_manifest(n_images), str(tmp_path / "cache")
    reference = reference_cache(n_images, UNIT)
    n_units, lost_in_flight, log = n_images // UNIT, [], tmp_path / "driver.log"
    for r in range(rounds):
        before = markers(cache)
        target = len(before) + int(fault_rng.integers(1, 4))
        delay = float(fault_rng.uniform(0.0, 0.3))
        proc = spawn_extract(cache, manifest, base_checkpoint, log, unit_size=UNIT)
        wait_until(lambda t=target: len(markers(cache)) >= t, 180, proc, f"round {r}: {target} units complete", log)
        time.sleep(delay)
        assert proc.poll() is None, f"round {r}: driver finished before its kill (seed {fault_seed()})"
        kill_group(proc)
        at_kill = markers(cache)
        in_flight = claimed_units(cache) - set(at_kill)
        lost_in_flight.append(len(in_flight))
        assert len(in_flight) <= IN_FLIGHT, f"round {r}: {sorted(in_flight)} in flight > {IN_FLIGHT}"
        assert_markers_kept(cache, before)
        assert len(at_kill) < n_units, f"round {r}: nothing left to resume"

    before = markers(cache)
    claims_left = claimed_units(cache) - set(before)
    resumed = run_extract(make_job(cache, manifest, base_checkpoint, unit_size=UNIT), num_actors=1)
    assert not set(resumed.units_written) & set(before), "complete units were recomputed"
    assert sorted(resumed.units_written + resumed.units_skipped) == list(range(n_units))
    assert set(resumed.units_taken_over) <= claims_left
    kept = assert_markers_kept(cache, before)
    assert claimed_units(cache) == set(), "claims left behind by a finished run"
    same = assert_same_cache(cache, reference)
    record_figures(kind="extract driver SIGKILL", faults=len(lost_in_flight), survived=len(lost_in_flight),
                   units=n_units, recomputed=sum(lost_in_flight), recomputed_max_per_kill=max(lost_in_flight),
                   bound=IN_FLIGHT * len(lost_in_flight), taken_over=len(resumed.units_taken_over),
                   written_by_resume=len(resumed.units_written),
                   lost=kept["markers_rewritten"] + same["objects_differing"], **kept, **same)


@pytest.mark.parametrize("rounds", ROUNDS)
def test_actors_killed_repeatedly_are_replaced_and_the_cache_is_byte_identical(
    rounds, fmnist_manifest, base_checkpoint, reference_cache, fault_rng, record_figures, tmp_path
):
    """Two actors; ``rounds`` times, after a random amount of progress, SIGKILL one live actor chosen at random."""
    import os
    import signal

    n_images = n_images_for(rounds)
    manifest, cache = fmnist_manifest(n_images), str(tmp_path / "cache")
    reference = reference_cache(n_images, UNIT)
    kills: list[tuple[int, set[int]]] = []  # (pid, units in flight at the kill)
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            seen: set[str] = set()
            for _ in range(rounds):
                target = len(markers(cache)) + int(fault_rng.integers(1, 4))
                delay = float(fault_rng.uniform(0.0, 0.3))
                wait_until(lambda t=target: len(markers(cache)) >= t, 180, what=f"{target} units complete")
                time.sleep(delay)
                wait_until(lambda: bool(set(alive_actors("UnitExtractor")) - seen), 120, what="a live actor")
                alive = alive_actors("UnitExtractor")
                victim = sorted(set(alive) - seen)[int(fault_rng.integers(0, len(set(alive) - seen)))]
                seen.add(victim)
                in_flight = claimed_units(cache) - set(markers(cache))
                os.kill(alive[victim], signal.SIGKILL)
                kills.append((alive[victim], in_flight))
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_extract(make_job(cache, manifest, base_checkpoint, unit_size=UNIT), num_actors=2)
    thread.join(timeout=30)
    assert not errors, f"killer failed: {errors[0]!r}"
    n_units = n_images // UNIT
    assert len(kills) == rounds, f"only {len(kills)} of {rounds} kills happened before the run ended"
    assert result.actors_replaced == rounds
    assert sorted(result.units_written) == list(range(n_units)), "every unit written exactly once"
    assert len(result.units_retried) <= IN_FLIGHT * rounds
    assert claimed_units(cache) == set()
    same = assert_same_cache(cache, reference)
    record_figures(kind="extract actor SIGKILL", faults=len(kills), survived=result.actors_replaced, units=n_units,
                   recomputed=len(result.units_retried), bound=IN_FLIGHT * len(kills),
                   recomputed_max_per_kill=max(len(in_flight) for _, in_flight in kills),
                   written=len(result.units_written), lost=same["objects_differing"], **same)
