"""A real multi-process Ray cluster on loopback for the cluster-job tests: ``ray start --head`` plus one worker node.

Isolation from every other Ray on the machine (the test session's in-process cluster, other users' clusters):

* its own ``--temp-dir`` (short, under /tmp: Ray's unix socket paths must stay under 107 bytes), so no session
  directory and no ``ray_current_cluster`` file is shared with ``/tmp/ray``;
* every port chosen free on 127.0.0.1 (GCS, dashboard, dashboard agent, runtime-env agent, client server,
  metrics), so two clusters never race for Ray's fixed defaults (10001, 52365, 8265, 6379);
* its own token: ``RAY_AUTH_MODE=token`` with a fresh ``RAY_AUTH_TOKEN``, passed to every ``ray`` command.
  (``ray start --head`` turns token auth on by itself when ``~/.ray/auth_token`` exists, while ``ray start
  --address`` does not, so leaving the mode to chance makes the worker node fail to join);
* node IPs: ``ray start`` deliberately rewrites a loopback ``--node-ip-address`` or ``--address`` into the host's
  routable address (``services.resolve_ip_for_localhost``), and a worker node cannot join a head whose GCS listens
  on 127.0.0.1 only, so the nodes register under the machine's own address; that traffic never leaves the machine.
  The dashboard and the jobs API listen on 127.0.0.1, and the GCS (which Ray binds to every interface) refuses
  callers without the cluster's token.

Node environment: ``cluster_node_env`` (a fixture a test module may override) adds variables to the ``ray start``
processes only, as a real node has its own credentials (instance role, files, environment): the raylets pass them
to every job driver and worker they start, and no ``ray`` command on the submitting side sees them.

Stopping: ``ray stop`` kills every Ray process of the user on the machine, other clusters included, so it is not
used. Each ``ray start`` runs as the leader of a new session (``setsid``); every daemon and worker it spawns
inherits that session id. Teardown sends SIGTERM to the processes of exactly those sessions, waits, SIGKILLs what
is left and checks that nothing of them remains.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

LOOPBACK = "127.0.0.1"
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
_DROPPED_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_JOB_CONFIG_JSON_ENV_VAR")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _session_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[3])  # fields after "(comm)": state ppid pgrp session


def processes_in_sessions(sessions: set[int]) -> list[int]:
    """PIDs of the live processes whose session id is in ``sessions``."""
    pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
    return [pid for pid in pids if _session_of(pid) in sessions]


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


@dataclass
class LocalRayCluster:
    """A running head plus worker node; ``env`` is the environment every ``ray`` command against it needs,
    ``node_env`` what only the nodes (``ray start``) get on top of it."""

    temp_dir: Path
    env: dict[str, str]
    node_env: dict[str, str] = field(default_factory=dict)
    gcs_port: int = field(default_factory=free_port)
    dashboard_port: int = field(default_factory=free_port)
    sessions: set[int] = field(default_factory=set)

    @property
    def gcs_address(self) -> str:
        return f"{LOOPBACK}:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def secret_values(self) -> list[str]:
        """The values no job submission may carry: the cluster's token and everything in the nodes' environment."""
        return [self.env["RAY_AUTH_TOKEN"], *self.node_env.values()]

    def _start(self, args: list[str], attempts: int = 3) -> None:
        """``ray start <args>`` as a new session; on a busy machine Ray's fixed 30 s raylet start-up wait can run
        out, so a failed start is killed (its session only) and tried once more."""
        node_ports = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                      "--metrics-export-port", "--node-manager-port", "--object-manager-port"]
        for attempt in range(attempts):
            cmd = [RAY, "start", *args, f"--temp-dir={self.temp_dir}", "--disable-usage-stats",
                   *[f"{flag}={free_port()}" for flag in node_ports]]
            # Output to a file, not a pipe: the daemons inherit the descriptor and would hold a pipe open forever.
            log_path = self.temp_dir / f"ray-start-{len(self.sessions)}.log"
            with log_path.open("w") as log:
                proc = subprocess.Popen(cmd, env={**self.env, **self.node_env}, start_new_session=True,
                                        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            self.sessions.add(proc.pid)
            if proc.wait(timeout=180) == 0:
                return
            _signal_all(processes_in_sessions({proc.pid}), signal.SIGKILL)
            if attempt + 1 == attempts:
                raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{log_path.read_text()[-4000:]}")

    def start(self) -> None:
        """``ray start --head`` (1 CPU, dashboard on 127.0.0.1), then one worker node (1 CPU) joining it."""
        self._start(["--head", f"--port={self.gcs_port}", "--num-cpus=1", "--include-dashboard=true",
                     f"--dashboard-host={LOOPBACK}", f"--dashboard-port={self.dashboard_port}",
                     f"--ray-client-server-port={free_port()}"])
        self._start([f"--address={self.gcs_address}", "--num-cpus=1"])
        self.wait_for_nodes(2)

    def ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``ray <args>`` against this cluster; stdout and stderr together in ``.stdout``."""
        return subprocess.run([RAY, *args], env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout, check=False)

    def nodes(self) -> list[dict]:
        """The alive nodes as ``ray list nodes`` reports them."""
        out = self.ray("list", "nodes", "--address", self.dashboard_url, "--format", "json",
                       "--filter", "state=ALIVE").stdout
        return json.loads(out[out.index("["):])

    def wait_for_nodes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if len(self.nodes()) >= n:
                    return
            except ValueError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{n} Ray nodes did not come up within {timeout}s")

    def stop(self, grace_s: float = 5) -> list[int]:
        """Terminate every process of this cluster (and only those); returns PIDs that still had to be killed."""
        _signal_all(processes_in_sessions(self.sessions), signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while processes_in_sessions(self.sessions) and time.monotonic() < deadline:
            time.sleep(0.5)
        stubborn = processes_in_sessions(self.sessions)
        _signal_all(stubborn, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while processes_in_sessions(self.sessions) and time.monotonic() < deadline:
            time.sleep(0.2)
        return stubborn


def cluster_env() -> dict[str, str]:
    """This process's environment for Ray commands: no inherited Ray address or token, a fresh token, the venv
    first on PATH, and none of the session's S3 settings (the nodes get theirs from ``cluster_node_env``, a job its
    endpoint and region from its runtime env)."""
    env = {k: v for k, v in os.environ.items()
           if k not in _DROPPED_ENV and not k.startswith(("AWS_", "TEC_S3_"))}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"})
    return env


@pytest.fixture(scope="module")
def cluster_node_env() -> dict[str, str]:
    """Variables for the nodes' own environment (none here; a test module overrides this fixture)."""
    return {}


@pytest.fixture(scope="module")
def local_ray_cluster(cluster_node_env: dict[str, str]) -> Iterator[LocalRayCluster]:
    """A two-node Ray cluster on 127.0.0.1 whose nodes also get ``cluster_node_env``, stopped (by session id) after
    the module."""
    temp_dir = Path(tempfile.mkdtemp(prefix="tecray-", dir="/tmp"))
    cluster = LocalRayCluster(temp_dir=temp_dir, env=cluster_env(), node_env=dict(cluster_node_env))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        left = processes_in_sessions(cluster.sessions)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"Ray processes of the test cluster survived the stop: {left}"
        import ray

        if ray.is_initialized():  # the stop left this process's own Ray (the session's local cluster) alone
            assert ray.cluster_resources().get("CPU", 0) > 0
