"""The fault suite's seed: ``TEC_FAULT_SEED`` when set, else a fresh random one per pytest session.

Loaded as a plugin by ``tests/conftest.py`` so the seed is printed in the pytest header and again in the terminal
summary (``pytest -q`` shows no header): a failing CI run is reproduced with ``TEC_FAULT_SEED=<seed> pytest ...``.
"""

from __future__ import annotations

import os
import secrets

import pytest

SEED_VAR = "TEC_FAULT_SEED"
_SEED = int(os.environ[SEED_VAR]) if os.environ.get(SEED_VAR) else secrets.randbelow(2**31)


def fault_seed() -> int:
    """This session's fault seed (fixed for the whole session)."""
    return _SEED


def _line() -> str:
    source = "from TEC_FAULT_SEED" if os.environ.get(SEED_VAR) else "random"
    return f"fault seed: {_SEED} ({source}; reproduce with {SEED_VAR}={_SEED})"


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [_line()]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.write_line(_line())
