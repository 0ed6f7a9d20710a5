"""The MLflow server dies during `python -m pipeline.run SWEEP.yaml --replay`.

24 trial records are in the sweep's storage (written with `pipeline.tracking.write_record`, as
a sweep during an MLflow outage leaves them); `--replay` logs them into a real `mlflow server`
(SQLite backend, proxied artifacts), which is SIGKILLed as soon as 3 replayed runs are FINISHED.
Checked: the replay exits 3 within its bounded HTTP retries with a message (how many records it
logged, that the rest are safe), not a traceback; after restarting the server (same port and
backend) a second `--replay` logs exactly the records that had no FINISHED run, marks what the
dead replay left RUNNING (its parent, a half-logged run) KILLED; then every record has exactly
one FINISHED run (its record_id, its metrics), no run is RUNNING, and a third `--replay` finds
nothing to do.
"""

from __future__ import annotations

import collections
import hashlib
import re
import time

import pytest

from .conftest import cli, finish, runs, start_cli, sweep_yaml

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(300)]

N = 24  # records; the kill lands after 3 are logged (each takes ~10 HTTP calls)
EXPERIMENT = "rel/replay-outage"
SWEEP = "rpl"


def _write_records(storage: str, n: int) -> dict:
    """n complete records of distinct cells (config_hash -> record)."""
    from perl_core.config import TrainConfig
    from pipeline.tracking import TrialRecord, new_record_id, write_record

    out = {}
    for i in range(n):
        cfg = TrainConfig.from_dict({"dataset": "ToyShapes", "arch": "perl-tiny", "shots": 2,
                                     "seed": i + 1, "device": "cpu"})
        h, name = cfg.config_hash(), f"b2n/ToyShapes/2shot/seed{i + 1}/J7/K1"
        rec = TrialRecord(
            record_id=new_record_id(), experiment=EXPERIMENT, run_name=name,
            config=cfg.to_dict(), config_hash=h,
            metrics={"base/acc": 10.0 + i / 7, "new/acc": 20.0 + i / 3, "hm": 15.0 + i / 11},
            history=[{"step": s, "loss": 2.0 / s + i / 100} for s in range(1, 6)],
            per_class={}, num_trainable_parameters=642,
            tags={"config_hash": h, "phase": "final", "sweep": SWEEP, "cell": name,
                  "code_version": "test-replay", "dataset": "ToyShapes"},
            started_ms=1_700_000_000_000 + i, ended_ms=1_700_000_060_000 + i)
        write_record(storage, rec, hashlib.sha256(str(i).encode()).digest() * 2000)
        out[h] = rec
    return out


def _mine(db) -> list[dict]:
    return [r for r in runs(db) if r["experiment"] == EXPERIMENT]


def test_server_killed_during_replay_then_replay_again_logs_each_record_once(
        tmp_path, world, weights, mlflow_server):
    server, t0 = mlflow_server, time.monotonic()
    storage = tmp_path / "runs"
    records = _write_records(str(storage), N)
    y = sweep_yaml(tmp_path / "rpl.yaml", world=world, weights=weights, storage=storage,
                   tracking=server.url, name=SWEEP, experiment=EXPERIMENT)

    # 1. --replay, the server SIGKILLed once 3 replayed runs are FINISHED
    log = tmp_path / "replay1.log"
    p = start_cli([str(y), "--replay"], log)
    deadline, done = time.time() + 180, []
    while time.time() < deadline and p.poll() is None:
        if server.db.exists():
            try:
                done = [r for r in _mine(server.db) if r["status"] == "FINISHED"
                        and r["tags"].get("replayed") == "true"]
            except Exception:  # tables still being created
                done = []
            if len(done) >= 3:
                break
        time.sleep(0.1)
    assert len(done) >= 3 and p.poll() is None, \
        f"the replay ended before the kill ({len(done)} runs):\n{log.read_text()}"
    server.kill()
    t_kill = time.monotonic()
    rc = finish(p, 150)
    ended_s = time.monotonic() - t_kill
    out = log.read_text(errors="replace")
    assert rc == 3, out
    assert "Traceback" not in out, out
    assert "stopped answering" in out, out
    # how far it got (pipeline.tracking.replay counts the records it logged before the outage)
    m = re.search(r"during the replay \(.*\): (\d+) of (\d+) record\(s\) to log were logged",
                  out)
    assert "MLFLOW UNREACHABLE" in out and "--replay" in out, out
    assert ended_s < 60, ended_s  # bounded retries, no hang
    before = _mine(server.db)
    finished_before = {r["tags"]["config_hash"] for r in before if r["status"] == "FINISHED"}
    assert len(finished_before) < N, "the replay completed before the kill"
    if m:  # what it says it logged is what MLflow holds (a run the server FINISHED while its
        # answer was lost counts as logged in MLflow, not in the message)
        assert int(m.group(2)) == N and int(m.group(1)) <= len(finished_before), m.group(0)
    left = [r for r in before if r["status"] == "RUNNING"]  # the parent, maybe a half-logged run

    # 2. the server back (same port, same backend): a second --replay logs the rest, once each
    t1 = time.monotonic()
    server.start()
    rc, out2 = cli([str(y), "--replay"], tmp_path / "replay2.log")
    assert rc == 0, out2
    assert f"replay done: {N - len(finished_before)} record(s)" in out2, out2
    after = _mine(server.db)
    fin = [r for r in after if r["status"] == "FINISHED" and "config_hash" in r["tags"]]
    per_hash = collections.Counter(r["tags"]["config_hash"] for r in fin)
    assert set(per_hash) == set(records) and set(per_hash.values()) == {1}, per_hash
    for r in fin:  # each FINISHED run is its record's whole result
        rec = records[r["tags"]["config_hash"]]
        assert r["tags"]["record_id"] == rec.record_id
        for k, v in rec.metrics.items():
            assert r["metrics"][k] == v, (k, r)
    assert not [r for r in after if r["status"] == "RUNNING"], after
    status = {r["id"]: r["status"] for r in after}
    assert all(status[r["id"]] == "KILLED" for r in left), [(r["tags"], status[r["id"]])
                                                           for r in left]
    half = [r for r in after if r["status"] == "KILLED" and r["tags"].get("phase") != "sweep"]
    parents = collections.Counter(r["status"] for r in after if r["tags"].get("phase") == "sweep")
    assert parents == {"KILLED": 1, "FINISHED": 1}, parents

    # 3. nothing left to replay
    t2 = time.monotonic()
    rc, out3 = cli([str(y), "--replay"], tmp_path / "replay3.log")
    assert rc == 0 and "replay done: 0 record(s)" in out3, out3
    print(f"\nserver killed after {len(finished_before)} of {N} records were logged "
          f"(it said: {f'{m.group(1)} of {m.group(2)}' if m else 'no count'}); the replay "
          f"exited 3 {ended_s:.0f} s after the kill; "
          f"{len(half)} half-logged run(s) KILLED; the second replay logged "
          f"{N - len(finished_before)}; {N} records, one FINISHED run each ({t1 - t0:.0f} s to "
          f"the dead replay's exit, {t2 - t1:.0f} s restart and replay, "
          f"{time.monotonic() - t2:.0f} s the last replay)")
