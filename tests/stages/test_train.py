"""Stage 2 (train) on real Ray Train (2 gloo workers), real caches on disk and on moto's S3 server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from infra import storage
from stages.extract import run_extract
from stages.train import run_train
from stages.train_job import CacheIncompatibleError, TrainJob, check_cache
from tec_model import vit_kwargs
from tests.fixtures.extract import EXTRACT_DEFAULTS, base_kwargs, make_job

REPO = Path(__file__).resolve().parents[2]
N_IMAGES, GLOBAL_BATCH, STEPS_PER_EPOCH = 64, 16, 4
pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def cache_url(fmnist_manifest, base_checkpoint, tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("train_cache") / "cache")
    run_extract(make_job(url, fmnist_manifest(N_IMAGES), base_checkpoint), num_actors=1)
    return url


def make_train_job(cache_url: str, storage_path: str, name: str, **overrides) -> TrainJob:
    fields = {
        "run_name": name, "storage_path": storage_path, "cache_url": cache_url,
        "timm_kwargs": vit_kwargs("vit_pico_patch4_32", in_chans=1), "base_timm_kwargs": base_kwargs(),
        "preprocess": {"output_size": 32, "crop_scale": [0.2, 1.0], "crop_ratio": [0.75, 4 / 3],
                       "interpolation": "bicubic", "mean": [0.2860405969887955], "std": [0.35302424451492254]},
        "views_per_image": 2, "view_seed": EXTRACT_DEFAULTS["view_seed"], "k_max": EXTRACT_DEFAULTS["k_max"],
        "topk": 4, "att_tau": 1.8, "decoder_dim": 32, "decoder_heads": 4, "epochs": 2,
        "global_batch": GLOBAL_BATCH, "blr": 1.5e-3, "warmup_epochs": 0.5, "num_workers": 2,
        "loader_workers": 0, "checkpoint_every": 2, "log_every": 1, "keep_checkpoints": 2,
    }
    fields.update(overrides)
    return TrainJob(**fields)


def final_state(result_run_dir: str) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(storage.join(result_run_dir, "export", "encoder.pth"))
    return torch.load(io.BytesIO(data), weights_only=True)


def losses(run_dir: str) -> list[float]:
    """Per-step losses from the run directory's metrics history (rank 0 rewrites it at every checkpoint)."""
    text = storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode()
    rows = [json.loads(line) for line in text.splitlines()]
    return [r["loss"] for r in sorted(rows, key=lambda r: r["step"])]


@pytest.fixture(scope="module")
def reference(cache_url, tmp_path_factory) -> tuple[TrainJob, object]:
    """An uninterrupted 2-epoch cached run with 2 workers, logging the indices each rank trained on."""
    job = make_train_job(cache_url, str(tmp_path_factory.mktemp("runs")), "reference", log_indices=True,
                         loader_workers=1)
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


def test_cached_and_online_losses_agree(reference, cache_url, tmp_path):
    job, result = reference
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


def _kill_after_first_checkpoint(job: TrainJob, tmp_path: Path, list_run: callable) -> None:
    """Run the train stage in a subprocess, SIGKILL its whole process group once a checkpoint exists."""
    job_file = tmp_path / f"{job.run_name}.json"
    job_file.write_text(json.dumps(job.to_dict()))
    driver = ("import json, sys; from stages.train import run_train; from stages.train_job import TrainJob; "
              "run_train(TrainJob.from_dict(json.load(open(sys.argv[1]))))")
    cmd = [sys.executable, "-c", driver, str(job_file)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if any(name.endswith("state.pt") for name in list_run()):
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training finished (or failed) before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1.0)


def _resume_matches_reference(reference, job: TrainJob, tmp_path: Path) -> None:
    def list_run() -> list[str]:
        try:
            return list(storage.list_objects(storage.join(job.storage_path, job.run_name)))
        except FileNotFoundError:
            return []

    _kill_after_first_checkpoint(job, tmp_path, list_run)
    finished = [n for n in list_run() if n.endswith("state.pt")]
    assert finished and not any(n.startswith("export/") for n in list_run()), "killed run must be unfinished"
    resumed = run_train(job)
    assert resumed.metrics["step"] == 2 * STEPS_PER_EPOCH
    ref_state, new_state = final_state(reference[1].run_dir), final_state(resumed.run_dir)
    for key, value in ref_state.items():
        assert torch.equal(value, new_state[key]), f"{key} differs after resume"


def test_sigkill_and_resume_gives_identical_weights_on_s3(reference, s3_url, tmp_path):
    job = reference[0].replace(run_name="killed_s3", storage_path=s3_url.rsplit("/", 1)[0] + "/runs",
                               log_indices=False)
    _resume_matches_reference(reference, job, tmp_path)


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


