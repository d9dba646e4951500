"""Logging set-up for the CLI: ``--log-level``, else ``$TEC_LOG_LEVEL``, else INFO (WARNING under ``$CI``)."""

from __future__ import annotations

import logging
import os

QUIET_LOGGERS = ("ray", "filelock", "botocore", "s3fs", "aiobotocore", "fsspec", "urllib3", "PIL")


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once; third-party loggers are kept at WARNING."""
    default = "WARNING" if os.environ.get("CI") else "INFO"  # quiet by default under CI
    name = (level or os.environ.get("TEC_LOG_LEVEL") or default).upper()
    if name not in logging.getLevelNamesMapping():
        raise ValueError(f"unknown log level {name!r}; use DEBUG, INFO, WARNING or ERROR")
    logging.basicConfig(level=name, format="%(asctime)s %(levelname).1s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(name)))
