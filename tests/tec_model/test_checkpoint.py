"""Every supported checkpoint format round-trips into the base model; unsafe or wrong ones are refused."""

import io
import itertools
import logging
import os

import pytest
import torch

from tec_model import BaseModel, CheckpointError, build_vit, export_encoder, vit_kwargs
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


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_wrapped_tec_training_state_dict_unwraps_as_the_bare_one(prefix, tiny_base, tiny_images):
    """A TEC model saved from DDP (``module.``), torch.compile (``_orig_mod.``) or both is folded like the bare
    model: the input adapter goes into the class token, nothing is silently dropped."""
    from tec_model.checkpoint import unwrap_state_dict

    tec = make_tec(make_base(seed=1), arch=BASE_ARCH)
    with torch.no_grad():
        tec.input_adapter.fc2.bias.add_(0.5)  # a non-trivial adapter: folding it changes the class token
    bare = tec.state_dict()
    expected, fmt = unwrap_state_dict({"model": bare})
    assert fmt == "tec"
    got, got_fmt = unwrap_state_dict({"model": {f"{prefix}{k}": v for k, v in bare.items()}})
    assert got_fmt == "tec" and got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert not torch.equal(got["cls_token"], bare["encoder.cls_token"])  # folded, not the trained token
    wrapped = BaseModel.from_checkpoint(saved({"model": {f"{prefix}{k}": v for k, v in bare.items()}}),
                                        tiny_base.timm_kwargs, k_max=8)
    from_export = BaseModel.from_checkpoint(saved(export_encoder(tec)), tiny_base.timm_kwargs, k_max=8)
    assert torch.equal(wrapped(tiny_images).features, from_export(tiny_images).features)


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


# ------------------------------------------------------------------------------------------------- MoCo v3
def moco_mlp(prefix: str, dims: list[int]) -> dict[str, torch.Tensor]:
    """MoCo v3's ``_build_mlp``: Linear(no bias) → BN → ReLU per hidden layer, the last BN without affine."""
    out, idx = {}, 0
    for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
        out[f"{prefix}.{idx}.weight"] = torch.randn(d_out, d_in)
        bn = f"{prefix}.{idx + 1}"
        if i < len(dims) - 2:
            out |= {f"{bn}.weight": torch.ones(d_out), f"{bn}.bias": torch.zeros(d_out)}
        out |= {f"{bn}.running_mean": torch.zeros(d_out), f"{bn}.running_var": torch.ones(d_out),
                f"{bn}.num_batches_tracked": torch.tensor(7)}
        idx += 3
    return out


def moco_v3_checkpoint(encoder_sd: dict[str, torch.Tensor], dim: int = 8, mlp_dim: int = 16) -> dict:
    """What moco-v3's main_moco.py saves: the DDP-wrapped MoCo model's state dict plus optimiser and scaler."""
    width = encoder_sd["cls_token"].shape[-1]
    base = {**encoder_sd, **moco_mlp("head", [width, mlp_dim, mlp_dim, dim])}
    momentum = {k: v + 0.5 if v.is_floating_point() else v for k, v in base.items()}
    state = {**{f"module.base_encoder.{k}": v for k, v in base.items()},
             **{f"module.momentum_encoder.{k}": v for k, v in momentum.items()},
             **{f"module.{k}": v for k, v in moco_mlp("predictor", [dim, mlp_dim, dim]).items()}}
    return {"epoch": 300, "arch": "vit_base", "state_dict": state,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1.5e-4, "weight_decay": 0.1, "params": [0, 1]}]},
            "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                       "_growth_tracker": 0}}


def test_moco_v3_base_encoder_is_loaded(tiny_images, caplog):
    source = make_base(seed=7)
    ckpt = moco_v3_checkpoint(source.vit.state_dict())
    siblings = sum(not k.startswith("module.base_encoder.") for k in ckpt["state_dict"])
    with caplog.at_level(logging.INFO, logger="tec_model"):
        loaded = BaseModel.from_checkpoint(saved(ckpt), source.timm_kwargs, k_max=8)
    a, b = source(tiny_images), loaded(tiny_images)
    assert torch.equal(a.features, b.features) and torch.equal(a.attn_logits, b.attn_logits)
    assert "moco v3 format" in caplog.text and "head.0.weight" in caplog.text  # projection head ignored
    assert f"ignoring {siblings} momentum_encoder/predictor tensors" in caplog.text


def test_moco_v3_of_another_architecture_is_named():
    ckpt = saved(moco_v3_checkpoint(make_base("vit_pico_patch4_32").vit.state_dict()))
    with pytest.raises(CheckpointError, match=r"does not fit the architecture — shape mismatches: blocks"):
        BaseModel.from_checkpoint(ckpt, make_base().timm_kwargs)
    stray = moco_v3_checkpoint(make_base().vit.state_dict())
    stray["state_dict"]["module.queue"] = torch.zeros(4, 8)  # not MoCo v3's: stays, and is named
    with pytest.raises(CheckpointError, match=r"weights the architecture lacks \(1\): queue"):
        BaseModel.from_checkpoint(saved(stray), make_base().timm_kwargs)


# -------------------------------------------------------------------------------------------------- DINOv2
DINOV2_ARCH = "vit_pico_patch14_reg4_dinov2"


def dinov2_like(seed: int = 3, **overrides) -> BaseModel:
    """The tiny DINOv2-like base with non-trivial registers, LayerScale and position embedding."""
    model = make_base(DINOV2_ARCH, k_max=5, seed=seed, **overrides)
    with torch.no_grad():
        for name, p in model.vit.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(1.0, 0.5)
            elif name in ("reg_token", "pos_embed", "cls_token"):
                p.normal_(0.0, 1.0)
    return model


def official_dinov2(timm_sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """The timm weights in DINOv2's own layout: a 2-D ``mask_token`` and, with registers, ``register_tokens`` and
    a cls row in pos_embed (here random, taken out of cls_token: timm folds it back in). Without registers DINOv2's
    cls_token and pos_embed are timm's."""
    width = timm_sd["cls_token"].shape[-1]
    out = {k: v for k, v in timm_sd.items() if k != "reg_token"}
    out["mask_token"] = torch.zeros(1, width)
    if "reg_token" in timm_sd:
        pos_cls = torch.randn(1, 1, width, generator=torch.Generator().manual_seed(seed))
        out["register_tokens"] = timm_sd["reg_token"]
        out["cls_token"] = timm_sd["cls_token"] - pos_cls
        out["pos_embed"] = torch.cat([pos_cls, timm_sd["pos_embed"]], dim=1)
    return out


def dinov2_images() -> torch.Tensor:
    return torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("layout", ["hub", "teacher", "no_registers"])
def test_dinov2_official_layout_round_trips(layout, caplog):
    overrides = {"reg_tokens": 0, "no_embed_class": False} if layout == "no_registers" else {}
    source = dinov2_like(**overrides)
    sd = official_dinov2(source.vit.state_dict())
    if layout == "teacher":
        heads = {"dino_head.mlp.0.weight": torch.zeros(8, 48), "ibot_head.mlp.0.weight": torch.zeros(8, 48)}
        sd = {"teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **heads}, "iteration": 10}
    with caplog.at_level(logging.INFO, logger="tec_model"):
        loaded = BaseModel.from_checkpoint(saved(sd), source.timm_kwargs, k_max=5)
    assert "dinov2" in caplog.text
    for name, p in source.vit.state_dict().items():
        torch.testing.assert_close(loaded.vit.state_dict()[name], p, rtol=0, atol=1e-6, msg=name)
    x = dinov2_images()
    a, b = source(x), loaded(x)
    torch.testing.assert_close(b.features, a.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.attn_logits, a.attn_logits, rtol=1e-5, atol=1e-4)


def test_dinov2_of_another_architecture_is_named():
    with_regs = saved(official_dinov2(dinov2_like().vit.state_dict()))
    plain = dinov2_like(reg_tokens=0, no_embed_class=False)
    with pytest.raises(CheckpointError, match=r"DINOv2 ViT with register tokens \(register_tokens \(1, 4, 48\)\) "
                                              r"but the architecture has 0 register tokens"):
        BaseModel.from_checkpoint(with_regs, plain.timm_kwargs)
    with pytest.raises(CheckpointError, match=r"DINOv2 ViT without register tokens but the architecture has 4"):
        BaseModel.from_checkpoint(saved(official_dinov2(plain.vit.state_dict())), dinov2_like().timm_kwargs)
    two_regs = dinov2_like(reg_tokens=2)
    with pytest.raises(CheckpointError, match=r"shape mismatches: reg_token: checkpoint \(1, 4, 48\) vs model "
                                              r"\(1, 2, 48\)"):
        BaseModel.from_checkpoint(with_regs, two_regs.timm_kwargs)
    patch7 = dinov2_like(patch_size=7, img_size=28)  # same 4×4 grid, another patch size: never resampled
    with pytest.raises(CheckpointError, match=r"shape mismatches: patch_embed\.proj\.weight: checkpoint "
                                              r"\(48, 3, 14, 14\) vs model \(48, 3, 7, 7\)"):
        BaseModel.from_checkpoint(with_regs, patch7.timm_kwargs)


def test_dinov2_position_embedding_is_resampled_to_another_grid(caplog):
    from timm.layers import resample_abs_pos_embed

    sd = official_dinov2(dinov2_like().vit.state_dict())
    smaller = dinov2_like(img_size=42)  # 3×3 patches instead of 4×4
    with caplog.at_level(logging.WARNING, logger="tec_model.checkpoint"):
        loaded = BaseModel.from_checkpoint(saved(sd), smaller.timm_kwargs, k_max=5)
    assert "resampled by timm from 16 to 9 patch positions" in caplog.text
    expected = resample_abs_pos_embed(sd["pos_embed"][:, 1:], new_size=(3, 3), num_prefix_tokens=0)
    torch.testing.assert_close(loaded.vit.pos_embed, expected)
    assert loaded(torch.randn(2, 3, 42, 42)).features.shape == (2, 9, 48)


def test_mae_training_checkpoint_with_its_argparse_args_loads(tmp_path):
    """MAE's ``checkpoint-*.pth`` holds ``args`` (an argparse Namespace) beside model/optimizer/epoch/scaler."""
    import argparse

    from tec_model.checkpoint import read_checkpoint, unwrap_state_dict

    vit = build_vit(vit_kwargs("vit_pico_patch4_32"))
    path = tmp_path / "checkpoint-99.pth"
    torch.save({"model": vit.state_dict(), "optimizer": {"state": {}}, "epoch": 99, "scaler": {},
                "args": argparse.Namespace(model="mae_vit_pico", blr=1.5e-4, norm_pix_loss=True)}, path)
    obj = read_checkpoint(path)
    assert obj["args"].blr == 1.5e-4
    state, fmt = unwrap_state_dict(obj)
    assert fmt == "mae" and state.keys() == vit.state_dict().keys()
