"""pipeline.finetune: a config's fine-tuning job (architecture, preprocessing, resources, run directory)."""

from __future__ import annotations

import pytest
import torch

from pipeline.finetune import finetune_cli, finetune_job
from pipeline.labelled import labelled_splits
from tec_model import TECModel, export_with_adapters, vit_kwargs
from tests.pipeline.test_labelled import folder_cfg, image_tree


def test_finetune_cli_trains_a_config_run_and_a_second_call_reuses_it(tmp_path):
    for split, n in (("train", 8), ("val", 4)):
        image_tree(str(tmp_path / split), n, seed=n)
    cfg = folder_cfg(tmp_path, "train.num_workers=0", "train.loader_workers=0", "finetune.epochs=3",
                     "finetune.blr=2.0e-3", "finetune.crop_scale=[0.3, 1.0]")
    data = labelled_splits(cfg, None, None)
    torch.manual_seed(0)
    kwargs = vit_kwargs("vit_pico_patch4_32", in_chans=1)  # configs/tiny.yaml's new model
    checkpoint = tmp_path / "encoder_adapters.pth"
    torch.save(export_with_adapters(TECModel(kwargs, 48, 3, 64, topk=4, decoder_dim=32, decoder_heads=4)), checkpoint)

    job = finetune_job(cfg, str(checkpoint), "model", "peft_prompt", data, epochs=1, batch_size=8)
    assert job.timm_kwargs == kwargs and job.num_classes == 3 and job.preprocess["mean"] == [0.2860405969887955]
    assert job.num_workers == 0 and job.mixup == 0 and job.layer_decay is None  # resources, the preset
    assert (job.epochs, job.blr) == (1, 2.0e-3)  # the call's override over the config's finetune section
    assert job.crop_scale == (0.3, 1.0)  # the config's finetune section over the preset
    assert job.run_url == str(tmp_path / "out" / "finetune" / job.run_name) and job.run_name.startswith(
        "model-peft_prompt-")

    results = finetune_cli(cfg, str(checkpoint), "model", "peft_prompt", data, epochs=1, batch_size=8)
    assert results["complete"] and results["run_dir"] == job.run_url and results["n_train"] == 24
    again = finetune_cli(cfg, str(checkpoint), "model", "peft_prompt", data, epochs=1, batch_size=8)
    assert again["start_epoch"] == 1 and again["history"] == results["history"]  # the same run, nothing retrained
    with pytest.raises(ValueError, match="which: must be one of"):
        finetune_job(cfg, str(checkpoint), "teacher", "finetune", data)
