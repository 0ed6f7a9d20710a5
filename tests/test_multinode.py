"""A multi-node Ray cluster refuses node-local tracking, storage and cache before anything runs.

- Unit: `pipeline.cluster_check.refuse_node_local` on `ray.nodes()`-shaped node lists (no Ray).
- Slow: a real two-node Ray (`ray start --head` + `ray start --address`, one CPU each, each node
  with its own temp dir, both on this host) and `python -m pipeline.run SWEEP.yaml` with
  RAY_ADDRESS at the head, once per key (sqlite `tracking_uri`, local `storage`, local
  `cache.url`): exit 2, the key and the sweep file named, no MLflow store, no storage record.
  The other keys of each case are shared (moto S3 storage, an http tracking URI the refusal
  never reaches), so each message is that key's alone.

Teardown stops exactly the nodes started here (SIGTERM to the `ray start --block` process groups,
then any process naming this cluster's temp dirs), never a machine-wide `ray stop`.
"""

from __future__ import annotations

import os
import shutil
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipeline.cluster_check import SHARED_FS_ENV, joins_cluster, refuse_node_local
from pipeline.spec import SpecError, parse_spec
from servers import cli_env, free_port, processes_naming, signal_pids
from test_pipeline_run import sweep_yaml

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
NODE = {"Alive": True, "NodeManagerAddress": "10.0.0.1"}


def _spec(tmp: Path, storage: str, tracking: str = "", cache_url: str = ""):
    text = (f"name: t\nexperiment: e\nfixed: {{dataset: ToyShapes}}\nstorage: {storage}\n" +
            (f"tracking_uri: {tracking}\n" if tracking else "") +
            (f"cache: {{url: {cache_url}}}\n" if cache_url else ""))
    return parse_spec(text, source=str(tmp / "t.yaml"), env={}, cwd=tmp)


def test_two_alive_nodes_refuse_each_node_local_key(tmp_path):
    spec = _spec(tmp_path, "runs", cache_url=str(tmp_path / "cache"))
    with pytest.raises(SpecError) as e:
        refuse_node_local(spec, f"sqlite:///{tmp_path / 'm.db'}", [NODE, NODE], env={})
    assert [k for k, _ in e.value.problems] == ["tracking_uri", "storage", "cache.url"]
    msg = str(e.value)
    assert msg.count(f"{tmp_path / 't.yaml'}: ") == 3 and "Ray has 2 nodes alive" in msg
    assert SHARED_FS_ENV in msg


def test_one_node_shared_stores_or_the_opt_in_pass(tmp_path):
    local = _spec(tmp_path, "runs", cache_url=str(tmp_path / "cache"))
    sqlite = f"sqlite:///{tmp_path / 'm.db'}"
    refuse_node_local(local, sqlite, [NODE, {**NODE, "Alive": False}], env={})  # one alive
    refuse_node_local(local, sqlite, [NODE, NODE], env={SHARED_FS_ENV: "1"})
    shared = _spec(tmp_path, "s3://bucket/runs", "http://mlflow:5000")  # cache.url unset
    refuse_node_local(shared, "http://mlflow:5000", [NODE, NODE], env={})


def test_a_ray_client_driver_is_off_the_cluster_even_with_one_node(tmp_path):
    spec = _spec(tmp_path, "s3://bucket/runs")
    with pytest.raises(SpecError, match="Ray Client") as e:
        refuse_node_local(spec, f"sqlite:///{tmp_path / 'm.db'}", [NODE],
                          env={"RAY_ADDRESS": "ray://head:10001"})
    assert [k for k, _ in e.value.problems] == ["tracking_uri"]


def test_an_explicit_ray_address_joins_a_cluster():
    assert joins_cluster({"RAY_ADDRESS": "10.0.0.1:6379"})


HEAD = {"Alive": True, "NodeID": "head", "Resources": {"CPU": 0.0, "memory": 1e9}}


def test_one_node_that_cannot_host_a_trial_or_an_autoscaler_refuses(tmp_path):
    """KubeRay's and `ray up`'s head alone (0 CPUs, workers autoscaled from 0): the trials run
    on nodes that join later, so node-local stores are refused though one node is alive."""
    spec = _spec(tmp_path, "runs")
    sqlite = f"sqlite:///{tmp_path / 'm.db'}"
    with pytest.raises(SpecError, match="cannot host a trial") as e:
        refuse_node_local(spec, sqlite, [HEAD], env={}, driver_node="head", autoscaling=False)
    assert [k for k, _ in e.value.problems] == ["tracking_uri", "storage"]
    assert "0 CPU, 0 GPU; a trial asks for 1 CPU, 0 GPU" in str(e.value)
    with pytest.raises(SpecError, match="autoscaler"):
        refuse_node_local(spec, sqlite, [{**HEAD, "Resources": {"CPU": 8.0}}], env={},
                          driver_node="head", autoscaling=True)
    gpu = parse_spec("name: t\nexperiment: e\nfixed: {dataset: ToyShapes}\nstorage: runs\n"
                     "resources: {gpu: 0.5}\n", source=str(tmp_path / "g.yaml"), env={},
                     cwd=tmp_path)
    with pytest.raises(SpecError, match="8 CPU, 0 GPU; a trial asks for 1 CPU, 0.5 GPU"):
        refuse_node_local(gpu, sqlite, [{**HEAD, "Resources": {"CPU": 8.0}}], env={},
                          driver_node="head", autoscaling=False)
    # a driver node that hosts trials, no autoscaler: one node, as before
    refuse_node_local(spec, sqlite, [{**HEAD, "Resources": {"CPU": 8.0}}], env={},
                      driver_node="head", autoscaling=False)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "http://localhost:5000",
                                 "https://[::1]:5000/", "http://0.0.0.0:5000",
                                 "http://127.0.1.1:80"])
def test_a_loopback_tracking_server_is_node_local(tmp_path, uri):
    spec = _spec(tmp_path, "s3://bucket/runs", uri)
    with pytest.raises(SpecError, match="loopback") as e:
        refuse_node_local(spec, uri, [NODE, NODE], env={SHARED_FS_ENV: "1"})  # not a path
    assert [k for k, _ in e.value.problems] == ["tracking_uri"]
    refuse_node_local(spec, uri, [NODE], env={})  # one node: fine
    refuse_node_local(spec, "http://mlflow.internal:5000", [NODE, NODE], env={})


@pytest.mark.timeout(120)
def test_a_real_head_with_zero_cpus_refuses_node_local_stores(tmp_path):
    """The decision on what a real Ray says: a one-node Ray whose node (the driver's) has 0
    CPUs, as the head of our cluster manifests; asked of Ray, not given (`ray_facts`)."""
    code = ("import sys, ray\n"
            "from pipeline.cluster_check import refuse_node_local, ray_facts\n"
            "from pipeline.spec import SpecError, parse_spec\n"
            "ray.init(num_cpus=0, include_dashboard=False, log_to_driver=False)\n"
            "print('facts', ray_facts())\n"
            "spec = parse_spec('name: t\\nexperiment: e\\nfixed: {dataset: ToyShapes}\\n'\n"
            "                  'storage: runs\\n', source='t.yaml', env={}, cwd=sys.argv[1])\n"
            "try:\n"
            "    refuse_node_local(spec, 'sqlite:///' + sys.argv[1] + '/m.db', ray.nodes(), {})\n"
            "except SpecError as e:\n"
            "    print(e)\n"
            "    sys.exit(3)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, text=True,
                         capture_output=True, timeout=110,
                         env=cli_env({"RAY_ADDRESS": None, SHARED_FS_ENV: None}))
    assert out.returncode == 3, out.stdout + out.stderr[-3000:]
    assert "facts ('" in out.stdout and "', False)" in out.stdout, out.stdout
    assert "t.yaml: tracking_uri: " in out.stdout, out.stdout
    assert "cannot host a trial (0 CPU" in out.stdout, out.stdout


# --- a real two-node Ray -------------------------------------------------------------------------


def _wait_for_nodes(address: str, n: int, procs: list, logs: Path, auth: dict) -> None:
    code = ("import sys, time, ray\nray.init(address=sys.argv[1], log_to_driver=False)\n"
            "alive = lambda: sum(x['Alive'] for x in ray.nodes())\nend = time.time() + 120\n"
            "while alive() < int(sys.argv[2]) and time.time() < end:\n    time.sleep(0.5)\n"
            "sys.exit(alive() < int(sys.argv[2]))")
    out = subprocess.run([sys.executable, "-c", code, address, str(n)], capture_output=True,
                         text=True, timeout=180, env=cli_env(auth))
    dead = [p for p in procs if p.poll() is not None]
    if out.returncode or dead:
        raise RuntimeError(f"fewer than {n} Ray nodes alive:\n{out.stderr[-3000:]}\n" +
                           "\n".join(f.read_text()[-3000:] for f in logs.iterdir()))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A head and a second node on this host; yields RAY_ADDRESS (the head's GCS) and the auth
    token variables for a driver."""
    ports = [free_port() for _ in range(11)]
    gcs, client, dash = ports[:3]
    # one temp dir per node (short: Ray's unix sockets live there); the address file of each
    # `ray start` goes there too, so no other Ray of this machine attaches to this cluster
    temp_dirs = [tempfile.mkdtemp(prefix="raymn_", dir="/tmp") for _ in range(2)]
    logs = tmp_path_factory.mktemp("ray-logs")
    # `ray start` turns token auth on: nodes and drivers share one token
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = cli_env({**auth, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"})
    procs = []

    def start(args: list[str], agent: list[int], temp_dir: str, log: str) -> None:
        procs.append(subprocess.Popen(
            [str(BIN / "ray"), "start", *args, "--num-cpus=1", "--object-store-memory=80000000",
             f"--dashboard-agent-listen-port={agent[0]}", f"--dashboard-agent-grpc-port={agent[1]}",
             f"--runtime-env-agent-port={agent[2]}", f"--metrics-export-port={agent[3]}",
             f"--temp-dir={temp_dir}", "--block"], env=env, stdout=open(logs / log, "w"),
            stderr=subprocess.STDOUT, start_new_session=True))

    try:
        start(["--head", f"--port={gcs}", "--include-dashboard=false", f"--dashboard-port={dash}",
               f"--ray-client-server-port={client}"], ports[3:7], temp_dirs[0], "head.log")
        start([f"--address=127.0.0.1:{gcs}"], ports[7:11], temp_dirs[1], "worker.log")
        _wait_for_nodes(f"127.0.0.1:{gcs}", 2, procs, logs, auth)
        yield {"RAY_ADDRESS": f"127.0.0.1:{gcs}", **auth}
    finally:
        for p in procs:  # `ray start --block` stops its node's processes on SIGTERM
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for temp_dir in temp_dirs:
            signal_pids(processes_naming(temp_dir), signal.SIGKILL)
            shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def bucket(s3_endpoint):
    import boto3

    name = f"perl-mn-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=name)
    return name


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pipeline_run_on_two_nodes_refuses_node_local_keys_before_anything(
        two_nodes, s3_endpoint, bucket, weights, tmp_path):
    import boto3

    db, runs, cache = tmp_path / "mlflow.db", tmp_path / "runs", tmp_path / "cache"
    # nothing listens (the refusal comes first); not a loopback address, which is refused too
    server = "http://perl-mlflow.invalid:5000"
    s3 = f"s3://{bucket}/runs"
    cases = {"tracking_uri": (f"sqlite:///{db}", s3, ""),
             "storage": (server, str(runs), ""),
             "cache.url": (server, s3, f"cache: {{url: {cache}}}")}
    env = {**two_nodes, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": s3_endpoint, "AWS_EC2_METADATA_DISABLED": "true",
           "MLFLOW_TRACKING_URI": None, SHARED_FS_ENV: None}
    t0, procs = time.time(), {}
    for key, (tracking, storage, extra) in cases.items():  # the three drivers at once
        y = sweep_yaml(tmp_path / f"{key}.yaml", world=tmp_path / "no-world", weights=weights,
                       storage=storage, tracking=tracking, datasets=("ToyShapes",), steps=(1,),
                       extra=extra)
        procs[key] = (y, subprocess.Popen(
            [sys.executable, "-m", "pipeline.run", str(y)], cwd=REPO, env=cli_env(env),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for key, (y, p) in procs.items():
        out = p.communicate(timeout=240)[0]
        assert p.returncode == 2, out[-4000:]
        assert f"{y}: {key}: " in out and "Ray has 2 nodes alive" in out, out[-4000:]
        others = set(cases) - {key}
        assert not any(f"{y}: {k}: " in out for k in others), out[-4000:]
        assert "sweep tiny:" not in out, out[-4000:]  # stopped before the MLflow lookup
    assert not db.exists() and not runs.exists() and not cache.exists()
    listed = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing"
                          ).list_objects_v2(Bucket=bucket)
    assert listed.get("KeyCount", 0) == 0  # no trial record, no Tune state
    print(f"three refused drivers on two nodes: {time.time() - t0:.1f} s")
