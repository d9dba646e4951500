"""The view plan (pure, counter-based, RandomResizedCrop semantics) and the view pixel builder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms import functional as TF

from stages.views import (
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    build_view,
    build_views_batch,
    central_crop,
    plan_view,
    plan_views,
)
from tests.fixtures.data import FMNIST_TRAIN_IMAGES, parse_idx_gz, sample_images

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
REPO = Path(__file__).resolve().parents[2]


def _rgb_image(h: int = 40, w: int = 52) -> np.ndarray:
    grey = np.asarray(Image.fromarray(sample_images(1)[0]).resize((w, h), Image.Resampling.BICUBIC))
    return np.ascontiguousarray(np.stack([grey, grey[:, ::-1], 255 - grey], axis=2))


def test_plan_is_deterministic_and_order_independent():
    keys = [(7, i, v) for i in range(30) for v in range(4)]
    first = {k: plan_view(*k, 60, 80) for k in keys}
    rng = np.random.default_rng(0)
    for pos in rng.permutation(len(keys)):
        k = keys[pos]
        np.testing.assert_array_equal(plan_view(*k, 60, 80), first[k])
    assert first[(7, 0, 0)].dtype == np.int32 and first[(7, 0, 0)].shape == (5,)
    distinct = {tuple(b.tolist()) for b in first.values()}
    assert len(distinct) > 100  # different (index, view) give different views
    assert not np.array_equal(plan_view(8, 0, 0, 60, 80), first[(7, 0, 0)]) or not np.array_equal(
        plan_view(8, 0, 1, 60, 80), first[(7, 0, 1)]
    )


def test_plan_views_matches_plan_view():
    indices = [5, 0, 123456789]
    sizes = [(28, 28), (100, 30), (224, 300)]
    boxes = plan_views(11, indices, 3, sizes)
    assert boxes.shape == (3, 3, 5) and boxes.dtype == np.int32
    for k, (i, (h, w)) in enumerate(zip(indices, sizes, strict=True)):
        for v in range(3):
            np.testing.assert_array_equal(boxes[k, v], plan_view(11, i, v, h, w))
    with pytest.raises(ValueError):
        plan_views(0, [1, 2], 2, [(4, 4)])


@pytest.mark.parametrize("size", [(224, 224), (28, 28), (37, 61), (300, 200)])
def test_boxes_inside_and_within_scale_and_ratio(size):
    h_img, w_img = size
    boxes = plan_views(1, np.arange(1500), 1, [size] * 1500)[:, 0]
    top, left, h, w, flip = boxes.T.astype(np.int64)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= h_img).all() and (left + w <= w_img).all()
    assert set(flip.tolist()) <= {0, 1}
    # Aspect ratios here are within [3/4, 4/3], so the fallback (if ever taken) is the whole image, which also
    # satisfies these bounds. Tolerances are exactly the ±0.5 px rounding of w and h.
    area = h_img * w_img
    assert ((w - 0.5) * (h - 0.5) <= SCALE[1] * area).all()
    assert ((w + 0.5) * (h + 0.5) >= SCALE[0] * area).all()
    assert ((w - 0.5) / (h + 0.5) <= RATIO[1]).all() and ((w + 0.5) / (h - 0.5) >= RATIO[0]).all()


def test_fallback_is_torchvision_central_crop():
    for seed in range(5):
        box = plan_view(seed, 3, 0, 20, 400)  # every attempt is too tall: fallback
        assert box[:4].tolist() == [0, 186, 20, 27]
    assert central_crop(400, 20, RATIO) == (186, 0, 27, 20)
    assert central_crop(30, 30, RATIO) == (0, 0, 30, 30)


def test_flip_rate_and_crop_distribution_match_torchvision():
    n = 4000
    boxes = plan_views(2024, np.arange(n), 1, [(64, 48)] * n)[:, 0].astype(np.float64)
    assert abs(boxes[:, 4].mean() - 0.5) < 0.03
    torch.manual_seed(0)
    ref = np.array([RandomResizedCrop.get_params(torch.empty(3, 64, 48), list(SCALE), list(RATIO))
                    for _ in range(n)], dtype=np.float64)
    ours_area, ref_area = boxes[:, 2] * boxes[:, 3] / (64 * 48), ref[:, 2] * ref[:, 3] / (64 * 48)
    assert abs(ours_area.mean() - ref_area.mean()) < 0.02
    assert abs(np.log(boxes[:, 3] / boxes[:, 2]).mean() - np.log(ref[:, 3] / ref[:, 2]).mean()) < 0.03
    assert abs(boxes[:, 0].mean() - ref[:, 0].mean()) < 1.5


def test_plan_rejects_out_of_range_keys():
    for args in [(-1, 0, 0), (0, -1, 0), (0, 0, 1 << 20), (1 << 64, 0, 0), (0, 1 << 44, 0)]:
        with pytest.raises(ValueError):
            plan_view(*args, 10, 10)


@pytest.mark.parametrize("channels", [1, 3])
def test_build_view_shape_and_matches_torchvision(channels):
    image = _rgb_image()[:, :, :channels].copy()
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    for v in range(6):
        box = plan_view(5, 0, v, *image.shape[:2])
        out = build_view(image, box, 32, mean, std)
        assert out.shape == (channels, 32, 32) and out.dtype == torch.float32
        pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
        top, left, h, w, flip = box.tolist()
        ref = TF.resized_crop(pil, top, left, h, w, [32, 32], InterpolationMode.BICUBIC, antialias=True)
        ref = TF.normalize(TF.to_tensor(TF.hflip(ref) if flip else ref), list(mean), list(std))
        assert torch.equal(out, ref)


def test_flip_really_mirrors():
    image = _rgb_image()
    box = np.array([3, 5, 30, 40, 0], np.int32)
    plain = build_view(image, box, 24, IMAGENET_MEAN, IMAGENET_STD)
    flipped = build_view(image, np.array([3, 5, 30, 40, 1], np.int32), 24, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(flipped, torch.flip(plain, dims=[2]))
    assert not torch.equal(flipped, plain)


def test_crop_rows_are_top_and_columns_are_left():
    image = _rgb_image()
    box = np.array([4, 9, 16, 16, 0], np.int32)  # output_size == crop size: no resampling
    out = build_view(image, box, 16, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    expected = torch.from_numpy(image[4:20, 9:25].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(out, expected)


def test_normalisation_on_constant_image():
    image = np.full((30, 20, 3), 100, np.uint8)
    out = build_view(image, plan_view(0, 0, 0, 30, 20), 16, IMAGENET_MEAN, IMAGENET_STD)
    for c in range(3):
        expected = (100 / 255 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        assert torch.allclose(out[c], torch.full((16, 16), expected), atol=1e-6, rtol=0)


_DIGEST_CODE = """
import hashlib
import numpy as np
from stages.views import Preprocess, plan_view
yy, xx = np.mgrid[0:40, 0:52]
img = np.stack([(xx * 5 + yy * 3) % 256, (xx * yy) % 256, (xx ^ yy) * 4 % 256], axis=2).astype(np.uint8)
p = Preprocess.imagenet(24)
boxes = [plan_view(9, i, v, 40, 52) for i in range(20) for v in range(3)]
digest = hashlib.sha256(b"".join(b.tobytes() + p.build(img, b).numpy().tobytes() for b in boxes)).hexdigest()
"""


def test_plan_and_pixels_are_identical_in_another_process():
    code = _DIGEST_CODE + "print(digest)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    scope: dict = {}
    exec(_DIGEST_CODE, scope)
    assert out.stdout.strip() == scope["digest"]


def test_build_view_rejects_bad_input():
    image = _rgb_image()
    with pytest.raises(ValueError, match="not inside"):
        build_view(image, [30, 0, 20, 10, 0], 8, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(ValueError, match="mean/std"):
        build_view(image, [0, 0, 5, 5, 0], 8, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    with pytest.raises(ValueError, match="uint8"):
        build_view(image.astype(np.float32), [0, 0, 5, 5, 0], 8, IMAGENET_MEAN, IMAGENET_STD)


def test_preprocess_dict_and_batch():
    p = Preprocess.fashion_mnist(32, in_chans=3)
    d = p.to_dict()
    assert list(d) == ["output_size", "crop_scale", "crop_ratio", "interpolation", "mean", "std"]
    assert d["crop_ratio"] == [0.75, 4 / 3] and d["interpolation"] == "bicubic" and len(d["mean"]) == 3
    assert Preprocess.from_dict(json.loads(json.dumps(d))) == p
    assert Preprocess(32, crop_ratio=[0.75, 4 / 3], mean=[0.5], std=[0.5]).crop_ratio == (0.75, 4 / 3)
    images = [_rgb_image(), _rgb_image(30, 30)]
    boxes = np.stack([p.plan(0, k, 0, *img.shape[:2]) for k, img in enumerate(images)])
    batch = build_views_batch(images, boxes, p)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.equal(batch[1], p.build(images[1], boxes[1]))
    assert p.build_batch([], np.zeros((0, 5), np.int32)).shape == (0, 3, 32, 32)
    for bad in ({"output_size": 0}, {"interpolation": "area"}, {"crop_scale": (0.5, 0.2)},
                {"mean": (0.5,), "std": (0.5, 0.5)}, {"std": (0.0, 1.0, 1.0)}):
        with pytest.raises(ValueError):
            Preprocess(**{"output_size": 8, **bad})


def test_fashion_mnist_constants(fmnist_dir):
    pixels = parse_idx_gz(fmnist_dir / FMNIST_TRAIN_IMAGES).astype(np.float64) / 255
    assert FASHION_MNIST_MEAN[0] == pytest.approx(pixels.mean(), abs=1e-12)
    assert FASHION_MNIST_STD[0] == pytest.approx(pixels.std(), abs=1e-12)
