"""The driver's link phase (`pipeline.reuse`, plan `link`): each cell whose config hash already
has a FINISHED run elsewhere in the store becomes a FINISHED run of this submission, in this
sweep's experiment, carrying the source's result (`Tracker.log_link`). It runs before the grid
phase, needs no Ray and starts no trial; a link that fails (the source's artifacts gone, MLflow
away) fails its cell with the reason, and the next submission links it again."""

from __future__ import annotations

from typing import Any, Mapping

from perl_core.protocol import training_hash
from pipeline import reuse, tracking
from pipeline.collect import PhaseResult
from pipeline.context import TrialContext
from pipeline.trainable import arm_tags, note_tags


def say(msg: str) -> None:
    print(msg, flush=True)


def placement_tags(cell: Any, context: TrialContext, data: list[Any]) -> dict[str, str]:
    """What a trial of this cell in this submission would be tagged with for its place: the
    sweep, phase, cell, arms and note; the hashes (identical to the source's)."""
    cfg = cell.config
    return {"config_hash": cell.config_hash, reuse.TRAINING_HASH_TAG: training_hash(cfg),
            "sweep": context.sweep, "phase": context.phase, "cell": cell.name,
            "sweep_file": context.sweep_file, "ray_job_id": context.ray_job_id,
            "mlflow.user": context.user,
            **arm_tags({"cell": {"arm": cell.arm}}, context),
            **note_tags(cfg, cell.name, context, data)}


def link_cells(tracker: tracking.Tracker, context: TrialContext, cells: list[Any],
               plans: Mapping[str, reuse.Plan]) -> PhaseResult:
    """Link every cell of `cells` (all planned `link`) into `context`'s experiment."""
    out = PhaseResult()
    if cells:
        say(f"link phase: {len(cells)} cell(s) already FINISHED in another experiment of the "
            f"store, linked here instead of trained again")
    for cell in cells:
        plan = plans[cell.name]
        src = plan.source
        try:
            run = tracker.client.get_run(src.run_id)
            data = tracking.data_digests(cell.config)
            tags = reuse.link_tags(src, placement_tags(cell, context, data), plan)
            tracker.log_link(context.experiment_id, context.parent_run_id, cell.name,
                             cell.config, tags, src.run_id,
                             reuse.result_metrics(run.data.metrics),
                             inputs=tracking.data_inputs(data))
            out.linked.append(cell.name)
        except Exception as e:
            out.failed.append((cell.name, f"could not link {src.label}: {type(e).__name__}: "
                                          f"{tracking.short_error(e)}"))
    return out


__all__ = ["link_cells", "placement_tags"]
