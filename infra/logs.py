"""Logging set-up for the CLI: ``--log-level``, else ``$TEC_LOG_LEVEL``, else INFO (WARNING under ``$CI``).

The terminal shows the project's records (the Ray workers' ones too, see :mod:`infra.ray_logs`); a progress message
repeated while a person waits (``extract: units 5/32 …``, ``features: 3072/5000 images …``) is shown at most every
:data:`PROGRESS_INTERVAL_S` seconds, and always its first and last (``N/N``) step.
"""

from __future__ import annotations

import logging
import os
import re

QUIET_LOGGERS = ("ray", "filelock", "botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "PIL")
PROGRESS_INTERVAL_S = 30.0
_COUNT = re.compile(r"\b(\d+)/(\d+)\b")


class ProgressThrottle(logging.Filter):
    """Lets an INFO message with a ``done/total`` count through at most every ``interval_s`` seconds per kind.

    The kind is the logger and the text before the count. The first message of a kind and a message whose count is
    complete (``done >= total``) always pass; every other record passes unchanged.
    """

    def __init__(self, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        super().__init__()
        self.interval_s = interval_s
        self._shown: dict[tuple[str, str], float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        """True to show ``record``."""
        if record.levelno != logging.INFO:
            return True
        message = record.getMessage()
        count = _COUNT.search(message)
        if count is None:
            return True
        kind = (record.name, message[:count.start()])
        last = self._shown.get(kind)
        if last is not None and int(count[1]) < int(count[2]) and record.created - last < self.interval_s:
            return False
        self._shown[kind] = record.created
        return True


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; third-party loggers are kept at WARNING."""
    default = "WARNING" if os.environ.get("CI") else "INFO"  # quiet by default under CI
    name = (level or os.environ.get("TEC_LOG_LEVEL") or default).upper()
    if name not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {name!r}; use DEBUG, INFO, WARNING or ERROR")
    root = logging.getLogger()
    configured = bool(root.handlers)
    logging.basicConfig(level=name, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not configured and name != "DEBUG":
        for handler in root.handlers:
            handler.addFilter(ProgressThrottle())
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(name)))
