"""Shared machinery of the fault suite: seeded kill points, driver subprocesses, cache comparison, figures.

Kill points come from a seeded RNG (``TEC_FAULT_SEED``; by default a fresh random seed per session, printed in the
pytest header and summary by :mod:`tests.faults.seed`; every test prints the seed it used and puts it in its
assertion messages, so a failure is reproducible). Drivers run as ``python -c`` subprocesses in their own session
(``os.killpg`` then SIGKILLs the driver and everything it spawned). Ray drivers join the test session's Ray cluster,
so a kill is a driver crash on a live cluster: Ray itself reaps the dead job's actors. In-process drivers
(``train.num_workers: 0``, ``extract.num_actors: 0``) never import Ray; the *paused* ones stop at a chosen point
(a training step, a unit) and write an event file, so the test kills them exactly there.

Each test appends the figures it measured (faults injected, survived, units recomputed, objects and bytes compared,
data lost) to ``$TEC_FAULT_FIGURES`` (JSON lines, :mod:`tests.faults.figures`) when that variable is set;
``docs/reliability.md`` is generated from them (:mod:`tests.faults.report`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from infra import storage
from stages.cache import open_cache
from stages.extract import run_extract
from tests.faults import figures
from tests.faults.seed import fault_seed
from tests.fixtures.cache_content import cache_content
from tests.fixtures.extract import make_job

REPO = Path(__file__).resolve().parents[2]
# Rounds of repeated kills: a couple in the CI subset, ten in the full suite.
CI_ROUNDS, FULL_ROUNDS = 2, 10


def kill_rounds(ci_rounds: int = CI_ROUNDS) -> list:
    """``rounds`` parameters: ``ci_rounds`` in the CI subset (``faults``), :data:`FULL_ROUNDS` in ``faults_full``."""
    return [pytest.param(ci_rounds, marks=pytest.mark.faults, id=f"{ci_rounds}rounds"),
            pytest.param(FULL_ROUNDS, marks=[pytest.mark.faults_full, pytest.mark.timeout(1800)],
                         id=f"{FULL_ROUNDS}rounds")]


ROUNDS = kill_rounds()
# A killed driver costs a new driver process and a new actor per round (about twice an actor kill's time): CI kills
# it once (the resume after it still takes over its claims), the full suite ten times.
DRIVER_ROUNDS = kill_rounds(1)

EXTRACT_DRIVER = (
    "import json, sys; from stages.extract import run_extract; from tests.fixtures.extract import make_job; "
    "a = json.loads(sys.argv[1]); "
    "run_extract(make_job(a['cache'], a['manifest'], a['checkpoint'], **a['job']), num_actors=a['actors'])"
)
TRAIN_DRIVER = ("import json, sys; from stages.train import run_train; from stages.train.job import TrainJob; "
                "run_train(TrainJob.from_dict(json.load(open(sys.argv[1]))))")
# The in-process trainer, paused for good once it has reported step ``pause_at_step`` (trained, indices logged,
# checkpointed if that step checkpoints); the event file then holds the driver's pid.
PAUSED_TRAIN_DRIVER = """
import json, os, sys, time
import stages.train.loop as T
from stages.train import TrainJob, run_train
a = json.load(open(sys.argv[1]))
original = T._report
def report(job, t, row, session, checkpoint):
    original(job, t, row, session, checkpoint)
    if row["step"] == a["pause_at_step"]:
        open(a["event"], "w").write(str(os.getpid()))
        time.sleep(3600)
T._report = report
run_train(TrainJob.from_dict(a["job"]))
"""
# In-process extraction whose ``pause_at_call``-th unit never finishes: the unit's worker thread writes the unit id to
# the event file and sleeps, holding the unit's claim (renewed) while the other thread goes on.
PAUSED_EXTRACT_DRIVER = """
import json, sys, threading, time
import stages.extract as E
from tests.fixtures.extract import make_job
a = json.loads(sys.argv[1])
original, calls, lock = E.UnitExtractor.run_unit, [0], threading.Lock()
def run_unit(self, unit, owner, *args, **kwargs):
    with lock:
        calls[0] += 1
        pause = calls[0] == a["pause_at_call"]
    if pause:
        open(a["event"], "w").write(str(unit))
        time.sleep(3600)
    return original(self, unit, owner, *args, **kwargs)
E.UnitExtractor.run_unit = run_unit
E.run_extract(make_job(a["cache"], a["manifest"], a["checkpoint"], **a["job"]), num_actors=0)
"""


@pytest.fixture
def fault_rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded by the suite seed and the test's id (stable across runs and orderings)."""
    seed = fault_seed()
    print(f"fault seed {seed} (set TEC_FAULT_SEED to change; test {request.node.nodeid})")
    request.node.user_properties.append(("fault_seed", seed))
    return np.random.default_rng([seed, zlib.crc32(request.node.nodeid.encode())])


@pytest.fixture(autouse=True)
def _figures_context(request: pytest.FixtureRequest) -> Iterator[None]:
    """Rows :func:`tests.faults.s3_faults.record` writes during a test are attributed to it."""
    figures.begin(request.node)
    yield
    figures.end()


@pytest.fixture
def record_figures(request: pytest.FixtureRequest) -> Callable[..., None]:
    """``record(kind=..., faults=..., survived=..., recomputed=..., bound=..., lost=..., **more)``: one figures row
    of measured counts (:func:`tests.faults.figures.record`; ``section="refusal"`` for a refused start)."""
    return functools.partial(figures.record, request.node)


def ray_address() -> str:
    """GCS address of the test session's Ray cluster (the ``ray_cluster`` fixture must be active)."""
    import ray

    return ray.get_runtime_context().gcs_address


def alive_actors(class_name: str) -> dict[str, int]:
    """actor id → pid of the live actors of ``class_name`` in this test session's cluster (Ray's state API; never
    another cluster's processes)."""
    from ray.util.state import list_actors

    actors = list_actors(address=ray_address(), limit=100,
                         filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    return {a.actor_id: a.pid for a in actors if a.pid}


def driver_env(ray: bool = True) -> dict[str, str]:
    """Environment of a driver subprocess: the test's, repo on the path, joined to the session's Ray cluster
    (``ray``) or without any Ray address (an in-process driver)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray:
        env["RAY_ADDRESS"] = ray_address()
    return env | {"PYTHONPATH": str(REPO), "TEC_LOG_LEVEL": "INFO"}


_SPAWNED: list[subprocess.Popen] = []


def spawn(args: list[str], log_path: Path, ray: bool = True) -> subprocess.Popen:
    """Start ``python <args>`` in a new session (its own process group), output to ``log_path``; a driver still
    running when its test ends is killed (:func:`reap_spawned`)."""
    log = open(log_path, "ab")  # noqa: SIM115 - closed by the child's exit; the handle is inherited
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=driver_env(ray), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    _SPAWNED.append(proc)
    return proc


def reap_spawned() -> None:
    """SIGKILL the process group of every spawned driver still running (a test that failed before its kill)."""
    while _SPAWNED:
        proc = _SPAWNED.pop()
        if proc.poll() is None:
            kill_group(proc)


@pytest.fixture(autouse=True)
def _reap_drivers() -> Iterator[None]:
    yield
    reap_spawned()


def spawn_extract(cache: str, manifest: str, checkpoint: Path | str, log_path: Path, num_actors: int = 1,
                  **job: Any) -> subprocess.Popen:
    """An extraction driver subprocess for :func:`tests.fixtures.extract.make_job` with ``job`` overrides."""
    arg = {"cache": cache, "manifest": manifest, "checkpoint": str(checkpoint), "job": job, "actors": num_actors}
    return spawn(["-c", EXTRACT_DRIVER, json.dumps(arg)], log_path)


def spawn_train(job_dict: dict[str, Any], tmp_path: Path) -> subprocess.Popen:
    """A training driver subprocess for a ``TrainJob.to_dict()``."""
    job_file = tmp_path / f"{job_dict['run_name']}.json"
    job_file.write_text(json.dumps(job_dict))
    return spawn(["-c", TRAIN_DRIVER, str(job_file)], tmp_path / f"{job_dict['run_name']}.log")


def spawn_paused_train(job_dict: dict[str, Any], pause_at_step: int, tmp_path: Path) -> tuple[subprocess.Popen, Path,
                                                                                               Path]:
    """An in-process training driver that pauses after reporting ``pause_at_step``: (process, event file, log)."""
    name = job_dict["run_name"]
    event, log = tmp_path / f"{name}.paused", tmp_path / f"{name}.log"
    arg = tmp_path / f"{name}.json"
    arg.write_text(json.dumps({"job": job_dict, "pause_at_step": pause_at_step, "event": str(event)}))
    return spawn(["-c", PAUSED_TRAIN_DRIVER, str(arg)], log, ray=False), event, log


def spawn_paused_extract(cache: str, manifest: str, checkpoint: Path | str, event: Path, log_path: Path,
                         pause_at_call: int, **job: Any) -> subprocess.Popen:
    """An in-process extraction driver whose ``pause_at_call``-th unit hangs, holding its claim (see
    :data:`PAUSED_EXTRACT_DRIVER`)."""
    arg = {"cache": cache, "manifest": manifest, "checkpoint": str(checkpoint), "job": job,
           "pause_at_call": pause_at_call, "event": str(event)}
    return spawn(["-c", PAUSED_EXTRACT_DRIVER, json.dumps(arg)], log_path, ray=False)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the subprocess's whole process group (if any of it still runs) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_until(done: Callable[[], bool], timeout: float, proc: subprocess.Popen | None = None, what: str = "",
               log_path: Path | None = None) -> None:
    """Poll ``done()`` every 20 ms; fail if ``proc`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not done():
        if proc is not None and proc.poll() is not None:
            tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
            pytest.fail(f"driver exited (rc {proc.returncode}) before {what}\n{tail}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def markers(url: str) -> dict[int, bytes]:
    """Raw bytes of every completion marker, by unit."""
    try:
        names = storage.list_objects(storage.join(url, "units"))
    except FileNotFoundError:
        return {}
    return {int(n[: -len(".done")]): storage.read_bytes(storage.join(url, "units", n))
            for n in names if n.endswith(".done") and "/" not in n}


def claims_by_pid(url: str) -> dict[int, int]:
    """unit → pid of its claim's owner process, for every claim object."""
    try:
        names = storage.list_objects(storage.join(url, "claims"))
    except FileNotFoundError:
        return {}
    found = {}
    for name in names:
        if name.endswith(".json") and "/" not in name:
            try:
                claim = json.loads(storage.read_bytes(storage.join(url, "claims", name)))
                found[int(name[: -len(".json")])] = claim["pid"]
            except (FileNotFoundError, ValueError, KeyError):  # released (or being written) meanwhile
                continue
    return found


def global_indices(run_url: str) -> dict[int, list[int]]:
    """step → the global batch's sample indices, from ``<run>/indices/`` (``log_indices``): the ranks' slices
    concatenated in rank order."""
    by_rank: dict[int, dict[int, list[int]]] = {}
    try:
        names = storage.list_objects(storage.join(run_url, "indices"))
    except FileNotFoundError:
        return {}
    for name in names:
        rank = int(name.split("_", 1)[0][len("rank"):])
        rows = json.loads(storage.read_bytes(storage.join(run_url, "indices", name)))
        by_rank.setdefault(rank, {}).update({int(step): idx for step, idx in rows.items()})
    steps = sorted(set().union(*(set(rows) for rows in by_rank.values()))) if by_rank else []
    return {s: [i for r in sorted(by_rank) for i in by_rank[r].get(s, [])] for s in steps}


def claimed_units(url: str) -> set[int]:
    """Units with a claim object."""
    try:
        names = storage.list_objects(storage.join(url, "claims"))
    except FileNotFoundError:
        return set()
    return {int(n[: -len(".json")]) for n in names if n.endswith(".json") and "/" not in n}


def assert_same_cache(url: str, reference: str) -> dict[str, int]:
    """Every object of the two caches' content (:func:`cache_content`) is byte-identical.

    Returns:
        What was compared: ``objects_compared``, ``bytes_compared`` and ``objects_differing`` (0 when it returns).
    """
    got, want = cache_content(url), cache_content(reference)
    assert sorted(got) == sorted(want), f"object sets differ: {sorted(set(got) ^ set(want))[:10]}"
    differing = [key for key in want if got[key] != want[key]]
    assert not differing, f"objects differ: {differing[:10]}"
    return {"objects_compared": len(want), "bytes_compared": sum(len(v) for v in want.values()),
            "objects_differing": len(differing)}


def assert_markers_kept(url: str, before: dict[int, bytes]) -> dict[str, int]:
    """No marker that existed before was rewritten (raw bytes, timings included: a recomputed unit would differ).

    Returns:
        ``markers_compared`` (the markers that existed before) and ``markers_rewritten`` (0 when it returns).
    """
    now = markers(url)
    rewritten = [u for u, data in before.items() if now.get(u) != data]
    assert not rewritten, f"complete units were rewritten: {rewritten}"
    return {"markers_compared": len(before), "markers_rewritten": len(rewritten)}


def assert_same_weights(reference: dict[str, Any], state: dict[str, Any], what: str) -> dict[str, int]:
    """Every tensor of ``state`` is ``torch.equal`` to ``reference``'s (same names).

    Returns:
        ``tensors_compared``, ``values_compared`` (elements) and ``tensors_differing`` (0 when it returns).
    """
    import torch

    assert sorted(state) == sorted(reference), f"{what}: other tensor names (seed {fault_seed()})"
    differing = [key for key, value in reference.items() if not torch.equal(value, state[key])]
    assert not differing, f"{what}: {differing[:5]} differ from the uninterrupted run (seed {fault_seed()})"
    return {"tensors_compared": len(reference), "values_compared": sum(v.numel() for v in reference.values()),
            "tensors_differing": len(differing)}


def assert_complete_units_verify(url: str) -> None:
    """Every unit with a marker reads back and matches the marker's per-array SHA-256."""
    import hashlib

    cache = open_cache(url)
    for unit in cache.complete_units():
        batch, marker = cache.read_unit(unit), cache.marker(unit)
        for name, digest in marker["sha256"].items():
            data = np.ascontiguousarray(getattr(batch, name)).tobytes()
            assert hashlib.sha256(data).hexdigest() == digest, f"unit {unit}: {name} does not match its marker"


@pytest.fixture(scope="session")
def reference_cache(fmnist_manifest, base_checkpoint, tmp_path_factory) -> Callable[..., str]:
    """``make(n_images, unit_size)`` → URL of an uninterrupted extraction (cached per size; in-process, which
    writes the bytes Ray actors write: tests/stages/test_inprocess.py)."""
    made: dict[tuple[int, int], str] = {}

    def make(n_images: int, unit_size: int) -> str:
        if (n_images, unit_size) not in made:
            url = str(tmp_path_factory.mktemp("reference") / "cache")
            run_extract(make_job(url, fmnist_manifest(n_images), base_checkpoint, unit_size=unit_size), num_actors=0)
            made[n_images, unit_size] = url
        return made[n_images, unit_size]

    return make


@pytest.fixture
def mounted_small_fs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """``mount(size_bytes)`` → a directory on a fresh file system of that size: a tmpfs, else a loop-mounted ext4
    image; skips (saying why) if neither can be mounted. Unmounted at teardown, always."""
    mounts: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"small_fs{len(mounts)}"
        point.mkdir()
        tmpfs = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                               capture_output=True, text=True)
        if tmpfs.returncode != 0:
            image = tmp_path / f"small_fs{len(mounts)}.img"
            with open(image, "wb") as f:
                f.truncate(size)
            loop = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
            if loop.returncode == 0:
                loop = subprocess.run(["mount", "-o", "loop", str(image), str(point)], capture_output=True, text=True)
            if loop.returncode != 0:
                pytest.skip(f"cannot mount a small file system (tmpfs: {tmpfs.stderr.strip()}; loop image: "
                            f"{loop.stderr.strip()})")
        mounts.append(point)
        return point

    yield mount
    for path in mounts:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
