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
import json
import os
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

from pipeline import layout, tracking  # noqa: E402
from pipeline.collect import Outcome  # noqa: E402
from pipeline.context import trial_context  # noqa: E402
from pipeline.env import REPO, code_version  # noqa: E402
from pipeline.grid import run_grid  # noqa: E402
from pipeline.search import run_search  # noqa: E402
from pipeline.spec import (GridCell, SpecError, SweepSpec, add_set_argument, cells,  # noqa: E402
                           group_order, load_spec, locate_sweep, preflight, resolve_tracking_uri)
from pipeline.submission import Submission, lost_errors  # noqa: E402

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
    ap.add_argument("--gpu-memory", default=None, metavar="SIZE",
                    help="with --dry-run: warn when resources.gpu puts more trials on one GPU "
                         "than this much memory holds (e.g. 40GB), by the expected peak memory "
                         "per trial (pipeline/estimate.py)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Check the sweep, then a dry run, a zero-shot check, or a submission (`submit`)."""
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
        refused = check_before_running(spec, uri, grid)
        if refused:
            say(refused)
            return 2
    code = code_version()
    if args.dry_run:
        return dry_run(spec, grid, uri, None if args.ignore_code_version else code.version,
                       args.rerun, args.bench, args.trial_overhead_s, args.gpu_memory)
    if args.bench or args.trial_overhead_s is not None or args.gpu_memory:
        say("--bench, --trial-overhead-s and --gpu-memory go with --dry-run (they estimate, "
            "they run nothing)")
        return 2
    return submit(args, spec, uri, grid, code)


def check_before_running(spec: SweepSpec, uri: str, grid: list[GridCell]) -> str:
    """Why the sweep cannot run here ("" when it can): `spec.preflight`, and on a Ray cluster
    the storage and tracking store every node must reach."""
    try:
        preflight(spec, [c.config for c in grid] + ([spec.base_config()] if spec.search else []))
        from pipeline import cluster_check

        if cluster_check.joins_cluster():  # (a Ray this driver starts is one node)
            init_ray()  # before any MLflow run: the nodes decide what may be node-local
            import ray

            cluster_check.refuse_node_local(spec, uri, ray.nodes())
    except SpecError as e:
        return str(e)
    return ""


def submit(args: argparse.Namespace, spec: SweepSpec, uri: str, grid: list[GridCell],
           code: Any) -> int:
    """One submission: its parent run around the start-up recovery and the phases."""
    tracker = tracking.Tracker(uri)
    try:
        tracker.check()
        exp_id = tracker.experiment_id(spec.experiment)
    except (tracking.TrackingUnavailable, RuntimeError) as e:
        say(f"{spec.source}: {e}")
        return 2
    try:
        sub = Submission.start(tracker, exp_id, spec, uri, len(grid), code, args.sweep,
                               args.replay)
    except Exception as e:  # MLflow went away right after the check: nothing has run yet
        say(f"{spec.source}: MLflow tracking at {layout.redact_uri(uri)} stopped answering "
            f"before the sweep started ({type(e).__name__}: {tracking.short_error(e)}); "
            f"nothing was run")
        return 2
    with sub:
        try:
            sub.recover()
            if args.replay:
                return sub.replay_done()
            done_code = None if args.ignore_code_version else code.version
            finished = {} if args.rerun else sub.finished(grid, done_code)
        except lost_errors() as e:
            return sub.lost(e, args.replay)
        run_phases(sub, args, grid, sub.plan(grid, finished), code)
        sub.replay_records()
    summary(spec, uri, sub.outcome)
    return sub.outcome.exit_code()


def run_phases(sub: Submission, args: argparse.Namespace, grid: list[GridCell],
               todo: list[GridCell], code: Any) -> None:
    """The grid phase over `todo`, then the search phase; their results go to `sub.outcome`."""
    spec = sub.spec
    job = ""
    if todo or spec.search is not None:
        prepare_data(todo, spec)
        init_ray()
        job = ray_job_id()
        # (the world exists now) the datasets the trials read: the cells', the search's base
        tracking.grid_data_digests([c.config for c in todo] +
                                   ([spec.base_config()] if spec.search else []))
    context = trial_context(spec, sub.uri, sub.exp_id, sub.parent, code, args, ray_job_id=job,
                            user=sub.user, varied_fields=tuple(spec.varied_fields),
                            known_data=tracking.known_digests())
    if todo:
        sub.outcome.add(run_grid(spec, grid, todo, context, args.max_concurrent, args.rerun))
        sub.kill_unfinished_children()
    if spec.search is not None:
        sub.outcome.add(run_search(spec, sub.tracker, context, args.max_concurrent, args.rerun))


# --- dry run -------------------------------------------------------------------------------------


def _finished_for_dry_run(spec: SweepSpec, grid: list[GridCell], uri: str,
                          code_version: str | None) -> dict[str, Any]:
    """config hash -> FINISHED run of the cells done, read without creating anything."""
    if not layout.store_exists(uri):  # (a dry run must not create a SQLite file)
        return {}
    tracker = tracking.Tracker(uri)
    try:
        tracker.check()
        exp = tracker.client.get_experiment_by_name(spec.experiment)
        if exp is not None:
            return tracker.finished_by_hash(
                exp.experiment_id, phase=layout.GRID_PHASE, code_version=code_version, warn=say,
                data=tracking.grid_data_digests([c.config for c in grid], say))
    except Exception as e:  # a dry run still shows the work; a real run refuses (exit 2)
        say(f"warning: {spec.source}: tracking store {layout.redact_uri(uri)} not "
            f"readable ({type(e).__name__}): every cell is shown as todo; a real run "
            f"would stop here")
    return {}


def dry_run(spec: SweepSpec, grid: list[GridCell], uri: str, done_code_version: str | None,
            rerun: bool, bench_file: str | None = None,
            overhead_s: float | None = None, gpu_memory: str | None = None) -> int:
    from pipeline import estimate

    bench = None
    if overhead_s is not None and overhead_s < 0:
        say(f"--trial-overhead-s must be >= 0, got {overhead_s:g}")
        return 2
    try:
        gpu_gb = None if gpu_memory is None else estimate.parse_gpu_memory(gpu_memory)
    except ValueError as e:
        say(str(e))
        return 2
    if bench_file:
        try:
            bench = estimate.load_bench(bench_file)
        except estimate.EstimateError as e:
            say(str(e))
            return 2
    finished = {} if rerun else _finished_for_dry_run(spec, grid, uri, done_code_version)
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
    say(f"experiment {spec.experiment!r} at {layout.redact_uri(uri)}; "
        f"storage {layout.redact_uri(spec.storage)}; "
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
    rows, _ = estimate.memory_by_dataset(todo)  # (cells of unknown size: said by report above)
    estimate.memory_report(rows, say, spec.resources.gpu, gpu_gb)
    return 0


def _cache_enabled(spec: SweepSpec) -> bool:
    cache = getattr(spec, "cache", None)  # the sweep's `cache:` block (feature cache, default on)
    return bool(getattr(cache, "enabled", True))


def prepare_data(todo: list[GridCell], spec: SweepSpec) -> None:
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


# --- summary ---------------------------------------------------------------------------------


def summary(spec: SweepSpec, uri: str, out: Outcome) -> None:
    say("")
    say(f"=== {spec.name}: {len(out.finished)} finished, "
        f"{out.num_skipped} skipped (already FINISHED), "
        f"{len(out.failed)} failed ===")
    for name, reason in out.failed:
        say(f"  FAILED {name}: {reason}")
    if out.search_best:
        best = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in out.search_best.items())
        say(f"  best search sample: {best}")
    say(f"runs: MLflow experiment {spec.experiment!r} at {layout.redact_uri(uri)}")
    say(f"records: {layout.redact_uri(layout.records_dir(spec.storage, spec.experiment))}")
    if out.storage_error:
        say(f"  STORAGE ERROR: {out.storage_error}. Every FINISHED run has its record; once "
            f"{layout.redact_uri(spec.storage)} is reachable, run `python -m pipeline.run "
            f"{spec.source}` again: it resumes the sweep and runs the cells that did not finish.")
    if out.tracking_error:
        say(f"  MLFLOW UNREACHABLE at the end of the sweep ({out.tracking_error}): "
            f"{len(out.unlogged)} finished cell(s) of this submission are only in the storage "
            f"records above (config, metrics, weights). Nothing is lost: the next "
            f"`python -m pipeline.run {spec.source}` logs them automatically, or run "
            f"`python -m pipeline.run {spec.source} --replay` once the server is back.")
    if uri.startswith("sqlite:"):
        say(f"browse: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    else:
        say(f"browse: {layout.redact_uri(uri)}")
    say("tables: python -m pipeline.aggregate --experiment " + spec.experiment)


if __name__ == "__main__":
    raise SystemExit(main())
