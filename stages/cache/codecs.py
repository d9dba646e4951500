"""Target codecs of the cache: how ``features`` and ``attn_logits`` are stored, and how they decode to float16.

Pure array math on numpy arrays (computed with torch's vectorised CPU kernels), no I/O. Shapes: n images, V views,
L patches, C channels, R = k_max + 1 attention rows, H heads.

``float16`` (format_version 1, the default) stores both arrays as float16: lossless with respect to what the base
model's forward gives after its float16 cast. The quantised codecs (format_version 2) store:

    int8  features            (n, V, L, C)    int8     q = rint(x / s), |q| <= 127
          features_scale      (n, V, L)       float16  s = max_c |x| / 127, rounded UP to a float16
    fp8   features            (n, V, L, C)    uint8    the bits of float8 e4m3fn(x / s), |x / s| <= 448
          features_scale      (n, V, L)       float16  s = max_c |x| / 448, rounded UP to a float16
    both  attn_logits         (n, V, R, H, L) int8     q = rint((a - o) / s), |q| <= 127
          attn_logits_scale   (n, V, R, H)    float16  s = max(max_l a - o, o - min_l a) / 127, rounded UP
          attn_logits_offset  (n, V, R, H)    float16  o = (max_l a + min_l a) / 2, rounded to nearest

Dequantisation: features ``x ≈ q · s`` (fp8: ``q`` is the e4m3 value of the stored bits), attention
``a ≈ q · s + o``, computed in float32, clamped to ±65504 (float16's largest finite value) and returned as float16.
The clamp matters only next to float16's maximum: the rounded-up scale can put ``qmax · s`` beyond 65504 (a token whose
largest ``|x|`` is 65504 gets ``s = 516``, and ``127 · 516 = 65532`` would round to inf). Every finite input lies
within ±65504, so the clamp only moves a decoded value towards it (no error bound grows), and a value that decoded
finite without it is unchanged: the bytes already stored decode as before. The offset keeps dequantised logits close
to the logits themselves (the softmax target is shift-invariant, other uses of the logits need not be). Codes are
computed against the STORED (float16) scale and offset, and the scale is rounded up, so no value is clipped and the
scales' float16 precision adds no error beyond a step at most 2^-11 larger than float32's; a float32 scale would
cost 2 bytes more per token or row for that. An all-zero token (an unreadable image's row) gets the smallest float16
scale and decodes to exact zeros. Inputs must be finite.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

CODECS = ("float16", "int8", "fp8")
LOSSLESS = "float16"
TARGET_ARRAYS = ("features", "attn_logits")
FP8_MAX = 448.0  # largest finite float8 e4m3fn
_TINY_F16 = 2.0**-24  # smallest positive float16
F16_MAX = 65504.0  # largest finite float16: decoded values are clamped to ±F16_MAX (never inf)


def format_version(codec: str) -> int:
    """The cache format version a codec's layout has: 1 for ``float16``, 2 for the quantised codecs."""
    check_codec(codec)
    return 1 if codec == LOSSLESS else 2


def check_codec(codec: str) -> None:
    """Raises ``ValueError`` unless ``codec`` is one of :data:`CODECS`."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")


def stored_arrays(codec: str, name: str, shape: tuple[int, ...]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The arrays that store logical array ``name`` (of float16 ``shape``) under ``codec``: name -> (shape, dtype).

    The parent comes first; side arrays (scales, offsets) drop its last axis. Arrays other than
    :data:`TARGET_ARRAYS` are not coded and are returned as they are given (dtype left to the caller: ``""``).
    """
    check_codec(codec)
    if name not in TARGET_ARRAYS:
        return {name: (shape, "")}
    if codec == LOSSLESS:
        return {name: (shape, "float16")}
    side = shape[:-1]
    if name == "features":
        return {name: (shape, "int8" if codec == "int8" else "uint8"), f"{name}_scale": (side, "float16")}
    return {name: (shape, "int8"), f"{name}_scale": (side, "float16"), f"{name}_offset": (side, "float16")}


def parent_of(stored_name: str) -> str:
    """The logical array a stored array belongs to (``features_scale`` -> ``features``)."""
    for name in TARGET_ARRAYS:
        if stored_name.startswith(f"{name}_"):
            return name
    return stored_name


def stored_bytes_per_view(codec: str, num_patches: int, embed_dim: int, num_heads: int, k_max: int) -> int:
    """Uncompressed stored bytes of one (image, view) under ``codec``: features, attention and their side arrays,
    plus ``topk_index`` (K int16) and ``views`` (5 int32), as the cache lays them out (before Blosc)."""
    shapes = {"features": (num_patches, embed_dim), "attn_logits": (k_max + 1, num_heads, num_patches)}
    total = k_max * 2 + 5 * 4
    for name, shape in shapes.items():
        for sub_shape, dtype in stored_arrays(codec, name, shape).values():
            total += int(np.prod(sub_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    return total


def _torch():  # imported on first use: the rest of the cache package does not need torch
    import torch

    return torch


def _tensor(x: np.ndarray) -> Any:
    x = np.asarray(x)
    return _torch().from_numpy(x if x.flags.c_contiguous else x.copy())  # (ascontiguousarray makes 0-d 1-d)


def _f16_at_least(value: Any) -> Any:
    """The smallest float16 >= each positive float32 tensor ``value`` (below float16's max)."""
    torch = _torch()
    out = value.to(torch.float16)
    low = (out.to(torch.float32) < value).to(torch.int16)
    return (out.view(torch.int16) + low).view(torch.float16)  # +1 ulp: the next float16 up (positive values)


def _scale(half_range: Any, qmax: float) -> Any:
    """float16 scale (rounded up, at least the smallest float16) mapping ``half_range`` (float32) onto ``qmax``."""
    return _f16_at_least((half_range / qmax).clamp_(min=_TINY_F16))


def _quantise(x: Any, scale: Any, qmax: float, offset: Any = None) -> Any:
    """float32 ``(x - offset) / scale`` (side arrays broadcast over the last axis), clamped to [-qmax, qmax]."""
    y = x.to(_torch().float32, copy=True)  # never in place on the caller's array
    if offset is not None:
        y -= offset.to(y.dtype)[..., None]
    return y.div_(scale.to(y.dtype)[..., None]).clamp_(-qmax, qmax)


def encode_int8_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per token over the last axis.

    Args:
        x: (..., D) float (finite).

    Returns:
        q: (..., D) int8 in [-127, 127]; scale: (...) float16, ``x ≈ q · scale``.
    """
    torch, t = _torch(), _tensor(x)
    scale = _scale(t.abs().amax(-1).to(torch.float32), 127.0)
    q = _quantise(t, scale, 127.0).round_().to(torch.int8)
    return q.numpy(), scale.numpy()


def encode_int8_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine int8 per row over the last axis (attention logits over the L keys).

    Args:
        a: (..., L) float (finite).

    Returns:
        q: (..., L) int8 in [-127, 127]; scale, offset: (...) float16, ``a ≈ q · scale + offset``.
    """
    torch, t = _torch(), _tensor(a)
    hi, lo = t.amax(-1).to(torch.float32), t.amin(-1).to(torch.float32)
    offset = ((hi + lo) * 0.5).to(torch.float16)
    o = offset.to(torch.float32)
    scale = _scale(torch.maximum(hi - o, o - lo), 127.0)
    q = _quantise(t, scale, 127.0, offset).round_().to(torch.int8)
    return q.numpy(), scale.numpy(), offset.numpy()


def encode_fp8_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float8 e4m3fn per token (round to nearest even) with a per-token scale over the last axis.

    Args:
        x: (..., D) float (finite).

    Returns:
        bits: (..., D) uint8 (float8 e4m3fn bit patterns); scale: (...) float16, ``x ≈ e4m3(bits) · scale``.
    """
    torch, t = _torch(), _tensor(x)
    scale = _scale(t.abs().amax(-1).to(torch.float32), FP8_MAX)
    bits = _quantise(t, scale, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return bits.numpy(), scale.numpy()


def _dequantise(values: Any, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """float16 of float32 ``values · scale [+ offset]`` clamped to ±:data:`F16_MAX` (side arrays broadcast over the
    last axis): never inf, see the module docstring.

    Without an offset the product is computed in float16 directly: ``values`` (int8 codes, 7 significant bits, or
    e4m3 values, 4) times a float16 scale (11) is exact in float32, so float16's one correctly rounded multiply
    gives the same bits as the float32 product rounded to float16, with a third of the memory traffic; a product
    that overflows to ±inf there is one whose float32 value lies beyond ±65504, so clamping the float16 result
    afterwards equals clamping the float32 product before the cast.
    """
    torch = _torch()
    if offset is None:
        return (values.to(torch.float16) * _tensor(scale)[..., None]).clamp_(-F16_MAX, F16_MAX).numpy()
    out = values.to(torch.float32).mul_(_tensor(scale).to(torch.float32)[..., None])
    out.add_(_tensor(offset).to(torch.float32)[..., None])
    return out.clamp_(-F16_MAX, F16_MAX).to(torch.float16).numpy()


def decode_int8_tokens(q: np.ndarray, scale: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """(..., D) int8 codes, (...) float16 scale [and offset] -> (..., D) float16 ``q · scale [+ offset]``, clamped
    to ±65504 (finite)."""
    return _dequantise(_tensor(q), scale, offset)


def _e4m3_table() -> np.ndarray:
    """(256,) float32: the value of every float8 e4m3fn bit pattern (NaN at 0x7F and 0xFF)."""
    bits = np.arange(256, dtype=np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, man = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exp == 0, man / 8.0 * 2.0**-6, (1.0 + man / 8.0) * 2.0 ** (exp - 7.0))
    value = sign * value
    value[(bits & 0x7F) == 0x7F] = np.nan
    return value.astype(np.float32)


E4M3_VALUES = _e4m3_table()
E4M3_VALUES_F16 = E4M3_VALUES.astype(np.float16)  # exact: e4m3 values have 4 significant bits, exponents -9..8


def decode_fp8_tokens(bits: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(..., D) uint8 e4m3fn bits and (...) float16 scale -> (..., D) float16 ``e4m3(bits) · scale``, clamped to
    ±65504 (finite)."""
    return _dequantise(_torch().from_numpy(np.take(E4M3_VALUES_F16, bits)), scale)


def encode(codec: str, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Stored arrays of logical array ``name`` under ``codec`` (keys as :func:`stored_arrays`).

    Args:
        codec: one of :data:`CODECS`.
        name: ``features`` ((n, V, L, C) float) or ``attn_logits`` ((n, V, R, H, L) float); any other array is
            returned unchanged.
        x: the array, finite.
    """
    check_codec(codec)
    if name not in TARGET_ARRAYS:
        return {name: x}
    if codec == LOSSLESS:
        return {name: np.ascontiguousarray(x, dtype=np.float16)}
    if name == "attn_logits":
        q, scale, offset = encode_int8_rows(x)
        return {name: q, f"{name}_scale": scale, f"{name}_offset": offset}
    q, scale = encode_int8_tokens(x) if codec == "int8" else encode_fp8_tokens(x)
    return {name: q, f"{name}_scale": scale}


def decode(codec: str, name: str, parts: Mapping[str, np.ndarray]) -> np.ndarray:
    """Logical array ``name`` as float16 from its stored arrays ``parts`` (keys as :func:`stored_arrays`; any
    leading axes, the same on every part). Arrays other than :data:`TARGET_ARRAYS` are returned as stored."""
    check_codec(codec)
    if name not in TARGET_ARRAYS or codec == LOSSLESS:
        return parts[name]
    if name == "attn_logits":
        return decode_int8_tokens(parts[name], parts[f"{name}_scale"], parts[f"{name}_offset"])
    if codec == "int8":
        return decode_int8_tokens(parts[name], parts[f"{name}_scale"])
    return decode_fp8_tokens(parts[name], parts[f"{name}_scale"])


def encode_all(codec: str, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every stored array of a set of logical arrays (e.g. a unit's), in the given order, side arrays after their
    parent."""
    out: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        out.update(encode(codec, name, value))
    return out


def decode_all(codec: str, stored: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The logical arrays (targets as float16) of a set of stored arrays, side arrays consumed."""
    return {name: decode(codec, name, stored) for name in stored if parent_of(name) == name}


def feature_error(reference: np.ndarray, decoded: np.ndarray) -> dict[str, float]:
    """How far decoded features are from the reference AFTER patch normalisation (the training target).

    Args:
        reference, decoded: (..., L, C) features (any float dtype); patch norm runs over L per channel.

    Returns:
        ``relative``: ||P(decoded) - P(reference)|| / ||P(reference)|| over everything; ``cosine_min``: the smallest
        per-token cosine similarity of P(decoded) to P(reference).
    """
    from tec_model.losses import patch_norm

    torch = _torch()
    shape = reference.shape[-2:]
    ref = patch_norm(torch.from_numpy(np.asarray(reference, np.float32).reshape(-1, *shape)))
    got = patch_norm(torch.from_numpy(np.asarray(decoded, np.float32).reshape(-1, *shape)))
    relative = (got - ref).norm() / ref.norm()
    cosine = torch.nn.functional.cosine_similarity(got, ref, dim=-1)
    return {"relative": float(relative), "cosine_min": float(cosine.min())}


def attention_kl(reference: np.ndarray, decoded: np.ndarray, tau: float) -> dict[str, float]:
    """KL(softmax(reference / τ) || softmax(decoded / τ)) per attention row (the attention target's distribution).

    Args:
        reference, decoded: (..., L) pre-softmax logits. tau: the target temperature.

    Returns:
        ``mean`` and ``max`` of the per-row KL in nats.
    """
    torch = _torch()
    ref = torch.from_numpy(np.asarray(reference, np.float32)) / tau
    got = torch.from_numpy(np.asarray(decoded, np.float32)) / tau
    log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return {"mean": float(kl.mean()), "max": float(kl.max())}
