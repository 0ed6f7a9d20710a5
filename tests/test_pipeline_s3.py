"""The full pipeline on a real local S3 server (moto's ThreadedMotoServer on 127.0.0.1).

What the cluster recipe uses (cluster/mlflow/README.md), on one machine:
- the sweep's `storage:` (trial records + Tune state) and `data_root:` are s3:// URLs in the
  bucket; the trials reach the endpoint through `AWS_ENDPOINT_URL` and the standard `AWS_*`
  credentials (dummies here), exactly as on a cluster with MinIO;
- MLflow is a real `mlflow server --artifacts-destination s3://<bucket>/mlartifacts
  --serve-artifacts` (SQLite backend; the server reaches S3 through `MLFLOW_S3_ENDPOINT_URL`),
  so every run's artifacts really land in the bucket;
- `python -m pipeline.run` runs as a subprocess on a real local Ray (perl-tiny weights, a
  synthetic world uploaded to the bucket), then again (skips every cell), then
  `python -m pipeline.aggregate` writes the tables.

The CLI runs from a snapshot of `perl_core/` and `pipeline/` taken at the start, so that edits of
the working tree during the test (a shared development tree) cannot change the code version
between the run and the re-run.

Checked: every cell is exactly one FINISHED child run; its safetensors weights are objects in the
bucket and load (`load_projectors`) with the cell's config hash; the trial records (JSON +
safetensors) and Tune's state are in the bucket; the re-run skips everything; the aggregate
tables exist; the dummy secret appears in no output, param or tag.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from servers import MlflowServer  # tests/servers.py

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
SECRET = "dummy-s3-secret-never-logged"
CELLS = ["b2n/ToyShapes/2shot/seed1/J7/K1", "b2n/ToyShapes/2shot/seed1/J7/K2"]
EXPERIMENT = "test/s3"


def _clean_env(endpoint: str) -> dict[str, str]:
    """The process environment with dummy S3 credentials and the endpoint, and nothing of the
    developer's own AWS / MLflow / Ray setup."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("AWS_", "MLFLOW_", "FSSPEC_", "RAY_", "PERL_"))}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                "AWS_EC2_METADATA_DISABLED": "true",
                "MLFLOW_DISABLE_TELEMETRY": "true", "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONPATH": str(REPO)})
    return env


@pytest.fixture(scope="module")
def setup(tmp_path_factory, s3_endpoint, request):
    """A bucket holding the ToyShapes world, an MLflow server whose artifacts go to the bucket,
    and the sweep file. The server starts first: it comes up while the world is generated."""
    tmp = tmp_path_factory.mktemp("s3pipe")
    bucket = f"perl-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key=SECRET)
    client.create_bucket(Bucket=bucket)
    code = tmp / "code"  # the snapshot the CLI runs (and its Ray workers import)
    for pkg in ("perl_core", "pipeline"):
        shutil.copytree(REPO / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**_clean_env(s3_endpoint), "PYTHONPATH": str(code)}
    server = MlflowServer(tmp, artifacts=f"s3://{bucket}/mlartifacts",
                          env={**env, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint},
                          log=tmp / "mlflow-server.log").start(wait=False)
    url = server.url
    try:
        world, weights = request.getfixturevalue("world"), request.getfixturevalue("weights")
        for f in sorted((world / "toy_shapes").rglob("*")):
            if f.is_file():
                client.upload_file(str(f), bucket, f"world/{f.relative_to(world).as_posix()}")
        server.wait_healthy(120)
        sweep = tmp / "s3.yaml"
        sweep.write_text(f"""\
name: s3
experiment: {EXPERIMENT}
fixed:
  arch: perl-tiny
  pretrained: {weights}
  data_root: s3://{bucket}/world
  dataset: ToyShapes
  shots: 2
  epochs: 1
  seed: 1
  device: cpu
  eval_batch_size: 64
grid:
  num_steps: [1, 2]
resources: {{cpu: 1, gpu: 0}}
storage: s3://{bucket}/runs
tracking_uri: {url}
max_failures: 0
""")
        yield {"tmp": tmp, "bucket": bucket, "client": client, "env": env, "url": url,
               "sweep": sweep, "endpoint": s3_endpoint, "code": code}
    finally:
        server.stop()


def _cli(module: str, args: list[str], setup: dict, timeout: float = 240) -> tuple[int, str]:
    p = subprocess.run([sys.executable, "-m", module, *args], check=False, env=setup["env"],
                       cwd=setup["code"],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout


def _keys(setup: dict, prefix: str) -> list[str]:
    pages = setup["client"].get_paginator("list_objects_v2").paginate(
        Bucket=setup["bucket"], Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


@pytest.fixture(scope="module")
def first_run(setup):
    t0 = time.time()
    rc, out = _cli("pipeline.run", [str(setup["sweep"]), "--max-concurrent", "2"], setup)
    (setup["tmp"] / "first_run.log").write_text(out)
    return {"rc": rc, "out": out, "seconds": time.time() - t0}


def _children(url: str) -> list:
    from pipeline.tracking import PARENT_PHASE, Tracker

    t = Tracker(url)
    exp = t.client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, "the sweep created no experiment"
    return [r for r in t.search(exp.experiment_id) if r.data.tags.get("phase") != PARENT_PHASE]


def test_every_cell_is_one_finished_run_with_its_weights_in_the_bucket(setup, first_run):
    from perl_core.train import load_projectors
    from pipeline.spec import cells, load_spec
    from pipeline.tracking import Tracker

    assert first_run["rc"] == 0, first_run["out"]
    assert "2 finished, 0 skipped" in first_run["out"], first_run["out"]
    runs = _children(setup["url"])
    assert sorted(r.info.run_name for r in runs) == sorted(CELLS)  # exactly one run per cell
    assert {r.info.status for r in runs} == {"FINISHED"}
    from pipeline.env import code_fingerprint

    # the trials ran the snapshot (and recorded its code version)
    assert {r.data.tags["code_version"] for r in runs} == \
        {code_fingerprint(setup["code"] / "perl_core")}

    expected = {c.name: c for c in cells(load_spec(setup["sweep"], env=setup["env"]))}
    client, bucket = setup["client"], setup["bucket"]
    tracker = Tracker(setup["url"])
    all_keys = _keys(setup, "mlartifacts/")
    for r in runs:
        cell = expected[r.info.run_name]
        assert r.data.tags["config_hash"] == cell.config_hash
        assert r.data.params["data_root"] == f"s3://{bucket}/world"
        # the server proxies the artifacts to the bucket: the object is there, under the run id
        want = (f"mlartifacts/{r.info.experiment_id}/{r.info.run_id}/artifacts/projectors/"
                "projectors.safetensors")
        key = [k for k in all_keys if k.endswith(f"/{r.info.run_id}/artifacts/projectors/"
                                                 "projectors.safetensors")]
        assert key == [want], (r.info.run_id, all_keys)
        blob = client.get_object(Bucket=bucket, Key=key[0])["Body"].read()
        path = setup["tmp"] / f"{r.info.run_id}.safetensors"
        path.write_bytes(blob)
        state, saved = load_projectors(path)
        assert state and saved.config_hash() == cell.config_hash
        for name in ("config.json", "metrics.json", "per_class.json"):
            assert any(k.endswith(f"/{r.info.run_id}/artifacts/{name}") for k in all_keys), name
        # and MLflow serves the same bytes back through the server
        local = tracker.client.download_artifacts(
            r.info.run_id, "projectors/projectors.safetensors",
            str(setup["tmp"] / "dl" / r.info.run_id))
        assert Path(local).read_bytes() == blob
        # no secret in what MLflow holds
        assert SECRET not in repr(r.data.params) + repr(r.data.tags)


@pytest.fixture
def s3_env(setup, monkeypatch):
    """This process reads the bucket as the trials do: the same AWS_* variables (undone after)."""
    import s3fs

    for k in [k for k in os.environ if k.startswith(("AWS_", "FSSPEC_S3"))]:
        monkeypatch.delenv(k)
    for k, v in setup["env"].items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


def test_trial_records_and_tune_state_are_in_the_bucket(setup, first_run, s3_env, tmp_path,
                                                        capsys):
    from pipeline.estimate import cell_workload
    from pipeline.run import main as run
    from pipeline.spec import cells, load_spec
    from pipeline.tracking import iter_records

    assert first_run["rc"] == 0, first_run["out"]
    keys = _keys(setup, "runs/records/test__s3/")
    assert len([k for k in keys if k.endswith(".json")]) == 2, keys
    assert len([k for k in keys if k.endswith(".safetensors")]) == 2, keys
    assert not [k for k in keys if k.endswith(".tmp")], keys
    assert _keys(setup, "runs/tune/"), "no Tune state under storage/tune"
    # the project's own reader finds both records through the same environment
    records = list(iter_records(f"s3://{setup['bucket']}/runs", EXPERIMENT))
    assert sorted(r.run_name for r, _ in records) == sorted(CELLS)
    runs = {r.data.tags["record_id"]: r for r in _children(setup["url"])}
    assert {r.record_id for r, _ in records} == set(runs)
    # Tune's experiment in the bucket is one that a resubmission could restore (the phase is
    # marked complete, so an identical submission does not)
    from ray import tune

    from pipeline.tuning import exists, tune_storage

    storage_path, fs = tune_storage(f"s3://{setup['bucket']}/runs")
    names = {k.split("/")[2] for k in _keys(setup, "runs/tune/")}
    assert len(names) == 1, names
    path = f"{storage_path}/{names.pop()}"
    assert tune.Tuner.can_restore(path, storage_filesystem=fs)
    assert exists(fs, f"{path}/perl_phase_complete.json")
    # outage recovery from the bucket: --replay rebuilds both runs in an empty store
    empty = f"sqlite:///{tmp_path / 'empty.db'}"
    assert run([str(setup["sweep"]), "--replay", "--tracking-uri", empty]) == 0
    assert "2 stored trial record(s) replayed" in capsys.readouterr().out
    replayed = _children(empty)
    assert sorted(r.info.run_name for r in replayed) == sorted(CELLS)
    assert {r.data.tags["replayed"] for r in replayed} == {"true"}
    # the dry-run estimate reads the split sizes from the s3 data root
    cfg = cells(load_spec(setup["sweep"], env=setup["env"]))[0].config
    assert cell_workload(cfg).source == "data"


def test_rerun_skips_every_cell_and_aggregate_writes_tables(setup, first_run, capsys):
    assert first_run["rc"] == 0, first_run["out"]
    rc, rerun_out = _cli("pipeline.run", [str(setup["sweep"])], setup)
    assert rc == 0, rerun_out
    assert "2 cells, 2 already FINISHED, 0 to run" in rerun_out, rerun_out
    assert "0 finished, 2 skipped" in rerun_out, rerun_out
    assert len(_children(setup["url"])) == 2  # nothing new was run
    records = _keys(setup, "runs/records/test__s3/")
    assert len([k for k in records if k.endswith(".json")]) == 2
    from pipeline.status import main as status

    capsys.readouterr()
    assert status([str(setup["sweep"]), "--ignore-code-version"]) == 0
    assert "2 cells: 2 done, 0 running, 0 failed, 0 left" in capsys.readouterr().out

    # `python -m pipeline.aggregate` in this process (the same main; saves a second start-up)
    from pipeline.aggregate import main as aggregate

    agg = setup["tmp"] / "aggregate"
    capsys.readouterr()
    rc = aggregate(["--experiment", EXPERIMENT, "--tracking-uri", setup["url"], "--out",
                    str(agg), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    tables = list(agg.glob("*.md")) + list(agg.glob("*.csv"))
    assert tables, sorted(p.name for p in agg.iterdir())
    assert (agg / "report.html").is_file()
    text = "\n".join(p.read_text() for p in agg.glob("*.md"))
    assert "ToyShapes" in text, text[:2000]
    for output in (first_run["out"], rerun_out, out):
        assert SECRET not in output
