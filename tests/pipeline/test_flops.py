"""Analytic MACs (pipeline.flops) against torch's FlopCounterMode on real models (FLOPs = 2×MACs)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from timm.models.vision_transformer import Attention
from torch.utils.flop_counter import FlopCounterMode

from pipeline.flops import base_macs_per_view, format_macs, tec_step_macs
from tec_model import TECModel, build_vit, vit_kwargs
from tec_model.flops import vit_forward_macs


def unfuse(model: torch.nn.Module) -> torch.nn.Module:
    """Non-fused attention everywhere (FlopCounterMode counts nothing for CPU fused attention)."""
    found = 0
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused_attn = False
            found += 1
    assert found, "no timm Attention module found"
    return model


def counted_macs(fn: Any) -> int:
    """MACs FlopCounterMode sees while ``fn`` runs (its FLOPs / 2)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    flops = counter.get_total_flops()
    assert flops % 2 == 0
    return flops // 2


# (new arch, base arch, TECModel switches)
CONFIGS: list[tuple[str, str, dict[str, Any]]] = [
    ("vit_pico_patch4_32", "vit_nano_patch4_32", {"adapters": "both", "attention_target": True, "topk": 4}),
    ("vit_pico_patch4_32", "vit_nano_patch4_32", {"adapters": "none", "attention_target": False}),
    ("vit_nano_patch4_32", "vit_pico_patch4_32", {"adapters": "input", "attention_target": True, "topk": 7,
                                                  "mask_ratio": 0.5, "att_proj_dim": 24}),
    ("vit_micro_patch4_32", "vit_nano_patch4_32", {"adapters": "encoder", "attention_target": True, "topk": 2,
                                                   "decoder_dim": 96, "decoder_depth": 1, "decoder_heads": 6}),
    ("vit_micro_patch4_32", "vit_micro_patch4_32", {"adapters": "both", "attention_target": False,
                                                    "mask_ratio": 0.9}),
]
DECODER = {"decoder_dim": 64, "decoder_depth": 2, "decoder_heads": 4}


def build(new_arch: str, base_arch: str, switches: dict[str, Any]) -> tuple[TECModel, dict[str, Any], dict]:
    base = vit_kwargs(base_arch)
    kw = {**DECODER, **switches}
    torch.manual_seed(0)
    model = TECModel(vit_kwargs(new_arch), base["embed_dim"], base["num_heads"], 64, **kw)
    return unfuse(model), base, kw


def tec_inputs(base: dict[str, Any], batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "imgs": torch.randn(batch, 3, 32, 32, generator=g),
        "features": torch.randn(batch, 64, base["embed_dim"], generator=g),
        "attn_logits": torch.randn(batch, 9, base["num_heads"], 64, generator=g),
        "topk_index": torch.stack([torch.randperm(64, generator=g)[:8] for _ in range(batch)]),
    }


@pytest.mark.parametrize(("new_arch", "base_arch", "switches"), CONFIGS)
def test_forward_macs_equal_flop_counter(new_arch: str, base_arch: str, switches: dict[str, Any]) -> None:
    model, base, kw = build(new_arch, base_arch, switches)
    analytic = tec_step_macs(vit_kwargs(new_arch), base["embed_dim"], base["num_heads"], 64, **kw)
    parts = sum(v for k, v in analytic.items() if k.endswith("_macs") and k != "forward_macs")
    assert analytic["forward_macs"] == parts
    assert analytic["train_macs_per_sample"] == 3 * analytic["forward_macs"]
    for batch in (1, 3):
        inputs = tec_inputs(base, batch)
        with torch.no_grad():
            measured = counted_macs(lambda inputs=inputs: model(**inputs))
        # the input adapter runs once per batch (on the shared cls token), everything else once per sample
        once = analytic["input_adapter_macs"]
        assert measured == batch * (analytic["forward_macs"] - once) + once, (batch, measured, analytic)


def test_parts_switch_with_the_model() -> None:
    base = vit_kwargs("vit_nano_patch4_32")
    args = (vit_kwargs("vit_pico_patch4_32"), base["embed_dim"], base["num_heads"], 64)
    full = tec_step_macs(*args, adapters="both", attention_target=True, topk=4, **DECODER)
    bare = tec_step_macs(*args, adapters="none", attention_target=False, **DECODER)
    assert bare["input_adapter_macs"] == bare["encoder_adapters_macs"] == bare["attention_head_macs"] == 0
    assert full["input_adapter_macs"] == 8 * 48 * 48
    assert full["decoder_blocks_macs"] == 2 * bare["decoder_blocks_macs"]  # shared blocks run once per path
    assert full["visible_tokens"] == 16 and "FLOPs = 2×MACs" in full["unit"]


def test_train_step_is_about_three_forwards() -> None:
    """forward + backward measured by FlopCounterMode vs the 3× rule: it over-counts by about the patch
    embedding's input gradient (images need none), nothing else."""
    model, base, kw = build(*CONFIGS[0])
    analytic = tec_step_macs(vit_kwargs(CONFIGS[0][0]), base["embed_dim"], base["num_heads"], 64, **kw)
    inputs = tec_inputs(base, 2)
    measured = counted_macs(lambda: model(**inputs)[0].backward())
    once = analytic["input_adapter_macs"]
    expected = 3 * (2 * (analytic["forward_macs"] - once) + once) - 2 * analytic["patch_embed_macs"]
    assert measured == expected


def test_base_macs_per_view_equal_flop_counter() -> None:
    for arch in ("vit_pico_patch4_32", "vit_nano_patch4_32", "vit_mini_patch4_32"):
        kw = vit_kwargs(arch)
        vit = unfuse(build_vit(kw)).eval()
        with torch.no_grad():
            measured = counted_macs(lambda vit=vit: vit.forward_features(torch.randn(2, 3, 32, 32)))
        assert measured == 2 * base_macs_per_view(kw) == 2 * vit_forward_macs(kw)


def test_vit_b_is_the_papers_17_6_gmacs() -> None:
    macs = base_macs_per_view(vit_kwargs("vit_base_patch16_224"))
    assert round(macs / 1e9, 1) == 17.6
    assert format_macs(macs) == "17.56 GMAC (35.13 GFLOP)"


def test_rejects_mismatched_patches() -> None:
    with pytest.raises(ValueError, match="patches"):
        tec_step_macs(vit_kwargs("vit_pico_patch4_32"), 96, 6, 49)
