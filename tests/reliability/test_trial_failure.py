"""A cell whose loss goes non-finite (lr 1e30): FAILED with its reason, the others finish, exit 1,
and `pipeline.aggregate` shows the cell FAILED rather than a number."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO, child_runs, cli, cli_env, sweep_yaml

pytestmark = pytest.mark.reliability


def test_nan_loss_cell_is_failed_others_finish(tmp_path, world, weights):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    y = sweep_yaml(tmp_path / "rel.yaml", world=world, weights=weights, storage=tmp_path / "runs",
                   tracking=uri, name="nan", steps=(1,)).read_text()
    y = y.replace("  num_steps: [1]\n", "  num_steps: [1]\n  lr: [1.0e-2, 1.0e+30]\n")
    (tmp_path / "nan.yaml").write_text(y)
    rc, out = cli([str(tmp_path / "nan.yaml")], tmp_path / "run.log")
    assert rc == 1, out
    assert "2 finished, 0 skipped (already FINISHED), 2 failed" in out, out
    tail = out.split("=== nan:")[1]  # the driver's summary
    assert tail.count("FAILED b2n/") == 2, tail
    assert tail.count("lr=1e+30: FloatingPointError: non-finite") == 2, tail
    runs = child_runs(db)
    failed = [r for r in runs if r["status"] == "FAILED"]
    finished = [r for r in runs if r["status"] == "FINISHED"]
    assert len(finished) == 2 and len(failed) == 2, [
        (r["status"], r["tags"].get("status_detail")) for r in runs]
    for r in failed:
        assert "non-finite" in r["tags"].get("status_detail", ""), r["tags"]
    agg = subprocess.run([sys.executable, "-m", "pipeline.aggregate", "--experiment", "rel/nan",
                          "--tracking-uri", uri, "--out", str(tmp_path / "agg"), "--no-log"],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert agg.returncode == 0, agg.stdout + agg.stderr
    table = (tmp_path / "agg" / "ablation_lr__nan.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| 1e+30 |"))
    assert row.count("FAILED (2)") == 4, table       # the failed cell: FAILED, not a number
    good = next(line for line in table.splitlines() if line.startswith("| 0.01 |"))
    assert "FAILED" not in good and any(c.isdigit() for c in good.split("|")[2]), table
