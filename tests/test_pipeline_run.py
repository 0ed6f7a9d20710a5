"""`pipeline.run` end to end: a real local Ray (2 CPUs), the real `fit` (perl-tiny, a small
synthetic world), MLflow on SQLite in tmp_path (and once behind a real `mlflow server`).

- every cell becomes a FINISHED child run with params, tags, metrics and the projector artifact;
- a re-submission skips every cell (and marks an orphaned RUNNING submission KILLED); `--rerun`
  and a changed code version run finished cells again, `--ignore-code-version` skips them;
- `--dry-run` prints the cells and totals without starting trials; `pipeline.status` agrees;
- a broken cell is FAILED with its reason while the others finish (exit code 1);
- `--replay` rebuilds the runs from the storage records in an empty MLflow store;
- parallel trials logging to a real MLflow server lose no metric.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from servers import MlflowServer, results_and_attempts  # tests/servers.py

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[1]
CELLS = ["b2n/ToyShapes/2shot/seed1/J7/K1", "b2n/ToyShapes/2shot/seed1/J7/K2",
         "b2n/ToyCounts/2shot/seed1/J7/K1", "b2n/ToyCounts/2shot/seed1/J7/K2"]
FIRST_RUN_EPOCHS = 2


# --- fixtures -------------------------------------------------------------------------------------


# `world` and `weights` (session fixtures) come from tests/conftest.py.


USER_DATASETS = "perl_test_user_datasets"  # a sweep's `imports:` module, outside the package


@pytest.fixture(scope="module")
def user_modules(tmp_path_factory) -> Path:
    """A folder outside the repository with a module that registers the dataset `UserShapes`
    (the folder `user_shapes/` of a data root, in ToyShapes' layout). It is on the Ray workers'
    PYTHONPATH; a test puts it on the driver's sys.path."""
    folder = tmp_path_factory.mktemp("user_modules")
    (folder / f"{USER_DATASETS}.py").write_text(
        "from perl_core.data.registry import DatasetSpec, register\n\n"
        "register(DatasetSpec(name='UserShapes', dataset_dir='user_shapes', image_dir='images',\n"
        "                     split_file='split_zhou_ToyShapes.json',\n"
        "                     template='a photo of a {}.'))\n")
    return folder


@pytest.fixture(scope="module")
def ray_local(user_modules):
    # (Ray's default token auth stays on: workers inherit it from the raylet)
    env = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
    os.environ.update(env)
    import ray

    path = os.pathsep.join((str(REPO), str(user_modules)))
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False,
             runtime_env={"env_vars": {**env, "PYTHONPATH": path}})
    yield ray
    ray.shutdown()


def sweep_yaml(path: Path, *, world: Path, weights: Path, storage: Path, tracking: str,
               name: str = "tiny", datasets=("ToyShapes", "ToyCounts"), steps=(1, 2),
               epochs: int = 1, extra: str = "") -> Path:
    path.write_text(f"""\
name: {name}
experiment: test/{name}
fixed:
  arch: perl-tiny
  pretrained: {weights}
  data_root: {world}
  shots: 2
  epochs: {epochs}
  seed: 1
  device: cpu
  eval_batch_size: 64
  jacobian_samples: 0  # the Jacobian has its own tests; trials here test the pipeline
grid:
  dataset: [{', '.join(datasets)}]
  num_steps: [{', '.join(map(str, steps))}]
resources: {{cpu: 1, gpu: 0}}
storage: {storage}
tracking_uri: {tracking}
max_failures: 0
{extra}""")
    return path


def children(uri: str, experiment: str) -> list:
    from pipeline.tracking import PARENT_PHASE, Tracker

    t = Tracker(uri)
    exp = t.client.get_experiment_by_name(experiment)
    return [r for r in t.search(exp.experiment_id) if r.data.tags.get("phase") != PARENT_PHASE]


def run(argv: list[str], capsys) -> tuple[int, str]:
    from pipeline.run import main

    rc = main(argv)
    return rc, capsys.readouterr().out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, world, weights, ray_local):
    """The tiny grid run once (2 epochs: a per-epoch curve with more than one point); shared by
    the tests that inspect or reuse its results."""
    tmp = tmp_path_factory.mktemp("run")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    yaml_path = sweep_yaml(tmp / "tiny.yaml", world=world, weights=weights,
                           storage=tmp / "runs", tracking=uri, epochs=FIRST_RUN_EPOCHS)
    from pipeline.run import main

    t0 = time.time()
    # an override of an execution field (outside the hash): later runs without it find the cells
    overrides = ["fixed.eval_batch_size=32"]
    rc = main([str(yaml_path), "--set", overrides[0]])
    return {"tmp": tmp, "uri": uri, "yaml": yaml_path, "rc": rc, "seconds": time.time() - t0,
            "world": world, "weights": weights, "overrides": overrides}


# --- tests ---------------------------------------------------------------------------------------


def test_dry_run_on_a_fresh_store_starts_nothing(tmp_path, world, weights, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_yaml(tmp_path / "tiny.yaml", world=world, weights=weights,
                   storage=tmp_path / "runs", tracking=uri)
    rc, out = run([str(y), "--dry-run"], capsys)
    assert rc == 0
    for name in CELLS:
        assert name in out
    assert out.count("todo") >= 4 and "total: 4 cells, 0 done, 4 todo" in out
    assert not (tmp_path / "mlflow.db").exists()  # a dry run creates no store
    assert not (tmp_path / "runs").exists()


def test_tracking_lost_before_the_parent_run_is_a_message_not_a_traceback(
        tmp_path, world, weights, capsys, monkeypatch):
    """MLflow answers the start-up check, then fails creating the submission's parent run: exit
    2 with a message naming the (redacted) URI; no trial, no Ray, nothing in storage."""
    from mlflow.exceptions import MlflowException

    from pipeline import tracking

    def refuse(*a, **k):
        raise MlflowException("API request to endpoint /api/2.0/mlflow/runs/create failed")

    monkeypatch.setattr(tracking.Tracker, "start_parent", refuse)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_yaml(tmp_path / "tiny.yaml", world=world, weights=weights,
                   storage=tmp_path / "runs", tracking=uri)
    rc, out = run([str(y)], capsys)
    assert rc == 2, out
    assert "stopped answering before the sweep started (MlflowException" in out, out
    assert "nothing was run" in out and str(y) in out
    assert not (tmp_path / "runs" / "tune").exists()


def test_the_parent_run_keeps_the_resolved_sweep(first_run):
    import yaml

    from pipeline.tracking import PARENT_PHASE, RESOLVED_SWEEP, Tracker

    t = Tracker(first_run["uri"])
    exp = t.client.get_experiment_by_name("test/tiny")
    parent = min((r for r in t.search(exp.experiment_id)
                  if r.data.tags.get("phase") == PARENT_PHASE), key=lambda r: r.info.start_time)
    local = t.client.download_artifacts(parent.info.run_id, RESOLVED_SWEEP,
                                        str(first_run["tmp"] / "resolved"))
    resolved = yaml.safe_load(open(local).read())
    assert resolved["fixed"]["eval_batch_size"] == 32  # the --set, applied
    assert resolved["grid"]["num_steps"] == [1, 2]
    assert {r.data.params["eval_batch_size"] for r in children(first_run["uri"], "test/tiny")} \
        == {"32"}


def test_every_cell_is_a_finished_child_run(first_run):
    from perl_core.config import TrainConfig
    from perl_core.train import load_projectors
    from pipeline.spec import cells, load_spec
    from pipeline.tracking import Tracker, config_params

    assert first_run["rc"] == 0
    uri = first_run["uri"]
    runs = children(uri, "test/tiny")
    assert sorted(r.info.run_name for r in runs) == sorted(CELLS)
    assert {r.info.status for r in runs} == {"FINISHED"}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    tracker = Tracker(uri)
    parent = tracker.client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["num_finished"] == "4"

    expected = {c.name: c for c in cells(load_spec(first_run["yaml"],
                                                   overrides=first_run["overrides"]))}
    for r in runs:
        cell = expected[r.info.run_name]
        cfg = cell.config
        assert r.data.params == config_params(cfg)  # every TrainConfig field, same names
        assert TrainConfig.from_dict(r.data.params) == cfg
        tags = r.data.tags
        assert tags["config_hash"] == cell.config_hash and tags["cell"] == cell.name
        for key in ("code_sha", "code_dirty", "code_version", "ray_node_id", "trial_id",
                    "ray_job_id", "version.torch", "version.open_clip", "version.ray",
                    "version.mlflow", "num_trainable_parameters", "record_id"):
            assert tags.get(key), key
        assert (tags["sweep"], tags["phase"], tags["dataset"], tags["protocol"]) == \
            ("tiny", "final", cfg.dataset, "base2novel")
        m = r.data.metrics
        for key in ("base/acc", "novel/acc", "hm", "base/acc_step0",
                    f"base/acc_step{cfg.num_steps}", "val/acc", "train/loss",
                    "num_trainable_parameters"):
            assert key in m, key
        assert m["num_trainable_parameters"] == float(tags["num_trainable_parameters"])
        curve = tracker.client.get_metric_history(r.info.run_id, "train_step/loss")
        assert len(curve) >= 1 and [p.step for p in curve] == list(range(1, len(curve) + 1))
        # the per-epoch curve: one point per epoch (step = epoch, from 1); the last is train/*
        for key in ("loss", "ce", "anchor"):
            epochs = sorted(tracker.client.get_metric_history(r.info.run_id, f"train_epoch/{key}"),
                            key=lambda p: p.step)
            assert [p.step for p in epochs] == list(range(1, FIRST_RUN_EPOCHS + 1)), key
            assert epochs[-1].value == pytest.approx(m[f"train/{key}"]), key
        assert cfg.epochs == FIRST_RUN_EPOCHS
        arts = {a.path for a in tracker.client.list_artifacts(r.info.run_id)}
        assert {"config.json", "metrics.json", "per_class.json", "projectors"} <= arts
        local = tracker.client.download_artifacts(r.info.run_id, "projectors",
                                                  str(first_run["tmp"] / "dl" / r.info.run_id))
        state, saved_cfg = load_projectors(Path(local) / "projectors.safetensors")
        assert saved_cfg.config_hash() == cell.config_hash and state
        # the resolved config and the per-class accuracies, by content
        dl = Path(tracker.client.download_artifacts(r.info.run_id, "",
                                                    str(first_run["tmp"] / "dl" / r.info.run_id)))
        assert json.loads((dl / "config.json").read_text()) == cfg.to_dict()
        per_class = json.loads((dl / "per_class.json").read_text())
        assert per_class and set(per_class) <= {k.split("/")[0] for k in m}, per_class
        for split, accs in per_class.items():
            assert accs and all(0.0 <= a <= 100.0 for a in accs.values()), (split, accs)
            # the synthetic test sets hold the same number of images per class, so the class
            # mean is the split's accuracy
            assert sum(accs.values()) / len(accs) == pytest.approx(m[f"{split}/acc"], abs=1e-4)
    # the second copy of each result: one record (JSON + safetensors) per cell in storage
    records = list((first_run["tmp"] / "runs" / "records" / "test__tiny").glob("*.json"))
    assert len(records) == 4


def test_rerun_skips_everything_and_kills_orphans(first_run, capsys):
    from pipeline.tracking import Tracker

    uri = first_run["uri"]
    tracker = Tracker(uri)
    exp_id = tracker.experiment_id("test/tiny")
    # an earlier submission whose driver died: RUNNING parent (dead pid) with a RUNNING child
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    orphan_parent = tracker.client.create_run(exp_id, tags={
        "sweep": "tiny", "phase": "sweep", "driver_host": socket.gethostname(),
        "driver_pid": str(dead.pid), "heartbeat": str(int(time.time()))}).info.run_id
    orphan_child = tracker.client.create_run(exp_id, tags={
        "sweep": "tiny", "phase": "final", "mlflow.parentRunId": orphan_parent}).info.run_id

    t0 = time.time()
    rc, out = run([str(first_run["yaml"])], capsys)
    assert rc == 0
    assert "4 cells, 4 already FINISHED, 0 to run" in out
    assert "0 finished, 4 skipped" in out
    assert time.time() - t0 < first_run["seconds"]
    assert len([r for r in children(uri, "test/tiny") if r.info.status == "FINISHED"]) == 4
    for rid in (orphan_parent, orphan_child):
        run_ = tracker.client.get_run(rid)
        assert run_.info.status == "KILLED" and "gone" in run_.data.tags["status_detail"]

    rc, out = run([str(first_run["yaml"]), "--dry-run"], capsys)
    assert rc == 0 and "total: 4 cells, 4 done, 0 todo" in out
    from pipeline.status import main as status

    assert status([str(first_run["yaml"])]) == 0
    assert "4 done, 0 running, 0 failed, 0 left" in capsys.readouterr().out


def test_replay_rebuilds_an_empty_store(first_run, capsys):
    from pipeline.tracking import Tracker

    uri = f"sqlite:///{first_run['tmp'] / 'empty.db'}"
    rc, out = run([str(first_run["yaml"]), "--replay", "--tracking-uri", uri], capsys)
    assert rc == 0 and "4 stored trial record(s) replayed" in out
    replayed = {r.info.run_name: r for r in children(uri, "test/tiny")}
    original = {r.info.run_name: r for r in children(first_run["uri"], "test/tiny")}
    assert sorted(replayed) == sorted(CELLS)
    tracker = Tracker(uri)
    for name, r in replayed.items():
        o = original[name]
        assert r.info.status == "FINISHED" and r.data.tags["replayed"] == "true"
        assert r.data.params == o.data.params
        assert r.data.metrics == pytest.approx(o.data.metrics)
        assert r.data.tags["config_hash"] == o.data.tags["config_hash"]
        assert {a.path for a in tracker.client.list_artifacts(r.info.run_id)} >= {"projectors"}
        # the per-epoch curve travels in the record too
        epochs = tracker.client.get_metric_history(r.info.run_id, "train_epoch/loss")
        assert sorted(p.step for p in epochs) == list(range(1, FIRST_RUN_EPOCHS + 1))
        # and the note, the dataset inputs and the per-step charts (tests/test_mlflow_conventions)
        assert r.data.tags["mlflow.note.content"] == o.data.tags["mlflow.note.content"]
        [inp] = tracker.client.get_run(r.info.run_id).inputs.dataset_inputs
        assert inp.dataset.digest == o.data.tags[f"data_digest.{o.data.tags['dataset']}"]
        assert len(tracker.client.get_metric_history(r.info.run_id, "base/acc")) == \
            int(o.data.params["num_steps"]) + 1
    # idempotent: a second replay adds nothing, and a run of the sweep finds every cell done
    rc, out = run([str(first_run["yaml"]), "--replay", "--tracking-uri", uri], capsys)
    assert rc == 0 and len(children(uri, "test/tiny")) == 4
    rc, out = run([str(first_run["yaml"]), "--tracking-uri", uri], capsys)
    assert rc == 0 and "4 already FINISHED, 0 to run" in out


def one_cell_copy(first_run, tmp_path: Path) -> tuple[Path, str]:
    """The first cell of the tiny sweep against a copy of its MLflow store (own storage), so that
    re-running it leaves `first_run`'s store and records as the other tests expect them."""
    import shutil

    shutil.copy(first_run["tmp"] / "mlflow.db", tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_yaml(tmp_path / "tiny.yaml", world=first_run["world"], weights=first_run["weights"],
                   storage=tmp_path / "runs", tracking=uri, datasets=("ToyShapes",), steps=(1,),
                   epochs=FIRST_RUN_EPOCHS)
    return y, uri


def finished_runs(uri: str, cell: str) -> list:
    return [r for r in children(uri, "test/tiny")
            if r.info.run_name == cell and r.info.status == "FINISHED"]


def test_rerun_runs_finished_cells_again(first_run, tmp_path, capsys):
    y, uri = one_cell_copy(first_run, tmp_path)
    before = {r.info.run_id for r in finished_runs(uri, CELLS[0])}
    assert len(before) == 1
    rc, out = run([str(y), "--rerun"], capsys)
    assert rc == 0, out
    assert "1 cells, 0 already FINISHED, 1 to run" in out, out
    assert "1 finished, 0 skipped" in out, out
    after = finished_runs(uri, CELLS[0])
    new = [r for r in after if r.info.run_id not in before]
    assert len(after) == 2 and len(new) == 1, [r.info.run_id for r in after]
    assert new[0].data.tags["config_hash"] == \
        next(r for r in after if r.info.run_id in before).data.tags["config_hash"]


def test_a_changed_code_version_runs_finished_cells_again(first_run, tmp_path, capsys):
    """Finished runs of another code version are not reused (unless --ignore-code-version)."""
    from pipeline.tracking import Tracker

    y, uri = one_cell_copy(first_run, tmp_path)
    client = Tracker(uri).client
    old = "0123456789abcdef"  # as if an earlier perl_core had produced every finished run
    for r in children(uri, "test/tiny"):
        client.set_tag(r.info.run_id, "code_version", old)
    before = {r.info.run_id for r in finished_runs(uri, CELLS[0])}

    rc, out = run([str(y), "--dry-run"], capsys)
    assert rc == 0 and "total: 1 cells, 0 done, 1 todo" in out, out
    rc, out = run([str(y), "--ignore-code-version"], capsys)
    assert rc == 0, out
    assert "1 cells, 1 already FINISHED, 0 to run" in out and "0 finished, 1 skipped" in out, out
    assert {r.info.run_id for r in finished_runs(uri, CELLS[0])} == before

    rc, out = run([str(y)], capsys)
    assert rc == 0, out
    assert "1 cells, 0 already FINISHED, 1 to run" in out and "1 finished, 0 skipped" in out, out
    new = [r for r in finished_runs(uri, CELLS[0]) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].data.tags["code_version"] not in ("", old)
    # and now this code version's run is what a re-submission reuses
    rc, out = run([str(y), "--dry-run"], capsys)
    assert rc == 0 and "total: 1 cells, 1 done, 0 todo" in out, out


def test_a_dataset_registered_by_a_sweep_import_trains_on_ray(tmp_path, world, weights,
                                                              ray_local, user_modules,
                                                              monkeypatch, capsys):
    """`imports:` registers a dataset the package does not know, in the driver (which validates
    the cells) and in every trial's worker process (which trains on it)."""
    from perl_core.data import registry

    registry.list_datasets()  # the built-in datasets first; ours is forgotten afterwards
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_KEYS", dict(registry._KEYS))
    monkeypatch.syspath_prepend(str(user_modules))
    monkeypatch.delitem(sys.modules, USER_DATASETS, raising=False)
    root = tmp_path / "user_world"  # the new dataset's folder: ToyShapes' files under a new name
    root.mkdir()
    (root / "user_shapes").symlink_to(world / "toy_shapes")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_yaml(tmp_path / "user.yaml", world=root, weights=weights,
                   storage=tmp_path / "runs", tracking=uri, name="user",
                   datasets=("UserShapes",), steps=(1,), extra=f"imports: [{USER_DATASETS}]\n")
    try:
        rc, out = run([str(y)], capsys)
    finally:
        sys.modules.pop(USER_DATASETS, None)
    assert rc == 0, out
    [r] = children(uri, "test/user")
    assert r.info.run_name == "b2n/UserShapes/2shot/seed1/J7/K1"
    assert r.info.status == "FINISHED", r.data.tags.get("status_detail")
    assert r.data.tags["dataset"] == "UserShapes" and "base/acc" in r.data.metrics
    # without the import the name is unknown: the driver refuses the file before any trial
    y.write_text(y.read_text().replace(f"imports: [{USER_DATASETS}]\n", ""))
    registry._REGISTRY.pop("UserShapes")  # (the copies made above: restored afterwards)
    registry._KEYS.pop("usershapes")
    rc, out = run([str(y)], capsys)
    assert rc == 2 and "unknown dataset 'UserShapes'" in out, out


def test_a_record_without_epoch_history_is_still_read(tmp_path):
    """Records written before `epoch_history` existed are replayed with an empty epoch curve."""
    import json

    from pipeline.tracking import TrialRecord, iter_records, write_record

    rec = TrialRecord(record_id="r1", experiment="test/old", run_name="cell", config={},
                      config_hash="h", metrics={"hm": 1.0}, history=[], per_class={},
                      num_trainable_parameters=1, tags={},
                      epoch_history=[{"epoch": 1, "step": 2, "loss": 0.5}])
    path = Path(write_record(str(tmp_path), rec, b"weights"))
    data = json.loads(path.read_text())
    del data["epoch_history"]
    path.write_text(json.dumps(data))
    [(back, _)] = list(iter_records(str(tmp_path), "test/old"))
    assert back.epoch_history == [] and back.metrics == {"hm": 1.0}


def test_a_broken_cell_fails_with_its_reason_and_the_rest_finish(tmp_path, world, weights,
                                                                 ray_local, capsys):
    # a data root where ToyCounts' split file is corrupt; ToyShapes is intact
    broken = tmp_path / "broken_world"
    broken.mkdir()
    for entry in world.iterdir():
        if entry.name != "toy_counts":
            (broken / entry.name).symlink_to(entry)
    (broken / "toy_counts").mkdir()
    for entry in (world / "toy_counts").iterdir():
        if entry.suffix != ".json":
            (broken / "toy_counts" / entry.name).symlink_to(entry)
        else:
            (broken / "toy_counts" / entry.name).write_text("{ not json")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_yaml(tmp_path / "broken.yaml", world=broken, weights=weights,
                   storage=tmp_path / "runs", tracking=uri, name="broken", steps=(1,))
    rc, out = run([str(y)], capsys)
    assert rc == 1, out
    runs = {r.info.run_name: r for r in children(uri, "test/broken")}
    ok, bad = runs["b2n/ToyShapes/2shot/seed1/J7/K1"], runs["b2n/ToyCounts/2shot/seed1/J7/K1"]
    assert ok.info.status == "FINISHED"
    assert bad.info.status == "FAILED"
    detail = bad.data.tags["status_detail"]
    assert "split_zhou_ToyCounts.json" in detail or "toy_counts" in detail, detail
    assert "1 finished" in out and "1 failed" in out, out
    assert "FAILED b2n/ToyCounts/2shot/seed1/J7/K1:" in out, out
    from pipeline.status import main as status

    # (any code version: perl_core may be edited while this test runs in a development tree)
    status([str(y), "--ignore-code-version"])
    s = capsys.readouterr().out
    assert "1 done, 0 running, 1 failed, 0 left" in s and "b2n/ToyCounts" in s, s


@pytest.fixture
def mlflow_server(tmp_path):
    with MlflowServer(tmp_path) as server:
        yield server.url


def test_parallel_trials_against_a_tracking_server_lose_no_metric(tmp_path, world, weights,
                                                                   ray_local, mlflow_server,
                                                                   capsys):
    from pipeline.tracking import Tracker, iter_records

    y = sweep_yaml(tmp_path / "server.yaml", world=world, weights=weights,
                   storage=tmp_path / "runs", tracking=mlflow_server, name="server")
    rc, out = run([str(y), "--max-concurrent", "2"], capsys)
    assert rc == 0, out
    # (a trial whose own logging failed under load leaves a KILLED attempt beside its replayed
    # result: by design, tests/servers.py results_and_attempts)
    finished, _, problems = results_and_attempts(children(mlflow_server, "test/server"))
    assert not problems, problems
    runs = {r.data.tags["record_id"]: r for r in finished}
    assert len(runs) == 4
    # trials overlapped in time (two at once on two CPUs)
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    client = Tracker(mlflow_server).client
    records = list(iter_records(str(tmp_path / "runs"), "test/server"))
    assert len(records) == 4
    for rec, _ in records:
        r = runs[rec.record_id]
        for key, value in rec.metrics.items():
            assert r.data.metrics[key] == pytest.approx(value), key
        curve = client.get_metric_history(r.info.run_id, "train_step/loss")
        assert len(curve) == len(rec.history)
        assert [p.value for p in sorted(curve, key=lambda p: p.step)] == \
            pytest.approx([h["loss"] for h in rec.history])


def test_search_phase_runs_optuna_on_the_validation_metric(tmp_path, world, weights, ray_local,
                                                           capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    y = sweep_yaml(tmp_path / "hpo.yaml", world=world, weights=weights, storage=tmp_path / "runs",
                   tracking=uri, name="hpo", datasets=("ToyShapes",), steps=(1,), extra="""\
search:
  space:
    lr: {type: loguniform, low: 1.0e-4, high: 1.0e-1}
    anchor_weight: {type: choice, values: [0.1, 1.0]}
  metric: val/acc
  mode: max
  num_samples: 2
  seed: 0
  max_concurrent: 2
""")
    # the search phase starts from `fixed`: the dataset goes there, the grid keeps num_steps
    y.write_text(y.read_text().replace("  dataset: [ToyShapes]\n", "").replace(
        "  shots: 2\n", "  shots: 2\n  dataset: ToyShapes\n"))
    rc, out = run([str(y)], capsys)
    assert rc == 0, out
    assert "best search sample: value=" in out
    runs = children(uri, "test/hpo")
    hpo = [r for r in runs if r.data.tags["phase"] == "hpo"]
    assert len(hpo) == 2 and {r.info.status for r in hpo} == {"FINISHED"}
    for r in hpo:
        assert "val/acc" in r.data.metrics
        assert 1e-4 <= float(r.data.params["lr"]) <= 1e-1
        assert r.data.params["anchor_weight"] in ("0.1", "1.0")
        assert "/hpo/lr=" in r.info.run_name
    assert len({r.data.tags["config_hash"] for r in hpo}) == 2
    # a re-submission counts the finished samples instead of drawing new ones
    rc, out = run([str(y)], capsys)
    assert rc == 0 and "2 earlier sample(s) of 2, 0 to run" in out
    assert len(children(uri, "test/hpo")) == 3
