"""The base model's targets against independent recomputations (docs/method.md#2-base-model-targets)."""

import pytest
import torch
import torch.nn.functional as F

from tec_model import BaseModel, compute_targets, vit_kwargs
from tests.fixtures.models import make_base


def manual_last_block_logits(model: BaseModel, x: torch.Tensor) -> torch.Tensor:
    """(N, H, T, T) pre-softmax logits of the last block, built from its own weights by hand."""
    captured = {}
    handle = model.vit.blocks[-1].register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))
    model.vit.forward_features(x)
    handle.remove()
    block = model.vit.blocks[-1]
    h = F.layer_norm(captured["x"], block.norm1.normalized_shape, block.norm1.weight, block.norm1.bias,
                     block.norm1.eps)
    n, t, _ = h.shape
    heads = block.attn.num_heads
    d = block.attn.head_dim
    q, k, _ = (h @ block.attn.qkv.weight.T + block.attn.qkv.bias).split(heads * d, dim=-1)
    q = block.attn.q_norm(q.reshape(n, t, heads, d).transpose(1, 2))
    k = block.attn.k_norm(k.reshape(n, t, heads, d).transpose(1, 2))
    return (q @ k.transpose(-2, -1)) / d**0.5


@pytest.mark.parametrize("overrides", [{}, {"qk_norm": True}, {"reg_tokens": 2}])
def test_targets_match_independent_recomputation(overrides, tiny_images):
    model = make_base(k_max=6, **overrides)
    if overrides.get("qk_norm"):  # make the norms non-trivial so skipping them would be caught
        for m in (model.vit.blocks[-1].attn.q_norm, model.vit.blocks[-1].attn.k_norm):
            torch.nn.init.normal_(m.weight, 1.0, 0.5)
    t = model(tiny_images)
    n_prefix = model.vit.num_prefix_tokens
    n, length = tiny_images.shape[0], model.num_patches

    assert t.features.shape == (n, length, model.embed_dim)
    assert t.attn_logits.shape == (n, 7, model.num_heads, length)
    assert t.topk_index.shape == (n, 6)

    # features: mean of the last two block outputs, patch tokens, pre-final-norm
    inter = model.vit.forward_intermediates(tiny_images, indices=2, norm=False, output_fmt="NLC",
                                            intermediates_only=True)
    torch.testing.assert_close(t.features, torch.stack(inter).mean(0), rtol=1e-5, atol=1e-5)

    full = manual_last_block_logits(model, tiny_images)  # (N, H, T, T)
    cls_row = full[:, :, 0, n_prefix:]  # (N, H, L)
    expected_idx = cls_row.mean(1).argsort(dim=-1, descending=True)[:, :6]
    assert torch.equal(t.topk_index, expected_idx)
    ranked = torch.gather(cls_row.mean(1), 1, t.topk_index)
    assert (ranked[:, :-1] >= ranked[:, 1:]).all()

    rows = torch.cat([torch.zeros(n, 1, dtype=torch.long), t.topk_index + n_prefix], dim=1)  # token ids
    expected = torch.stack([full[i][:, rows[i]][:, :, n_prefix:] for i in range(n)]).transpose(1, 2)
    torch.testing.assert_close(t.attn_logits, expected, rtol=1e-4, atol=1e-5)


def test_logits_are_the_attention_the_block_uses(tiny_base, tiny_images):
    """softmax of the full manual logits reproduces the block's own attention output."""
    block = tiny_base.vit.blocks[-1]
    captured = {}
    h1 = block.norm1.register_forward_hook(lambda m, a, out: captured.update(h=out))
    h2 = block.attn.register_forward_hook(lambda m, a, out: captured.update(out=out))
    tiny_base.vit.forward_features(tiny_images)
    h1.remove()
    h2.remove()
    logits = manual_last_block_logits(tiny_base, tiny_images)
    n, t, c = captured["h"].shape
    v = (captured["h"] @ block.attn.qkv.weight.T + block.attn.qkv.bias)[..., 2 * c:]
    v = v.reshape(n, t, block.attn.num_heads, -1).transpose(1, 2)
    out = block.attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(n, t, c))
    torch.testing.assert_close(out, captured["out"], rtol=1e-4, atol=1e-5)


def timm_forward_with_attention(model: BaseModel, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The model's own timm ``forward_features``, capturing every block output and the last block's full
    pre-softmax logits (N, H, T, T), computed from what its attention module received the way timm's non-fused
    path does (``q * scale @ k^T`` after the q/k norms); their softmax must be the probabilities that path used."""
    vit = model.vit
    outputs, seen = [], {}
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out)) for b in vit.blocks]
    attn = vit.blocks[-1].attn
    hooks.append(attn.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])))
    hooks.append(attn.attn_drop.register_forward_pre_hook(lambda m, a: seen.update(p=a[0])))
    fused, attn.fused_attn = attn.fused_attn, False
    try:
        final = vit.forward_features(x)
    finally:
        attn.fused_attn = fused
        for h in hooks:
            h.remove()
    torch.testing.assert_close(vit.norm(outputs[-1]), final)  # the hooks saw the very forward timm ran
    n, t, _ = seen["x"].shape
    q, k, _ = attn.qkv(seen["x"]).reshape(n, t, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    logits = (attn.q_norm(q) * attn.scale) @ attn.k_norm(k).transpose(-2, -1)
    torch.testing.assert_close(logits.softmax(-1), seen["p"], rtol=1e-5, atol=1e-6)
    return outputs, logits


def test_dinov2_register_targets_match_timm_forward():
    """Registers, LayerScale, patch 14: features drop all 5 prefix tokens; attention rows are the cls query and the
    top-k patch queries over the patch keys only (cls and register keys dropped)."""
    model = make_base("vit_pico_patch14_reg4_dinov2", k_max=5, seed=4)
    with torch.no_grad():  # LayerScale gammas far from 1e-5 and visible registers, so mistakes show
        for name, p in model.vit.named_parameters():
            if name.endswith(".gamma"):
                p.normal_(1.0, 0.5)
            elif name in ("reg_token", "pos_embed"):
                p.normal_(0.0, 1.0)
    vit = model.vit
    assert (vit.num_prefix_tokens, vit.no_embed_class, vit.patch_embed.patch_size) == (5, True, (14, 14))
    x = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(3))
    t = model(x)
    outputs, full = timm_forward_with_attention(model, x)
    n_prefix, length = 5, 16
    torch.testing.assert_close(t.features, (outputs[-2][:, n_prefix:] + outputs[-1][:, n_prefix:]) / 2,
                               rtol=1e-5, atol=1e-5)

    cls_row = full[:, :, 0, n_prefix:]  # (N, H, L): the cls query over the patch keys
    assert torch.equal(t.topk_index, cls_row.mean(1).argsort(dim=-1, descending=True)[:, :5])
    rows = torch.cat([torch.zeros(4, 1, dtype=torch.long), t.topk_index + n_prefix], dim=1)
    expected = torch.stack([full[i][:, rows[i]][:, :, n_prefix:] for i in range(4)]).transpose(1, 2)
    assert t.attn_logits.shape == expected.shape == (4, 6, model.num_heads, length)
    torch.testing.assert_close(t.attn_logits, expected, rtol=1e-5, atol=1e-5)


def test_base_model_is_frozen(tiny_base):
    assert not any(p.requires_grad for p in tiny_base.parameters())
    tiny_base.train()
    assert not tiny_base.training and not tiny_base.vit.training


def test_bad_target_settings_are_refused():
    vit = make_base().vit
    with pytest.raises(ValueError, match="last_layers"):
        compute_targets(vit, torch.zeros(1, 3, 32, 32), last_layers=9, k_max=4)
    with pytest.raises(ValueError, match="k_max"):
        compute_targets(vit, torch.zeros(1, 3, 32, 32), last_layers=2, k_max=65)
    no_cls = make_base(class_token=False, global_pool="avg").vit
    with pytest.raises(ValueError, match="needs a class token"):
        compute_targets(no_cls, torch.zeros(1, 3, 32, 32), last_layers=2, k_max=4)


def test_grey_input_channels():
    model = BaseModel(vit_kwargs("vit_pico_patch4_32", in_chans=1), k_max=3)
    t = model(torch.randn(2, 1, 32, 32))
    assert t.features.shape == (2, 64, 48)
