"""The one seam between the training loop and what runs it: Ray Train workers, or a single in-process worker.

The worker loop (:func:`stages.train.train_worker`) needs five things from its runner, and nothing else:

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
"""

from __future__ import annotations

import io
import logging
import os
from datetime import datetime
from typing import Any, Protocol

import torch
from torch import nn

from infra import storage
from stages.device import resolve_device

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
CHECKPOINT_PREFIX = "checkpoint_"


class TrainSession(Protocol):
    """What the worker loop needs from its runner (see the module docstring)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None: ...

    def latest_state(self) -> dict[str, Any] | None: ...


def checkpoint_names(run_url: str) -> list[str]:
    """Checkpoint directory names of a run that hold a state file, oldest first (names sort by time)."""
    if not storage.exists(run_url):
        return []
    return sorted({k.split("/")[0] for k in storage.list_objects(run_url)
                   if k.startswith(CHECKPOINT_PREFIX) and k.endswith("/" + STATE_FILE)})


def load_state(url: str) -> dict[str, Any]:
    """A checkpoint's ``state.pt`` (``weights_only`` load onto the CPU)."""
    return torch.load(io.BytesIO(storage.read_bytes(url)), map_location="cpu", weights_only=True)


def latest_state(run_url: str) -> tuple[str, dict[str, Any]] | None:
    """The newest readable checkpoint of a run: (its name, its state), or None when there is none.

    A checkpoint that cannot be read (truncated upload, corrupt file) is skipped with a warning naming it.
    """
    for name in reversed(checkpoint_names(run_url)):
        url = storage.join(run_url, name, STATE_FILE)
        try:
            return name, load_state(url)
        except (RuntimeError, EOFError, ValueError, OSError, KeyError) as err:
            if isinstance(err, storage.StorageError) and err.transient:
                raise
            log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one", url,
                        type(err).__name__, str(err)[:200])
    return None


class LocalSession:
    """One worker in the calling process (``train.num_workers: 0``): rank 0 of 1, on ``train.use_gpu``'s device.

    Args:
        run_url: the run directory (checkpoints go to ``<run_url>/checkpoint_<timestamp>/``).
        use_gpu: train on CUDA (refused when it is not available) or on the CPU.
        keep_checkpoints: newest checkpoints kept; older ones are deleted after each save.
    """

    rank = 0
    world_size = 1

    def __init__(self, run_url: str, use_gpu: bool, keep_checkpoints: int) -> None:
        self.run_url, self.keep = run_url, keep_checkpoints
        self.device = resolve_device(use_gpu)
        self.last_metrics: dict[str, Any] = {}
        self.last_checkpoint: str | None = None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        """Keep the metrics; persist ``checkpoint_dir``'s files under a new checkpoint name, then prune."""
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
    """

    def __init__(self, run_url: str) -> None:
        import ray.train
        import ray.train.torch

        self._train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.run_url = run_url

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model) if self.world_size > 1 else model

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
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
