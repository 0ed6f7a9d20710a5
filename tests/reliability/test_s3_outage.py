"""Trial records on S3 (moto's server on 127.0.0.1, real HTTP through s3fs) while the endpoint
goes away: writes are retried or fail with an error naming the record, and a record is never
taken as complete unless its weights are there and match (write, read back and verify, then the
JSON under a temporary name, renamed last; readers re-check the blob's sha256).

1. the endpoint stops for ~1.5 s at random moments during 12 record writes, then comes back:
   every write either completes (s3fs retried) or raises RecordError; every JSON present has
   its blob with the recorded sha256, and every write that returned is there;
2. the endpoint stays down: RecordError naming the record URL, the step and the time spent
   retrying; no JSON appears;
3. a damaged blob under a complete JSON (truncated by another writer): `iter_records` and
   `replay` skip it and say which one; the good records are replayed into MLflow.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid

import pytest
from servers import S3Endpoint  # tests/servers.py

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")
s3fs = pytest.importorskip("s3fs")


@pytest.fixture
def s3(monkeypatch):
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    ep = S3Endpoint()
    monkeypatch.setenv("FSSPEC_S3_ENDPOINT_URL", ep.url)
    s3fs.S3FileSystem.clear_instance_cache()
    bucket = f"rel-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=ep.url, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield ep, f"s3://{bucket}/runs"
    ep.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def _record(i: int, experiment: str = "rel/s3"):
    from pipeline.tracking import TrialRecord

    cfg = {"dataset": "ToyShapes", "arch": "perl-tiny", "seed": i}
    from perl_core.config import TrainConfig

    c = TrainConfig.from_dict(cfg)
    return TrialRecord(record_id=f"r{i:02d}{uuid.uuid4().hex[:6]}", experiment=experiment,
                       run_name=f"cell{i}", config=c.to_dict(), config_hash=c.config_hash(),
                       metrics={"base/acc": float(i)}, history=[{"step": 1, "loss": 1.0}],
                       per_class={}, num_trainable_parameters=642,
                       tags={"config_hash": c.config_hash(), "phase": "final", "sweep": "s3"})


def _blob(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * 2000  # 64 KB: a weights-sized body


def _listing(storage: str, experiment: str = "rel/s3") -> dict[str, bytes]:
    from pipeline.layout import open_fs, records_dir

    s3fs.S3FileSystem.clear_instance_cache()
    fs, root = open_fs(records_dir(storage, experiment))
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in fs.find(root)}


def test_endpoint_outages_never_leave_a_record_taken_as_complete(s3, tmp_path):
    from pipeline import tracking

    ep, storage = s3
    rng = random.Random(7)
    returned, errors, outages, in_flight = [], [], 0, 0
    t0 = time.monotonic()
    for i in range(12):
        rec, blob = _record(i), _blob(i)
        result: dict = {}

        def write(rec=rec, blob=blob, result=result):
            try:
                result["url"] = tracking.write_record(storage, rec, blob)
            except tracking.RecordError as e:
                result["error"] = str(e)

        th = threading.Thread(target=write)
        th.start()
        time.sleep(rng.uniform(0.0, 0.08))  # somewhere in the write (blob, verify, JSON, rename)
        in_flight += th.is_alive()
        ep.stop()
        outages += 1
        time.sleep(1.5)
        ep.start()
        th.join(120)
        assert not th.is_alive()
        if "url" in result:
            returned.append(rec.stem())
        else:
            errors.append(result["error"])
            assert rec.stem() in result["error"] and "not marked complete" in result["error"]
    files = _listing(storage)
    jsons = {n[:-5] for n in files if n.endswith(".json")}
    assert set(returned) <= jsons  # what a writer was told is written, is
    for stem in jsons:  # and every JSON present is complete: its blob is there and matches
        import json

        rec = json.loads(files[f"{stem}.json"])
        assert hashlib.sha256(files[f"{stem}.safetensors"]).hexdigest() == \
            rec["extra"]["projectors_sha256"]
    problems: list[str] = []
    assert {r.stem() for r, _ in tracking.iter_records(storage, "rel/s3",
                                                       problems=problems)} == jsons
    assert not problems
    assert not [n for n in files if n.endswith(".tmp") and n[1:-9] in returned]
    assert in_flight >= 3, in_flight  # the outages did hit writes in progress
    print(f"\n{outages} outages of 1.5 s ({in_flight} during a write in progress): "
          f"{len(returned)} writes completed "
          f"(retried), {len(errors)} raised RecordError, {len(jsons)} complete records, 0 "
          f"incomplete taken as complete ({time.monotonic() - t0:.0f} s)")

    # the endpoint stays down: a clear error, bounded in time, and no JSON
    ep.stop()
    rec = _record(99)
    t1 = time.monotonic()
    with pytest.raises(tracking.RecordError) as e:
        tracking.write_record(storage, rec, _blob(99))
    spent = time.monotonic() - t1
    msg = str(e.value)
    assert f"{storage}/records/rel__s3/{rec.stem()}.json" in msg and "retries" in msg, msg
    assert "testing-secret" not in msg
    assert spent < 120, spent
    ep.start()
    assert f"{rec.stem()}.json" not in _listing(storage)
    print(f"endpoint down: RecordError after {spent:.0f} s: {msg[:160]}")


def test_a_damaged_blob_is_never_replayed(s3, tmp_path):
    from pipeline import layout, tracking

    ep, storage = s3
    recs = [_record(i, "rel/s3r") for i in range(3)]
    for i, rec in enumerate(recs):
        tracking.write_record(storage, rec, _blob(i))
    # another writer cut one blob short after its JSON was written (a partial overwrite)
    fs, root = layout.open_fs(layout.records_dir(storage, "rel/s3r"))
    with fs.open(f"{root}/{recs[1].stem()}.safetensors", "wb") as f:
        f.write(_blob(1)[:1000])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = tracking.Tracker(uri)
    skipped: list[str] = []
    ids = tracking.replay(tracker, storage, "rel/s3r", skipped=skipped)
    assert len(ids) == 2, ids
    assert len(skipped) == 1 and recs[1].stem() in skipped[0], skipped
    logged = {tracker.client.get_run(i).data.tags["record_id"] for i in ids}
    assert logged == {recs[0].record_id, recs[2].record_id}
