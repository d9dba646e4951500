"""stages.train.session: which checkpoint is the newest when the wall-clock names do not say it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from infra import storage
from stages.train import session as S


def _checkpoint(run: Path, name: str, step: int | None) -> None:
    """A checkpoint directory holding ``{"step": step}``, with its order file unless ``step`` is None."""
    buf = io.BytesIO()
    torch.save({"step": -1 if step is None else step}, buf)
    storage.write_bytes(str(run / name / S.STATE_FILE), buf.getvalue())
    if step is not None:
        storage.write_bytes(str(run / name / S.ORDER_FILE), json.dumps({"position": step}).encode())


def test_the_newest_checkpoint_is_the_latest_position_not_the_latest_name(tmp_path, monkeypatch):
    """Across a DST fall-back hour (or a resume in another time zone) step 20's checkpoint can carry an earlier
    wall-clock name than step 10's: resuming and pruning go by the recorded position."""
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_2026-10-25_02-10-00.000000", None)  # written before order files existed
    _checkpoint(run, "checkpoint_2026-10-25_02-45-00.000000", 10)
    _checkpoint(run, "checkpoint_2026-10-25_02-15-00.000000", 20)  # the clock went back an hour in between
    assert S.checkpoint_names(str(run)) == ["checkpoint_2026-10-25_02-10-00.000000",
                                            "checkpoint_2026-10-25_02-45-00.000000",
                                            "checkpoint_2026-10-25_02-15-00.000000"]
    name, state = S.latest_state(str(run))
    assert name == "checkpoint_2026-10-25_02-15-00.000000" and state["step"] == 20

    class Earlier:  # the next save's wall clock: before every existing name
        @staticmethod
        def now():
            from datetime import datetime
            return datetime(2026, 10, 25, 2, 5)

    monkeypatch.setattr(S, "datetime", Earlier)
    session = S.LocalSession(str(run), use_gpu=False, keep_checkpoints=1)
    new = tmp_path / "new"
    new.mkdir()
    torch.save({"step": 30}, new / S.STATE_FILE)
    S.mark_order(str(new), 30)
    session.report({"step": 30}, str(new))
    assert S.checkpoint_names(str(run)) == ["checkpoint_2026-10-25_02-05-00.000000"], "pruned the new checkpoint"
    assert S.latest_state(str(run))[1]["step"] == 30


def test_an_unreadable_order_file_orders_its_checkpoint_by_name(tmp_path, caplog: pytest.LogCaptureFixture):
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_b", 5)
    _checkpoint(run, "checkpoint_a", 7)
    storage.write_bytes(str(run / "checkpoint_a" / S.ORDER_FILE), b"{not json")
    assert S.checkpoint_names(str(run)) == ["checkpoint_a", "checkpoint_b"]
    assert "checkpoint_a: unreadable order.json" in caplog.text
