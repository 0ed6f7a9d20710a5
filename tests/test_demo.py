"""`make demo`, the README's main command, end to end on the embedded default.

`python -m pipeline.demo` (what `make demo` runs once the venv exists) is started as a user starts
it, into a fresh runs folder: it generates the synthetic world, runs `sweeps/smoke.yaml` on a local
Ray with MLflow on SQLite, and aggregates. Every smoke cell must be a FINISHED child run with its
weights, the report must hold the rebuilt tables, and a second `make demo` must skip every cell.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_pipeline_run import children

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[1]
SMOKE_CELLS = sorted(f"b2n/{d}/16shot/seed1/J7/K{k}"
                     for d in ("ToyShapesSensor", "ToyShapes", "ToyCounts") for k in (4,))


def _demo(runs: Path) -> subprocess.CompletedProcess:
    # the user's environment, minus anything that would point the demo elsewhere
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "PERL_DATA_ROOT", "PERL_RUNS_DIR", "RAY_ADDRESS")}
    return subprocess.run([sys.executable, "-m", "pipeline.demo", "--runs-dir", str(runs)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=500)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    runs = tmp_path_factory.mktemp("demo") / "runs"
    out = _demo(runs)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    return runs, out.stdout


def test_every_smoke_cell_is_a_finished_run_with_weights(demo):
    runs, stdout = demo
    assert "=== smoke: 3 finished, 0 skipped (already FINISHED), 0 failed ===" in stdout, stdout
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    cells = children(uri, "perl/smoke")
    assert sorted(r.info.run_name for r in cells) == SMOKE_CELLS
    assert {r.info.status for r in cells} == {"FINISHED"}
    from pipeline.tracking import Tracker

    client = Tracker(uri).client
    for r in cells:
        # the embedded default's settings reached every run, as params
        assert r.data.params["pretrained"] == "embedded"
        assert r.data.params["arch"] == "perl-tiny"
        assert 0.0 <= r.data.metrics["base/acc"] <= 100.0
        arts = {a.path for a in client.list_artifacts(r.info.run_id, "projectors")}
        assert "projectors/projectors.safetensors" in arts, arts


def test_report_holds_the_rebuilt_tables(demo):
    runs, stdout = demo
    assert "Demo finished" in stdout
    report = runs / "aggregate" / "report.html"
    html = report.read_text()
    for name in ("ToyShapesSensor", "ToyShapes", "ToyCounts", "<table", "data:image/png;base64,"):
        assert name in html, name
    # issue 14's per-step answers, each a table of its own: the Jacobian, the alignment metrics,
    # Fig. 5's drift groups, and the pooled (Fig. 7) convention beside the per-dataset mean
    for table in ("dynamics_jacobian__smoke", "dynamics_cos_true__smoke", "dynamics_margin__smoke",
                  "dynamics_gap__smoke", "dynamics_drift__smoke"):
        assert f'id="{table}"' in html, table
    assert "base_pooled" in (runs / "aggregate" / "dynamics_acc__smoke.csv").read_text()
    assert "found 3 FINISHED, 0 FAILED, 0 missing" in stdout
    # the world went where the demo said, and nothing outside the runs folder was needed
    assert (runs / "world").is_dir()


def test_second_demo_skips_every_cell(demo):
    runs, _ = demo
    out = _demo(runs)
    assert out.returncode == 0, (out.stdout + out.stderr)[-6000:]
    assert "=== smoke: 0 finished, 3 skipped (already FINISHED), 0 failed ===" in out.stdout
    uri = f"sqlite:///{runs / 'mlflow.db'}"
    assert len(children(uri, "perl/smoke")) == 3  # no second run of any cell
