"""Fine-tuning as a training job (stages.finetune): learning, PEFT freezing, resume, results and bad input.

The data are real PNG files in the ImageFolder layout (bright, dark and striped 16×16 images written by
tests.pipeline.test_labelled.image_tree, read through stages.manifest and stages.images); the encoder is a tiny TEC
model exported by the train stage's write_export (folded encoder.pth and kept-adapter encoder_adapters.pth).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from stages.finetune import FinetuneInputError, FinetuneJob, run_finetune
from stages.finetune.data import Split, TrainBatches, eval_batches
from stages.finetune.job import check_labelled
from stages.images import BadImageError
from stages.manifest import manifest_from_image_folder
from stages.train.data import make_loader
from stages.train.job import TrainJob
from stages.train.loop import latest_checkpoint_state, write_export
from stages.train.rundir import RunConfigChangedError
from tec_model import TECModel, export_encoder, vit_kwargs
from tec_model.peft import build_peft_model
from tests.pipeline.test_labelled import image_tree

ARCH = "vit_pico_patch4_32"
PREPROCESS = {"output_size": 32, "crop_scale": [0.2, 1.0], "crop_ratio": [0.75, 4 / 3], "interpolation": "bicubic",
              "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


def _write_split(root: Path, per_class: int, seed: int) -> pa.Table:
    image_tree(str(root), per_class, seed=seed)
    return manifest_from_image_folder(str(root))


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> tuple[pa.Table, pa.Table]:
    """(train, test) manifests: 16 / 8 images per class."""
    root = tmp_path_factory.mktemp("toy")
    return _write_split(root / "train", 16, 0), _write_split(root / "test", 8, 1)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The train stage's export of a tiny TEC model with both adapters (weights moved off their init)."""
    out = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    model = TECModel(vit_kwargs(ARCH), 48, 3, 64, topk=4, decoder_dim=32, decoder_heads=4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    job = TrainJob(run_name="t", storage_path=str(out), timm_kwargs=vit_kwargs(ARCH), base_timm_kwargs=vit_kwargs(ARCH),
                   preprocess=PREPROCESS, cache_url="unused", num_workers=0)
    write_export(job, model, str(out))
    return out


def _job(tmp_path: Path, export_dir: Path, name: str, protocol: str = "finetune", **fields) -> FinetuneJob:
    checkpoint = export_dir / ("encoder.pth" if protocol == "finetune" else "encoder_adapters.pth")
    defaults = {"run_name": name, "storage_path": str(tmp_path), "checkpoint_url": str(checkpoint),
                "timm_kwargs": vit_kwargs(ARCH), "num_classes": 3, "preprocess": PREPROCESS, "epochs": 2,
                "batch_size": 16, "warmup_epochs": 0.5, "log_every": 1, "eval_batch_size": 24}
    return FinetuneJob.for_protocol(protocol, **(defaults | fields))


def test_train_stage_writes_the_kept_adapter_export_beside_the_folded_one(export_dir):
    kept = torch.load(export_dir / "encoder_adapters.pth", weights_only=True)
    folded = torch.load(export_dir / "encoder.pth", weights_only=True)
    assert {k.split(".")[0] for k in kept} == {"encoder", "input_adapter", "encoder_adapter"}
    assert not torch.equal(kept["encoder.cls_token"], folded["cls_token"])  # kept unfolded
    assert build_peft_model(vit_kwargs(ARCH), kept, "both", 3).encoder_adapter is not None


def test_finetune_learns_the_toy_set_and_writes_results(tmp_path, export_dir, toy):
    job = _job(tmp_path, export_dir, "ft", epochs=4, blr=2e-3, mixup=0.0, cutmix=0.0)
    results = run_finetune(job, *toy)
    history = results["history"]
    assert results["complete"] and len(history) == 4 and results["start_epoch"] == 0
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert results["test_top1"] >= 0.6, history  # chance is 1/3
    assert json.loads((tmp_path / "ft" / "results.json").read_text()) == results
    assert {"blocks", "head", "fc_norm", "patch_embed"} <= set(results["trained_modules"])
    assert results["n_train"] == 48 and results["n_test"] == 24


@pytest.mark.parametrize(("protocol", "tuned"), [("peft_prompt", {"input_adapter", "head"}),
                                                 ("peft_both", {"input_adapter", "encoder_adapter", "head"})])
def test_peft_trains_only_the_adapters_and_the_head(tmp_path, export_dir, toy, protocol, tuned):
    results = run_finetune(_job(tmp_path, export_dir, protocol, protocol, epochs=1), *toy)
    assert set(results["trained_modules"]) == tuned
    final = latest_checkpoint_state(str(tmp_path / protocol))["model"]
    kept = torch.load(export_dir / "encoder_adapters.pth", weights_only=True)
    for key, value in kept.items():
        if key.startswith("encoder."):
            assert torch.equal(final[key], value), f"frozen {key} changed"
        elif key in final:  # the adapters the protocol uses
            assert not torch.equal(final[key], value), f"tuned {key} did not change"
    assert any(k.startswith("encoder_adapter.") for k in final) == (protocol == "peft_both")


def test_a_stopped_run_resumes_at_its_next_epoch_with_the_uninterrupted_weights(tmp_path, export_dir, toy):
    """Mixup, cutmix, drop path and label smoothing on: every random draw must be redrawn on resume."""
    whole = run_finetune(_job(tmp_path, export_dir, "whole"), *toy)
    first = run_finetune(_job(tmp_path, export_dir, "resumed", stop_after_epochs=1), *toy)
    assert not first["complete"] and first["epochs_done"] == 1
    second = run_finetune(_job(tmp_path, export_dir, "resumed"), *toy)
    assert second["complete"] and second["start_epoch"] == 1
    assert [s["start_step"] for s in second["starts"]] == [0, 3]  # 48 images / batch 16 = 3 steps an epoch
    a = latest_checkpoint_state(str(tmp_path / "whole"))["model"]
    b = latest_checkpoint_state(str(tmp_path / "resumed"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert second["history"] == [dict(r, seconds=s["seconds"]) for r, s in zip(whole["history"], second["history"],
                                                                                 strict=True)]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return latest_checkpoint_state(str(run_dir))["model"]


def test_one_dataset_spans_the_epochs_with_each_step_once_in_order(toy):
    """Loader worker k of n yields the run's batches k, k + n, …: the per-epoch datasets' batches, once each."""
    split = Split.of(toy[0], check_labelled(toy[0], 3, "train"))
    kwargs = {"in_chans": 3, "batch_size": 16, "world": 1, "rank": 0, "seed": 3, "crop_scale": (0.2, 1.0),
              "crop_ratio": (0.75, 4 / 3)}
    preprocess = _job(Path("unused"), Path("unused"), "x").preprocess_obj()
    spanning = TrainBatches(split, preprocess, epoch=1, start=2, until=3, **kwargs)
    assert len(spanning) == 4  # 48 images / batch 16: step 2 of epoch 1, then epoch 2's three steps
    per_epoch = [b for e, s in ((1, 2), (2, 0)) for b in TrainBatches(split, preprocess, epoch=e, start=s, **kwargs)]
    served = list(make_loader(spanning, num_workers=2))
    assert [(b["epoch"], b["step"]) for b in served] == [(1, 2), (2, 0), (2, 1), (2, 2)]
    assert [(b["epoch"], b["step"]) for b in per_epoch] == [(b["epoch"], b["step"]) for b in served]
    for a, b in zip(per_epoch, served, strict=True):
        assert torch.equal(a["indices"], b["indices"]) and torch.equal(a["pixels"], b["pixels"])


def test_loader_workers_change_neither_the_steps_nor_the_weights(tmp_path, export_dir, toy):
    """Two spawned loader workers serve each step once, in order: the run equals the in-process one."""
    inline = run_finetune(_job(tmp_path, export_dir, "inline", loader_workers=0), *toy)
    spawned = run_finetune(_job(tmp_path, export_dir, "spawned", loader_workers=2), *toy)
    assert [r["train_loss"] for r in spawned["history"]] == [r["train_loss"] for r in inline["history"]]
    a, b = _weights(tmp_path / "inline"), _weights(tmp_path / "spawned")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_scoring_fewer_epochs_changes_neither_the_weights_nor_the_final_score(tmp_path, export_dir, toy):
    """Evaluation draws no randomness training uses: ``eval_every`` only thins the history's scores."""
    every = run_finetune(_job(tmp_path, export_dir, "every", epochs=3), *toy)
    sparse = run_finetune(_job(tmp_path, export_dir, "sparse", epochs=3, eval_every=2), *toy)
    assert [r["test_top1"] is None for r in sparse["history"]] == [True, False, False]  # epoch 2, and the last
    assert sparse["test_top1"] == every["test_top1"] and sparse["history"][1]["test_top1"] == every["history"][1][
        "test_top1"]
    assert sparse["best_test_top1"] == max(every["history"][1]["test_top1"], every["test_top1"])
    a = latest_checkpoint_state(str(tmp_path / "every"))["model"]
    b = latest_checkpoint_state(str(tmp_path / "sparse"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_names_the_field(tmp_path, export_dir, toy):
    train, test = toy
    unlabeled = train.set_column(train.column_names.index("label"), "label", pa.nulls(train.num_rows, pa.int64()))
    with pytest.raises(FinetuneInputError, match=r"train\.label: 48 of 48 rows have no label"):
        run_finetune(_job(tmp_path, export_dir, "bad"), unlabeled, test)
    with pytest.raises(FinetuneInputError, match=r"num_classes: the job has 2 classes.*\[0, 2\]"):
        run_finetune(_job(tmp_path, export_dir, "bad", num_classes=2), train, test)
    other = tmp_path / "nano.pth"
    torch.save(export_encoder(TECModel(vit_kwargs("vit_nano_patch4_32"), 48, 3, 64, topk=4, decoder_dim=32,
                                       decoder_heads=4)), other)
    with pytest.raises(FinetuneInputError, match=r"checkpoint_url: .*nano\.pth does not fit.*shape mismatches"):
        run_finetune(_job(tmp_path, export_dir, "bad", checkpoint_url=str(other)), train, test)
    with pytest.raises(FinetuneInputError, match=r"checkpoint_url: .*not a kept-adapter export"):
        run_finetune(_job(tmp_path, export_dir, "bad", "peft_prompt", checkpoint_url=str(export_dir / "encoder.pth")),
                     train, test)
    with pytest.raises(ValueError, match="protocol: must be one of"):
        _job(tmp_path, export_dir, "bad", "linear")
    with pytest.raises(ValueError, match=r"crop_scale / crop_ratio: expected \[min, max\].*\[0\.0, 0\.5\]"):
        _job(tmp_path, export_dir, "bad", crop_scale=(0.0, 0.5))
    assert not (tmp_path / "bad").exists()  # refused before anything was written


def test_images_are_read_under_the_jobs_input_policy(tmp_path, export_dir, toy):
    """The data section's limits hold for fine-tuning as for every other stage: a 16×16 image over a 100-pixel
    bound stops the run, naming the file and the setting."""
    job = _job(tmp_path, export_dir, "limited", epochs=1, uri_policy={"max_image_pixels": 100})
    with pytest.raises(BadImageError, match=r"bright/\d+\.png: too_large .*data\.max_image_pixels = 100"):
        run_finetune(job, *toy)
    split, pre = Split.of(toy[0], check_labelled(toy[0], 3, "train")), job.preprocess_obj()
    with pytest.raises(BadImageError, match="max_image_pixels"):  # the training views
        next(iter(TrainBatches(split, pre, in_chans=3, batch_size=16, world=1, rank=0, epoch=0, start=0, seed=0,
                               crop_scale=(0.2, 1.0), crop_ratio=(0.75, 4 / 3), policy=job.policy())))
    with pytest.raises(BadImageError, match="max_image_pixels"):  # the test views
        next(eval_batches(split, pre, in_chans=3, crop=0.875, batch_size=8, rank=0, world=1, policy=job.policy()))


def test_a_run_started_again_with_another_recipe_or_over_a_foreign_checkpoint_is_refused(tmp_path, export_dir, toy):
    run_finetune(_job(tmp_path, export_dir, "once", epochs=1), *toy)
    with pytest.raises(RunConfigChangedError, match=r"blr: run has 0\.001, now 0\.002"):
        run_finetune(_job(tmp_path, export_dir, "once", epochs=1, blr=2e-3), *toy)
    foreign = tmp_path / "foreign" / "checkpoint_2026-01-01_00-00-00.000000"  # e.g. a TEC training run's
    foreign.mkdir(parents=True)
    torch.save({"model": {}, "progress": {"step": 4}}, foreign / "state.pt")
    with pytest.raises(RuntimeError, match="not of this fine-tuning job"):
        run_finetune(_job(tmp_path, export_dir, "foreign", epochs=1), *toy)


def test_a_run_begun_in_process_is_finished_by_two_ray_workers_as_one_worker_would(tmp_path, export_dir, toy,
                                                                                  ray_cluster):
    """Two Ray Train ranks, each with a loader process, train half of every batch each with DDP averaging their
    gradients: the same steps as one in-process worker, up to the order of float sums. No mixing and no drop path,
    whose draws are per rank."""
    recipe = {"epochs": 2, "blr": 2e-3, "mixup": 0.0, "cutmix": 0.0, "drop_path": 0.0}
    whole = run_finetune(_job(tmp_path, export_dir, "whole", **recipe), *toy)
    run_finetune(_job(tmp_path, export_dir, "split", stop_after_epochs=1, **recipe), *toy)
    split = run_finetune(_job(tmp_path, export_dir, "split", num_workers=2, loader_workers=1, **recipe), *toy)
    assert split["complete"] and [(s["start_step"], s["world_size"]) for s in split["starts"]] == [(0, 1), (3, 2)]
    assert split["history"][0] == dict(whole["history"][0], seconds=split["history"][0]["seconds"])
    assert split["history"][1]["train_loss"] == pytest.approx(whole["history"][1]["train_loss"], rel=1e-5)
    assert split["test_top1"] == whole["test_top1"]
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "split")
    drift = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert drift < 1e-5, f"the two ranks trained other weights (largest difference {drift:.2e})"
