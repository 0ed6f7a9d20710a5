"""`python -m pipeline.status SWEEP.yaml`: how far a sweep is, from MLflow, Tune's saved state and
(when a cluster is reachable) Ray.

    python -m pipeline.status SWEEP.yaml [--tracking-uri URI] [--ignore-code-version] [--cells]
                                         [--bench BENCH.json]
    python -m pipeline.status SUITE.yaml | SWEEP.yaml SWEEP.yaml ...   # each sweep in turn

Three sources, each optional but MLflow:

- **MLflow** (always): per grid cell, its latest run of the `final` phase; the parent run of each
  submission (`phase=sweep`) with its driver's host, pid and heartbeat tag (refreshed every
  `tracking.HEARTBEAT_S` by a live driver).
- **Tune's state** in the sweep's storage (`<storage>/tune/<experiment>-final-*/experiment_state-*
  .json`, local or s3://; read as plain JSON, nothing unpickled, no Ray needed): each trial's
  status (PENDING / RUNNING / TERMINATED / ERROR) and its trainable's last progress report
  (step / total, epoch, loss) as of the driver's last snapshot.
- **Ray** (only when `$RAY_ADDRESS` is set or a head started by `ray start` runs on this
  machine; status never starts Ray): the state of the Ray jobs the trials ran under (their
  `ray_job_id` tag).

A cell is

- **done**: a FINISHED run (of the current code version unless --ignore-code-version);
- **running**: its latest run is RUNNING and nothing says otherwise;
- **stale (driver gone?)**: its latest run is RUNNING in MLflow but is not running: the driver of
  its submission is gone (parent run not RUNNING, no heartbeat for `tracking.STALE_S`, its pid
  dead on this host, or its Ray job ended), or Tune has the trial TERMINATED / ERROR in a state
  saved after the run started (the trial process ended without closing its run). Re-submitting
  the sweep marks such runs KILLED and runs the cells again;
- **failed**: its latest run is FAILED; the reason is the first line of its `status_detail` tag;
- **left**: no run, KILLED, or finished for another code version only. A left cell that Tune has
  PENDING while the submission's driver is alive is *queued in Tune*.

Printed: one line on the latest submission (its parent run's status, driver and heartbeat), one
line on the Tune view and one on the Ray view (each says why it is unavailable when it is), the
counts, the mean trial time of the finished runs and an ETA (cells not done x mean time / trials
running now, or / 1 when nothing runs), the failures with their reasons, each running cell's
progress (`progress_line`: the line `pipeline.run` prints for it too), the stale cells with
their reason, and for a sweep with a search phase the samples done and the best one. With
`--bench BENCH.json` (a `python -m perl_core.bench --json` file from the target GPU) it also
prints the GPU time of the cells not done yet, from the same estimator as `pipeline.run --dry-run
--bench` (`pipeline.estimate`). `--cells` lists every cell with its state, Tune's status of its
trial and the detail.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pipeline import layout, queries, tracking  # noqa: E402
from pipeline.env import code_fingerprint  # noqa: E402
from pipeline.spec import (SpecError, add_set_argument, cells, load_spec, locate_sweep,  # noqa: E402
                           resolve_tracking_uri)
from pipeline.reuse import LINK, REUSE_TAG  # noqa: E402
from pipeline.suite import SuiteError, sweep_files  # noqa: E402

STATES = ("done", "running", "failed", "left", "stale")
STALE_LABEL = "stale (driver gone?)"
TUNE_ENDED = ("TERMINATED", "ERROR")
TUNE_ACTIVE = ("PENDING", "RUNNING", "PAUSED")
READ_TIMEOUT_S = 20.0  # the Tune state read and the Ray query each give up after this long


@dataclass
class CellStatus:
    name: str
    config_hash: str
    state: str  # done / running / failed / left / stale
    detail: str = ""
    seconds: float | None = None
    tune: str = ""  # Tune's status of the cell's trial in the newest saved state ("" unknown)
    queued: bool = False  # left, and PENDING in the Tune state of a live submission
    started: float | None = None  # running: when its MLflow run started (epoch seconds)


@dataclass
class Driver:
    """Is a submission's driver alive? `alive` None: cannot tell (no heartbeat tag)."""

    run_id: str
    status: str
    alive: bool | None
    why: str
    job_id: str = ""  # the Ray job its trials ran under (from a child run's ray_job_id tag)


@dataclass
class TuneView:
    """The newest saved Tune state of the sweep's grid phase, per config hash."""

    trials: dict[str, str] = field(default_factory=dict)  # config_hash -> Tune status
    saved_at: float | None = None  # when the newest state file was written (epoch seconds)
    experiment: str = ""
    complete: bool = False  # pipeline.run marked the phase complete
    unavailable: str = ""  # why there is no view ("" when there is one)
    # config_hash -> the trial's last progress report in that state (TrialProgress, no cell yet)
    progress: dict[str, TrialProgress] = field(default_factory=dict)


# --- live progress of a running trial (pipeline.run's display and this command) -------------------


@dataclass
class TrialProgress:
    """A running trial: its trainable's last progress report to Tune (`trainable.PROGRESS_KEYS`;
    None where it has not reported yet) and when the trial started."""

    cell: str
    started: float | None = None  # epoch seconds
    step: int | None = None
    total: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    reported_at: float | None = None  # epoch seconds of that report (None: unknown)


def progress_from_metrics(cell: str, metrics: dict[str, Any], reported_at: float | None = None,
                          started: float | None = None) -> TrialProgress:
    """The progress in a Tune result (or the last values of a saved state's metrics)."""
    from pipeline.trainable import PROGRESS_KEYS

    def num(key: str) -> float | None:
        v = metrics.get(PROGRESS_KEYS[key])
        return float(v) if isinstance(v, (int, float)) and v == v else None  # (not NaN)

    def whole(key: str) -> int | None:
        v = num(key)
        return int(v) if v is not None and v > 0 else None  # 0: unknown (no epochs yet)

    step = num("step")
    return TrialProgress(cell, started, None if step is None else int(step), whole("total"),
                         whole("epoch"), whole("epochs"), num("loss"), reported_at)


def progress_parts(p: TrialProgress, now: float) -> dict[str, str]:
    """The columns of one running trial: step, epoch, loss, elapsed (`-` where unknown)."""
    return {"step": "-" if p.step is None else f"{p.step}/{p.total or '?'}",
            "epoch": f"{p.epoch}/{p.epochs or '?'}" if p.epoch else "-",
            "loss": "-" if p.loss is None else f"{p.loss:.4g}",
            "elapsed": _fmt_s(max(0.0, now - p.started)) if p.started else "unknown"}


def progress_line(p: TrialProgress, now: float) -> str:
    """`<cell>: step 5/12, epoch 1/1, loss 0.6931, elapsed 00:01:05` (one plain line)."""
    c = progress_parts(p, now)
    if p.step is None:
        return f"{p.cell}: no progress report yet, elapsed {c['elapsed']}"
    return (f"{p.cell}: step {c['step']}"
            + (f", epoch {c['epoch']}" if p.epoch else "")
            + (f", loss {c['loss']}" if p.loss is not None else "")
            + f", elapsed {c['elapsed']}")


def progress_table(progress: list[TrialProgress], now: float) -> Any:
    """The same as a rich Table (pipeline.run's live display on a terminal)."""
    from rich.table import Table

    table = Table(title=f"{len(progress)} trial(s) running", title_justify="left")
    for col in ("cell", "step", "epoch", "loss", "elapsed"):
        table.add_column(col, justify="left" if col == "cell" else "right", no_wrap=True)
    for p in progress:
        c = progress_parts(p, now)
        table.add_row(p.cell, c["step"], c["epoch"], c["loss"], c["elapsed"])
    return table


# --- MLflow ---------------------------------------------------------------------------------------


def driver_state(parent: Any, now: float | None = None) -> Driver:
    """Whether the driver behind a parent run (`phase=sweep`) is alive, with the evidence: the
    rules `tracking.Tracker.kill_orphans` applies at the next submission
    (`tracking.driver_liveness`)."""
    info = parent.info
    if info.status != "RUNNING":
        return Driver(info.run_id, info.status, False, f"the submission ended ({info.status})")
    alive, why = tracking.driver_liveness(parent, now)
    return Driver(info.run_id, info.status, alive, why)


def cell_states(runs: list, grid: list, code_version: str | None,
                drivers: dict[str, Driver] | None = None,
                tune: TuneView | None = None,
                data: dict[str, Any] | None = None) -> list[CellStatus]:
    """The state of every grid cell from its runs (latest start wins, FINISHED beats all),
    told apart from stale RUNNING runs with the drivers (parent run id -> Driver) and Tune's
    saved state when given. `data` (dataset -> digest, `tracking.grid_data_digests`): a run of
    other data is not done (`tracking.data_changed`, the driver's rule)."""
    drivers = drivers or {}
    tune = tune or TuneView(unavailable="not read")
    by_hash: dict[str, list] = {}
    for r in runs:
        by_hash.setdefault(r.data.tags.get("config_hash", ""), []).append(r)
    out = []
    for c in grid:
        rs = sorted(by_hash.get(c.config_hash, []), key=lambda r: r.info.start_time or 0)
        t = tune.trials.get(c.config_hash, "")
        done = [r for r in rs if r.info.status == "FINISHED" and
                (code_version is None or r.data.tags.get("code_version") == code_version) and
                not tracking.data_changed(r.data.tags, data or {})]
        if done:
            r = done[-1]
            # a linked run took no trial time (`pipeline.reuse`): not a trial time for the ETA
            secs = None if r.data.tags.get(REUSE_TAG) == LINK else (
                (r.info.end_time or 0) - (r.info.start_time or 0)) / 1000 or None
            out.append(CellStatus(c.name, c.config_hash, "done", seconds=secs, tune=t))
            continue
        last = rs[-1] if rs else None
        if last is None:
            out.append(CellStatus(c.name, c.config_hash, "left", tune=t))
        elif last.info.status == "RUNNING":
            why = _stale_reason(last, drivers, tune, t)
            out.append(CellStatus(c.name, c.config_hash, "stale" if why else "running", why,
                                  tune=t, started=(last.info.start_time or 0) / 1000 or None))
        elif last.info.status == "FAILED":
            detail = [ln.strip() for ln in last.data.tags.get("status_detail", "").splitlines()
                      if ln.strip()]
            out.append(CellStatus(c.name, c.config_hash, "failed",
                                  detail[0] if detail else "no reason recorded", tune=t))
        else:
            why = "finished with another code version" if last.info.status == "FINISHED" \
                else last.info.status.lower()
            out.append(CellStatus(c.name, c.config_hash, "left", why, tune=t))
    return out


def _stale_reason(run: Any, drivers: dict[str, Driver], tune: TuneView, tune_status: str) -> str:
    """Why a RUNNING run is not really running ("" when nothing says so)."""
    parent = run.data.tags.get("mlflow.parentRunId", "")
    d = drivers.get(parent)
    if d is not None and d.alive is False:
        return d.why
    if parent and parent not in drivers and drivers:
        return "its submission's parent run is not in MLflow"
    started = (run.info.start_time or 0) / 1000
    if tune_status in TUNE_ENDED and tune.saved_at is not None and tune.saved_at > started:
        return (f"Tune has the trial {tune_status} (state saved after the run started): the "
                f"trial process ended without closing its MLflow run")
    return ""


def queue_from_tune(states: list[CellStatus], live: bool) -> None:
    """Mark left cells that Tune has PENDING as queued, and those it has RUNNING as starting,
    when the submission's driver is alive (a dead driver's saved queue is no queue)."""
    for s in states:
        if not live or s.state != "left" or s.tune not in TUNE_ACTIVE:
            continue
        s.queued = s.tune == "PENDING"
        s.detail = "queued in Tune (PENDING)" if s.queued else \
            f"starting ({s.tune} in Tune, no MLflow run yet)"


def eta_seconds(states: list[CellStatus]) -> tuple[float | None, float | None]:
    """(mean trial seconds, ETA seconds) from the finished cells; None when unknown."""
    times = [s.seconds for s in states if s.state == "done" and s.seconds]
    if not times:
        return None, None
    mean = statistics.fmean(times)
    running = sum(s.state == "running" for s in states)
    remaining = sum(s.state != "done" for s in states)
    return mean, remaining * mean / max(1, running)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "unknown"
    return time.strftime("%H:%M:%S", time.gmtime(s)) if s < 86400 else f"{s / 86400:.1f} days"


# --- Tune's saved state ---------------------------------------------------------------------------


def _bounded(fn: Callable[[], Any], what: str, timeout_s: float = READ_TIMEOUT_S) -> Any:
    """fn() in a daemon thread; TimeoutError when it takes longer (an unreachable S3 endpoint
    retries for minutes; status must answer)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    th = threading.Thread(target=target, daemon=True, name=f"status-{what}")
    th.start()
    th.join(timeout_s)
    if th.is_alive():
        raise TimeoutError(f"{what} did not answer within {timeout_s:.0f} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def tune_view(storage: str, experiment: str) -> TuneView:
    """The newest `experiment_state-*.json` of every grid-phase Tune experiment of `experiment`
    under `<storage>/tune`, merged per config hash (the newest state wins); never raises."""
    root = layout.tune_dir(storage)
    try:
        return _bounded(lambda: _read_tune_states(root, experiment), "the sweep's storage")
    except Exception as e:
        return TuneView(unavailable=f"cannot read {root} ({type(e).__name__}: "
                                    f"{tracking.short_error(e)})")


def _read_tune_states(root: str, experiment: str) -> TuneView:
    fs, path = layout.open_fs(root)
    prefix = layout.tune_prefix(experiment, layout.GRID_PHASE)
    if not fs.exists(path):
        return TuneView(unavailable=f"no Tune state under {root} (Tune has not started this "
                                    f"sweep's grid phase here)")
    states = []  # (saved_at, experiment name, state file path, experiment dir)
    for d in fs.ls(path, detail=False):
        name = d.rstrip("/").rsplit("/", 1)[-1]
        if not name.startswith(prefix):
            continue
        files = [f for f in fs.ls(d, detail=False)
                 if f.rsplit("/", 1)[-1].startswith("experiment_state-") and f.endswith(".json")]
        if files:
            newest = max(files)  # the name holds the Tune session's start time
            states.append((_mtime(fs, newest), name, newest, d))
    if not states:
        return TuneView(unavailable=f"no saved Tune state of {experiment!r} under {root}")
    view = TuneView()
    for saved_at, name, state_file, d in sorted(states, key=lambda s: s[0] or 0):
        with fs.open(state_file, "rb") as f:
            data = json.loads(f.read())
        for trial_json, meta in data.get("trial_data", []):
            h, status = _trial_entry(trial_json)
            if h:
                view.trials[h] = status
                view.progress[h] = _trial_progress(meta)
        view.saved_at, view.experiment = saved_at, name
        view.complete = fs.exists(f"{d.rstrip('/')}/{layout.PHASE_COMPLETE}")
    return view


def _trial_entry(trial_json: str) -> tuple[str, str]:
    """(config hash, Tune status) of one trial of a saved state; ("", "") when unreadable."""
    from perl_core.config import TrainConfig

    try:
        state = json.loads(trial_json)
        cfg = (state.get("config") or {}).get("cell", {}).get("config")
        return TrainConfig.from_record(cfg).config_hash(), str(state.get("status", ""))
    except Exception:
        return "", ""


def _trial_progress(meta_json: str) -> TrialProgress:
    """The last progress report in a trial's saved run metadata: the last value of each metric
    (`metric_analysis`, so a later checkpoint-only report does not hide the step) and when Tune
    received the last result; nothing when unreadable."""
    try:
        meta = json.loads(meta_json)
        last = {k: v.get("last") for k, v in (meta.get("metric_analysis") or {}).items()
                if isinstance(v, dict)}
        at = meta.get("last_result_time")
        return progress_from_metrics("", last, at if isinstance(at, (int, float)) and
                                     0 < at < float("inf") else None)
    except Exception:
        return TrialProgress("")


def _mtime(fs: Any, path: str) -> float | None:
    from perl_core.cache import info_mtime

    try:
        return info_mtime(fs.info(path))
    except Exception:
        return None


# --- Ray ----------------------------------------------------------------------------------------


def ray_address() -> str | None:
    """$RAY_ADDRESS, else the address of a head that `ray start` runs on this machine (the file
    Ray writes for it), else None. Never starts anything."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    tmp = os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()
    try:
        with open(os.path.join(tmp, "ray", "ray_current_cluster")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def ray_jobs(address: str) -> dict[str, str]:
    """Ray job id and submission id -> the job's status (RUNNING, SUCCEEDED, FAILED, STOPPED,
    PENDING), from the cluster's state API; raises when the cluster does not answer."""
    def query() -> dict[str, str]:
        from ray.util.state import list_jobs

        out = {}
        for j in list_jobs(address=address, timeout=int(READ_TIMEOUT_S / 2), limit=10000,
                           raise_on_missing_output=False):
            status = str(getattr(j.status, "value", j.status) or "")
            for key in (j.job_id, j.submission_id):
                if key:
                    out[str(key)] = status
        return out

    return _bounded(query, f"the Ray cluster at {address}")


def apply_ray(drivers: dict[str, Driver], jobs: dict[str, str]) -> None:
    """A driver whose Ray job has ended is gone, whatever its heartbeat says."""
    for d in drivers.values():
        status = jobs.get(d.job_id)
        if d.alive is not False and status in ("SUCCEEDED", "FAILED", "STOPPED"):
            d.alive, d.why = False, f"its Ray job {d.job_id} is {status}"
        elif status in ("RUNNING", "PENDING") and d.alive is None:
            d.alive, d.why = True, f"its Ray job {d.job_id} is {status}"


# --- the command --------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.status",
                                 description="Progress of a sweep from MLflow, Tune and Ray.")
    ap.add_argument("sweeps", nargs="+", metavar="SWEEP",
                    help="sweep YAML; several, or a suite file (sweeps/paper.yaml): each in turn")
    add_set_argument(ap)  # the same overrides as the run it follows
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--ignore-code-version", action="store_true")
    ap.add_argument("--cells", action="store_true", help="list every cell with its state")
    ap.add_argument("--bench", default=None, metavar="BENCH.json",
                    help="also estimate the GPU time of the cells left from this "
                         "`python -m perl_core.bench --json` file")
    return ap


def _say(text: str) -> None:  # plain lines (no rich markup, no wrapping): grep-able
    print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The status of each sweep given (a suite file: of each of its sweeps, in its order)."""
    args = _parser().parse_args(argv)
    try:
        _, files = sweep_files(args.sweeps, locate_sweep)
    except SuiteError as e:
        print(e)
        return 2
    codes = []
    for i, f in enumerate(files):
        if i:
            _say("")
        codes.append(sweep_status(argparse.Namespace(**{**vars(args), "sweep": f})))
    return max(codes)


def sweep_status(args: argparse.Namespace) -> int:
    """The status of the one sweep `args.sweep`."""
    try:
        spec = load_spec(args.sweep, overrides=args.overrides)
        uri = resolve_tracking_uri(spec, args.tracking_uri)
    except SpecError as e:
        print(e)
        return 2
    grid = cells(spec)
    code = None if args.ignore_code_version else code_fingerprint()
    exp, runs = _sweep_runs(uri, spec)
    final = [r for r in runs if r.data.tags.get("phase") == layout.GRID_PHASE]
    parents = sorted((r for r in runs if r.data.tags.get("phase") == layout.PARENT_PHASE),
                     key=lambda r: r.info.start_time or 0)
    drivers = _drivers(parents, runs)
    ray_line = _ray_line(drivers)
    tune = tune_view(spec.storage, spec.experiment)
    states = cell_states(final, grid, code, drivers, tune,
                         tracking.grid_data_digests([c.config for c in grid]))
    latest = drivers[parents[-1].info.run_id] if parents else None
    queue_from_tune(states, live=bool(latest and latest.alive))

    from rich.console import Console

    console = Console()  # (for the --bench lines)
    say = _say
    say(f"{spec.name} ({spec.source}): experiment {spec.experiment!r} at "
        f"{layout.redact_uri(uri)}" + ("" if exp else " (no runs yet)"))
    _print_sources(parents[-1] if parents else None, latest, tune, ray_line, say)
    _print_states(spec, grid, states, tune, say)
    if args.bench:
        rc = _bench_estimate(spec, grid, states, final, args.bench, console)
        if rc:
            return rc
    if args.cells:
        _print_cells(states, say)
    if spec.search is not None:
        say(_search_line(spec, runs))
    return 0


def _sweep_runs(uri: str, spec: Any) -> tuple[Any, list]:
    """(the MLflow experiment or None, the sweep's runs); never creates a SQLite store."""
    if not layout.store_exists(uri):
        return None, []
    tracker = tracking.Tracker(uri)
    exp = tracker.client.get_experiment_by_name(spec.experiment)
    if exp is None:
        return None, []
    return exp, queries.sweep_runs(tracker.client, exp.experiment_id, spec.name)


def _drivers(parents: list, runs: list) -> dict[str, Any]:
    """parent run id -> its driver's state, with the Ray job its trials ran under."""
    drivers = {p.info.run_id: driver_state(p) for p in parents}
    for r in runs:
        d = drivers.get(r.data.tags.get("mlflow.parentRunId", ""))
        if d is not None and r.data.tags.get("ray_job_id"):
            d.job_id = r.data.tags["ray_job_id"]
    return drivers


def _ray_line(drivers: dict[str, Any]) -> str:
    """What the Ray cluster says of the sweep's jobs (and marks the drivers with it)."""
    address = ray_address()
    if not address:
        return ("not asked: $RAY_ADDRESS is unset and no `ray start` head runs on this machine "
                "(a local Ray started by pipeline.run ends with its driver)")
    try:
        jobs = ray_jobs(address)
        apply_ray(drivers, jobs)
        known = sorted({d.job_id for d in drivers.values() if d.job_id in jobs})
        return (f"cluster at {layout.redact_uri(address)}: "
                + (", ".join(f"job {j} {jobs[j]}" for j in known) if known
                   else "none of this sweep's jobs are known to it"))
    except Exception as e:
        return (f"unavailable: the cluster at {layout.redact_uri(address)} did not "
                f"answer ({type(e).__name__}: {tracking.short_error(e)})")


def _print_sources(p: Any, latest: Any, tune: TuneView, ray_line: str,
                   say: Callable[[str], None]) -> None:
    """The latest submission (`p`, its driver `latest`), the Tune view and the Ray line."""
    if latest is not None:
        if p.info.status == "RUNNING":
            state = {True: "alive", False: "GONE", None: "unknown"}[latest.alive]
            say(f"latest submission {p.info.run_name!r} (parent run {p.info.run_id}): RUNNING, "
                f"driver {state}: {latest.why}"
                + (" (the next submission marks it KILLED)" if latest.alive is False else ""))
        else:  # an ended submission: its driver is gone by design, not a fault to flag
            say(f"latest submission {p.info.run_name!r} (parent run {p.info.run_id}): "
                f"{p.info.status} (ended)")
    if tune.unavailable:
        say(f"Tune view unavailable: {tune.unavailable}")
    else:
        by = collections.Counter(tune.trials.values())
        age = f"saved {time.time() - tune.saved_at:.0f} s ago" if tune.saved_at else "saved"
        say(f"Tune: {tune.experiment} ({age}{', phase complete' if tune.complete else ''}): "
            + ", ".join(f"{n} {k}" for k, n in sorted(by.items())))
    say(f"Ray: {ray_line}")


def _print_states(spec: Any, grid: list, states: list[CellStatus], tune: TuneView,
                  say: Callable[[str], None]) -> None:
    """Counts, ETA, failures, running trials and stale cells."""
    counts = {k: sum(s.state == k for s in states) for k in STATES}
    queued = sum(s.queued for s in states)
    mean, eta = eta_seconds(states)
    say(f"{len(grid)} cells: {counts['done']} done, {counts['running']} running, "
        f"{counts['failed']} failed, {counts['left']} left"
        + (f" ({queued} queued in Tune)" if queued else "")
        + (f", {counts['stale']} {STALE_LABEL}" if counts["stale"] else ""))
    say(f"mean trial time {_fmt_s(mean)}; ETA {_fmt_s(eta)}"
        + (f" ({counts['running']} running in parallel)" if counts["running"] else ""))
    failed = [s for s in states if s.state == "failed"]
    if failed:
        say("failures:")
        for s in failed:
            say(f"  {s.name}: {s.detail}")
    print_running(states, tune, say)
    stale = [s for s in states if s.state == "stale"]
    if stale:
        say(f"{STALE_LABEL}: RUNNING in MLflow but not running:")
        for s in stale:
            say(f"  {s.name}: {s.detail}")
        say(f"  re-submitting (`python -m pipeline.run {spec.source}`) marks them KILLED and "
            f"runs those cells again")


def _print_cells(states: list[CellStatus], say: Callable[[str], None]) -> None:
    """--cells: plain aligned columns (a table would wrap long reasons mid-word)."""
    rows = [("cell", "config_hash", "state", "tune", "detail")] + [
        (s.name, s.config_hash, STALE_LABEL if s.state == "stale" else s.state,
         s.tune or "-", s.detail) for s in states]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        say("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[4])


def _search_line(spec: Any, runs: list) -> str:
    hpo = [r for r in runs if r.data.tags.get("phase") == layout.SEARCH_PHASE
           and r.info.status == "FINISHED" and spec.search.metric in r.data.metrics]
    line = f"search: {len(hpo)}/{spec.search.num_samples} samples finished"
    if hpo:
        pick = max if spec.search.mode == "max" else min
        best = pick(hpo, key=lambda r: r.data.metrics[spec.search.metric])
        params = ", ".join(f"{k}={best.data.params.get(k)}" for k in spec.search.space)
        line += (f"; best {spec.search.metric} = "
                 f"{best.data.metrics[spec.search.metric]:.4g} ({params})")
    return line


def print_running(states: list[CellStatus], tune: TuneView, say: Callable[[str], None],
                  now: float | None = None) -> None:
    """`running (...):` then one `  <cell>: step 5/12, epoch 1/1, loss 0.69, elapsed ...` line per
    running cell (`progress_line`, the lines `pipeline.run` prints), from Tune's saved state."""
    running = [s for s in states if s.state == "running"]
    if not running:
        return
    now = time.time() if now is None else now
    source = (f"Tune's state saved {now - tune.saved_at:.0f} s ago" if tune.saved_at else
              "no Tune state" if tune.unavailable else "Tune's saved state")
    say(f"running (step/total and loss from {source}):")
    for s in running:
        p = tune.progress.get(s.config_hash) or TrialProgress("")
        if p.reported_at and s.started and p.reported_at < s.started:
            p = TrialProgress("")  # a report of an earlier attempt, not of this run
        p = dataclasses.replace(p, cell=s.name, started=s.started)
        say(f"  {progress_line(p, now)}")


def _bench_estimate(spec, grid: list, states: list[CellStatus], runs: list, bench_file: str,
                    console) -> int:
    """GPU time of the cells not done, from the bench file (pipeline.estimate); 2 on a bad file."""
    from pipeline import estimate

    try:
        bench = estimate.load_bench(bench_file)
        finished = [r for r in runs if r.info.status == "FINISHED"]
        overhead, n = (None, 0) if bench.trial_overhead_s is not None else \
            estimate.measured_overhead(finished)
        from pipeline.spec import group_order  # the order the driver runs them in

        left = [(c.name, c.config) for c in group_order(
            [c for c, s in zip(grid, states) if s.state != "done"])]
        est = estimate.estimate(left, bench, cache_enabled=bool(getattr(
            getattr(spec, "cache", None), "enabled", True)), overhead_s=overhead,
            overhead_from=f"mean timing/overhead_s of {n} finished run(s)")
    except estimate.EstimateError as e:
        console.print(str(e), markup=False, highlight=False)
        return 2
    running = sum(s.state == "running" for s in states)
    console.print(f"bench estimate of the {len(est.cells)} cell(s) not done: "
                  f"{est.seconds / 3600:.3g} GPU-h ({est.seconds:,.0f} s; device {bench.device}, "
                  f"arch {bench.arch}, from {bench_file}); "
                  f"ETA {_fmt_s(est.seconds / max(1, running))}"
                  + (f" with {running} trials in parallel" if running else ""),
                  markup=False, highlight=False)
    if est.unknown:
        console.print(f"  {len(est.unknown)} cell(s) not counted: "
                      + "; ".join(sorted({why for _, why in est.unknown})),
                      markup=False, highlight=False)
    for w in est.warnings:
        console.print(f"  warning: {w}", markup=False, highlight=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
