"""The in-process modes run the same code as Ray: same cache bytes, same weights, resumable across runners."""

from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import pytest
import torch

from infra import storage
from stages.cache import open_cache
from stages.extract import run_extract
from stages.train import latest_checkpoint_state, run_train
from stages.train.job import TrainJob
from stages.train.session import checkpoint_names
from tests.fixtures.cache_content import cache_content
from tests.fixtures.extract import make_job
from tests.fixtures.train_runs import tiny_train_job

REPO = Path(__file__).resolve().parents[2]
N_IMAGES, GLOBAL_BATCH = 48, 16  # 3 steps per epoch


def train_job(cache_url: str, storage_path: str, name: str, **overrides) -> TrainJob:
    return tiny_train_job(cache_url, storage_path, name, **overrides)


def exported(run_dir: str) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(storage.join(run_dir, "export", "encoder.pth"))
    return torch.load(io.BytesIO(data), weights_only=True)


def metrics_rows(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in
            storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode().splitlines()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


@pytest.fixture(scope="module")
def inprocess_cache(fmnist_manifest, base_checkpoint, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("inproc") / "cache")
    result = run_extract(make_job(url, fmnist_manifest(N_IMAGES), base_checkpoint), num_actors=0)
    assert len(result.units_written) == result.units_total == 3 and result.device_seconds.keys() == {"cpu"}
    return url


def test_inprocess_extraction_writes_the_bytes_ray_actors_write(inprocess_cache, fmnist_manifest, base_checkpoint,
                                                                ray_cluster, tmp_path):
    on_ray = str(tmp_path / "ray_cache")
    run_extract(make_job(on_ray, fmnist_manifest(N_IMAGES), base_checkpoint), num_actors=1)
    ours, theirs = cache_content(inprocess_cache), cache_content(on_ray)
    assert ours.keys() == theirs.keys() and len(ours) > 10
    assert [k for k in ours if ours[k] != theirs[k]] == []
    # the marker records the precision, and a complete cache is reported without loading the model
    assert open_cache(inprocess_cache).marker(0)["precision"] == "float32"
    again = run_extract(make_job(inprocess_cache, fmnist_manifest(N_IMAGES), base_checkpoint), num_actors=0)
    assert again.units_skipped == [0, 1, 2] and again.units_written == []


def test_a_run_begun_in_process_is_finished_on_ray_with_identical_weights(inprocess_cache, ray_cluster, tmp_path):
    reference = run_train(train_job(inprocess_cache, str(tmp_path), "whole"))
    assert reference.metrics["step"] == 6 and reference.checkpoint_path
    assert len(checkpoint_names(reference.run_dir)) == 2  # keep_checkpoints pruned the older ones

    half = train_job(inprocess_cache, str(tmp_path), "split", max_steps=3)
    first = run_train(half)
    assert first.metrics["step"] == 3 and first.export_path is None
    before = metrics_rows(first.run_dir)
    finished = run_train(half.replace(max_steps=None, num_workers=1))  # Ray Train, one worker: same world size
    assert finished.metrics["step"] == 6
    history = metrics_rows(finished.run_dir)
    assert [row["step"] for row in history] == [1, 2, 3, 4, 5, 6]
    # resumed, not restarted: the first three rows (their timings included) are the in-process run's own
    assert history[:3] == before
    assert_same_weights(exported(reference.run_dir), exported(finished.run_dir))


def test_gpu_request_without_cuda_is_refused_naming_the_field(inprocess_cache, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match=r"train\.use_gpu is true but CUDA is not available"):
        run_train(train_job(inprocess_cache, str(tmp_path), "gpu", use_gpu=True))


def test_a_run_that_loses_its_lease_stops_naming_the_lease_and_its_holder(inprocess_cache, tmp_path, monkeypatch):
    """Another process takes the run's lease after step 2: the driver stops at its next report with an error naming
    the lease file and the new holder, persists no checkpoint after the loss and does not export."""
    import stages.train.loop as loop
    import stages.train.run as run
    from stages.extract import LeaseConfig
    from stages.train.job import run_dir
    from stages.train.session import RunLease, RunLeaseLostError

    fast = LeaseConfig(ttl_s=60.0, renew_every_s=0.05, confirm_delay_s=0.01)
    monkeypatch.setattr(run, "RunLease", lambda url: RunLease(url, fast))
    job = train_job(inprocess_cache, str(tmp_path), "taken", checkpoint_every=1)
    lease = RunLease(run_dir(job))
    original = loop._report

    def report(job_, t, row, session, checkpoint):
        original(job_, t, row, session, checkpoint)
        if row["step"] == 2:  # another driver takes the name over, as if our lease had expired
            theirs = dataclasses.replace(lease.read(), owner="other-driver", token="theirs").to_bytes()
            for _ in range(4):  # written again in case a renewal in flight rewrote ours; the renewal then notices
                storage.write_bytes(lease.url, theirs)
                time.sleep(4 * fast.renew_every_s)

    monkeypatch.setattr(loop, "_report", report)
    with pytest.raises(RunLeaseLostError, match=r"lease\.json: this run lost its lease: it is held by other-driver"):
        run_train(job)
    steps = [latest_checkpoint_state(run_dir(job))["progress"]["step"]]
    assert steps == [2], "a checkpoint was persisted after the lease was lost"
    assert not Path(run_dir(job), "export").exists()
    assert lease.read().owner == "other-driver"  # the new holder's lease is left alone
