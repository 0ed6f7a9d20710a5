"""A real `mlflow server` (127.0.0.1, SQLite backend, proxied artifacts) and `pipeline.run` as a
subprocess with its own local Ray:

1. no outage: 8 cells, 4 trials at once (0.5 CPU each on 2 CPUs) logging to the one server; every
   final metric and every point of every training curve is in MLflow (compared with the trials'
   storage records), and no 'database is locked' anywhere;
2. the same grid in another experiment, with the server SIGKILLed as soon as a trial run is
   RUNNING: every trial still finishes and keeps its record in storage, the driver exits 3 and
   says how to replay; the server is restarted on the same port and backend; the next plain run
   of the sweep replays the records automatically (then `--replay` finds nothing left); each
   cell has exactly one FINISHED run with its metrics and projector weights, and
   `pipeline.aggregate` prints the same tables as for the run without the outage.
"""

from __future__ import annotations

import collections
import time
from pathlib import Path

import pytest

from .conftest import aggregate_tables, cli, finish, runs, start_cli, sweep_yaml

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(900)]

GRID = dict(steps=(1, 2), seeds=(1, 2), cpu=0.5)  # 2 datasets x 2 K x 2 seeds = 8 cells


def _children(db) -> list[dict]:
    return [r for r in runs(db) if r["tags"].get("phase") == "final"]


def check_against_records(server, experiment: str, storage, cells: int = 8) -> dict:
    """Every record's final metrics and curve points are in its FINISHED run; one per cell.
    (Also run against the cluster's stack by tests/test_tracking_stack.py.)"""
    from mlflow import MlflowClient

    from pipeline.tracking import iter_records, read_bytes

    client = MlflowClient(server.url)
    exp = client.get_experiment_by_name(experiment)
    all_runs = client.search_runs([exp.experiment_id], "tags.phase = 'final'", max_results=1000)
    finished = [r for r in all_runs if r.info.status == "FINISHED"]
    per_hash = collections.Counter(r.data.tags["config_hash"] for r in finished)
    assert len(per_hash) == cells and set(per_hash.values()) == {1}, per_hash
    assert not [r for r in all_runs if r.info.status == "RUNNING"]
    # a run cut short by the outage is a shell without config_hash, never a trial without params
    shells = [r for r in client.search_runs([exp.experiment_id], "", max_results=1000)
              if "config_hash" in r.data.tags and not r.data.params]
    assert not shells, [(r.info.run_id, r.info.status) for r in shells]
    records = {rec.config_hash: (rec, url) for rec, url in iter_records(str(storage), experiment)}
    assert set(records) == set(per_hash)
    points = 0
    for r in finished:
        rec, url = records[r.data.tags["config_hash"]]
        for key, value in rec.metrics.items():
            assert r.data.metrics[key] == value, key  # exact: floats survive the round trip
        curve = client.get_metric_history(r.info.run_id, "train_step/loss")
        assert sorted((p.step, p.value) for p in curve) == \
            sorted((h["step"], h["loss"]) for h in rec.history)
        points += len(rec.metrics) + len(curve)
        local = client.download_artifacts(r.info.run_id, "projectors/projectors.safetensors",
                                          str(server.tmp / "dl" / r.info.run_id))
        assert Path(local).read_bytes() == read_bytes(url)  # the weights, byte for byte
    return {"runs": len(finished), "points": points, "all_runs": len(all_runs)}


def test_parallel_trials_then_an_outage_lose_nothing(tmp_path, world, weights, mlflow_server):
    server = mlflow_server
    t0 = time.monotonic()
    # 1. eight trials, four at once, one tracking server
    base = sweep_yaml(tmp_path / "base.yaml", world=world, weights=weights,
                      storage=tmp_path / "runs-base", tracking=server.url, name="srv",
                      experiment="rel/srv-base", **GRID)
    rc, out = cli([str(base), "--max-concurrent", "4", "--ignore-code-version"],
                  tmp_path / "base.log")
    assert rc == 0, out
    assert "8 finished" in out, out
    spans = sorted((r["start"], r["end"]) for r in _spans(server.db, "rel/srv-base"))
    overlap = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert overlap >= 3, spans  # trials really logged concurrently
    base_counts = check_against_records(server, "rel/srv-base", tmp_path / "runs-base")
    t_base = time.monotonic() - t0

    # 2. the same grid, the server killed while trials run
    y = sweep_yaml(tmp_path / "outage.yaml", world=world, weights=weights,
                   storage=tmp_path / "runs-outage", tracking=server.url, name="srv",
                   experiment="rel/srv-outage", **GRID)
    log = tmp_path / "outage.log"
    # --no-reuse: the cells of step 1 are in the store; this step is about trials that train
    # (and log) while the server goes away, not about linking them (pipeline/reuse.py)
    p = start_cli([str(y), "--max-concurrent", "4", "--ignore-code-version", "--no-reuse"], log)
    deadline, running = time.time() + 300, []
    while time.time() < deadline and p.poll() is None and not running:
        running = [r for r in _children(server.db) if r["status"] == "RUNNING"
                   and r["tags"].get("sweep") == "srv"
                   and r["experiment"] == "rel/srv-outage"] if server.db.exists() else []
        time.sleep(0.2)
    assert running, f"no trial run started:\n{log.read_text()}"
    t_kill = time.monotonic()
    server.kill()
    rc = finish(p, 600)
    out = log.read_text(errors="replace")
    down_s = time.monotonic() - t_kill
    assert rc == 3, out
    assert "8 finished" in out and "MLFLOW UNREACHABLE" in out and "--replay" in out, out
    records = list((tmp_path / "runs-outage" / "records" / "rel__srv-outage").glob("*.json"))
    assert len(records) == 8, records  # every trial kept its result while the server was down
    before = [r for r in _children(server.db) if r["experiment"] == "rel/srv-outage"]
    logged_before = sum(r["status"] == "FINISHED" for r in before)

    server.start()  # same port, same backend
    rc, out = cli([str(y), "--ignore-code-version"], tmp_path / "after.log")
    assert rc == 0, out
    assert f"{8 - logged_before} stored trial record(s) replayed" in out, out
    assert "8 already FINISHED, 0 to run" in out, out
    rc, out = cli([str(y), "--replay"], tmp_path / "replay.log")
    assert rc == 0 and "replay done: 0 record(s)" in out, out
    counts = check_against_records(server, "rel/srv-outage", tmp_path / "runs-outage")
    # runs left RUNNING by the outage were closed (KILLED) by the next submission
    after = {r["id"]: r["status"] for r in _children(server.db)}
    assert all(after[r["id"]] in ("KILLED", "FINISHED") for r in before)

    # the tables are the same as without the outage
    a = aggregate_tables(server.url, "rel/srv-base", tmp_path / "agg-base")
    b = aggregate_tables(server.url, "rel/srv-outage", tmp_path / "agg-outage")
    assert a and a == b
    for text in (server.log.read_text(), out):
        assert "database is locked" not in text
    print(f"\nparallel: {base_counts} in {t_base:.0f} s; outage: killed with "
          f"{len(running)} run(s) RUNNING, {logged_before} logged before the kill, driver "
          f"ended {down_s:.0f} s after it, replayed {8 - logged_before}; {counts}; "
          f"tables identical ({len(a)} files)")


def _spans(db, experiment: str) -> list[dict]:
    import sqlite3

    con = sqlite3.connect(db)
    try:
        rows = con.execute(
            "select r.start_time, r.end_time from runs r join experiments e "
            "on r.experiment_id = e.experiment_id join tags t on t.run_uuid = r.run_uuid "
            "where e.name = ? and t.key = 'phase' and t.value = 'final'", (experiment,)).fetchall()
    finally:
        con.close()
    return [{"start": s, "end": e} for s, e in rows]
