"""SIGKILL the `python -m pipeline.run` driver while trials run, then re-run the same command."""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest

from .conftest import child_runs, cli, finish, wait_for_running, runs, start_cli, sweep_yaml

pytestmark = pytest.mark.reliability


def test_driver_sigkill_then_rerun_finishes_each_cell_once(tmp_path, world, weights):
    db = tmp_path / "mlflow.db"
    y = sweep_yaml(tmp_path / "rel.yaml", world=world, weights=weights, storage=tmp_path / "runs",
                   tracking=f"sqlite:///{db}", steps=(1, 2, 3))
    log = tmp_path / "run1.log"
    # --ignore-code-version: the shared working tree may be edited between the two submissions,
    # which changes the code fingerprint (a deliberate re-train); this test is about resume only
    # a pause after each optimizer step: the kill lands mid-trial, not between two trials
    slow = {"PERL_TEST_STEP_DELAY_S": "0.3"}
    p = start_cli([str(y), "--ignore-code-version"], log, env=slow)
    # wait until at least one trial run is RUNNING in MLflow, then kill the driver (only it)
    running = wait_for_running(db, p)
    assert running, f"no trial started before the driver exited:\n{log.read_text()}"
    os.kill(p.pid, signal.SIGKILL)
    assert finish(p, 60) == -signal.SIGKILL
    before = child_runs(db)
    assert any(r["status"] == "RUNNING" for r in before)  # left behind by the dead driver

    rc, out = cli([str(y), "--ignore-code-version"], tmp_path / "run2.log")
    assert rc == 0, out
    after = child_runs(db)
    finished = collections.Counter(r["tags"]["config_hash"] for r in after
                                   if r["status"] == "FINISHED")
    assert len(finished) == 6, (finished, out)          # 2 datasets x 3 num_steps
    assert set(finished.values()) == {1}, finished     # no cell trained to completion twice
    assert not [r for r in after if r["status"] == "RUNNING"], after
    orphans = {r["id"] for r in before if r["status"] == "RUNNING"}
    statuses = {r["id"]: r["status"] for r in after}
    final = {r["id"]: r for r in after}
    for rid in orphans:  # the runs the dead driver left RUNNING
        # KILLED by the re-submission, or FINISHED by a Ray worker of the dead driver that outlived
        # it for a few seconds (seen in CI): then it must be a whole result, not a shell
        assert statuses[rid] in ("KILLED", "FINISHED"), (rid, statuses[rid])
        if statuses[rid] == "FINISHED":
            assert "record_id" in final[rid]["tags"] and final[rid]["metrics"], final[rid]
        else:
            assert "gone" in final[rid]["tags"].get("status_detail", ""), final[rid]
    # the parent run of the killed submission is KILLED too
    parents = [r for r in runs(db) if r["tags"].get("phase") == "sweep"]
    assert sorted(r["status"] for r in parents) == ["FINISHED", "KILLED"], parents


def test_resume_after_checkpoints_lost_starts_afresh(tmp_path, world, weights):
    """The Tune state of a killed submission refers to trial checkpoints that are not in storage
    (seen after an S3 outage cut their upload off): the re-run must not resume from them (Tune
    would fail those trials, "does not exist on storage anymore") but start the phase afresh."""
    import shutil

    db = tmp_path / "mlflow.db"
    y = sweep_yaml(tmp_path / "rel.yaml", world=world, weights=weights, storage=tmp_path / "runs",
                   tracking=f"sqlite:///{db}", steps=(1, 2))
    log = tmp_path / "run1.log"
    p = start_cli([str(y), "--ignore-code-version"], log,
                  env={"PERL_CHECKPOINT_EVERY": "2", "PERL_TEST_STEP_DELAY_S": "0.3"})
    deadline, ckpts = time.time() + 240, []
    while time.time() < deadline and p.poll() is None:
        ckpts = list((tmp_path / "runs" / "tune").glob("*/trial_*/checkpoint_*"))
        if ckpts:
            break
        time.sleep(0.1)
    assert ckpts, f"no checkpoint before the driver exited:\n{log.read_text()}"
    time.sleep(1.0)  # Tune snapshots its state after the checkpoint
    os.kill(p.pid, signal.SIGKILL)
    finish(p, 60)
    for c in (tmp_path / "runs" / "tune").glob("*/trial_*/checkpoint_*"):
        shutil.rmtree(c)

    rc, out = cli([str(y), "--ignore-code-version"], tmp_path / "run2.log")
    assert rc == 0, out
    assert "does not exist on storage" not in out, out
    if "resuming the interrupted Tune experiment" in out:  # Tune had saved its state
        assert "not resuming" in out and "starting afresh" in out, out
    finished = collections.Counter(r["tags"]["config_hash"] for r in child_runs(db)
                                   if r["status"] == "FINISHED")
    assert len(finished) == 4 and set(finished.values()) == {1}, (finished, out)
