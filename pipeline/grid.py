"""The grid phase: ONE Tuner with one `grid_search` over the explicit list of the cells left to
run, in `spec.group_order` (cells that share a backbone and cached features run back to back).
Named after the whole grid, so an interrupted identical submission restores it."""

from __future__ import annotations

from typing import Any

from pipeline import layout, tuning
from pipeline.collect import PhaseResult, collect, collect_from_mlflow


def say(msg: str) -> None:
    print(msg, flush=True)


def grid_tune_name(spec: Any, grid: list[Any], context: Any) -> str:
    """Named after the whole grid (not the cells left) and the code version a done run needs,
    so that an interrupted identical submission finds and restores this experiment."""
    return layout.tune_name(spec.experiment, layout.GRID_PHASE, tuning.digest(
        sorted(c.config_hash for c in grid), context.done_code_version))


def run_grid(spec: Any, grid: list[Any], todo: list[Any], context: Any,
             max_concurrent: int | None = None, rerun: bool = False) -> PhaseResult:
    """Run the cells `todo` (of `grid`) with `context` (a grid-phase TrialContext)."""
    from ray import tune

    cells_ = [{"name": c.name, "config": c.config.to_dict(), "arm": c.arm} for c in todo]
    tuner, marker = tuning.make_tuner(
        tuning.trainable(spec, context), grid_tune_name(spec, grid, context), spec,
        {"cell": tune.grid_search(cells_)},
        tuning.tune_config(max_concurrent_trials=max_concurrent), rerun)
    say(f"grid phase: {len(todo)} trial(s), {spec.resources.cpu:g} CPU / "
        f"{spec.resources.gpu:g} GPU each")
    results, stopped = tuning.fit(tuner, "grid", spec)
    if results is None:
        say("the cells are read from MLflow instead")
        # not marked complete: the next identical submission resumes the experiment
        out = collect_from_mlflow(todo, context)
        out.storage_error = stopped
        return out
    tuning.mark_complete(marker, spec)
    done_before = {c.name for c in grid} - {c.name for c in todo}
    return collect(results, context, counted=done_before)


__all__ = ["run_grid", "grid_tune_name"]
