"""Helpers for the fault-injection suite (the `world` and `weights` fixtures are in
tests/conftest.py): a sweep YAML writer, and `cli()` which runs `python -m pipeline.run` as a
real subprocess (its own local Ray, a real MLflow SQLite store)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from servers import (MlflowServer, cli_env, finish, free_port,  # noqa: F401 (tests/servers.py;
                     kill_group, start_cli)  # re-exported to the suite)

REPO = Path(__file__).resolve().parents[2]


# `world` and `weights` (session fixtures) come from tests/conftest.py.


def sweep_yaml(path: Path, *, world: Path, weights: Path, storage: Path | str, tracking: str,
               name: str = "rel", steps=(1, 2), lr: str | None = None, extra: str = "",
               experiment: str | None = None, seeds=None, cpu: float = 1,
               max_failures: int = 0, fixed: str = "") -> Path:
    lr_line = f"  lr: {lr}\n" if lr else ""
    seed_fixed = "" if seeds else "  seed: 1\n"
    seed_grid = f"  seed: [{', '.join(map(str, seeds))}]\n" if seeds else ""
    path.write_text(f"""\
name: {name}
experiment: {experiment or f"rel/{name}"}
fixed:
  arch: perl-tiny
  pretrained: {weights}
  data_root: {world}
  shots: 2
{seed_fixed}  device: cpu
  eval_batch_size: 64
  jacobian_samples: 0  # the Jacobian has its own tests; trials here test the pipeline
{lr_line}{fixed}grid:
  dataset: [ToyShapes, ToyCounts]
  num_steps: [{', '.join(map(str, steps))}]
{seed_grid}resources: {{cpu: {cpu}, gpu: 0}}
storage: {storage}
tracking_uri: {tracking}
max_failures: {max_failures}
{extra}""")
    return path


def cli(args: list[str], log: Path, env: dict | None = None,
        timeout: float = 400) -> tuple[int, str]:
    p = start_cli(args, log, env)
    rc = finish(p, timeout)
    return rc, log.read_text(errors="replace")


def runs(db: Path) -> list[dict]:
    """Every MLflow run in the SQLite store, with its tags, straight from the DB."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select r.run_uuid, r.status, e.name from runs r join experiments e "
                           "on r.experiment_id = e.experiment_id").fetchall()
        out = []
        for rid, status, experiment in rows:
            tags = dict(con.execute("select key, value from tags where run_uuid=?", (rid,)))
            metrics = dict(con.execute(
                "select key, value from latest_metrics where run_uuid=?", (rid,)))
            out.append({"id": rid, "status": status, "tags": tags, "metrics": metrics,
                        "experiment": experiment})
        return out
    finally:
        con.close()


def child_runs(db: Path) -> list[dict]:
    return [r for r in runs(db) if r["tags"].get("phase") != "sweep" and "config_hash" in r["tags"]]


def wait_for_running(db: Path, p, timeout: float = 240) -> list[dict]:
    """The trial runs RUNNING in the store, as soon as there is one (or [] when the driver `p`
    exits or `timeout` passes first)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if db.exists():
            try:
                running = [r for r in child_runs(db) if r["status"] == "RUNNING"]
            except Exception:  # the store is still being created
                running = []
            if running:
                return running
        time.sleep(0.5)
    return []


# --- a real `mlflow server` that a test can kill and restart (same port, same backend) ----------


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path).start()
    try:
        yield server
    finally:
        server.kill()


def aggregate_tables(uri: str, experiment: str, out: Path) -> dict[str, str]:
    """`pipeline.aggregate` (its `main`, in this process: one import of pandas/matplotlib for
    all calls) over one experiment; {file name: text} of its tables, Markdown and CSV, with run
    ids and the experiment's name masked (runs.csv and report.html hold times: left out)."""
    import re

    from pipeline.aggregate import main

    assert main(["--experiment", experiment, "--tracking-uri", uri, "--out", str(out),
                 "--no-log", "--quiet"]) == 0
    run_id = re.compile(r"\b[0-9a-f]{32}\b")  # the tables list the run ids behind a number
    return {f.name: run_id.sub("<run>", f.read_text()).replace(experiment, "<experiment>")
            for f in sorted(out.iterdir())
            if f.suffix in (".md", ".csv") and f.name != "runs.csv"}
