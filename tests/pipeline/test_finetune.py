"""pipeline.finetune: a config's fine-tuning job (architecture, preprocessing, resources, run directory)."""

from __future__ import annotations

import pytest
import torch

from pipeline.finetune import finetune_cli, finetune_job
from pipeline.labelled import labelled_splits
from stages.uri_policy import UriPolicy
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
    limited = folder_cfg(tmp_path, "data.max_image_pixels=4096", "data.allowed_schemes=[file, s3]")
    policy = finetune_job(limited, str(checkpoint), "model", "peft_prompt", data).policy()
    assert policy == UriPolicy.of(limited.data) != UriPolicy()  # read under the data section's input policy
    assert job.run_url == str(tmp_path / "out" / "finetune" / job.run_name) and job.run_name.startswith(
        "model-peft_prompt-")

    results = finetune_cli(cfg, str(checkpoint), "model", "peft_prompt", data, epochs=1, batch_size=8)
    assert results["complete"] and results["run_dir"] == job.run_url and results["n_train"] == 24
    again = finetune_cli(cfg, str(checkpoint), "model", "peft_prompt", data, epochs=1, batch_size=8)
    assert again["start_epoch"] == 1 and again["history"] == results["history"]  # the same run, nothing retrained
    with pytest.raises(ValueError, match="which: must be one of"):
        finetune_job(cfg, str(checkpoint), "teacher", "finetune", data)


def test_the_configs_base_checkpoint_fine_tuned_as_the_base_is_read_at_its_forced_entry(tmp_path):
    """base.checkpoint_key (a DINO-style file holding a teacher and a student) reaches fine-tuning ``--which base``
    of that file; any other file, and ``--which model``, are auto-detected."""
    from pipeline import config as C
    from stages.finetune.model import build_model
    from tec_model import build_vit

    for split, n in (("train", 8), ("val", 4)):
        image_tree(str(tmp_path / split), n, seed=n)
    torch.manual_seed(0)
    base_kw = C.base_timm_kwargs(folder_cfg(tmp_path))
    teacher, student = (build_vit(base_kw).state_dict() for _ in range(2))
    both = tmp_path / "dino.pth"
    torch.save({"teacher": teacher, "student": student}, both)
    cfg = folder_cfg(tmp_path, f"base.checkpoint={both}", "base.checkpoint_key=student")
    data = labelled_splits(cfg, None, None)
    job = finetune_job(cfg, str(both), "base", "finetune", data)
    assert job.checkpoint_key == "student"
    assert torch.equal(build_model(job).state_dict()["cls_token"], student["cls_token"])
    assert not torch.equal(teacher["cls_token"], student["cls_token"])
    other = tmp_path / "copy.pth"
    other.write_bytes(both.read_bytes())
    assert finetune_job(cfg, str(other), "base", "finetune", data).checkpoint_key is None  # auto: the teacher
    assert finetune_job(folder_cfg(tmp_path), str(both), "base", "finetune", data).checkpoint_key is None
    with pytest.raises(ValueError, match=r"checkpoint_key: peft_prompt reads a kept-adapter export"):
        job.replace(protocol="peft_prompt")
