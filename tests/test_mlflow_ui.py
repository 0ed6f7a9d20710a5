"""The MLflow UI shows what the pipeline tracks: a real `mlflow server`, headless chromium.

A real server runs on a SQLite store and a local artifact root (127.0.0.1, a free port). Runs are
written through the pipeline's own tracking code (`pipeline.tracking.Tracker`, as
`pipeline.run` / `pipeline.trainable` do: a parent run per submission, a child run per cell
named by `pipeline.spec.cell_name`, params = every TrainConfig field, per-step metrics,
`projectors/projectors.safetensors` written by `perl_core.train.save_projectors`), then chromium
loads the experiment page and a child run page, and the DOM after the app's JavaScript ran must
show the run names, params, a per-step metric and the artifact.

SYNTHETIC FIXTURE: the metric values and projector weights are invented (no training happens
here); the experiment is named `fixture/...`.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from perl_core.config import TrainConfig

pytest.importorskip("mlflow")
import browser  # noqa: E402  (tests/browser.py)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

EXPERIMENT = "fixture/ablation_steps"
SWEEP = "ablation_steps"
PARENT_NAME = "ablation_steps 2026-01-01 00:00"  # as pipeline.run names a submission
STEPS = (2, 4)  # two finished cells (num_steps), plus one FAILED cell (num_steps=3)
FAILED_DETAIL = "fixture: NaN loss at step 7"
ML = browser.ML_WORKFLOW  # the UI opens on its GenAI pages unless told "model training"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    browser.require_chromium()
    tmp = tmp_path_factory.mktemp("mlflow_server")
    t0 = time.monotonic()
    with browser.mlflow_server(f"sqlite:///{tmp / 'mlflow.db'}", tmp / "artifacts",
                               log=tmp / "server.log") as url:
        yield {"url": url, "tmp": tmp, "start_s": time.monotonic() - t0}


def _projectors_blob(cfg: TrainConfig, metrics: dict[str, float]) -> bytes:
    """A projectors file exactly as a trial writes it (`save_projectors`), with the shapes of
    ViT-B/16's projectors (vision width 768, text width 512: 3,841 + 2,561 parameters) and
    random (synthetic) weights."""
    import torch

    from perl_core.projector import ThoughtProjector
    from perl_core.train import TrainResult, save_projectors

    torch.manual_seed(0)
    state = {f"{name}.0.0.{k}": v for name, width in (("vision", 768), ("text", 512))
             for k, v in ThoughtProjector(width).state_dict().items()}
    result = TrainResult(config=cfg, metrics=metrics, history=[], projector_state=state,
                         per_class={}, num_trainable_parameters=sum(v.numel()
                                                                     for v in state.values()),
                         train_seconds=0.0, eval_seconds=0.0)
    with tempfile.TemporaryDirectory() as d:
        save_projectors(Path(d) / "projectors.safetensors", result)
        return (Path(d) / "projectors.safetensors").read_bytes()


def _metrics(K: int) -> dict[str, float]:
    b, n = 60.0 + K, 50.0 + K  # synthetic
    m = {"base/acc": b, "novel/acc": n, "hm": 2 * b * n / (b + n)}
    for k in range(K + 1):
        for ev, acc in (("base", b), ("novel", n)):
            m[f"{ev}/acc_step{k}"] = acc - (K - k)
            m[f"{ev}/confidence_step{k}"] = 50.0 + 5 * k
            m[f"{ev}/brier_step{k}"] = 0.6 - 0.05 * k
            m[f"{ev}/kl_step{k}"] = 0.1 * k
    return m


@pytest.fixture(scope="module")
def runs(server):
    from pipeline import tracking
    from pipeline.spec import cell_name

    tracker = tracking.Tracker(server["url"])
    exp_id = tracker.experiment_id(EXPERIMENT)
    parent = tracker.start_parent(exp_id, SWEEP, PARENT_NAME, {"code_sha": "0" * 40})
    base = TrainConfig(protocol="base2novel", dataset="ToyShapes", arch="perl-tiny",
                       pretrained="embedded", seed=1)
    children = {}
    for K in STEPS:
        cfg = base.replace(num_steps=K)
        name = cell_name(cfg, ["num_steps"])
        metrics = _metrics(K)
        tags = {"config_hash": cfg.config_hash(), "code_sha": "0" * 40, "sweep": SWEEP,
                "phase": "final", "dataset": cfg.dataset, "protocol": cfg.protocol, "cell": name}
        record = tracking.TrialRecord(
            record_id=tracking.new_record_id(), experiment=EXPERIMENT, run_name=name,
            config=cfg.to_dict(), config_hash=cfg.config_hash(), metrics=metrics,
            history=[{"step": i, "loss": 2.0 - 0.1 * i, "ce": 1.5 - 0.1 * i, "anchor": 0.5}
                     for i in range(10)],
            per_class={}, num_trainable_parameters=6402, tags=tags, parent_run_id=parent)
        children[K] = (name, tracking.log_record(tracker, exp_id, record,
                                                 _projectors_blob(cfg, metrics),
                                                 parent_run_id=parent))
    bad = base.replace(num_steps=3)
    bad_name = cell_name(bad, ["num_steps"])
    rid = tracker.start_trial(exp_id, parent, bad_name, bad,
                              {"config_hash": bad.config_hash(), "sweep": SWEEP,
                               "phase": "final", "dataset": bad.dataset,
                               "protocol": bad.protocol, "cell": bad_name})
    tracker.end(rid, "FAILED", FAILED_DETAIL)
    tracker.end(parent, "FINISHED")
    return {"exp_id": exp_id, "parent": parent, "children": children, "failed": (bad_name, rid),
            "tracker": tracker}


def _text(dom: str) -> str:
    """The visible text of a DOM (scripts and styles dropped, whitespace collapsed)."""
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S | re.I)
    return " ".join(re.sub(r"<[^>]+>", " ", dom).replace("&amp;", "&").split())


def test_server_and_store(server, runs):
    client = runs["tracker"].client
    kids = client.search_runs([runs["exp_id"]],
                              f"tags.mlflow.parentRunId = '{runs['parent']}'")
    assert len(kids) == len(STEPS) + 1
    _, rid = runs["children"][STEPS[0]]
    names = {a.path for a in client.list_artifacts(rid, "projectors")}
    assert names == {"projectors/projectors.safetensors"}
    assert server["start_s"] < 120


def test_experiment_page_lists_parent_and_child_runs(server, runs):
    # Sorted by a param the runs table lists parent and children flat (by date it nests the
    # children under a collapsed parent), so every run name is in the DOM.
    url = (f"{server['url']}/#/experiments/{runs['exp_id']}/runs?{ML}"
           f"&orderByKey={quote('params.`num_steps`')}&orderByAsc=true")
    names = [PARENT_NAME] + [n for n, _ in runs["children"].values()] + [runs["failed"][0]]
    dom = browser.wait_for_text(url, names, timeout=90)
    text = _text(dom)
    assert f"{len(names)} matching runs" in text
    assert "ablation_steps" in text  # the experiment's name in the breadcrumb


def test_experiment_page_with_columns_screenshot(server, runs, tmp_path):
    """The shared view the guide describes: params and metrics as columns."""
    view = browser.runs_table_view(["dataset", "inject_layer", "num_steps"],
                                   ["base/acc", "novel/acc", "hm", "base/acc_step0"],
                                   order_by="num_steps")
    query = browser.share_view(runs["tracker"].client, runs["exp_id"], "perl-columns", view)
    url = f"{server['url']}/#/experiments/{runs['exp_id']}/runs?{query}"
    name2 = runs["children"][STEPS[0]][0]
    dom = browser.wait_for_text(url, [name2, "inject_layer", "base/acc_step0", "Parameters",
                                      "Metrics"], size=(1900, 560))
    text = _text(dom)
    assert "ToyShapes" in text  # a param value in its column
    png = browser.screenshot(url, tmp_path / "mlflow-experiment.png", size=(1900, 560),
                             virtual_time_budget=15000)
    browser.assert_not_blank(png, min_colours=30)


def test_child_run_page(server, runs, tmp_path):
    from pipeline.report import run_link

    name, rid = runs["children"][STEPS[-1]]
    # the link the aggregate report puts on each number (no workflowType: a plain UI link)
    href = re.search(r'href="([^"]+)"', run_link(rid, runs["exp_id"], server["url"])).group(1)
    dom = browser.wait_for_text(href, [name, "inject_layer", f"base/acc_step{STEPS[-1]}",
                                       PARENT_NAME, "config_hash"], size=(1600, 1000))
    text = _text(dom)
    assert "Parent run" in text and "Finished" in text
    assert "num_steps" in text and "anchor_weight" in text  # every TrainConfig field is a param
    png = browser.screenshot(href, tmp_path / "mlflow-run.png", size=(1600, 1000),
                             virtual_time_budget=15000)
    browser.assert_not_blank(png, min_colours=30)


def test_child_run_artifacts(server, runs):
    _, rid = runs["children"][STEPS[0]]
    url = (f"{server['url']}/#/experiments/{runs['exp_id']}/runs/{rid}/artifacts/"
           f"projectors/projectors.safetensors?{ML}")
    dom = browser.wait_for_text(url, ["projectors.safetensors", "config.json", "metrics.json"])
    assert "projectors/projectors.safetensors" in _text(dom)


def test_failed_run_page_shows_the_reason(server, runs):
    name, rid = runs["failed"]
    url = f"{server['url']}/#/experiments/{runs['exp_id']}/runs/{rid}?{ML}"
    dom = browser.wait_for_text(url, [name, "Failed", "status_detail"])
    assert FAILED_DETAIL in _text(dom)
