"""The failures of a unit: the failures table the cache stores (``failures/<u>.parquet``), and the guard against
losing too many images.

Each image of a unit that cannot be used (:class:`stages.images.BadImageError`) becomes one row of the unit's failures
table and an invalid sample. :func:`check_failure_rate` stops a unit in which more images failed than
``max_failed_fraction`` allows (at least one, when the fraction is above 0): a data set missing or unreadable as a
whole must end the job with an error, not become a cache of invalid samples marked complete.
"""

from __future__ import annotations

import io
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from infra import storage

FAILURES_DIR = "failures"


class FailureRecord(NamedTuple):
    """One row of the failures table."""

    index: int
    uri: str
    reason: str
    message: str


FAILURES_SCHEMA = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),
        pa.field("uri", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ]
)


def failures_table(records: list[FailureRecord] | list[tuple]) -> pa.Table:
    """Make the failures table (:data:`FAILURES_SCHEMA`) from records, sorted by ``index``."""
    rows = sorted((FailureRecord(*r) for r in records), key=lambda r: r.index)
    return pa.Table.from_pylist([r._asdict() for r in rows], schema=FAILURES_SCHEMA)


class TooManyBadImagesError(RuntimeError):
    """More of a unit's images failed than ``max_failed_fraction`` allows; nothing of the unit is written."""

    def __init__(self, unit: int, failed: int, total: int, max_fraction: float, detail: str = "") -> None:
        allowed = allowed_failures(total, max_fraction)
        super().__init__(
            f"unit {unit}: {failed} of {total} images failed ({failed / max(total, 1):.1%}), more than "
            f"extract.max_failed_fraction = {max_fraction:.1%} allows (at most {allowed}); nothing of the unit was "
            f"written. {detail}A data set that is missing or unreadable as a whole looks like this: check the paths "
            "and the store, or raise extract.max_failed_fraction to accept the losses")
        self.unit, self.failed, self.total, self.max_fraction, self.detail = unit, failed, total, max_fraction, detail

    def __reduce__(self):
        """Pickle by constructor arguments, so the error crosses process boundaries (Ray)."""
        return (TooManyBadImagesError, (self.unit, self.failed, self.total, self.max_fraction, self.detail))


def allowed_failures(total: int, max_fraction: float) -> int:
    """Failed images a unit of ``total`` may have: ``floor(max_fraction · total)``, but at least one whenever
    ``max_fraction > 0`` (so one bad image does not stop a small unit, or a short last one); 0 allows none, 1 all."""
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(f"extract.max_failed_fraction must be within [0, 1], got {max_fraction}")
    return max(int(max_fraction * total + 1e-9), 1 if max_fraction > 0 else 0)


def check_failure_rate(unit: int, total: int, failures: Sequence[FailureRecord], max_fraction: float) -> None:
    """Refuse a unit with more failed images than :func:`allowed_failures` of its ``total``.

    Raises:
        TooManyBadImagesError: naming the unit, the count, the fraction, the reasons and the first failed URI.
    """
    if len(failures) <= allowed_failures(total, max_fraction):
        return
    reasons = ", ".join(f"{reason} ×{n}" for reason, n in Counter(f.reason for f in failures).most_common())
    first = failures[0]
    detail = f"Reasons: {reasons}; first: {first.uri} ({first.reason}: {first.message}). "
    raise TooManyBadImagesError(unit, len(failures), total, max_fraction, detail)


def failures_parquet(records: Sequence[FailureRecord]) -> bytes:
    """The bytes of ``failures/<u>.parquet`` for a unit's ``records`` (:func:`failures_table`)."""
    sink = io.BytesIO()
    pq.write_table(failures_table(list(records)), sink)
    return sink.getvalue()


def gather_failures(url: str, units: Iterable[int] | None = None) -> pa.Table:
    """Concatenate ``failures/<u>.parquet`` of the cache at ``url`` for the given units (default: every unit that
    wrote one)."""
    root = storage.join(url, FAILURES_DIR)
    if units is None:
        units = sorted(int(n[: -len(".parquet")]) for n in storage.list_objects(root) if n.endswith(".parquet"))
    tables = []
    for u in units:
        try:
            tables.append(pq.read_table(io.BytesIO(storage.read_bytes(storage.join(root, f"{u}.parquet")))))
        except FileNotFoundError:
            continue
    if not tables:
        return FAILURES_SCHEMA.empty_table()
    return pa.concat_tables([t.cast(FAILURES_SCHEMA) for t in tables])
