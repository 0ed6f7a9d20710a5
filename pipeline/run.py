"""`python -m pipeline.run SWEEP.yaml`: the Ray Tune driver of one sweep.

    python -m pipeline.run SWEEP.yaml [--dry-run] [--rerun] [--replay] [--max-concurrent N]
                                      [--tracking-uri URI] [--ignore-code-version]
    python -m pipeline.run SWEEP.yaml --zero-shot-check [--tolerance P]   # step 0 only, no Ray
    python -m pipeline.run SUITE.yaml | SWEEP.yaml SWEEP.yaml ... [--dry-run]  # one after another

Several sweep files, or a suite file (sweeps/paper.yaml: the whole paper), run one after
another (`pipeline.suite`), each as below; each distinct training of them runs once
(`pipeline.reuse`).

1. Validate the YAML (`pipeline.spec`), expand the grid into cells, hash them.
2. MLflow: get-or-create the experiment, mark orphaned RUNNING runs of earlier submissions
   KILLED, replay trial records that are in storage but not in MLflow (outage recovery), then
   look up which hashes already have a FINISHED run (same code version unless
   --ignore-code-version): those cells are skipped (--rerun runs them again).
   --dry-run stops here and prints the cells (name, hash, done/todo); --replay stops after the
   replay. The cells left are looked up in the whole store (`pipeline.reuse`, not with --rerun
   or --no-reuse): a FINISHED run of the same config hash in another experiment is linked here
   (`pipeline.links`, before any trial), one of the same training hash has its weights evaluated
   by this cell's trial instead of training again.
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

from pipeline import layout, reuse, tracking  # noqa: E402
from pipeline.collect import Outcome  # noqa: E402
from pipeline.context import trial_context  # noqa: E402
from pipeline.env import REPO, code_version  # noqa: E402
from pipeline.grid import run_grid  # noqa: E402
from pipeline.links import link_cells  # noqa: E402
from pipeline.search import run_search  # noqa: E402
from pipeline.spec import (GridCell, SpecError, SweepSpec, add_set_argument, cells,  # noqa: E402
                           group_order, load_spec, locate_sweep, preflight, resolve_tracking_uri)
from pipeline.submission import Submission, lost_errors  # noqa: E402
from pipeline.suite import SuiteError, sweep_files  # noqa: E402

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
    ap.add_argument("sweeps", nargs="+", metavar="SWEEP",
                    help="sweep YAML (sweeps/*.yaml); several, or one suite file "
                         "(sweeps/paper.yaml), run one after another (pipeline/suite.py)")
    add_set_argument(ap)
    ap.add_argument("--dry-run", action="store_true",
                    help="print the cells (name, hash, done/todo) and totals; start no trial")
    ap.add_argument("--rerun", action="store_true",
                    help="run every cell again, even those with a FINISHED run")
    ap.add_argument("--no-reuse", action="store_true",
                    help="train every cell not FINISHED in its own experiment, even where "
                         "another experiment of the store has its run or its training "
                         "(default: link / evaluate those, pipeline/reuse.py)")
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
    """One sweep (`run_sweep`), or several / a suite file one after another (`run_suite`)."""
    args = build_parser().parse_intermixed_args(argv)  # (options between sweep files too)
    if args.max_concurrent is not None and args.max_concurrent < 1:
        say("--max-concurrent must be >= 1")
        return 2
    try:
        label, files = sweep_files(args.sweeps, lambda s: locate_sweep(s, say))
    except SuiteError as e:
        say(str(e))
        return 2
    if len(files) > 1:
        return run_suite(args, label, files)
    args.sweep = files[0]
    return run_sweep(args)


def run_sweep(args: argparse.Namespace, loaded: tuple[SweepSpec, str] | None = None) -> int:
    """Check the sweep (`loaded`: its spec and tracking URI, already read by a suite), then a
    dry run, a zero-shot check, or a submission (`submit`)."""
    try:
        spec = loaded[0] if loaded else load_spec(args.sweep, overrides=args.overrides)
        uri = loaded[1] if loaded else resolve_tracking_uri(spec, args.tracking_uri)
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
    if args.dry_run:
        return dry_run(args, [(spec, grid)], uri)
    code = code_version()
    if args.bench or args.trial_overhead_s is not None or args.gpu_memory:
        say("--bench, --trial-overhead-s and --gpu-memory go with --dry-run (they estimate, "
            "they run nothing)")
        return 2
    return submit(args, spec, uri, grid, code)


# --- a suite -------------------------------------------------------------------------------------


def load_suite_specs(args: argparse.Namespace, files: list[str]
                     ) -> tuple[list[SweepSpec], str] | str:
    """Every sweep of the suite checked (and their one tracking store) before any runs, or
    every problem found as one message."""
    specs, problems, uris = [], [], {}
    for f in files:
        try:
            spec = load_spec(f, overrides=args.overrides)
            uris.setdefault(resolve_tracking_uri(spec, args.tracking_uri), []).append(f)
            specs.append(spec)
        except SpecError as e:
            problems.append(str(e))
    if len(uris) > 1:  # reuse looks in one store; a suite over several would train twice
        problems.append("the sweeps of a suite share one tracking store (--tracking-uri); "
                        "these name different ones: " + "; ".join(
                            f"{layout.redact_uri(u)}: {', '.join(fs)}" for u, fs in uris.items()))
    return "\n".join(problems) if problems else (specs, next(iter(uris)))


def run_suite(args: argparse.Namespace, label: str, files: list[str]) -> int:
    """The sweeps one after another (`pipeline.suite`); stops at a sweep that cannot run (2)
    or loses its tracking store (3), which is then the suite's exit code; else 1 when a cell of
    any sweep failed, 0 when every cell of every sweep finished."""
    if args.zero_shot_check or args.replay:
        say("--zero-shot-check and --replay take one sweep file")
        return 2
    loaded = load_suite_specs(args, files)
    if isinstance(loaded, str):
        say(loaded)
        say(f"suite {label}: nothing was run")
        return 2
    specs, uri = loaded
    if args.dry_run:
        return dry_run(args, [(s, group_order(cells(s))) for s in specs], uri, suite=label)
    refused = [r for r in (check_before_running(s, uri, group_order(cells(s))) for s in specs)
               if r]  # every sweep's storage, checkpoint and data checked before the first runs
    if refused:
        say("\n".join(refused))
        say(f"suite {label}: nothing was run")
        return 2
    codes: dict[str, int] = {}
    for i, (f, spec) in enumerate(zip(files, specs), 1):
        say(f"\n=== suite {label}: sweep {i}/{len(files)}: {f} ===")
        codes[f] = run_sweep(argparse.Namespace(**{**vars(args), "sweep": f}), (spec, uri))
        if codes[f] in (2, 3):
            break
    say(f"\n=== suite {label}: {len(codes)} of {len(files)} sweeps run ===")
    for f in files:
        say(f"  {f}: " + (f"exit {codes[f]}" if f in codes else "not run"))
    return max(codes.values())


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
            todo = sub.todo(grid, finished)
            plans = {} if args.rerun or args.no_reuse else sub.reuse_plans(todo, done_code,
                                                                           code.version)
            todo = link_phase(sub, args, todo, plans, code)
        except lost_errors() as e:  # (before any trial: the link phase raises it too)
            return sub.lost(e, args.replay)
        run_phases(sub, args, grid, todo, plans, code)
        sub.replay_records()
    summary(spec, uri, sub.outcome)
    return sub.outcome.exit_code()


def phase_context(sub: Submission, args: argparse.Namespace, code: Any, job: str = "") -> Any:
    """The grid phase's TrialContext of this submission (`job`: the Ray job, "" before Ray)."""
    spec = sub.spec
    return trial_context(spec, sub.uri, sub.exp_id, sub.parent, code, args, ray_job_id=job,
                         user=sub.user, varied_fields=tuple(spec.varied_fields),
                         known_data=tracking.known_digests())


def link_phase(sub: Submission, args: argparse.Namespace, todo: list[GridCell],
               plans: dict[str, Any], code: Any) -> list[GridCell]:
    """Link the cells planned `link` (in the driver, before Ray: no trial, no job); returns the
    cells left to run, with those whose source could not be copied. MLflow lost: raises
    `TrackingUnavailable` (the submission then stops as before any trial, exit 3)."""
    links = [c for c in todo if c.name in plans and plans[c.name].kind == reuse.LINK]
    if not links:
        return todo
    linked, fallback = link_cells(sub.tracker, phase_context(sub, args, code), links, plans)
    sub.outcome.add(linked)
    return [c for c in todo if c not in links] + fallback


def run_phases(sub: Submission, args: argparse.Namespace, grid: list[GridCell],
               todo: list[GridCell], plans: dict[str, Any], code: Any) -> None:
    """The grid phase over `todo` (trained and `evaluate` cells), then the search phase; their
    results go to `sub.outcome`."""
    spec = sub.spec
    if not todo and spec.search is None:
        return
    prepare_data(todo, spec)
    init_ray()
    # (the world exists now) the datasets the trials read: the cells', the search's base
    tracking.grid_data_digests([c.config for c in todo] +
                               ([spec.base_config()] if spec.search else []))
    ctx = phase_context(sub, args, code, ray_job_id())
    if todo:
        sub.outcome.add(run_grid(spec, grid, todo, ctx, args.max_concurrent, args.rerun, plans))
        sub.kill_unfinished_children()
    if spec.search is not None:
        sub.outcome.add(run_search(spec, sub.tracker, ctx, args.max_concurrent, args.rerun))


# --- dry run -------------------------------------------------------------------------------------


def dry_run(args: argparse.Namespace, sweeps: list[tuple[SweepSpec, list[GridCell]]], uri: str,
            suite: str = "") -> int:
    """`--dry-run` of one sweep, or of the suite `suite` (`pipeline.dryrun`)."""
    from pipeline import dryrun

    try:
        opts = dryrun.Options(args.bench, args.trial_overhead_s, args.gpu_memory)
    except dryrun.DryRunError as e:
        say(str(e))
        return 2
    versions = dryrun.Versions.of(args, code_version().version)
    use_reuse = not (args.rerun or args.no_reuse)
    if suite:
        return dryrun.suite_dry_run(suite, sweeps, uri, versions, args.rerun, use_reuse, opts)
    (spec, grid), = sweeps
    return dryrun.dry_run(spec, grid, uri, versions, args.rerun, use_reuse, opts)


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
        + (f"{len(out.linked)} linked from other experiments, " if out.linked else "")
        + f"{len(out.failed)} failed ===")
    if out.evaluated:
        say(f"  {len(out.evaluated)} cell(s) planned to evaluate the weights of a finished "
            f"training instead of training again (their runs: tag reuse=evaluate; one whose "
            f"weights could not be fetched trained, its trial's log says why)")
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
