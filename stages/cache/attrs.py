"""Informational attributes of a cache's root group: the resolved config that made it (``tec_config``) and the base
diagnostics (``base_diagnostics``). Neither is part of the cache's identity (the ``tec_cache`` attribute,
:mod:`stages.cache.spec`)."""

from __future__ import annotations

import json
from typing import Any

import zarr

from infra import storage

CONFIG_ATTR = "tec_config"


def write_config_attr(url: str, resolved: dict[str, Any]) -> None:
    """Store the resolved pipeline config that made the cache in its ``tec_config`` attribute (no secrets: the
    caller passes an already-redacted config). Informational; the ``tec_cache`` attribute is the identity."""
    update_root_attr(url, CONFIG_ATTR, resolved)


def update_root_attr(url: str, key: str, value: Any) -> None:
    """Set one informational attribute of the cache's root group (its metadata object is replaced whole)."""
    group = zarr.open_group(storage.zarr_store(url), mode="r+", zarr_format=3)
    group.attrs.update({key: value})


DIAGNOSTICS_ATTR = "base_diagnostics"


def write_diagnostics_attr(url: str, summary: dict[str, Any]) -> None:
    """Store the base diagnostics (``stages.extract.diagnostics.BaseDiagnostics.to_dict``) in the cache's
    ``base_diagnostics`` attribute, as :func:`write_config_attr` stores ``tec_config``. Informational, not in the key;
    the group's metadata object is replaced whole (atomically), so two writers racing leave one of their summaries."""
    update_root_attr(url, DIAGNOSTICS_ATTR, summary)


def read_diagnostics_attr(url: str) -> dict[str, Any] | None:
    """The cache's ``base_diagnostics`` attribute, or None when it has none (a cache extracted before it existed)."""
    meta = json.loads(storage.read_bytes(storage.join(url, "zarr.json")))
    return meta.get("attributes", {}).get(DIAGNOSTICS_ATTR)
