"""The kept-adapter export and the PEFT model built from it (tec_model.export.export_with_adapters, tec_model.peft)."""

import pytest
import torch

from tec_model import CheckpointError, export_encoder, unwrap_state_dict, vit_kwargs
from tec_model.export import export_with_adapters
from tec_model.peft import build_peft_model, trainable_names
from tests.fixtures.models import make_tec

KW = vit_kwargs("vit_pico_patch4_32")


def _trained_tec(tiny_base, adapters="both"):
    """A tiny TEC model whose weights are not at their init (so a wrong fold or a dropped adapter shows)."""
    model = make_tec(tiny_base, adapters=adapters)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def test_kept_export_keeps_adapters_unfolded_and_folds_like_export_encoder(tiny_base):
    model = _trained_tec(tiny_base)
    kept = export_with_adapters(model)
    prefixes = {k.split(".")[0] for k in kept}
    assert prefixes == {"encoder", "input_adapter", "encoder_adapter"}
    assert torch.equal(kept["encoder.cls_token"], model.encoder.cls_token)  # not folded
    folded, fmt = unwrap_state_dict(kept)  # the checkpoint loaders read it as a TEC state dict
    assert fmt == "tec"
    reference = export_encoder(model)
    assert folded.keys() == reference.keys()
    assert all(torch.equal(folded[k], reference[k]) for k in reference)


def test_peft_model_computes_what_the_tec_encoder_computed(tiny_base, tiny_images):
    model = _trained_tec(tiny_base)
    kept = export_with_adapters(model)
    prompt = build_peft_model(KW, kept, "input", num_classes=5).eval()
    both = build_peft_model(KW, kept, "both", num_classes=5).eval()
    with torch.no_grad():
        torch.testing.assert_close(prompt.forward_features(tiny_images), model.forward_features(tiny_images),
                                   rtol=0, atol=1e-6)
        enc = model.encoder
        blocks = model._blocks(model._with_cls(enc.patch_embed(tiny_images) + enc.pos_embed[:, 1:]))
        torch.testing.assert_close(both.forward_features(tiny_images), model.encoder_adapter(blocks),
                                   rtol=0, atol=1e-6)
        assert both(tiny_images).shape == (len(tiny_images), 5)


@pytest.mark.parametrize(("tune", "expected"), [("input", {"input_adapter", "head"}),
                                                ("both", {"input_adapter", "encoder_adapter", "head"})])
def test_peft_trains_only_the_adapters_and_head(tiny_base, tiny_images, tune, expected):
    model = build_peft_model(KW, export_with_adapters(_trained_tec(tiny_base)), tune, num_classes=3)
    assert {n.split(".")[0] for n in trainable_names(model)} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.05)
    labels = torch.arange(len(tiny_images)) % 3
    model.train()
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(tiny_images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    for name, p in model.named_parameters():
        same = torch.equal(p, before[name])
        assert same == (name.split(".")[0] not in expected), name


def test_peft_refuses_missing_adapters_folded_exports_and_other_architectures(tiny_base):
    encoder_only = export_with_adapters(_trained_tec(tiny_base, adapters="encoder"))
    with pytest.raises(CheckpointError, match="no input_adapter"):
        build_peft_model(KW, encoder_only, "input", num_classes=3)
    input_only = export_with_adapters(_trained_tec(tiny_base, adapters="input"))
    with pytest.raises(CheckpointError, match="no encoder_adapter"):
        build_peft_model(KW, input_only, "both", num_classes=3)
    kept = export_with_adapters(_trained_tec(tiny_base))
    with pytest.raises(CheckpointError, match="not a kept-adapter export"):
        build_peft_model(KW, export_encoder(_trained_tec(tiny_base)), "input", num_classes=3)
    with pytest.raises(CheckpointError, match="does not fit the architecture"):
        build_peft_model(vit_kwargs("vit_nano_patch4_32"), kept, "both", num_classes=3)
