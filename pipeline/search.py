"""The search phase: Optuna (TPE) over the sweep's `search.space` on top of its fixed settings,
selecting on a validation metric, in a persistent study (`pipeline.study`).

A re-submission resumes the study and runs only the missing samples; FINISHED samples in MLflow
that the study lacks are added to it as evaluated, never re-run. Samples count only on the data
they read: the study is named after the data digests too, and an MLflow sample whose recorded
digest differs from the current one is not added (the grid phase's rule, `tracking.data_changed`).
The phase's Tune experiment is named after the study and the sample count asked for (what
defines the search, not how far it got), so an interrupted search is restored.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, NamedTuple

from pipeline import layout, queries, tracking, tuning
from pipeline.collect import PhaseResult, collect

logger = logging.getLogger(__name__)


def say(msg: str) -> None:
    print(msg, flush=True)


class Prior(NamedTuple):
    """A FINISHED search-phase run in MLflow: its sample, objective, run id and cell name."""
    sample: dict[str, Any]
    value: float
    run_id: str
    cell: str


# --- samples ---------------------------------------------------------------------------------


def sample_hash(base: Any, sample: dict[str, Any]) -> str:
    from perl_core.config import TrainConfig

    return TrainConfig.from_dict({**base.to_dict(), **sample}).config_hash()  # as the trial


def study_samples(study: Any, base: Any) -> dict[str, float]:
    """{config hash: objective} of the study's COMPLETE trials (distinct samples)."""
    from optuna.trial import TrialState

    return {sample_hash(base, t.params): t.value
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))}


def in_space(sample: dict[str, Any], search: Any) -> bool:
    for name, p in search.space.items():
        v = sample[name]
        if p.type == "choice":
            if v not in p.values:
                return False
        elif not p.low <= v <= p.high:
            return False
    return True


def prior_samples(runs: list[Any], search: Any, base: Any,
                  digests: dict[str, Any]) -> list[Prior]:
    """The runs (FINISHED search-phase runs of this sweep) that are samples of this search: the
    same fixed settings, in the space, with the metric, and on the current data (`digests`)."""
    from perl_core.config import TrainConfig

    fields_, out = list(search.space), []
    for r in runs:
        try:
            cfg = TrainConfig.from_record(dict(r.data.params))
        except ValueError:
            continue
        if search.metric not in r.data.metrics or tracking.data_changed(r.data.tags, digests):
            continue
        # the same experiment apart from the searched fields?
        if cfg.replace(**{f: getattr(base, f) for f in fields_}).config_hash() != \
                base.config_hash():
            continue
        sample = {f: getattr(cfg, f) for f in fields_}
        if in_space(sample, search):
            out.append(Prior(sample, float(r.data.metrics[search.metric]), r.info.run_id,
                             r.data.tags.get("cell", "")))
    return out


# --- the study -------------------------------------------------------------------------------


def push_study(sf: Any) -> None:
    try:
        sf.push()
    except Exception as e:  # the MLflow runs refill the study at the next submission
        say(f"warning: cannot upload the study file to {layout.redact_uri(sf.location)} "
            f"({type(e).__name__}: {tracking.short_error(e)})")


def _pull(sf: Any) -> None:
    try:
        sf.pull()
    except Exception as e:  # refilled from MLflow; uploaded again after each sample
        say(f"warning: cannot download the study file {layout.redact_uri(sf.location)} "
            f"({type(e).__name__}: {tracking.short_error(e)}); starting a new local copy")


def resume_study(sf: Any, name: str, base: Any, prior: list[Prior], search: Any,
                 fresh: bool) -> Any:
    """Open (or create) the study and add the MLflow samples it does not hold yet."""
    from pipeline import study as st

    _pull(sf)
    study = st.open_study(sf, name, search.mode, fresh=fresh)
    had, existed = study_samples(study, base), bool(study.trials)
    before, space = len(had), st.optuna_space(search)
    for p in prior:
        h = sample_hash(base, p.sample)
        if h in had:  # the study already holds it (told by the searcher that ran it)
            continue
        study.add_trial(st.sample_trial(p.sample, p.value, space, {
            "mlflow_run_id": p.run_id, "cell": p.cell, "added_from": "mlflow"}))
        had[h] = p.value
    added, where = len(had) - before, layout.redact_uri(sf.location)
    if existed:
        say(f"resuming study {name!r} with {len(had)} finished samples ({before} in the study "
            f"file, {added} added from MLflow) at {where}")
    else:
        say(f"new study {name!r} at {where}" +
            (f" with {added} finished sample(s) from MLflow" if added else ""))
    return study


def tag_search(tracker: Any, context: Any, sf: Any, name: str, search: Any) -> None:
    """Where the study is, on the parent run: the aggregate reads it from there."""
    from pipeline import study as st

    try:
        tracker.set_tags(context.parent_run_id, {
            "search_study": name, "search_study_file": layout.redact_uri(sf.location),
            "search_space": st.space_json(search), "search_metric": search.metric,
            "search_mode": search.mode})
    except Exception as e:  # the study and the runs are still there; only the link is missing
        say(f"warning: could not tag the parent run with the study: {tracking.short_error(e)}")


def best_summary(study: Any, mode: str) -> dict[str, Any] | None:
    """The best sample for the driver's summary (`study.best_trial`: the one rule)."""
    from pipeline import study as st

    t = st.best_trial(study, mode)
    if t is None:
        return None
    return {"value": t.value, "cell": t.user_attrs.get("cell", f"study trial {t.number}"),
            **t.params}


# --- the searcher ----------------------------------------------------------------------------


def optuna_trial_of(searcher: Any, trial_id: str) -> Any | None:
    """The Optuna trial OptunaSearch started for Tune trial `trial_id` (None: unknown).

    Ray's OptunaSearch keeps that map in its private `_ot_trials` (Ray 2.x, checked on 2.60 by
    tests/test_run_phases.py). There is no public way: Tune does not pass the Optuna trial, and
    Optuna refuses user attributes on a finished trial, so they must be set before the searcher
    is told. Isolated here behind a guard: without the map the study's trials only lack the
    MLflow run id and cell name (the dashboard shows less); samples and values are unaffected."""
    trials = getattr(searcher, "_ot_trials", None)
    if not isinstance(trials, dict):
        logger.warning("OptunaSearch has no `_ot_trials` map in this Ray version: the study's "
                       "trials get no mlflow_run_id / cell attributes")
        return None
    return trials.get(trial_id)


def _final_only(searcher_cls: type) -> type:
    """The searcher, told only of results that carry its metric: progress and checkpoint reports
    (which have no validation number yet) would otherwise raise KeyError in OptunaSearch. Each
    finished sample's study trial gets the MLflow run id and cell name (shown by the dashboard),
    and the study file is uploaded when it lives on object storage."""

    class FinalOnly(searcher_cls):
        perl_study_file = None

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if self.metric in result:
                super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict | None = None,
                              error: bool = False) -> None:
            ot_trial = optuna_trial_of(self, trial_id) if result else None
            for k in ("mlflow_run_id", "cell"):
                if ot_trial is not None and result.get(k):
                    try:
                        ot_trial.set_user_attr(k, str(result[k]))
                    except Exception:  # already finished (a duplicate completion)
                        pass
            super().on_trial_complete(trial_id, result, error)
            if self.perl_study_file is not None:
                push_study(self.perl_study_file)

    return FinalOnly


def searcher(sf: Any, name: str, search: Any, n_trials: int) -> Any:
    """OptunaSearch on the persistent study. TPE is seeded with seed + the study's trial count:
    a resumed study would otherwise replay the first submission's random start-up samples."""
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from pipeline import study as st

    s = _final_only(OptunaSearch)(
        space=st.optuna_space(search), metric=search.metric, mode=search.mode,
        sampler=optuna.samplers.TPESampler(seed=search.seed + n_trials),
        study_name=name, storage=optuna.storages.RDBStorage(sf.url))
    s.perl_study_file = sf  # uploaded after each finished sample (s3://)
    return s


# --- the phase -------------------------------------------------------------------------------


def search_tune_name(spec: Any, study_name: str) -> str:
    """The search's Tune experiment: named after what defines it (the study: sweep, fixed
    settings, space, metric, mode, code version, data; and the samples asked for), never after
    how many are done, so an interrupted search is restored by the next identical submission."""
    return layout.tune_name(spec.experiment, layout.SEARCH_PHASE,
                            tuning.digest(study_name, spec.search.num_samples))


def search_context(context: Any, spec: Any) -> Any:
    """The grid phase's TrialContext made the search phase's: the fixed settings, the searched
    fields and the base cell's name (the samples' run names) added."""
    from pipeline.spec import cell_name

    base = spec.base_config()
    return dataclasses.replace(context, phase=layout.SEARCH_PHASE, base_config=base.to_dict(),
                               search_fields=tuple(spec.search.space), base_name=cell_name(base))


def open_search(spec: Any, tracker: Any, context: Any, rerun: bool) -> tuple[Any, str, Any]:
    """(study file, study name, study) of this search, resumed and refilled from MLflow."""
    from pipeline import study as st
    from pipeline.spec import cell_name

    search, base = spec.search, spec.base_config()
    digests = tracking.grid_data_digests([base], say)  # (after the data was generated)
    st.quiet_optuna()
    sf = st.StudyFile.of(spec.storage, spec.experiment)
    name = st.study_name(spec.name, cell_name(base), base.config_hash(), search,
                         context.done_code_version, {k: d.digest for k, d in digests.items()})
    prior = [] if rerun else prior_samples(
        queries.search_phase_runs(tracker.client, context.experiment_id, spec.name,
                                  code_version=context.done_code_version),
        search, base, digests)
    return sf, name, resume_study(sf, name, base, prior, search, fresh=rerun)


def run_search(spec: Any, tracker: Any, context: Any, max_concurrent: int | None = None,
               rerun: bool = False) -> PhaseResult:
    """The search phase of a submission (`context`: the grid phase's TrialContext)."""
    from pipeline import study as st

    search, base = spec.search, spec.base_config()
    sf, name, study = open_search(spec, tracker, context, rerun)
    done = len(study_samples(study, base))
    remaining = max(0, search.num_samples - done)
    say(f"search phase: {done} earlier sample(s) of {search.num_samples}, {remaining} to run "
        f"(Optuna TPE, seed {search.seed}, selecting on {search.metric}, {search.mode})")
    tag_search(tracker, context, sf, name, search)
    out = PhaseResult()
    if remaining:
        ctx = search_context(context, spec)
        tuner, marker = tuning.make_tuner(
            tuning.trainable(spec, ctx), search_tune_name(spec, name), spec, {},
            tuning.tune_config(search_alg=searcher(sf, name, search, len(study.trials)),
                               num_samples=remaining,
                               max_concurrent_trials=max_concurrent or search.max_concurrent),
            rerun)
        results, out.storage_error = tuning.fit(tuner, "search", spec)
        if results is None:  # finished samples are in the study and MLflow; the next one resumes
            push_study(sf)
            return out
        tuning.mark_complete(marker, spec)
        out = collect(results, ctx)
        study = st.open_study(sf, name, search.mode)
        st.close_orphans(study)  # trials of a killed driver that this run did not resume
    push_study(sf)
    out.best = best_summary(study, search.mode)
    say(f"study {name!r} in {layout.redact_uri(sf.location)}; browse it with "
        f"`optuna-dashboard {sf.url}`" + (" (the driver's local copy)" if sf.remote else ""))
    return out


__all__ = ["run_search", "search_tune_name", "prior_samples", "resume_study", "study_samples",
           "sample_hash", "in_space", "searcher", "optuna_trial_of", "best_summary", "Prior",
           "push_study", "tag_search", "open_search", "search_context"]
