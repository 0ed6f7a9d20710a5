"""The driver's link phase (`pipeline.reuse`, plan `link`): each cell whose config hash already
has a FINISHED run elsewhere in the store becomes a FINISHED run of this submission, in this
sweep's experiment, carrying the source's result (`Tracker.log_link`). It runs before the grid
phase, needs no Ray and starts no trial. A cell whose source cannot be copied (its artifacts
gone) trains instead; when MLflow itself goes away the phase raises, and the submission stops as
one that lost MLflow before any trial (exit 3; the next submission links the rest)."""

from __future__ import annotations

from typing import Any, Mapping

from pipeline import reuse, tracking
from pipeline.collect import PhaseResult
from pipeline.context import TrialContext
from pipeline.trainable import arm_tags, note_tags, placement_tags, trial_data


def say(msg: str) -> None:
    print(msg, flush=True)


def link_tags(cell: Any, context: TrialContext, plan: reuse.Plan, data: list[Any]
              ) -> dict[str, str]:
    """The source's provenance tags, this cell's place (as its trial would be tagged), the
    lineage."""
    place = {**placement_tags(cell.config, cell.name, context),
             **arm_tags({"cell": {"arm": cell.arm}}, context),
             **note_tags(cell.config, cell.name, context, data)}
    return reuse.link_tags(plan.source, place, plan)


def link_cells(tracker: tracking.Tracker, context: TrialContext, cells: list[Any],
               plans: Mapping[str, reuse.Plan]) -> tuple[PhaseResult, list[Any]]:
    """Link every cell of `cells` (all planned `link`) into `context`'s experiment. Returns
    the result and the cells to train instead: those whose source could not be copied (its
    artifacts gone, ...). When MLflow itself stops answering, raises its TrackingUnavailable
    at once (no cell waits out the retries again; the next submission links the rest)."""
    out, train = PhaseResult(), []
    if cells:
        say(f"link phase: {len(cells)} cell(s) already FINISHED in another experiment of the "
            f"store, linked here instead of trained again")
    for cell in cells:
        src = plans[cell.name].source
        try:
            run = tracker.client.get_run(src.run_id)
            data = trial_data(cell.config, cell.name, context.known_data)
            tracker.log_link(context.experiment_id, context.parent_run_id, cell.name,
                             cell.config, link_tags(cell, context, plans[cell.name], data),
                             src.run_id, reuse.result_metrics(run.data.metrics),
                             inputs=tracking.data_inputs(data))
            out.linked.append(cell.name)
        except Exception as e:
            why = f"{type(e).__name__}: {tracking.short_error(e)}"
            tracker.check()  # (raises TrackingUnavailable when MLflow itself is gone)
            say(f"warning: {cell.name}: could not link {src.label} ({why}); training it")
            train.append(cell)
    return out, train


__all__ = ["link_cells", "link_tags"]
