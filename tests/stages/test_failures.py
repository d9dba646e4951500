"""stages.cache.failures: how many failed images a unit may have, and the error that stops a unit with more."""

from __future__ import annotations

import pickle

import pytest

from stages.cache.failures import FailureRecord, TooManyBadImagesError, allowed_failures, check_failure_rate


@pytest.mark.parametrize(("total", "fraction", "allowed"), [
    (64, 0.05, 3), (100, 0.05, 5), (16, 0.05, 1), (3, 0.05, 1), (1, 0.05, 1), (20, 0.5, 10), (10, 0.0, 0),
    (10, 1.0, 10), (0, 0.05, 1),
])
def test_allowed_failures(total: int, fraction: float, allowed: int) -> None:
    assert allowed_failures(total, fraction) == allowed


def test_a_fraction_outside_zero_to_one_is_refused() -> None:
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"extract.max_failed_fraction must be within \[0, 1\]"):
            allowed_failures(10, bad)


def _records(n: int, reason: str = "missing") -> list[FailureRecord]:
    return [FailureRecord(i, f"/data/{i}.png", reason, "gone") for i in range(n)]


def test_check_failure_rate_names_unit_count_fraction_and_reasons() -> None:
    check_failure_rate(3, 64, _records(3), 0.05)  # at the limit: fine
    failures = [*_records(3), FailureRecord(9, "/data/9.png", "truncated", "image file is truncated")]
    with pytest.raises(TooManyBadImagesError) as info:
        check_failure_rate(3, 64, failures, 0.05)
    message = str(info.value)
    assert message.startswith("unit 3: 4 of 64 images failed (6.2%), more than extract.max_failed_fraction = 5.0% "
                              "allows (at most 3); nothing of the unit was written.")
    assert "Reasons: missing ×3, truncated ×1; first: /data/0.png (missing: gone)." in message
    assert (info.value.unit, info.value.failed, info.value.total) == (3, 4, 64)
    clone = pickle.loads(pickle.dumps(info.value))  # crosses Ray's process boundary intact
    assert str(clone) == message and clone.failed == 4
    check_failure_rate(0, 2, _records(2), 1.0)
    with pytest.raises(TooManyBadImagesError, match="at most 0"):
        check_failure_rate(0, 2, _records(1), 0.0)
