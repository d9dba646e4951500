"""One optimiser step of the train loop, in-process (no Ray): accumulation and the non-finite-loss stop."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.train import NonFiniteLossError, TargetProvider, mask_generator, optimizer_step
from stages.train.job import TrainJob
from tec_model import vit_kwargs
from tests.fixtures.models import make_base, make_tec


def tiny_job(**overrides) -> TrainJob:
    base = vit_kwargs("vit_nano_patch4_32")
    fields = {"run_name": "unit", "storage_path": "/tmp/unused", "cache_url": "/tmp/unused",
              "timm_kwargs": vit_kwargs("vit_pico_patch4_32"), "base_timm_kwargs": base,
              "preprocess": {"output_size": 32}, "k_max": 8, "topk": 4, "global_batch": 8, "num_workers": 1}
    fields.update(overrides)
    return TrainJob(**fields)


def batch_for(images: torch.Tensor) -> dict:
    t = make_base()(images)
    return {"pixels": images, "features": t.features.half(), "attn_logits": t.attn_logits.half(),
            "topk_index": t.topk_index}


def run_step(model, job, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    source = TargetProvider(job, torch.device("cpu"))
    return optimizer_step(job, model, opt, scaler, source, batch, torch.device("cpu"), "float32", step=3, rank=0,
                          world=1)


def test_accumulation_averages_micro_batch_gradients(tiny_images):
    job = tiny_job(accum_steps=2)
    batch = batch_for(tiny_images)
    model = make_tec(make_base())
    reference = copy.deepcopy(model)
    parts = run_step(model, job, batch)

    # by hand: two micro-batches of 4 with the loop's own mask generators, gradients averaged, one AdamW step
    opt = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    losses = []
    for m, sl in enumerate((slice(0, 4), slice(4, 8))):
        loss, _, _ = reference(batch["pixels"][sl], batch["features"][sl].float(), batch["attn_logits"][sl].float(),
                               batch["topk_index"][sl], generator=mask_generator(job.seed, 3, 0, m))
        (loss / 2).backward()
        losses.append(loss.item())
    opt.step()
    assert parts["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7, msg=name)


def test_non_finite_loss_stops_with_a_clear_error(tiny_images):
    batch = batch_for(tiny_images)
    batch["features"][0, 0, 0] = float("nan")
    model = make_tec(make_base())
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NonFiniteLossError, match="non-finite loss nan at step 3"):
        run_step(model, tiny_job(), batch)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} was updated by a non-finite step"


def test_online_targets_come_from_the_forced_checkpoint_entry(tmp_path):
    """base.checkpoint_key reaches the online base: a file holding a teacher and a student gives the student's
    targets when the job forces it, the teacher's when it auto-detects."""
    from tec_model import build_vit

    kw = vit_kwargs("vit_nano_patch4_32")
    torch.manual_seed(0)
    teacher, student = (build_vit(kw).state_dict() for _ in range(2))
    path = tmp_path / "dino.pth"
    torch.save({"teacher": teacher, "student": student}, path)
    common = {"target_source": "online", "checkpoint_url": str(path), "manifest_url": "/tmp/unused.parquet"}
    forced = TargetProvider(tiny_job(**common, base_checkpoint_key="student"), torch.device("cpu")).base
    auto = TargetProvider(tiny_job(**common), torch.device("cpu")).base
    assert torch.equal(forced.vit.cls_token, student["cls_token"]) and torch.equal(auto.vit.cls_token,
                                                                                   teacher["cls_token"])
