"""`python -m pipeline.bench` and the trainable's feature cache.

- the bench runs a real sweep (local Ray, MLflow SQLite, perl-tiny on a synthetic world) and
  prints every figure, positive and finite; the trials ran in `group_order`'s order (so Tune
  keeps the order of the grid_search list); every child run carries the cache tags and metrics,
  and the trials after the first of their group read the cache;
- the real-trial time from a perl_core.bench JSON, and its errors;
- the trainable's cache settings (the sweep's `cache:` through the driver's trial context)
  and the per-process cache.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from perl_core.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]


def _finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_bench_runs_a_real_sweep_and_reports_the_overhead(tmp_path):
    work = tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0",
           "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.bench", "--trials", "4", "--real-trial-s", "100",
         "--workdir", str(work), "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout)  # the JSON alone on stdout
    assert res["trials"] == 4 and res["steady_state_trials"] >= 1
    per = res["per_trial_overhead_s"]
    for key in ("mean", "p90", "min", "max"):
        assert _finite_positive(per[key]), per
        assert _finite_positive(res["fit_compute_s"][key])
    assert per["min"] <= per["mean"] <= per["max"] and per["p90"] <= per["max"]
    for key in ("sweep_wall_s", "startup_s", "amortized_overhead_s"):
        assert _finite_positive(res[key]), key
    assert res["teardown_s"] >= 0
    for phase, v in res["breakdown_mean_s"].items():
        assert v is not None and math.isfinite(v) and v >= 0, phase
    assert _finite_positive(res["breakdown_mean_s"]["mlflow_log"])
    assert _finite_positive(res["breakdown_mean_s"]["mlflow_start"])
    for part, v in res["startup_breakdown_s"].items():
        assert _finite_positive(v), part
    assert res["real_trial_s"] == 100.0
    assert res["overhead_fraction_of_real_trial"]["mean"] == pytest.approx(per["mean"] / 100)
    assert res["overhead_fraction_of_real_trial"]["p90"] == pytest.approx(per["p90"] / 100)
    # Tune ran the trials in group_order's order (K-major YAML, seed-grouped order)
    assert res["order_preserved"] is True
    assert [r["cell"].split("/")[3:6:2] for r in res["trial_log"]] == \
        [["seed1", "K1"], ["seed1", "K2"], ["seed2", "K1"], ["seed2", "K2"]]

    # every child run: cache tags and this trial's hits/misses; timing metrics
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench/pipeline_overhead")
    runs = client.search_runs([exp.experiment_id], "tags.phase = 'final'",
                              order_by=["attributes.start_time ASC"])
    assert len(runs) == 4
    for r in runs:
        assert r.info.status == "FINISHED"
        assert r.data.tags["feature_cache"] == str(work / "cache")
        assert r.data.tags["feature_cache_dtype"] == "float32"
        assert "feature_cache_dtype" not in r.data.params  # params stay TrainConfig fields
        m = r.data.metrics
        assert m["feature_cache/hits"] + m["feature_cache/misses"] > 0
        assert m["timing/fit_compute_s"] > 0 and "timing/mlflow_start_s" in m
    assert runs[0].data.metrics["feature_cache/image_hit"] == 0  # cold cache
    # the others read the test-set features the first one wrote
    assert all(r.data.metrics["feature_cache/image_hit"] > 0 for r in runs[1:])
    # the bench's totals are these runs' metrics summed
    for key in ("hits", "misses", "image_hit", "image_miss"):
        assert res["feature_cache"][key] == sum(r.data.metrics[f"feature_cache/{key}"]
                                                for r in runs), key


def test_analyse_and_p90_on_known_rows():
    from pipeline.bench import analyse, p90

    assert p90([1.0]) == 1.0 and p90([0.0, 10.0]) == pytest.approx(9.0)
    rows = [{"cell": f"c{i}", "pid": 7, "entry_unix": 100.0 + 10 * i, "exit_unix": 105.0 + 10 * i,
             "train_seconds": 3.0, "eval_seconds": 1.0, "phases": {"mlflow_log": 0.5}}
            for i in range(3)]
    res = analyse(rows, t_start=90.0, t_end=126.0, concurrency=1)
    assert res["startup_s"] == 10.0 and res["teardown_s"] == 1.0
    assert res["in_trial_overhead_s"]["mean"] == pytest.approx(1.0)
    # steady state: 1 s in the trial + the 5 s gap before it
    assert res["per_trial_overhead_s"]["mean"] == pytest.approx(6.0)
    assert res["breakdown_mean_s"]["scheduling"] == pytest.approx(5.0)
    assert res["amortized_overhead_s"] == pytest.approx((36.0 - 12.0) / 3)


def test_real_trial_from_a_perl_core_bench_file(tmp_path):
    from pipeline.bench import main, real_trial_from_bench

    path = tmp_path / "bench.json"
    path.write_text(json.dumps({
        "arch": "ViT-B-16-quickgelu", "device": "cuda",
        "perl_eval_img_per_s_cached": 500.0, "perl_eval_img_per_s_uncached": 100.0,
        "train_step_s_by_classes": {"10": {"cached": 0.01, "uncached": 0.02},
                                    "100": {"cached": 0.05, "uncached": 0.5}}}))
    s, how = real_trial_from_bench(path, classes=100, shots=16, batch=4, epochs=1,
                                   eval_images=2000)
    assert s == pytest.approx(400 * 0.05 + 2000 / 500.0)
    assert "400 steps" in how and "WARNING" not in how
    with pytest.raises(ValueError, match=r"no entry for 50 classes .*'10', '100'"):
        real_trial_from_bench(path, classes=50, shots=16, batch=4, epochs=1, eval_images=0)
    tiny = tmp_path / "tiny.json"
    tiny.write_text(json.dumps({"arch": "perl-tiny", "device": "cpu",
                                "perl_eval_img_per_s_cached": 50.0,
                                "perl_eval_img_per_s_uncached": 10.0,
                                "train_step_s_by_classes": {"10": {"cached": 0.1,
                                                                   "uncached": 0.2}}}))
    assert "not ViT-B/16" in real_trial_from_bench(tiny, classes=10, shots=16, batch=4,
                                                   epochs=1, eval_images=0)[1]
    # the file is checked as the dry run checks it (pipeline.estimate.load_bench)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"arch": "perl-tiny", "train_step_s_by_classes": {
        "10": {"cached": 0.1}}}))
    with pytest.raises(ValueError, match="missing key"):
        real_trial_from_bench(partial, classes=10, shots=16, batch=4, epochs=1, eval_images=0)
    assert main(["--bench", str(partial)]) == 2
    assert main(["--bench", str(tmp_path / "nope.json")]) == 2
    assert main(["--trials", "3"]) == 2  # odd: refused before any work


# --- the trainable's feature cache ----------------------------------------------------------------


def _context_of(sweep_yaml: str, tmp_path, env: dict[str, str]) -> dict:
    """The trial context the driver builds for this sweep file, through the pickle round trip
    of `tune.with_parameters` (the worker sees a copy)."""
    import argparse
    import pickle
    from types import SimpleNamespace

    from pipeline.run import trial_context
    from pipeline.spec import parse_spec

    spec = parse_spec(sweep_yaml, env=env, cwd=tmp_path)
    args = argparse.Namespace(sweep=str(tmp_path / "s.yaml"), rerun=False,
                              ignore_code_version=False)
    code = SimpleNamespace(sha="abc", dirty=False, version="abc")
    return pickle.loads(pickle.dumps(trial_context(spec, "sqlite:///x.db", "1", "p", code, args)))


SWEEP_HEAD = ("name: s\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, "
              "pretrained: embedded}\n")


def test_the_sweeps_cache_block_reaches_the_workers_feature_cache(tmp_path):
    """cache: in the sweep file -> the driver's trial context -> the worker's FeatureCache (url
    with ${VAR} and a relative path resolved by the driver, max_gb, dtype; enabled: false)."""
    import torch

    from pipeline.trainable import cache_settings, cache_tags, feature_cache

    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded")
    ctx = _context_of(SWEEP_HEAD + "cache: {url: '${PERL_TEST_FC}/fc', max_gb: 0.5, "
                      "dtype: float16}\n", tmp_path, {"PERL_TEST_FC": str(tmp_path / "env")})
    settings = cache_settings(ctx)
    assert settings == {"enabled": True, "url": str(tmp_path / "env" / "fc"), "max_gb": 0.5,
                        "dtype": "float16"}
    cache = feature_cache(settings, cfg)
    assert cache.max_bytes == 2**29 and cache.dtype == torch.float16
    assert cache_tags(settings, cache) == {"feature_cache": str(tmp_path / "env" / "fc"),
                                           "feature_cache_dtype": "float16"}
    assert (tmp_path / "env" / "fc").is_dir()  # the cache lives at the resolved url

    relative = cache_settings(_context_of(SWEEP_HEAD + "cache: {url: rel/fc}\n", tmp_path, {}))
    assert relative["url"] == str(tmp_path / "rel" / "fc")  # the submit dir's, not the worker's
    assert (relative["max_gb"], relative["dtype"]) == (20.0, "float32")  # the defaults

    off = cache_settings(_context_of(SWEEP_HEAD + "cache: {enabled: false, url: /nowhere}\n",
                                     tmp_path, {}))
    assert off["enabled"] is False and feature_cache(off, cfg) is None
    assert cache_tags(off, None) == {"feature_cache": "off", "feature_cache_dtype": "none"}
    default = cache_settings(_context_of(SWEEP_HEAD, tmp_path, {}))  # no cache: block
    assert default == {"enabled": True, "url": None, "max_gb": 20.0, "dtype": "float32"}


def test_cache_settings_are_validated_and_required():
    from pipeline.trainable import cache_settings

    with pytest.raises(ValueError, match="dtype"):
        cache_settings({"feature_cache": {"dtype": "int8"}})
    with pytest.raises(KeyError):  # every driver context carries them (pipeline.run)
        cache_settings({"sweep_file": "s.yaml"})


def test_feature_cache_is_built_once_per_process_and_skipped_for_random_init(tmp_path):
    import torch

    from pipeline.trainable import cache_metrics, cache_tags, feature_cache

    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded")
    settings = {"enabled": True, "url": str(tmp_path / "c"), "max_gb": 1.0, "dtype": "float16"}
    a = feature_cache(settings, cfg)
    assert a is feature_cache(dict(settings), cfg.replace(seed=2))  # reused by the next trial
    assert a.dtype == torch.float16 and a.max_bytes == 2**30
    assert cache_tags(settings, a) == {"feature_cache": str(tmp_path / "c"),
                                       "feature_cache_dtype": "float16"}
    b = feature_cache({**settings, "dtype": "float32"}, cfg)
    assert b is not a and b.dtype == torch.float32
    assert feature_cache(settings, cfg.replace(pretrained="")) is None
    assert feature_cache({**settings, "enabled": False}, cfg) is None
    assert cache_tags({**settings, "enabled": False}, None)["feature_cache"] == "off"
    before = b.stats()
    b.get_or_compute(b.key(kind="t"), lambda: torch.ones(2), kind="image")
    b.get_or_compute(b.key(kind="t"), lambda: torch.ones(2), kind="image")
    m = cache_metrics(b, before)
    assert (m["feature_cache/hits"], m["feature_cache/misses"]) == (1.0, 1.0)
    assert (m["feature_cache/image_hit"], m["feature_cache/image_miss"]) == (1.0, 1.0)


def test_an_unusable_cache_location_raises_in_feature_cache(tmp_path):
    """feature_cache() raises on a location it cannot create (train_cell then runs uncached)."""
    from pipeline.trainable import feature_cache

    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded")
    with pytest.raises(OSError):
        feature_cache({"enabled": True, "url": str(blocker / "cache"), "max_gb": 1.0,
                       "dtype": "float32"}, cfg)


# --- the trainable's timing of fit ----------------------------------------------------------------


def test_fit_phases_of_a_resumed_attempt_are_its_own_and_add_up(world, tiny_arch, one_thread):
    """A retried trial resumes with the earlier attempt's train_seconds, and fit's training timer
    runs through the checkpoint saves: neither may leak into this attempt's phases (fit_other
    went negative). Checkpoints are kept in memory, each save made slow on purpose."""
    import time

    from perl_core.checkpoint import MemoryCheckpoint
    from perl_core.train import Callback, build_model, fit
    from pipeline.trainable import TuneCheckpoint, fit_phases

    store = MemoryCheckpoint()

    class Ckpt(TuneCheckpoint):  # Tune's storage replaced by memory
        def _fetch(self):
            return store.load()

        def _persist(self, state):
            time.sleep(0.05)
            store.save(state)

    class SlowThenStop(Callback):  # the first attempt: slow steps, then preempted at step 7
        def on_step_end(self, step, logs):
            time.sleep(0.25)
            if step == 7:
                raise KeyboardInterrupt

    cfg = TrainConfig(dataset="ToyShapes", data_root=str(world), arch=tiny_arch, pretrained="",
                      inject_layer=2, num_steps=2, shots=2, epochs=2, batch_size=4, lr=1e-3,
                      device="cpu", eval_batch_size=64)
    first = Ckpt()
    with pytest.raises(KeyboardInterrupt):
        fit(cfg, callbacks=[SlowThenStop()], checkpoint=first, checkpoint_every=2, progress=False)
    assert len(first.saves) == 4  # steps 2, 4, 5 (epoch end), 6

    again, model = Ckpt(), build_model(cfg)  # a fresh model, as a new worker builds it
    t0 = time.perf_counter()
    result = fit(cfg, model=model, checkpoint=again, checkpoint_every=2, progress=False)
    fit_s = time.perf_counter() - t0
    # the step-6 state holds the earlier attempt's time: 5 slow steps (1.25 s) and 3 saves
    assert again.resumed_step == 6 and again.resumed_train_s >= 1.25 + 3 * 0.05
    # steps 8 (in the training timer) and 10 (epoch end, the last: after the timer stopped)
    assert [at < result.train_seconds for _, at in again.saves] == [True, False]
    old_other = fit_s - (result.train_seconds + result.eval_seconds) - again.seconds
    assert old_other < 0  # what the trainable reported before
    phases = fit_phases(fit_s, result, again)
    assert all(v >= 0 for v in phases.values()), phases
    assert sum(phases.values()) == pytest.approx(fit_s, abs=1e-9)
    assert phases["fit_checkpoint"] >= 0.1  # two slow saves (and the load)
    assert phases["fit_compute"] < result.train_seconds - again.resumed_train_s \
        + result.eval_seconds  # the save in the timer is not compute


def test_bench_takes_set_overrides_and_refuses_a_bad_one_before_the_sweep(tmp_path, capsys,
                                                                          monkeypatch):
    from pipeline import run as pipeline_run
    from pipeline.bench import main

    monkeypatch.setattr(pipeline_run, "main", lambda argv: pytest.fail(f"ran {argv}"))
    assert main(["--trials", "2", "--workdir", str(tmp_path), "--set", "fixed.lr=0"]) == 2
    err = capsys.readouterr().err
    assert "--set fixed.lr" in err and "lr=0" in err, err
