"""Connecting to Ray: an existing cluster when asked (``address`` / ``RAY_ADDRESS``), else a local one."""

from __future__ import annotations

import logging
import os

import ray

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"

# Environment every Ray worker process should inherit (S3 endpoint and region; never credentials by value —
# workers read those from their own environment or credential files, exactly as the driver does).
_FORWARDED_ENV = ("TEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "TEC_S3_REGION",
                  "AWS_DEFAULT_REGION", "TEC_LOG_LEVEL")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Initialise Ray once per process.

    Args:
        address: a cluster address (``ray://…`` or ``host:port``) or ``"auto"``; default ``$RAY_ADDRESS``, and
            without either a local cluster is started.
        num_cpus: CPUs of a local cluster (default: all cores).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    kwargs: dict = {"runtime_env": {"env_vars": env}} if env else {}
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True, **kwargs)
    else:
        log.info("starting a local Ray cluster on 127.0.0.1 (num_cpus=%s)", num_cpus or os.cpu_count())
        # Loopback only. The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner
        # polls; without it every poll fails with a warning and orphaned placement groups are never cleaned.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                 log_to_driver=True, **kwargs)


def gpus_available() -> int:
    """GPUs in the connected cluster (0 on a CPU-only machine)."""
    return int(ray.cluster_resources().get("GPU", 0))
