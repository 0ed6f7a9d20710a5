"""Each distinct training once: cells served by runs that already exist in the tracking store.

Before a sweep's grid phase, every cell not FINISHED in its own experiment is looked up in the
whole store: the grid-phase FINISHED runs of every experiment, of the same code version (any,
with --ignore-code-version), that read the same data (`tracking.data_changed`, THE data rule).
Each cell gets one of three plans:

- `link`: a run of the same config hash exists (the paper's 33 default base-to-novel cells come
  back in each of the five ablations). The driver copies it into this sweep's experiment as a
  FINISHED run of this submission (`Tracker.log_link`): the cell's params, the source's metrics
  (the per-step charts rebuilt) and artifacts (weights included), the source's provenance tags
  (code version, device, data digests, feature cache) and the lineage tags below. No trial runs,
  and the aggregate of this experiment reads the run like any other.
- `evaluate`: a run of the same `training_hash` (what is trained, `perl_core.protocol`) but
  another config hash exists: the DG cell whose ImageNet training the cross-dataset sweep
  already did. The cell runs as a grid-phase trial that loads that run's projectors (its MLflow
  artifact) and evaluates them on this cell's targets (`perl_core.train.evaluate_projectors`),
  with its own record, run and metrics; no optimizer step.
- `train`: neither; the cell trains as always.

Lineage tags (one name each; the aggregate and `pipeline.status` read them as they are):
`reuse` = link | evaluate; `reused_from` = the run whose results (link) or weights (evaluate)
this run took; `trained_by` = the run whose training made the weights, followed through links
and evaluations. Every trial run carries `training_hash`.

`--rerun` and `--no-reuse` turn the lookup off. A suite (`pipeline.suite`) runs its sweeps one
after another, so the shared cells of a later sweep find the earlier sweep's runs; its dry run
plans the same way, with the earlier sweeps' cells standing in as planned sources.

Within one sweep, cells that share a training hash but not a config hash all train: they run
concurrently, so none can wait for another's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from perl_core.protocol import canonical_dataset, training_hash
from pipeline import layout, queries, tracking

REUSE_TAG = "reuse"
REUSED_FROM_TAG = "reused_from"
TRAINED_BY_TAG = "trained_by"
TRAINING_HASH_TAG = "training_hash"
LINK, EVALUATE, TRAIN = "link", "evaluate", "train"
# a source's tags that describe where it was run, not how its result was made: a link gets its
# own (this sweep, this submission, this cell); everything else (code, versions, device, data
# digests, feature cache) is the source's and is copied
PLACEMENT_TAGS = frozenset({
    "sweep", "phase", "cell", "sweep_file", "ray_job_id", "ray_node_id", "trial_id", "arm",
    "sweep_arms", "sweep_arm_spec", "record_id", "replayed", "status_detail", "mlflow.user",
    "mlflow.parentRunId", "mlflow.runName", tracking.NOTE_TAG, REUSE_TAG, REUSED_FROM_TAG,
    TRAINED_BY_TAG})
# metrics of the source's process, not of its result: a link did not spend them
PROCESS_METRIC_PREFIXES = ("timing/", "feature_cache/", "train_step/", "train_epoch/")


@dataclass(frozen=True)
class Source:
    """A finished run (or, in a suite's dry run, a cell an earlier sweep will run) that can
    serve a cell."""

    run_id: str  # "" for a planned cell
    label: str  # "<experiment> run <id>" / "sweep <name> (planned)"
    trained_by: str  # the run whose training made the weights ("" when planned)
    tags: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_run(cls, run: Any, experiment: str) -> "Source":
        rid = run.info.run_id
        return cls(rid, f"{experiment} run {rid}", run.data.tags.get(TRAINED_BY_TAG) or rid,
                   dict(run.data.tags))


@dataclass(frozen=True)
class Plan:
    kind: str  # LINK / EVALUATE / TRAIN
    source: Source | None = None


class ReuseIndex:
    """config hash -> sources, training hash -> sources (newest first)."""

    def __init__(self) -> None:
        self.by_config: dict[str, list[Source]] = {}
        self.by_training: dict[str, list[Source]] = {}

    def add(self, source: Source, config_hash: str, train_hash: str) -> None:
        if config_hash:
            self.by_config.setdefault(config_hash, []).append(source)
        if train_hash:
            self.by_training.setdefault(train_hash, []).append(source)

    @classmethod
    def from_store(cls, tracker: tracking.Tracker, code_version: str | None,
                   current_version: str) -> "ReuseIndex":
        """Every grid-phase FINISHED run of the store (of `code_version` unless None). A source
        of weights to evaluate is of `current_version` even then: an evaluation run is tagged
        with the code that evaluated, so its training must be of that code too."""
        index = cls()
        exps = {e.experiment_id: e.name for e in queries.all_experiments(tracker.client)}
        runs = queries.finished_runs_anywhere(tracker.client, list(exps),
                                              phase=layout.GRID_PHASE, code_version=code_version)
        for r in sorted(runs, key=lambda r: -(r.info.end_time or 0)):
            tags = r.data.tags
            same_code = tags.get("code_version") == current_version
            index.add(Source.of_run(r, exps.get(r.info.experiment_id, "?")),
                      tags.get("config_hash", ""),
                      tags.get(TRAINING_HASH_TAG, "") if same_code else "")
        return index

    def add_planned(self, cells: Iterable[Any], sweep: str) -> None:
        """Cells an earlier sweep of a suite trains or evaluates (dry run only)."""
        for c in cells:
            self.add(Source("", f"sweep {sweep} (planned)", ""), c.config_hash,
                     training_hash(c.config))

    def plan(self, cell: Any, digests: Mapping[str, Any]) -> Plan:
        """How `cell` is served; `digests` (dataset -> DataDigest now) is the data rule's."""
        for s in self.by_config.get(cell.config_hash, []):
            if not tracking.data_changed(dict(s.tags), dict(digests)):
                return Plan(LINK, s)
        source = canonical_dataset(cell.config.dataset)
        trained_on = {k: v for k, v in digests.items() if k == source}
        for s in self.by_training.get(training_hash(cell.config), []):
            if s.run_id == "" or not tracking.data_changed(dict(s.tags), trained_on):
                return Plan(EVALUATE, s)
        return Plan(TRAIN)


def plan_cells(index: ReuseIndex, cells: Iterable[Any], digests: Mapping[str, Any]
               ) -> dict[str, Plan]:
    """cell name -> Plan."""
    return {c.name: index.plan(c, digests) for c in cells}


def reuse_tags(plan: Plan) -> dict[str, str]:
    """The lineage tags of a run made by `plan` ({} for a training)."""
    if plan.kind == TRAIN or plan.source is None:
        return {}
    return {REUSE_TAG: plan.kind, REUSED_FROM_TAG: plan.source.run_id,
            TRAINED_BY_TAG: plan.source.trained_by}


def link_tags(source: Source, placement: Mapping[str, str], plan: Plan) -> dict[str, str]:
    """The source's provenance tags, this cell's placement, and the lineage."""
    kept = {k: v for k, v in source.tags.items()
            if k not in PLACEMENT_TAGS and k not in placement}
    return {**kept, **placement, **reuse_tags(plan)}


def result_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The source's final metrics a link carries (not its process's timings and counters)."""
    return {k: v for k, v in metrics.items() if not k.startswith(PROCESS_METRIC_PREFIXES)}


def count(plans: Mapping[str, Plan]) -> dict[str, int]:
    out = {LINK: 0, EVALUATE: 0, TRAIN: 0}
    for p in plans.values():
        out[p.kind] += 1
    return out


__all__ = ["REUSE_TAG", "REUSED_FROM_TAG", "TRAINED_BY_TAG", "TRAINING_HASH_TAG", "LINK",
           "EVALUATE", "TRAIN", "Source", "Plan", "ReuseIndex", "plan_cells", "reuse_tags",
           "link_tags", "result_metrics", "count"]
