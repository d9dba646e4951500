"""Connecting to Ray: an existing cluster when asked (``address`` / ``RAY_ADDRESS``), else a local one.

Inside a job submitted with ``ray job submit`` (or a KubeRay ``RayJob``) Ray sets ``RAY_ADDRESS`` for the entrypoint,
so the CLI joins the job's cluster without any flag.

``python -m infra.ray_cluster --wait GPU=8 -- tec-pipeline extract ...`` blocks until the connected cluster has
those resources (asking an autoscaler for them first), then replaces itself with the command after ``--``. The
cluster manifests start every stage this way, so that extraction never starts on CPUs while GPU nodes are still
joining. It is one command, not ``wait && stage``: KubeRay pastes a RayJob's entrypoint into a shell line of its
submitter pod, where ``&&`` would run the stage in that pod instead of in the job.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import ray

from infra import ray_logs
from infra.redaction import install_log_redaction

log = logging.getLogger(__name__)
LOOPBACK = "127.0.0.1"

# Environment every Ray worker process should inherit (S3 endpoint and region; never credentials by value —
# workers read those from their own environment or credential files, exactly as the driver does).
_FORWARDED_ENV = ("TEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "TEC_S3_REGION",
                  "AWS_DEFAULT_REGION", "TEC_LOG_LEVEL")
# Set by Ray in the entrypoint of a submitted job: the job's config, runtime_env included.
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Ray Train's controller polls its workers every this many seconds (Ray's default: 2.0), and a worker's
# ``ray.train.report`` waits until the controller has taken the previous report (a queue of one). So a run that
# reports more often than the poll is held to one report per poll; the train stage polls faster (a few remote calls
# per worker per second) unless the variable is set.
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = 0.25


def job_env_vars() -> dict[str, str]:
    """The ``env_vars`` of the runtime environment of the submitted Ray job this process runs in (else empty).

    Every worker of such a job already receives them; ``ray.init`` refuses a driver runtime environment that sets
    any of the same names again.
    """
    return dict(_job_runtime_env().get("env_vars") or {})


def _job_runtime_env() -> dict:
    """The runtime environment of the submitted Ray job this process runs in (else empty)."""
    raw = os.environ.get(_JOB_CONFIG_ENV)
    if not raw:
        return {}
    try:
        return dict(json.loads(raw).get("runtime_env") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


def forwarded_env() -> dict[str, str]:
    """The variables of ``_FORWARDED_ENV`` set here and not already provided by the job's runtime environment."""
    already = job_env_vars()
    return {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ and k not in already}


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
    kwargs: dict = {"runtime_env": _runtime_env(), "log_to_driver": True, "logging_level": _ray_driver_level()}
    if address:
        log.info("connecting to Ray cluster at %s", address)
        ray.init(address=address, **kwargs)
    else:
        log.info("starting a local Ray cluster on 127.0.0.1 (num_cpus=%s)", num_cpus or os.cpu_count())
        # Loopback only. The dashboard process serves Ray's state API, which Ray Train's placement-group cleaner
        # polls; without it every poll fails with a warning and orphaned placement groups are never cleaned.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host=LOOPBACK, _node_ip_address=LOOPBACK,
                 **kwargs)
    install_log_redaction()  # Ray's own handlers exist only now
    if ray_logs.route_worker_output():
        where = ray_logs.session_logs_dir() or "the Ray session logs of each node (/tmp/ray/session_latest/logs)"
        log.info("Ray's own output (Ray Train reports, actor warnings) goes to %s; --log-level DEBUG shows it here",
                 where)


@contextlib.contextmanager
def train_poll_interval(seconds: float = TRAIN_POLL_S) -> Iterator[float]:
    """Ray Train's controller poll interval for the runs started inside (``$RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``,
    which Ray Train reads when ``fit()`` starts its controller): ``seconds`` unless the variable is set already
    (then that value is kept and yielded); the environment is restored on exit."""
    if TRAIN_POLL_ENV in os.environ:
        yield float(os.environ[TRAIN_POLL_ENV])
        return
    os.environ[TRAIN_POLL_ENV] = str(seconds)
    try:
        yield seconds
    finally:
        os.environ.pop(TRAIN_POLL_ENV, None)


def fit_torch_trainer(loop: Callable[[dict], None], loop_config: dict[str, Any], *, run_name: str,
                      storage_path: str, num_workers: int, use_gpu: bool, cpus_per_worker: float,
                      max_failures: int, keep_checkpoints: int, address: str | None = None) -> Any:
    """Run ``loop(loop_config)`` on ``num_workers`` Ray Train workers (``TorchTrainer``) and return its ``Result``.

    The run's Ray Train state lives under ``storage_path/run_name`` (any fsspec URL: :func:`infra.storage.ray_storage`);
    a worker group that fails is restarted up to ``max_failures`` times from its latest checkpoint, and Ray keeps the
    last ``keep_checkpoints``. The controller polls at :func:`train_poll_interval`.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from infra import storage

    ensure_ray(address)
    ray_path, fs = storage.ray_storage(storage_path)
    trainer = TorchTrainer(
        loop, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=run_name, storage_path=ray_path, storage_filesystem=fs,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
    )
    with train_poll_interval():  # reports are not held to Ray's 2 s poll (TRAIN_POLL_S)
        return trainer.fit()


def _runtime_env() -> dict:
    """The driver's runtime environment: the forwarded variables and the workers' logging hook, where the
    submitted job's own runtime environment does not set them already."""
    env = forwarded_env()
    runtime_env: dict = {"env_vars": env} if env else {}
    if "worker_process_setup_hook" not in _job_runtime_env():
        runtime_env["worker_process_setup_hook"] = ray_logs.SETUP_HOOK
    return runtime_env


def _ray_driver_level() -> int:
    """Level of Ray's own logger on the driver: its start-up notices and warnings only with ``--log-level DEBUG``."""
    return logging.INFO if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.ERROR


def gpus_available() -> int:
    """GPUs in the connected cluster (0 on a CPU-only machine)."""
    return int(ray.cluster_resources().get("GPU", 0))


def wait_for_resources(required: dict[str, float], timeout_s: float = 1800.0, poll_s: float = 5.0) -> dict:
    """Block until the connected cluster's total resources cover ``required``.

    An autoscaling cluster (cluster launcher, KubeRay with ``enableInTreeAutoscaling``) is asked for the
    resources first, one bundle per unit of each resource, and the request is withdrawn once they are there.

    Args:
        required: e.g. ``{"GPU": 8}`` or ``{"CPU": 2}``.
        timeout_s: give up after this many seconds.
        poll_s: seconds between checks.

    Returns:
        The cluster's total resources when they sufficed.

    Raises:
        TimeoutError: the resources did not appear in time (the message lists what is there).
    """
    from ray.autoscaler.sdk import request_resources

    def short(have: dict) -> dict:
        return {k: have.get(k, 0) for k in required}

    bundles = [{name: 1.0} for name, amount in required.items() for _ in range(int(amount))]
    requested = False
    try:
        request_resources(bundles=bundles)
        requested = True
    except Exception as exc:  # a cluster without an autoscaler still serves the wait below
        log.debug("request_resources not available: %s", exc)
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            have = ray.cluster_resources()
            if all(have.get(name, 0) >= amount for name, amount in required.items()):
                log.info("cluster resources ready: %s", short(have))
                return have
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the cluster has {short(have)} after {timeout_s:.0f}s, needs {required}")
            log.info("waiting for cluster resources %s (have %s)", required, short(have))
            time.sleep(poll_s)
    finally:
        if requested:
            request_resources(bundles=[])


def _parse_requirement(text: str) -> tuple[str, float]:
    name, sep, amount = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=AMOUNT (e.g. GPU=8), got {text!r}")
    try:
        return name, float(amount)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: AMOUNT must be a number") from None


def main(argv: list[str] | None = None) -> None:
    """``python -m infra.ray_cluster [--address A] --wait GPU=8 [--wait CPU=16] [--timeout S] [-- COMMAND ...]``."""
    parser = argparse.ArgumentParser(prog="python -m infra.ray_cluster", description=main.__doc__)
    parser.add_argument("--address", default=None, help="cluster address (default $RAY_ADDRESS)")
    parser.add_argument("--wait", type=_parse_requirement, action="append", required=True,
                        metavar="NAME=AMOUNT", help="a resource total to wait for (repeatable)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before giving up (exit 1)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="after --: the command to run (in place of this process) once the resources are there")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        parser.error("no cluster to wait for: pass --address or set RAY_ADDRESS")
    cwd = os.getcwd()  # the job's working directory; connecting a driver to a job's cluster can move it
    ensure_ray(address)
    try:
        wait_for_resources(dict(args.wait), timeout_s=args.timeout)
    except TimeoutError as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        ray.shutdown()
    if command:
        os.chdir(cwd)
        log.info("starting %s in %s", command[0], cwd)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(command[0], command)


if __name__ == "__main__":
    main()
