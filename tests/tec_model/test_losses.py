"""Target transforms and losses (docs/method.md#5-losses)."""

import math

import torch

from tec_model import attention_loss, channel_norm, feature_loss, normalize_features, patch_norm


def test_patch_norm_is_over_tokens_unbiased_eps():
    y = torch.randn(3, 10, 5) * 4 + 2
    out = patch_norm(y)
    for n in range(3):
        for c in range(5):
            col = y[n, :, c].double()
            mean = col.sum() / 10
            var = ((col - mean) ** 2).sum() / 9  # unbiased
            expected = (col - mean) / math.sqrt(var + 1e-6)
            torch.testing.assert_close(out[n, :, c].double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mean(dim=1), torch.zeros(3, 5), atol=1e-5, rtol=0)


def test_patch_norm_differs_from_channel_norm():
    y = torch.randn(2, 16, 8)
    assert not torch.allclose(patch_norm(y), channel_norm(y), atol=1e-2)
    torch.testing.assert_close(channel_norm(y).mean(dim=-1), torch.zeros(2, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalize_features(y, "none"), y)


def test_feature_loss_ignores_visible_positions():
    pred, target = torch.randn(2, 6, 4), torch.randn(2, 6, 4)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.float)
    base = feature_loss(pred, target, mask)
    changed = pred.clone()
    changed[mask == 0] += 100.0
    torch.testing.assert_close(feature_loss(changed, target, mask), base)
    changed_masked = pred.clone()
    changed_masked[mask == 1] += 1.0
    assert feature_loss(changed_masked, target, mask) > base
    expected = sum(((pred[n, i] - target[n, i]) ** 2).mean() for n in range(2) for i in range(6) if mask[n, i])
    torch.testing.assert_close(base, expected / 6)


def test_attention_loss_is_soft_cross_entropy_with_tau_on_target_only():
    pred, target = torch.randn(2, 3, 2, 5), torch.randn(2, 3, 2, 5)
    tau = 1.8
    total = 0.0
    for n in range(2):
        for r in range(3):
            for h in range(2):
                t = [math.exp(v / tau) for v in target[n, r, h].tolist()]
                p = [math.exp(v) for v in pred[n, r, h].tolist()]
                total += -sum(ti / sum(t) * math.log(pi / sum(p)) for ti, pi in zip(t, p, strict=True))
    torch.testing.assert_close(attention_loss(pred, target, tau), torch.tensor(total / 12))
    # τ is not applied to the prediction: scaling the prediction by τ changes the loss
    assert not torch.isclose(attention_loss(pred / tau, target, tau), attention_loss(pred, target, tau))
