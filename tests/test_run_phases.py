"""The driver's pieces without Ray or training (issue 17): the typed TrialContext, the fault
hooks' one seam, the progress interval, the one best-sample rule, the search phase's data rule
and Tune experiment name, the OptunaSearch map guard, the Outcome's totals, and the CUDA cache
emptied after a failed trial too (issue 19)."""

from __future__ import annotations

import argparse
import dataclasses
import pickle
from types import SimpleNamespace as NS

import pytest

from perl_core.config import TrainConfig
from pipeline import layout
from pipeline.context import TrialContext, trial_context

SWEEP = ("name: s\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, "
         "pretrained: embedded}\nsearch:\n  metric: val/acc\n  num_samples: 3\n  space:\n"
         "    lr: {type: loguniform, low: 0.0001, high: 0.1}\n")


def _spec(tmp_path, text: str = SWEEP):
    from pipeline.spec import parse_spec

    return parse_spec(text, env={}, cwd=tmp_path)


def _context(tmp_path, spec=None) -> TrialContext:
    args = argparse.Namespace(sweep=str(tmp_path / "s.yaml"), rerun=False,
                              ignore_code_version=False)
    code = NS(sha="abc", dirty=False, version="abc+0")
    return trial_context(spec or _spec(tmp_path), "sqlite:///x.db", "1", "p", code, args,
                         user="u", varied_fields=("lr",))


# --- TrialContext ------------------------------------------------------------------------------


def test_the_trial_context_is_frozen_typed_and_pickles_without_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    ctx = _context(tmp_path)
    blob = pickle.dumps(ctx)
    assert pickle.loads(blob) == ctx and b"s3cr3t-value" not in blob
    with pytest.raises(dataclasses.FrozenInstanceError):
        ctx.phase = "x"  # type: ignore[misc]
    assert ctx.phase == layout.GRID_PHASE and ctx.done_code_version == "abc+0"
    assert dataclasses.replace(ctx, ignore_code_version=True).done_code_version is None
    assert ctx.varied == ("lr",)


def test_the_search_context_is_the_grid_context_replaced(tmp_path):
    from pipeline.search import search_context
    from pipeline.trainable import trial_config

    spec = _spec(tmp_path)
    ctx = search_context(_context(tmp_path, spec), spec)
    assert ctx.phase == layout.SEARCH_PHASE and ctx.search_fields == ("lr",)
    assert ctx.varied == ("lr",) and ctx.tracking_uri == "sqlite:///x.db"
    name, cfg = trial_config({"lr": 0.01}, pickle.loads(pickle.dumps(ctx)))
    assert cfg.lr == 0.01 and name == f"{ctx.base_name}/hpo/lr=0.01"


def test_an_older_drivers_dict_still_reads(tmp_path):
    """A Tune state restored by a re-submission may hold the old untyped dict."""
    from pipeline.trainable import cache_settings

    new = _context(tmp_path)
    old = {**dataclasses.asdict(new), "feature_cache": dict(new.cache), "match_code": "abc+0",
           "grid_hashes": ["h1"], "imports": ["m"]}
    del old["cache"]
    ctx = TrialContext.from_any(old)
    assert ctx.cache == new.cache and ctx.imports == ("m",) and ctx.sweep == "s"
    assert TrialContext.from_any(ctx) is ctx
    assert cache_settings(ctx) == cache_settings(old)


# --- fault hooks and the progress interval -------------------------------------------------


def test_the_fault_hooks_are_off_unless_set(monkeypatch):
    import torch

    from pipeline import faults

    monkeypatch.delenv(faults.FAULT_ENV, raising=False)
    monkeypatch.delenv(faults.STEP_DELAY_ENV, raising=False)
    assert faults.step_hook("c", "ToyShapes") is None
    monkeypatch.setenv(faults.FAULT_ENV, "oom:ToyCounts:2")
    assert faults.step_hook("c", "ToyShapes") is None  # another dataset
    hook = faults.step_hook("c", "ToyCounts")
    hook(1)
    with pytest.raises(torch.OutOfMemoryError, match=r"injected by \$PERL_TEST_FAULT after "
                                                      r"optimizer step 2 of c"):
        hook(2)
    monkeypatch.setenv(faults.FAULT_ENV, "oom:ToyCounts")
    with pytest.raises(ValueError, match="expected 'oom:<dataset>:<step>'"):
        faults.step_hook("c", "ToyCounts")


def test_a_bad_progress_interval_warns_and_falls_back():
    pytest.importorskip("ray")
    from pipeline.progress import DEFAULT_EVERY_S, progress_every_s

    said: list[str] = []
    assert progress_every_s({}, said.append) == DEFAULT_EVERY_S and not said
    assert progress_every_s({"PERL_PROGRESS_EVERY_S": "5"}, said.append) == 5.0 and not said
    for bad in ("5s", "0", "-1", "nan", "inf"):
        assert progress_every_s({"PERL_PROGRESS_EVERY_S": bad}, said.append) == DEFAULT_EVERY_S
    assert len(said) == 5 and "'5s' is not a positive number" in said[0]


# --- the search phase ------------------------------------------------------------------------


def test_one_best_sample_rule_for_the_driver_and_the_aggregate():
    import optuna

    from pipeline import study as st
    from pipeline.aggregate.search import SearchSample, SearchView, _best_sample
    from pipeline.search import best_summary

    assert st.best_sample([1, 3, 3, 2], "max", float) == 3
    vals = [("a", 0.5), ("b", 0.2), ("c", 0.2), ("d", None)]
    assert st.best_sample(vals, "min", lambda v: v[1]) == ("b", 0.2)  # the earliest of a tie
    assert st.best_sample([("d", None)], "max", lambda v: v[1]) is None

    st.quiet_optuna()
    study = optuna.create_study(direction="maximize")
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for i, (lr, v) in enumerate([(1e-3, 0.5), (2e-3, 0.7), (3e-3, 0.7)]):
        study.add_trial(st.sample_trial({"lr": lr}, v, space, {"cell": f"c{i}"}))
    assert best_summary(study, "max") == {"value": 0.7, "cell": "c1", "lr": 2e-3}
    view = SearchView("e", "1", "s", (), ("lr",), "val/acc", "max", [
        SearchSample(i + 1, f"r{i}", {"lr": t.params["lr"]}, {"val/acc": t.value})
        for i, t in enumerate(study.trials)])
    assert _best_sample(view).run_id == "r1"  # the same sample


def _run(lr: float, acc: float, digest: str | None, base: TrainConfig):
    tags = {"cell": f"c{lr}"} | ({"data_digest.ToyShapes": digest} if digest else {})
    params = {k: str(v) for k, v in base.replace(lr=lr).to_dict().items()}
    return NS(data=NS(params=params, metrics={"val/acc": acc}, tags=tags),
              info=NS(run_id=f"r{lr}"))


def test_search_samples_on_old_data_are_not_counted(tmp_path):
    """Defect 1 (issue 16 review): the grid phase's data rule applies to the search phase."""
    from pipeline import study as st
    from pipeline.search import prior_samples

    spec = _spec(tmp_path)
    base = spec.base_config()
    now = {"ToyShapes": NS(dataset="ToyShapes", digest="new", kind="dir", source="/w")}
    runs = [_run(1e-3, 0.5, "new", base), _run(2e-3, 0.9, "old", base),
            _run(3e-3, 0.6, None, base)]  # (a run from before the digest tag counts)
    got = prior_samples(runs, spec.search, base, now)
    assert sorted(p.run_id for p in got) == ["r0.001", "r0.003"]
    # the study too is one per data: samples of old data neither count nor guide TPE
    names = {st.study_name("s", "b", "h", spec.search, "c", data)
             for data in ({"ToyShapes": "new"}, {"ToyShapes": "old"}, None)}
    assert len(names) == 3


def test_the_search_tune_experiment_is_named_by_the_search_not_its_progress(tmp_path):
    """Defect 2: an interrupted search is restored (the name has no `done` count)."""
    from pipeline.search import search_tune_name

    spec = _spec(tmp_path)
    name = search_tune_name(spec, "s:b:abc")
    assert name == search_tune_name(spec, "s:b:abc")
    assert name.startswith(layout.tune_prefix("e", layout.SEARCH_PHASE))
    more = spec.model_copy(update={"search": spec.search.model_copy(update={"num_samples": 5})})
    assert search_tune_name(more, "s:b:abc") != name != search_tune_name(spec, "s:b:other")


def test_optuna_search_still_keeps_its_trial_map(caplog):
    """Defect 4: the one private Ray attribute the searcher reads, checked on this Ray."""
    pytest.importorskip("ray")
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    from pipeline.search import optuna_trial_of

    s = OptunaSearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1)},
                     metric="val/acc", mode="max")
    s.suggest("t1")
    assert optuna_trial_of(s, "t1") is not None and optuna_trial_of(s, "t2") is None
    assert optuna_trial_of(NS(), "t1") is None and "no `_ot_trials`" in caplog.text


# --- results ---------------------------------------------------------------------------------


def test_phases_return_results_and_the_outcome_adds_them():
    from pipeline.collect import Outcome, PhaseResult, collect

    ctx = NS(tracking_uri="sqlite:////nonexistent/dir/x.db", experiment_id="1",
             parent_run_id="p")
    grid = [NS(config={"cell": {"name": "a"}}, metrics={"done": 1.0, "mlflow_logged": 0.0},
               error=None),
            NS(config={"cell": {"name": "b"}}, metrics={"skipped": 1.0}, error=None),
            NS(config={"cell": {"name": "c"}}, metrics={},
               error=RuntimeError("x\nValueError: y")),
            NS(config={"cell": {"name": "d"}}, metrics={"done": 1.0}, error=None)]
    got = collect(grid, ctx, counted={"d"})
    assert (got.finished, got.skipped, got.unlogged) == (["a"], ["b"], ["a"])
    assert got.failed == [("c", "ValueError: y")]
    out = Outcome(done_before=[NS(name="d")])
    out.add(got)
    out.add(PhaseResult(finished=["s1"], best={"value": 1.0}))
    out.add(PhaseResult(linked=["l1"]))  # the link phase (pipeline.links)
    assert out.count_tags() == {"num_finished": "2", "num_failed": "1", "num_skipped": "2",
                                "num_linked": "1"}
    assert out.search_best == {"value": 1.0} and out.exit_code() == 1
    out.replayed_at_end(1)
    assert out.unlogged == [] and out.replayed == 1


# --- the trainable's train step --------------------------------------------------------------


@pytest.mark.parametrize("fails", [False, True])
def test_the_cuda_cache_is_emptied_after_fit_even_when_it_fails(monkeypatch, fails):
    """Issue 19: a failed trial gives its cached GPU memory back too."""
    import perl_core.train
    from pipeline import trainable

    calls = []
    monkeypatch.setattr(trainable, "_empty_cuda_cache", lambda: calls.append(1))
    monkeypatch.setattr(trainable, "build_model", lambda cfg: object())
    monkeypatch.setattr(trainable, "_progress_callback", lambda *a: None)

    def fake_fit(cfg, **kw):
        if fails:
            raise RuntimeError("boom")
        return NS(metrics={"base/acc": 0.5}, train_seconds=1.0, eval_seconds=0.5)

    monkeypatch.setattr(perl_core.train, "fit", fake_fit)
    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", num_workers=0)
    trial = NS(cfg=cfg, name="c", clock=trainable._Clock(), weights=None)
    run = NS(device_error=None, device=None, cache=None)
    if fails:
        with pytest.raises(RuntimeError, match="boom"):
            trainable.train(trial, run)
    else:
        assert trainable.train(trial, run).metrics["base/acc"] == 0.5
    assert calls == [1]
