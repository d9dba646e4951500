"""Rows of measured figures written by the fault suite: the raw data of docs/reliability.md and the README's block.

Two JSON-lines files, each appended to only when its variable is set:

* ``$TEC_FAULT_FIGURES``: the ``record_figures`` fixture's rows (a fault injected, whether it was survived, what was
  recomputed, what was compared and found equal, what a refused start left untouched);
* ``$TEC_FAULT_REPORT``: :func:`tests.faults.s3_faults.record`'s rows (object-store faults by kind, bad inputs and
  how each ended).

Every row says where it was measured: the test's id, the set it belongs to (``faults``: the CI subset;
``faults_full``; ``default``: a test outside the fault markers), the session's fault seed, the machine (CPU count,
architecture, Python, torch and Ray versions; no host name), the 1-minute load average, the seconds since the
test's function-scoped set-up began and an id of the pytest session. :mod:`tests.faults.report` renders the
documentation from these rows.
"""

from __future__ import annotations

import json
import os
import platform
import secrets
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pytest

from tests.faults.seed import fault_seed

FIGURES_VAR, REPORT_VAR = "TEC_FAULT_FIGURES", "TEC_FAULT_REPORT"
RUN = secrets.token_hex(4)  # this pytest session: a test measured again in a later session replaces its rows


@dataclass(frozen=True)
class TestContext:
    """Where a row was measured.

    Attributes:
        nodeid: pytest's id of the test.
        suite: ``faults``, ``faults_full`` or ``default`` (from the test's markers).
        started: ``time.monotonic()`` when the test's function-scoped set-up began.
    """

    nodeid: str
    suite: str
    started: float


_CURRENT: list[TestContext] = []


def suite_of(node: pytest.Item) -> str:
    """The set a test belongs to: ``faults_full`` or ``faults`` by its marker, else ``default``."""
    for name in ("faults_full", "faults"):
        if node.get_closest_marker(name) is not None:
            return name
    return "default"


def context_of(node: pytest.Item) -> TestContext:
    """The context of a running test (its start is the current one's when the autouse fixture set it)."""
    current = next((c for c in _CURRENT if c.nodeid == node.nodeid), None)
    return current or TestContext(node.nodeid, suite_of(node), time.monotonic())


def begin(node: pytest.Item) -> None:
    """Mark ``node`` as the running test: rows written without a context are attributed to it."""
    _CURRENT[:] = [TestContext(node.nodeid, suite_of(node), time.monotonic())]


def end() -> None:
    """No test is running any more."""
    _CURRENT.clear()


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def machine() -> dict[str, Any]:
    """The facts that name the machine a figure was measured on (never its host name)."""
    return {"cpus": os.cpu_count(), "arch": platform.machine(), "python": platform.python_version(),
            "torch": _version("torch"), "ray": _version("ray")}


def write(var: str, row: dict[str, Any], context: TestContext | None = None) -> dict[str, Any]:
    """Complete ``row`` with where it was measured and append it to the file ``$var`` names (if set).

    Args:
        var: :data:`FIGURES_VAR` or :data:`REPORT_VAR`.
        row: the measured fields.
        context: the test measuring them; default the running test (:func:`begin`).

    Returns:
        The completed row.
    """
    context = context or (_CURRENT[0] if _CURRENT else None)
    full = {"seed": fault_seed(), "run": RUN, "machine": machine(), "load_1m": round(os.getloadavg()[0], 1), **row}
    if context is not None:
        full.update(test=context.nodeid, suite=context.suite, wall_s=round(time.monotonic() - context.started, 1))
    path = os.environ.get(var)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(full, sort_keys=True) + "\n")
    return full


def record(node: pytest.Item, **row: Any) -> dict[str, Any]:
    """One ``$TEC_FAULT_FIGURES`` row of test ``node`` (``section`` ``kill`` unless given: a fault, what survived,
    what was recomputed and compared; ``refusal``: a refused start or a recovery); printed, and returned."""
    full = write(FIGURES_VAR, {"section": "kill", **row}, context_of(node))
    print("fault figures:", json.dumps(full, sort_keys=True))
    return full
