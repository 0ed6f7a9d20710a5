"""Secrets in the driver's environment never reach MLflow, artifacts, trial storage or logs
(the driver's output and Ray's session logs: every worker's stdout/stderr and Ray's own)."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
from pathlib import Path

import pytest

from .conftest import cli, sweep_yaml

pytestmark = pytest.mark.reliability

SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAFAKEKEYRELTEST01",
           "AWS_SECRET_ACCESS_KEY": "fakeSecretRelTest0123456789abcdefXYZ",
           "MLFLOW_TRACKING_TOKEN": "fake-token-reltest-9f8e7d6c5b4a"}


def test_secret_env_values_are_written_nowhere(tmp_path, world, weights):
    db = tmp_path / "mlflow.db"
    y = sweep_yaml(tmp_path / "rel.yaml", world=world, weights=weights, storage=tmp_path / "runs",
                   tracking=f"sqlite:///{db}", steps=(1,))
    # Ray's session (its own logs and every worker's stdout/stderr) under a folder searched
    # below; short, because Ray's unix sockets live there (a 107-byte path limit)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
    try:
        rc, out = cli([str(y)], tmp_path / "run.log", env={**SECRETS, "RAY_TMPDIR": str(ray_tmp)})
        assert rc == 0, out
        shutil.copytree(ray_tmp, tmp_path / "ray-session", symlinks=True,
                        ignore=shutil.ignore_patterns("sockets", "*.sock", "plasma*"),
                        ignore_dangling_symlinks=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    ray_logs = [p for p in (tmp_path / "ray-session").rglob("*") if p.is_file()]
    assert any(p.name.startswith("worker-") and p.suffix in (".out", ".err") for p in ray_logs), \
        "no Ray worker log found: the session folder was not captured"
    # the search can find a value when one is written: the DB dump holds the run's params
    con = sqlite3.connect(db)
    dump = "\n".join(con.iterdump())
    con.close()
    assert "ToyShapes" in dump and "perl-tiny" in dump
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)  # artifacts and records were written
    assert any(p.name == "run.log" for p in files)
    blobs = {str(p): p.read_bytes() for p in files}
    blobs["<sqlite dump>"] = dump.encode()
    leaks = [(where, name) for where, data in blobs.items() for name, v in SECRETS.items()
             if v.encode() in data]
    assert not leaks, leaks
