"""`TrialContext`: what every trial of one phase of a submission needs from the driver.

Built once per phase by the driver (`trial_context` for the grid phase, `dataclasses.replace` for
the search phase), passed to the trainable through `tune.with_parameters` (so it must pickle) and
read there by attribute. It holds no secrets: the tracking URI as configured (credentials reach
the trials through their environment, never through Tune's object store), the code version and
the sweep's settings.

`TrialContext.from_any` also accepts the untyped dict of older drivers (a Tune state restored
by a re-submission), so the trainable reads either.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from typing import Any, Mapping

from pipeline import layout


@dataclass(frozen=True)
class TrialContext:
    tracking_uri: str
    experiment: str
    experiment_id: str
    parent_run_id: str
    sweep: str
    storage: str
    cache: Mapping[str, Any]  # the sweep's `cache:` block (tagged and logged as `feature_cache`)
    code_sha: str
    code_dirty: bool
    code_version: str  # this code's fingerprint (`pipeline.env.code_version().version`)
    sweep_file: str = ""
    rerun: bool = False
    ignore_code_version: bool = False
    # whether a grid cell may evaluate a finished training's weights (`pipeline.reuse`); off
    # with --rerun / --no-reuse, also for the cells of a restored Tune experiment
    reuse: bool = True
    imports: tuple[str, ...] = ()  # imported by every trial on its worker (registrations)
    sweep_arms: str = ""  # the arms' order, for the aggregate's rows
    sweep_arm_spec: str = ""  # how the aggregate places this sweep's runs without an arm tag
    phase: str = layout.GRID_PHASE
    ray_job_id: str = ""
    user: str = ""  # the submitter: every run's mlflow.user
    varied_fields: tuple[str, ...] = ()  # the grid's varied fields (the runs' notes)
    # the driver's data digests (`tracking.known_digests`): a trial re-checks their stamps only
    known_data: tuple[tuple[str, str, Any], ...] = ()
    # search phase only: the fixed settings, the searched fields and the base cell's name
    base_config: Mapping[str, Any] | None = None
    search_fields: tuple[str, ...] = ()
    base_name: str = ""

    @property
    def done_code_version(self) -> str | None:
        """The code version a FINISHED run must have to count as done (None: any)."""
        return None if self.ignore_code_version else self.code_version

    @property
    def varied(self) -> tuple[str, ...]:
        """The fields that tell this phase's trials apart (the runs' notes)."""
        return self.search_fields if self.phase == layout.SEARCH_PHASE else self.varied_fields

    @classmethod
    def from_any(cls, value: "TrialContext | Mapping[str, Any]") -> "TrialContext":
        """The context itself, or one from the dict an older driver passed (its key
        `feature_cache` is `cache` here; keys this class lacks are dropped)."""
        if isinstance(value, cls):
            return value
        raw = dict(value)
        if "feature_cache" in raw:
            raw.setdefault("cache", raw.pop("feature_cache"))
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in raw.items() if k in names}
        for k in ("imports", "varied_fields", "search_fields", "known_data"):
            kept[k] = tuple(kept.get(k) or ())
        return cls(**kept)


def trial_context(spec: Any, uri: str, exp_id: str, parent: str, code: Any, args: Any,
                  **more: Any) -> TrialContext:
    """The grid phase's context of a submission (`more`: `user`, `varied_fields`, ...)."""
    from pipeline.spec import arm_signature

    arm_spec = json.dumps(arm_signature(spec), sort_keys=True, separators=(",", ":")) \
        if spec.arms else ""
    return TrialContext(
        tracking_uri=uri, experiment=spec.experiment, experiment_id=exp_id,
        parent_run_id=parent, sweep=spec.name, storage=spec.storage,
        cache=spec.cache.model_dump(), code_sha=code.sha, code_dirty=code.dirty,
        code_version=code.version, sweep_file=os.path.abspath(args.sweep),
        rerun=bool(args.rerun), ignore_code_version=bool(args.ignore_code_version),
        reuse=not (args.rerun or getattr(args, "no_reuse", False)),
        imports=tuple(spec.imports), sweep_arms=",".join(spec.arm_names),
        sweep_arm_spec=arm_spec, phase=layout.GRID_PHASE, **more)


__all__ = ["TrialContext", "trial_context"]
