"""The S3 endpoint of a sweep's `storage: s3://...` stops while the sweep runs, under the real CLI.

moto's S3 server on 127.0.0.1 (real HTTP through s3fs, for the trial records and for Tune's own
state: experiment snapshots and the trials' checkpoints); MLflow in SQLite. A 4-cell sweep
(trials slowed by the test hook PERL_TEST_STEP_DELAY_S, 10 optimizer steps each) runs until one
cell is FINISHED and another RUNNING; the endpoint is then stopped, and started again (same port,
same bucket) once the driver has exited.

Checked, first run: the driver ends by itself (bounded by s3fs's retries; the CLI runs with
AWS_MAX_ATTEMPTS=1, one botocore attempt per s3fs try, else Tune's experiment-state uploads wait
~40 s each on the dead endpoint and the test takes 2-3 minutes) with exit 1, its
summary and a STORAGE ERROR line naming the bucket, not its own traceback (before the fix,
`tuner.fit()` raised EndpointConnectionError out of `pipeline.run`: Tune reads its experiment
state back from storage at the end); every cell without a FINISHED run is named FAILED in the
summary, and its runs' reasons name the bucket (Tune's checkpoint upload) or RecordError (the
record write); no run is left RUNNING. Then the same command, the endpoint back: exit 0, the
interrupted Tune experiment is resumed, the FINISHED cells are skipped, and every cell has
exactly one FINISHED run whose record (JSON + weights with the recorded sha256) is in the bucket;
every record JSON in the bucket is complete.
"""

from __future__ import annotations

import collections
import json
import time
import uuid

import pytest
from servers import S3Endpoint  # tests/servers.py

from .conftest import child_runs, cli, finish, start_cli, sweep_yaml

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

SLOW = {"PERL_TEST_STEP_DELAY_S": "0.5"}


def _s3_env(endpoint: str) -> dict[str, str]:
    """Dummy credentials and the endpoint (they win over the developer's own)."""
    env = {}
    env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint,
                "AWS_EC2_METADATA_DISABLED": "true",
                # one botocore attempt per s3fs try (s3fs still retries 5 times): Tune's experiment
                # state uploads against the dead endpoint take ~40 s each with botocore's default
                # retries, twice at the end of a sweep; the behaviour checked is the same
                "AWS_MAX_ATTEMPTS": "1"})
    return env


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
            for page in pages for o in page.get("Contents", [])}


def test_s3_storage_down_mid_sweep_then_rerun_finishes_each_cell_once(tmp_path, world, weights):
    import hashlib

    ep = S3Endpoint()
    try:
        bucket = f"rel-{uuid.uuid4().hex[:10]}"
        client = boto3.client("s3", endpoint_url=ep.url, region_name="us-east-1",
                              aws_access_key_id="testing", aws_secret_access_key="x")
        client.create_bucket(Bucket=bucket)
        db = tmp_path / "mlflow.db"
        y = sweep_yaml(tmp_path / "s3o.yaml", world=world, weights=weights,
                       storage=f"s3://{bucket}/runs", tracking=f"sqlite:///{db}", name="s3o",
                       steps=(1, 2), fixed="  epochs: 2\n")
        args = [str(y), "--ignore-code-version"]
        env = {**_s3_env(ep.url), **SLOW}
        log = tmp_path / "run1.log"
        t0 = time.monotonic()
        p = start_cli(args, log, env=env)
        deadline, state = time.time() + 300, collections.Counter()
        while time.time() < deadline and p.poll() is None:
            if db.exists():
                try:
                    state = collections.Counter(r["status"] for r in child_runs(db))
                except Exception:  # the store is still being created
                    state = collections.Counter()
                if state["FINISHED"] >= 1 and state["RUNNING"] >= 1:
                    break
            time.sleep(0.2)
        assert state["FINISHED"] >= 1 and state["RUNNING"] >= 1 and p.poll() is None, \
            (state, log.read_text())
        ep.stop()
        t_stop = time.monotonic()
        try:
            rc = finish(p, 400)
        finally:
            down_s = time.monotonic() - t_stop
            ep.start()
        out = log.read_text(errors="replace")
        # the driver ended by itself, with its summary and an error naming the storage; it did
        # not crash (Ray's own output prints the trials' tracebacks, never the driver's)
        assert rc == 1, out
        assert 'pipeline/run.py", line' not in out, out
        assert "=== s3o:" in out and "STORAGE ERROR" in out and bucket in out, out
        assert down_s < 300, down_s
        runs1 = child_runs(db)
        cells1 = collections.defaultdict(list)
        for r in runs1:
            cells1[r["tags"]["cell"]].append(r)
        assert not [r for r in runs1 if r["status"] == "RUNNING"], runs1
        failed1, reasons = [], collections.Counter()
        for cell, rs in cells1.items():
            if any(r["status"] == "FINISHED" for r in rs):
                continue
            failed1.append(cell)
            assert f"FAILED {cell}" in out, (cell, out)
            # the trial's reason names the storage it could not reach (Tune's checkpoint upload
            # or the record write: RecordError naming the record)
            details = [r["tags"].get("status_detail", "") for r in rs if r["status"] == "FAILED"]
            assert all(bucket in d or "RecordError" in d for d in details), details
            # a failed checkpoint upload says so, not only botocore's words
            assert all("RecordError" in d or "CheckpointSaveError: cannot save the Tune "
                       "checkpoint" in d for d in details), details
            reasons.update(d.split(":")[0] for d in details)
        assert failed1, "every cell finished: the outage hit no trial"
        finished1 = {r["tags"]["config_hash"] for r in runs1 if r["status"] == "FINISHED"}
        assert finished1, runs1

        rc2, out2 = cli(args, tmp_path / "run2.log", env=_s3_env(ep.url))
        assert rc2 == 0, out2
        assert "resuming the interrupted Tune experiment" in out2, out2
        assert f"{len(finished1)} already FINISHED, {4 - len(finished1)} to run" in out2, out2
        after = child_runs(db)
        fin = [r for r in after if r["status"] == "FINISHED"]
        per_hash = collections.Counter(r["tags"]["config_hash"] for r in fin)
        assert len(per_hash) == 4 and set(per_hash.values()) == {1}, per_hash
        assert not [r for r in after if r["status"] == "RUNNING"], after
        objs = _objects(client, bucket, "runs/records/")
        recs = {k: json.loads(v) for k, v in objs.items() if k.endswith(".json")}
        for k, rec in recs.items():  # every record present is complete
            blob = objs[k[:-5] + ".safetensors"]
            assert hashlib.sha256(blob).hexdigest() == rec["extra"]["projectors_sha256"], k
        ids = {rec["record_id"] for rec in recs.values()}
        for r in fin:
            assert r["tags"].get("record_id") in ids, r
        print(f"\nS3 down with {state['FINISHED']} cell(s) FINISHED, {state['RUNNING']} RUNNING: "
              f"the driver exited 1 after {down_s:.0f} s ({len(failed1)} cell(s) FAILED naming "
              f"the storage: {dict(reasons)}); the re-run finished the rest: 4 cells, "
              f"one FINISHED run each, "
              f"{len(recs)} complete records ({time.monotonic() - t0:.0f} s)")
    finally:
        ep.stop()
