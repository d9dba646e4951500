"""Export folds the input adapter and loads into a plain timm ViT, exactly."""

import pytest
import timm
import torch

from tec_model import TECModel, export_encoder, vit_kwargs
from tests.fixtures.models import make_tec


@pytest.mark.parametrize("adapters", ["both", "encoder"])
def test_export_is_exact(tiny_base, tiny_images, adapters):
    model = make_tec(tiny_base, adapters=adapters)
    with torch.no_grad():  # make the encoder non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.eval()
    timm_vit = timm.create_model("vit_pico_patch4_32", num_classes=0)
    timm_vit.load_state_dict(export_encoder(model), strict=True)
    timm_vit.eval()
    torch.testing.assert_close(timm_vit.forward_features(tiny_images), model.forward_features(tiny_images),
                               rtol=0, atol=1e-6)
    if adapters == "both":
        assert not torch.allclose(timm_vit.cls_token, model.encoder.cls_token)


def test_export_loads_into_timm_paper_architecture():
    kwargs = vit_kwargs("vit_small_patch16_224")
    model = TECModel(kwargs, 768, 12, 196, topk=15, decoder_dim=128, decoder_heads=4)
    timm_vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    timm_vit.load_state_dict(export_encoder(model), strict=True)
    timm_vit.eval()
    model.eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(timm_vit.forward_features(x), model.forward_features(x), rtol=0, atol=1e-5)
