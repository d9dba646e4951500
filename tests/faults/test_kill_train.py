"""SIGKILL Ray Train workers, and separately the Ray training driver, at seeded random steps; the resumed run's
final weights equal an uninterrupted run's bit for bit (CPU, 2 gloo workers), and its start records
(``<run>/attempts.jsonl``) show a restart of the worker group at a checkpoint after every kill. The in-process
trainer's kills (sample order, start step, name lease, truncated checkpoints) are in ``test_resume_inprocess.py``."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from infra import storage
from infra.ray_cluster import TRAIN_POLL_ENV
from stages.train import run_train
from stages.train.rundir import read_attempts
from tests.faults.conftest import alive_actors, assert_same_weights, fault_seed, kill_group, spawn_train, wait_until
from tests.stages.test_train import STEPS_PER_EPOCH, final_state, make_train_job

pytestmark = pytest.mark.usefixtures("ray_cluster")
CHECKPOINT_EVERY = 2
LONG = pytest.mark.timeout(1200)  # repeated Ray Train runs
TRAIN_ROUNDS = [pytest.param(1, marks=pytest.mark.faults, id="1round"),
                pytest.param(3, marks=[pytest.mark.faults_full, LONG], id="3rounds")]
# CI kills in-process training drivers already (tests/faults/test_resume_inprocess.py; tests/stages/test_train.py,
# checkpoints on S3): the Ray driver kills here run in the full suite only, which keeps CI within its time budget.
DRIVER_ROUNDS = [pytest.param(1, marks=[pytest.mark.faults_full, LONG], id="1round"),
                 pytest.param(3, marks=[pytest.mark.faults_full, LONG], id="3rounds")]


# Each kill waits 0 to KILL_DELAY_S after its target checkpoint, then kills; the run must still be short of its last
# checkpoint then. Ray Train paces a run at one report per controller poll (infra.ray_cluster.TRAIN_POLL_S, faster
# than a kill's own state-API calls), so these runs poll every KILL_POLL_S: 3+ reports after the target take 3+ s.
KILL_POLL_S, KILL_DELAY_S = "1.0", 1.0


def epochs_for(rounds: int) -> int:
    """Every kill needs a fresh checkpoint to land after: 2 epochs (4 checkpoints) for one kill, more for several."""
    return 2 if rounds == 1 else 4


@pytest.fixture(scope="module")
def train_reference(ray_train_reference, tmp_path_factory):
    """``make(epochs)`` → (job, final encoder state) of an uninterrupted run on a 64-image cache (cached). Two epochs
    is the session's 2-worker run (tests/fixtures/train_runs.py), the kill runs without its index log and loader
    process (neither changes the weights)."""
    shared_job, shared = ray_train_reference
    assert shared_job.epochs == 2 and shared_job.checkpoint_every == CHECKPOINT_EVERY, shared_job
    made: dict[int, tuple] = {2: (shared_job.replace(log_indices=False, loader_workers=0), final_state(shared.run_dir))}

    def make(epochs: int):
        if epochs not in made:
            job = make_train_job(shared_job.cache_url, str(tmp_path_factory.mktemp("train_runs")), f"ref{epochs}",
                                 epochs=epochs, checkpoint_every=CHECKPOINT_EVERY)
            made[epochs] = job, final_state(run_train(job).run_dir)
        return made[epochs]

    return make


def steps_checkpointed(run_dir: str) -> int:
    """The step of the newest checkpoint (rank 0 rewrites ``metrics.jsonl`` with every checkpoint)."""
    try:
        text = storage.read_bytes(storage.join(run_dir, "metrics.jsonl")).decode()
    except FileNotFoundError:
        return 0
    return max((json.loads(line)["step"] for line in text.splitlines() if line.strip()), default=0)


@pytest.mark.parametrize("rounds", DRIVER_ROUNDS)
def test_driver_killed_at_random_steps_resumes_to_identical_weights(
    rounds, train_reference, fault_rng, record_figures, tmp_path, monkeypatch
):
    monkeypatch.setenv(TRAIN_POLL_ENV, KILL_POLL_S)  # the spawned drivers inherit it
    epochs = epochs_for(rounds)
    ref_job, ref_state = train_reference(epochs)
    job = ref_job.replace(run_name="driver_killed", storage_path=str(tmp_path / "runs"))
    run_dir, total = str(tmp_path / "runs" / "driver_killed"), epochs * STEPS_PER_EPOCH
    kill_steps = []
    for r in range(rounds):
        target = steps_checkpointed(run_dir) + CHECKPOINT_EVERY
        delay = float(fault_rng.uniform(0.0, KILL_DELAY_S))
        proc = spawn_train(job.to_dict(), tmp_path)
        log = tmp_path / f"{job.run_name}.log"
        wait_until(lambda t=target: steps_checkpointed(run_dir) >= t, 300, proc, f"round {r}: step {target}", log)
        time.sleep(delay)
        assert proc.poll() is None, f"round {r}: training finished before its kill (seed {fault_seed()})"
        kill_group(proc)
        kill_steps.append(steps_checkpointed(run_dir))
        assert kill_steps[-1] < total, f"round {r}: the run was complete when killed"
    resumed = run_train(job)
    assert resumed.metrics["step"] == total
    starts = [a["start_step"] for a in read_attempts(run_dir)]
    assert len(starts) == rounds + 1 and starts[0] == 0, f"starts {starts} (seed {fault_seed()})"
    assert all(k <= s < total for k, s in zip(kill_steps, starts[1:], strict=True)), (starts, kill_steps)
    same = assert_same_weights(ref_state, final_state(resumed.run_dir), "driver kills")
    record_figures(kind="train driver SIGKILL", faults=len(kill_steps), survived=len(starts) - 1, steps=total,
                   checkpointed_step_at_kills=kill_steps, start_steps=starts,
                   recomputed=sum(s - k for k, s in zip(kill_steps, starts[1:], strict=True)),
                   lost=same["tensors_differing"], **same)


@pytest.mark.parametrize("rounds", TRAIN_ROUNDS)
def test_workers_killed_at_random_steps_are_restarted_to_identical_weights(
    rounds, train_reference, fault_rng, record_figures, tmp_path, monkeypatch
):
    monkeypatch.setenv(TRAIN_POLL_ENV, KILL_POLL_S)
    epochs = epochs_for(rounds)
    ref_job, ref_state = train_reference(epochs)
    job = ref_job.replace(run_name="worker_killed", storage_path=str(tmp_path / "runs"), max_failures=rounds)
    run_dir = Path(job.storage_path) / job.run_name
    kills: list[int] = []
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            killed: set[str] = set()
            for _ in range(rounds):
                target = steps_checkpointed(str(run_dir)) + CHECKPOINT_EVERY
                delay = float(fault_rng.uniform(0.0, KILL_DELAY_S))
                wait_until(lambda t=target: steps_checkpointed(str(run_dir)) >= t, 300, what=f"step {target}")
                time.sleep(delay)
                wait_until(lambda: bool(set(alive_actors("RayTrainWorker")) - killed), 120, what="live train workers")
                alive = alive_actors("RayTrainWorker")
                candidates = sorted(set(alive) - killed)
                victim = candidates[int(fault_rng.integers(0, len(candidates)))]
                killed.update(alive)  # the whole group is replaced after a failure
                kills.append(steps_checkpointed(str(run_dir)))  # the restart resumes at this step or later
                os.kill(alive[victim], signal.SIGKILL)
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_train(job)
    thread.join(timeout=30)
    assert not errors, f"killer failed: {errors[0]!r}"
    assert len(kills) == rounds, f"only {len(kills)} of {rounds} kills happened before the run ended"
    total = epochs * STEPS_PER_EPOCH
    assert result.metrics["step"] == total
    # Ray Train restarted the worker group once per kill, each time from a checkpoint before the last step
    attempts = read_attempts(str(run_dir))
    assert len(attempts) == rounds + 1, f"{len(attempts)} starts for {rounds} kills (seed {fault_seed()})"
    assert {(a["world_size"], a["runner"]) for a in attempts} == {(2, "RaySession")}
    assert len({a["pid"] for a in attempts}) == rounds + 1, "rank 0 was not a new process after each kill"
    starts = [a["start_step"] for a in attempts]
    assert starts[0] == 0 and all(k <= s < total for k, s in zip(kills, starts[1:], strict=True)), \
        f"starts {starts}, checkpointed steps at the kills {kills} (seed {fault_seed()})"
    same = assert_same_weights(ref_state, final_state(result.run_dir), "worker kills")
    record_figures(kind="train worker SIGKILL", faults=len(kills), survived=len(attempts) - 1, steps=total,
                   checkpointed_step_at_kills=kills, start_steps=starts,
                   worker_groups=len({a["pid"] for a in attempts}), lost=same["tensors_differing"], **same)
