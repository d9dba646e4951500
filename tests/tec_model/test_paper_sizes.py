"""The ImageNet configs build the official TEC sizes, counted from the architecture formulas (on the meta device).

The official TEC code (sail-sg/TEC, models/models_tec_vit.py) builds ViT-B with a 512-wide decoder and ViT-L with a
768-wide one, both 2 blocks of 16 heads; the encoder adapters' MLPs are 4·D_dec wide; its decoder LayerNorms use
eps 1e-6, its encoder adapters torch's default.
"""

from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from pipeline.config import load_config, to_train_job
from tec_model import TECModel, build_vit, vit_kwargs

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# timm's encoders with num_classes=0: the usual 85.8M / 303.3M.
TIMM_ENCODER = {"vit_base_patch16_224": 85_798_656, "vit_large_patch16_224": 303_301_632}
# config → (encoder arch, D_dec, decoder heads); official: mae_vit_base_patch16 / mae_vit_large_patch16.
OFFICIAL = {
    "imagenet_vitb_mae.yaml": ("vit_base_patch16_224", 512, 16),
    "imagenet_vitb_ibot.yaml": ("vit_base_patch16_224", 512, 16),
    "imagenet_vitl_mae.yaml": ("vit_large_patch16_224", 768, 16),
}


def block(c: int, mlp_ratio: int = 4) -> int:
    """A pre-norm transformer block: two LayerNorms, qkv and proj with biases, a two-layer MLP."""
    hidden = mlp_ratio * c
    return 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (c * hidden + hidden) + (hidden * c + c)


def vit_encoder(c: int, depth: int, patch: int, length: int) -> int:
    """Patch embedding, cls token, position embedding (cls row included), blocks, final norm."""
    return (3 * patch * patch * c + c) + c + (1 + length) * c + depth * block(c) + 2 * c


def tec_parts(c: int, depth: int, patch: int, length: int, c_base: int, d_dec: int, dec_depth: int) -> dict:
    """Parameters of each part of a TEC model with input adapter, encoder adapters and both targets."""
    groups, hidden = depth // 3, 4 * d_dec
    per_group = (3 * c * c + c) + (c * hidden + hidden) + (hidden * c + c)  # FC(3C → C), MLP C → 4·D_dec → C
    per_path = (c * d_dec + d_dec) + d_dec + 2 * d_dec  # embedding FC, mask token, final norm
    return {
        "encoder": vit_encoder(c, depth, patch, length),
        "input_adapter": (c * 4 * c + 4 * c) + (4 * c * c + c),
        "encoder_adapter": 2 * depth * c + groups * per_group + 2 * c,
        "decoder": 2 * per_path + dec_depth * block(d_dec),
        "feature_head": d_dec * c_base + c_base,
        "attention_head": d_dec * 2 * c_base + 2 * c_base,  # Q and K projections, P = C_base
    }


def build(name: str) -> tuple[object, TECModel]:
    job = to_train_job(load_config(CONFIGS / name), "mem://cache", "run", "mem://runs")
    with torch.device("meta"):
        return job, job.build_model()


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_config_builds_the_official_sizes(name):
    arch, d_dec, heads = OFFICIAL[name]
    job, model = build(name)
    kw, base = job.timm_kwargs, job.base_timm_kwargs
    assert (job.decoder_dim, job.decoder_depth, job.decoder_heads) == (d_dec, 2, heads)
    assert model.decoder.blocks[0].attn.num_heads == heads
    assert model.encoder_adapter.mlp[0].fc1.out_features == 4 * d_dec  # ViT-L: 3072

    length = (kw["img_size"] // kw["patch_size"]) ** 2
    parts = tec_parts(kw["embed_dim"], kw["depth"], kw["patch_size"], length, base["embed_dim"], d_dec, 2)
    assert {p: count(getattr(model, p)) for p in parts} == parts
    assert count(model) == sum(parts.values())
    assert parts["encoder"] == TIMM_ENCODER[arch]
    with torch.device("meta"):
        assert count(timm.create_model(arch, num_classes=0)) == TIMM_ENCODER[arch]
    if arch == "vit_base_patch16_224":
        # The paper's Table 8 counts TEC ViT-B at 118.6M, with the official decoder's fixed sin-cos position
        # embedding as a (frozen) parameter; here it is a buffer.
        assert round((count(model) + (1 + length) * d_dec) / 1e6, 1) == 118.6


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_layer_norm_eps_are_the_official_ones(name):
    _, model = build(name)
    decoder = [m for m in model.decoder.modules() if isinstance(m, nn.LayerNorm)]
    adapter = [m for m in model.encoder_adapter.modules() if isinstance(m, nn.LayerNorm)]
    encoder = [m for m in model.encoder.modules() if isinstance(m, nn.LayerNorm)]
    assert len(decoder) == 2 * 2 + 2 and {m.eps for m in decoder} == {1e-6}  # 2 per block, 1 per path
    assert len(adapter) == 2 and {m.eps for m in adapter} == {1e-5}
    assert {m.eps for m in encoder} == {1e-6}


@pytest.mark.parametrize("arch", ["vit_small_patch14_dinov2", "vit_base_patch14_dinov2",
                                  "vit_small_patch14_reg4_dinov2", "vit_base_patch14_reg4_dinov2"])
def test_dinov2_archs_are_timms(arch):
    """The named DINOv2 sizes build exactly timm's models: same weights and shapes, prefix tokens, 518 input."""
    with torch.device("meta"):
        ours, theirs = build_vit(vit_kwargs(arch)), timm.create_model(arch, num_classes=0)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    for attr in ("num_prefix_tokens", "num_reg_tokens", "no_embed_class", "dynamic_img_size", "global_pool"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert ours.patch_embed.img_size == theirs.patch_embed.img_size == (518, 518)
    assert type(ours.blocks[0].ls1) is type(theirs.blocks[0].ls1)
    assert (ours.num_reg_tokens, ours.no_embed_class) == ((4, True) if "reg4" in arch else (0, False))


def test_moco_v3_small_has_twelve_heads():
    with torch.device("meta"):
        moco, timm_small = build_vit(vit_kwargs("vit_small_patch16_224_mocov3")), build_vit(
            vit_kwargs("vit_small_patch16_224"))
    assert moco.blocks[0].attn.num_heads == 12 and timm_small.blocks[0].attn.num_heads == 6
    assert {k: v.shape for k, v in moco.state_dict().items()} == {
        k: v.shape for k, v in timm_small.state_dict().items()}
