"""`python -m pipeline.status SWEEP.yaml`: how far a sweep is, from MLflow alone (no Ray needed).

    python -m pipeline.status SWEEP.yaml [--tracking-uri URI] [--ignore-code-version] [--cells]

Per grid cell, its latest run decides: done (FINISHED, for the current code version unless
--ignore-code-version), running, failed (with the reason from `status_detail`), or left (no run,
KILLED, or finished for another code version only). Prints the counts, the failures, the mean
trial time of the finished runs and an ETA (remaining cells x mean time / trials running now,
or / 1 when nothing runs), and for a sweep with a search phase the samples done and the best one.
With `--bench BENCH.json` (a `python -m perl_core.bench --json` file from the target GPU) it also
prints the GPU time of the cells not done yet, from the same estimator as `pipeline.run --dry-run
--bench` (`pipeline.estimate`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from pipeline import tracking  # noqa: E402
from pipeline.env import code_fingerprint  # noqa: E402
from pipeline.spec import SpecError, cells, load_spec, resolve_tracking_uri  # noqa: E402


@dataclass
class CellStatus:
    name: str
    config_hash: str
    state: str  # done / running / failed / left
    detail: str = ""
    seconds: float | None = None


def cell_states(runs: list, grid: list, code_version: str | None) -> list[CellStatus]:
    """The state of every grid cell from its runs (latest start wins, FINISHED beats all)."""
    by_hash: dict[str, list] = {}
    for r in runs:
        by_hash.setdefault(r.data.tags.get("config_hash", ""), []).append(r)
    out = []
    for c in grid:
        rs = sorted(by_hash.get(c.config_hash, []), key=lambda r: r.info.start_time or 0)
        done = [r for r in rs if r.info.status == "FINISHED" and
                (code_version is None or r.data.tags.get("code_version") == code_version)]
        if done:
            r = done[-1]
            secs = ((r.info.end_time or 0) - (r.info.start_time or 0)) / 1000 or None
            out.append(CellStatus(c.name, c.config_hash, "done", seconds=secs))
            continue
        last = rs[-1] if rs else None
        if last is None:
            out.append(CellStatus(c.name, c.config_hash, "left"))
        elif last.info.status == "RUNNING":
            out.append(CellStatus(c.name, c.config_hash, "running"))
        elif last.info.status == "FAILED":
            detail = last.data.tags.get("status_detail", "").strip().splitlines()
            out.append(CellStatus(c.name, c.config_hash, "failed",
                                  detail[0] if detail else "no reason recorded"))
        else:
            why = "finished with another code version" if last.info.status == "FINISHED" \
                else last.info.status.lower()
            out.append(CellStatus(c.name, c.config_hash, "left", why))
    return out


def eta_seconds(states: list[CellStatus]) -> tuple[float | None, float | None]:
    """(mean trial seconds, ETA seconds) from the finished cells; None when unknown."""
    times = [s.seconds for s in states if s.state == "done" and s.seconds]
    if not times:
        return None, None
    mean = statistics.fmean(times)
    running = sum(s.state == "running" for s in states)
    remaining = sum(s.state in ("left", "running", "failed") for s in states)
    return mean, remaining * mean / max(1, running)


def _fmt_s(s: float | None) -> str:
    if s is None:
        return "unknown"
    return time.strftime("%H:%M:%S", time.gmtime(s)) if s < 86400 else f"{s / 86400:.1f} days"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.status",
                                 description="Progress of a sweep from MLflow.")
    ap.add_argument("sweep")
    ap.add_argument("--tracking-uri", default=None)
    ap.add_argument("--ignore-code-version", action="store_true")
    ap.add_argument("--cells", action="store_true", help="list every cell with its state")
    ap.add_argument("--bench", default=None, metavar="BENCH.json",
                    help="also estimate the GPU time of the cells left from this "
                         "`python -m perl_core.bench --json` file")
    args = ap.parse_args(argv)
    try:
        spec = load_spec(args.sweep)
        uri = resolve_tracking_uri(spec, args.tracking_uri)
    except SpecError as e:
        print(e)
        return 2
    grid = cells(spec)
    code = None if args.ignore_code_version else code_fingerprint()
    runs: list = []
    exp = None
    if not uri.startswith("sqlite:///") or os.path.exists(uri[len("sqlite:///"):]):
        tracker = tracking.Tracker(uri)
        exp = tracker.client.get_experiment_by_name(spec.experiment)
        if exp is not None:
            runs = tracker.search(exp.experiment_id, f"tags.sweep = '{spec.name}'")
    final = [r for r in runs if r.data.tags.get("phase") == "final"]
    states = cell_states(final, grid, code)
    counts = {k: sum(s.state == k for s in states) for k in ("done", "running", "failed", "left")}
    mean, eta = eta_seconds(states)

    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{spec.name}[/bold] ({spec.source}): experiment {spec.experiment!r} at "
                  f"{tracking.redact_uri(uri)}"
                  + ("" if exp else " [yellow](no runs yet)[/yellow]"))
    console.print(f"{len(grid)} cells: {counts['done']} done, {counts['running']} running, "
                  f"{counts['failed']} failed, {counts['left']} left")
    console.print(f"mean trial time {_fmt_s(mean)}; ETA {_fmt_s(eta)}"
                  + (f" ({counts['running']} running in parallel)" if counts["running"] else ""))
    failed = [s for s in states if s.state == "failed"]
    if failed:
        console.print("[red]failures:[/red]")
        for s in failed:
            console.print(f"  {s.name}: {s.detail}")
    if args.bench:
        rc = _bench_estimate(spec, grid, states, final, args.bench, console)
        if rc:
            return rc
    if args.cells:
        table = Table()
        for col in ("cell", "config_hash", "state", "detail"):
            table.add_column(col)
        for s in states:
            table.add_row(s.name, s.config_hash, s.state, s.detail)
        console.print(table)
    if spec.search is not None:
        hpo = [r for r in runs if r.data.tags.get("phase") == "hpo"
               and r.info.status == "FINISHED" and spec.search.metric in r.data.metrics]
        line = f"search: {len(hpo)}/{spec.search.num_samples} samples finished"
        if hpo:
            pick = max if spec.search.mode == "max" else min
            best = pick(hpo, key=lambda r: r.data.metrics[spec.search.metric])
            params = ", ".join(f"{k}={best.data.params.get(k)}" for k in spec.search.space)
            line += (f"; best {spec.search.metric} = "
                     f"{best.data.metrics[spec.search.metric]:.4g} ({params})")
        console.print(line)
    return 0


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
