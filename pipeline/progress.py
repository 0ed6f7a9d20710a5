"""The driver's console progress while a phase runs (a Ray Tune callback).

One line per finished/failed trial (`[i/n] done   <cell>: <metrics> (<s> s)`, `[i/n] FAILED
<cell>`), a `status: ...` line at the start and then at most every 30 s, and each running trial's
progress from the trainable's reports (`trainable.PROGRESS_KEYS`): on a terminal a transient
rich.live table refreshed about once a second; otherwise (job logs, CI) one `progress: <cell>:
...` line per running trial at most every $PERL_PROGRESS_EVERY_S seconds (30), at most
`MAX_LINES` of them, so logs stay readable.

Imports Ray: import it only where a phase runs.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from typing import Any, Callable

from ray import tune

from pipeline import layout
from pipeline.status import progress_from_metrics, progress_line, progress_table
from pipeline.trainable import PROGRESS_KEYS

PROGRESS_EVERY_ENV = "PERL_PROGRESS_EVERY_S"
DEFAULT_EVERY_S = 30.0
STATUS_EVERY_S = 30.0


def say(msg: str) -> None:
    print(msg, flush=True)


def progress_every_s(env: dict[str, str] | None = None,
                     warn: Callable[[str], None] = say) -> float:
    """$PERL_PROGRESS_EVERY_S as seconds (> 0); unset: 30. A value that is not a positive number
    gets a warning and the default (a typo must not stop the sweep's progress lines)."""
    raw = (os.environ if env is None else env).get(PROGRESS_EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        every = float(raw)
    except ValueError:
        every = float("nan")
    if not every > 0 or every == float("inf"):
        warn(f"warning: ${PROGRESS_EVERY_ENV}={raw!r} is not a positive number of seconds; "
             f"using {DEFAULT_EVERY_S:g}")
        return DEFAULT_EVERY_S
    return every


def trial_name(trial: Any) -> str:
    """A grid trial's cell name, else `hpo_<trial id>` (a search sample before its report)."""
    cell = trial.config.get("cell")
    return cell["name"] if isinstance(cell, dict) else f"{layout.SEARCH_PHASE}_{trial.trial_id}"


def _finished_what(m: dict[str, Any]) -> str:
    if m.get("skipped"):
        return "skipped (already FINISHED)"
    return ", ".join(f"{k} {m[k]:.2f}" for k in ("hm", "target_avg", "val/acc", "all/acc")
                     if isinstance(m.get(k), (int, float)))


class ProgressPrinter(tune.Callback):
    """See the module docstring."""

    MAX_LINES = 20

    def __init__(self) -> None:
        self.t0, self.last, self.done, self.failed = time.time(), 0.0, 0, 0
        self.every = progress_every_s()  # parsed once, here in the driver
        self.tty, self.live, self.shown = sys.stdout.isatty(), None, 0.0
        self.started: dict[str, float] = {}  # trial id -> when it (last) started running
        self.reports: dict[str, tuple[dict, float]] = {}  # trial id -> (report, received)

    def on_trial_start(self, iteration, trials, trial, **info):
        self.started[trial.trial_id] = time.time()
        self.reports.pop(trial.trial_id, None)  # (a retried trial starts over)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if PROGRESS_KEYS["step"] in result:  # (checkpoint reports carry no step)
            self.reports[trial.trial_id] = (dict(result), time.time())

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        m = trial.last_result or {}
        what = _finished_what(m)
        say(f"[{self.done + self.failed}/{len(trials)}] done   "
            f"{m.get('cell') or trial_name(trial)}"
            f"{': ' + what if what else ''} ({time.time() - self.t0:.0f} s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.failed += 1
        say(f"[{self.done + self.failed}/{len(trials)}] FAILED {trial_name(trial)}")

    def on_step_end(self, iteration, trials, **info):
        self._show_progress(trials)
        if time.time() - self.last < STATUS_EVERY_S:
            return
        self.last = time.time()
        states: dict[str, int] = {}
        for t in trials:
            states[t.status] = states.get(t.status, 0) + 1
        say("status: " + ", ".join(f"{v} {k.lower()}" for k, v in sorted(states.items()))
            + f" ({time.time() - self.t0:.0f} s)")

    def on_experiment_end(self, trials, **info):
        self._stop_live()

    def _running(self, trials, now: float) -> list:
        out = []
        for t in trials:
            if t.status == "RUNNING":
                report, at = self.reports.get(t.trial_id, ({}, None))
                out.append(progress_from_metrics(
                    trial_name(t), report, at, self.started.setdefault(t.trial_id, now)))
        return out

    def _show_progress(self, trials) -> None:
        now = time.time()
        if now - self.shown < (1.0 if self.tty else self.every):
            return
        running = self._running(trials, now)
        if self.tty:
            self.shown = now
            self._live().update(progress_table(running, now))
            return
        if running:  # (the clock starts at the first print, not while nothing runs)
            self.shown = now
        for p in running[:self.MAX_LINES]:
            say(f"progress: {progress_line(p, now)}")
        if len(running) > self.MAX_LINES:
            say(f"progress: ... and {len(running) - self.MAX_LINES} more trials running")

    def _live(self) -> Any:
        if self.live is None:
            from rich.live import Live

            self.live = Live(refresh_per_second=1, transient=True)
            self.live.start()
            atexit.register(self._stop_live)  # (a Tune error skips on_experiment_end)
        return self.live

    def _stop_live(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


__all__ = ["ProgressPrinter", "progress_every_s", "trial_name", "PROGRESS_EVERY_ENV",
           "DEFAULT_EVERY_S"]
