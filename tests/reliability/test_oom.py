"""Out of memory inside one trial, through the real CLI (local Ray, MLflow SQLite): that cell is
FAILED with `OutOfMemoryError` in MLflow's `status_detail` and in the driver's summary, the other
cell finishes, exit code 1, and `pipeline.aggregate` shows the cell FAILED rather than a number.

A real out-of-memory is not safe to provoke on a shared CI machine, so the explicit test hook
`PERL_TEST_FAULT=oom:<dataset>:<step>` (pipeline/trainable.py, off by default) raises
`torch.OutOfMemoryError` - the class a CUDA allocation failure raises - from the step callback
inside `fit`, mid-training: the exception travels the path a real CUDA OOM takes (out of `fit`,
through the trainable's failure handling, which also frees the trial's memory, into Tune).
"""

from __future__ import annotations

import pytest
import torch

from .conftest import child_runs, cli, sweep_yaml

pytestmark = pytest.mark.reliability


def test_oom_in_one_cell_is_failed_others_finish(tmp_path, world, weights):
    assert torch.cuda.OutOfMemoryError is torch.OutOfMemoryError  # one class, CUDA's
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    sweep = sweep_yaml(tmp_path / "oom.yaml", world=world, weights=weights,
                       storage=tmp_path / "runs", tracking=uri, name="oom", steps=(1,))
    rc, out = cli([str(sweep)], tmp_path / "run.log", env={"PERL_TEST_FAULT": "oom:ToyCounts:2"})
    assert rc == 1, out
    assert "1 finished, 0 skipped (already FINISHED), 1 failed" in out, out
    tail = out.split("=== oom:")[1]  # the driver's summary
    failed_lines = [line for line in tail.splitlines() if "FAILED b2n/" in line]
    assert len(failed_lines) == 1 and "ToyCounts" in failed_lines[0], tail
    assert "OutOfMemoryError: injected by $PERL_TEST_FAULT after optimizer step 2" in \
        failed_lines[0], tail
    # the trainable's OOM handling ran in the worker (Ray forwards the worker's log)
    assert "out of memory in trial b2n/ToyCounts" in out and "freed its tensors" in out, out

    runs = child_runs(db)
    by_ds = {r["tags"]["dataset"]: r for r in runs}
    assert len(runs) == 2 and set(by_ds) == {"ToyShapes", "ToyCounts"}, runs
    assert by_ds["ToyShapes"]["status"] == "FINISHED", by_ds["ToyShapes"]
    bad = by_ds["ToyCounts"]
    assert bad["status"] == "FAILED", bad
    assert bad["tags"]["status_detail"].startswith("OutOfMemoryError: injected"), bad["tags"]
    assert not any(k.startswith("base/") for k in bad["metrics"]), bad["metrics"]  # no result
    # no storage record for the failed cell: only the good one is complete
    from pipeline.tracking import iter_records

    recs = [r for r, _ in iter_records(str(tmp_path / "runs"), "rel/oom")]
    assert [r.config["dataset"] for r in recs] == ["ToyShapes"], recs

    from pipeline.aggregate import main

    agg = tmp_path / "agg"
    assert main(["--experiment", "rel/oom", "--tracking-uri", uri, "--out", str(agg),
                 "--no-log", "--quiet"]) == 0
    tables = {f.name: f.read_text() for f in agg.glob("*.md")}
    rows = [line for text in tables.values() for line in text.splitlines()
            if line.startswith("| ToyCounts")]
    # every value cell of the ToyCounts rows is FAILED (1), none a number
    assert rows and all(c.strip() == "FAILED (1)" for row in rows for c in row.split("|")[2:-1]), \
        tables
    good = [line for text in tables.values() for line in text.splitlines()
            if line.startswith("| ToyShapes")]
    assert good and all("FAILED" not in row and any(c.isdigit() for c in row.split("|")[2])
                        for row in good), tables
