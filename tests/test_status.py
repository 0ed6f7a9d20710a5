"""`python -m pipeline.status`: counts, failure reasons, the ETA line, running vs stale cells, the
Tune and Ray views, and the progress lines of `pipeline.run` itself.

- Fast tests build MLflow runs directly with the MlflowClient (parent runs with the driver tags
  `pipeline.run` writes: host, pid, heartbeat) and, for the Tune-ended case, a saved Tune state
  file of the shape Tune writes (`trial_data`: [trial JSON, metadata JSON] pairs).
- One real sweep (`python -m pipeline.run` as a subprocess, its own local Ray, MLflow on SQLite):
  status is asked while it runs (done + running + failed with the injected OOM's reason, an ETA,
  the real Tune state read back), then the driver is SIGKILLed with its Ray processes, leaving
  RUNNING runs that status must call stale. The driver's stdout must show the `[i/n] done`,
  `[i/n] FAILED` and `status:` progress lines and a running trial's `progress:` line (step/total,
  loss; no TTY), and status the same trial's step and loss from Tune's saved state.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import kill_group, start_cli  # tests/servers.py
from test_pipeline_run import sweep_yaml

REPO = Path(__file__).resolve().parents[1]
COUNTS = re.compile(r"(\d+) cells: (\d+) done, (\d+) running, (\d+) failed, (\d+) left")
DONE_LINE = r"^\[\d/6\] done   b2n/ToyShapes/\S+: hm \d"  # pipeline.run's progress lines
FAILED_LINE = r"^\[\d/6\] FAILED b2n/ToyCounts/"
# a running trial's progress: pipeline.run's non-TTY line and pipeline.status's line
PROGRESS = r"b2n/ToyShapes/\S+: step \d+/\d+, epoch 1/1, loss \d[\d.e+-]*, elapsed \d\d:\d\d:\d\d$"
PROGRESS_LINE, STATUS_PROGRESS = rf"^progress: {PROGRESS}", rf"^  {PROGRESS}"


def sweep_file(path: Path, *, storage: Path, tracking: str, world: Path | str = "data",
               weights: Path | str = "embedded", steps=(1, 2)) -> Path:
    """test_pipeline_run's tiny sweep (ToyShapes, ToyCounts x steps) named `st`."""
    return sweep_yaml(path, world=world, weights=weights, storage=storage, tracking=tracking,
                      name="st", steps=steps)


def counts(out: str) -> dict[str, int]:
    m = COUNTS.search(out)
    assert m, out
    return dict(zip(("cells", "done", "running", "failed", "left"), map(int, m.groups())))


def status(argv: list[str], capsys) -> str:
    from pipeline.status import main

    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr().out


@pytest.fixture
def no_ray(monkeypatch, tmp_path):
    """No cluster to ask: $RAY_ADDRESS unset and a Ray temp dir without a `ray start` head."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray-tmp"))


@pytest.fixture
def sweep(tmp_path):
    """A 4-cell sweep file, its cells, a Tracker on a fresh SQLite store and the experiment id."""
    from pipeline.spec import cells, load_spec
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_file(tmp_path / "st.yaml", storage=tmp_path / "runs", tracking=uri)
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id("test/st")
    return {"yaml": y, "cells": cells(load_spec(y)), "tracker": tracker, "exp": exp_id,
            "tmp": tmp_path}


def parent_run(sweep, *, pid: int, heartbeat: float | None = None) -> str:
    tags = {"sweep": "st", "phase": "sweep", "driver_host": socket.gethostname(),
            "driver_pid": str(pid), "heartbeat": str(int(heartbeat or time.time()))}
    return sweep["tracker"].client.create_run(sweep["exp"], run_name="st submission",
                                              tags=tags).info.run_id


def child_run(sweep, cell, parent: str, status: str = "RUNNING", *, seconds: float = 0,
              detail: str = "", start_ms: int | None = None) -> str:
    t = sweep["tracker"]
    start = start_ms or int(time.time() * 1000) - int(seconds * 1000)
    rid = t.start_trial(sweep["exp"], parent, cell.name, cell.config,
                        {"sweep": "st", "phase": "final", "cell": cell.name,
                         "config_hash": cell.config_hash, "code_version": "test"},
                        start_ms=start)
    if status != "RUNNING":
        t.end(rid, status, detail or None, end_ms=start + int(seconds * 1000))
    return rid


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


# --- fast: MLflow runs made with the client -------------------------------------------------------


def test_counts_failure_reason_eta_and_running(sweep, capsys, no_ray):
    c = sweep["cells"]
    parent = parent_run(sweep, pid=os.getpid())  # this process: a live driver
    child_run(sweep, c[0], parent, "FINISHED", seconds=10)
    child_run(sweep, c[1], parent, "FAILED", detail=(
        "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
        "Traceback (most recent call last):\n  File ..."))
    child_run(sweep, c[2], parent, "RUNNING")
    out = status([str(sweep["yaml"]), "--ignore-code-version", "--cells"], capsys)
    assert counts(out) == {"cells": 4, "done": 1, "running": 1, "failed": 1, "left": 1}, out
    assert "stale" not in out, out
    # the reason, not just the cell: first line of status_detail
    assert f"  {c[1].name}: OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB" \
        in out, out
    assert "Traceback" not in out
    # 3 cells not done x 10 s / 1 running
    assert "mean trial time 00:00:10; ETA 00:00:30 (1 running in parallel)" in out, out
    assert f"parent run {parent}): RUNNING, driver alive: driver pid {os.getpid()}" in out, out
    assert "Tune view unavailable: no Tune state under" in out, out
    assert "Ray: not asked: $RAY_ADDRESS is unset" in out, out


def test_running_runs_of_a_dead_driver_are_stale(sweep, capsys, no_ray):
    c = sweep["cells"]
    gone = parent_run(sweep, pid=dead_pid())  # same host, pid no longer running
    child_run(sweep, c[0], gone, "FINISHED", seconds=4)
    child_run(sweep, c[1], gone, "RUNNING")
    quiet = parent_run(sweep, pid=os.getpid(), heartbeat=time.time() - 3600)  # heartbeat stopped
    child_run(sweep, c[2], quiet, "RUNNING")
    out = status([str(sweep["yaml"]), "--ignore-code-version"], capsys)
    n = counts(out)
    assert (n["done"], n["running"], n["left"]) == (1, 0, 1), out
    assert "2 stale (driver gone?)" in out, out
    assert f"  {c[1].name}: driver pid" in out and "that process is not running" in out, out
    assert f"  {c[2].name}: driver pid" in out, out
    assert re.search(r"no heartbeat for 36\d\d s \(a live driver beats every 30 s\)", out), out
    assert "marks them KILLED" in out, out
    # the latest submission (the quiet one) is reported gone
    assert f"parent run {quiet}): RUNNING, driver GONE" in out, out
    # stale cells count as not done in the ETA, and nothing runs in parallel
    assert "mean trial time 00:00:04; ETA 00:00:12\n" in out, out


def tune_state(sweep, statuses: dict[int, str], meta: dict[int, dict] | None = None) -> Path:
    """A saved Tune state for the grid phase, in the layout Tune writes it (see module doc);
    `meta`: a trial's run metadata (Tune's `_TrainingRunMetadata` JSON: last_result, ...)."""
    d = sweep["tmp"] / "runs" / "tune" / "test__st-final-0123456789"
    d.mkdir(parents=True)
    trials = [[json.dumps({"trial_id": f"t{i}", "status": st, "config": {"cell": {
        "name": sweep["cells"][i].name, "config": sweep["cells"][i].config.to_dict()}}}),
        json.dumps((meta or {}).get(i, {}))] for i, st in statuses.items()]
    f = d / "experiment_state-2030-01-01_00-00-00.json"
    f.write_text(json.dumps({"trial_data": trials, "runner_data": {}, "stats": {}}))
    return f


def test_tune_ended_trial_makes_a_running_run_stale_and_pending_is_queued(sweep, capsys, no_ray):
    c = sweep["cells"]
    parent = parent_run(sweep, pid=os.getpid())
    child_run(sweep, c[0], parent, "RUNNING", start_ms=int(time.time() * 1000) - 60_000)
    child_run(sweep, c[1], parent, "RUNNING")  # started after the state was saved (below)
    state = tune_state(sweep, {0: "ERROR", 1: "TERMINATED", 2: "PENDING", 3: "RUNNING"})
    os.utime(state, (time.time() - 30, time.time() - 30))  # saved 30 s ago
    out = status([str(sweep["yaml"]), "--ignore-code-version", "--cells"], capsys)
    n = counts(out)
    assert (n["running"], n["left"]) == (1, 2), out
    assert "(1 queued in Tune)" in out and "1 stale (driver gone?)" in out, out
    assert "starting (RUNNING in Tune, no MLflow run yet)" in out, out
    assert f"  {c[0].name}: Tune has the trial ERROR" in out, out
    assert "Tune: test__st-final-0123456789 (saved 30 s ago): 1 ERROR, 1 PENDING, 1 RUNNING, " \
           "1 TERMINATED" in out, out

    # the same saved queue under a dead driver is no queue
    sweep["tracker"].end(parent, "KILLED")
    out = status([str(sweep["yaml"]), "--ignore-code-version"], capsys)
    assert "queued" not in out and "2 stale (driver gone?)" in out, out


def progress_meta(reported: float, step: float, loss: float) -> dict:
    """Run metadata as Tune saves it after a progress report then a checkpoint-only report."""
    values = {"step": step, "total_steps": 12.0, "epoch": 1.0, "epochs": 1.0,
              "train_step/loss": loss, "checkpoint_step": step}
    return {"last_result": {"checkpoint_step": step}, "last_result_time": reported,
            "metric_analysis": {k: {"max": v, "min": v, "avg": v, "last": v}
                                for k, v in values.items()}}


def test_running_trials_show_their_progress_from_tune_state(sweep, capsys, no_ray):
    c = sweep["cells"]
    parent = parent_run(sweep, pid=os.getpid())
    now_ms = int(time.time() * 1000)
    child_run(sweep, c[0], parent, "RUNNING", start_ms=now_ms - 65_000)
    child_run(sweep, c[1], parent, "RUNNING")  # has not reported yet
    child_run(sweep, c[2], parent, "RUNNING", start_ms=now_ms - 5_000)  # report: earlier attempt
    tune_state(sweep, {0: "RUNNING", 1: "RUNNING", 2: "RUNNING"},
               meta={0: progress_meta(time.time() - 2, 5.0, 0.693147),
                     2: progress_meta(time.time() - 60, 9.0, 0.5)})
    out = status([str(sweep["yaml"]), "--ignore-code-version"], capsys)
    assert counts(out)["running"] == 3, out
    assert re.search(r"^running \(step/total and loss from Tune's state saved \d+ s ago\):$", out,
                     re.M), out
    assert re.search(rf"^  {re.escape(c[0].name)}: step 5/12, epoch 1/1, loss 0.6931, "
                     rf"elapsed 00:01:(0[5-9]|[1-5]\d)$", out, re.M), out
    for i in (1, 2):
        assert re.search(rf"^  {re.escape(c[i].name)}: no progress report yet, elapsed "
                         rf"00:00:\d\d$", out, re.M), out
    assert c[3].name not in out, out  # left: no progress line


def test_unreachable_ray_cluster_is_one_line(sweep, capsys, no_ray, monkeypatch):
    from servers import free_port  # tests/servers.py

    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")  # nothing listens
    t0 = time.time()
    out = status([str(sweep["yaml"]), "--ignore-code-version"], capsys)
    assert time.time() - t0 < 60
    line = [ln for ln in out.splitlines() if ln.startswith("Ray: ")]
    assert len(line) == 1 and "Ray: unavailable: the cluster at http://127.0.0.1:" in line[0], out
    assert counts(out)["left"] == 4, out


# --- slow: a real sweep, status while it runs, then its driver SIGKILLed --------------------------


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_real_sweep_status_while_running_then_stale_after_driver_kill(
        tmp_path, world, weights, capsys, no_ray):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_file(tmp_path / "st.yaml", storage=tmp_path / "runs", tracking=uri, world=world,
                   weights=weights, steps=(1, 2, 3))
    log = tmp_path / "run.log"
    # every ToyCounts trial runs out of memory after its first step (the test hook of
    # tests/reliability/test_oom.py); a pause after each step keeps ToyShapes trials running
    # RAY_TMPDIR removed: a fresh local Ray in Ray's default temp dir (`no_ray`'s is too long
    # for Ray's socket paths)
    # (progress lines every 2 s instead of 30 s: the test sees one before the first trial ends)
    p = start_cli([str(y), "--ignore-code-version"], log,
                  {"PERL_TEST_FAULT": "oom:ToyCounts:1", "PERL_TEST_STEP_DELAY_S": "3.0",
                   "PERL_PROGRESS_EVERY_S": "2", "RAY_TMPDIR": None})
    t0 = time.time()
    argv = [str(y), "--ignore-code-version", "--cells"]
    try:
        deadline, seen, out = time.time() + 300, [], ""
        while time.time() < deadline and p.poll() is None:
            if (tmp_path / "mlflow.db").exists():
                try:
                    out = status(argv, capsys)
                except Exception:  # the store is still being created
                    out = ""
                if COUNTS.search(out):
                    seen.append(out)
                    n = counts(out)
                    # (and the driver has printed both kinds of end line: Tune learns of a
                    # trial's end after MLflow does, and a running trial's progress line; status
                    # has a running trial's step and loss from Tune's saved state)
                    if n["done"] >= 1 and n["failed"] >= 1 and n["running"] >= 1 and \
                            re.search(STATUS_PROGRESS, out, re.M) and \
                            all(re.search(rx, log.read_text(errors="replace"), re.M)
                                for rx in (DONE_LINE, FAILED_LINE, PROGRESS_LINE)):
                        break
            time.sleep(0.5)
        else:
            pytest.fail(f"never done + failed + running at once:\n{out}\n{log.read_text()}")
        # the driver and its Ray processes die at once: their RUNNING runs stay RUNNING
        os.kill(p.pid, signal.SIGKILL)
        kill_group(p)
        p.wait(60)
    finally:
        kill_group(p)
    wall = time.time() - t0
    live = seen[-1]
    assert re.search(r"^running \(step/total and loss from Tune's state saved \d+ s ago\):$",
                     live, re.M), live
    assert "stale" not in live, live
    assert "driver alive: driver pid" in live, live
    # the failure reason, not just the cell name
    assert re.search(r"  b2n/ToyCounts/\S+: OutOfMemoryError: injected by \$PERL_TEST_FAULT "
                     r"after optimizer step 1", live), live
    assert re.search(r"mean trial time \d\d:\d\d:\d\d; ETA \d\d:\d\d:\d\d \(\d running in "
                     r"parallel\)", live), live
    assert any(re.search(r"Tune: test__st-final-\w+ \(saved \d+ s ago\): ", s) for s in seen), \
        "\n".join(seen)

    after = status(argv, capsys)
    n = counts(after)
    assert n["running"] == 0 and n["done"] >= 1 and n["failed"] >= 1, after
    assert re.search(r", [1-6] stale \(driver gone\?\)", after), after
    assert "that process is not running" in after and "marks them KILLED" in after, after
    assert "driver GONE" in after, after
    # the real saved Tune state was read (trial statuses of this sweep's grid phase)
    assert re.search(r"Tune: test__st-final-\w+ \(saved \d+ s ago\): .*\d (TERMINATED|ERROR"
                     r"|RUNNING|PENDING)", after), after
    # the progress lines of the run command itself
    text = log.read_text(errors="replace")
    assert re.search(DONE_LINE, text, re.M) and re.search(FAILED_LINE, text, re.M), text
    assert re.search(r"^status: \d+ (pending|running)", text, re.M), text
    # no flood: at most one progress line per running trial (<= 6) every 2 s
    lines = re.findall(r"^progress: .*$", text, re.M)
    assert 0 < len(lines) <= 6 * (wall / 2 + 1), (wall, text)
