"""`python -m pipeline.bench`: the per-trial overhead of the Ray Tune + MLflow path.

    python -m pipeline.bench [--trials 8] [--concurrency 1] [--epochs 1] [--shots 1]
                             [--real-trial-s S | --bench BENCH.json [--classes 100]
                              [--real-shots 16] [--real-batch 4] [--real-epochs 1]
                              [--eval-images N]]
                             [--workdir DIR] [--json] [--set KEY=VALUE ...]

It runs a real sweep of N tiny trials through `pipeline.run.main` (a local Ray started by the
driver, a fresh MLflow SQLite store, the storage records, the feature cache in the work dir):
perl-tiny with the embedded weights on a small synthetic world (ToyShapes), cells K = 1, 2 x
N/2 data seeds; `--set` overrides keys of that sweep as on `pipeline.run` (validated the same
way, before any work), e.g. `--set resources.cpu=2`. Every trial appends its phase times to
`$PERL_TRIAL_TIMINGS` (see `pipeline.trainable`), so that after the sweep:

- `fit_compute_s`: `fit`'s own train + eval time in the trial, checkpoint I/O taken out (the
  trainable's `fit_compute` phase; `train_seconds + eval_seconds` in older timing lines): the
  work, not overhead;
- per trial, in-trial overhead = its wall time (entry of `train_cell` to its last report) minus
  `fit_compute_s`; split into phases: `setup` (config, tracker), `mlflow_lookup` (is the hash
  already FINISHED?), `tags` (tags, cache settings), `mlflow_start` (child run + params),
  `build_model` (projectors around the worker's cached backbone), `fit_other` (fit outside its
  train/eval timers: data splits, optimizer, model.to), `fit_checkpoint` (Tune checkpoints at
  epoch ends), `record` (storage record), `mlflow_log` (metrics, artifacts, end);
- `scheduling`: the gap between a trial's last report and the next trial's entry on the same
  worker process (Tune's result handling, actor reuse, the next trial's start);
- `per_trial_overhead_s` = in-trial overhead + the scheduling gap before it, for every trial
  that is not the first on its worker (mean, p90): the steady-state cost of one more trial;
- `startup_s` (driver start to the first trial's entry: spec, MLflow setup, Ray start, worker
  start, imports, backbone build) and `teardown_s` (last exit to the driver's return), paid once
  per submission, and `amortized_overhead_s` = (wall x concurrency - sum of fit compute) / N;
- `overhead_fraction_of_real_trial` = per_trial_overhead_s / a real-size trial time: given with
  `--real-trial-s`, or derived from a `perl_core.bench --json` file measured at ViT-B/16
  (`--bench`): steps x train step time (cached text prefix, at `--classes` classes, one of the
  class counts the bench measured) + `--eval-images` / the cached PERL eval rate. With
  `--eval-images 0` (the default) the real trial is training only, i.e. a lower bound of its time
  and an upper bound of the fraction. Without either option the fraction is null: no real-trial
  time is ever invented.

The load average is printed with the figures: on shared cores they are noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

PHASES = ("setup", "mlflow_lookup", "tags", "mlflow_start", "build_model", "fit_other",
          "fit_checkpoint", "record", "mlflow_log")


def sweep_text(*, world: str, storage: str, tracking_uri: str, cache_dir: str, trials: int,
               epochs: int, shots: int, device: str = "cpu", gpu: float = 0) -> str:
    # num_steps before seed: YAML order is K-major, group_order puts the two K of a data seed
    # (which share their training views) back to back, so the run checks that order end to end
    seeds = ", ".join(str(s) for s in range(1, trials // 2 + 1))
    return f"""\
name: pipeline_bench
experiment: bench/pipeline_overhead
description: per-trial overhead of the Ray Tune + MLflow path (python -m pipeline.bench)
fixed:
  dataset: ToyShapes
  arch: perl-tiny
  pretrained: embedded
  data_root: {world}
  shots: {shots}
  epochs: {epochs}
  lr: 1.0e-2
  device: {device}
  eval_batch_size: 64
grid:
  num_steps: [1, 2]
  seed: [{seeds}]
resources: {{cpu: 1, gpu: {gpu:g}}}
storage: {storage}
tracking_uri: {tracking_uri}
max_failures: 0
cache: {{url: {cache_dir}, dtype: float32}}
"""


def p90(xs: Sequence[float]) -> float:
    """The 90th percentile (linear interpolation between order statistics)."""
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = 0.9 * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _stats(xs: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "p90": p90(xs), "min": min(xs), "max": max(xs)}


def read_timings(where: str | Path) -> list[dict[str, Any]]:
    rows = []
    for path in sorted(Path(where).glob("*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["entry_unix"])


def analyse(rows: list[dict[str, Any]], t_start: float, t_end: float,
            concurrency: int) -> dict[str, Any]:
    """Per-trial overhead figures from the trials' timing lines (see the module doc)."""
    if not rows:
        raise RuntimeError("no trial wrote its timings: did the sweep run any trial?")
    last_exit: dict[int, float] = {}
    steady, gaps, first_on_worker = [], [], 0
    for r in rows:
        compute = r["phases"].get("fit_compute", r["train_seconds"] + r["eval_seconds"])
        r["fit_compute_s"] = compute
        r["in_trial_overhead_s"] = (r["exit_unix"] - r["entry_unix"]) - compute
        prev = last_exit.get(r["pid"])
        if prev is None:
            first_on_worker += 1
            r["scheduling_gap_s"] = None
        else:
            gap = r["entry_unix"] - prev
            r["scheduling_gap_s"] = gap
            gaps.append(gap)
            steady.append(r["in_trial_overhead_s"] + gap)
        last_exit[r["pid"]] = r["exit_unix"]
    n = len(rows)
    wall = t_end - t_start
    out: dict[str, Any] = {
        "trials": n, "worker_processes": len(last_exit), "concurrency": concurrency,
        "sweep_wall_s": wall,
        "startup_s": rows[0]["entry_unix"] - t_start,
        "teardown_s": t_end - max(r["exit_unix"] for r in rows),
        "fit_compute_s": _stats([r["fit_compute_s"] for r in rows]),
        "in_trial_overhead_s": _stats([r["in_trial_overhead_s"] for r in rows]),
        "amortized_overhead_s": (wall * concurrency - sum(r["fit_compute_s"] for r in rows)) / n,
    }
    if steady:
        out["per_trial_overhead_s"] = _stats(steady)
        out["steady_state_trials"] = len(steady)
    else:  # one trial per worker: no steady state; the in-trial part is all that is measured
        out["per_trial_overhead_s"] = None
        out["steady_state_trials"] = 0
    breakdown = {p: statistics.fmean(r["phases"].get(p, 0.0) for r in rows) for p in PHASES}
    breakdown["scheduling"] = statistics.fmean(gaps) if gaps else None
    out["breakdown_mean_s"] = breakdown
    out["trial_log"] = [{k: r.get(k) for k in ("cell", "pid", "fit_compute_s",
                                              "in_trial_overhead_s", "scheduling_gap_s")}
                        for r in rows]
    return out


def real_trial_from_bench(path: str | Path, *, classes: int, shots: int, batch: int,
                          epochs: int, eval_images: int) -> tuple[float, str]:
    """(seconds, how) of one real-size trial from a `perl_core.bench --json` file, read and
    checked by `pipeline.estimate.load_bench` (as the dry run reads it): the cached train step
    time measured at exactly `classes` classes and the cached PERL eval rate."""
    from pipeline.estimate import EstimateError, load_bench

    bench = load_bench(str(path))
    if classes not in bench.steps:  # measured counts only: no interpolation for this figure
        raise EstimateError(f"{path}: train_step_s_by_classes has no entry for {classes} "
                            f"classes (measured: {[str(c) for c in sorted(bench.steps)]}); pass "
                            f"--classes with one of those")
    step = bench.step_s(classes, cached=True)
    n_steps = (classes * shots) // batch * epochs
    train_s = n_steps * step
    eval_s = eval_images / bench.eval_cached
    how = (f"{path}: arch {bench.arch}, device {bench.device}: {n_steps} steps "
           f"({classes} classes x {shots} shots / batch {batch} x {epochs} epoch) x "
           f"{step:.4g} s + {eval_images} eval images / {bench.eval_cached:.4g} img/s")
    if "ViT-B-16" not in bench.arch:
        how += f" (WARNING: arch {bench.arch!r} is not ViT-B/16)"
    return train_s + eval_s, how


def run(trials: int = 8, concurrency: int = 1, epochs: int = 1, shots: int = 1,
        workdir: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """One sweep of `trials` tiny trials through `pipeline.run.main` (its keys overridden by
    `overrides`, `--set` strings); the analysed figures. SpecError for a bad override."""
    from perl_core.data.synthetic import generate_world
    from pipeline import run as pipeline_run
    from pipeline.spec import cells, group_order, load_spec
    from pipeline.trainable import TIMINGS_ENV

    own = workdir is None
    work = Path(workdir or tempfile.mkdtemp(prefix="perl-pipeline-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    timings = work / "timings"
    for old in ("timings", "runs", "cache", "mlartifacts"):  # a kept workdir starts cold too
        shutil.rmtree(work / old, ignore_errors=True)
    (work / "mlflow.db").unlink(missing_ok=True)
    try:
        world = work / "world"
        generate_world(world, datasets=["ToyShapes"], sizes={"train": 4, "val": 2, "test": 3})
        sweep = work / "pipeline_bench.yaml"
        sweep.write_text(sweep_text(
            world=str(world), storage=str(work / "runs"),
            tracking_uri=f"sqlite:///{work / 'mlflow.db'}", cache_dir=str(work / "cache"),
            trials=trials, epochs=epochs, shots=shots))
        expected = [c.name for c in group_order(cells(load_spec(sweep, overrides=overrides)))]
        os.environ[TIMINGS_ENV] = str(timings)  # inherited by the local Ray's workers
        load_before = os.getloadavg()
        stamps: dict[str, float] = {}
        t0 = time.time()
        with _stamped(pipeline_run, ("init_ray", "run_grid"), stamps):
            rc = pipeline_run.main([str(sweep), "--max-concurrent", str(concurrency),
                                    *(a for o in overrides for a in ("--set", o))])
        t1 = time.time()
        load_after = os.getloadavg()
        _shutdown_ray()
        if rc != 0:
            raise RuntimeError(f"the bench sweep exited {rc} (see the output above)")
        rows = read_timings(timings)
        out = analyse(rows, t0, t1, concurrency)
        out["startup_breakdown_s"] = _startup_breakdown(stamps, t0, rows)
        out["order_preserved"] = [r["cell"] for r in rows] == expected if concurrency == 1 \
            else None
        out["feature_cache"] = feature_cache_totals(f"sqlite:///{work / 'mlflow.db'}")
        out["load_average_1m"] = {"before": load_before[0], "after": load_after[0]}
        out["cpu_count"] = os.cpu_count()
        out["workdir"] = None if own else str(work)
        return out
    finally:
        os.environ.pop(TIMINGS_ENV, None)
        if own:
            shutil.rmtree(work, ignore_errors=True)


def feature_cache_totals(tracking_uri: str) -> dict[str, float]:
    """The `feature_cache/*` metrics summed over the sweep's runs (hits, misses, per kind, and
    `image_waited`: batches a trial read after waiting for a concurrent trial's fill)."""
    from pipeline import queries

    client = queries.mlflow_client(tracking_uri)
    ids = [e.experiment_id for e in queries.all_experiments(client)]
    totals: dict[str, float] = {}
    for run in queries.all_runs(client, ids):
        for k, v in run.data.metrics.items():
            if k.startswith("feature_cache/"):
                name = k.removeprefix("feature_cache/")
                totals[name] = totals.get(name, 0.0) + v
    return dict(sorted(totals.items()))


@contextlib.contextmanager
def _stamped(module: Any, names: Sequence[str], stamps: dict[str, float]) -> Iterator[None]:
    """Record the wall-clock start/end of module-level functions of the driver while they run
    (pipeline.run's own phases, for the start-up breakdown); restored afterwards."""
    saved = {n: getattr(module, n) for n in names if hasattr(module, n)}

    def wrap(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def timed(*a: Any, **k: Any) -> Any:
            stamps.setdefault(f"{name}_start", time.time())
            try:
                return fn(*a, **k)
            finally:
                stamps[f"{name}_end"] = time.time()
        return timed

    for n, fn in saved.items():
        setattr(module, n, wrap(n, fn))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(module, n, fn)


def _startup_breakdown(stamps: dict[str, float], t0: float,
                       rows: list[dict[str, Any]]) -> dict[str, float | None]:
    """driver (spec, code version, MLflow experiment/parent/orphans/replay, data), Ray start,
    Tune to the first trial's entry (Tune setup, worker process, imports), first trial's
    in-trial overhead (tracker, backbone, cache: once per worker)."""
    first = rows[0]["entry_unix"]
    ray0, ray1 = stamps.get("init_ray_start"), stamps.get("init_ray_end")
    grid0 = stamps.get("run_grid_start")
    return {
        "driver_setup": (ray0 - t0) if ray0 else None,
        "ray_init": (ray1 - ray0) if ray0 and ray1 else None,
        "tune_to_first_trial": (first - grid0) if grid0 else None,
        "first_trial_in_trial_overhead": rows[0]["in_trial_overhead_s"],
    }


def _shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m pipeline.bench",
                                 description="Per-trial overhead of the Ray Tune + MLflow path.")
    ap.add_argument("--trials", type=int, default=8,
                    help="tiny trials in the sweep, even (default 8)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="--max-concurrent of the sweep (default 1: serial, clean gaps)")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per tiny trial (0: eval only)")
    ap.add_argument("--shots", type=int, default=1, help="shots per class of the tiny trials")
    real = ap.add_mutually_exclusive_group()
    real.add_argument("--real-trial-s", type=float, default=None,
                      help="seconds of one real-size trial (measured elsewhere)")
    real.add_argument("--bench", default=None, metavar="FILE",
                      help="a `python -m perl_core.bench --json` file measured at ViT-B/16")
    ap.add_argument("--classes", type=int, default=100,
                    help="with --bench: training classes (one of the counts the bench measured)")
    ap.add_argument("--real-shots", type=int, default=16)
    ap.add_argument("--real-batch", type=int, default=4)
    ap.add_argument("--real-epochs", type=int, default=1)
    ap.add_argument("--eval-images", type=int, default=0,
                    help="with --bench: test images of the real trial (default 0: training only)")
    ap.add_argument("--workdir", default=None, help="keep the sweep, MLflow store and cache here")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    from pipeline.spec import add_set_argument

    add_set_argument(ap)  # on the bench's own generated sweep
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.trials < 2 or args.trials % 2:
        print(f"--trials {args.trials}: give an even number >= 2 (cells are 2 K values x "
              f"trials/2 data seeds)", file=sys.stderr)
        return 2
    if args.concurrency < 1:
        print("--concurrency must be >= 1", file=sys.stderr)
        return 2
    real_s, how = None, None
    try:
        if args.real_trial_s is not None:
            if not args.real_trial_s > 0:
                raise ValueError(f"--real-trial-s {args.real_trial_s} must be > 0")
            real_s, how = args.real_trial_s, "--real-trial-s"
        elif args.bench:
            real_s, how = real_trial_from_bench(
                args.bench, classes=args.classes, shots=args.real_shots, batch=args.real_batch,
                epochs=args.real_epochs, eval_images=args.eval_images)
    except (OSError, ValueError, KeyError) as e:
        print(f"pipeline.bench: {e}", file=sys.stderr)
        return 2
    stdout = sys.stdout
    if args.json:  # the sweep's own output goes to stderr, the JSON alone to stdout
        sys.stdout = sys.stderr
    from pipeline.spec import SpecError

    try:
        res = run(args.trials, args.concurrency, args.epochs, args.shots, args.workdir,
                  args.overrides)
    except SpecError as e:  # a bad --set: refused before the sweep runs
        print(f"pipeline.bench: {e}", file=sys.stderr)
        return 2
    finally:
        sys.stdout = stdout
    per = res["per_trial_overhead_s"]
    res["real_trial_s"] = real_s
    res["real_trial_source"] = how
    res["overhead_fraction_of_real_trial"] = (
        {"mean": per["mean"] / real_s, "p90": per["p90"] / real_s}
        if real_s and per else None)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        _print(res)
    return 0


def _print(res: dict[str, Any]) -> None:
    def f(x: Any) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    per = res["per_trial_overhead_s"] or {}
    print(f"pipeline overhead: {res['trials']} trials, concurrency {res['concurrency']}, "
          f"{res['worker_processes']} worker process(es), load {res['load_average_1m']}")
    print(f"  per_trial_overhead_s: mean {f(per.get('mean'))}, p90 {f(per.get('p90'))} "
          f"({res['steady_state_trials']} steady-state trials)")
    print(f"  fit compute per trial: mean {f(res['fit_compute_s']['mean'])} s")
    print(f"  startup {f(res['startup_s'])} s, teardown {f(res['teardown_s'])} s, "
          f"amortized {f(res['amortized_overhead_s'])} s/trial, wall {f(res['sweep_wall_s'])} s")
    print("  breakdown (mean s): " + ", ".join(f"{k} {f(v)}"
                                               for k, v in res["breakdown_mean_s"].items()))
    frac = res["overhead_fraction_of_real_trial"]
    share = "n/a" if frac is None else f"{frac['mean']:.2%} (p90 {frac['p90']:.2%})"
    print(f"  real trial: {f(res['real_trial_s'])} s ({res['real_trial_source']}); "
          f"overhead fraction: {share}")
    print(f"  trials ran in the group_order order: {res['order_preserved']}")
    cache = res.get("feature_cache") or {}
    print("  feature cache (all trials): " + (", ".join(
        f"{k} {v:g}" for k, v in cache.items()) or "no lookups"))


if __name__ == "__main__":
    raise SystemExit(main())
