"""`pipeline.run ... --dry-run`: what a submission would do, read without creating anything.

One sweep: every cell with its state (`done` in its experiment; `link` / `evaluate`: served by a
run elsewhere in the store, `pipeline.reuse`; `todo`: trained), the totals, the workload and GPU
time of the cells to run (`pipeline.estimate`; an `evaluate` cell counts its evaluation only) and
the expected peak memory per trial.

A suite (`pipeline.suite`): one line per sweep (cells, done, link, evaluate, train; a later
sweep's cells that an earlier one runs are planned as link / evaluate, as the real run would
find them), the distinct configs and trainings of the whole suite, and the workload (and GPU
time, with --bench) before and after deduplication: before, each sweep on its own trains every
cell it has not finished; after, each distinct training runs once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from perl_core.protocol import training_hash
from pipeline import estimate, layout, reuse, tracking
from pipeline.spec import GridCell, SweepSpec


def say(msg: str) -> None:
    print(msg, flush=True)


class DryRunError(ValueError):
    """A bad --bench / --gpu-memory / --trial-overhead-s value (exit 2)."""


class Options:
    """The estimate's inputs of the command line, checked once."""

    def __init__(self, bench_file: str | None, overhead_s: float | None,
                 gpu_memory: str | None):
        if overhead_s is not None and overhead_s < 0:
            raise DryRunError(f"--trial-overhead-s must be >= 0, got {overhead_s:g}")
        try:
            self.gpu_gb = None if gpu_memory is None else estimate.parse_gpu_memory(gpu_memory)
            self.bench = estimate.load_bench(bench_file) if bench_file else None
        except (ValueError, estimate.EstimateError) as e:
            raise DryRunError(str(e)) from None
        self.overhead_s = overhead_s


@dataclass(frozen=True)
class Versions:
    """The code version a done run needs (None: any, --ignore-code-version) and this code's."""

    done: str | None
    current: str

    @classmethod
    def of(cls, args: Any, current: str) -> "Versions":
        return cls(None if args.ignore_code_version else current, current)


def _store(uri: str, source: str) -> tracking.Tracker | None:
    """The tracking store, when it exists and answers (a dry run must not create a SQLite
    file); None with a warning when it does not answer."""
    if not layout.store_exists(uri):
        return None
    tracker = tracking.Tracker(uri)
    return _guarded(lambda: tracker.check() or tracker, None, source, uri)


def _guarded(read: Any, empty: Any, source: str, uri: str) -> Any:
    """`read()`, or `empty` with a warning when the store fails on it (a dry run still shows
    the work; a real run refuses, exit 2)."""
    try:
        return read()
    except Exception as e:
        say(f"warning: {source}: tracking store {layout.redact_uri(uri)} not readable "
            f"({type(e).__name__}: {tracking.short_error(e)}): shown as if empty; a real run "
            f"would stop here")
        return empty


def finished(tracker: tracking.Tracker | None, spec: SweepSpec, grid: list[GridCell],
             code_version: str | None) -> dict[str, Any]:
    """config hash -> FINISHED run of the cells done in the sweep's experiment."""
    exp = tracker.client.get_experiment_by_name(spec.experiment) if tracker else None
    return {} if exp is None else tracker.finished_cells(
        exp.experiment_id, [c.config for c in grid], code_version, say)


def plan_sweep(tracker: tracking.Tracker | None, index: reuse.ReuseIndex, spec: SweepSpec,
               grid: list[GridCell], versions: Versions
               ) -> tuple[dict[str, Any], list[GridCell], dict[str, reuse.Plan]]:
    """(done runs by hash, cells to run, their plans) of one sweep, as a submission finds them."""
    done = _guarded(lambda: finished(tracker, spec, grid, versions.done), {}, spec.source,
                    tracker.tracking_uri if tracker else "")
    todo = [c for c in grid if c.config_hash not in done]
    return done, todo, reuse.plan_cells(index, todo, tracking.grid_data_digests(
        [c.config for c in todo]))


def search_samples(spec: SweepSpec) -> list[tuple]:
    """The estimate's search samples: their searched fields are unknown, the fixed settings."""
    return [(f"search sample {i + 1}", spec.base_config(), "search (fixed settings)")
            for i in range(spec.search.num_samples)] if spec.search else []


def reuse_index(tracker: tracking.Tracker | None, versions: Versions,
                enabled: bool) -> reuse.ReuseIndex:
    if tracker is None or not enabled:
        return reuse.ReuseIndex()
    return reuse.ReuseIndex.from_store(tracker, versions.done, versions.current)


def to_run(spec: SweepSpec, cells_: Iterable[GridCell], plans: dict[str, reuse.Plan]
           ) -> list[tuple]:
    """The estimate's (name, config, group) of the cells that run: a trained cell whole, an
    `evaluate` cell as a training of no epoch (its evaluation only), a link not at all."""
    out = []
    for c in cells_:
        kind = plans[c.name].kind if c.name in plans else reuse.TRAIN
        if kind == reuse.TRAIN:
            out.append((c.name, c.config, c.config.dataset))
        elif kind == reuse.EVALUATE:
            out.append((c.name, c.config.replace(epochs=0), f"{c.config.dataset} (evaluate)"))
    return out


def _estimate(spec: SweepSpec, named: list[tuple], opts: Options,
              done_runs: Iterable[Any] = ()) -> estimate.Estimate:
    overhead_s, overhead_from = opts.overhead_s, "--trial-overhead-s"
    bench = opts.bench
    if bench is not None and overhead_s is None and bench.trial_overhead_s is None:
        overhead_s, n = estimate.measured_overhead(done_runs)
        overhead_from = f"mean timing/overhead_s of {n} finished run(s) of this sweep"
    return estimate.estimate(named, bench, cache_enabled=spec.cache.enabled,
                             overhead_s=overhead_s, overhead_from=overhead_from)


# --- one sweep -----------------------------------------------------------------------------------


def dry_run(spec: SweepSpec, grid: list[GridCell], uri: str, versions: Versions,
            rerun: bool, use_reuse: bool, opts: Options) -> int:
    """Print the cells and totals of one sweep (exit code 0, 2 for an estimate problem)."""
    tracker = None if rerun else _store(uri, spec.source)
    index = _guarded(lambda: reuse_index(tracker, versions, use_reuse), reuse.ReuseIndex(),
                     spec.source, uri)
    done, todo, plans = plan_sweep(tracker, index, spec, grid, versions)
    _cell_table(spec, grid, done, plans)
    n = reuse.count(plans)
    reused = (f" ({n[reuse.LINK]} to link, {n[reuse.EVALUATE]} to evaluate from a finished "
              f"training, {n[reuse.TRAIN]} to train)") if n[reuse.LINK] or n[reuse.EVALUATE] else ""
    say(f"total: {len(grid)} cells, {len(done)} done, {len(todo)} todo{reused}"
        + (f"; then an Optuna search of {spec.search.num_samples} samples on "
           f"{spec.search.metric} ({spec.search.mode})" if spec.search else ""))
    say(f"experiment {spec.experiment!r} at {layout.redact_uri(uri)}; "
        f"storage {layout.redact_uri(spec.storage)}; "
        f"per trial {spec.resources.cpu:g} CPU, {spec.resources.gpu:g} GPU")
    named = to_run(spec, todo, plans) + search_samples(spec)
    try:
        est = _estimate(spec, named, opts, done.values())
    except estimate.EstimateError as e:
        say(f"{spec.source}: {e}")
        return 2
    estimate.report(est, say, arch=[c.config.arch for c in grid])
    rows, _ = estimate.memory_by_dataset(named)  # (cells of unknown size: said by report above)
    estimate.memory_report(rows, say, spec.resources.gpu, opts.gpu_gb)
    return 0


def _cell_table(spec: SweepSpec, grid: list[GridCell], done: dict[str, Any],
                plans: dict[str, reuse.Plan]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{spec.name}: {spec.source}")
    for col in ("#", "cell", "config_hash", "state"):
        table.add_column(col, justify="right" if col == "#" else "left")
    for i, c in enumerate(grid, 1):
        plan = plans.get(c.name)
        state = "done" if c.config_hash in done else (
            "todo" if plan is None or plan.kind == reuse.TRAIN else
            f"{plan.kind} ({plan.source.label})")
        table.add_row(str(i), c.name, c.config_hash, state)
    console = Console(width=max(120, Console().width))
    console.print(table)


# --- a suite -------------------------------------------------------------------------------------


def suite_dry_run(label: str, specs: list[tuple[SweepSpec, list[GridCell]]], uri: str,
                  versions: Versions, rerun: bool, use_reuse: bool, opts: Options) -> int:
    """Print the suite's per-sweep plan and its totals before and after deduplication."""
    tracker = None if rerun else _store(uri, label)
    index = _guarded(lambda: reuse_index(tracker, versions, use_reuse), reuse.ReuseIndex(),
                     label, uri)
    before: dict[str, tuple[SweepSpec, list[tuple]]] = {}
    after: dict[str, tuple[SweepSpec, list[tuple]]] = {}
    lines = []
    for spec, grid in specs:
        done, todo, plans = plan_sweep(tracker, index, spec, grid, versions)
        if use_reuse:  # what this sweep runs, a later one finds (the real run's order)
            index.add_planned([c for c in todo if plans[c.name].kind != reuse.LINK], spec.name)
        n = reuse.count(plans)
        lines.append(f"  {spec.name:<24} {len(grid):>5} cells {len(done):>5} done "
                     f"{n[reuse.LINK]:>5} link {n[reuse.EVALUATE]:>4} evaluate "
                     f"{n[reuse.TRAIN]:>5} train   ({spec.experiment})")
        before[spec.name] = (spec, [(c.name, c.config, spec.name) for c in todo]
                             + search_samples(spec))
        after[spec.name] = (spec, to_run(spec, todo, plans) + search_samples(spec))
    cells_ = [c for _, grid in specs for c in grid]
    say(f"suite {label}: {len(specs)} sweeps, in this order, into {layout.redact_uri(uri)}")
    for line in lines:
        say(line)
    say(f"total: {len(cells_)} cells, {len({c.config_hash for c in cells_})} distinct configs, "
        f"{len({training_hash(c.config) for c in cells_})} distinct trainings")
    try:
        _work_line("before deduplication (each sweep alone)", before, opts)
        _work_line("after deduplication (this suite)", after, opts)
    except estimate.EstimateError as e:
        say(f"{label}: {e}")
        return 2
    if opts.gpu_gb is not None:
        for spec, grid in specs:
            rows, _ = estimate.memory_by_dataset([(c.name, c.config) for c in grid])
            say(f"{spec.name}:")
            estimate.memory_report(rows, say, spec.resources.gpu, opts.gpu_gb)
    return 0


def _work_line(what: str, named: dict[str, tuple[SweepSpec, list[tuple]]],
               opts: Options) -> None:
    """Trials, trainings, steps, images (and GPU-h) of `named`: per sweep (its own cache
    setting), summed."""
    trials = trainings = steps = images = evals = unknown = 0
    seconds, bench = 0.0, None
    for spec, items in named.values():
        est = _estimate(spec, items, opts)
        batch = {name: cfg.batch_size for name, cfg, _ in items}
        trials += len(items)
        trainings += sum(1 for _, cfg, _ in items if cfg.epochs)  # (evaluate cells: epochs 0)
        steps += sum(c.work.steps for c in est.cells)
        images += sum(c.work.steps * batch[c.name] for c in est.cells)
        evals += sum(c.work.eval_images for c in est.cells)
        unknown += len(est.unknown)
        seconds, bench = seconds + est.seconds, est.bench
    line = (f"{what}: {trials} trial(s), {trainings} of them training: {steps:,} training "
            f"steps on {images:,} training images, {evals:,} images evaluated")
    if bench is not None:
        line += f", {seconds / 3600:.3g} GPU-h ({bench.path})"
    if unknown:
        line += f"; {unknown} trial(s) of unknown size not counted"
    say(line)


__all__ = ["DryRunError", "Options", "Versions", "dry_run", "suite_dry_run", "finished",
           "plan_sweep", "search_samples", "to_run"]
