"""infra.logs and infra.ray_logs: progress lines thinned out, Ray workers' lines told apart on the driver."""

from __future__ import annotations

import logging

from infra import ray_logs
from infra.logs import ProgressThrottle

BATCH = {"pid": 4711, "actor_name": "RayTrainWorker", "ip": "10.0.0.1", "localhost": "10.0.0.1"}


def _record(message: str, created: float, level: int = logging.INFO) -> logging.LogRecord:
    record = logging.LogRecord("stages.extract", level, __file__, 1, message, None, None)
    record.created = created
    return record


def test_progress_lines_are_shown_at_most_every_interval_with_first_and_last() -> None:
    throttle = ProgressThrottle(interval_s=10.0)
    shown = [t for t in range(0, 25) if throttle.filter(_record(f"extract: units {t + 1}/40 | 9 img/s", float(t)))]
    assert shown == [0, 10, 20]
    assert throttle.filter(_record("extract: units 40/40 | 9 img/s", 25.0))  # complete: always shown
    assert throttle.filter(_record("features: 3/9 images", 25.5))  # another kind of progress: its own clock
    assert throttle.filter(_record("extract: units 1/40 failed", 26.0, logging.WARNING))  # warnings always
    assert throttle.filter(_record("wrote /tmp/x/1/2", 26.5)) and throttle.filter(_record("no count here", 26.6))


def test_a_marked_worker_line_becomes_a_record_of_its_logger_naming_the_worker() -> None:
    record = ray_logs.worker_record(BATCH, "[tec INFO stages.train.loop] step 50: loss 0.7178")
    assert (record.name, record.levelno) == ("stages.train.loop", logging.INFO)
    assert record.getMessage() == "(RayTrainWorker pid=4711) step 50: loss 0.7178"
    warning = ray_logs.worker_record({**BATCH, "ip": "10.0.0.2"}, "[tec WARNING stages.extract] image 3 skipped")
    assert warning.levelno == logging.WARNING and "pid=4711, ip=10.0.0.2) image 3" in warning.getMessage()


def test_rays_own_worker_lines_become_debug_records() -> None:
    line = "Reporting training result 3: TrainingReport(checkpoint=None, metrics={'step': 20}) from rank 0"
    record = ray_logs.worker_record(BATCH, line)
    assert (record.name, record.levelno) == ("infra.ray_logs", logging.DEBUG)
    assert record.getMessage().endswith(line)


def test_worker_logging_writes_marked_lines_that_the_driver_reads_back(capsys, monkeypatch) -> None:
    monkeypatch.setenv("TEC_LOG_LEVEL", "INFO")  # the level a worker reads at start-up (CI runs at WARNING)
    loggers = {name: logging.getLogger(name) for name in ray_logs.PROJECT_LOGGERS}
    saved = {name: (lg.handlers[:], lg.level, lg.propagate) for name, lg in loggers.items()}
    try:
        ray_logs.setup_worker_logging()
        ray_logs.setup_worker_logging()  # idempotent: one handler
        logging.getLogger("pipeline.demo").info("evaluating %s", "model")
        line = capsys.readouterr().err.strip()
        # a worker's line reaches Ray's session logs before the driver's filter: it is redacted where it is written
        logging.getLogger("stages.extract").warning("image 3 skipped: https://h/x.png?X-Amz-Signature=s3cr3t")
        skipped = capsys.readouterr().err.strip()
    finally:
        for name, (handlers, level, propagate) in saved.items():
            loggers[name].handlers, loggers[name].propagate = handlers, propagate
            loggers[name].setLevel(level)
    assert line == "[tec INFO pipeline.demo] evaluating model"
    assert skipped == "[tec WARNING stages.extract] image 3 skipped: https://h/x.png?X-Amz-Signature=<redacted>"
    assert ray_logs.worker_record(BATCH, line).getMessage() == "(RayTrainWorker pid=4711) evaluating model"


def test_every_record_is_redacted_once_ray_is_started_whatever_its_handler(ray_cluster) -> None:
    """Ray gives some of its loggers their own non-propagating handlers, some only when a subsystem starts (after
    the CLI and ensure_ray installed the redaction): records are redacted as they are made, so those handlers,
    which carry no filter of ours, see the redacted text too."""
    seen: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    late = logging.getLogger("ray.data.tec_late_subsystem")
    late.addHandler(Keep())
    late.propagate = False
    try:
        late.error("reading %s", "https://h/x.png?X-Amz-Signature=s3cr3t")  # at the level Ray lets through
        try:
            raise OSError("GET https://h/y?token=s3cr3t failed")
        except OSError:
            late.exception("download failed")
    finally:
        late.handlers.clear()
    assert [r.getMessage() for r in seen] == ["reading https://h/x.png?X-Amz-Signature=<redacted>", "download failed"]
    assert "s3cr3t" not in seen[1].exc_text and "token=<redacted>" in seen[1].exc_text
