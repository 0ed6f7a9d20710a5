"""SIGKILL a suite's driver during its shared phase (the first sweep, which trains the cells the
second one links and evaluates), then submit the suite again: nothing is lost, and each distinct
training still ends FINISHED once."""

from __future__ import annotations

import collections
import os
import signal

import pytest

from test_reuse import write_two_sweep_suite  # tests/test_reuse.py

from .conftest import child_runs, cli, finish, wait_for_running, start_cli

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def xworld(tmp_path_factory):
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("xworld")
    generate_world(root, datasets=["ToyShapes", "ToyWorld", "ToyWorldV2"],
                   sizes={"train": 2, "val": 1, "test": 2})
    return root


def test_kill_during_the_shared_phase_loses_nothing(tmp_path, xworld, weights):
    suite = write_two_sweep_suite(tmp_path, xworld, weights)
    db = tmp_path / "mlflow.db"
    log = tmp_path / "run1.log"
    # --ignore-code-version: the working tree may change between the two submissions
    p = start_cli([str(suite), "--ignore-code-version"], log,
                  env={"PERL_TEST_STEP_DELAY_S": "0.3"})
    running = wait_for_running(db, p)
    assert running, f"no trial started before the driver exited:\n{log.read_text()}"
    assert {r["experiment"] for r in running} == {"test/xd"}  # killed in the shared phase
    os.kill(p.pid, signal.SIGKILL)
    assert finish(p, 60) == -signal.SIGKILL
    assert not [r for r in child_runs(db) if r["experiment"] == "test/mixed"]

    rc, out = cli([str(suite), "--ignore-code-version"], tmp_path / "run2.log")
    assert rc == 0, out
    after = [r for r in child_runs(db) if r["status"] == "FINISHED"]
    cells = collections.Counter((r["experiment"], r["tags"]["config_hash"]) for r in after)
    assert len([k for k in cells if k[0] == "test/xd"]) == 2, out
    assert len([k for k in cells if k[0] == "test/mixed"]) == 3, out
    trained = collections.Counter(r["tags"]["training_hash"] for r in after
                                  if "reuse" not in r["tags"])
    assert len(trained) == 3 and set(trained.values()) == {1}, trained  # none trained twice
    kinds = collections.Counter(r["tags"].get("reuse") for r in after
                                if r["experiment"] == "test/mixed")
    assert kinds == {"link": 1, "evaluate": 1, None: 1}, kinds
    assert not [r for r in child_runs(db) if r["status"] == "RUNNING"]
