"""Analytic MACs against the paper's number and torch's FLOP counter (non-fused attention)."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tec_model import build_vit, vit_kwargs
from tec_model.flops import vit_forward_macs


def test_vit_b16_matches_paper():
    assert vit_forward_macs(vit_kwargs("vit_base_patch16_224")) / 1e9 == pytest.approx(17.6, abs=0.05)


@pytest.mark.parametrize("arch", ["vit_pico_patch4_32", "vit_micro_patch4_32"])
def test_matches_flop_counter_with_unfused_attention(arch):
    vit = build_vit(vit_kwargs(arch)).eval()
    for block in vit.blocks:
        block.attn.fused_attn = False  # FlopCounterMode counts nothing for CPU fused attention
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        vit.forward_features(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == 2 * vit_forward_macs(vit_kwargs(arch))
