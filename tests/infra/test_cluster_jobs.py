"""extract and train as two real ``ray job submit`` jobs on a two-node cluster, cache and runs on moto's S3.

Credentials stay on the nodes, as on a real cluster (instance role, credential files): moto's (dummy) keys are in
the environment of the ``ray start`` processes only, and the job's drivers and workers inherit them from their
raylets. ``--runtime-env-json`` carries only non-secret settings (the S3 endpoint and region): Ray stores a job's
runtime env in the cluster and shows it on the dashboard, and the test checks that none of it looks like a secret,
before the submission and as the cluster recorded it. The code reaches the cluster only through ``--working-dir``.
configs/tiny.yaml with one CPU per actor and per training worker, so each stage is spread over both 1-CPU nodes.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

import run_pipeline
from infra import ray_cluster, storage
from pipeline.ledger import read_ledger
from tests.infra.security_checks import secret_findings

pytestmark = pytest.mark.timeout(1200)  # a two-node cluster and two submitted jobs (400 s allowed each)
REPO = Path(__file__).resolve().parents[2]
TINY = "configs/tiny.yaml"
ONE_CPU_EACH = ["extract.num_actors=2", "extract.threads_per_actor=1", "train.num_workers=2",
                "train.threads_per_worker=1"]
RUN_NAME = "cluster-run"
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def last_json(text: str) -> dict[str, Any]:
    """The last top-level JSON object the CLI printed (a line ``{`` up to the next line ``}``)."""
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    end = next(i for i in range(start, len(lines)) if lines[i] == "}")
    return json.loads("\n".join(lines[start:end + 1]))


def stored_runtime_env(cluster: Any, job_id: str) -> dict:
    """The runtime env of a submitted job as the cluster stores it (what the dashboard shows)."""
    out = cluster.ray("list", "jobs", "--address", cluster.dashboard_url, "--format", "json", "--detail",
                      "--filter", f"submission_id={job_id}").stdout
    (job,) = json.loads(out[out.index("["):])
    return job["runtime_env"]


def submit(cluster: Any, runtime_env: dict, *argv: str) -> tuple[str, dict]:
    """Submit ``run_pipeline.py --address auto <argv>`` as a job, behind the manifests' resource wait (both nodes'
    CPUs), and wait for it; returns its logs and its runtime env as the cluster stored it."""
    findings = secret_findings(runtime_env, cluster.secret_values())
    assert not findings, f"a job's runtime env must not carry credentials: {findings}"
    job_id = f"tec-{argv[0]}-{uuid.uuid4().hex[:8]}"
    url = cluster.dashboard_url
    entrypoint = [sys.executable, "-m", "infra.ray_cluster", "--wait", "CPU=2", "--timeout", "120", "--",
                  sys.executable, "run_pipeline.py", "--log-level", "INFO", "--address", "auto", *argv]
    sub = cluster.ray("job", "submit", "--address", url, "--submission-id", job_id, "--working-dir", str(REPO),
                      "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint, timeout=400)
    status = cluster.ray("job", "status", "--address", url, job_id).stdout
    logs = cluster.ray("job", "logs", "--address", url, job_id).stdout
    assert "succeeded" in status.lower(), \
        f"job {job_id}: {status}\n--- submit ---\n{sub.stdout[-3000:]}\n--- logs ---\n{logs}"
    return logs, stored_runtime_env(cluster, job_id)


def actor_nodes(cluster: Any, class_name: str) -> set[str]:
    """Node ids of every actor of ``class_name`` the cluster ran (dead ones included)."""
    out = cluster.ray("list", "actors", "--address", cluster.dashboard_url, "--format", "json", "--detail",
                      "--limit", "10000").stdout
    actors = json.loads(out[out.index("["):])
    return {a["node_id"] for a in actors if class_name in (a.get("class_name") or "")}


@pytest.fixture(scope="module")
def s3_root(moto_endpoint: str) -> str:
    import boto3

    bucket = f"tec-cluster-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/tec"


@pytest.fixture(scope="module")
def cluster_node_env(moto_endpoint: str) -> dict[str, str]:
    """The nodes' own S3 credentials (moto's dummy keys, from this session's environment); overrides conftest's."""
    return {name: os.environ[name] for name in S3_CREDENTIALS}


@pytest.fixture(scope="module")
def two_jobs(ray_cluster, local_ray_cluster, moto_endpoint: str, s3_root: str, fmnist_dir) -> dict[str, Any]:
    """Both jobs, while the test session's own local Ray (``ray_cluster``, in this process) keeps running."""
    runtime_env = {
        "env_vars": {"TEC_S3_ENDPOINT_URL": moto_endpoint, "AWS_DEFAULT_REGION": "us-east-1"},
        "excludes": [".git", ".venv", "outputs", "*.egg-info", "__pycache__"],
    }
    overrides = [f"output_root={s3_root}", *ONE_CPU_EACH]
    extract_logs, extract_env = submit(local_ray_cluster, runtime_env, "extract", "--config", TINY, *overrides)
    extract_actors = actor_nodes(local_ray_cluster, "UnitExtractor")
    train_logs, train_env = submit(local_ray_cluster, runtime_env, "train", "--config", TINY, "--run-name", RUN_NAME,
                                   *overrides, "train.epochs=1",  # not part of the cache key
                                   "train.loader_workers=0")  # batches read in the workers: no loader start-up
    return {"extract": last_json(extract_logs), "train": last_json(train_logs), "train_logs": train_logs,
            "extract_actors": extract_actors, "train_workers": actor_nodes(local_ray_cluster, "RayTrainWorker"),
            "stored_runtime_envs": [extract_env, train_env]}


@pytest.mark.cluster
@pytest.mark.slow
def test_train_job_reuses_the_extract_jobs_cache_on_s3(two_jobs, s3_root):
    extract, train = two_jobs["extract"], two_jobs["train"]
    cache = extract["cache"]
    assert cache.startswith(f"{s3_root}/caches/") and extract["reused"] is False
    assert extract["units_written"] == 4 and extract["views_written"] == 256 * 2
    assert train["run_dir"] == f"{s3_root}/runs/{RUN_NAME}"
    assert train["export"] and storage.exists(train["export"])
    run_config = json.loads(storage.read_bytes(storage.join(train["run_dir"], "config.json")))
    assert run_config["cache_url"] == cache  # the second job trained from the first job's cache
    assert "extract done" not in two_jobs["train_logs"]  # and extracted nothing itself
    assert "cluster resources ready" in two_jobs["train_logs"]  # the stage ran behind the resource wait
    assert storage.list_dir(f"{s3_root}/caches") == [cache.rsplit("/", 1)[1]]
    assert storage.list_dir(f"{s3_root}/runs") == [RUN_NAME]
    extractions, runs = read_ledger(cache)
    assert extractions.num_rows == 1 and runs.num_rows == 1
    assert runs.column("run_name").to_pylist() == [RUN_NAME]


@pytest.mark.cluster
@pytest.mark.slow
def test_both_stages_ran_on_both_nodes(two_jobs, local_ray_cluster):
    nodes = {n["node_id"] for n in local_ray_cluster.nodes()}
    assert len(nodes) == 2
    assert two_jobs["extract_actors"] == nodes, "extract actors did not use both nodes"
    assert two_jobs["train_workers"] == nodes, "training workers did not use both nodes"


@pytest.mark.cluster
@pytest.mark.slow
def test_credentials_reach_the_jobs_only_through_the_nodes(two_jobs, local_ray_cluster):
    """The jobs wrote to S3 with keys that only the nodes had; neither runtime env the cluster stored holds one."""
    assert set(S3_CREDENTIALS) <= set(local_ray_cluster.node_env)
    assert not set(S3_CREDENTIALS) & set(local_ray_cluster.env)  # the submitting `ray` commands never had them
    for stored in two_jobs["stored_runtime_envs"]:
        assert stored["env_vars"] == {"TEC_S3_ENDPOINT_URL": ANY, "AWS_DEFAULT_REGION": "us-east-1"}, stored
        assert secret_findings(stored, local_ray_cluster.secret_values()) == [], stored


def test_the_secret_scan_flags_credentials_in_a_runtime_env():
    token = "f3" * 32
    leaky = {"env_vars": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "MY_VAR": token,
                          "KEY": "AKIA" + "A" * 16, "URL": "https://user:pw@example.com/x"}}
    findings = secret_findings(leaky, [token])
    for where in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MY_VAR", "KEY", "URL"):
        assert any(f.startswith(f"env_vars.{where}:") for f in findings), (where, findings)
    clean = {"env_vars": {"TEC_S3_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_DEFAULT_REGION": "us-east-1"},
             "working_dir": "gcs://_ray_pkg_0123456789abcdef.zip", "excludes": [".git", "*.egg-info"]}
    assert secret_findings(clean, [token, "testing"]) == []


def test_job_runtime_env_vars_are_not_forwarded_twice(monkeypatch):
    """Inside a submitted job, ray.init refuses a driver runtime_env that repeats a job env var."""
    monkeypatch.setenv("TEC_S3_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert {"TEC_S3_ENDPOINT_URL", "AWS_DEFAULT_REGION"} <= set(ray_cluster.forwarded_env())
    job_config = {"runtime_env": {"env_vars": {"TEC_S3_ENDPOINT_URL": "http://127.0.0.1:9"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job_config))
    forwarded = ray_cluster.forwarded_env()
    assert "TEC_S3_ENDPOINT_URL" not in forwarded and forwarded["AWS_DEFAULT_REGION"] == "us-east-1"


def test_address_flag_sets_ray_address():
    parser = run_pipeline.build_parser()
    for address in ("10.0.0.5:6379", "auto", "1:30"):
        args = parser.parse_args(["--address", address, "train", "--config", str(REPO / TINY), "train.epochs=1"])
        assert run_pipeline._config(args).ray.address == address
    args = parser.parse_args(["train", "--config", str(REPO / TINY)])
    assert run_pipeline._config(args).ray.address is None


@pytest.mark.cluster
@pytest.mark.slow
def test_the_job_cluster_shares_nothing_with_the_sessions_local_ray(two_jobs, local_ray_cluster):
    import ray

    session_dir = Path(ray._private.worker._global_node.get_session_dir_path())
    assert local_ray_cluster.temp_dir not in session_dir.parents
    ours = {n["node_id"] for n in local_ray_cluster.nodes()}
    assert ours.isdisjoint(n["NodeID"] for n in ray.nodes())
    assert (local_ray_cluster.temp_dir / "ray_current_cluster").read_text().endswith(f":{local_ray_cluster.gcs_port}")
    default_address_file = Path("/tmp/ray/ray_current_cluster")
    if default_address_file.exists():
        assert not default_address_file.read_text().endswith(f":{local_ray_cluster.gcs_port}")
