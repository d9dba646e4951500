"""The one seam between the training loop and what runs it: Ray Train workers, or a single in-process worker.

The worker loop (:func:`stages.train.loop.train_worker`) needs five things from its runner, and nothing else:

* ``rank`` and ``world_size``;
* ``device``: where this worker computes;
* ``prepare_model(model)``: the model as this worker trains it (DDP-wrapped when ``world_size > 1``);
* ``report(metrics, checkpoint_dir)``: every rank reports at the same steps; rank 0 passes a directory of checkpoint
  files to persist;
* ``latest_state()``: the newest readable checkpoint's saved state, or ``None`` for a fresh run.

:class:`RaySession` implements it with ``ray.train`` (Ray imported only when it is built); :class:`LocalSession`
implements it in the calling process (``train.num_workers: 0``), writing checkpoints in Ray's layout
(``<run>/checkpoint_<timestamp>/state.pt``) so either runner can resume a run the other started.

Checkpoints are found by listing the run directory, newest first; a truncated or unreadable one is skipped with a
warning naming it, and the previous one is used.

A run's name is held by the process that drives it through a lease, ``<run>/lease.json`` (:class:`RunLease`): the
extraction's unit claim (:class:`stages.cache.Claim`: owner, token, expiry, host / pid namespace / pid / start time)
written, confirmed after a short wait, and renewed by a daemon thread while the run lives. A second run of the same
name is refused while the lease is live; a lease whose process is gone (same host) or that expired is taken over,
so a run killed by SIGKILL is resumed at once on the same host, or after the TTL from another one.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import random
import threading
import time
from datetime import datetime
from typing import Any, Protocol

import torch
from torch import nn

from infra import storage
from stages.cache import Claim, new_claim, new_owner_id
from stages.device import resolve_device
from stages.extract import LeaseConfig

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
ORDER_FILE = "order.json"  # {"position": the step (train) or epoch (fine-tuning) the checkpoint was saved at}
CHECKPOINT_PREFIX = "checkpoint_"
LEASE_FILE = "lease.json"


class TrainSession(Protocol):
    """What the worker loop needs from its runner (see the module docstring)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None: ...

    def latest_state(self) -> dict[str, Any] | None: ...


def checkpoint_names(run_url: str) -> list[str]:
    """Checkpoint directory names of a run that hold a state file, oldest first.

    Oldest by the position each records in its ``order.json`` (:func:`mark_order`), then by name. The names are
    local wall-clock times (Ray Train's and this module's alike), which do not order checkpoints across a DST
    fall-back hour or a resume on a machine in another time zone; checkpoints without the file (written before it
    existed) come first, in name order.
    """
    if not storage.exists(run_url):
        return []
    keys = set(storage.list_objects(run_url))
    names = {k.split("/")[0] for k in keys if k.startswith(CHECKPOINT_PREFIX) and k.endswith("/" + STATE_FILE)}
    return sorted(names, key=lambda name: (_position(run_url, name, keys), name))


def _position(run_url: str, name: str, keys: set[str]) -> int:
    """The position a checkpoint's ``order.json`` records; -1 without a readable one."""
    if f"{name}/{ORDER_FILE}" not in keys:
        return -1
    try:
        return int(json.loads(storage.read_bytes(storage.join(run_url, name, ORDER_FILE)))["position"])
    except FileNotFoundError:  # pruned since the listing
        return -1
    except (ValueError, KeyError, TypeError) as err:
        log.warning("checkpoint %s: unreadable %s (%s); ordered by its name", name, ORDER_FILE, err)
        return -1


def mark_order(checkpoint_dir: str, position: int) -> None:
    """Record in a checkpoint directory being written the position it is saved at (a step, or an epoch), by
    which :func:`checkpoint_names` orders checkpoints."""
    with open(os.path.join(checkpoint_dir, ORDER_FILE), "w") as f:
        json.dump({"position": int(position)}, f)


def load_state(url: str) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (``weights_only`` load onto the CPU)."""
    return _decode_state(storage.read_bytes(url))


def _decode_state(data: bytes) -> dict[str, Any]:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def latest_state(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The newest readable checkpoint of a run: (its name, its state), or None when there is none.

    A checkpoint whose file does not decode (truncated upload, corrupt file) or is gone since the listing is
    skipped with a warning naming it. A store that fails to serve it (an outage, a refused permission:
    :class:`infra.storage.StorageError`) stops the caller instead: falling back would restart the run from an older
    step, or from step 0, and the next save would prune the checkpoints it could not read.
    """
    for name in reversed(checkpoint_names(run_url)):
        url = storage.join(run_url, name, STATE_FILE)
        try:
            return name, _decode_state(storage.read_bytes(url))
        except FileNotFoundError as err:
            reason = f"gone since the listing ({err})"
        except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
            reason = f"{type(err).__name__}: {err}"
        log.warning("checkpoint %s is unreadable (%s); falling back to the previous one", url, reason[:200])
    return None


class LocalSession:
    """One worker in the calling process (``train.num_workers: 0``): rank 0 of 1, on ``train.use_gpu``'s device.

    Args:
        run_url: the run directory (checkpoints go to ``<run_url>/checkpoint_<timestamp>/``).
        use_gpu: train on CUDA (refused when it is not available) or on the CPU.
        keep_checkpoints: newest checkpoints kept; older ones are deleted after each save.
        lease: the run's lease held by this process: every report checks it first (:meth:`RunLease.check`).
    """

    rank = 0
    world_size = 1

    def __init__(self, run_url: str, use_gpu: bool, keep_checkpoints: int, lease: RunLease | None = None) -> None:
        self.run_url, self.keep, self.lease = run_url, keep_checkpoints, lease
        self.device = resolve_device(use_gpu)
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: str | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Keep the metrics; persist ``checkpoint_dir``'s files under a new checkpoint name, then prune.

        Raises:
            RunLeaseLostError: the run's lease was taken over (nothing is persisted).
        """
        if self.lease is not None:
            self.lease.check()
        self.last_metrics = dict(metrics)
        if checkpoint_dir is None:
            return
        name = CHECKPOINT_PREFIX + datetime.now().strftime("%Y-%m-%d_%H-%M-%S.%f")
        target = storage.join(self.run_url, name)
        files = sorted(os.listdir(checkpoint_dir), key=lambda f: f == STATE_FILE)  # the state file last
        for file in files:
            with open(os.path.join(checkpoint_dir, file), "rb") as f:
                storage.write_bytes(storage.join(target, file), f.read())
        self.last_checkpoint = target
        for old in checkpoint_names(self.run_url)[:-self.keep]:
            storage.delete(storage.join(self.run_url, old), recursive=True)

    def latest_state(self) -> dict[str, Any] | None:
        found = latest_state(self.run_url)
        return None if found is None else found[1]


class RaySession:
    """A Ray Train worker (built inside ``train_loop_per_worker``); imports Ray.

    Args:
        run_url: the run directory, searched for a checkpoint when Ray has none to restore (a run begun in-process).
        lease_token: the driver's lease token: rank 0 checks the stored lease against it before each checkpoint
            (:func:`check_lease_file`).
    """

    def __init__(self, run_url: str, lease_token: str | None = None) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_url, self.lease_token = run_url, lease_token

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world_size > 1 else model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        if checkpoint_dir is not None and self.lease_token is not None:
            check_lease_file(self.run_url, self.lease_token)
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)

    def latest_state(self) -> dict[str, Any] | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is not None:
            try:
                with checkpoint.as_directory() as d:
                    return torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, ValueError, OSError) as err:
                log.warning("checkpoint %s is unreadable (%s: %s); looking for the previous one", checkpoint.path,
                            type(err).__name__, str(err)[:200])
        found = latest_state(self.run_url)
        return None if found is None else found[1]


class RunBusyError(RuntimeError):
    """Another live process holds the run's name (its lease is neither expired nor owned by a dead process)."""


class RunLeaseLostError(RuntimeError):
    """The run's lease was taken over by another process while this one drove the run: it stops, so that two
    processes never train (and checkpoint) the same run."""


def lost_message(url: str, current: Claim | None) -> str:
    """Why a run no longer holds its lease ``url`` (``current``: what the lease file holds now)."""
    holder = ("the lease file is gone" if current is None else
              f"it is held by {current.owner} (host {current.host}, pid {current.pid})")
    return (f"{url}: this run lost its lease: {holder}; stopping so that two processes never train the same run "
            "(its latest checkpoint is kept: start it again once the other process has ended)")


def check_lease_file(run_url: str, token: str) -> None:
    """Refuse to go on when ``<run_url>/lease.json`` no longer holds ``token`` (a Ray worker's view of the
    driver's lease).

    Raises:
        RunLeaseLostError: naming the lease and the process that holds it now.
    """
    lease = RunLease(run_url)
    current = lease.read()
    if current is None or current.token != token:
        raise RunLeaseLostError(lost_message(lease.url, current))


class RunLease:
    """The lease on a run's name, ``<run_url>/lease.json``, held while a run is driven (see the module docstring).

    Use as a context manager: ``with RunLease(url): ...`` acquires (or raises :class:`RunBusyError`), renews every
    ``lease.renew_every_s`` on a daemon thread, and deletes the lease on exit if it is still ours. When a renewal
    finds the lease taken over, :attr:`lost` says by whom and :meth:`check` raises :class:`RunLeaseLostError`: the
    sessions call it at every checkpoint, so the run stops there.

    Args:
        run_url: the run directory.
        lease: TTL, renewal period and confirmation wait (the extraction's claim timings).
    """

    def __init__(self, run_url: str, lease: LeaseConfig | None = None) -> None:
        self.url = storage.join(run_url, LEASE_FILE)
        self.lease = lease or LeaseConfig()
        self.owner = new_owner_id()
        self._token: str | None = None
        self.lost: str | None = None  # why the run no longer holds its name (set by the renewal thread)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> Claim | None:
        """The stored lease (None if there is none; an unreadable one counts as none)."""
        try:
            return Claim.from_bytes(storage.read_bytes(self.url))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError) as exc:
            log.warning("%s is unreadable (%s): treated as absent", self.url, exc)
            return None

    def _refuse_if_held(self, current: Claim | None, what: str) -> None:
        if current is not None and current.owner != self.owner and not current.is_stale():
            raise RunBusyError(
                f"{self.url}: the run is {what} by a live process (owner {current.owner}, host {current.host}, "
                f"pid {current.pid}, lease valid for {max(0.0, current.expires - time.time()):.0f} s more): wait "
                "for it to end, or choose another train.run_name")

    def acquire(self) -> RunLease:
        """Write our lease, wait ``confirm_delay_s`` × U(1, 2), re-read: held only if the re-read shows our token.

        Raises:
            RunBusyError: a live lease of another owner exists, or another process won the race.
        """
        current = self.read()
        self._refuse_if_held(current, "held")
        if current is not None and current.owner != self.owner:
            log.warning("%s: taking over the lease of %s (pid %d on %s), which is gone or expired", self.url,
                        current.owner, current.pid, current.host)
        claim = new_claim(0, self.owner, self.lease.ttl_s)
        storage.write_bytes(self.url, claim.to_bytes())
        time.sleep(self.lease.confirm_delay_s * (1.0 + random.random()))
        again = self.read()
        if again is None or again.token != claim.token:
            self._refuse_if_held(again, "being started")
            raise RunBusyError(f"{self.url}: another process started this run at the same moment; try again")
        self._token = claim.token
        self._thread = threading.Thread(target=self._renew, name="run-lease", daemon=True)
        self._thread.start()
        return self

    @property
    def token(self) -> str | None:
        """Our lease's token while we hold it (the Ray workers check the stored lease against it)."""
        return self._token

    def check(self) -> None:
        """Raise if the renewal found the lease taken over by another process.

        Raises:
            RunLeaseLostError: naming the lease and the process that holds it now.
        """
        if self.lost is not None:
            raise RunLeaseLostError(self.lost)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease.renew_every_s):
            try:
                current = self.read()
                if current is None or current.token != self._token:
                    self.lost = lost_message(self.url, current)
                    log.error("%s", self.lost)
                    return
                storage.write_bytes(self.url, new_claim(0, self.owner, self.lease.ttl_s, self._token).to_bytes())
            except Exception as exc:  # a failed renewal is retried at the next beat
                log.warning("%s: renewing the lease failed: %s", self.url, exc)

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours (best effort: it expires anyway)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.lease.renew_every_s + 5)
        try:
            current = self.read()
            if current is not None and current.token == self._token:
                storage.delete(self.url)
        except Exception as exc:
            log.warning("%s: could not release the lease: %s", self.url, exc)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
