"""What a target cache contains, as a typed spec: its ``tec_cache`` group attribute, its key, and spec diffs.

The extract stage builds a :class:`CacheSpec` from its config and writes it into the cache; the train stage builds
one from its own config and refuses a cache whose :func:`diff_specs` is not empty. The attribute layout:

    {format_version, key,
     base_model: {checkpoint, checkpoint_sha256, timm_kwargs[, checkpoint_key]},
     targets: {last_layers, k_max, precision[, codec]},
     preprocess: {output_size, crop_scale, crop_ratio, interpolation, mean, std},
     views: {seed, per_image},
     manifest: {uri, sha256},
     flops: {base_forward_macs_per_view},
     shapes: {n_images, views_per_image, num_patches, embed_dim, num_heads, unit_size}[,
     data: {max_image_bytes, max_image_pixels}]}

The key is the SHA-256 of a canonical JSON of every field that changes the stored bytes. It leaves out where things
live (the checkpoint URL, the manifest URI: their SHA-256 stand for them), the FLOPs bookkeeping and the layout
(``unit_size``: chunking changes the objects, not the values). A credential inside one of those URLs therefore
never changes the key. The target codec (``targets.codec``, :mod:`stages.cache.codecs`) enters the key, and the
attribute, only when it is not the lossless ``float16``: a float16 cache is format_version 1 with the key it always
had; a quantised one is format_version 2. A forced checkpoint entry (``base_model.checkpoint_key``) likewise enters
both only when it is set, and the input policy's image limits (``data.max_image_bytes`` / ``max_image_pixels``,
which decide the ``too_large`` skips) only when they are not the defaults.

The attribute stores the two URLs redacted (:func:`infra.redaction.redact_url`: no userinfo, no presigned
signature or token): a spec built from a job keeps the working URLs in memory, a spec read back from a cache holds
the redacted ones (:meth:`CacheSpec.with_working_urls` puts the working ones back).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from infra.redaction import redact_url
from stages.cache.codecs import CODECS, LOSSLESS, check_codec, format_version
from stages.uri_policy import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1  # the lossless float16 layout; quantised codecs are format_version 2
FORMAT_VERSIONS = (1, 2)
ATTR_NAME = "tec_cache"
_ABSENT = object()


class CacheFormatError(ValueError):
    """The stored attribute is not a ``tec_cache`` this code can read."""


class CacheMismatchError(ValueError):
    """A cache's spec differs from the one a config asks for.

    Attributes:
        differences: one line per differing field, ``"<dotted.path>: cache has X, config asks Y"``.
    """

    def __init__(self, url: str, differences: list[str]) -> None:
        self.differences = differences
        super().__init__(f"target cache {url} does not match the config:\n  " + "\n  ".join(differences))


# (dotted attribute path, dataclass field, part of the key?)
_LAYOUT: tuple[tuple[str, str, bool], ...] = (
    ("base_model.checkpoint", "checkpoint", False),
    ("base_model.checkpoint_sha256", "checkpoint_sha256", True),
    ("base_model.timm_kwargs", "timm_kwargs", True),
    ("base_model.checkpoint_key", "checkpoint_key", True),
    ("targets.last_layers", "last_layers", True),
    ("targets.k_max", "k_max", True),
    ("preprocess.output_size", "output_size", True),
    ("preprocess.crop_scale", "crop_scale", True),
    ("preprocess.crop_ratio", "crop_ratio", True),
    ("preprocess.interpolation", "interpolation", True),
    ("preprocess.mean", "mean", True),
    ("preprocess.std", "std", True),
    ("views.seed", "view_seed", True),
    ("views.per_image", "views_per_image", True),
    ("manifest.uri", "manifest_uri", False),
    ("manifest.sha256", "manifest_sha256", True),
    ("flops.base_forward_macs_per_view", "base_forward_macs_per_view", False),
    ("shapes.n_images", "n_images", True),
    ("shapes.num_patches", "num_patches", True),
    ("shapes.embed_dim", "embed_dim", True),
    ("shapes.num_heads", "num_heads", True),
    ("shapes.unit_size", "unit_size", False),
    ("targets.precision", "precision", False),
    ("targets.codec", "codec", True),
    ("data.max_image_bytes", "max_image_bytes", True),
    ("data.max_image_pixels", "max_image_pixels", True),
)
_KEY_PATHS = tuple(path for path, _, in_key in _LAYOUT if in_key)
_URL_FIELDS = frozenset({"checkpoint", "manifest_uri"})  # stored redacted
# Fields that caches written before they existed lack, with the value those caches have.
_DEFAULTS_WHEN_ABSENT = {"targets.precision": "float32", "targets.codec": LOSSLESS, "base_model.checkpoint_key": None,
                         "data.max_image_bytes": DEFAULT_MAX_IMAGE_BYTES,
                         "data.max_image_pixels": DEFAULT_MAX_IMAGE_PIXELS}
# Fields written (and hashed) only when they differ from their default: the float16 layout predates them.
_OMITTED_WHEN_DEFAULT = ("targets.codec", "base_model.checkpoint_key", "data.max_image_bytes", "data.max_image_pixels")


@dataclass(frozen=True)
class CacheSpec:
    """Everything a target cache records about how its targets were made.

    Shapes of the arrays it implies: ``features`` (n_images, views_per_image, num_patches, embed_dim),
    ``attn_logits`` (n_images, views_per_image, k_max + 1, num_heads, num_patches), ``topk_index``
    (n_images, views_per_image, k_max), ``views`` (n_images, views_per_image, 5), ``valid`` (n_images,).

    Attributes:
        checkpoint: fsspec URL of the base-model checkpoint (not part of the key).
        checkpoint_sha256: SHA-256 hex of the checkpoint file.
        timm_kwargs: keyword arguments for ``timm.models.vision_transformer.VisionTransformer`` (JSON values).
        last_layers: number of final blocks averaged into the feature target.
        k_max: number of top-ranked patch rows stored in ``attn_logits`` (besides the cls row).
        output_size: side S of the square view fed to the base model.
        crop_scale: RandomResizedCrop area range.
        crop_ratio: RandomResizedCrop aspect-ratio range.
        interpolation: resize interpolation name, e.g. ``"bicubic"``.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        view_seed: seed of the counter-based view plan.
        views_per_image: V, views stored per image.
        manifest_uri: fsspec URL of the Parquet manifest (not part of the key).
        manifest_sha256: SHA-256 hex of the manifest file.
        n_images: N, rows of the manifest.
        num_patches: L, patch tokens per view.
        embed_dim: C_base, width of the base model.
        num_heads: H, attention heads of the base model's last block.
        base_forward_macs_per_view: multiply-accumulates of one base forward (bookkeeping, not part of the key).
        unit_size: U, images per work unit and per shard (layout, not part of the key).
        precision: the dtype the base model's forward ran in (``float32`` on CPU, ``bfloat16`` autocast on GPU by
            default). Not part of the key, so one configuration finds its cache on any device, but fixed per cache:
            a writer of another precision is refused (:func:`stages.cache.create_or_open`), so units never mix.
        codec: how ``features`` and ``attn_logits`` are stored (:data:`stages.cache.codecs.CODECS`); part of the key
            unless it is the lossless ``float16``.
        checkpoint_key: the checkpoint entry the base was loaded from when one was forced (``teacher``,
            ``student``, …; ``base.checkpoint_key``): part of the key, since two entries of one file are two bases;
            left out of it when None (auto-detection), so the keys of caches older than it stay what they were.
        max_image_bytes / max_image_pixels: the input policy's limits (``data.max_image_*``): they decide which
            images are skipped as ``too_large``, hence the ``valid`` rows; part of the key, left out of it (and of
            the attribute) at their defaults, so the keys of caches older than them stay what they were.
    """

    checkpoint: str
    checkpoint_sha256: str
    timm_kwargs: dict[str, Any]
    k_max: int
    output_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    view_seed: int
    views_per_image: int
    manifest_uri: str
    manifest_sha256: str
    n_images: int
    num_patches: int
    embed_dim: int
    num_heads: int
    last_layers: int = 2
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    base_forward_macs_per_view: int = 0
    unit_size: int = field(default=64)
    precision: str = "float32"
    codec: str = LOSSLESS
    checkpoint_key: str | None = None
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        for name in ("crop_scale", "crop_ratio", "mean", "std"):
            object.__setattr__(self, name, tuple(float(x) for x in getattr(self, name)))
        object.__setattr__(self, "timm_kwargs", _json_normal(dict(self.timm_kwargs)))
        _validate(self)

    @property
    def format_version(self) -> int:
        """1 for the lossless float16 layout, 2 for a quantised codec's."""
        return format_version(self.codec)

    @property
    def key(self) -> str:
        """The cache key: SHA-256 hex of the canonical JSON of the byte-changing fields."""
        return cache_key(self)

    def to_attrs(self) -> dict[str, Any]:
        """The ``tec_cache`` group attribute (a JSON object) for this spec, key included, URLs redacted."""
        out: dict[str, Any] = {"format_version": self.format_version, "key": self.key}
        for path, name, _ in _LAYOUT:
            value = getattr(self, name)
            if path in _OMITTED_WHEN_DEFAULT and value == _DEFAULTS_WHEN_ABSENT[path]:
                continue
            _set_dotted(out, path, redact_url(value) if name in _URL_FIELDS else _json_normal(value))
        out["shapes"]["views_per_image"] = self.views_per_image
        return out

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> CacheSpec:
        """Rebuild a spec from a ``tec_cache`` attribute.

        Raises:
            CacheFormatError: unknown format version or missing fields.
        """
        version = attrs.get("format_version")
        if version not in FORMAT_VERSIONS:
            raise CacheFormatError(f"tec_cache format_version {version!r}: this code reads {FORMAT_VERSIONS}")
        try:
            values = {name: _get_dotted(attrs, path, _DEFAULTS_WHEN_ABSENT.get(path, _ABSENT))
                      for path, name, _ in _LAYOUT}
        except KeyError as exc:
            raise CacheFormatError(f"tec_cache attribute lacks {exc.args[0]}") from exc
        if values["codec"] not in CODECS or format_version(values["codec"]) != version:
            raise CacheFormatError(f"tec_cache targets.codec {values['codec']!r} does not fit format_version "
                                   f"{version} (1: float16; 2: one of {CODECS[1:]})")
        return cls(**values)

    def replace(self, **changes: Any) -> CacheSpec:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def with_working_urls(self, checkpoint: str | None, manifest_uri: str | None) -> CacheSpec:
        """A copy whose checkpoint / manifest URL is the given working one (credentials included) wherever the
        stored one is its redacted form; any other stored URL (another location) is kept."""
        changes = {name: url for name, url in (("checkpoint", checkpoint), ("manifest_uri", manifest_uri))
                   if url and redact_url(url) == getattr(self, name)}
        return self.replace(**changes) if changes else self


def _validate(spec: CacheSpec) -> None:
    positive = ("k_max", "output_size", "views_per_image", "n_images", "num_patches", "embed_dim", "num_heads",
                "last_layers", "unit_size", "max_image_bytes", "max_image_pixels")
    for name in positive:
        value = getattr(spec, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"CacheSpec.{name} must be a positive int, got {value!r}")
    if spec.k_max > spec.num_patches:
        raise ValueError(f"CacheSpec.k_max {spec.k_max} exceeds num_patches {spec.num_patches}")
    if spec.num_patches > 32767:
        raise ValueError(f"num_patches {spec.num_patches} does not fit topk_index's int16")
    check_codec(spec.codec)
    if len(spec.mean) != len(spec.std):
        raise ValueError(f"mean has {len(spec.mean)} channels, std has {len(spec.std)}")


def _json_normal(value: Any) -> Any:
    """``value`` as plain JSON types (tuples become lists), as it reads back from a JSON attribute."""
    return json.loads(json.dumps(value))


def _set_dotted(out: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = out
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _get_dotted(attrs: Mapping[str, Any], path: str, default: Any = _ABSENT) -> Any:
    """The value at a dotted path; ``default`` when absent (``_ABSENT``: raise ``KeyError``)."""
    node: Any = attrs
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is _ABSENT:
                raise KeyError(path)
            return default
        node = node[part]
    return node


def _key_fields(spec: CacheSpec, keep_defaults: bool = False) -> dict[str, Any]:
    """The hashed fields; a field of :data:`_OMITTED_WHEN_DEFAULT` at its default is left out (so the keys of
    caches older than it stay what they were) unless ``keep_defaults``, and then ``format_version`` is too."""
    by_path = {path: name for path, name, _ in _LAYOUT}
    fields = {path: _json_normal(getattr(spec, by_path[path])) for path in _KEY_PATHS}
    if keep_defaults:
        return fields
    for path in _OMITTED_WHEN_DEFAULT:
        if fields.get(path) == _DEFAULTS_WHEN_ABSENT[path]:
            del fields[path]
    fields["format_version"] = spec.format_version
    return fields


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def cache_key(spec: CacheSpec) -> str:
    """SHA-256 hex of the canonical JSON of every field of ``spec`` that changes the stored bytes."""
    return hashlib.sha256(canonical_json(_key_fields(spec)).encode()).hexdigest()


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k in sorted(value):
            out.update(_flatten(value[k], f"{prefix}.{k}"))
        return out
    return {prefix: value}



def _show(value: Any) -> str:
    return "<absent>" if value is _ABSENT else json.dumps(value)


def diff_specs(cache: CacheSpec, config: CacheSpec) -> list[str]:
    """Every byte-changing field where two specs differ, by dotted attribute path.

    Args:
        cache: the spec stored in a cache.
        config: the spec a config asks for.

    Returns:
        Lines like ``"targets.k_max: cache has 15, config asks 9"``; empty when the keys agree. ``timm_kwargs``
        entries are compared one by one (``base_model.timm_kwargs.depth``).
    """
    a = _flatten(_key_fields(cache, keep_defaults=True), "")
    b = _flatten(_key_fields(config, keep_defaults=True), "")
    lines = []
    for path in sorted(set(a) | set(b)):
        va, vb = a.get(path, _ABSENT), b.get(path, _ABSENT)
        if va != vb:
            lines.append(f"{path[1:]}: cache has {_show(va)}, config asks {_show(vb)}")
    return lines


def expected_differences(cache: CacheSpec, **expected: Any) -> list[str]:
    """What a consumer expects of some spec fields (e.g. ``k_max=9``, ``mean=(0.5,)``) vs what the cache holds.

    Returns:
        :func:`diff_specs` lines for the fields that differ (``"preprocess.mean: cache has [...], config asks [...]"``).
    """
    return diff_specs(cache, cache.replace(**expected))


def check_compatible(url: str, cache: CacheSpec, wanted: CacheSpec) -> None:
    """Refuse to continue or read the cache at ``url`` (spec ``cache``) for a job that wants ``wanted``.

    The keys must agree, and the forward precision too (units of two precisions would differ under one key). A
    different ``unit_size`` is only logged: the cache keeps its own layout.

    Raises:
        CacheMismatchError: naming every differing field, with both values.
    """
    if cache.key != wanted.key:
        raise CacheMismatchError(url, diff_specs(cache, wanted) or [f"key: cache has {cache.key}, "
                                                                    f"config asks {wanted.key}"])
    if cache.precision != wanted.precision:
        raise CacheMismatchError(url, [
            f"targets.precision: cache was extracted in {cache.precision}, this job computes "
            f"{wanted.precision} (set extract.precision={cache.precision} to continue it, or extract into "
            "another cache: units of two precisions would differ under one key)"])
    if cache.unit_size != wanted.unit_size:
        logger.warning("%s: cache has unit_size %d, config asks %d: using the cache's layout", url,
                       cache.unit_size, wanted.unit_size)
