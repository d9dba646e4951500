"""Pixel-MAE pre-training through the train stage: the job, its targets, the loss falling, the MAE checkpoint."""

from __future__ import annotations

import io

import pytest
import torch

from stages.train import TargetProvider, optimizer_step
from stages.train.job import TrainJob
from tec_model import BaseModel, export_mae, patchify, read_checkpoint, unwrap_state_dict, vit_kwargs

ARCH = vit_kwargs("vit_pico_patch4_32", in_chans=1)


def pixel_job(**overrides) -> TrainJob:
    fields = {"run_name": "mae", "storage_path": "/tmp/unused", "timm_kwargs": ARCH, "base_timm_kwargs": ARCH,
              "preprocess": {"output_size": 32}, "target_source": "pixel", "manifest_url": "/tmp/m.parquet",
              "adapters": "none", "feature_norm": "channel", "attention_target": False, "topk": 1, "k_max": 1,
              "decoder_dim": 32, "decoder_heads": 4, "global_batch": 16, "num_workers": 1}
    fields.update(overrides)
    return TrainJob(**fields)


def test_pixel_job_predicts_patch_pixels():
    model = pixel_job().build_model()
    assert model.feature_head.out_features == 4 * 4 * 1
    assert model.attention_head is None and model.input_adapter is None and model.encoder_adapter is None


@pytest.mark.parametrize(("change", "message"), [
    ({"manifest_url": None}, "pixel mode needs manifest_url"),
    ({"attention_target": True}, "pixel mode has no attention target"),
])
def test_pixel_job_refuses_what_it_cannot_do(change, message):
    with pytest.raises(ValueError, match=message):
        pixel_job(**change)


def test_pixel_targets_are_the_views_own_patches():
    pixels = torch.randn(2, 1, 32, 32)
    features, attn, topk = TargetProvider(pixel_job(), torch.device("cpu")).targets({}, pixels)
    assert attn is None and topk is None
    assert features.shape == (2, 64, 16)
    torch.testing.assert_close(features[0, 9], pixels[0, 0, 4:8, 4:8].reshape(-1))  # row 1, column 1


def test_pixel_mae_loss_falls_over_a_few_steps():
    job = pixel_job()
    torch.manual_seed(0)
    model = job.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    source = TargetProvider(job, torch.device("cpu"))
    # smooth images (low-frequency structure an autoencoder can learn), a fixed batch
    grid = torch.linspace(0, 6.28, 32)
    phase = torch.rand(16, 1, 1, 1, generator=torch.Generator().manual_seed(3)) * 6.28
    pixels = torch.sin(grid.view(1, 1, 32, 1) + phase) * torch.cos(grid.view(1, 1, 1, 32) * 0.5 + phase)
    losses = [optimizer_step(job, model, opt, scaler, source, {"pixels": pixels}, torch.device("cpu"), "float32",
                             step=s, rank=0, world=1)["loss"] for s in range(40)]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_mae_checkpoint_loads_as_a_base_model_and_keeps_the_decoder():
    torch.manual_seed(0)
    model = pixel_job().build_model()
    buf = io.BytesIO()
    torch.save({"model": export_mae(model)}, buf)
    sd, fmt = unwrap_state_dict(read_checkpoint(buf.getvalue()))
    assert fmt == "mae"
    assert any(k.startswith("decoder.blocks.") for k in sd) and "decoder_pred.weight" in sd
    base = BaseModel.from_checkpoint(buf.getvalue(), ARCH, last_layers=2, k_max=4)
    images = torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(base.vit.forward_features(images), model.forward_features(images))


def test_patchify_matches_the_patch_embedding_layout():
    from timm.layers import PatchEmbed

    images = torch.randn(2, 3, 8, 8)
    embed = PatchEmbed(8, 4, 3, 5)
    weight = embed.proj.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (out, p, q, c) flattened
    torch.testing.assert_close(patchify(images, 4) @ weight.T + embed.proj.bias, embed(images))
    with pytest.raises(ValueError, match="not divisible by patch_size 3"):
        patchify(images, 3)
