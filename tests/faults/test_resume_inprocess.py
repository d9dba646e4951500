"""The in-process trainer (``train.num_workers: 0``) SIGKILLed mid-epoch after each checkpoint position: the run is
resumed, not restarted. The resumed process starts at the checkpoint's step (its start record says so, and it logs
no earlier step), the global sample order across the kill equals an uninterrupted run's, and the final weights are
bit-identical. While the killed run lives it holds its name; a truncated newest checkpoint falls back to the
previous one with a warning naming it."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from infra import storage
from stages.train import run_dir, run_train
from stages.train.rundir import read_attempts
from stages.train.session import RunBusyError, checkpoint_names
from tests.faults.conftest import (
    assert_same_weights,
    fault_seed,
    global_indices,
    kill_group,
    spawn_paused_train,
    wait_until,
)
from tests.stages.test_train import final_state, make_train_job

N_IMAGES, BATCH, EPOCHS, EVERY = 64, 8, 2, 5
PER_EPOCH = N_IMAGES // BATCH  # 8 steps an epoch
TOTAL = EPOCHS * PER_EPOCH
CHECKPOINTS = sorted({s for s in range(1, TOTAL + 1) if s % EVERY == 0 or s % PER_EPOCH == 0})  # 5 8 10 15 16
# the checkpoint the kill follows: mid-epoch 0, the end of epoch 0, mid-epoch 1; every kill lands mid-epoch
POSITIONS = [pytest.param(p, marks=pytest.mark.faults, id=f"after_checkpoint_{p}") for p in (5, 8, 10)]


@pytest.fixture(scope="module")
def reference(reference_cache, tmp_path_factory):
    """An uninterrupted in-process run logging its sample indices: (job, final encoder state, indices by step)."""
    job = make_train_job(reference_cache(N_IMAGES, 16), str(tmp_path_factory.mktemp("inproc_runs")), "inproc",
                         num_workers=0, global_batch=BATCH, epochs=EPOCHS, checkpoint_every=EVERY, log_indices=True)
    result = run_train(job)
    assert result.metrics["step"] == TOTAL
    indices = global_indices(result.run_dir)
    assert sorted(indices) == list(range(TOTAL)) and all(len(v) == BATCH for v in indices.values())
    return job, final_state(result.run_dir), indices


@pytest.mark.parametrize("position", POSITIONS)
def test_killed_mid_epoch_resumes_at_its_checkpoint_with_the_same_sample_order(
    position, reference, fault_rng, record_figures, tmp_path
):
    ref_job, ref_state, ref_indices = reference
    job = ref_job.replace(storage_path=str(tmp_path / "runs"))  # same name: the fingerprint includes it
    run, next_checkpoint = Path(run_dir(job)), CHECKPOINTS[CHECKPOINTS.index(position) + 1]
    kill_at = position + int(fault_rng.integers(1, next_checkpoint - position))  # after `position`, before the next
    proc, event, log = spawn_paused_train(job.to_dict(), kill_at, tmp_path)
    wait_until(event.exists, 240, proc, f"step {kill_at}", log)

    # the live run holds its name: a second start is refused and writes nothing
    assert json.loads((run / "lease.json").read_text())["pid"] == proc.pid
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "lease.json"}
    with pytest.raises(RunBusyError, match=rf"live process .*pid {proc.pid}") as busy:
        run_train(job)
    changed = [p for p, data in files.items() if not p.exists() or p.read_bytes() != data]
    assert not changed, f"the refused start changed {changed}"
    record_figures(section="refusal", kind="a second start of a live run (same name, same root)",
                   outcome=f"`{type(busy.value).__name__}`", files_kept=len(files) - len(changed),
                   bytes_kept=sum(len(d) for d in files.values()), files_changed=len(changed), lost=len(changed))

    assert proc.poll() is None, f"the trainer ended before its kill at step {kill_at} (seed {fault_seed()})"
    kill_group(proc)
    before = global_indices(str(run))
    assert sorted(before) == list(range(kill_at)), "the killed run logged other steps than it trained"
    shutil.rmtree(run / "indices")  # what the resumed process logs is then its own

    resumed = run_train(job)
    assert resumed.metrics["step"] == TOTAL
    starts = [(a["start_step"], a["world_size"], a["runner"]) for a in read_attempts(str(run))]
    assert starts == [(0, 1, "LocalSession"), (position, 1, "LocalSession")], f"starts {starts} (kill at {kill_at})"
    after = global_indices(str(run))
    assert sorted(after) == list(range(position, TOTAL)), "the resumed process did not start at the checkpoint"
    order = [before[s] for s in range(position)] + [after[s] for s in range(position, TOTAL)]
    expected = [ref_indices[s] for s in range(TOTAL)]
    assert order == expected, f"sample order differs (seed {fault_seed()})"
    same = assert_same_weights(ref_state, final_state(resumed.run_dir), f"killed at step {kill_at}")
    record_figures(kind=f"in-process trainer SIGKILL after checkpoint {position}", faults=int(proc.returncode == -9),
                   survived=len(starts) - 1, steps=TOTAL, checkpoint=position, killed_at=kill_at,
                   start_steps=[s for s, _, _ in starts], first_resumed_step=min(after),
                   recomputed=len(before) - min(after),
                   steps_order_compared=sum(a == b for a, b in zip(order, expected, strict=True)),
                   lost=same["tensors_differing"] + sum(a != b for a, b in zip(order, expected, strict=True)), **same)


@pytest.mark.faults
def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(reference, caplog, record_figures, tmp_path):
    ref_job, ref_state, _ = reference
    job = ref_job.replace(storage_path=str(tmp_path / "runs"), log_indices=False)
    run = Path(run_dir(job))
    shutil.copytree(run_dir(ref_job), run)
    names = checkpoint_names(str(run))
    assert len(names) == 2, names  # keep_checkpoints: the last two, steps 15 and 16
    newest = run / names[-1] / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="stages.train.session"):
        resumed = run_train(job)
    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert warned and str(newest) in warned[0], caplog.text[-2000:]
    start = read_attempts(str(run))[-1]["start_step"]
    assert start == CHECKPOINTS[-2]  # trained on from the previous checkpoint
    assert resumed.metrics["step"] == TOTAL
    same = assert_same_weights(ref_state, final_state(resumed.run_dir), "resumed from the previous checkpoint")
    record_figures(kind="truncated newest checkpoint", faults=len(warned), survived=int(start > 0), steps=TOTAL,
                   first_resumed_step=start, recomputed=resumed.metrics["step"] - start,
                   lost=same["tensors_differing"], **same)


@pytest.mark.faults
def test_a_checkpoint_the_store_refuses_to_serve_stops_the_start_and_keeps_every_checkpoint(reference, tmp_path,
                                                                                            monkeypatch):
    """Access denied on the newest state.pt is the store's failure, not a corrupt checkpoint: falling back (to the
    previous one, or to step 0 when every read is refused) would retrain and prune what could not be read. Nor is
    a permanent error restarted, however many failures the run allows."""
    ref_job, _, _ = reference
    job = ref_job.replace(storage_path=str(tmp_path / "runs"), log_indices=False, max_failures=3)
    run = Path(run_dir(job))
    shutil.copytree(run_dir(ref_job), run)
    names, attempts = checkpoint_names(str(run)), read_attempts(str(run))
    files = sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file())
    real_read, refused = storage.read_bytes, []

    def refusing_read(url, *args, **kwargs):
        if str(url).endswith("/state.pt"):
            refused.append(url)
            raise storage.StorageError(f"read {url}: AccessDenied (permanent)")
        return real_read(url, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", refusing_read)
    with pytest.raises(storage.StorageError, match=r"state\.pt: AccessDenied"):
        run_train(job)
    assert len(refused) == 1, f"{len(refused)} starts read the refused checkpoint (restarted a permanent error)"
    assert checkpoint_names(str(run)) == names and read_attempts(str(run)) == attempts
    assert sorted(p.relative_to(run) for p in run.rglob("*") if p.is_file()) == files, "the refused start wrote"
