"""experiments/replicate_v2.py on a tiny config: rows are written once, a second call reuses them, changed settings
are refused, and a TEC recipe builds through the pipeline with its costs read from the cache's ledger."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from experiments import replication_v2_models as M
from experiments.replicate_v2 import main

FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture()
def tiny_config(tmp_path):
    cfg = {
        "name": "v2tiny", "output_root": str(tmp_path / "out"),
        "data": {"source": "idx", "path": f"{FMNIST}/train-images-idx3-ubyte.gz", "limit": 128,
                 "test_path": f"{FMNIST}/t10k-images-idx3-ubyte.gz"},
        "base": {"arch": "vit_pico_patch4_32", "timm_overrides": {"in_chans": 1},
                 "pretrain": {"epochs": 1, "global_batch": 64, "decoder_dim": 32, "decoder_heads": 4}},
        "preprocess": {"norm": "fashion_mnist"},
        "extract": {"views_per_image": 1, "k_max": 4, "unit_size": 64, "batch_size": 64, "num_actors": 0},
        "model": {"arch": "vit_pico_patch4_32", "timm_overrides": {"in_chans": 1}, "topk": 4, "decoder_dim": 32,
                  "decoder_heads": 4},
        "train": {"epochs": 1, "global_batch": 64, "num_workers": 0, "loader_workers": 0, "threads_per_worker": 2},
        "finetune": {"epochs": 1, "batch_size": 32, "warmup_epochs": 0},
    }
    path = tmp_path / "v2tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_driver_writes_each_row_once_and_refuses_other_settings(tiny_config, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    sizes = ["--probe-train", "128", "--probe-test", "64", "--ft-train", "64", "--ft-test", "32", "--seeds", "1"]
    assert main(["--config", tiny_config, "--rows", str(rows), "--only", "random", *sizes]) == 0
    written = [json.loads(line) for line in rows.read_text().splitlines()]
    keys = [r["key"] for r in written]
    assert keys == ["settings", "model/random_init", "eval/random_init/knn", "eval/random_init/linear",
                    "eval/random_init/finetune/seed0"]
    assert all(r["machine"] for r in written) and 0 <= written[-1]["top1"] <= 1
    assert "| random_init | 0 | — |" in capsys.readouterr().out
    main(["--config", tiny_config, "--rows", str(rows), "--only", "random", *sizes])
    assert rows.read_text().count("\n") == len(written)  # nothing run again
    with pytest.raises(SystemExit, match=r"ft_train: 64 there, 32 now"):
        main(["--config", tiny_config, "--rows", str(rows), "--only", "random", *sizes[:4], "--ft-train", "32",
              *sizes[6:]])


def test_a_tec_recipe_builds_and_reads_its_costs_from_the_ledger(tiny_config):
    built = M.build(M.tec(tiny_config, base_epochs=1, epochs=1, seed=0))
    assert built.checkpoint.endswith("/export/encoder.pth")
    assert set(built.macs) == {"pretrain", "extract", "train"} and min(built.macs.values()) > 0
    assert M.kept_adapters(built.checkpoint).endswith("/export/encoder_adapters.pth")
    again = M.build(M.tec(tiny_config, base_epochs=1, epochs=1, seed=0))  # reused: same export, same costs
    assert (again.checkpoint, again.macs) == (built.checkpoint, built.macs)


def test_compare_needs_a_saturated_base_or_a_measured_compare_at(tmp_path):
    from experiments.replicate_v2 import Rows, compare_base

    path = tmp_path / "rows.jsonl"
    lines = [{"key": f"eval/mae_e{e}_s0/finetune/seed{s}", "kind": "eval", "model": f"mae_e{e}_s0",
              "protocol": "finetune", "seed": s, "top1": t}
             for e, ts in ((8, (0.60, 0.61)), (16, (0.70, 0.71))) for s, t in enumerate(ts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    rows = Rows(str(path))

    def args(at):
        return argparse.Namespace(base_epochs=[8, 16, 32], compare_at=at)

    with pytest.raises(SystemExit, match="no doubling of --base-epochs 8,16,32 gains less"):
        compare_base(rows, args(None))
    with pytest.raises(SystemExit, match="--compare-at 32: not a measured point"):
        compare_base(rows, args(32))
    assert compare_base(rows, args(16)) == 16
    for s, t in enumerate((0.705, 0.715)):  # 16 -> 32 gains 0.005 < spread 0.01: saturated at 16
        rows.add({"key": f"eval/mae_e32_s0/finetune/seed{s}", "kind": "eval", "model": "mae_e32_s0",
                  "protocol": "finetune", "seed": s, "top1": t})
    assert compare_base(rows, args(None)) == 16
    with pytest.raises(SystemExit, match="saturates at E = 16"):
        compare_base(rows, args(8))


def test_codec_models_go_seed_by_seed_and_name_their_codec():
    recipes = M.codec_recipes("c.yaml", 64, 16, 2)
    assert [r.name for r in recipes] == ["tec_int8_b64_e16_s0", "tec_fp8_b64_e16_s0", "tec_int8_b64_e16_s1",
                                         "tec_fp8_b64_e16_s1"]
    assert "extract.codec=fp8" in recipes[1].overrides and recipes[1].finetune_protocols == ("finetune",)
