"""MAE random masking."""

import pytest
import torch

from tec_model.masking import random_masking, unshuffle_with_mask_tokens


@pytest.mark.parametrize(("length", "ratio"), [(64, 0.75), (196, 0.75), (10, 0.33)])
def test_keeps_int_l_times_one_minus_r(length, ratio):
    x = torch.randn(4, length, 8)
    vis, mask, _, ids_keep = random_masking(x, ratio)
    keep = int(length * (1 - ratio))
    assert vis.shape == (4, keep, 8)
    assert (mask.sum(1) == length - keep).all()
    assert torch.equal(vis, torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, 8)))
    assert (mask.gather(1, ids_keep) == 0).all()


def test_masks_differ_per_sample_and_restore_round_trips():
    x = torch.randn(8, 64, 4)
    vis, mask, ids_restore, _ = random_masking(x, 0.75, torch.Generator().manual_seed(0))
    assert len({tuple(m.tolist()) for m in mask}) == 8
    token = torch.full((1, 1, 4), 7.0)
    full = unshuffle_with_mask_tokens(vis, token, ids_restore)
    visible = mask == 0
    assert torch.equal(full[visible], x[visible])
    assert (full[~visible] == 7.0).all()


def test_generator_makes_masks_reproducible():
    x = torch.randn(2, 64, 4)
    a = random_masking(x, 0.75, torch.Generator().manual_seed(3))[1]
    b = random_masking(x, 0.75, torch.Generator().manual_seed(3))[1]
    assert torch.equal(a, b)


def test_bad_ratio_refused():
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(torch.randn(1, 4, 2), 1.0)
