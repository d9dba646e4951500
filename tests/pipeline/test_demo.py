"""The demo end to end at tiny sizes: pixel-MAE base pre-training → extract → TEC → evaluate → figures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.demo import run_demo
from pipeline.orchestrate import prepare_base
from tec_model import unwrap_state_dict

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "tiny.yaml")
PNG = b"\x89PNG\r\n\x1a\n"
pytestmark = [pytest.mark.usefixtures("ray_cluster", "fmnist_dir"), pytest.mark.slow]


def test_demo_pretrains_a_mae_base_trains_tec_and_writes_results_and_figures(tmp_path, capsys):
    overrides = [f"output_root={tmp_path}", "base.pretrain.epochs=2", "base.pretrain.global_batch=64",
                 "base.pretrain.decoder_dim=64", "train.epochs=1",
                 "extract.num_actors=0", "train.num_workers=0"]  # in-process: the Ray paths are tested elsewhere
    results = run_demo(TINY, overrides, n_train=400, n_test=200)

    base = results["base checkpoint"]
    assert base.startswith(str(tmp_path / "bases" / "mae-vit_pico_patch4_32-")) and base.endswith("/export/mae.pth")
    state = torch.load(base, map_location="cpu", weights_only=True)
    assert unwrap_state_dict(state)[1] == "mae" and "decoder_pred.weight" in state["model"]
    pretrain_rows = [json.loads(line) for line in (Path(base).parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert pretrain_rows[-1]["step"] == 2 * 256 // 64 and pretrain_rows[-1]["loss_att"] == 0.0

    for name in ("base model", "TEC model"):
        ev = results["evaluation (top-1)"][name]
        assert ev["n_train"] == 400 and ev["n_test"] == 200
        assert 0.1 < ev["knn_top1"] <= 1 and 0.1 < ev["linear_top1"] <= 1  # 10 classes: well above chance
    for png in results["figures"]:
        assert Path(png).read_bytes().startswith(PNG)
    assert json.loads((Path(results["run"]) / "demo" / "results.json").read_text())["train steps"] == 4
    out = capsys.readouterr().out
    assert "TEC demo results" in out and "base model" in out and "TEC model" in out

    # the pre-trained base is reused, not trained again, by anything that asks for the same base
    cfg = load_config(TINY, overrides)
    assert prepare_base(cfg) == base
