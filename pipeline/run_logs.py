"""A run's metrics as files a person or a tool opens: ``metrics.csv`` and TensorBoard event files.

The trainer keeps the full history in ``<run>/metrics.jsonl`` (rank 0 rewrites it at every checkpoint); this turns
it into ``<run>/metrics.csv`` and ``<run>/tensorboard/`` once a run (or a resumed part of it) ends.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile

from infra import storage

log = logging.getLogger(__name__)


def read_history(run_dir: str) -> list[dict]:
    """The run's metric rows, ordered by step (empty when it has not reported yet)."""
    url = storage.join(run_dir, "metrics.jsonl")
    if not storage.exists(url):
        return []
    rows = [json.loads(line) for line in storage.read_bytes(url).decode().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["step"])


def write_run_logs(run_dir: str) -> list[dict]:
    """Write ``metrics.csv`` and TensorBoard events for the run's history; returns the history."""
    history = read_history(run_dir)
    if not history:
        return history
    columns = sorted({k for row in history for k in row}, key=lambda k: (k != "step", k))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(history)
    storage.write_bytes(storage.join(run_dir, "metrics.csv"), buf.getvalue().encode())
    _write_tensorboard(run_dir, history)
    return history


def _write_tensorboard(run_dir: str, history: list[dict]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(log_dir=tmp)
        for row in history:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    writer.add_scalar(f"train/{key}", value, global_step=row["step"])
        writer.close()
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                storage.write_bytes(storage.join(run_dir, "tensorboard", name), f.read())
    log.debug("wrote TensorBoard events for %d steps to %s/tensorboard", len(history), run_dir)
