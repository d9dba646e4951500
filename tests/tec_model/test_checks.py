"""The model-side rules: ViT sizes (``archs.check_vit_kwargs``), TEC arguments (``tec.check_args``), the attention
head's split; one statement of each, which TECModel, the MAC counter and the config all apply."""

from __future__ import annotations

import pytest

from pipeline.flops import tec_step_macs
from tec_model import TECModel, vit_kwargs
from tec_model.archs import check_vit_kwargs
from tec_model.layers import AttentionHead
from tec_model.tec import check_args

PICO = vit_kwargs("vit_pico_patch4_32")  # 48 wide, 3 heads, L = 64


def test_vit_sizes_name_the_kwargs_they_read() -> None:
    assert check_vit_kwargs(PICO) == []
    assert check_vit_kwargs({**PICO, "img_size": 30}) == [
        (("patch_size", "img_size"), "img_size 30 is not a multiple of patch_size 4")]
    assert check_vit_kwargs({**PICO, "embed_dim": 50}) == [
        (("num_heads", "embed_dim"), "embed_dim 50 is not divisible by num_heads 3")]
    assert check_vit_kwargs({**PICO, "depth": "two", "img_size": 0}) == [
        (("img_size",), "expected a positive int, got int 0"), (("depth",), "expected a positive int, got str 'two'")]
    assert check_vit_kwargs({"patch_size": 3}) == []  # absent kwargs are not checked


def test_tec_arguments_name_the_arguments_they_read() -> None:
    assert check_args(PICO, 64) == []
    problems = dict(check_args({**PICO, "patch_size": 8, "embed_dim": 30, "num_heads": 3, "reg_tokens": 4}, 64,
                               adapters="x", feature_norm="y", topk=0, att_tau=0, mask_ratio=1.0, decoder_dim=66,
                               decoder_heads=4))
    assert set(problems) == {("patch_size", "img_size"), ("embed_dim",), ("decoder_dim", "decoder_heads"),
                             ("reg_tokens", "class_token", "no_embed_class"), ("adapters",), ("feature_norm",),
                             ("topk",), ("att_tau",), ("mask_ratio",)}
    assert problems[("topk",)] == "must be in [1, 16], got 0"
    assert problems[("mask_ratio",)] == "must be in [0, 1), got 1.0"
    assert check_args(PICO, 64, mask_ratio=0.999) == [(("mask_ratio",), "0.999 leaves no visible patch out of 64")]


def test_unknown_sizes_skip_only_the_rules_that_need_them() -> None:
    assert check_args(None, None, topk=10_000, mask_ratio=0.999) == []
    assert [n for n, _ in check_args(None, None, att_tau=-1, decoder_dim=66, decoder_heads=4)] == \
        [("decoder_dim", "decoder_heads"), ("att_tau",)]
    assert check_args(None, 64, topk=65) == [(("topk",), "must be in [1, 64], got 65")]


def test_tec_model_raises_every_problem_by_argument_name() -> None:
    with pytest.raises(ValueError) as err:
        TECModel(PICO, 96, 6, 64, att_tau=0, decoder_dim=66, decoder_heads=4)
    assert str(err.value) == ("incompatible TEC model settings: decoder_dim: 66 must be divisible by 4 and by "
                              "decoder_heads 4; att_tau: must be > 0, got 0")


def test_the_mac_counter_refuses_what_the_model_refuses() -> None:
    with pytest.raises(ValueError, match="mask_ratio: must be in"):
        tec_step_macs(PICO, 96, 6, 64, mask_ratio=1.0, decoder_dim=64, decoder_heads=4)
    with pytest.raises(ValueError, match="must be a plain ViT"):
        tec_step_macs({**PICO, "reg_tokens": 4}, 96, 6, 64, decoder_dim=64, decoder_heads=4)
    with pytest.raises(ValueError, match="att_proj_dim 50 is not divisible by the base model's 6 heads"):
        tec_step_macs(PICO, 96, 6, 64, decoder_dim=64, decoder_heads=4, att_proj_dim=50)
    assert AttentionHead.check_args(96, 6) is None
    tec_step_macs(PICO, 96, 6, 64, decoder_dim=64, decoder_heads=4, attention_target=False, att_proj_dim=50)
