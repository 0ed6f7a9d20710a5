"""The MLflow UI shows what the pipeline tracks: a real sweep, a real `mlflow server`, chromium.

A real tracking server runs on a SQLite store and a local artifact root (127.0.0.1, a free
port). The real sweep runner (`python -m pipeline.run`, on a local Ray) trains one cell of a
tiny sweep on the embedded default (tiny CLIP, synthetic world) and fails another one (lr 1e30:
a non-finite loss, caught at run time; a missing data folder is now refused before any work),
logging to that server: a parent run, a FINISHED child with
params, per-step metrics and `projectors/projectors.safetensors`, a FAILED child with its reason.
`python -m pipeline.aggregate` then reads the runs over HTTP and writes `report.html`, whose run
links point at the server. Headless chromium loads the experiment page, the runs table with
params and metrics as columns, a run page reached through the report's link, its artifacts and
the failed run. The DOM after the app's JavaScript ran must show the run names, the params, a
per-step metric, the artifact and the failure reason. The screenshots are checked for content.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("mlflow")
pytest.importorskip("ray")
import browser  # noqa: E402  (tests/browser.py)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
EXPERIMENT = "ui-test/ablation_steps"
SWEEP = "ablation_steps"
OK_CELL = "b2n/ToyShapes/4shot/seed1/J7/K2/lr=0.01"
FAILED_CELL = "b2n/ToyShapes/4shot/seed1/J7/K2/lr=1e+30"  # the loss overflows: FAILED
FAILED_REASON = "non-finite training loss"
ML = browser.ML_WORKFLOW  # the UI opens on its GenAI pages unless told "model training"

SWEEP_YAML = """\
name: {sweep}
experiment: {experiment}
fixed:
  protocol: base2novel
  arch: perl-tiny
  pretrained: embedded
  data_root: {world}
  shots: 4
  seed: 1
  num_steps: 2
  dataset: ToyShapes
grid:
  lr: [1.0e-2, 1.0e+30]
resources: {{cpu: 1, gpu: 0}}
storage: {storage}
tracking_uri: {uri}
max_failures: 0
"""


def _env() -> dict[str, str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, never a cluster the user points at
    return env


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    browser.require_chromium()
    tmp = tmp_path_factory.mktemp("mlflow_server")
    t0 = time.monotonic()
    with browser.mlflow_server(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts",
                               log=tmp / "server.log") as url:
        yield {"url": url, "tmp": tmp, "start_s": time.monotonic() - t0}


@pytest.fixture(scope="module")
def runs(server):
    from mlflow import MlflowClient

    tmp = server["tmp"]
    sweep = tmp / "ui_sweep.yaml"
    sweep.write_text(SWEEP_YAML.format(sweep=SWEEP, experiment=EXPERIMENT, world=tmp / "world",
                                       storage=tmp / "runs", uri=server["url"]))
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pipeline.run", str(sweep)], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=480)
    sweep_s = time.monotonic() - t0
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 1, f"expected exit code 1 (one cell fails), got {proc.returncode}:" \
                                 f"\n{log}"
    assert f"FAILED {FAILED_CELL}" in proc.stdout, log

    client = MlflowClient(server["url"])
    exp = client.get_experiment_by_name(EXPERIMENT)
    assert exp is not None, log
    by_name = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    parents = [r for r in by_name.values() if r.data.tags.get("phase") == "sweep"]
    assert len(parents) == 1, sorted(by_name)
    assert {OK_CELL, FAILED_CELL} <= set(by_name), sorted(by_name)
    return {"exp_id": exp.experiment_id, "client": client, "parent": parents[0],
            "ok": by_name[OK_CELL], "failed": by_name[FAILED_CELL], "sweep_s": sweep_s}


@pytest.fixture(scope="module")
def report(server, runs, tmp_path_factory):
    """`python -m pipeline.aggregate` over HTTP: its report links runs to this server's UI."""
    out = tmp_path_factory.mktemp("aggregate")
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.aggregate", "--tracking-uri", server["url"],
         "--experiment", EXPERIMENT, "--out", str(out), "--no-log", "--quiet"],
        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (out / "report.html").read_text(encoding="utf-8")


def _text(dom: str) -> str:
    """The visible text of a DOM (scripts and styles dropped, whitespace collapsed)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).replace("&amp;", "&").split())


def test_pipeline_logged_to_the_server(server, runs):
    ok, bad, parent = runs["ok"], runs["failed"], runs["parent"]
    assert ok.info.status == "FINISHED" and bad.info.status == "FAILED"
    for r in (ok, bad):
        assert r.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert r.data.tags["sweep"] == SWEEP and r.data.tags["phase"] == "final"
    assert ok.data.params["inject_layer"] == "7" and ok.data.params["num_steps"] == "2"
    assert {"base/acc", "novel/acc", "hm", "base/acc_step0", "base/acc_step2"} <= \
        set(ok.data.metrics)
    arts = {a.path for a in runs["client"].list_artifacts(ok.info.run_id, "projectors")}
    assert arts == {"projectors/projectors.safetensors"}
    assert FAILED_REASON in bad.data.tags["status_detail"]
    assert server["start_s"] < 120 and runs["sweep_s"] < 480


def test_experiment_page_lists_parent_and_child_runs(server, runs):
    # Sorted by a param, the runs table lists parent and children flat (sorted by date it nests
    # the children under a collapsed parent), so every run name is in the DOM.
    url = (f"{server['url']}/#/experiments/{runs['exp_id']}/runs?{ML}"
           f"&orderByKey={quote('params.`dataset`')}&orderByAsc=true")
    names = [runs["parent"].info.run_name, OK_CELL, FAILED_CELL]
    dom = browser.wait_for_text(url, names)
    text = _text(dom)
    assert "3 matching runs" in text
    assert "ablation_steps" in text  # the experiment in the breadcrumb


def test_runs_table_with_params_and_metrics_as_columns(server, runs, tmp_path):
    view = browser.runs_table_view(["dataset", "inject_layer", "num_steps"],
                                   ["base/acc", "novel/acc", "hm", "base/acc_step0"],
                                   order_by="dataset")
    query = browser.share_view(runs["client"], runs["exp_id"], "perl-columns", view)
    url = f"{server['url']}/#/experiments/{runs['exp_id']}/runs?{query}"
    dom = browser.wait_for_text(url, [OK_CELL, "Parameters", "Metrics", "inject_layer",
                                      "num_steps", "base/acc_step0"], size=(1900, 560))
    assert "ToyShapes" in _text(dom)  # a param value in its column
    png = browser.screenshot(url, tmp_path / "mlflow-experiment.png", size=(1900, 560),
                             virtual_time_budget=15000)
    browser.assert_not_blank(png, min_colours=30)


def test_report_link_opens_the_run_page(server, runs, report, tmp_path):
    rid = runs["ok"].info.run_id
    hrefs = re.findall(r'href="([^"]*/runs/' + rid + r'[^"]*)"', report)
    assert hrefs, "report.html has no link to the finished run"
    href = hrefs[0].replace("&amp;", "&")
    assert href.startswith(server["url"] + "/#/experiments/")
    dom = browser.wait_for_text(href, [OK_CELL, "inject_layer", "base/acc_step2",
                                       runs["parent"].info.run_name, "config_hash"],
                                size=(1600, 1000))
    text = _text(dom)
    assert "Parent run" in text and "Finished" in text
    assert "anchor_weight" in text and "eval_datasets" in text  # every TrainConfig field
    png = browser.screenshot(href, tmp_path / "mlflow-run.png", size=(1600, 1000),
                             virtual_time_budget=15000)
    browser.assert_not_blank(png, min_colours=30)


def test_run_artifacts(server, runs):
    rid = runs["ok"].info.run_id
    url = (f"{server['url']}/#/experiments/{runs['exp_id']}/runs/{rid}/artifacts/"
           f"projectors/projectors.safetensors?{ML}")
    dom = browser.wait_for_text(url, ["projectors.safetensors", "config.json", "metrics.json",
                                      "per_class.json"])
    assert "projectors/projectors.safetensors" in _text(dom)


def test_failed_run_page_shows_the_reason(server, runs):
    rid = runs["failed"].info.run_id
    url = f"{server['url']}/#/experiments/{runs['exp_id']}/runs/{rid}?{ML}"
    dom = browser.wait_for_text(url, [FAILED_CELL, "Failed", "status_detail", FAILED_REASON])
    assert "FloatingPointError" in _text(dom)
