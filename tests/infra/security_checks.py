"""Checks shared by the cluster tests: secret-looking values in a structure, and Kubernetes NetworkPolicy evaluation.

``secret_findings`` walks a runtime environment (or any YAML/JSON-like structure) and names every key or string
that looks like a credential. ``allows`` decides whether the ingress rules of the NetworkPolicies selecting a pod let
a given source pod in on a given port, following the Kubernetes semantics (policies add up; a rule without ``from``
admits every source; a peer without ``namespaceSelector`` means the policy's own namespace). ``network_problems``
applies it to the pods KubeRay makes of a RayJob.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

_SECRET_NAME = re.compile(r"secret|token|passw|credential|private[_-]?key|access[_-]?key|key[_-]?id|api[_-]?key",
                          re.IGNORECASE)
_AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
_URL_USERINFO = re.compile(r"://[^/\s:@]+:[^/\s@]+@")
_OPAQUE = re.compile(r"^[A-Za-z0-9+/=_-]{32,}$")  # a long token-like string (hex, base64)

JOBS_PORT = 8265  # the Ray ports the network check probes on every pod of a RayJob's cluster
RAY_PORTS = {JOBS_PORT: "dashboard / jobs API", 6379: "GCS", 10001: "Ray client", 52365: "dashboard agent",
             10002: "a Ray worker"}
JOBS_NAMESPACE = "jobs-ns"  # the namespace the manifests are applied in (they name none)


def _walk(value: Any, path: str = "") -> Iterator[tuple[str, str, Any]]:
    """(path, key name, value) for every mapping entry and list item, depth first."""
    if isinstance(value, Mapping):
        for key, item in value.items():
            sub = f"{path}.{key}" if path else str(key)
            yield sub, str(key), item
            yield from _walk(item, sub)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            sub = f"{path}[{i}]"
            yield sub, "", item
            yield from _walk(item, sub)


def secret_findings(value: Any, known_secrets: Iterable[str] = ()) -> list[str]:
    """Every place in ``value`` that looks like a credential.

    Args:
        value: a nested structure of mappings, lists and scalars (a runtime env, a parsed manifest).
        known_secrets: values that are secret here (a token, a key); found verbatim, or inside a longer string
            when at least 8 characters long.

    Returns:
        One line per finding, naming its path; empty when nothing looks secret.
    """
    known = [s for s in known_secrets if s]
    out = []
    for path, key, item in _walk(value):
        if key and _SECRET_NAME.search(key):
            out.append(f"{path}: the name {key!r} looks like a credential")
        if not isinstance(item, str):
            continue
        if any(item == s or (len(s) >= 8 and s in item) for s in known):
            out.append(f"{path}: holds a secret value of this test")
        elif _AWS_KEY_ID.search(item):
            out.append(f"{path}: holds an AWS access key id")
        elif _URL_USERINFO.search(item):
            out.append(f"{path}: a URL with a user and password")
        elif _OPAQUE.match(item):
            out.append(f"{path}: a long opaque string (a token?)")
    return out


def selects(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Whether a Kubernetes label selector (``matchLabels``, ``matchExpressions``) selects ``labels``; ``{}`` selects
    everything, ``None`` nothing."""
    if selector is None:
        return False
    if any(labels.get(k) != str(v) for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], [str(v) for v in expr.get("values") or []]
        ok = {"In": key in labels and labels[key] in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


@dataclass(frozen=True)
class Pod:
    """A pod as NetworkPolicies see it: its labels and its namespace's labels; ``ports`` maps named ports."""

    name: str
    labels: Mapping[str, str]
    namespace: str
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.namespace_labels:  # Kubernetes labels every namespace with its name
            object.__setattr__(self, "namespace_labels", {"kubernetes.io/metadata.name": self.namespace})


def _port_matches(rule: Mapping[str, Any], port: int, target: Pod) -> bool:
    ports = rule.get("ports")
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        number = p.get("port")
        if number is None:
            return True
        number = target.ports.get(number) if isinstance(number, str) else int(number)
        if number is not None and number <= port <= int(p.get("endPort", number)):
            return True
    return False


def peer_admits(peer: Mapping[str, Any], source: Pod, policy_namespace: str) -> bool:
    """Whether one ``from`` entry of a policy in ``policy_namespace`` admits ``source``."""
    if "ipBlock" in peer:
        return True  # by address: pods and outside hosts alike
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], source.namespace_labels):
            return False
    elif source.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), source.labels)


def covering(policies: Iterable[Mapping[str, Any]], target: Pod) -> list[Mapping[str, Any]]:
    """The policies that isolate ``target`` for ingress (same namespace, podSelector selects it)."""
    return [p for p in policies if (p["metadata"].get("namespace") or target.namespace) == target.namespace
            and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            and selects(p["spec"].get("podSelector", {}), target.labels)]


def allows(policies: Iterable[Mapping[str, Any]], target: Pod, port: int, source: Pod) -> bool:
    """Whether ``source`` may open a TCP connection to ``target``:``port`` (no covering policy: yes)."""
    cover = covering(policies, target)
    if not cover:
        return True
    for policy in cover:
        for rule in policy["spec"].get("ingress") or []:
            if not _port_matches(rule, port, target):
                continue
            peers = rule.get("from")
            if not peers or any(peer_admits(peer, source, target.namespace) for peer in peers):
                return True
    return False


def ray_templates(spec: dict) -> dict[str, dict]:
    """The pod templates of a RayJob's cluster by role: ``head`` and ``worker <group>``."""
    rc = spec["rayClusterSpec"]
    return {"head": rc["headGroupSpec"]["template"],
            **{f"worker {g['groupName']}": g["template"] for g in rc["workerGroupSpecs"]}}


def cluster_pods(job: dict) -> dict[str, Pod]:
    """The Ray pods KubeRay makes of a RayJob: template labels plus its own (the RayCluster's name is generated)."""
    name = job["metadata"]["name"]
    ns = job["metadata"].get("namespace") or JOBS_NAMESPACE
    pods = {}
    for role, template in ray_templates(job["spec"]).items():
        kuberay = {"ray.io/is-ray-node": "yes", "ray.io/cluster": f"{name}-x7k2p", "ray.io/node-type": role.split()[0],
                   "app.kubernetes.io/name": "kuberay", "app.kubernetes.io/created-by": "kuberay-operator"}
        ports = {p["name"]: p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])
                 if "name" in p}
        pods[role] = Pod(f"{name} {role}", {**(template.get("metadata") or {}).get("labels", {}), **kuberay}, ns,
                         ports=ports)
    return pods


def outsiders(job: dict, others: list[dict]) -> dict[str, Pod]:
    """Sources that must reach none of the job's ports (besides the jobs API for the entitled ones)."""
    ns = job["metadata"].get("namespace") or JOBS_NAMESPACE
    out = {"an unlabelled pod of the namespace": Pod("plain", {}, ns),
           "a pod of another namespace": Pod("foreign", {}, "elsewhere"),
           "a Ray pod of another KubeRay cluster": Pod("ray", {"ray.io/is-ray-node": "yes", "ray.io/cluster": "other",
                                                                "app.kubernetes.io/name": "kuberay"}, ns)}
    for other in others:
        out.update({f"the {p.name} pod": p for p in cluster_pods(other).values()})
    return out


def network_problems(job: dict, policies: list[dict], others: list[dict]) -> list[str]:
    """What is wrong with the ingress the NetworkPolicies give a RayJob's Ray pods.

    Wanted: every Ray pod of the job is selected; its own pods reach each other on every port of ``RAY_PORTS``; its
    submitter pod reaches the head's jobs API; nothing else reaches a Ray port, the submitter nothing but that API.

    Args:
        job: a parsed RayJob manifest.
        policies: parsed NetworkPolicy manifests (applied in the job's namespace when they name none).
        others: the other RayJobs of the namespace, whose pods count as outsiders.

    Returns:
        One line per problem, naming the job, the pod, the port and the source; empty when none.
    """
    name = job["metadata"]["name"]
    pods = cluster_pods(job)
    submitter = Pod("submitter", {"batch.kubernetes.io/job-name": name, "job-name": name,
                                  "ray.io/originated-from-cr-name": name}, pods["head"].namespace)
    out = []
    for role, target in pods.items():
        if not covering(policies, target):
            out.append(f"{name}: no NetworkPolicy selects its {role} pod, so every port of it is open")
            continue
        for port, what in RAY_PORTS.items():
            out += [f"{name}: its {src} pod cannot reach {role} port {port} ({what})"
                    for src, pod in pods.items() if not allows(policies, target, port, pod)]
            entitled = role == "head" and port == JOBS_PORT
            if entitled and not allows(policies, target, port, submitter):
                out.append(f"{name}: its submitter pod cannot reach the jobs API (head port {port})")
            blocked = {**outsiders(job, others), **({} if entitled else {"the submitter pod": submitter})}
            out += [f"{name}: {role} port {port} ({what}) is open to {src}"
                    for src, pod in blocked.items() if allows(policies, target, port, pod)]
    return out
