"""`ray job submit -- python -m pipeline.run SWEEP` against a real two-node Ray cluster.

A head node (`ray start --head`, 1 CPU, dashboard/job server on 127.0.0.1) and a second node
(`ray start --address=...`, 1 CPU) run on this machine, both with Ray token authentication ON
(`RAY_AUTH_MODE=token` and one generated `RAY_AUTH_TOKEN` in the environment of both nodes and of
the `ray job submit` client). The job uploads the repository as its working dir (without .venv,
.git, runs, *.db) and runs `sweeps/smoke.yaml` as it is; trials must land on both nodes (two
distinct `ray_node_id` tags) and every cell must be a FINISHED MLflow run.

The nodes are started from this venv (its bin/ first on PATH), so the job's `python` is the venv's.
Teardown stops exactly the nodes this test started (`ray start --block` processes, then any process
of this cluster's own temp dirs, by pid) instead of a machine-wide `ray stop`, which would also
kill other Ray clusters of the same user on a shared machine.
"""

from __future__ import annotations

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
from contextlib import ExitStack
from pathlib import Path

import pytest

# shared helper (tests/ is on sys.path: pytest rootdir-less imports)
from servers import processes_naming, signal_pids
from test_pipeline_run import children

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# gitignore syntax: anchor folders to the root ("data" alone would also drop perl_core/data/)
EXCLUDES = ["/.venv", "/.git", "/runs", "/data", "*.db", "__pycache__", ".pytest_cache",
            "*.egg-info"]


def _free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


@pytest.fixture
def cluster(tmp_path):
    """Head + second node with token auth; yields (dashboard URL, env for clients)."""
    (gcs, dash, client, agent_a, agent_b, grpc_a, grpc_b, rtenv_a, rtenv_b, metrics_a,
     metrics_b) = _free_ports(11)
    # One temp dir per node: nodes sharing one would share (and garbage-collect) the unpacked
    # working dir under the job driver's feet. Short paths: Ray's unix sockets live there.
    temp_dirs = [tempfile.mkdtemp(prefix="rayjob_", dir="/tmp") for _ in range(2)]
    _NODE_DIRS[:] = temp_dirs
    env = {**os.environ,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true"}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "PERL_DATA_ROOT", "PERL_RUNS_DIR"):
        env.pop(var, None)
    common = ["--num-cpus=1", "--object-store-memory=100000000", "--block"]
    logs = tmp_path / "ray-logs"
    logs.mkdir()
    procs = []

    def start(args: list[str], log: str) -> None:
        procs.append(subprocess.Popen([str(BIN / "ray"), "start", *args, *common], env=env,
                                      stdout=open(logs / log, "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True))

    try:
        start(["--head", f"--port={gcs}", "--include-dashboard=true",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_a}",
               f"--dashboard-agent-grpc-port={grpc_a}", f"--runtime-env-agent-port={rtenv_a}",
               f"--metrics-export-port={metrics_a}", f"--temp-dir={temp_dirs[0]}"], "head.log")
        address = f"http://127.0.0.1:{dash}"
        _wait_for_nodes(env, address, 1, procs, logs)
        start([f"--address=127.0.0.1:{gcs}", f"--dashboard-agent-listen-port={agent_b}",
               f"--dashboard-agent-grpc-port={grpc_b}", f"--runtime-env-agent-port={rtenv_b}",
               f"--metrics-export-port={metrics_b}", f"--temp-dir={temp_dirs[1]}"], "worker.log")
        _wait_for_nodes(env, address, 2, procs, logs)
        yield address, env
    finally:
        for p in procs:  # `ray start --block` stops its node's processes on SIGTERM
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        deadline = time.time() + 5
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for temp_dir in temp_dirs:
            leftovers = processes_naming(temp_dir)
            signal_pids(leftovers, signal.SIGTERM)
            time.sleep(1 if leftovers else 0)
            signal_pids(processes_naming(temp_dir), signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)


_NODE_DIRS: list[str] = []  # the running cluster's node temp dirs, for failure messages


def _second_node_logs(limit: int = 4000) -> str:
    """Tails of the second node's own logs: why it ran no trial, when it ran none."""
    if len(_NODE_DIRS) < 2:
        return ""
    logs = sorted(Path(_NODE_DIRS[1]).glob("session_*/logs/*"))
    keep = [f for f in logs if f.is_file() and f.suffix in (".out", ".err", ".log")
            and ("raylet" in f.name or "runtime_env" in f.name or f.name.startswith("worker"))]
    return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-limit:]}" for f in keep)


def _wait_for_nodes(env: dict, address: str, n: int, procs: list, logs: Path) -> None:
    """Poll the job server's node list (authenticated) until n nodes are alive."""
    code = ("import sys, json, urllib.request, os\n"
            "req = urllib.request.Request(sys.argv[1] + '/nodes?view=summary', headers={"
            "'Authorization': 'Bearer ' + os.environ['RAY_AUTH_TOKEN']})\n"
            "d = json.load(urllib.request.urlopen(req, timeout=5))\n"
            "print(sum(1 for x in d['data']['summary'] if x['raylet']['state'] == 'ALIVE'))")
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("ray start exited:\n" + "\n".join(
                f.read_text()[-3000:] for f in logs.iterdir()))
        out = subprocess.run([sys.executable, "-c", code, address], env=env,
                             capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout) >= n:
            return
        time.sleep(1)
    raise RuntimeError(f"fewer than {n} Ray nodes alive after 120 s:\n" + "\n".join(
        f.read_text()[-3000:] for f in logs.iterdir()))


def _git(*args: str) -> str:
    out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def _submit(address: str, env: dict, runtime_env: dict, sweep: str) -> str:
    """`ray job submit --working-dir REPO -- python -m pipeline.run SWEEP`; must succeed. Returns
    the job's log (the client follows it to the end)."""
    out = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
         "--runtime-env-json", json.dumps(runtime_env), "--",
         "python", "-m", "pipeline.run", sweep],
        env=env, capture_output=True, text=True, timeout=360)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "succeeded" in log.lower(), log[-3000:]
    return log


def test_ray_job_submit_smoke_yaml_runs_on_both_nodes(cluster, tmp_path):
    """The issue's command verbatim: `ray job submit -- python -m pipeline.run sweeps/smoke.yaml`
    (the YAML from the repository, unmodified: the embedded default, its synthetic world generated
    by the job itself). Only where its outputs go is set, through the variables the YAML reads."""
    address, env = cluster
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runtime_env = {"excludes": EXCLUDES,
                   "env_vars": {"PERL_DATA_ROOT": str(tmp_path / "world"),
                                "PERL_RUNS_DIR": str(tmp_path / "runs"),
                                "MLFLOW_TRACKING_URI": uri,
                                # both nodes are on this host: they see the same sqlite file
                                # and storage folder (else pipeline.cluster_check refuses)
                                "PERL_SHARED_FS": "1",
                                "GIT_SHA": _git("rev-parse", "HEAD") or "unknown",
                                "GIT_DIRTY": "true" if _git("status", "--porcelain") else "false",
                                # Tune reuses the head's actor for the next trial: on loaded
                                # cores the second node's first worker (runtime env + imports)
                                # could start after the head had run every trial (seen with 4
                                # short trials: 2 runs of 3 at load 6). A 0.05 s sleep per step
                                # (the trainable's test hook; ~200 steps) makes the 3 trials take
                                # over 1 min on one node, far longer than that start.
                                "PERL_TEST_STEP_DELAY_S": "0.05"}}
    t0 = time.time()
    log = _submit(address, env, runtime_env, "sweeps/smoke.yaml")
    assert "=== smoke: 3 finished, 0 skipped (already FINISHED), 0 failed ===" in log, log[-3000:]
    runs = children(uri, "perl/smoke")
    assert sorted(r.info.run_name for r in runs) == sorted(
        f"b2n/{d}/16shot/seed1/J7/K{k}" for d in ("ToyShapesSensor", "ToyShapes", "ToyCounts")
        for k in (4,))
    assert {r.info.status for r in runs} == {"FINISHED"}
    nodes = {r.data.tags["ray_node_id"] for r in runs}
    assert len(nodes) == 2, f"{nodes}\n{log[-3000:]}\n{_second_node_logs()}"  # both nodes
    jobs = {r.data.tags["ray_job_id"] for r in runs}
    assert len(jobs) == 1 and jobs.pop().startswith("raysubmit_")
    assert {r.data.tags["code_sha"] for r in runs} == {runtime_env["env_vars"]["GIT_SHA"]}
    # the job's python was the venv's (the cluster was started from it)
    assert {r.data.tags["version.ray"] for r in runs} == {_ray_version()}
    assert (tmp_path / "world" / "toy_shapes").is_dir()  # the job generated the world
    print(f"ray job submit: {time.time() - t0:.0f} s")


def _ray_version() -> str:
    import ray

    return ray.__version__
