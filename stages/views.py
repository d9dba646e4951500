"""The view plan and the one function that turns (image, view row) into pixels.

The method: docs/method.md#7-augmentation-and-the-view-plan; the stored layout:
docs/cache-format.md#6-views-from-a-views-row-to-pixels.

**Plan.** View ``(index, view)`` of a data set with seed ``seed`` is a pure function of those three numbers:
its random numbers come from a Philox4x64-10 counter-based generator (Random123, numpy's
``np.random.Philox``) with key ``(seed, index << 20 | view)`` and counter 0, of which the first
:data:`RAW_PER_VIEW` 64-bit outputs are used, each mapped to ``u = (raw >> 11) · 2⁻⁵³`` in [0, 1):

* ``u[0]``: flip = 1 if ``u[0] < 0.5``;
* attempt ``a`` = 0..9 uses ``u[1+4a : 5+4a]`` = (scale, log-ratio, top, left), as torchvision's
  ``RandomResizedCrop.get_params``: area ``A·(s0 + (s1-s0)·u)``, ratio ``exp(log r0 + (log r1 - log r0)·u)``,
  ``w = round(√(area·ratio))``, ``h = round(√(area/ratio))`` (round half to even); accepted if
  ``0 < w ≤ W`` and ``0 < h ≤ H``, then ``top = ⌊u·(H-h+1)⌋``, ``left = ⌊u·(W-w+1)⌋``;
* if no attempt fits: torchvision's fallback, the central crop clamped to the ratio range.

The result row is ``(top, left, height, width, flip)`` in source pixels, int32: the ``views`` array of the
cache. The stored row, not a recomputation, is the source of truth for training.

**Pixels.** :func:`build_view` crops the uint8 source, resizes it to S×S with **Pillow** (``Image.resize``
with ``Image.BICUBIC`` on the uint8 crop, i.e. Pillow's antialiased fixed-point resampler: the same path as
torchvision's ``RandomResizedCrop`` on PIL images), so the resized view is **rounded to uint8** — that
rounding is part of the format. It then mirrors left-right when flip = 1, converts to float32, divides by
255 and normalises ``(x - mean) / std`` in float32. Pillow's integer arithmetic makes it bit-for-bit
reproducible across processes and machines.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
# Fashion-MNIST: mean and population standard deviation (ddof=0) of all 60000×28×28 pixels of
# train-images-idx3-ubyte.gz divided by 255, computed once in float64:
#   a = np.frombuffer(gzip.open(path).read(), np.uint8, offset=16) / 255; a.mean(), a.std()
FASHION_MNIST_MEAN: tuple[float] = (0.2860405969887955,)
FASHION_MNIST_STD: tuple[float] = (0.35302424451492254,)

VIEW_BITS = 20  # the key's second word is index << VIEW_BITS | view
MAX_VIEWS = 1 << VIEW_BITS
MAX_INDEX = 1 << (64 - VIEW_BITS)
RAW_PER_VIEW = 44  # 1 flip + 10 attempts × 4 draws = 41, rounded up to whole Philox blocks of 4
_ATTEMPTS = 10
_FILTERS = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


# ------------------------------------------------------------------------------------------------ plan
def view_uniforms(seed: int, index: int, view: int) -> np.ndarray:
    """The uniforms of view (seed, index, view): float64 (RAW_PER_VIEW,) in [0, 1)."""
    if not 0 <= seed < 1 << 64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    if not 0 <= index < MAX_INDEX:
        raise ValueError(f"index must be in [0, 2**{64 - VIEW_BITS}), got {index}")
    if not 0 <= view < MAX_VIEWS:
        raise ValueError(f"view must be in [0, 2**{VIEW_BITS}), got {view}")
    key = np.array([seed, (index << VIEW_BITS) | view], dtype=np.uint64)
    raw = np.random.Philox(key=key).random_raw(RAW_PER_VIEW)
    return (raw >> np.uint64(11)).astype(np.float64) * 2.0**-53


def crop_box(
    u: Sequence[float], height: int, width: int, scale: Sequence[float], ratio: Sequence[float]
) -> tuple[int, int, int, int]:
    """RandomResizedCrop box from 4 uniforms per attempt (torchvision's algorithm, see module docstring).

    Args:
        u: At least 40 uniforms in [0, 1): (scale, log-ratio, top, left) for each of 10 attempts.
        height: Source height H.
        width: Source width W.
        scale: (min, max) fraction of the source area.
        ratio: (min, max) width/height aspect ratio.

    Returns:
        (top, left, h, w) in source pixels.
    """
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(_ATTEMPTS):
        us, ur, ut, ul = (float(x) for x in u[4 * a : 4 * a + 4])
        target_area = area * (scale[0] + (scale[1] - scale[0]) * us)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(ut * (height - h + 1)), int(ul * (width - w + 1)), h, w
    return central_crop(height, width, ratio)


def central_crop(height: int, width: int, ratio: Sequence[float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: the largest central box whose aspect ratio is clamped to ``ratio``."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def plan_view(
    seed: int,
    index: int,
    view: int,
    height: int,
    width: int,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Plan view ``view`` of image ``index`` (H×W source) under ``seed``; pure, order-independent.

    Returns:
        int32 array (5,): (top, left, height, width, flip) in source pixels.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    u = view_uniforms(seed, index, view)
    top, left, h, w = crop_box(u[1:], height, width, scale, ratio)
    return np.array([top, left, h, w, int(u[0] < 0.5)], dtype=np.int32)


def plan_views(
    seed: int,
    indices: Sequence[int] | np.ndarray,
    num_views: int,
    sizes: Sequence[Sequence[int]] | np.ndarray,
    scale: Sequence[float] = (0.2, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """Plan all ``num_views`` views of several images.

    Args:
        seed: The data set's view seed.
        indices: (n,) sample indices.
        num_views: V, views per image.
        sizes: (n, 2) source (height, width) of each sample.
        scale: Crop area range.
        ratio: Crop aspect-ratio range.

    Returns:
        int32 array (n, V, 5); row [k, v] equals ``plan_view(seed, indices[k], v, *sizes[k])``.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2)
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if sizes.shape[0] != indices.shape[0]:
        raise ValueError(f"{indices.shape[0]} indices but {sizes.shape[0]} sizes")
    out = np.empty((indices.shape[0], num_views, 5), dtype=np.int32)
    for k, (index, (height, width)) in enumerate(zip(indices.tolist(), sizes.tolist(), strict=True)):
        for v in range(num_views):
            out[k, v] = plan_view(seed, index, v, height, width, scale, ratio)
    return out


# ---------------------------------------------------------------------------------------------- pixels
def build_view(
    image: np.ndarray,
    box: Sequence[int] | np.ndarray,
    output_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    interpolation: str = "bicubic",
) -> torch.Tensor:
    """Build the pixels of one view (the format's definition; see the module docstring).

    Args:
        image: uint8 (H, W, C) source, C = 1 or 3.
        box: (5,) ints (top, left, height, width, flip), inside the image.
        output_size: S.
        mean: (C,) per-channel mean in [0, 1] units.
        std: (C,) per-channel standard deviation.
        interpolation: ``bicubic`` (the default, docs/method.md#7-augmentation-and-the-view-plan),
            ``bilinear`` or ``nearest``.

    Returns:
        float32 tensor (C, S, S).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image must be uint8 (H, W, 1|3), got {image.dtype} {image.shape}")
    channels = image.shape[2]
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values for a {channels}-channel image")
    top, left, h, w, flip = (int(x) for x in box)
    if h < 1 or w < 1 or top < 0 or left < 0 or top + h > image.shape[0] or left + w > image.shape[1]:
        raise ValueError(f"box {tuple(box)} is not inside a {image.shape[0]}x{image.shape[1]} image")
    crop = image[top : top + h, left : left + w]
    pil = Image.fromarray(np.ascontiguousarray(crop[:, :, 0] if channels == 1 else crop))
    resized = np.array(pil.resize((output_size, output_size), resample=_FILTERS[interpolation]))
    if flip:
        resized = resized[:, ::-1]
    pixels = torch.from_numpy(np.ascontiguousarray(resized).reshape(output_size, output_size, channels))
    out = pixels.permute(2, 0, 1).to(torch.float32).div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(channels, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(channels, 1, 1)
    return out.sub_(mean_t).div_(std_t)


# ------------------------------------------------------------------------------------------ preprocessing
@dataclass(frozen=True)
class Preprocess:
    """Data-set-level preprocessing; :meth:`to_dict` is the cache attribute's ``preprocess`` object."""

    output_size: int
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "mean", "std"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        if self.output_size < 1:
            raise ValueError(f"output_size must be positive, got {self.output_size}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            raise ValueError(f"crop_scale must be (min, max) with 0 < min <= max, got {self.crop_scale}")
        if len(self.crop_ratio) != 2 or not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (min, max) with 0 < min <= max, got {self.crop_ratio}")
        if self.interpolation not in _FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_FILTERS)}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std) or not self.mean or min(self.std) <= 0:
            raise ValueError(f"mean/std must have equal length and std > 0, got {self.mean}, {self.std}")

    @property
    def channels(self) -> int:
        """Number of channels the mean/std describe."""
        return len(self.mean)

    @classmethod
    def imagenet(cls, output_size: int) -> Preprocess:
        """RGB preprocessing with ImageNet mean/std."""
        return cls(output_size)

    @classmethod
    def fashion_mnist(cls, output_size: int, in_chans: int = 1) -> Preprocess:
        """Fashion-MNIST mean/std, repeated over ``in_chans`` channels."""
        return cls(output_size, mean=FASHION_MNIST_MEAN * in_chans, std=FASHION_MNIST_STD * in_chans)

    def to_dict(self) -> dict:
        """JSON-ready dict with keys output_size, crop_scale, crop_ratio, interpolation, mean, std."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        """Inverse of :meth:`to_dict`."""
        return cls(**data)

    def plan(self, seed: int, index: int, view: int, height: int, width: int) -> np.ndarray:
        """:func:`plan_view` with this preprocessing's crop ranges; int32 (5,)."""
        return plan_view(seed, index, view, height, width, self.crop_scale, self.crop_ratio)

    def build(self, image: np.ndarray, box: Sequence[int] | np.ndarray) -> torch.Tensor:
        """:func:`build_view` with this preprocessing; float32 (C, S, S)."""
        return build_view(image, box, self.output_size, self.mean, self.std, self.interpolation)

    def build_batch(self, images: Sequence[np.ndarray], boxes: np.ndarray) -> torch.Tensor:
        """Build several views: ``images[k]`` with ``boxes[k]``; float32 (n, C, S, S)."""
        return build_views_batch(images, boxes, self)


def build_views_batch(
    images: Sequence[np.ndarray], boxes: np.ndarray, preprocess: Preprocess
) -> torch.Tensor:
    """Build ``images[k]`` cropped by ``boxes[k]`` (n, 5) for every k; float32 (n, C, S, S)."""
    if len(images) != len(boxes):
        raise ValueError(f"{len(images)} images but {len(boxes)} boxes")
    if not len(images):
        size = preprocess.output_size
        return torch.empty(0, preprocess.channels, size, size)
    return torch.stack([preprocess.build(img, box) for img, box in zip(images, boxes, strict=True)])
