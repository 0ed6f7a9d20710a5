"""The grid phase: ONE Tuner with one `grid_search` over the explicit list of the cells left to
run, in `spec.group_order` (cells that share a backbone and cached features run back to back).
Named after the whole grid, so an interrupted identical submission restores it."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline import layout, reuse, tuning
from pipeline.collect import PhaseResult, collect, collect_from_mlflow


def say(msg: str) -> None:
    print(msg, flush=True)


def grid_tune_name(spec: Any, grid: list[Any], context: Any) -> str:
    """Named after the whole grid (not the cells left) and the code version a done run needs,
    so that an interrupted identical submission finds and restores this experiment."""
    return layout.tune_name(spec.experiment, layout.GRID_PHASE, tuning.digest(
        sorted(c.config_hash for c in grid), context.done_code_version))


def cell_entry(cell: Any, plan: Any = None) -> dict[str, Any]:
    """A cell as Tune's grid holds it; an `evaluate` plan (`pipeline.reuse`) adds the run whose
    weights it evaluates (`pipeline.trainable.cell_plan` reads it back)."""
    entry = {"name": cell.name, "config": cell.config.to_dict(), "arm": cell.arm}
    if plan is not None and plan.kind == reuse.EVALUATE:
        entry["reuse"] = {"kind": plan.kind, "run_id": plan.source.run_id,
                          "trained_by": plan.source.trained_by}
    return entry


def run_grid(spec: Any, grid: list[Any], todo: list[Any], context: Any,
             max_concurrent: int | None = None, rerun: bool = False,
             plans: Mapping[str, Any] | None = None) -> PhaseResult:
    """Run the cells `todo` (of `grid`) with `context` (a grid-phase TrialContext); `plans`:
    cell name -> `pipeline.reuse.Plan` (none: every cell trains)."""
    from ray import tune

    cells_ = [cell_entry(c, (plans or {}).get(c.name)) for c in todo]
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


__all__ = ["run_grid", "grid_tune_name", "cell_entry"]
