"""`python -m pipeline.run SWEEP.yaml`: the Ray Tune driver of one sweep.

    python -m pipeline.run SWEEP.yaml [--dry-run] [--rerun] [--replay] [--max-concurrent N]
                                      [--tracking-uri URI] [--ignore-code-version]
    python -m pipeline.run SWEEP.yaml --zero-shot-check [--tolerance P]   # step 0 only, no Ray

1. Validate the YAML (`pipeline.spec`), expand the grid into cells, hash them.
2. MLflow: get-or-create the experiment, mark orphaned RUNNING runs of earlier submissions
   KILLED, replay trial records that are in storage but not in MLflow (outage recovery), then
   look up which hashes already have a FINISHED run (same code version unless
   --ignore-code-version): those cells are skipped (--rerun runs them again).
   --dry-run stops here and prints the cells (name, hash, done/todo); --replay stops after the
   replay.
3. A parent run for this submission, then `ray.init()` (attaches to the cluster under
   `ray job submit` / $RAY_ADDRESS, else starts a local Ray; never a hard-coded address).
4. Grid phase: ONE Tuner with one `grid_search` over the explicit list of remaining cells, ordered
   so that cells sharing (arch, pretrained, inject_layer, dataset) run back to back (backbone and
   cache reuse). An interrupted identical submission is resumed with `Tuner.restore`.
5. Search phase (if the YAML has `search`): a second Tuner with `OptunaSearch` over the space,
   selecting on a validation metric, in a persistent Optuna study (SQLite beside the records,
   `pipeline.study`): a re-submission resumes it and runs only the missing samples; finished
   samples in MLflow that the study lacks are added to it as evaluated, never re-run.
6. A summary (finished / skipped / failed with reasons, where the runs are, the `mlflow ui`
   command). The exit code is 1 when a cell failed, 2 for an invalid sweep file or a tracking
   store that cannot be reached at the start, 3 when every cell finished but MLflow went away
   during the sweep (or during the start-up replay / a `--replay`, which then stops with a message
   saying how many records it logged): the results are safe in the storage records and the next
   run of the sweep (or `--replay`) logs them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Progress reports carry no search metric; Tune must not insist on it in every report.
os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
# MLflow is the tracker: of Tune's default result loggers only the JSON one is kept (its
# result.json is what Tune's ResultGrid reads back), no TensorBoard / CSV files per trial in the
# sweep's storage (on S3, many small uploads); `_tuner` adds JsonLoggerCallback itself.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
# CheckpointConfig(num_to_keep=1) forces an experiment-state snapshot after each trial checkpoint
# (so that resume never points at a deleted checkpoint); Tune's warning about it is noise here.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")

from pipeline import tracking  # noqa: E402
from pipeline.env import REPO, code_version, versions  # noqa: E402
from pipeline.spec import (Cell, SpecError, SweepSpec, add_set_argument, arm_signature,  # noqa: E402
                           cells, group_order, load_spec, locate_sweep, preflight,
                           resolve_tracking_uri)

# Environment every trial process gets when this driver starts or joins Ray itself.
TRIAL_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
             "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for the entrypoint


def say(msg: str) -> None:
    print(msg, flush=True)


# --- CLI ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.run",
                                 description="Run a PERL sweep on Ray Tune, tracked in MLflow.")
    ap.add_argument("sweep", help="sweep YAML (sweeps/*.yaml)")
    add_set_argument(ap)
    ap.add_argument("--dry-run", action="store_true",
                    help="print the cells (name, hash, done/todo) and totals; start no trial")
    ap.add_argument("--rerun", action="store_true",
                    help="run every cell again, even those with a FINISHED run")
    ap.add_argument("--replay", action="store_true",
                    help="only log storage records that MLflow lacks (after an MLflow outage)")
    ap.add_argument("--max-concurrent", type=int, default=None, metavar="N",
                    help="at most N trials at once (default: as many as resources allow)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: the YAML's, else $MLFLOW_TRACKING_URI, "
                         "else sqlite under ./runs)")
    ap.add_argument("--ignore-code-version", action="store_true",
                    help="a FINISHED run of any code version counts as done (default: only runs "
                         "of the current git commit)")
    ap.add_argument("--bench", default=None, metavar="BENCH.json",
                    help="with --dry-run: estimate the GPU time of the cells to run from this "
                         "`python -m perl_core.bench --json` file (made on the target GPU)")
    ap.add_argument("--zero-shot-check", action="store_true",
                    help="no training: evaluate every dataset of the sweep at step 0 (zero-shot "
                         "CLIP) under both templates beside the reference; exit 1 if one is "
                         "off by more than --tolerance (pipeline/zeroshot.py)")
    ap.add_argument("--tolerance", type=float, default=None, metavar="POINTS",
                    help="with --zero-shot-check: points of accuracy allowed (default 1.5)")
    ap.add_argument("--trial-overhead-s", type=float, default=None, metavar="S",
                    help="with --bench: seconds of per-trial overhead (default: the bench "
                         "file's trial_overhead_s, else measured on this sweep's finished runs)")
    return ap


@dataclass
class Outcome:
    """What happened to the cells of one submission (for the summary and the exit code)."""

    done_before: list[Cell] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # finished meanwhile by another submission
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell, reason)
    hpo_best: dict[str, Any] | None = None
    replayed: int = 0
    killed: int = 0
    unlogged: list[str] = field(default_factory=list)  # finished, MLflow unreachable: record only
    tracking_error: str = ""  # set when the final replay could not reach MLflow
    storage_error: str = ""  # set when Tune or the final replay could not use the storage


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        say("--max-concurrent must be >= 1")
        return 2
    args.sweep = locate_sweep(args.sweep, say)
    try:
        spec = load_spec(args.sweep, overrides=args.overrides)
        uri = resolve_tracking_uri(spec, args.tracking_uri)
    except SpecError as e:
        say(str(e))
        return 2
    grid = group_order(cells(spec))
    if args.zero_shot_check:  # evaluates only: no tracking store, no Ray, no storage needed
        from pipeline import zeroshot

        return zeroshot.check_sweep(spec, grid, zeroshot.DEFAULT_TOLERANCE if args.tolerance
                                    is None else args.tolerance, say)
    if args.tolerance is not None:
        say("--tolerance goes with --zero-shot-check")
        return 2
    if not args.dry_run and not args.replay:
        try:
            preflight(spec, [c.config for c in grid] +
                      ([spec.base_config()] if spec.search else []))
            from pipeline import cluster_check

            if cluster_check.joins_cluster():  # (a Ray this driver starts is one node)
                init_ray()  # before any MLflow run: the nodes decide what may be node-local
                import ray

                cluster_check.refuse_node_local(spec, uri, ray.nodes())
        except SpecError as e:
            say(str(e))
            return 2
    code = code_version()
    match_code = None if args.ignore_code_version else code.fingerprint

    if args.dry_run:
        return dry_run(spec, grid, uri, match_code, args.rerun, args.bench,
                       args.trial_overhead_s)
    if args.bench or args.trial_overhead_s is not None:
        say("--bench and --trial-overhead-s go with --dry-run (they estimate, they run nothing)")
        return 2

    tracker = tracking.Tracker(uri)
    try:
        tracker.check()
        exp_id = tracker.experiment_id(spec.experiment)
    except (tracking.TrackingUnavailable, RuntimeError) as e:
        say(f"{spec.source}: {e}")
        return 2
    out = Outcome()
    run_name = f"{spec.name} {time.strftime('%Y-%m-%d %H:%M')}" + (" (replay)" if args.replay
                                                                   else "")
    user = tracking.submitter()  # the parent's and every child's mlflow.user
    try:
        parent = tracker.start_parent(exp_id, spec.name, run_name, {
            "sweep_file": os.path.abspath(args.sweep), "code_sha": code.sha,
            "code_dirty": code.dirty, "code_version": code.fingerprint,
            "num_cells": str(len(grid)), **versions(), **tracking.source_tags(code.sha, user),
            tracking.NOTE_TAG: tracking.sweep_note(spec.description, spec.name, spec.source,
                                                   len(grid))})
        tracker.log_text(parent, spec.resolved_yaml, tracking.RESOLVED_SWEEP)
    except Exception as e:  # MLflow went away right after the check: nothing has run yet
        say(f"{spec.source}: MLflow tracking at {tracking.redact_uri(uri)} stopped answering "
            f"before the sweep started ({type(e).__name__}: {tracking._short_error(e)}); "
            f"nothing was run")
        return 2
    status, beat = "FAILED", _Heartbeat(tracker, parent)
    lost = ""  # set when MLflow went away before any trial: the parent run is left to the next
    beat.start()
    try:
        try:
            out.killed = len(tracker.kill_orphans(exp_id, spec.name, own_parent=parent))
            incomplete: list[str] = []
            out.replayed = len(tracking.replay(tracker, spec.storage, spec.experiment,
                                               parent_run_id=parent, experiment_id=exp_id,
                                               skipped=incomplete))
            for why in incomplete:  # never logged as a result
                say(f"warning: incomplete trial record skipped: {why}")
            if out.killed or out.replayed:
                say(f"recovered: {out.killed} orphaned RUNNING run(s) marked KILLED, "
                    f"{out.replayed} stored trial record(s) replayed into MLflow")
            if args.replay:
                status = "FINISHED"
                say(f"replay done: {out.replayed} record(s) from "
                    f"{tracking.records_dir(spec.storage, spec.experiment)}")
                return 0
            finished = {} if args.rerun else tracker.finished_by_hash(
                exp_id, phase="final", code_version=match_code, warn=say,
                data=tracking.grid_data_digests([c.config for c in grid], say))
        except tracking.TrackingUnavailable as e:  # from replay: says how far it got
            lost = str(e)
        except tracking.tracking_errors() as e:  # orphans / lookup (replay: as it raises)
            lost = (f"MLflow tracking at {tracking.redact_uri(uri)} stopped answering "
                    f"({type(e).__name__}: {tracking._short_error(e)})")
        if lost:
            say(f"{spec.source}: {lost}")
            say(f"MLFLOW UNREACHABLE: stopped before running any cell; nothing is lost (trial "
                f"records stay in {tracking.records_dir(spec.storage, spec.experiment)}). Once "
                f"the server is back, run `python -m pipeline.run {spec.source}"
                f"{' --replay' if args.replay else ''}` again; it marks this submission's "
                f"parent run (left RUNNING) KILLED.")
            return 3
        todo = [c for c in grid if c.config_hash not in finished]
        out.done_before = [c for c in grid if c.config_hash in finished]
        say(f"sweep {spec.name}: {len(grid)} cells, {len(out.done_before)} already FINISHED, "
            f"{len(todo)} to run; experiment {spec.experiment!r} at {tracking.redact_uri(uri)}")
        context = trial_context(spec, uri, exp_id, parent, code, args)
        context.update(grid_hashes=[c.config_hash for c in grid], match_code=match_code,
                       user=user, varied_fields=list(spec.varied_fields))  # (for run notes)
        if todo or spec.search is not None:
            prepare_data(todo, spec)
            init_ray()
            context["ray_job_id"] = ray_job_id()
        if todo:
            run_grid(spec, todo, context, args, out)
            try:
                tracker.kill_orphans(exp_id, spec.name, own_parent=parent,
                                     only_children_of=parent)
            except Exception as e:  # MLflow down: the next submission marks them
                say(f"warning: could not mark this submission's unfinished runs KILLED: "
                    f"{tracking._short_error(e)}")
        if spec.search is not None:
            run_search(spec, tracker, exp_id, context, args, out, match_code)
        # trials that could not reach MLflow left records: log them now (not when Tune just
        # lost the storage: reading it would wait out the retries again; the next run replays)
        try:
            if not out.storage_error:
                out.replayed += len(tracking.replay(tracker, spec.storage, spec.experiment,
                                                    parent_run_id=parent, experiment_id=exp_id))
                out.unlogged = []
        except (tracking.TrackingUnavailable, *tracking.tracking_errors()) as e:
            out.tracking_error = f"{type(e).__name__}: {tracking._short_error(e)}"
        except Exception as e:  # the records could not be read: the storage, not MLflow
            out.storage_error = out.storage_error or (
                f"cannot read the trial records in "
                f"{tracking.records_dir(spec.storage, spec.experiment)} "
                f"({type(e).__name__}: {tracking._short_error(e)})")
        status = "FINISHED" if not (out.failed or out.storage_error) else "FAILED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        beat.stop()
        if not lost:  # (when MLflow is gone, each call would wait out its retries again)
            try:
                tracker.set_tags(parent, {"num_finished": str(len(out.finished)),
                                          "num_failed": str(len(out.failed)),
                                          "num_skipped": str(len(out.done_before) +
                                                             len(out.skipped))})
                tracker.end(parent, status)
            except Exception as e:  # the summary below still tells the user what happened
                say(f"warning: could not close the parent run {parent}: {e}")
    summary(spec, uri, out)
    return 1 if out.failed or out.storage_error else (3 if out.tracking_error else 0)



def trial_context(spec: SweepSpec, uri: str, exp_id: str, parent: str, code: Any,
                  args: argparse.Namespace) -> dict[str, Any]:
    """The read-only context every trial gets (tune.with_parameters); no secrets in it."""
    return {"tracking_uri": uri, "experiment": spec.experiment, "experiment_id": exp_id,
            "parent_run_id": parent, "sweep": spec.name, "sweep_file": os.path.abspath(args.sweep),
            "storage": spec.storage, "feature_cache": spec.cache.model_dump(),
            "code_sha": code.sha, "code_dirty": code.dirty,
            "code_version": code.fingerprint,
            "rerun": bool(args.rerun), "ignore_code_version": bool(args.ignore_code_version),
            "imports": list(spec.imports),  # imported by every trial on its worker
            "sweep_arms": ",".join(spec.arm_names),  # the arms' order, for the aggregate's rows
            # how the aggregate places this sweep's runs that carry no arm tag
            "sweep_arm_spec": json.dumps(arm_signature(spec), sort_keys=True,
                                         separators=(",", ":")) if spec.arms else "",
            "phase": "final", "ray_job_id": ""}


# --- dry run -------------------------------------------------------------------------------------


def dry_run(spec: SweepSpec, grid: list[Cell], uri: str, match_code: str | None,
            rerun: bool, bench_file: str | None = None,
            overhead_s: float | None = None) -> int:
    from pipeline import estimate

    bench = None
    if overhead_s is not None and overhead_s < 0:
        say(f"--trial-overhead-s must be >= 0, got {overhead_s:g}")
        return 2
    if bench_file:
        try:
            bench = estimate.load_bench(bench_file)
        except estimate.EstimateError as e:
            say(str(e))
            return 2
    finished: dict[str, Any] = {}
    if not rerun and _store_exists(uri):
        tracker = tracking.Tracker(uri)
        try:
            tracker.check()
            exp = tracker.client.get_experiment_by_name(spec.experiment)
            if exp is not None:
                finished = tracker.finished_by_hash(
                    exp.experiment_id, phase="final", code_version=match_code, warn=say,
                    data=tracking.grid_data_digests([c.config for c in grid], say))
        except Exception as e:  # a dry run still shows the work; a real run refuses (exit 2)
            say(f"warning: {spec.source}: tracking store {tracking.redact_uri(uri)} not "
                f"readable ({type(e).__name__}): every cell is shown as todo; a real run "
                f"would stop here")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name}: {spec.source}")
    for col in ("#", "cell", "config_hash", "state"):
        table.add_column(col, justify="right" if col == "#" else "left")
    for i, c in enumerate(grid, 1):
        table.add_row(str(i), c.name, c.config_hash,
                      "done" if c.config_hash in finished else "todo")
    console = Console(width=max(120, Console().width))
    console.print(table)
    done = sum(c.config_hash in finished for c in grid)
    say(f"total: {len(grid)} cells, {done} done, {len(grid) - done} todo"
        + (f"; then an Optuna search of {spec.search.num_samples} samples on "
           f"{spec.search.metric} ({spec.search.mode})" if spec.search else ""))
    say(f"experiment {spec.experiment!r} at {tracking.redact_uri(uri)}; storage {spec.storage}; "
        f"per trial {spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU")
    todo = [(c.name, c.config) for c in grid if c.config_hash not in finished]
    if spec.search is not None:  # the samples' searched fields are unknown: the fixed settings
        todo += [(f"search sample {i + 1}", spec.base_config(), "search (fixed settings)")
                 for i in range(spec.search.num_samples)]
    overhead_from = "--trial-overhead-s"
    if bench is not None and overhead_s is None and bench.trial_overhead_s is None:
        overhead_s, n = estimate.measured_overhead(finished.values())
        overhead_from = f"mean timing/overhead_s of {n} finished run(s) of this sweep"
    try:
        est = estimate.estimate(todo, bench, cache_enabled=_cache_enabled(spec),
                                overhead_s=overhead_s, overhead_from=overhead_from)
    except estimate.EstimateError as e:
        say(f"{spec.source}: {e}")
        return 2
    estimate.report(est, say, arch=[c.config.arch for c in grid])
    return 0


def _cache_enabled(spec: SweepSpec) -> bool:
    cache = getattr(spec, "cache", None)  # the sweep's `cache:` block (feature cache, default on)
    return bool(getattr(cache, "enabled", True))


def _store_exists(uri: str) -> bool:
    """False for a SQLite file not created yet (a dry run must not create it)."""
    if uri.startswith("sqlite:///"):
        return os.path.exists(uri[len("sqlite:///"):])
    return True


def prepare_data(todo: list[Cell], spec: SweepSpec) -> None:
    """Generate the synthetic world where a cell needs it and it is missing (local roots only;
    once, on the driver, before trials start racing for it)."""
    from perl_core.train import ensure_synthetic_data

    configs = [c.config for c in todo] + ([spec.base_config()] if spec.search else [])
    seen: set[tuple] = set()
    for cfg in configs:
        key = (cfg.data_root, cfg.dataset, cfg.eval_datasets)
        if key not in seen:
            seen.add(key)
            if ensure_synthetic_data(cfg):
                say(f"generated the synthetic world under {cfg.data_root}")


# --- Ray ----------------------------------------------------------------------------------------


def init_ray() -> None:
    """Attach to the job's cluster / $RAY_ADDRESS / a local `ray start`, else start Ray here."""
    import ray

    if ray.is_initialized():
        return
    injected = json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}") or "{}")
    job_env = (injected.get("runtime_env") or {}).get("env_vars") or {}
    env = {k: v for k, v in TRIAL_ENV.items() if k not in job_env}  # conflicts are errors
    if not injected:
        # started outside `ray job submit`: trial workers find the code through PYTHONPATH
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get(
            "PYTHONPATH", "")) if p)
    ray.init(runtime_env={"env_vars": env} if env else None, log_to_driver=True)
    keep_credentials_out_of_runtime_envs()


# Ray Tune copies these from the driver's environment into every trainable's runtime_env, and
# Ray's runtime-env agent logs runtime_envs in clear (session logs/runtime_env_agent.log). Trials
# get credentials as every Ray worker does instead: inherited from the environment Ray was started
# in (the driver's for a local Ray; the nodes' cluster/perl.env or Kubernetes Secret on a cluster).
_CREDENTIAL_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                    "AWS_SESSION_TOKEN")


def keep_credentials_out_of_runtime_envs() -> None:
    try:
        from ray.tune.execution import class_cache

        class_cache.ENV_VARS_TO_PROPAGATE.difference_update(_CREDENTIAL_VARS)
    except (ImportError, AttributeError):  # another Ray layout: tests/reliability/test_secrets
        say("warning: could not stop Ray Tune from copying AWS credentials into runtime_envs "
            "(Ray's session logs may show them)")


def ray_job_id() -> str:
    """The job submission id under `ray job submit`, else Ray's job id of this driver."""
    injected = json.loads(os.environ.get(_JOB_CONFIG_ENV, "{}") or "{}")
    sub = (injected.get("metadata") or {}).get("job_submission_id")
    if sub:
        return sub
    import ray

    return ray.get_runtime_context().get_job_id()


def tune_storage(storage: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are; s3:// through
    the same fsspec filesystem the records use (so a custom endpoint reaches Tune too)."""
    path = f"{storage.rstrip('/')}/tune"
    if "://" not in path:
        return path, None
    import pyarrow.fs

    fs, bare = tracking._fs(path)
    return bare, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def _missing_checkpoints(tuner: Any) -> list[str]:
    """Paths of the latest trial checkpoints a restored Tuner's state refers to that its storage
    does not hold (a checkpoint whose upload was cut off by a storage outage)."""
    return [r.checkpoint.path for r in tuner.get_results()
            if r.checkpoint is not None and not _exists(r.checkpoint.filesystem, r.checkpoint.path)]


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _tuner(trainable: Any, name: str, spec: SweepSpec, param_space: dict[str, Any],
           tune_config: Any, rerun: bool) -> Any:
    """Restore an interrupted identical submission, else a fresh Tuner (old state removed)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    storage_path, fs = tune_storage(spec.storage)
    path = f"{storage_path}/{name}"
    exp_fs, exp_path = (fs, path) if fs is not None else (None, path)
    done_marker = f"{path}/perl_phase_complete.json"
    if not rerun and tune.Tuner.can_restore(path, storage_filesystem=fs) and \
            not _exists(exp_fs, done_marker):
        say(f"resuming the interrupted Tune experiment {name} (Tune may warn that it cannot "
            f"fetch metrics of the trials that had not started: harmless)")
        try:
            tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                       restart_errored=True, storage_filesystem=fs)
            missing = _missing_checkpoints(tuner)
            if not missing:
                return tuner, done_marker
            # Tune would try to resume these trials from a checkpoint that is not there and fail
            # them ("does not exist on storage anymore"); finished cells are skipped anyway
            say(f"not resuming {name}: {len(missing)} trial checkpoint(s) its state refers to "
                f"are not in storage (lost in a storage outage?), e.g. {missing[0]}; "
                f"starting afresh")
        except Exception as e:  # incompatible or corrupt state: start afresh
            say(f"cannot restore {name} ({type(e).__name__}: {e}); starting afresh")
    _remove(exp_fs, exp_path)
    run_config = tune.RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[progress_printer(), JsonLoggerCallback()], verbose=0)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config), done_marker


def _exists(fs: Any, path: str) -> bool:
    if fs is None:
        return os.path.exists(path)
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _remove(fs: Any, path: str) -> None:
    import shutil

    if fs is None:
        shutil.rmtree(path, ignore_errors=True)
    elif _exists(fs, path):
        fs.delete_dir(path)


def _mark_complete(fs_path: str, spec: SweepSpec) -> None:
    storage_path, fs = tune_storage(spec.storage)
    data = json.dumps({"completed": time.time()}).encode()
    if fs is None:
        with open(fs_path, "wb") as f:
            f.write(data)
    else:
        with fs.open_output_stream(fs_path) as f:
            f.write(data)


def _trainable(spec: SweepSpec, context: dict[str, Any]) -> Any:
    from ray import tune

    from pipeline.trainable import train_cell

    return tune.with_resources(tune.with_parameters(train_cell, context=context),
                               {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def _trial_name(trial: Any) -> str:
    cell = trial.config.get("cell")
    return cell["name"] if isinstance(cell, dict) else f"hpo_{trial.trial_id}"


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # short and unique (cell names contain '/')


# --- phases ---------------------------------------------------------------------------------------


def run_grid(spec: SweepSpec, todo: list[Cell], context: dict[str, Any],
             args: argparse.Namespace, out: Outcome) -> None:
    from ray import tune

    context = {**context, "phase": "final"}
    cells_ = [{"name": c.name, "config": c.config.to_dict(), "arm": c.arm} for c in todo]
    # Named after the whole grid (not the remaining cells), so that an interrupted identical
    # submission finds and restores this experiment.
    name = (f"{tracking.experiment_slug(spec.experiment)}-final-"
            f"{_digest(sorted(context['grid_hashes']), context['match_code'])}")
    tuner, marker = _tuner(
        _trainable(spec, context), name, spec, {"cell": tune.grid_search(cells_)},
        tune.TuneConfig(max_concurrent_trials=args.max_concurrent, reuse_actors=True,
                        trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
        args.rerun)
    say(f"grid phase: {len(todo)} trial(s), {spec.resources.cpu:g} CPU / "
        f"{spec.resources.gpu:g} GPU each")
    grid = _tune_fit(tuner, "grid", spec, out)
    if grid is None:
        say("the cells are read from MLflow instead")
        collect_from_mlflow(todo, out, context)
        return  # not marked complete: the next identical submission resumes the experiment
    _mark_complete(marker, spec)
    collect(grid, out, context)


def _tune_fit(tuner: Any, phase: str, spec: SweepSpec, out: Outcome) -> Any | None:
    """`tuner.fit()`, or None with `out.storage_error` set when Tune itself stops (seen: its
    storage unreachable when it saves its state). A failing trial does not raise here: it is a
    FAILED result in the grid."""
    try:
        return tuner.fit()
    except Exception as e:
        out.storage_error = (f"the {phase} phase stopped: Tune raised {type(e).__name__}: "
                             f"{tracking._short_error(e)} (its state is under "
                             f"{spec.storage.rstrip('/')}/tune)")
        say(f"error: {out.storage_error}")
        return None


def run_search(spec: SweepSpec, tracker: tracking.Tracker, exp_id: str,
               context: dict[str, Any], args: argparse.Namespace, out: Outcome,
               match_code: str | None) -> None:
    """Optuna over spec.search.space on top of `fixed`, in a persistent study (pipeline.study):
    a re-submission resumes it and runs only the missing samples; finished samples in MLflow
    that the study lacks are added to it as evaluated."""
    from ray import tune

    from pipeline import study as st
    from pipeline.spec import cell_name

    search = spec.search
    assert search is not None
    base = spec.base_config()
    fields_ = list(search.space)
    st.quiet_optuna()
    sf = st.StudyFile.of(spec.storage, spec.experiment)
    name = st.study_name(spec.name, cell_name(base), base.config_hash(), search, match_code)
    prior = [] if args.rerun else _prior_samples(tracker, exp_id, spec, base, fields_,
                                                 search.metric, match_code)
    study = _resume_study(sf, name, base, prior, search, fresh=args.rerun)
    done = len(_study_samples(study, base))
    remaining = max(0, search.num_samples - done)
    say(f"search phase: {done} earlier sample(s) of {search.num_samples}, {remaining} to run "
        f"(Optuna TPE, seed {search.seed}, selecting on {search.metric}, {search.mode})")
    _tag_search(tracker, context, sf, name, search)
    if remaining:
        ctx = {**context, "phase": "hpo", "base_config": base.to_dict(),
               "search_fields": fields_, "base_name": cell_name(base)}
        concurrent = args.max_concurrent or search.max_concurrent
        tune_name = f"{tracking.experiment_slug(spec.experiment)}-hpo-{_digest(name, done)}"
        tuner, marker = _tuner(
            _trainable(spec, ctx), tune_name, spec, {},
            tune.TuneConfig(search_alg=_searcher(sf, name, search, len(study.trials)),
                            num_samples=remaining, max_concurrent_trials=concurrent,
                            reuse_actors=True, trial_name_creator=_trial_name,
                            trial_dirname_creator=_trial_dirname),
            args.rerun)
        grid = _tune_fit(tuner, "search", spec, out)
        if grid is None:  # finished samples are in the study and MLflow; the next one resumes
            _push_study(sf)
            return
        _mark_complete(marker, spec)
        collect(grid, out, ctx)
        study = st.open_study(sf, name, search.mode)
        st.close_orphans(study)  # trials of a killed driver that this run did not resume
    _push_study(sf)
    out.hpo_best = _study_best(study)
    say(f"study {name!r} in {tracking.redact_uri(sf.location)}; browse it with "
        f"`optuna-dashboard {sf.url}`" + (" (the driver's local copy)" if sf.remote else ""))


def _resume_study(sf: Any, name: str, base: Any, prior: list[tuple[dict, float, str, str]],
                  search: Any, fresh: bool) -> Any:
    """Open (or create) the study and add the MLflow samples it does not hold yet."""
    from pipeline import study as st

    try:
        sf.pull()
    except Exception as e:  # refilled from MLflow below; uploaded again after each sample
        say(f"warning: cannot download the study file {tracking.redact_uri(sf.location)} "
            f"({type(e).__name__}: {tracking._short_error(e)}); starting a new local copy")
    study = st.open_study(sf, name, search.mode, fresh=fresh)
    had, existed = _study_samples(study, base), bool(study.trials)
    before, space = len(had), st.optuna_space(search)
    for sample, value, run_id, cell in prior:
        h = _sample_hash(base, sample)
        if h in had:  # the study already holds it (told by the searcher that ran it)
            continue
        study.add_trial(st.sample_trial(sample, value, space, {
            "mlflow_run_id": run_id, "cell": cell, "added_from": "mlflow"}))
        had[h] = value
    added = len(had) - before
    where = tracking.redact_uri(sf.location)
    if existed:
        say(f"resuming study {name!r} with {len(had)} finished samples ({before} in the study "
            f"file, {added} added from MLflow) at {where}")
    else:
        say(f"new study {name!r} at {where}" +
            (f" with {added} finished sample(s) from MLflow" if added else ""))
    return study


def _searcher(sf: Any, name: str, search: Any, n_trials: int) -> Any:
    """OptunaSearch on the persistent study. TPE is seeded with seed + the study's trial count:
    a resumed study would otherwise replay the first submission's random start-up samples."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from pipeline import study as st

    searcher = _final_only(OptunaSearch)(
        space=st.optuna_space(search), metric=search.metric, mode=search.mode,
        sampler=optuna.samplers.TPESampler(seed=search.seed + n_trials),
        study_name=name, storage=optuna.storages.RDBStorage(sf.url))
    searcher.perl_study_file = sf  # uploaded after each finished sample (s3://)
    return searcher


def _final_only(searcher_cls: type) -> type:
    """The searcher, told only of results that carry its metric: progress and checkpoint reports
    (which have no validation number yet) would otherwise raise KeyError in OptunaSearch. Each
    finished sample's study trial gets the MLflow run id and cell name (shown by the dashboard),
    and the study file is uploaded when it lives on object storage."""

    class FinalOnly(searcher_cls):
        perl_study_file = None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            ot_trial = self._ot_trials.get(trial_id)  # (OptunaSearch's own map)
            for k in ("mlflow_run_id", "cell"):
                if ot_trial is not None and result and result.get(k):
                    try:
                        ot_trial.set_user_attr(k, str(result[k]))
                    except Exception:  # already finished (a duplicate completion)
                        pass
            super().on_trial_complete(trial_id, result, error)
            if self.perl_study_file is not None:
                _push_study(self.perl_study_file)

    return FinalOnly


def _push_study(sf: Any) -> None:
    try:
        sf.push()
    except Exception as e:  # the MLflow runs refill the study at the next submission
        say(f"warning: cannot upload the study file to {tracking.redact_uri(sf.location)} "
            f"({type(e).__name__}: {tracking._short_error(e)})")


def _tag_search(tracker: tracking.Tracker, context: dict[str, Any], sf: Any, name: str,
                search: Any) -> None:
    """Where the study is, on the parent run: the aggregate reads it from there."""
    from pipeline import study as st

    try:
        tracker.set_tags(context["parent_run_id"], {
            "search_study": name, "search_study_file": tracking.redact_uri(sf.location),
            "search_space": st.space_json(search), "search_metric": search.metric,
            "search_mode": search.mode})
    except Exception as e:  # the study and the runs are still there; only the link is missing
        say(f"warning: could not tag the parent run with the study: {tracking._short_error(e)}")


def _sample_hash(base: Any, sample: dict[str, Any]) -> str:
    from perl_core.config import TrainConfig

    return TrainConfig.from_dict({**base.to_dict(), **sample}).config_hash()  # as the trial


def _study_samples(study: Any, base: Any) -> dict[str, float]:
    """{config hash: objective} of the study's COMPLETE trials (distinct samples)."""
    from optuna.trial import TrialState

    return {_sample_hash(base, t.params): t.value
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def _study_best(study: Any) -> dict[str, Any] | None:
    try:
        t = study.best_trial
    except ValueError:  # no COMPLETE trial
        return None
    return {"value": t.value, "cell": t.user_attrs.get("cell", f"study trial {t.number}"),
            **t.params}


def _prior_samples(tracker: tracking.Tracker, exp_id: str, spec: SweepSpec, base: Any,
                   fields_: list[str], metric: str, code: str | None
                   ) -> list[tuple[dict, float, str, str]]:
    """(sample, metric, run id, cell) of FINISHED hpo-phase runs of this sweep on the same
    fixed settings."""
    flt = f"attributes.status = 'FINISHED' and tags.phase = 'hpo' and tags.sweep = '{spec.name}'"
    if code is not None:
        flt += f" and tags.code_version = '{code}'"
    from perl_core.config import TrainConfig

    out = []
    for r in tracker.search(exp_id, flt):
        try:
            cfg = TrainConfig.from_record(dict(r.data.params))
        except ValueError:
            continue
        if metric not in r.data.metrics:
            continue
        # the same experiment apart from the searched fields?
        if cfg.replace(**{f: getattr(base, f) for f in fields_}).config_hash() != \
                base.config_hash():
            continue
        sample = {f: getattr(cfg, f) for f in fields_}
        if not _in_space(sample, spec.search):
            continue
        out.append((sample, float(r.data.metrics[metric]), r.info.run_id,
                    r.data.tags.get("cell", "")))
    return out


def _in_space(sample: dict[str, Any], search: Any) -> bool:
    for name, p in search.space.items():
        v = sample[name]
        if p.type == "choice":
            if v not in p.values:
                return False
        elif not p.low <= v <= p.high:
            return False
    return True


def collect(grid: Any, out: Outcome, context: dict[str, Any]) -> None:
    """Sort a ResultGrid's trials into finished / skipped / failed (with the reason)."""
    reasons = _mlflow_failures(context)
    # a restored Tune experiment also lists trials that finished before the interruption; those
    # cells were found FINISHED in MLflow at the start and are counted there already
    counted = {c.name for c in out.done_before}
    for r in grid:
        cfg = r.config or {}
        name = (cfg.get("cell") or {}).get("name") or (r.metrics or {}).get("cell") or \
            f"hpo trial {(r.metrics or {}).get('trial_id', '?')}"
        if name in counted:
            continue
        if r.error is not None:
            reason = reasons.get(name) or _first_line(str(r.error))
            out.failed.append((name, reason))
        elif (r.metrics or {}).get("skipped"):
            out.skipped.append(name)
        elif (r.metrics or {}).get("done"):
            out.finished.append(name)
            if (r.metrics or {}).get("mlflow_logged") == 0.0:
                out.unlogged.append(name)
        else:
            out.failed.append((name, "the trial ended without a result (stopped or lost)"))


def collect_from_mlflow(todo: list[Cell], out: Outcome, context: dict[str, Any]) -> None:
    """Sort the cells by their latest run under this submission's parent when Tune's own
    result grid is lost: FINISHED -> finished, FAILED -> failed with its reason, none or still
    RUNNING -> failed as not finished (the next submission runs them)."""
    try:
        tracker = tracking.Tracker(context["tracking_uri"])
        runs = tracker.search(context["experiment_id"],
                              f"tags.mlflow.parentRunId = '{context['parent_run_id']}'")
    except Exception:
        runs = []
    latest: dict[str, Any] = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        if r.data.tags.get("cell"):
            latest[r.data.tags["cell"]] = r
    for c in todo:
        r = latest.get(c.name)
        if r is not None and r.info.status == "FINISHED":
            out.finished.append(c.name)
        elif r is not None and r.info.status == "FAILED":
            out.failed.append((c.name, _first_line(r.data.tags.get("status_detail", ""))))
        else:
            out.failed.append((c.name, "not finished when the grid phase stopped"))


def _mlflow_failures(context: dict[str, Any]) -> dict[str, str]:
    """cell -> status_detail of its latest FAILED run under this submission's parent."""
    try:
        tracker = tracking.Tracker(context["tracking_uri"])
        runs = tracker.search(context["experiment_id"],
                              f"tags.mlflow.parentRunId = '{context['parent_run_id']}' and "
                              f"attributes.status = 'FAILED'")
    except Exception:
        return {}
    out = {}
    for r in sorted(runs, key=lambda r: r.info.start_time or 0):
        cell = r.data.tags.get("cell")
        if cell:
            out[cell] = _first_line(r.data.tags.get("status_detail", ""))
    return out


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # Tune wraps trial errors; the last "Error: ..." line is the cause
    for ln in reversed(lines):
        if "Error" in ln.split(":", 1)[0] or "Exception" in ln.split(":", 1)[0]:
            return ln[:500]
    return (lines[0] if lines else "unknown error")[:500]


# --- progress and summary -------------------------------------------------------------------------


class _Heartbeat:
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


def _progress_printer_cls():
    import atexit
    import sys

    from ray import tune

    from pipeline.status import progress_from_metrics, progress_line, progress_table
    from pipeline.trainable import PROGRESS_KEYS

    class ProgressPrinter(tune.Callback):
        """One line per finished/failed trial, a status line every 30 s, and each running trial's
        progress (cell, step/total, epoch, loss, elapsed; from the trainable's reports): on a
        terminal a transient rich.live table refreshed about once a second; otherwise (job logs,
        CI) one `progress: <cell>: ...` line per running trial at most every
        $PERL_PROGRESS_EVERY_S (30 s), at most MAX_LINES of them, so logs stay readable."""

        MAX_LINES = 20

        def __init__(self) -> None:
            self.t0, self.last, self.done, self.failed = time.time(), 0.0, 0, 0
            self.every = float(os.environ.get("PERL_PROGRESS_EVERY_S") or 30)
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
            what = "skipped (already FINISHED)" if m.get("skipped") else \
                ", ".join(f"{k} {m[k]:.2f}" for k in ("hm", "target_avg", "val/acc", "all/acc")
                          if isinstance(m.get(k), (int, float)))
            say(f"[{self.done + self.failed}/{len(trials)}] done   "
                f"{m.get('cell') or _trial_name(trial)}"
                f"{': ' + what if what else ''} ({time.time() - self.t0:.0f} s)")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.failed += 1
            say(f"[{self.done + self.failed}/{len(trials)}] FAILED {_trial_name(trial)}")

        def on_step_end(self, iteration, trials, **info):
            self._show_progress(trials)
            if time.time() - self.last < 30:
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
                        _trial_name(t), report, at, self.started.setdefault(t.trial_id, now)))
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

    return ProgressPrinter


def progress_printer() -> Any:
    return _progress_printer_cls()()  # the class is built lazily: ray is imported only when used


def summary(spec: SweepSpec, uri: str, out: Outcome) -> None:
    say("")
    say(f"=== {spec.name}: {len(out.finished)} finished, "
        f"{len(out.done_before) + len(out.skipped)} skipped (already FINISHED), "
        f"{len(out.failed)} failed ===")
    for name, reason in out.failed:
        say(f"  FAILED {name}: {reason}")
    if out.hpo_best:
        best = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in out.hpo_best.items())
        say(f"  best search sample: {best}")
    say(f"runs: MLflow experiment {spec.experiment!r} at {tracking.redact_uri(uri)}")
    say(f"records: {tracking.records_dir(spec.storage, spec.experiment)}")
    if out.storage_error:
        say(f"  STORAGE ERROR: {out.storage_error}. Every FINISHED run has its record; once "
            f"{spec.storage} is reachable, run `python -m pipeline.run {spec.source}` again: it "
            f"resumes the sweep and runs the cells that did not finish.")
    if out.tracking_error:
        say(f"  MLFLOW UNREACHABLE at the end of the sweep ({out.tracking_error}): "
            f"{len(out.unlogged)} finished cell(s) of this submission are only in the storage "
            f"records above (config, metrics, weights). Nothing is lost: the next "
            f"`python -m pipeline.run {spec.source}` logs them automatically, or run "
            f"`python -m pipeline.run {spec.source} --replay` once the server is back.")
    if uri.startswith("sqlite:"):
        say(f"browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        say(f"browse: {tracking.redact_uri(uri)}")
    say("tables: python -m pipeline.aggregate --experiment " + spec.experiment)


if __name__ == "__main__":
    raise SystemExit(main())
