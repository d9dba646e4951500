"""A cache on a file system that fills up mid-extraction: a clear error, a consistent cache, a byte-identical resume.

The file system is a real small tmpfs (or a loop-mounted ext4 image where tmpfs cannot be mounted); a filler file
leaves room for about half of the cache, so the write that hits ENOSPC is a unit's data, not the metadata.
"""

from __future__ import annotations

import pytest

from infra import storage
from stages.cache import CacheFullError, open_cache
from stages.extract import run_extract
from tests.faults.conftest import (
    assert_complete_units_verify,
    assert_markers_kept,
    assert_same_cache,
    claimed_units,
    markers,
)
from tests.fixtures.extract import make_job

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("ray_cluster")]
UNIT, N_IMAGES = 8, 160
FS_BYTES = 16 * 1024 * 1024


def test_full_disk_fails_clearly_keeps_the_cache_consistent_and_resumes(
    fmnist_manifest, base_checkpoint, reference_cache, mounted_small_fs, record_figures
):
    reference = reference_cache(N_IMAGES, UNIT)
    cache_bytes = sum(storage.list_objects(reference).values())
    disk = mounted_small_fs(FS_BYTES)
    filler = disk / "filler.bin"
    with open(filler, "wb") as f:  # leave room for about half of the cache
        f.write(b"\0" * (FS_BYTES - cache_bytes // 2))
    url = str(disk / "cache")
    job = make_job(url, fmnist_manifest(N_IMAGES), base_checkpoint, unit_size=UNIT)

    with pytest.raises(CacheFullError) as failure:
        run_extract(job, num_actors=1)
    message = str(failure.value)
    assert url in message and "no space" in message.lower(), message
    n_units = N_IMAGES // UNIT
    complete = markers(url)
    assert 0 < len(complete) < n_units, f"{len(complete)} of {n_units} units complete: the disk did not fill mid-run"
    assert_complete_units_verify(url)  # every marked unit is whole; the interrupted ones carry no marker
    assert claimed_units(url) == set(), "the failed run left claims behind"

    filler.unlink()  # space frees
    resumed = run_extract(job, num_actors=1)
    assert sorted(resumed.units_skipped) == sorted(complete)
    assert sorted(resumed.units_written + resumed.units_skipped) == list(range(n_units))
    kept = assert_markers_kept(url, complete)
    same = assert_same_cache(url, reference)
    assert open_cache(url).summary().units_complete == n_units
    record_figures(kind="full disk (tmpfs/loop) ENOSPC", faults=int(isinstance(failure.value, CacheFullError)),
                   survived=int(sorted(resumed.units_skipped) == sorted(complete)), units=n_units,
                   complete_at_failure=len(complete), written_by_resume=len(resumed.units_written),
                   recomputed=len(set(resumed.units_written) & set(complete)),
                   lost=kept["markers_rewritten"] + same["objects_differing"], **kept, **same)
