"""Stage 1 — extract: run the frozen base model once over the view plan and write the target cache.

* :mod:`stages.extract.job`: what to extract (:class:`ExtractJob`, :class:`LeaseConfig`), its cache identity
  (:func:`build_spec`, :func:`resolve_spec`) and what a run reports (:class:`ExtractResult`);
* :mod:`stages.extract.worker`: :class:`UnitExtractor`, which loads the base model once and writes whole units;
* :mod:`stages.extract.pool`: who runs the workers (Ray actors, or one worker in this process);
* :mod:`stages.extract.driver`: :func:`run_extract`, which claims units and keeps the pool busy.

Every public name is importable from ``stages.extract`` itself.
"""

from stages.extract.driver import prepare, run_extract, summarize
from stages.extract.job import ExtractJob, ExtractResult, LeaseConfig, build_spec, resolve_spec, result_dict, sha256_hex
from stages.extract.pool import InProcessPool, RayActorPool, WorkerLostError
from stages.extract.worker import NonFiniteTargetsError, UnitExtractor, check_finite

__all__ = [
    "ExtractJob", "ExtractResult", "InProcessPool", "LeaseConfig", "NonFiniteTargetsError", "RayActorPool",
    "UnitExtractor", "WorkerLostError", "build_spec", "check_finite", "prepare", "resolve_spec", "result_dict",
    "run_extract", "sha256_hex", "summarize",
]
