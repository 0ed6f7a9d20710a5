"""Fixtures for the fault-injection suite: a tiny synthetic world, perl-tiny weights on disk, a
sweep YAML writer, and `cli()` which runs `python -m pipeline.run` as a real subprocess (its own
local Ray, a real MLflow SQLite store)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("rel-world")
    generate_world(root, datasets=["ToyShapes", "ToyCounts"], sizes={"train": 4, "val": 2, "test": 3})
    return root


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> Path:
    import torch
    from safetensors.torch import save_file

    from perl_core.factory import create_clip

    torch.manual_seed(0)
    clip = create_clip("perl-tiny", None)
    path = tmp_path_factory.mktemp("rel-weights") / "perl-tiny-test.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(path))
    return path


def sweep_yaml(path: Path, *, world: Path, weights: Path, storage: Path, tracking: str,
               name: str = "rel", steps=(1, 2), lr: str | None = None, extra: str = "") -> Path:
    lr_line = f"  lr: {lr}\n" if lr else ""
    path.write_text(f"""\
name: {name}
experiment: rel/{name}
fixed:
  arch: perl-tiny
  pretrained: {weights}
  data_root: {world}
  shots: 2
  seed: 1
  device: cpu
  eval_batch_size: 64
{lr_line}grid:
  dataset: [ToyShapes, ToyCounts]
  num_steps: [{', '.join(map(str, steps))}]
resources: {{cpu: 1, gpu: 0}}
storage: {storage}
tracking_uri: {tracking}
max_failures: 0
{extra}""")
    return path


def cli_env(extra: dict | None = None) -> dict:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "PYTHONPATH": str(REPO)}
    env.pop("RAY_ADDRESS", None)  # a fresh local Ray per driver
    env.update(extra or {})
    return env


def start_cli(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, "-m", "pipeline.run", *args], cwd=REPO,
                            env=cli_env(env), stdout=fh, stderr=subprocess.STDOUT,
                            start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 400) -> int:
    try:
        return p.wait(timeout=timeout)
    finally:
        kill_group(p)


def kill_group(p: subprocess.Popen) -> None:
    """Kill what is left of the process group this test started (Ray workers of a killed driver)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def cli(args: list[str], log: Path, env: dict | None = None, timeout: float = 400) -> tuple[int, str]:
    p = start_cli(args, log, env)
    rc = finish(p, timeout)
    return rc, log.read_text(errors="replace")


def runs(db: Path) -> list[dict]:
    """Every MLflow run in the SQLite store, with its tags, straight from the DB."""
    con = sqlite3.connect(db)
    try:
        rows = con.execute("select run_uuid, status from runs").fetchall()
        out = []
        for rid, status in rows:
            tags = dict(con.execute("select key, value from tags where run_uuid=?", (rid,)))
            metrics = dict(con.execute(
                "select key, value from latest_metrics where run_uuid=?", (rid,)))
            out.append({"id": rid, "status": status, "tags": tags, "metrics": metrics})
        return out
    finally:
        con.close()


def child_runs(db: Path) -> list[dict]:
    return [r for r in runs(db) if r["tags"].get("phase") != "sweep" and "config_hash" in r["tags"]]
