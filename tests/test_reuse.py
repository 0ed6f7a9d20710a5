"""Each distinct training once (`pipeline.reuse`, `pipeline.links`, `pipeline.suite`).

- `training_hash` reads what is trained: cross-dataset, DG and `all` of one source agree, and
  training them gives bitwise the same projectors; evaluating those projectors as the DG cell
  (`evaluate_projectors`) gives exactly the DG training's own metrics;
- the paper suite's dry run plans every repeated cell as a link or an evaluation (counted here
  from the sweep files themselves) and prints less work after deduplication than before;
- a two-sweep toy suite run for real (local Ray, MLflow on SQLite) trains each shared cell once,
  links the repeated cell, evaluates the DG cell from the cross-dataset weights, fills both
  experiments' tables, and a second submission runs nothing.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

from perl_core.config import TrainConfig
from perl_core.protocol import training_hash

REPO = Path(__file__).resolve().parents[1]


def test_training_hash_reads_what_is_trained():
    xd = TrainConfig(dataset="ToyWorld", protocol="cross_dataset", eval_datasets=("ToyShapes",))
    dg = xd.replace(protocol="domain_generalization", eval_datasets=("ToyWorldV2",))
    assert xd.config_hash() != dg.config_hash()
    assert training_hash(xd) == training_hash(dg) == training_hash(
        xd.replace(protocol="all", eval_datasets=()))
    assert training_hash(xd.replace(jacobian_samples=0, text_chunk=0)) == training_hash(xd)
    for changed in (dict(protocol="base2novel", eval_datasets=()), dict(seed=2),
                    dict(num_steps=2), dict(lr=1e-3), dict(dataset="ToyShapes")):
        assert training_hash(xd.replace(**changed)) != training_hash(xd), changed


@pytest.fixture(scope="module")
def xworld(tmp_path_factory) -> Path:
    from perl_core.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("xworld")
    generate_world(root, datasets=["ToyShapes", "ToyWorld", "ToyWorldV2"],
                   sizes={"train": 2, "val": 1, "test": 2})
    return root


def _xd(world: Path, weights: Path, **kw) -> TrainConfig:
    return TrainConfig(dataset="ToyWorld", protocol="cross_dataset",
                       eval_datasets=("ToyShapes",), arch="perl-tiny", pretrained=str(weights),
                       data_root=str(world), shots=2, epochs=1, seed=1, num_steps=2,
                       device="cpu", eval_batch_size=64, jacobian_samples=2, **kw)


@pytest.mark.slow
def test_dg_cell_from_cross_dataset_weights_equals_training_it(xworld, weights):
    from perl_core.train import evaluate_projectors, fit

    xd = _xd(xworld, weights)
    dg = xd.replace(protocol="domain_generalization", eval_datasets=("ToyWorldV2",))
    a, b = fit(xd, progress=False), fit(dg, progress=False)
    assert a.history and a.projector_state.keys() == b.projector_state.keys()
    for k in a.projector_state:  # the same training, whatever is evaluated after it
        assert torch.equal(a.projector_state[k], b.projector_state[k]), k
    ev = evaluate_projectors(dg, a.projector_state, progress=False)
    trained = {k: v for k, v in b.metrics.items() if not k.startswith("train/")}
    assert ev.metrics == trained  # exactly: the same weights, the same evaluation
    assert "ToyWorldV2/acc" in ev.metrics and ev.history == [] and ev.train_seconds == 0
    assert ev.per_class == b.per_class


def _paper_specs():
    from pipeline.spec import cells, load_spec
    from pipeline.suite import load_suite

    _, files = load_suite(str(REPO / "sweeps" / "paper.yaml"))
    return [(load_spec(f), cells(load_spec(f))) for f in files]


def test_paper_suite_dry_run_plans_each_training_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PERL_DATA_ROOT", str(tmp_path / "no-data"))  # sizes from the table
    from pipeline.run import main

    rc = main([str(REPO / "sweeps" / "paper.yaml"), "--dry-run",
               "--tracking-uri", f"sqlite:///{tmp_path / 'none.db'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert not (tmp_path / "none.db").exists()  # a dry run creates no store
    seen_configs: set[str] = set()
    seen_trainings: set[str] = set()
    for spec, grid in _paper_specs():  # what each sweep finds from the sweeps before it
        link = sum(c.config_hash in seen_configs for c in grid)
        evaluate = sum(c.config_hash not in seen_configs and training_hash(c.config)
                       in seen_trainings for c in grid)
        line = next(x for x in out.splitlines() if x.strip().startswith(spec.name + " "))
        nums = [int(n) for n in re.findall(r"(\d+) (?:cells|done|link|evaluate|train)", line)]
        assert nums == [len(grid), 0, link, evaluate, len(grid) - link - evaluate], line
        seen_configs |= {c.config_hash for c in grid}
        seen_trainings |= {training_hash(c.config) for c in grid}
    dg = next(x for x in out.splitlines() if x.strip().startswith("domain_generalization "))
    assert " 0 train" in dg  # the DG sweep evaluates the cross-dataset ImageNet trainings
    total = sum(len(g) for _, g in _paper_specs())
    assert (f"total: {total} cells, {len(seen_configs)} distinct configs, "
            f"{len(seen_trainings)} distinct trainings") in out
    work = {m[0]: (int(m[1]), int(m[2].replace(",", ""))) for m in re.findall(
        r"(before|after) deduplication.*?: (\d+) trial\(s\).*?([\d,]+) training steps", out)}
    assert work["before"][0] == total and work["after"][0] == len(seen_configs)
    assert work["after"][1] < work["before"][1]


# --- the two-sweep toy suite, for real -----------------------------------------------------------


def write_two_sweep_suite(tmp: Path, world: Path, weights: Path) -> Path:
    common = f"""\
  arch: perl-tiny
  pretrained: {weights}
  data_root: {world}
  dataset: ToyWorld
  shots: 2
  epochs: 1
  seed: 1
  device: cpu
  eval_batch_size: 64
  jacobian_samples: 0
"""
    tail = f"""resources: {{cpu: 1, gpu: 0}}
storage: {tmp / 'runs'}
tracking_uri: sqlite:///{tmp / 'mlflow.db'}
max_failures: 0
"""
    (tmp / "xd.yaml").write_text(f"""name: xd
experiment: test/xd
fixed:
{common}  protocol: cross_dataset
  eval_datasets: [ToyShapes]
grid:
  num_steps: [1, 2]
{tail}""")
    (tmp / "mixed.yaml").write_text(f"""name: mixed
experiment: test/mixed
fixed:
{common}grid:
  num_steps: [1]
arms:
  - name: xd
    fixed: {{protocol: cross_dataset, eval_datasets: [ToyShapes]}}
    grid: {{num_steps: [1, 3]}}
  - name: dg
    fixed: {{protocol: domain_generalization, eval_datasets: [ToyWorldV2]}}
{tail}""")
    (tmp / "suite.yaml").write_text("name: two\nsweeps: [xd.yaml, mixed.yaml]\n")
    return tmp / "suite.yaml"


def _trials(uri: str, experiment: str) -> list:
    from pipeline.tracking import PARENT_PHASE, Tracker

    t = Tracker(uri)
    exp = t.client.get_experiment_by_name(experiment)
    return [r for r in t.search(exp.experiment_id) if r.data.tags.get("phase") != PARENT_PHASE]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_toy_suite_trains_each_shared_cell_once(tmp_path, xworld, weights, ray_here, capsys):
    from pipeline.aggregate import aggregate
    from pipeline.queries import mlflow_client
    from pipeline.reuse import REUSE_TAG, REUSED_FROM_TAG, TRAINED_BY_TAG, TRAINING_HASH_TAG
    from pipeline.run import main

    suite = write_two_sweep_suite(tmp_path, xworld, weights)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = main([str(suite), "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0 and "1 link" in out and "1 evaluate" in out, out
    rc = main([str(suite)])
    out = capsys.readouterr().out
    assert rc == 0, out
    xd, mixed = _trials(uri, "test/xd"), _trials(uri, "test/mixed")
    assert len(xd) == 2 and len(mixed) == 3
    assert all(r.info.status == "FINISHED" for r in xd + mixed)
    runs = {r.data.tags["cell"]: r for r in mixed}
    trained = [r for r in xd + mixed if REUSE_TAG not in r.data.tags]
    # every distinct training ran once: K=1 and K=2 in xd, K=3 in mixed
    assert sorted(r.data.params["num_steps"] for r in trained) == ["1", "2", "3"]
    hashes = [r.data.tags[TRAINING_HASH_TAG] for r in trained]
    assert len(set(hashes)) == len(hashes)
    xd_k1 = next(r for r in xd if r.data.params["num_steps"] == "1")
    link = next(r for r in mixed if r.data.tags.get(REUSE_TAG) == "link")
    assert link.data.tags[REUSED_FROM_TAG] == xd_k1.info.run_id
    assert link.data.tags["config_hash"] == xd_k1.data.tags["config_hash"]
    assert link.data.tags["sweep"] == "mixed" and link.data.tags["arm"] == "xd"
    assert link.data.metrics["ToyShapes/acc"] == xd_k1.data.metrics["ToyShapes/acc"]
    assert not any(k.startswith("timing/") for k in link.data.metrics)
    arts = {a.path for a in mlflow_client(uri).list_artifacts(link.info.run_id, "projectors")}
    assert arts == {"projectors/projectors.safetensors"}
    ev = next(r for r in mixed if r.data.tags.get(REUSE_TAG) == "evaluate")
    assert ev.data.tags[REUSED_FROM_TAG] == ev.data.tags[TRAINED_BY_TAG] == xd_k1.info.run_id
    assert ev.data.tags["arm"] == "dg" and "ToyWorldV2/acc" in ev.data.metrics
    # the DG cell evaluated the very weights the cross-dataset cell trained: its source numbers
    assert ev.data.metrics["all/acc"] == xd_k1.data.metrics["all/acc"]
    assert ev.data.metrics["train/loss"] == xd_k1.data.metrics["train/loss"]
    assert "train_step/loss" not in ev.data.metrics  # no optimizer step ran
    assert len(runs) == 3
    # both experiments' tables are full
    agg = aggregate(uri, ["test/mixed"])
    text = "\n".join(t.to_frame().to_csv() if hasattr(t, "to_frame") else str(t)
                     for t in agg.tables)
    assert "ToyWorldV2" in text and "ToyShapes" in text, text
    from pipeline.status import main as status

    assert status([str(suite)]) == 0  # a suite's status: each sweep in turn, links done
    out = capsys.readouterr().out
    assert "2 cells: 2 done, 0 running, 0 failed, 0 left" in out, out
    assert "3 cells: 3 done, 0 running, 0 failed, 0 left" in out, out
    # a second submission of the suite runs nothing
    rc = main([str(suite)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert len(_trials(uri, "test/xd")) == 2 and len(_trials(uri, "test/mixed")) == 3, out


def test_bad_suites_are_refused_naming_the_file_and_key(tmp_path, capsys):
    from pipeline.run import main

    (tmp_path / "a.yaml").write_text((REPO / "sweeps" / "smoke.yaml").read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nsweeps: [a.yaml, missing.yaml]\nextra: 1\n")
    assert main([str(bad), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert str(bad) in out and "extra" in out
    bad.write_text("name: s\nsweeps: [a.yaml, missing.yaml]\n")
    assert main([str(bad), "--dry-run"]) == 2
    out = capsys.readouterr().out
    assert "sweeps[1]" in out and "missing.yaml" in out
    (tmp_path / "b.yaml").write_text("name: b\nexperiment: x\nfixed: {lr: -1}\n")
    bad.write_text("name: s\nsweeps: [a.yaml, b.yaml]\n")
    assert main([str(bad)]) == 2  # every sweep is checked before the first one runs
    out = capsys.readouterr().out
    assert "b.yaml" in out and "lr" in out and "suite s: nothing was run" in out
    assert main([str(bad), str(tmp_path / "a.yaml")]) == 2
    assert "given alone" in capsys.readouterr().out


# --- a source that cannot serve: the cell trains, nothing is left RUNNING -------------------------


def _context(uri: str, exp_id: str, parent: str):
    from pipeline.context import TrialContext

    return TrialContext(tracking_uri=uri, experiment="test/links", experiment_id=exp_id,
                        parent_run_id=parent, sweep="links", storage="", cache={},
                        code_sha="abc", code_dirty=False, code_version="v1")


def test_a_link_whose_source_cannot_be_copied_trains_instead(tmp_path, capsys):
    from pipeline.links import link_cells
    from pipeline.reuse import LINK, Plan, Source
    from pipeline.spec import GridCell
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri)
    exp = t.experiment_id("test/links")
    cfg = TrainConfig(dataset="ToyShapes", data_root=str(tmp_path / "none"))
    src = t.start_trial(exp, "", "src", cfg, {"config_hash": cfg.config_hash(), "phase": "final"})
    t.end(src, "FINISHED")
    cells_ = [GridCell("a", cfg, cfg.config_hash()), GridCell("b", cfg, cfg.config_hash())]
    plans = {"a": Plan(LINK, Source("0" * 32, "a run that is not there", "0" * 32)),
             "b": Plan(LINK, Source(src, "src", src))}
    out, train = link_cells(t, _context(uri, exp, ""), cells_, plans)
    assert [c.name for c in train] == ["a"] and out.linked == ["b"] and not out.failed
    assert "could not link a run that is not there" in capsys.readouterr().out
    runs = t.search(exp)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    b = next(r for r in runs if r.data.tags.get("cell") == "b")
    assert b.data.tags["reuse"] == "link" and b.data.tags["reused_from"] == src
    assert b.data.params["dataset"] == "ToyShapes"  # the cell's params


def test_an_evaluate_cell_takes_good_weights_and_trains_without_them(tmp_path):
    import json

    from safetensors.torch import save

    from perl_core.train import PROJECTORS_FORMAT
    from pipeline.reuse import EVALUATE, TRAIN
    from pipeline.tracking import Tracker
    from pipeline.trainable import Trial, _Clock, reused_weights

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    t = Tracker(uri)
    exp = t.experiment_id("test/links")
    cfg = TrainConfig(dataset="ToyWorld", protocol="domain_generalization",
                      eval_datasets=("ToyWorldV2",))
    trained = cfg.replace(protocol="cross_dataset", eval_datasets=("ToyShapes",))
    good = t.start_trial(exp, "", "good", trained, {})  # projectors of the same training
    blob = save({"w": torch.ones(2)}, metadata={"format": PROJECTORS_FORMAT,
                                                "config": json.dumps(trained.to_dict())})
    (tmp_path / "projectors").mkdir()
    (tmp_path / "projectors" / "projectors.safetensors").write_bytes(blob)
    t.client.log_artifacts(good, str(tmp_path / "projectors"), "projectors")
    t.client.log_metric(good, "train/loss", 0.5)
    gone = t.start_trial(exp, "", "gone", trained, {})  # no projectors logged
    for rid in (good, gone):
        t.end(rid, "FINISHED")

    def trial(src: str, reuse: bool = True) -> Trial:
        cell = {"name": "c", "config": cfg.to_dict(),
                "reuse": {"kind": EVALUATE, "run_id": src, "trained_by": src}}
        ctx = dataclasses.replace(_context(uri, exp, ""), reuse=reuse)
        got = Trial({"cell": cell}, ctx, "c", cfg, cfg.config_hash(), [], t, _Clock())
        reused_weights(got)
        return got

    ok = trial(good)
    assert ok.plan.kind == EVALUATE and ok.plan.source.run_id == good
    assert torch.equal(ok.weights["w"], torch.ones(2))
    assert ok.source_losses == {"train/loss": 0.5}
    bad = trial(gone)
    assert bad.plan.kind == TRAIN and bad.weights is None  # trains: a bad source never fails
    off = trial(good, reuse=False)  # --no-reuse on a restored Tune grid: the entry not followed
    assert off.plan.kind == TRAIN and off.weights is None
    other = cfg.replace(seed=2)  # weights of another training are refused: it trains
    cell = {"name": "c", "config": other.to_dict(),
            "reuse": {"kind": EVALUATE, "run_id": good, "trained_by": good}}
    wrong = Trial({"cell": cell}, _context(uri, exp, ""), "c", other, other.config_hash(), [],
                  t, _Clock())
    reused_weights(wrong)
    assert wrong.plan.kind == TRAIN and wrong.weights is None


def test_errors_quoting_a_uri_lose_its_credentials():
    from pipeline.layout import redact_text
    from pipeline.tracking import short_error

    e = RuntimeError("API request to http://alice:s3cret@mlflow:5000/api/2.0/runs/get failed")
    assert "s3cret" not in short_error(e) and "http://***@mlflow:5000" in short_error(e)
    assert redact_text("no uri here") == "no uri here"


def test_mlflow_gone_during_the_link_phase_stops_it(tmp_path, monkeypatch):
    from servers import free_port  # tests/servers.py

    from pipeline.links import link_cells
    from pipeline.reuse import LINK, Plan, Source
    from pipeline.spec import GridCell
    from pipeline.submission import lost_errors
    from pipeline.tracking import Tracker

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast; user values win
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    down = Tracker(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    cfg = TrainConfig(dataset="ToyShapes")
    cells_ = [GridCell("a", cfg, cfg.config_hash())]
    with pytest.raises(lost_errors()):  # the submission's exit 3, not a cell trained instead
        link_cells(down, _context(down.tracking_uri, "1", ""), cells_,
                   {"a": Plan(LINK, Source("0" * 32, "src", "0" * 32))})
