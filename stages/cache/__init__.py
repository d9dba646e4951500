"""The target cache: the single owner of its format, from the key to the bytes of every object.

* :mod:`stages.cache.spec`: the identity (:class:`CacheSpec`), its key, diffs and the compatibility check;
* :mod:`stages.cache.layout`: the arrays, their chunking and codec, and their creation;
* :mod:`stages.cache.store`: :class:`TargetCache` (open or create, write whole units, read units and samples,
  completeness and the ``valid`` array);
* :mod:`stages.cache.leases`: claims on units, their renewal and takeover (:class:`ClaimKeeper`);
* :mod:`stages.cache.failures`: the failures table and the failure-rate guard;
* :mod:`stages.cache.errors`: the errors, and the guard that names a full disk.
* :mod:`stages.cache.attrs`: the root group's informational attributes (the resolved config, the base diagnostics).

Every public name is importable from ``stages.cache`` itself.
"""

from stages.cache.attrs import (
    CONFIG_ATTR,
    DIAGNOSTICS_ATTR,
    read_diagnostics_attr,
    write_config_attr,
    write_diagnostics_attr,
)
from stages.cache.errors import CacheFullError, ClaimLostError, UnitIncompleteError, is_no_space, no_space_guard
from stages.cache.failures import (
    FAILURES_DIR,
    FAILURES_SCHEMA,
    FailureRecord,
    TooManyBadImagesError,
    allowed_failures,
    check_failure_rate,
    failures_parquet,
    failures_table,
    gather_failures,
)
from stages.cache.layout import (
    ARRAYS,
    COMPRESSORS,
    SHARDED,
    TARGET_INNER_CHUNK_BYTES,
    TargetBatch,
    array_shapes,
    create_arrays,
    gather_rows,
    inner_images,
    make_compressor,
    raw_bytes_per_view,
)
from stages.cache.leases import CLAIMS_DIR, Claim, ClaimKeeper, ClaimOutcome, UnitClaims, new_claim, new_owner_id
from stages.cache.spec import (
    ATTR_NAME,
    FORMAT_VERSION,
    CacheFormatError,
    CacheMismatchError,
    CacheSpec,
    cache_key,
    canonical_json,
    check_compatible,
    diff_specs,
    expected_differences,
)
from stages.cache.store import (
    RUN_SPECIFIC_MARKER_FIELDS,
    CacheSummary,
    TargetCache,
    create_or_open,
    open_cache,
)

__all__ = [
    "ARRAYS", "ATTR_NAME", "CLAIMS_DIR", "COMPRESSORS", "CONFIG_ATTR", "DIAGNOSTICS_ATTR", "FAILURES_DIR",
    "FAILURES_SCHEMA",
    "FORMAT_VERSION", "RUN_SPECIFIC_MARKER_FIELDS", "SHARDED", "TARGET_INNER_CHUNK_BYTES", "CacheFormatError",
    "CacheFullError", "CacheMismatchError", "CacheSpec", "CacheSummary", "Claim", "ClaimKeeper", "ClaimLostError",
    "ClaimOutcome", "FailureRecord", "TargetBatch", "TargetCache", "TooManyBadImagesError", "UnitClaims",
    "UnitIncompleteError", "allowed_failures", "array_shapes", "cache_key", "canonical_json", "check_compatible",
    "check_failure_rate", "create_arrays", "create_or_open", "diff_specs", "expected_differences",
    "failures_parquet", "failures_table", "gather_failures", "gather_rows", "inner_images", "is_no_space",
    "make_compressor", "new_claim", "new_owner_id", "no_space_guard", "open_cache", "raw_bytes_per_view",
    "read_diagnostics_attr", "write_config_attr", "write_diagnostics_attr",
]
