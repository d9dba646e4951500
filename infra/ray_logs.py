"""Ray workers' output on the driver: the project's log lines shown as log records, Ray's own lines kept back.

Every Ray worker process (extraction actors, Ray Train's workers and controller) writes its stdout and stderr to
Ray's session log files (``<session>/logs/worker-*.out`` / ``.err``), and with ``log_to_driver`` Ray prints every one
of those lines on the driver's terminal: Ray Train's per-report ``TrainingReport(...)`` dicts, worker-group start-up
messages, actor warnings, next to the few lines a person waits for.

Two halves keep the terminal to the project's own lines:

* :func:`setup_worker_logging` runs in every worker process (``runtime_env["worker_process_setup_hook"]``, set by
  :func:`infra.ray_cluster.ensure_ray`). It writes the records of the project's loggers (:data:`PROJECT_LOGGERS`,
  level ``$TEC_LOG_LEVEL`` or INFO) to stderr as ``[tec LEVEL logger] message``, and only there.
* :func:`route_worker_output` replaces Ray's printer on the driver. A marked line becomes a record of its logger on
  the driver, naming the worker (``(RayTrainWorker pid=…) step 50: loss …``), so it is shown, filtered and redacted
  like the driver's own records. Every other line of a worker process becomes a DEBUG record of this module's
  logger: shown with ``--log-level DEBUG``, and in the session's log files either way. Lines of the raylet and the
  autoscaler (a node out of memory, resources no node can provide) are printed by Ray as before.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

from infra.redaction import RedactingFilter, install_log_redaction

log = logging.getLogger(__name__)

PROJECT_LOGGERS = ("stages", "pipeline", "infra", "tec_model", "run_pipeline")
WORKER_FORMAT = "[tec %(levelname)s %(name)s] %(message)s"
SETUP_HOOK = f"{__name__}.setup_worker_logging"
_MARKED = re.compile(r"^\[tec (DEBUG|INFO|WARNING|ERROR|CRITICAL) ([\w.]+)\] (.*)$", re.DOTALL)
_RAY_PRINTER = "ray_print_logs"  # the name ray.init gives its printer of worker output
_RAY_PROCESSES = ("raylet", "autoscaler")


class _StderrAtEmit(logging.StreamHandler):
    """A stream handler writing to whatever ``sys.stderr`` is when a record is emitted (Ray redirects it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def setup_worker_logging() -> None:
    """In a Ray worker: the project's loggers write marked lines to stderr (and not through the root logger)."""
    level = os.environ.get("TEC_LOG_LEVEL", "INFO").upper()
    if level not in logging.getLevelNamesMapping():
        level = "INFO"
    handler = _StderrAtEmit()
    handler.setFormatter(logging.Formatter(WORKER_FORMAT))
    handler.addFilter(RedactingFilter())  # the lines land in Ray's session logs before the driver sees them
    install_log_redaction(("ray",))  # and every record of the worker, Ray's own included, as it is made
    for name in PROJECT_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [h for h in logger.handlers if not isinstance(h, _StderrAtEmit)] + [handler]
        logger.setLevel(level)
        logger.propagate = False


def worker_record(data: dict[str, Any], line: str) -> logging.LogRecord:
    """The driver's log record for one ``line`` of a worker's output.

    Args:
        data: Ray's batch of worker output (``pid``, ``actor_name`` or ``task_name``, ``ip``, ``localhost``).
        line: one line of it.

    Returns:
        A record of the logger named in a marked line, at its level; else a DEBUG record of this module's logger.
    """
    who = data.get("actor_name") or data.get("task_name") or "worker"
    ip = "" if data.get("ip") == data.get("localhost") else f", ip={data.get('ip')}"
    source = f"({who} pid={data.get('pid')}{ip})"
    marked = _MARKED.match(line)
    name, level, text = (marked[2], logging.getLevelName(marked[1]), marked[3]) if marked else (
        __name__, logging.DEBUG, line)
    return logging.getLogger(name).makeRecord(name, level, "(ray worker)", 0, "%s %s", (source, text), None)


def _route(ray_printer: Callable[[dict[str, Any]], None], data: dict[str, Any]) -> None:
    """Ray's stream-dispatcher handler: raylet and autoscaler output to Ray's printer, workers' lines to logging."""
    if data.get("pid") in _RAY_PROCESSES:
        ray_printer(data)
        return
    for line in data.get("lines", []):
        record = worker_record(data, line)
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def route_worker_output() -> bool:
    """Replace Ray's printer of worker output on this driver by :func:`_route` (after ``ray.init``).

    Returns:
        Whether it was replaced (False without ``log_to_driver``, in Ray client mode, or when already routed).
    """
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    printer = dict(dispatcher.handlers).get(_RAY_PRINTER)
    if printer is None or getattr(printer, "func", None) is _route:
        return False
    dispatcher.remove_handler(_RAY_PRINTER)
    dispatcher.add_handler(_RAY_PRINTER, functools.partial(_route, printer))
    return True


def session_logs_dir() -> str | None:
    """The local Ray session's log folder (every worker's full output), or None when connected to a cluster."""
    import ray

    node = ray._private.worker._global_node
    return node.get_logs_dir_path() if node is not None else None
