"""What guards a run directory across starts: the configuration a run was started with, the cache it needs, and a
record of every start.

* ``<run>/config.json`` is the resolved :class:`~stages.train.job.TrainJob` of the run's last start (URLs
  redacted). Starting the run again with another :meth:`~stages.train.job.TrainJob.fingerprint` (model, data order,
  schedule: everything but resources and the stopping point) is refused by :func:`check_unchanged`, naming the
  fields that differ, before anything of the run is written.
* A cache-mode run needs a complete cache (every unit has its marker): :func:`require_complete_cache`.
* ``<run>/attempts.jsonl`` gets one line per start of the worker loop, written by rank 0 (:func:`record_start`):
  the step it started at (0 for a fresh run, the checkpoint's step for a resume), the world size, the runner, the
  process, the time. A restarted Ray worker group, an in-process restart and a resumed driver each add a line.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

from infra import storage
from stages.cache import UnitIncompleteError, open_cache
from stages.train.job import TrainJob

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
ATTEMPTS_FILE = "attempts.jsonl"


class RunConfigChangedError(ValueError):
    """An existing run was started again with a configuration that changes its model, data order or schedule."""


def job_json(job: TrainJob) -> dict[str, Any]:
    """The job as ``config.json`` stores it (JSON values, URLs redacted)."""
    return json.loads(storage.redact_text(json.dumps(job.to_dict(), default=str)))


def _differences(old: Any, new: Any, path: str) -> list[str]:
    """``path: run has X, now Y`` for every leaf that differs (dicts compared key by key)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(old.keys() | new.keys(), key=str)
                for d in _differences(old.get(key), new.get(key), f"{path}.{key}")]
    return [] if old == new else [f"{path}: run has {old!r}, now {new!r}"]


def config_differences(old: dict[str, Any], new: TrainJob) -> list[str]:
    """The fingerprinted fields (see :meth:`TrainJob.fingerprint`) in which ``new`` differs from a stored
    ``config.json`` (``old``); empty when the fingerprints agree.

    Raises:
        RunConfigChangedError: ``old`` is not a configuration this version can read.
    """
    try:
        stored = TrainJob.from_dict(old)
    except (TypeError, ValueError) as exc:
        raise RunConfigChangedError(f"the run's {CONFIG_FILE} cannot be read as a training job ({exc}); choose "
                                    "another train.run_name") from exc
    ours_json = job_json(new)
    now = TrainJob.from_dict(ours_json)
    if stored.fingerprint() == now.fingerprint():
        return []
    found = []
    for key in sorted(ours_json):
        theirs, ours = old.get(key), ours_json[key]
        if theirs == ours:
            continue
        try:
            matters = stored.replace(**{key: getattr(now, key)}).fingerprint() != stored.fingerprint()
        except (TypeError, ValueError):  # the field alone makes the stored job invalid: it is part of the job
            matters = True
        if matters:
            found.extend(_differences(theirs, ours, key))
    return found or ["(fingerprints differ)"]


def check_unchanged(job: TrainJob, run_url: str) -> None:
    """Refuse to start an existing run again with a changed configuration (nothing is written here).

    Raises:
        RunConfigChangedError: ``<run_url>/config.json`` exists and its fingerprint differs; the message names
            every differing field with both values.
    """
    url = storage.join(run_url, CONFIG_FILE)
    try:
        old = json.loads(storage.read_bytes(url))
    except FileNotFoundError:
        return
    if diffs := config_differences(old, job):
        raise RunConfigChangedError(
            f"run {job.run_name!r} at {storage.redact_url(run_url)} was started with another configuration; a "
            "resumed run must keep its model, data order and schedule (resources and max_steps may change). "
            "Differences:\n  " + "\n  ".join(diffs) +
            "\nUse another train.run_name for the new configuration, or delete the old run.")


def require_complete_cache(cache_url: str) -> None:
    """Refuse a cache whose extraction is unfinished (a unit without its completion marker).

    Raises:
        UnitIncompleteError: naming the cache and the count of complete units.
    """
    cache = open_cache(cache_url)
    if missing := cache.missing_units():
        raise UnitIncompleteError(
            f"target cache {storage.redact_url(cache_url)}: extraction unfinished "
            f"({cache.n_units - len(missing)}/{cache.n_units} units "
            f"complete, missing {missing[:10]}); run `run_pipeline.py extract` (or `run`) again to finish it")


def record_start(run_url: str, start_step: int, world_size: int, runner: str) -> dict[str, Any]:
    """Append one line to ``<run_url>/attempts.jsonl`` (rank 0 only; the run's lease makes it the only writer).

    Returns:
        The line written: ``start_step``, ``world_size``, ``runner``, ``host``, ``pid``, ``time`` (UTC, ISO 8601).
    """
    row = {"start_step": int(start_step), "world_size": int(world_size), "runner": runner,
           "host": socket.gethostname(), "pid": os.getpid(), "time": datetime.now(UTC).isoformat()}
    url = storage.join(run_url, ATTEMPTS_FILE)
    try:
        before = storage.read_bytes(url)
    except FileNotFoundError:
        before = b""
    storage.write_bytes(url, before + (json.dumps(row) + "\n").encode())
    log.info("run %s: start at step %d on %d rank(s) (%s)", storage.redact_url(run_url), start_step, world_size,
             runner)
    return row


def read_attempts(run_url: str) -> list[dict[str, Any]]:
    """Every start of a run, oldest first (empty when it never started)."""
    try:
        text = storage.read_bytes(storage.join(run_url, ATTEMPTS_FILE)).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]
