"""SIGKILL the `python -m pipeline.run` driver three times at different moments, re-submitting the
same command each time, then let a plain run finish.

1. while the first trials run (the fresh submission);
2. while a later trial runs under the resubmission (at least one trial of this submission is
   FINISHED; Tune restored the killed experiment if it had saved its state before the kill);
3. during the start-up of the next submission (its parent run exists: marking orphans KILLED,
   replaying records, starting Ray), before it runs anything;
4. a plain run: exit 0.

Checked: each of the 6 cells has exactly one FINISHED run, which is a whole result (record_id,
metrics, its record in storage); no run is left RUNNING; the parent runs of the three killed
submissions are KILLED and the last one FINISHED; every trial run a killed driver left RUNNING is
KILLED (naming the dead driver) or FINISHED by a Ray worker that outlived its driver for a few
seconds (then a whole result, and still the only FINISHED run of its cell).
"""

from __future__ import annotations

import collections
import os
import signal
import time

import pytest

from .conftest import child_runs, cli, finish, runs, start_cli, sweep_yaml

pytestmark = [pytest.mark.reliability, pytest.mark.timeout(600)]

# a pause after each optimizer step (10 steps a trial: 2 epochs of 20 images, batch 4), so the
# kills land mid-trial
SLOW = {"PERL_TEST_STEP_DELAY_S": "0.5"}


def _poll(db, p, what, timeout: float = 240):
    """Wait until `what(child_runs, all runs)` is truthy while the driver lives; its value."""
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None:
        if db.exists():
            try:
                got = what(child_runs(db), runs(db))
            except Exception:  # the store is still being created
                got = None
            if got:
                return got
        time.sleep(0.2)
    return None


def _parent(all_runs, p) -> dict | None:
    mine = [r for r in all_runs if r["tags"].get("phase") == "sweep"
            and r["tags"].get("driver_pid") == str(p.pid)]
    return mine[0] if mine else None


def _kill(p, log) -> None:
    os.kill(p.pid, signal.SIGKILL)
    assert finish(p, 60) == -signal.SIGKILL, log.read_text()


def test_three_driver_kills_then_a_plain_run_finishes_each_cell_once(tmp_path, world, weights):
    from pipeline.tracking import iter_records

    db = tmp_path / "mlflow.db"
    storage = tmp_path / "runs"
    y = sweep_yaml(tmp_path / "rk.yaml", world=world, weights=weights, storage=storage,
                   tracking=f"sqlite:///{db}", name="rk", steps=(1, 2, 3), fixed="  epochs: 2\n")
    # --ignore-code-version: the shared working tree may be edited between submissions (a
    # deliberate re-train otherwise); this test is about resume only
    args = [str(y), "--ignore-code-version"]
    t0 = time.monotonic()
    orphans: dict[str, set[str]] = {}  # submission -> trial runs RUNNING at its kill
    parents: dict[str, str] = {}

    # 1. the fresh submission, killed while its first trials run
    log1 = tmp_path / "run1.log"
    p = start_cli(args, log1, env=SLOW)
    running = _poll(db, p, lambda ch, _: [r for r in ch if r["status"] == "RUNNING"])
    assert running, f"no trial started before the driver exited:\n{log1.read_text()}"
    parents["1"] = _parent(runs(db), p)["id"]
    _kill(p, log1)
    orphans["1"] = {r["id"] for r in child_runs(db) if r["status"] == "RUNNING"}
    assert orphans["1"]
    t1 = time.monotonic()

    # 2. the resumed submission, killed while a later trial runs (one of its own is FINISHED)
    log2 = tmp_path / "run2.log"
    p = start_cli(args, log2, env=SLOW)

    def later_trial(ch, all_runs):
        par = _parent(all_runs, p)
        if par is None:
            return None
        own = [r for r in ch if r["tags"].get("mlflow.parentRunId") == par["id"]]
        if any(r["status"] == "FINISHED" for r in own) and \
                any(r["status"] == "RUNNING" for r in own):
            return par
        return None

    par = _poll(db, p, later_trial)
    assert par, f"no later trial ran under the second submission:\n{log2.read_text()}"
    parents["2"] = par["id"]
    _kill(p, log2)
    orphans["2"] = {r["id"] for r in child_runs(db) if r["status"] == "RUNNING"
                    and r["tags"].get("mlflow.parentRunId") == par["id"]}
    # Tune restores the killed experiment when it had saved its state before the kill (not
    # asserted: a kill before Tune's first snapshot leaves nothing to restore, a fresh start)
    resumed = "resuming the interrupted Tune experiment" in log2.read_text(errors="replace")
    finished_2 = collections.Counter(r["tags"]["config_hash"] for r in child_runs(db)
                                     if r["status"] == "FINISHED")
    assert len(finished_2) < 6, "the sweep finished before the second kill"
    t2 = time.monotonic()

    # 3. the next submission, killed during its start-up (its parent run exists, no trial yet)
    log3 = tmp_path / "run3.log"
    p = start_cli(args, log3, env=SLOW)
    par = _poll(db, p, lambda ch, all_runs: _parent(all_runs, p))
    assert par, f"the third submission created no parent run:\n{log3.read_text()}"
    parents["3"] = par["id"]
    _kill(p, log3)
    orphans["3"] = {r["id"] for r in child_runs(db) if r["status"] == "RUNNING"
                    and r["tags"].get("mlflow.parentRunId") == par["id"]}
    t3 = time.monotonic()

    # 4. a plain run finishes the sweep
    rc, out = cli(args, tmp_path / "run4.log")
    assert rc == 0, out
    after = child_runs(db)
    fin = [r for r in after if r["status"] == "FINISHED"]
    per_hash = collections.Counter(r["tags"]["config_hash"] for r in fin)
    assert len(per_hash) == 6, (per_hash, out)        # 2 datasets x 3 num_steps
    assert set(per_hash.values()) == {1}, per_hash    # no cell trained to completion twice
    assert not [r for r in after if r["status"] == "RUNNING"], after
    records = {rec.record_id: rec for rec, _ in iter_records(str(storage), "rel/rk")}
    for r in fin:  # every FINISHED run is a whole result, with its record in storage
        assert r["metrics"] and r["tags"].get("record_id") in records, r
        assert records[r["tags"]["record_id"]].config_hash == r["tags"]["config_hash"]
    status = {r["id"]: r for r in after}
    for sub, ids in orphans.items():
        for rid in ids:
            r = status[rid]
            assert r["status"] in ("KILLED", "FINISHED"), (sub, r)
            if r["status"] == "KILLED":
                assert "gone" in r["tags"].get("status_detail", ""), (sub, r)
    all_runs = {r["id"]: r for r in runs(db)}
    for sub, rid in parents.items():  # the parent run of every killed submission is KILLED
        assert all_runs[rid]["status"] == "KILLED", (sub, all_runs[rid])
    tops = collections.Counter(r["status"] for r in all_runs.values()
                               if r["tags"].get("phase") == "sweep")
    assert tops == {"KILLED": 3, "FINISHED": 1}, tops
    killed_trials = sum(r["status"] == "KILLED" for r in after)
    print(f"\n3 driver kills: {len(orphans['1'])} trial run(s) RUNNING at the first, "
          f"{len(orphans['2'])} at the second ({sum(finished_2.values())} cell(s) FINISHED "
          f"by then; Tune state {'restored' if resumed else 'not restored'}), "
          f"{len(orphans['3'])} at the third (start-up); the last run finished "
          f"{len(per_hash)} cells once each, {killed_trials} trial run(s) KILLED "
          f"({t1 - t0:.0f} + {t2 - t1:.0f} + {t3 - t2:.0f} + {time.monotonic() - t3:.0f} s)")
