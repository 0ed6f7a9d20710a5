"""One submission's lifetime in MLflow, as a context manager:

    sub = Submission.start(tracker, exp_id, spec, uri, grid, code, sweep_file, replay)
    with sub:             # the heartbeat runs; on leaving, the parent run is closed
        sub.recover()     # orphans of gone drivers KILLED, stored records replayed
        ...               # the phases; their results go to `sub.outcome`
        sub.replay_records()

Leaving the block closes the parent run with the `num_finished` / `num_failed` / `num_skipped`
tags and a status: FINISHED when no cell failed and the storage held (`Outcome.ok`), FAILED
otherwise or on an exception, KILLED on Ctrl-C. When MLflow went away before any trial
(`lost`, exit 3), the parent run is left RUNNING: closing it would wait out the retries again,
and the next submission marks it KILLED.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from pipeline import layout, reuse, tracking
from pipeline.collect import Outcome
from pipeline.env import versions


def say(msg: str) -> None:
    print(msg, flush=True)


class Heartbeat:
    """Refreshes the parent run's heartbeat so later submissions can tell it is alive."""

    def __init__(self, tracker: tracking.Tracker, run_id: str):
        self.tracker, self.run_id, self._stop = tracker, run_id, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="mlflow-heartbeat")

    def _loop(self) -> None:
        while not self._stop.wait(tracking.HEARTBEAT_S):
            try:
                self.tracker.heartbeat(self.run_id)
            except Exception:  # a transient MLflow error must not kill the driver
                pass

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()


def lost_errors() -> tuple[type[BaseException], ...]:
    """What MLflow raises when it went away (`Submission.lost` turns them into exit 3)."""
    return (tracking.TrackingUnavailable, *tracking.tracking_errors())


class Submission:
    """See the module docstring. `outcome` is what happened to the cells (the summary's)."""

    def __init__(self, tracker: tracking.Tracker, exp_id: str, parent: str, spec: Any, uri: str,
                 user: str):
        self.tracker, self.exp_id, self.parent, self.spec, self.uri = \
            tracker, exp_id, parent, spec, uri
        self.user = user  # the parent's and every child's mlflow.user
        self.outcome = Outcome()
        self.status: str | None = None  # None: from the outcome when the block ends
        self._lost = False
        self._beat = Heartbeat(tracker, parent)

    @classmethod
    def start(cls, tracker: tracking.Tracker, exp_id: str, spec: Any, uri: str, num_cells: int,
              code: Any, sweep_file: str, replay: bool) -> "Submission":
        """Create the parent run (raises when MLflow stopped answering: nothing ran yet)."""
        run_name = f"{spec.name} {time.strftime('%Y-%m-%d %H:%M')}" + (" (replay)" if replay
                                                                       else "")
        user = tracking.submitter()
        parent = tracker.start_parent(exp_id, spec.name, run_name, {
            "sweep_file": os.path.abspath(sweep_file), "code_sha": code.sha,
            "code_dirty": code.dirty, "code_version": code.version,
            "num_cells": str(num_cells), **versions(), **tracking.source_tags(code.sha, user),
            tracking.NOTE_TAG: tracking.sweep_note(spec.description, spec.name, spec.source,
                                                   num_cells)})
        tracker.log_text(parent, spec.resolved_yaml, layout.RESOLVED_SWEEP)
        return cls(tracker, exp_id, parent, spec, uri, user)

    def __enter__(self) -> "Submission":
        self._beat.start()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        self._beat.stop()
        if exc_type is not None:
            self.status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        status = self.status or ("FINISHED" if self.outcome.ok else "FAILED")
        if not self._lost:  # (when MLflow is gone, each call would wait out its retries again)
            try:
                self.tracker.set_tags(self.parent, self.outcome.count_tags())
                self.tracker.end(self.parent, status)
            except Exception as e:  # the summary still tells the user what happened
                say(f"warning: could not close the parent run {self.parent}: {e}")
        return False

    # --- start-up ----------------------------------------------------------------------------

    def recover(self) -> None:
        """Mark orphaned RUNNING runs of gone submissions KILLED and replay the stored trial
        records MLflow lacks (raises `lost_errors()` when MLflow goes away)."""
        spec = self.spec
        killed = len(self.tracker.kill_orphans(self.exp_id, spec.name, own_parent=self.parent))
        incomplete: list[str] = []
        replayed = len(tracking.replay(self.tracker, spec.storage, spec.experiment,
                                       parent_run_id=self.parent, experiment_id=self.exp_id,
                                       skipped=incomplete))
        for why in incomplete:  # never logged as a result
            say(f"warning: incomplete trial record skipped: {why}")
        self.outcome.killed, self.outcome.replayed = killed, replayed
        if killed or replayed:
            say(f"recovered: {killed} orphaned RUNNING run(s) marked KILLED, "
                f"{replayed} stored trial record(s) replayed into MLflow")

    def replay_done(self) -> int:
        """`--replay`: nothing else runs."""
        self.status = "FINISHED"
        say(f"replay done: {self.outcome.replayed} record(s) from "
            f"{layout.records_dir(self.spec.storage, self.spec.experiment)}")
        return 0

    def finished(self, grid: list[Any], code_version: str | None) -> dict[str, Any]:
        """config hash -> the FINISHED grid-phase run of each cell already done."""
        return self.tracker.finished_cells(self.exp_id, [c.config for c in grid], code_version,
                                           say)

    def todo(self, grid: list[Any], finished: dict[str, Any]) -> list[Any]:
        """The cells to run (the others count as done before this submission)."""
        todo = [c for c in grid if c.config_hash not in finished]
        self.outcome.done_before = [c for c in grid if c.config_hash in finished]
        say(f"sweep {self.spec.name}: {len(grid)} cells, {len(self.outcome.done_before)} "
            f"already FINISHED, {len(todo)} to run; experiment {self.spec.experiment!r} at "
            f"{layout.redact_uri(self.uri)}")
        return todo

    def reuse_plans(self, todo: list[Any], code_version: str | None,
                    current_version: str) -> dict[str, Any]:
        """cell name -> `pipeline.reuse.Plan` of the cells to run: linked from, or evaluated
        with the weights of, a FINISHED run elsewhere in the store, else trained."""
        index = reuse.ReuseIndex.from_store(self.tracker, code_version, current_version)
        plans = reuse.plan_cells(index, todo, tracking.grid_data_digests(
            [c.config for c in todo]))
        n = reuse.count(plans)
        self.outcome.evaluated = [c.name for c in todo if plans[c.name].kind == reuse.EVALUATE]
        if n[reuse.LINK] or n[reuse.EVALUATE]:
            say(f"reuse: {n[reuse.LINK]} cell(s) linked from runs of other experiments, "
                f"{n[reuse.EVALUATE]} evaluated with the weights of a finished training, "
                f"{n[reuse.TRAIN]} to train")
        return plans

    def lost(self, e: BaseException, replay: bool) -> int:
        """MLflow went away before any trial ran: say so and leave the parent run (exit 3)."""
        spec, self._lost = self.spec, True
        why = str(e) if isinstance(e, tracking.TrackingUnavailable) else (  # (says how far)
            f"MLflow tracking at {layout.redact_uri(self.uri)} stopped answering "
            f"({type(e).__name__}: {tracking.short_error(e)})")
        say(f"{spec.source}: {why}")
        say(f"MLFLOW UNREACHABLE: stopped before running any cell; nothing is lost (trial "
            f"records stay in {layout.records_dir(spec.storage, spec.experiment)}). Once "
            f"the server is back, run `python -m pipeline.run {spec.source}"
            f"{' --replay' if replay else ''}` again; it marks this submission's "
            f"parent run (left RUNNING) KILLED.")
        return 3

    # --- after a phase -----------------------------------------------------------------------

    def kill_unfinished_children(self) -> None:
        """This submission's trial runs left RUNNING (a trial process that died) -> KILLED."""
        try:
            self.tracker.kill_orphans(self.exp_id, self.spec.name, own_parent=self.parent,
                                      only_children_of=self.parent)
        except Exception as e:  # MLflow down: the next submission marks them
            say(f"warning: could not mark this submission's unfinished runs KILLED: "
                f"{tracking.short_error(e)}")

    def replay_records(self) -> None:
        """Log the records of trials that could not reach MLflow (not when Tune just lost the
        storage: reading it would wait out the retries again; the next run replays)."""
        spec, out = self.spec, self.outcome
        if out.storage_error:
            return
        try:
            out.replayed_at_end(len(tracking.replay(
                self.tracker, spec.storage, spec.experiment, parent_run_id=self.parent,
                experiment_id=self.exp_id)))
        except lost_errors() as e:
            out.tracking_error = f"{type(e).__name__}: {tracking.short_error(e)}"
        except Exception as e:  # the records could not be read: the storage, not MLflow
            out.storage_error = (f"cannot read the trial records in "
                                 f"{layout.records_dir(spec.storage, spec.experiment)} "
                                 f"({type(e).__name__}: {tracking.short_error(e)})")


__all__ = ["Submission", "Heartbeat", "lost_errors"]
