"""infra/cluster/ and infra/docker/: the manifests parse, carry the required fields, and ask for the resources the
configs they run will request (GPUs per actor / worker, actor and worker counts, CPUs per worker); every Ray cluster
runs with token auth (the token from a Secret or a file, never a literal) and a NetworkPolicy lets only the cluster's
own pods in, plus the job's submitters on the jobs API."""

from __future__ import annotations

import copy
import os
import re
import shlex
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

import run_pipeline
from infra.ray_cluster import _parse_requirement
from pipeline.config_schema import PipelineConfig
from tests.infra.security_checks import network_problems, ray_templates, secret_findings

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "infra" / "cluster"
DOCKERFILE = REPO / "infra" / "docker" / "Dockerfile"
GPU = "nvidia.com/gpu"
TOKEN_KEY = "auth_token"  # the key KubeRay reads from an authOptions Secret


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def rayjobs() -> dict[str, dict]:
    return {p.name: d for p in sorted(CLUSTER.glob("*.yaml")) for d in documents(p) if d.get("kind") == "RayJob"}


def policies() -> list[dict]:
    return [d for p in sorted(CLUSTER.glob("*.yaml")) for d in documents(p) if d.get("kind") == "NetworkPolicy"]


def image_workdir() -> str:
    return re.findall(r"^WORKDIR\s+(\S+)", DOCKERFILE.read_text(), re.MULTILINE)[-1]


@dataclass
class Entrypoint:
    """A RayJob entrypoint: ``python -m infra.ray_cluster --wait ... -- tec-pipeline <stage> ...``."""

    wait: dict[str, float]
    args: Any  # the CLI's argparse namespace
    cfg: PipelineConfig


def parse_entrypoint(text: str) -> Entrypoint:
    tokens = shlex.split(text)
    split = tokens.index("--")
    wait_cmd, main_cmd = tokens[:split], tokens[split + 1:]
    assert wait_cmd[:3] == ["python", "-m", "infra.ray_cluster"], wait_cmd
    wait = dict(_parse_requirement(wait_cmd[i + 1]) for i, tok in enumerate(wait_cmd) if tok == "--wait")
    assert main_cmd[0] == "tec-pipeline", main_cmd
    args = run_pipeline.build_parser().parse_args(main_cmd[1:])
    workdir = image_workdir().rstrip("/") + "/"
    assert args.config.startswith(workdir), f"--config {args.config} is not inside the image's WORKDIR {workdir}"
    local = copy.copy(args)
    local.config = str(REPO / args.config[len(workdir):])
    return Entrypoint(wait, args, run_pipeline._config(local))


def cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def worker_pods(spec: dict) -> list[dict]:
    """Per worker group: replicas, GPUs and Ray CPUs per pod."""
    pods = []
    for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        limits, requests = res.get("limits", {}), res.get("requests", {})
        ray_cpus = group.get("rayStartParams", {}).get("num-cpus")
        pods.append({"group": group["groupName"], "replicas": group["replicas"], "min": group.get("minReplicas", 0),
                     "max": group.get("maxReplicas", group["replicas"]), "gpus": int(limits.get(GPU, 0)),
                     "gpu_request": int(requests.get(GPU, limits.get(GPU, 0))),
                     "cpus": cpus(ray_cpus if ray_cpus is not None else limits["cpu"])})
    return pods


def train_problems(cfg: PipelineConfig, pods: list[dict], what: str) -> list[str]:
    """Ray Train asks for ``num_workers`` × {GPU: 1, CPU: threads_per_worker} (``use_gpu``); each worker's
    ``loader_workers`` reader processes run beside it on CPUs Ray does not reserve, so a pod needs both."""
    t = cfg.train
    gpus = sum(p["replicas"] * p["gpus"] for p in pods)
    out = [] if t.use_gpu else [f"{what}: train.use_gpu is false on a GPU cluster"]
    if t.num_workers != gpus:
        out.append(f"{what}: train.num_workers {t.num_workers} != {gpus} worker GPUs")
    per_gpu = t.threads_per_worker + t.loader_workers
    out += [f"{what}: group {p['group']} has {p['cpus']} CPUs for {p['gpus']} workers × (train.threads_per_worker "
            f"{t.threads_per_worker} + train.loader_workers {t.loader_workers})"
            for p in pods if p["gpus"] and p["cpus"] < p["gpus"] * per_gpu]
    return out


def rayjob_problems(job: dict) -> list[str]:
    """Everything wrong with a RayJob: required fields, versions, and resources against its config."""
    out: list[str] = []
    if job.get("apiVersion") != "ray.io/v1" or job.get("kind") != "RayJob" or not job.get("metadata", {}).get("name"):
        out.append("apiVersion ray.io/v1, kind RayJob and metadata.name are required")
    spec = job["spec"]
    if re.search(r"&&|\|\||[;|&<>`$]", spec["entrypoint"]):  # KubeRay pastes it into its submitter's shell line
        out.append("the entrypoint must be one command without shell operators (they would run in the submitter pod)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        out.append("shutdownAfterJobFinishes must be true (GPU pods must not outlive the job)")
    if not spec.get("backoffLimit", 0) >= 1:
        out.append("backoffLimit >= 1: a preempted job must be retried")
    rc = spec["rayClusterSpec"]
    if rc.get("rayVersion") != ray.__version__:
        out.append(f"rayVersion {rc.get('rayVersion')} != installed Ray {ray.__version__}")
    head = rc["headGroupSpec"]
    if str(head.get("rayStartParams", {}).get("num-cpus")) != "0":
        out.append("the head must have num-cpus 0 (no actors or workers on the GPU-less head)")
    templates = [head["template"]] + [g["template"] for g in rc["workerGroupSpecs"]]
    images = {c["image"] for t in templates for c in t["spec"]["containers"]}
    if len(images) != 1:
        out.append(f"head and workers must run one image, found {sorted(images)}")
    accounts = {t["spec"].get("serviceAccountName") for t in templates}
    if len(accounts) != 1 or None in accounts:
        out.append(f"every pod needs the same serviceAccountName (S3 access), found {accounts}")
    pods = worker_pods(spec)
    for p in pods:
        if not p["min"] <= p["replicas"] <= p["max"]:
            out.append(f"group {p['group']}: minReplicas <= replicas <= maxReplicas")
        if p["gpu_request"] != p["gpus"]:
            out.append(f"group {p['group']}: GPU requests must equal limits")
    gpus = sum(p["replicas"] * p["gpus"] for p in pods)
    try:
        ep = parse_entrypoint(spec["entrypoint"])
    except (ValueError, AssertionError, SystemExit) as exc:  # SystemExit: the CLI's parser refused it
        return [*out, f"the entrypoint does not parse as `python -m infra.ray_cluster ... -- tec-pipeline ...`: {exc}"]
    cfg, stage = ep.cfg, ep.args.command
    if ep.wait.get("GPU") != gpus:
        out.append(f"--wait GPU={ep.wait.get('GPU')} but the worker groups hold {gpus} GPUs")
    if not cfg.output_root.startswith("s3://"):
        out.append(f"output_root {cfg.output_root} must be on s3://")
    if stage == "extract":
        if cfg.extract.num_actors != gpus:
            out.append(f"extract.num_actors {cfg.extract.num_actors} != {gpus} worker GPUs (one GPU per actor)")
        if cfg.base.checkpoint is None and cfg.base.pretrain.epochs > 0:
            out += train_problems(cfg, pods, "base.pretrain (Ray Train inside the extract job)")
    elif stage == "train":
        out += train_problems(cfg, pods, "train")
        if not ep.args.run_name:
            out.append("train needs a fixed --run-name, so that a rerun resumes instead of starting over")
    else:
        out.append(f"unexpected stage {stage!r}")
    return out


def auth_problems(job: dict) -> list[str]:
    """Token auth: ``authOptions`` token mode with a Secret; no container turns it off or holds a token literally;
    no secret in the job's runtime env (stored in the cluster, shown by the dashboard)."""
    name, spec = job["metadata"]["name"], job["spec"]
    auth = spec["rayClusterSpec"].get("authOptions") or {}
    secret = auth.get("secretName")
    out = [] if auth.get("mode") == "token" else [f"{name}: rayClusterSpec.authOptions.mode must be token"]
    if not secret:
        out.append(f"{name}: rayClusterSpec.authOptions.secretName must name the Secret holding the token")
    for role, template in ray_templates(spec).items():
        for c in template["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            if env.get("RAY_AUTH_MODE", {"value": "token"}).get("value") != "token":
                out.append(f"{name} {role}: env RAY_AUTH_MODE must be token (KubeRay keeps a container's own value)")
            token = env.get("RAY_AUTH_TOKEN")
            if token is not None and token.get("valueFrom", {}).get("secretKeyRef") != {"name": secret,
                                                                                       "key": TOKEN_KEY}:
                out.append(f"{name} {role}: env RAY_AUTH_TOKEN must come from secretKeyRef {secret}/{TOKEN_KEY}, "
                           "never a literal value")
            literals = {k: e["value"] for k, e in env.items() if "value" in e}
            out += [f"{name} {role}: env {f}" for f in secret_findings(literals)]
    runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "") or {}
    return out + [f"{name}: runtimeEnvYAML {f}" for f in secret_findings(runtime_env)]


def launcher_auth_problems(launcher: dict) -> list[str]:
    """Every node container runs with RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH on a file mounted from outside the
    repository; no command or option sets the token, or another mode, inline."""
    options = " ".join(launcher.get("docker", {}).get("run_options", []))
    env = dict(re.findall(r"(?:--env|-e)[ =](\w+)=(\S+)", options))
    out = [] if env.get("RAY_AUTH_MODE") == "token" else ["docker.run_options: --env RAY_AUTH_MODE=token missing"]
    path, mounts = env.get("RAY_AUTH_TOKEN_PATH"), launcher.get("file_mounts") or {}
    if not path:
        out.append("docker.run_options: --env RAY_AUTH_TOKEN_PATH=<node path of the token file> missing")
    elif path not in mounts:
        out.append(f"RAY_AUTH_TOKEN_PATH {path} is not a file_mounts target: the nodes would have no token")
    elif (REPO / os.path.expanduser(mounts[path])).resolve().is_relative_to(REPO):
        out.append(f"file_mounts {path}: the source {mounts[path]} lies inside the repository (never commit a token)")
    text = yaml.safe_dump(launcher)
    if "RAY_AUTH_TOKEN=" in text:
        out.append("RAY_AUTH_TOKEN is set inline; the token comes only from the mounted file")
    out += [f"RAY_AUTH_MODE={mode} turns token auth off" for mode in re.findall(r"RAY_AUTH_MODE=(\w+)", text)
            if mode != "token"]
    return out


def test_every_file_parses_and_is_known():
    kinds = {p.name: [d.get("kind", "launcher" if "cluster_name" in d else None) for d in documents(p)]
             for p in CLUSTER.glob("*.yaml")}
    assert all(k in ("RayJob", "ServiceAccount", "NetworkPolicy", "launcher") for ks in kinds.values() for k in ks), \
        kinds
    assert {"rayjob-extract.yaml", "rayjob-train.yaml", "serviceaccount.yaml", "networkpolicy.yaml",
            "aws-launcher.yaml"} <= set(kinds)


@pytest.mark.parametrize("name", sorted(rayjobs()))  # every RayJob in infra/cluster/, a user's own ones included
def test_rayjob_matches_its_config(name):
    assert rayjob_problems(rayjobs()[name]) == []


def test_extract_and_train_jobs_share_config_output_root_and_image():
    jobs = rayjobs()
    extract = parse_entrypoint(jobs["rayjob-extract.yaml"]["spec"]["entrypoint"])
    train = parse_entrypoint(jobs["rayjob-train.yaml"]["spec"]["entrypoint"])
    assert (extract.args.command, train.args.command) == ("extract", "train")
    assert extract.args.config == train.args.config and extract.args.overrides == train.args.overrides
    images = {c["image"] for j in jobs.values() for c in j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
              ["spec"]["containers"]}
    assert len(images) == 1
    account = documents(CLUSTER / "serviceaccount.yaml")[0]["metadata"]["name"]
    assert {j["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
            for j in jobs.values()} == {account}


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].update(replicas=1, minReplicas=1), "num_actors 2 != 1"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("GPU=2", "GPU=4")), "--wait GPU=4"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace(" -- ", " && ")), "without shell operators"),
    (lambda s: s.update(entrypoint=s["entrypoint"] + " train.threads_per_worker=9"), "threads_per_worker 9"),
    (lambda s: s.update(entrypoint=s["entrypoint"] + " train.loader_workers=5"), "train.loader_workers 5"),
    (lambda s: s.update(entrypoint=s["entrypoint"] + " train.use_gpu=false"), "use_gpu is false"),
    (lambda s: s.update(entrypoint=s["entrypoint"].replace("s3://", "/mnt/")), "must be on s3://"),
    (lambda s: s["rayClusterSpec"].update(rayVersion="2.9.0"), "rayVersion 2.9.0"),
    (lambda s: s["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].pop("num-cpus"), "num-cpus 0"),
])
def test_the_checks_catch_a_mismatch(edit, expected):
    job = copy.deepcopy(rayjobs()["rayjob-extract.yaml"])
    edit(job["spec"])
    assert any(expected in problem for problem in rayjob_problems(job)), rayjob_problems(job)


def test_launcher_yaml_fits_the_config_and_the_image():
    launcher = documents(CLUSTER / "aws-launcher.yaml")[0]
    for key in ("cluster_name", "max_workers", "provider", "auth", "docker", "available_node_types", "head_node_type",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in launcher, key
    assert launcher["provider"]["type"] == "aws" and launcher["provider"]["region"]
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types and types[launcher["head_node_type"]]["resources"] == {"CPU": 0}
    for node_type in types.values():  # S3 through an instance role on every node, never keys
        assert node_type["node_config"]["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::")
    job_image = rayjobs()["rayjob-train.yaml"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["image"]
    assert launcher["docker"]["image"] == job_image
    gpu_types = [t for t in types.values() if t["resources"].get("GPU")]
    max_gpus = sum(t["max_workers"] * t["resources"]["GPU"] for t in gpu_types)
    assert sum(t["max_workers"] for t in gpu_types) <= launcher["max_workers"]
    for job in rayjobs().values():
        cfg = parse_entrypoint(job["spec"]["entrypoint"]).cfg
        assert max_gpus >= max(cfg.extract.num_actors, cfg.train.num_workers)
        for t in gpu_types:
            assert t["resources"]["CPU"] >= t["resources"]["GPU"] * (cfg.train.threads_per_worker
                                                                      + cfg.train.loader_workers)


def test_dockerfile_holds_what_the_manifests_run():
    text = DOCKERFILE.read_text()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    copied = {src.removeprefix("./").rstrip("/") for line in re.findall(r"^COPY\s+(.*)$", text, re.MULTILINE)
              for src in line.split()[:-1] if not src.startswith("--")}
    assert packages | {"configs", "pyproject.toml", "run_pipeline.py"} <= copied, copied
    assert re.search(r"^FROM\s+\$\{PYTHON_IMAGE\}", text, re.MULTILINE) and "python:3.11" in text
    pins = dict(re.findall(r'"(torch|torchvision)==([\d.]+)"', (REPO / "scripts" / "setup.sh").read_text()))
    assert f"TORCH_VERSION={pins['torch']}" in text and f"TORCHVISION_VERSION={pins['torchvision']}" in text
    assert f"ray[default,train]=={ray.__version__}" in pyproject["project"]["dependencies"]
    assert "wget" in text  # KubeRay's default probes
    for job in rayjobs().values():
        cfg = parse_entrypoint(job["spec"]["entrypoint"]).cfg
        if cfg.data.path.startswith("/usr/share/datasets/fashion-mnist/"):
            assert "dataset-fashion-mnist" in text


@pytest.mark.parametrize("name", sorted(rayjobs()))
def test_rayjob_runs_with_token_auth_from_a_secret(name):
    assert auth_problems(rayjobs()[name]) == []


@pytest.mark.parametrize("name", sorted(rayjobs()))
def test_networkpolicy_admits_only_the_cluster_and_its_submitters(name):
    jobs = rayjobs()
    assert network_problems(jobs[name], policies(), [j for n, j in jobs.items() if n != name]) == []


def test_launcher_runs_with_token_auth_from_a_file():
    assert launcher_auth_problems(documents(CLUSTER / "aws-launcher.yaml")[0]) == []


def env_entry(spec: dict, role: str, name: str) -> dict:
    return next(e for e in ray_templates(spec)[role]["spec"]["containers"][0]["env"] if e["name"] == name)


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda s: s["rayClusterSpec"].pop("authOptions"), "authOptions.mode must be token"),
    (lambda s: s["rayClusterSpec"]["authOptions"].pop("secretName"), "secretName must name the Secret"),
    (lambda s: env_entry(s, "head", "RAY_AUTH_MODE").update(value="disabled"), "head: env RAY_AUTH_MODE must be"),
    (lambda s: env_entry(s, "worker gpu", "RAY_AUTH_TOKEN").update(value="abc", valueFrom={}), "never a literal"),
    (lambda s: env_entry(s, "head", "RAY_AUTH_TOKEN")["valueFrom"]["secretKeyRef"].update(name="x"), "tec-ray-auth"),
    (lambda s: s.update(runtimeEnvYAML="env_vars:\n  AWS_SECRET_ACCESS_KEY: abc\n"), "runtimeEnvYAML env_vars.AWS"),
    (lambda s: ray_templates(s)["head"]["spec"]["containers"][0]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}), "head: env AWS_SECRET_ACCESS_KEY: the name"),
])
def test_the_auth_check_catches_a_cluster_without_it(edit, expected):
    job = copy.deepcopy(rayjobs()["rayjob-extract.yaml"])
    edit(job["spec"])
    assert any(expected in problem for problem in auth_problems(job)), auth_problems(job)


def ray_policy(pols: list[dict]) -> dict:
    """The extract job's policy for its own pods' traffic."""
    return next(p for p in pols if p["metadata"]["name"] == "tec-extract-ray")


def api_policy(pols: list[dict]) -> dict:
    """The extract job's policy for its jobs API."""
    return next(p for p in pols if p["metadata"]["name"] == "tec-extract-jobs-api")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda ps: ps.clear(), "no NetworkPolicy selects its head pod"),
    (lambda ps: ray_policy(ps)["spec"]["podSelector"]["matchLabels"].update({"app.kubernetes.io/instance": "x"}),
     "no NetworkPolicy selects its worker gpu pod"),
    (lambda ps: ray_policy(ps)["spec"]["ingress"].append({}), "head port 6379 (GCS) is open to a pod of another"),
    (lambda ps: api_policy(ps)["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
     "head port 8265 (dashboard / jobs API) is open to a pod of another namespace"),
    (lambda ps: api_policy(ps)["spec"]["ingress"][0]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
     "head port 8265 (dashboard / jobs API) is open to an unlabelled pod"),
    (lambda ps: api_policy(ps)["spec"]["ingress"][0].pop("ports"), "head port 6379 (GCS) is open to the submitter"),
    (lambda ps: api_policy(ps)["spec"]["podSelector"]["matchLabels"].pop("ray.io/node-type"),
     "worker gpu port 8265 (dashboard / jobs API) is open to the submitter"),
    (lambda ps: api_policy(ps)["spec"]["ingress"][0]["from"].pop(0), "submitter pod cannot reach the jobs API"),
    (lambda ps: ray_policy(ps)["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].pop(
        "app.kubernetes.io/instance"), "head port 6379 (GCS) is open to the tec-train head pod"),
    (lambda ps: ray_policy(ps)["spec"]["ingress"][0]["from"][0].update(podSelector={}),
     "worker gpu port 10002 (a Ray worker) is open to an unlabelled pod of the namespace"),
    (lambda ps: ray_policy(ps)["spec"]["ingress"].pop(0), "its worker gpu pod cannot reach head port 6379"),
])
def test_the_network_check_catches_a_policy_opened_or_missing(edit, expected):
    pols = copy.deepcopy(policies())
    edit(pols)
    jobs = rayjobs()
    problems = network_problems(jobs["rayjob-extract.yaml"], pols, [jobs["rayjob-train.yaml"]])
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda c: c["docker"]["run_options"].remove("--env RAY_AUTH_MODE=token"), "RAY_AUTH_MODE=token missing"),
    (lambda c: c["head_start_ray_commands"].append("RAY_AUTH_MODE=disabled ray start --head"), "disabled turns"),
    (lambda c: c["worker_start_ray_commands"].insert(0, "export RAY_AUTH_TOKEN=abc123"), "set inline"),
    (lambda c: c.update(file_mounts={"/etc/ray-auth/auth_token": "infra/cluster/auth_token"}), "inside the repo"),
    (lambda c: c.update(file_mounts={}), "not a file_mounts target"),
])
def test_the_launcher_auth_check_catches_a_cluster_without_it(edit, expected):
    launcher = copy.deepcopy(documents(CLUSTER / "aws-launcher.yaml")[0])
    edit(launcher)
    assert any(expected in problem for problem in launcher_auth_problems(launcher)), launcher_auth_problems(launcher)
