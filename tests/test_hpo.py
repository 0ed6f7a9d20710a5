"""The search phase's persistent Optuna study (pipeline.study, pipeline.run.run_search) and its
section in the aggregate and the report.

- the toy hpo sweep (sweeps/toy/hpo.yaml, on the small test world, 1 epoch) run twice on a real
  local Ray: the second submission resumes the study and runs only the missing sample, and the
  study holds each sample once (the earlier samples are not added a second time);
- a study on a real S3 API (moto) survives the driver's local copy being lost;
- `optuna-dashboard <study url>` as a real process lists the study and its trials;
- the aggregate's search tables from fake MLflow runs: every sample's parameters and objective,
  ties marked, the best sample against the grid default on test, the plots, and which study
  they were drawn from (the persistent file, or rebuilt from MLflow when it is not reachable).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from fake_runs import Store, b2n_metrics, named  # tests/fake_runs.py
from servers import free_port  # tests/servers.py

REPO = Path(__file__).resolve().parents[1]
TOY_HPO = REPO / "sweeps" / "toy" / "hpo.yaml"


# --- the toy hpo sweep, twice ----------------------------------------------------------------


def toy_hpo_yaml(path: Path, *, world: Path, weights: Path, tmp: Path, num_samples: int) -> Path:
    """sweeps/toy/hpo.yaml on the test world: 1 epoch, 2 shots, no Jacobian, CPU."""
    doc = yaml.safe_load(TOY_HPO.read_text())
    doc["fixed"].update(data_root=str(world), pretrained=str(weights), epochs=1, shots=2,
                        jacobian_samples=0, device="cpu", eval_batch_size=64)
    doc["search"]["num_samples"] = num_samples
    doc.update(storage=str(tmp / "runs"), tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
               max_failures=0)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


# `ray_here` (a module-scoped local Ray) comes from tests/conftest.py.


def _main(path: Path) -> tuple[int, str]:
    import contextlib
    import io

    from pipeline.run import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main([str(path)])
    return rc, buf.getvalue()


def _complete(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(states=(TrialState.COMPLETE,))


@pytest.fixture(scope="module")
def searched(tmp_path_factory, world, weights, ray_here):
    """The toy hpo sweep with 2 samples, then re-submitted with 3."""
    import optuna

    from pipeline import tracking

    tmp = tmp_path_factory.mktemp("hpo")
    t0 = time.time()
    rc1, out1 = _main(toy_hpo_yaml(tmp / "hpo.yaml", world=world, weights=weights, tmp=tmp,
                                   num_samples=2))
    study_file = Path(tracking.study_path(str(tmp / "runs"), "perl-toy/hpo"))
    (name,) = optuna.get_all_study_names(f"sqlite:///{study_file}")
    first = [t.params for t in _complete(optuna.load_study(study_name=name,
                                                           storage=f"sqlite:///{study_file}"))]
    rc2, out2 = _main(toy_hpo_yaml(tmp / "hpo.yaml", world=world, weights=weights, tmp=tmp,
                                   num_samples=3))
    return {"tmp": tmp, "rc": (rc1, rc2), "out": (out1, out2), "file": study_file,
            "name": name, "first": first, "seconds": time.time() - t0}


def _hpo_runs(tmp: Path) -> list:
    from pipeline.tracking import Tracker

    t = Tracker(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = t.client.get_experiment_by_name("perl-toy/hpo")
    return [r for r in t.search(exp.experiment_id) if r.data.tags.get("phase") == "hpo"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_resubmission_resumes_the_study_and_runs_only_the_missing_sample(searched):
    import optuna

    out1, out2 = searched["out"]
    assert searched["rc"] == (0, 0), out1 + out2
    name = searched["name"]
    assert f"new study {name!r}" in out1 and "2 to run" in out1
    assert f"resuming study {name!r} with 2 finished samples (2 in the study file, 0 added " \
           "from MLflow)" in out2
    assert "2 earlier sample(s) of 3, 1 to run" in out2
    assert f"optuna-dashboard sqlite:///{searched['file']}" in out2
    runs = _hpo_runs(searched["tmp"])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    assert len({r.data.tags["config_hash"] for r in runs}) == 3
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{searched['file']}")
    done = _complete(study)
    # each sample once: the first two were not added again from MLflow, nothing is RUNNING
    assert len(study.trials) == 3 and len(done) == 3
    assert [t.params for t in done[:2]] == searched["first"]
    assert {t.user_attrs["mlflow_run_id"] for t in done} == {r.info.run_id for r in runs}
    objective = {r.info.run_id: r.data.metrics["val/brier_step4"] for r in runs}
    assert {t.user_attrs["mlflow_run_id"]: t.value for t in done} == objective
    assert study.direction == optuna.study.StudyDirection.MINIMIZE


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_study_file_is_refilled_from_mlflow_without_running_again(searched, capsys):
    import optuna

    # (after the resume test: this one removes the study file)
    moved = searched["file"].with_suffix(".bak")
    searched["file"].rename(moved)
    try:
        rc, out = _main(searched["tmp"] / "hpo.yaml")
        assert rc == 0, out
        assert "with 3 finished sample(s) from MLflow" in out
        assert "3 earlier sample(s) of 3, 0 to run" in out
        assert len(_hpo_runs(searched["tmp"])) == 3
        study = optuna.load_study(study_name=searched["name"],
                                  storage=f"sqlite:///{searched['file']}")
        assert len(_complete(study)) == 3
        assert {t.user_attrs["added_from"] for t in study.trials} == {"mlflow"}
    finally:
        searched["file"].unlink(missing_ok=True)
        moved.rename(searched["file"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_aggregate_draws_the_search_from_the_persistent_study(searched, tmp_path):
    from pipeline.aggregate import aggregate, write_outputs

    agg = aggregate(f"sqlite:///{searched['tmp'] / 'mlflow.db'}", ["perl-toy/hpo"])
    (view,) = agg.searches
    assert view.study_source.startswith(f"persistent study {searched['name']!r}")
    assert view.metric == "val/brier_step4" and view.mode == "min" and len(view.samples) == 3
    best = named(agg.tables, "search__hpo_best")
    assert best.rows[0].cells["hm"].status == "ok"  # the grid default (seed 1) ran
    write_outputs(agg, tmp_path)
    assert (tmp_path / "search__hpo_history.png").stat().st_size > 1000
    assert (tmp_path / "search__hpo_importance.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_optuna_dashboard_lists_the_study_and_its_trials(searched, tmp_path):
    """`optuna-dashboard sqlite:///<storage>/optuna/<slug>.sqlite3` as docs/sweeps.md says."""
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    log = (tmp_path / "dashboard.log").open("w")
    p = subprocess.Popen([str(exe), f"sqlite:///{searched['file']}", "--port", str(port),
                          "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"{base}/api/studies", timeout=5))
                break
            except OSError:
                assert p.poll() is None and time.time() < deadline, \
                    (tmp_path / "dashboard.log").read_text()
                time.sleep(0.5)
        (summary,) = [s for s in studies["study_summaries"]
                      if s["study_name"] == searched["name"]]
        assert summary["directions"] == ["minimize"]
        detail = json.load(urllib.request.urlopen(
            f"{base}/api/studies/{summary['study_id']}?after=0", timeout=10))
        assert [t["state"] for t in detail["trials"]] == ["Complete"] * 3
    finally:
        os.killpg(p.pid, 15)
        p.wait(timeout=30)
        log.close()


# --- the study on S3 ---------------------------------------------------------------------------


def test_a_study_on_s3_survives_the_loss_of_the_drivers_copy(s3_endpoint, monkeypatch):
    import boto3

    from pipeline import study as st
    from pipeline.spec import SearchSpec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="hpo-study")
    search = SearchSpec.model_validate({"space": {"lr": {"type": "loguniform", "low": 1e-4,
                                                         "high": 1e-1}},
                                        "metric": "val/acc", "num_samples": 2})
    sf = st.StudyFile.of("s3://hpo-study/runs", "perl-toy/hpo")
    assert sf.remote and sf.location == "s3://hpo-study/runs/optuna/perl-toy__hpo.sqlite3"
    sf.pull()  # nothing there yet: an empty local copy
    study = st.open_study(sf, "s", "max", fresh=True)
    study.add_trial(st.sample_trial({"lr": 1e-3}, 70.0, st.optuna_space(search), {}))
    sf.push()
    os.remove(sf.local)  # another driver host, or a cleaned tempdir
    sf.pull()
    assert [t.value for t in st.open_study(sf, "s", "max").trials] == [70.0]
    assert [t.params for t in st.read_study(sf.location, "s").trials] == [{"lr": 1e-3}]


# --- the aggregate's search section (fake MLflow runs) ----------------------------------------


def _fake_search(tmp: Path, study_file: str) -> str:
    """A grid default run (lr 1e-2) and 4 samples (2 tie on val/acc) of one search."""
    from perl_core.config import TrainConfig

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    s = Store(uri, tmp)
    exp = s.experiment("test/hpo")
    base = TrainConfig(protocol="base2novel", dataset="ToyShapes", arch="perl-tiny",
                       pretrained="embedded", shots=4, lr=1e-2)
    parent = s.run(exp, "hpo", None, {})
    s.client.set_tag(parent, "search_study", "hpo:b2n:abc")
    s.client.set_tag(parent, "search_study_file", study_file)
    s.client.set_tag(parent, "search_space", json.dumps(
        {"lr": {"type": "loguniform", "low": 1e-5, "high": 1e-1}}))
    s.client.set_tag(parent, "search_metric", "val/brier_step4")
    s.client.set_tag(parent, "search_mode", "min")
    s.run(exp, "hpo", base, {**b2n_metrics(60.0, 50.0), "val/acc": 70.0}, parent=parent)
    # lr -> (val/acc, val/brier_step4, base, novel)
    for lr, (va, vb, b, n) in {1e-3: (75.0, 0.40, 62.0, 52.0), 3e-3: (75.0, 0.30, 64.0, 48.0),
                               1e-4: (72.5, 0.50, 58.0, 50.0), 3e-2: (70.0, 0.45, 61.0, 51.0)
                               }.items():
        s.run(exp, "hpo", base.replace(lr=lr), {**b2n_metrics(b, n), "val/acc": va,
                                                "val/brier_step4": vb, "val/n": 40.0},
              phase="hpo", parent=parent)
    return uri


def test_the_search_section_lists_samples_ties_and_the_best_against_the_default(tmp_path):
    from pipeline.aggregate import aggregate, write_outputs

    uri = _fake_search(tmp_path, str(tmp_path / "gone.sqlite3"))
    agg = aggregate(uri, ["test/hpo"])
    samples = named(agg.tables, "search__hpo")
    assert [r.label for r in samples.rows] == [("#1",), ("#2",), ("#3",), ("#4",)]
    assert [r.info["lr"] for r in samples.rows] == ["0.001", "0.003", "0.0001", "0.03"]
    assert [r.cells["val/brier_step4"].mean for r in samples.rows] == [0.40, 0.30, 0.50, 0.45]
    assert [r.info["best"] for r in samples.rows] == ["", "best", "", ""]
    assert samples.rows[0].info["ties"] == "val/acc = #2" and samples.rows[2].info["ties"] == ""
    assert any(n.startswith("TIE: samples #1, #2 have the same val/acc (75)") and
               "40 images" in n and "2.5 points" in n for n in samples.notes)
    best = named(agg.tables, "search__hpo_best")
    default, pick, delta = best.rows
    assert pick.label == ("best sample #2",) and pick.info["lr"] == "0.003"
    assert default.info["lr"] == "0.01" and default.cells["base/acc"].mean == 60.0
    assert delta.cells["base/acc"].mean == pytest.approx(4.0)
    assert delta.cells["novel/acc"].mean == pytest.approx(-2.0)
    # the study file is not there: the plots come from a study rebuilt from the 4 runs
    (view,) = agg.searches
    assert view.study_source.startswith("rebuilt from 4 MLflow run(s) (study file ")
    assert len(view.study.trials) == 4 and view.study.best_trial.params == {"lr": 3e-3}
    write_outputs(agg, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Hyper-parameter search (Optuna)" in html and "rebuilt from 4 MLflow run(s)" in html
    assert html.count('src="data:image/png') >= 2  # history and importances
    assert "search__hpo.csv" in os.listdir(tmp_path / "out")


def test_the_search_plots_come_from_the_study_file_when_it_is_there(tmp_path):
    import optuna

    from pipeline.aggregate import aggregate

    f = tmp_path / "study.sqlite3"
    study = optuna.create_study(storage=f"sqlite:///{f}", study_name="hpo:b2n:abc",
                                direction="minimize")
    study.enqueue_trial({"lr": 1e-3})
    study.optimize(lambda t: t.suggest_float("lr", 1e-5, 1e-1, log=True), n_trials=5)
    agg = aggregate(_fake_search(tmp_path, str(f)), ["test/hpo"])
    (view,) = agg.searches
    assert view.study_source == f"persistent study 'hpo:b2n:abc' in {f}"
    assert len(view.study.trials) == 5  # the file's trials, not the 4 MLflow runs


def test_an_s3_study_written_by_another_driver_is_not_overwritten(s3_endpoint, monkeypatch,
                                                                  tmp_path):
    """Two drivers of one search at once: the second upload finds the file changed since its
    download and refuses (StudyConflict, which pipeline.run prints as a warning)."""
    import boto3

    from pipeline import study as st
    from pipeline.spec import SearchSpec

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="hpo-race")
    space = st.optuna_space(SearchSpec.model_validate({
        "space": {"lr": {"type": "loguniform", "low": 1e-4, "high": 1e-1}},
        "metric": "val/acc"}))
    loc = st.StudyFile.of("s3://hpo-race/runs", "perl-toy/race").location
    a, b = (st.StudyFile(loc, str(tmp_path / n / "s.sqlite3")) for n in ("a", "b"))
    for sf in (a, b):  # both start from no file
        sf.pull()
    for sf, value in ((a, 70.0), (b, 60.0)):
        st.open_study(sf, "s", "max").add_trial(
            st.sample_trial({"lr": 1e-3}, value, space, {}))
    a.push()
    a.push()  # its own earlier upload is no conflict
    with pytest.raises(st.StudyConflict, match="written by another driver"):
        b.push()
    assert [t.value for t in st.read_study(loc, "s").trials] == [70.0]  # a's samples stay
    b.pull()  # after a new download, b may upload again
    b.push()
