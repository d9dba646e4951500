"""Stage 2 (train) on real Ray Train (2 gloo workers) and in-process, real caches on disk and on moto's S3 server;
what a start of a run refuses before any worker starts (unfinished cache, changed configuration), and a resume on
another number of workers."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch

from infra import storage
from stages.cache import UnitIncompleteError, open_cache
from stages.train import run_dir, run_train
from stages.train.job import CacheIncompatibleError, TrainJob, check_cache
from stages.train.rundir import RunConfigChangedError, read_attempts
from stages.train.session import checkpoint_names
from tec_model import vit_kwargs
from tests.faults.conftest import global_indices, kill_group, spawn_paused_train, wait_until
from tests.faults.figures import record
from tests.fixtures.train_runs import tiny_train_job

REPO = Path(__file__).resolve().parents[2]
N_IMAGES, GLOBAL_BATCH, STEPS_PER_EPOCH = 64, 16, 4
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def cache_url(train_cache) -> str:
    """The session's 64-image cache (tests/fixtures/train_runs.py), extracted in-process: Ray actors' bytes."""
    return train_cache


def make_train_job(cache_url: str, storage_path: str, name: str, **overrides) -> TrainJob:
    """:func:`tiny_train_job` on 2 Ray Train workers with half an epoch of warm-up."""
    return tiny_train_job(cache_url, storage_path, name, **({"warmup_epochs": 0.5, "num_workers": 2} | overrides))


def final_state(result_run_dir: str) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(storage.join(result_run_dir, "export", "encoder.pth"))
    return torch.load(io.BytesIO(data), weights_only=True)


def losses(run_dir: str) -> list[float]:
    """Per-step losses from the run directory's metrics history (rank 0 rewrites it at every checkpoint)."""
    text = storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode()
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


@pytest.fixture(scope="module")
def reference(ray_train_reference) -> tuple[TrainJob, object]:
    """An uninterrupted 2-epoch cached run with 2 workers, logging the indices each rank trained on (the session's,
    tests/fixtures/train_runs.py: the worker-kill test compares its weights with it too)."""
    return ray_train_reference


@pytest.fixture(scope="module")
def inprocess_reference(cache_url, tmp_path_factory) -> tuple[TrainJob, object]:
    """The same 2-epoch run in this process (``num_workers: 0``, one rank)."""
    job = make_train_job(cache_url, str(tmp_path_factory.mktemp("inproc_runs")), "inproc", num_workers=0)
    return job, run_train(job)


def test_run_exports_a_timm_encoder_and_loss_falls(reference):
    _, result = reference
    assert result.metrics["step"] == 2 * STEPS_PER_EPOCH
    vit = timm.create_model("vit_pico_patch4_32", num_classes=0, in_chans=1)
    vit.load_state_dict(final_state(result.run_dir), strict=True)
    history = losses(result.run_dir)
    assert len(history) == 2 * STEPS_PER_EPOCH and history[-1] < history[0]
    assert json.loads(storage.read_bytes(storage.join(result.run_dir, "config.json")))["run_name"] == "reference"


def test_two_workers_see_every_sample_once_per_epoch(reference):
    _, result = reference
    per_epoch: dict[int, list[int]] = {0: [], 1: []}
    for name in storage.list_objects(storage.join(result.run_dir, "indices")):
        rows = json.loads(storage.read_bytes(storage.join(result.run_dir, "indices", name)))
        for step, idx in rows.items():
            per_epoch[int(step) // STEPS_PER_EPOCH].extend(idx)
    for epoch, seen in per_epoch.items():
        assert sorted(seen) == list(range(N_IMAGES)), f"epoch {epoch}: samples missing or repeated"


def test_cached_and_online_losses_agree(inprocess_reference, cache_url, tmp_path):
    job, result = inprocess_reference
    online = job.replace(run_name="online", storage_path=str(tmp_path), target_source="online",
                         checkpoint_url=open_spec(cache_url).checkpoint, log_indices=False, max_steps=4,
                         checkpoint_every=4)
    run_train(online)
    cached, fresh = losses(result.run_dir)[:4], losses(storage.join(str(tmp_path), "online"))
    assert len(fresh) == 4
    np.testing.assert_allclose(fresh, cached, rtol=2e-3, atol=2e-3)  # fp16 targets vs fp32 online targets
    assert fresh != cached  # really two different target sources


def open_spec(url: str):
    from stages.cache import open_cache

    return open_cache(url).spec


def test_sigkill_and_resume_gives_identical_weights_on_s3(inprocess_reference, s3_url, tmp_path):
    """The in-process trainer, checkpointing to S3, SIGKILLed at step 5 (after the checkpoint of step 4)."""
    ref_job, reference = inprocess_reference
    job = ref_job.replace(storage_path=s3_url.rsplit("/", 1)[0] + "/runs")
    proc, event, log = spawn_paused_train(job.to_dict(), 5, tmp_path)
    try:
        wait_until(event.exists, 240, proc, "step 5", log)
    finally:
        kill_group(proc)
    root = run_dir(job)
    assert checkpoint_names(root) and not storage.exists(storage.join(root, "export")), "killed run must be unfinished"
    resumed = run_train(job)
    assert resumed.metrics["step"] == 2 * STEPS_PER_EPOCH
    assert [a["start_step"] for a in read_attempts(root)] == [0, 4]  # resumed at the checkpoint, not restarted
    ref_state, new_state = final_state(reference.run_dir), final_state(resumed.run_dir)
    for key, value in ref_state.items():
        assert torch.equal(value, new_state[key]), f"{key} differs after resume"


def test_a_resume_on_another_number_of_workers_continues_the_global_sample_order(reference, request, tmp_path):
    """A 2-worker Ray run resumed in-process (one rank) from its step-6 checkpoint: each global batch is the
    concatenation of the two ranks' slices of the uninterrupted run. The weights differ (masks are per rank)."""
    job, result = reference
    copy = job.replace(storage_path=str(tmp_path), num_workers=0, loader_workers=0)
    shutil.copytree(result.run_dir, run_dir(copy))
    names = checkpoint_names(run_dir(copy))
    shutil.rmtree(Path(run_dir(copy)) / names[-1])  # the step-8 checkpoint: resume from step 6
    for gone in ("export", "indices"):
        shutil.rmtree(Path(run_dir(copy)) / gone)
    resumed = run_train(copy)
    assert resumed.metrics["step"] == 2 * STEPS_PER_EPOCH
    starts = [(a["start_step"], a["world_size"]) for a in read_attempts(run_dir(copy))]
    assert starts == [(0, 2), (6, 1)]
    ours, theirs = global_indices(run_dir(copy)), global_indices(result.run_dir)
    assert sorted(ours) == [6, 7] and all(len(ours[s]) == GLOBAL_BATCH for s in ours)
    assert {s: ours[s] for s in ours} == {s: theirs[s] for s in ours}
    record(request.node, kind="resume on another number of workers (2 Ray workers, then in-process)",
           faults=int(starts[0][1] != starts[-1][1]),
           survived=int(starts[-1][0] > 0), steps=resumed.metrics["step"], start_steps=[s for s, _ in starts],
           world_sizes=[w for _, w in starts], steps_order_compared=sum(ours[s] == theirs[s] for s in ours),
           lost=sum(ours[s] != theirs[s] for s in ours))
    ref_state, new_state = final_state(result.run_dir), final_state(resumed.run_dir)
    assert any(not torch.equal(v, new_state[k]) for k, v in ref_state.items()), "masks are drawn per rank"


def test_an_unfinished_cache_is_refused_before_any_worker_starts(cache_url, tmp_path):
    partial = tmp_path / "cache"
    shutil.copytree(cache_url, partial)
    (partial / "units" / "1.done").unlink()
    job = make_train_job(str(partial), str(tmp_path / "runs"), "partial", max_failures=3)
    with pytest.raises(UnitIncompleteError, match=r"extraction unfinished \(3/4 units complete, missing \[1\]\)"):
        run_train(job)
    assert not (tmp_path / "runs").exists(), "the run was started"


def test_a_changed_configuration_is_refused_before_anything_is_written(inprocess_reference, tmp_path):
    """On Ray with retries allowed: the refusal comes before the workers, once, and leaves the run as it was."""
    ref_job, reference = inprocess_reference
    job = ref_job.replace(storage_path=str(tmp_path))
    shutil.copytree(reference.run_dir, run_dir(job))
    before = {p: p.read_bytes() for p in Path(run_dir(job)).rglob("*") if p.is_file()}
    changed = job.replace(blr=3e-3, decoder_dim=16, num_workers=2, max_failures=3)
    with pytest.raises(RunConfigChangedError) as refused:
        run_train(changed)
    message = str(refused.value)
    assert "blr: run has 0.0015, now 0.003" in message and "decoder_dim: run has 32, now 16" in message
    assert "num_workers" not in message and "max_failures" not in message  # resources may change
    after = {p: p.read_bytes() for p in Path(run_dir(job)).rglob("*") if p.is_file()}
    assert after == before, "the refused start changed the run directory"


def test_incompatible_cache_is_refused_naming_the_field(cache_url, tmp_path):
    job = make_train_job(cache_url, str(tmp_path), "bad")
    with pytest.raises(CacheIncompatibleError, match=r"base_model\.timm_kwargs\.embed_dim: cache has 48"):
        check_cache(job.replace(base_timm_kwargs=vit_kwargs("vit_nano_patch4_32", in_chans=1)))
    with pytest.raises(CacheIncompatibleError, match=r"preprocess\.mean"):
        check_cache(job.replace(preprocess={**job.preprocess, "mean": [0.5]}))
    with pytest.raises(CacheIncompatibleError, match=r"targets\.k_max: cache has 6"):
        check_cache(job.replace(topk=7, k_max=7))
    with pytest.raises(CacheIncompatibleError, match=r"model\.num_patches"):
        check_cache(job.replace(timm_kwargs=vit_kwargs("vit_pico_patch4_32", in_chans=1, patch_size=8)))
    # a manifest of its own: the cache's bytes copied elsewhere fit; the same rows re-sorted do not
    own = open_cache(cache_url).spec.manifest_uri
    table = pq.read_table(own)
    copy, resorted = str(tmp_path / "copy.parquet"), str(tmp_path / "resorted.parquet")
    shutil.copyfile(own, copy)
    flipped = table.take(list(range(table.num_rows))[::-1])
    pq.write_table(flipped.set_column(flipped.column_names.index("index"), "index", table.column("index")), resorted)
    check_cache(job.replace(manifest_url=copy))
    with pytest.raises(CacheIncompatibleError, match=r"manifest_url: .*resorted\.parquet has SHA-256 .*other images"):
        check_cache(job.replace(manifest_url=resorted))




def test_ray_train_polls_its_workers_faster_than_rays_default_unless_told(cache_url, tmp_path, monkeypatch):
    """A worker's report waits for the controller's next poll (Ray's default: every 2 s): ``fit()`` runs with the
    train stage's interval, or with the user's ``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` when set, and the driver's
    environment is as before afterwards."""
    import ray.train.torch

    from infra.ray_cluster import TRAIN_POLL_ENV, TRAIN_POLL_S

    seen: list[str | None] = []

    class Result:
        metrics, checkpoint = {"step": 0}, None

    class FakeTrainer:
        def __init__(self, *args, **kwargs) -> None:
            pass

        def fit(self) -> Result:
            seen.append(os.environ.get(TRAIN_POLL_ENV))
            return Result()

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", FakeTrainer)
    monkeypatch.delenv(TRAIN_POLL_ENV, raising=False)
    job = make_train_job(cache_url, str(tmp_path), "poll")
    run_train(job)
    assert seen == [str(TRAIN_POLL_S)] and TRAIN_POLL_ENV not in os.environ
    monkeypatch.setenv(TRAIN_POLL_ENV, "1.5")
    run_train(job.replace(run_name="poll2"))
    assert seen[-1] == "1.5" and os.environ[TRAIN_POLL_ENV] == "1.5"
