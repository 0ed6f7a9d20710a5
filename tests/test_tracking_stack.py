"""The cluster's tracking stack (cluster/mlflow/README.md) started for real, and a sweep on it:

- PostgreSQL from Debian's binaries (`Postgres` in tests/servers.py: initdb into /tmp, pg_ctl on
  a free 127.0.0.1 port, as `nobody` when the tests run as root): database `mlflow` for the runs,
  `mlflow_auth` for the basic-auth users; the server gets the DB password as PGPASSWORD;
- moto's S3 server for the artifacts, which the MLflow server proxies (the clients hold no S3
  credentials);
- `mlflow server` started by cluster/mlflow/mlflow-server.sh itself (2 workers), MLFLOW_AUTH=basic,
  its Flask secret key from a file, the admin password only for the first start;
- a non-admin user created through MLflow's auth REST API as admin; the sweep's driver and its
  Ray trials authenticate as it from ~/.mlflow/credentials (the driver's HOME, which the local
  Ray's workers inherit); the sweep YAML holds no credential.

Checked: one sweep of 4 cells, 4 trials at once (the parallel part of
tests/reliability/test_mlflow_outage.py, `check_against_records`): every record's metrics, curve
and weights are in its FINISHED child run (weights downloaded through the server from S3), under
the parent run; the runner owns the experiment; `pipeline.aggregate` finds every cell and logs its
outputs to S3; no credential is in the storage, the driver's log, Ray's session, any S3 object or
the databases; a wrong password stops the driver at once with a message naming the server and the
user, not a password. Skipped without PostgreSQL (.ci/run installs it).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import pytest

from servers import (REPO, Postgres, RecipeMlflowServer, finish, postgres_missing,  # tests/
                     results_and_attempts, start_cli)

pytestmark = pytest.mark.timeout(900)  # the first test starts the stack and runs the sweep

EXPERIMENT = "test/stack"
RUNNER = "perl-runner"
SCRIPT = REPO / "cluster" / "mlflow" / "mlflow-server.sh"


def _secret(kind: str) -> str:
    return f"{kind}-{secrets.token_hex(12)}"


def _credentials_home(root: Path, user: str, password: str) -> Path:
    """A HOME whose ~/.mlflow/credentials (mode 600) holds `user` and `password`."""
    cred = root / ".mlflow" / "credentials"
    cred.parent.mkdir(parents=True)
    cred.write_text(f"[mlflow]\nmlflow_tracking_username = {user}\n"
                    f"mlflow_tracking_password = {password}\n")
    cred.chmod(0o600)
    return root


def _auth_api(url: str, method: str, path: str, user: tuple[str, str], status: int = 200,
              **kwargs) -> dict:
    """A call of MLflow's basic-auth REST API (`/api/2.0/mlflow/users/...`) as `user`."""
    import requests

    r = requests.request(method, f"{url}/api/2.0/mlflow/{path}", auth=user, timeout=30, **kwargs)
    assert r.status_code == status, (path, r.status_code, r.text)
    return r.json() if status == 200 else {}


def _start_server(tmp: Path, pg: Postgres, s3_endpoint: str, bucket: str,
                  keys: dict[str, str]) -> RecipeMlflowServer:
    key_file = tmp / "flask-secret-key"
    key_file.write_text(keys["flask"] + "\n")
    key_file.chmod(0o600)
    ini = tmp / "basic_auth.ini"
    ini.write_text(f"""[mlflow]
default_permission = READ
database_uri = {pg.createdb("mlflow_auth")}
admin_username = admin
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
""")
    env = {"MLFLOW_BACKEND_STORE_URI": pg.createdb("mlflow"), "PGPASSWORD": keys["db"],
           "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{bucket}/mlartifacts",
           "MLFLOW_S3_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": keys["s3"], "AWS_DEFAULT_REGION": "us-east-1",
           "MLFLOW_AUTH": "basic", "MLFLOW_AUTH_CONFIG_PATH": str(ini),
           "MLFLOW_AUTH_ADMIN_PASSWORD": keys["admin"],
           "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(key_file)}
    return RecipeMlflowServer(tmp, env, workers=2, log=tmp / "mlflow-server.log").start(
        timeout=180)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_endpoint):
    """PostgreSQL + S3 + the recipe's server with basic auth, and the runner user's HOME."""
    why = postgres_missing()
    if why:
        pytest.skip(why)
    boto3 = pytest.importorskip("boto3")
    pytest.importorskip("psycopg2", reason="psycopg2-binary (the `tracking-server` extra)")
    pytest.importorskip("flask_wtf", reason="mlflow[auth] (the `tracking-server` extra)")
    tmp = tmp_path_factory.mktemp("stack")
    keys = {k: _secret(k) for k in ("db", "admin", "runner", "flask", "s3")}
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key=keys["s3"])
    bucket = f"stack-{secrets.token_hex(4)}"
    s3.create_bucket(Bucket=bucket)
    pg = Postgres(keys["db"]).start()
    server = None
    try:
        server = _start_server(tmp, pg, s3_endpoint, bucket, keys)
        user = _auth_api(server.url, "POST", "users/create", ("admin", keys["admin"]),
                         json={"username": RUNNER, "password": keys["runner"]})["user"]
        assert user["is_admin"] is False
        home = _credentials_home(tmp / "home", RUNNER, keys["runner"])
        yield {"tmp": tmp, "pg": pg, "server": server, "s3": s3, "bucket": bucket, "keys": keys,
               "home": home}
    finally:
        if server is not None:
            server.stop()
        pg.stop()


def _driver_env(home: Path, ray_tmp: Path | None = None) -> dict:
    """The driver's environment: HOME with the runner's credentials file, no MLflow or S3
    credential in the environment (the server holds S3's)."""
    env = {k: None for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                             "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID",
                             "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_URI")}
    env["HOME"] = str(home)
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    return env


def _sweep_yaml(path: Path, *, url: str, storage: Path, world: Path, weights: Path) -> Path:
    path.write_text(f"""\
name: stack
experiment: {EXPERIMENT}
fixed:
  arch: perl-tiny
  pretrained: {weights}
  data_root: {world}
  shots: 2
  seed: 1
  epochs: 1
  device: cpu
  eval_batch_size: 64
  jacobian_samples: 0
grid:
  dataset: [ToyShapes, ToyCounts]
  num_steps: [1, 2]
resources: {{cpu: 0.5, gpu: 0}}
storage: {storage}
tracking_uri: {url}
max_failures: 0
""")
    return path


@pytest.fixture(scope="module")
def sweep(stack, world, weights):
    """4 cells, 4 trials at once, as the runner; Ray's session captured for the secret scan."""
    tmp = stack["tmp"]
    y = _sweep_yaml(tmp / "stack.yaml", url=stack["server"].url, storage=tmp / "runs",
                    world=world, weights=weights)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))  # short: Ray's unix sockets
    t0 = time.monotonic()
    try:
        p = start_cli([str(y), "--max-concurrent", "4"], tmp / "run.log",
                      _driver_env(stack["home"], ray_tmp))
        rc = finish(p, 480)
        seconds = time.monotonic() - t0
        shutil.copytree(ray_tmp, tmp / "ray-session", symlinks=True,
                        ignore=shutil.ignore_patterns("sockets", "*.sock", "plasma*"),
                        ignore_dangling_symlinks=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    return {"rc": rc, "out": (tmp / "run.log").read_text(errors="replace"), "seconds": seconds,
            "storage": tmp / "runs"}


@pytest.fixture
def as_runner(stack, monkeypatch):
    """This process authenticates as the runner, from the same credentials file."""
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(stack["home"]))


def _s3_objects(stack) -> dict[str, bytes]:
    s3, bucket = stack["s3"], stack["bucket"]
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _weights_problems(children: list, objects: dict[str, bytes], experiment_id: str,
                      cells: int, log: str) -> tuple[list[str], list[str]]:
    """(problems, superseded) of the trial runs' weights in the bucket. The results are the
    FINISHED runs (one per cell, as `check_against_records` has checked): each must have its
    `projectors/projectors.safetensors` object. Any other child is an attempt whose own MLflow
    logging failed part-way (`pipeline.trainable.log_result`: the run is left RUNNING, the driver
    marks it KILLED after the phase and replays the trial's record into a new FINISHED run tagged
    `replayed`): it has no weights to hold, but it must be KILLED and its cell must have that
    replayed result, else it is a problem too. `superseded` names those attempts, with the
    sweep log's lines that say why."""
    def key(r) -> str:
        return (f"mlartifacts/{experiment_id}/{r.info.run_id}/artifacts/projectors/"
                "projectors.safetensors")

    def about(r) -> str:
        t = r.data.tags
        return (f"run {r.info.run_id} ({t.get('cell')}, {r.info.status}, replayed="
                f"{t.get('replayed')}, record_id={t.get('record_id')}, status_detail="
                f"{t.get('status_detail')!r}; its objects: "
                f"{sorted(k for k in objects if f'/{r.info.run_id}/' in k)})")

    finished, attempts, problems = results_and_attempts(children)
    if len(finished) != cells:
        problems.append(f"{len(finished)} FINISHED trial runs, not {cells}")
    problems += [f"weights missing in the bucket: {key(r)} of {about(r)}"
                 for r in finished if key(r) not in objects]
    why = [line.strip() for line in log.splitlines()
           if "MLflow logging of" in line or "cannot create the MLflow run" in line]
    superseded = [about(r) for r in attempts]
    return problems, (superseded + why if superseded else [])


@pytest.mark.slow
def test_sweep_as_runner_lands_in_postgres_and_s3(stack, sweep, as_runner, tmp_path):
    from mlflow import MlflowClient

    from pipeline.aggregate import aggregate, log_to_mlflow, summary_markdown
    from reliability.test_mlflow_outage import check_against_records

    assert sweep["rc"] == 0, sweep["out"]
    assert "4 finished" in sweep["out"], sweep["out"]
    server = stack["server"]
    counts = check_against_records(server, EXPERIMENT, sweep["storage"], cells=4)
    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], "", max_results=100)
    parents = [r for r in runs if r.data.tags.get("phase") == "sweep"]
    children = [r for r in runs if r.data.tags.get("phase") == "final"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED", parents
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    spans = [(r.info.start_time, r.info.end_time) for r in children]
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap >= 3, spans  # the trials really logged to the one server at once
    # the weights are objects in the bucket, put there by the server: every result's (a trial
    # whose own logging failed left a KILLED attempt beside its replayed result; said, not failed)
    problems, superseded = _weights_problems(children, _s3_objects(stack), exp.experiment_id,
                                             4, sweep["out"])
    assert not problems, "\n".join(problems + superseded)
    if superseded:
        warnings.warn("a trial's own MLflow logging failed; its record was replayed:\n"
                      + "\n".join(superseded))
    # all of it was done as the runner, who is no admin: creating a user is refused to it
    _auth_api(server.url, "POST", "users/create", (RUNNER, stack["keys"]["runner"]), status=403,
              json={"username": "intruder", "password": _secret("intruder")})
    # the aggregate, through pipeline.aggregate's API, as the runner
    agg = aggregate(server.url, [EXPERIMENT])
    assert agg.counts.expected == 4 and agg.counts.found == 4, agg.counts.line()
    out = tmp_path / "agg"  # the summary only: the plots would only add time here
    out.mkdir()
    (out / "summary.md").write_text(summary_markdown(agg))
    rid = log_to_mlflow(agg, out)
    assert client.get_run(rid).info.status == "FINISHED"
    agg_keys = [k for k in _s3_objects(stack) if f"/{rid}/artifacts/" in k]
    assert any(k.endswith("/summary.md") for k in agg_keys), agg_keys
    print(f"\nsweep {sweep['seconds']:.0f} s, {counts}, overlap {overlap}")


@pytest.mark.slow
def test_no_credential_is_written_anywhere(stack, sweep):
    assert sweep["rc"] == 0, sweep["out"]
    tmp, pg = stack["tmp"], stack["pg"]
    files = [p for d in (sweep["storage"], tmp / "ray-session") for p in d.rglob("*")
             if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".safetensors" for p in files)  # records were written
    assert any(p.name.startswith("worker-") for p in files), "no Ray worker log captured"
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["driver log"] = (tmp / "run.log").read_bytes()
    blobs["server log"] = stack["server"].log.read_bytes()
    blobs.update({f"s3://{stack['bucket']}/{k}": v for k, v in _s3_objects(stack).items()})
    runs_db, users_db = pg.dump("mlflow"), pg.dump("mlflow_auth")
    assert "ToyShapes" in runs_db and "num_steps" in runs_db  # params and tags are in the dump
    assert RUNNER in users_db
    blobs["postgres mlflow (runs, params, tags)"] = runs_db.encode()
    blobs["postgres mlflow_auth (users)"] = users_db.encode()  # password hashes only
    leaks = [(where, name) for where, data in blobs.items()
             for name, value in stack["keys"].items() if value.encode() in data]
    assert not leaks, leaks


@pytest.mark.slow
def test_wrong_password_fails_fast_naming_the_server(stack, world, weights, tmp_path):
    url = stack["server"].url
    wrong = _secret("wrong")
    home = _credentials_home(tmp_path / "home", RUNNER, wrong)
    y = _sweep_yaml(tmp_path / "stack.yaml", url=url, storage=tmp_path / "runs", world=world,
                    weights=weights)
    t0 = time.monotonic()
    rc = finish(start_cli([str(y)], tmp_path / "run.log", _driver_env(home)), 120)
    seconds = time.monotonic() - t0
    out = (tmp_path / "run.log").read_text(errors="replace")
    assert rc == 2, out
    assert f"MLflow tracking at {url} refused user '{RUNNER}'" in out, out
    assert str(home / ".mlflow" / "credentials") in out and "401" in out, out
    assert wrong not in out and stack["keys"]["runner"] not in out
    assert "Traceback" not in out, out
    assert seconds < 90, seconds  # refused at once, not retried (imports take most of it)


def _script(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(["bash", str(SCRIPT), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=30)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_recipe_requires_a_secret_key_and_never_prints_it(tmp_path):
    auth = {"MLFLOW_BACKEND_STORE_URI": "postgresql+psycopg2://mlflow@db:5432/mlflow",
            "MLFLOW_ARTIFACTS_DESTINATION": "s3://bucket/mlartifacts", "MLFLOW_AUTH": "basic",
            "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "auth.ini"),
            "PATH": "/usr/bin:/bin"}  # no mlflow on PATH: the script must stop before it
    out = _script(auth)
    assert out.returncode == 2 and "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE" in out.stderr, out
    assert "warning: MLFLOW_AUTH=basic needs a static secret key" in _script(auth, "--print").stderr
    key = _secret("flask")
    (tmp_path / "key").write_text(key + "\n")
    out = _script({**auth, "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(tmp_path / "key")}, "--print")
    assert out.returncode == 0 and "--app-name basic-auth" in out.stdout, out
    assert key not in out.stdout + out.stderr and "warning" not in out.stderr
    out = _script({**auth, "MLFLOW_FLASK_SERVER_SECRET_KEY_FILE": str(tmp_path / "none")})
    assert out.returncode == 2 and f"cannot read MLFLOW_FLASK_SERVER_SECRET_KEY_FILE=" \
        f"{tmp_path / 'none'}" in out.stderr, out
    # the key is given, the auth config file is not there: named before mlflow starts
    out = _script({**auth, "MLFLOW_FLASK_SERVER_SECRET_KEY": key})
    assert out.returncode == 2 and "cannot read MLFLOW_AUTH_CONFIG_PATH" in out.stderr, out
    assert key not in out.stdout + out.stderr
