"""Every supported checkpoint format round-trips into the base model; unsafe or wrong ones are refused."""

import io
import logging
import os

import pytest
import torch

from tec_model import BaseModel, CheckpointError, export_encoder
from tests.fixtures.models import BASE_ARCH, make_base, make_tec


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def mae_decoder_extras():
    return {"mask_token": torch.zeros(1, 1, 32), "decoder_embed.weight": torch.zeros(32, 96),
            "decoder_pred.weight": torch.zeros(48, 32), "decoder_pos_embed": torch.zeros(1, 65, 32)}


def formats(sd):
    prefixed = {f"module.backbone.{k}": v for k, v in sd.items()}
    head = {"head.mlp.0.weight": torch.zeros(8, 96), "head.last_layer.weight_g": torch.zeros(8, 1)}
    return {
        "mae": {"model": {**sd, **mae_decoder_extras()}, "epoch": 99},
        "dino_teacher": {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **head},
                         "student": {k: torch.zeros_like(v) for k, v in prefixed.items()}, "epoch": 3},
        "ibot_student": {"student": {**prefixed, **{f"module.{k}": v for k, v in head.items()}}},
        "state_dict": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
        "timm": dict(sd),
    }


@pytest.mark.parametrize("fmt", ["mae", "dino_teacher", "ibot_student", "state_dict", "timm"])
def test_formats_round_trip(fmt, tiny_images, tmp_path):
    source = make_base(seed=5)
    path = tmp_path / f"{fmt}.pth"
    path.write_bytes(saved(formats(source.vit.state_dict())[fmt]))
    loaded = BaseModel.from_checkpoint(path, source.timm_kwargs, k_max=8)
    a, b = source(tiny_images), loaded(tiny_images)
    assert torch.equal(a.features, b.features) and torch.equal(a.attn_logits, b.attn_logits)


def test_tec_export_and_training_state_dict_load_as_base(tiny_base, tiny_images):
    """An earlier TEC model serves as the next base: its export and its raw training state dict agree."""
    tec = make_tec(make_base(seed=1), arch=BASE_ARCH)
    with torch.no_grad():
        tec.input_adapter.fc2.bias.add_(0.5)
    from_export = BaseModel.from_checkpoint(saved(export_encoder(tec)), tiny_base.timm_kwargs, k_max=8)
    from_training = BaseModel.from_checkpoint(saved({"model": tec.state_dict()}), tiny_base.timm_kwargs, k_max=8)
    tec.eval()
    torch.testing.assert_close(from_export.vit.forward_features(tiny_images), tec.forward_features(tiny_images))
    assert torch.equal(from_export(tiny_images).features, from_training(tiny_images).features)


def test_pickled_callable_is_refused(tiny_base):
    evil = saved({"model": tiny_base.vit.state_dict(), "hook": os.system})
    with pytest.raises(CheckpointError, match=r"refused to load .*pickled Python objects"):
        BaseModel.from_checkpoint(evil, tiny_base.timm_kwargs)


def test_missing_and_foreign_weights_are_named(tiny_base, caplog):
    sd = dict(tiny_base.vit.state_dict())
    del sd["blocks.1.attn.qkv.weight"]
    with pytest.raises(CheckpointError, match=r"missing encoder weights \(1\): blocks.1.attn.qkv.weight"):
        BaseModel.from_checkpoint(saved(sd), tiny_base.timm_kwargs)
    bigger = make_base("vit_nano_patch4_32", depth=4).vit.state_dict()
    with pytest.raises(CheckpointError, match=r"weights the architecture lacks .*blocks\.3"):
        BaseModel.from_checkpoint(saved(bigger), tiny_base.timm_kwargs)
    wider = make_base("vit_pico_patch4_32").vit.state_dict()
    with pytest.raises(CheckpointError, match="shape mismatches: blocks"):
        BaseModel.from_checkpoint(saved(wider), tiny_base.timm_kwargs)
    with caplog.at_level(logging.INFO, logger="tec_model.checkpoint"):
        BaseModel.from_checkpoint(saved(formats(tiny_base.vit.state_dict())["mae"]), tiny_base.timm_kwargs)
    assert "decoder_embed.weight" in caplog.text


def test_not_a_checkpoint(tmp_path):
    bad = tmp_path / "junk.pth"
    bad.write_bytes(b"definitely not a zip")
    with pytest.raises(CheckpointError, match=r"junk\.pth is not a readable torch checkpoint"):
        BaseModel.from_checkpoint(bad, make_base().timm_kwargs)
    with pytest.raises(CheckpointError, match="no state dict found"):
        BaseModel.from_checkpoint(saved({"epoch": 3}), make_base().timm_kwargs)
