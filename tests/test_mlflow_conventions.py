"""MLflow the way its users read it (issue 16): the UI's Source, User and Description columns,
accuracy charted against the reasoning step, and the dataset inputs of every run.

One tiny sweep (ToyShapes and ToyCounts of a copied toy world, K=2, one epoch) on a real local
Ray against a real SQLite store, module scope, then one re-submission after ToyShapes' split file
changed. The digest function is checked on its own first (no Ray).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from test_pipeline_run import children, ray_local, sweep_yaml, user_modules  # noqa: F401

DESCRIPTION = "Checks the MLflow conventions: tags, per-step charts, dataset inputs."
NUM_STEPS = 2


# --- the digest alone ---


def test_a_split_file_digest_is_its_sha256_and_is_reused_until_the_file_changes(world, tmp_path):
    from perl_core.data import dataset_digest

    root = tmp_path / "w"
    shutil.copytree(world / "toy_shapes", root / "toy_shapes")
    d = dataset_digest("toyshapes", str(root))  # an alias: the canonical name is recorded
    split = root / "toy_shapes" / "split_zhou_ToyShapes.json"
    assert (d.dataset, d.kind, d.source) == ("ToyShapes", "split file", str(split))
    assert d.digest == hashlib.sha256(split.read_bytes()).hexdigest()[:16]
    assert dataset_digest("ToyShapes", str(root), known=d) is d  # unchanged: not read again
    data = json.loads(split.read_text())
    data["test"] = data["test"][1:]
    split.write_text(json.dumps(data))
    again = dataset_digest("ToyShapes", str(root), known=d)
    assert again.digest == hashlib.sha256(split.read_bytes()).hexdigest()[:16] != d.digest
    split.unlink()
    with pytest.raises(FileNotFoundError, match="ToyShapes: split file not found: .*ToyShapes"):
        dataset_digest("ToyShapes", str(root))


def test_a_listing_digest_covers_the_sorted_relative_file_list(tmp_path):
    from perl_core.data import DatasetSpec, dataset_digest

    spec = DatasetSpec(name="TinyNet", dataset_dir="tiny_net", image_dir="images", template="",
                       loader="imagenet_variant", extra={"layout": "wnid"})
    images = tmp_path / "tiny_net" / "images"
    for wnid, files in (("n02", ["b.jpg", "a.jpg"]), ("n01", ["c.jpg"])):
        (images / wnid).mkdir(parents=True)
        for f in files:
            (images / wnid / f).write_bytes(b"not read")
    (tmp_path / "tiny_net" / "classnames.txt").write_text("n01 one\nn02 two\n")
    d = dataset_digest(spec, str(tmp_path))
    assert (d.kind, d.source) == ("file listing", str(images))
    names = hashlib.sha256(b"n01 one\nn02 two\n").hexdigest()
    want = hashlib.sha256(f"classnames.txt\0{names}\n".encode() +
                          b"n01/c.jpg\nn02/a.jpg\nn02/b.jpg\n").hexdigest()[:16]
    assert d.digest == want
    (images / "n02" / "a.jpg").write_bytes(b"other bytes")  # images are not read
    assert dataset_digest(spec, str(tmp_path)).digest == want
    (images / "n01" / "d.jpg").write_bytes(b"")
    assert dataset_digest(spec, str(tmp_path)).digest != want


def test_a_trial_takes_the_drivers_listing_digest_instead_of_listing_again(tmp_path,
                                                                            monkeypatch):
    """The driver lists a folder dataset once (ImageNet: 1.3M files); its trials get the digests
    through `TrialContext.known_data` and only re-check the class-name file's stamp."""
    import pickle

    from perl_core.config import TrainConfig
    from perl_core.data import DatasetSpec, coop, register, registry
    from pipeline import tracking
    from pipeline.context import TrialContext
    from pipeline.trainable import trial_data

    spec = DatasetSpec(name="TinyNetKnown", dataset_dir="tiny_net", image_dir="images",
                       template="", loader="imagenet_variant", extra={"layout": "wnid"},
                       test_only=True)
    # a registration for this test only
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_KEYS", dict(registry._KEYS))
    register(spec)
    (tmp_path / "tiny_net" / "images" / "n01").mkdir(parents=True)
    (tmp_path / "tiny_net" / "images" / "n01" / "a.jpg").write_bytes(b"")
    (tmp_path / "tiny_net" / "classnames.txt").write_text("n01 one\n")
    monkeypatch.setattr(tracking, "_DATA_DIGESTS", {})
    cfg = TrainConfig(dataset="TinyNetKnown", data_root=str(tmp_path), protocol="all")
    driver = tracking.data_digests(cfg)
    known = TrialContext.from_any({"tracking_uri": "", "experiment": "", "experiment_id": "",
                                   "parent_run_id": "", "sweep": "", "storage": "", "cache": {},
                                   "code_sha": "", "code_dirty": False, "code_version": "",
                                   "known_data": tracking.known_digests()})
    known = pickle.loads(pickle.dumps(known))  # as Tune hands it to a worker
    monkeypatch.setattr(tracking, "_DATA_DIGESTS", {})  # a new worker process
    listed = []
    real = coop._Root.class_folders
    monkeypatch.setattr(coop._Root, "class_folders",
                        lambda self: listed.append(self.url) or real(self))
    assert [d.digest for d in trial_data(cfg, "c", known.known_data)] == \
        [d.digest for d in driver]
    assert listed == []  # the folder was not listed again
    (tmp_path / "tiny_net" / "classnames.txt").write_text("n01 uno\n")  # the stamp changed
    monkeypatch.setattr(tracking, "_DATA_DIGESTS", {})
    assert trial_data(cfg, "c", known.known_data)[0].digest != driver[0].digest
    assert listed  # re-listed once the class-name file changed


def test_per_step_metrics_are_charted_and_the_flat_keys_keep_their_value():
    from pipeline.tracking import step_charted

    logged = step_charted({"base/acc": 70.0, "base/acc_step0": 50.0, "base/acc_step1": 60.0,
                           "base/acc_step2": 70.0, "base/kl_step1": 0.5, "base/n": 9.0})
    assert sorted(p for p in logged if p[0] == "base/acc") == \
        [("base/acc", 50.0, 0), ("base/acc", 60.0, 1), ("base/acc", 70.0, 2)]
    assert ("base/kl", 0.5, 1) in logged and ("base/kl_step1", 0.5, 0) in logged
    assert ("base/n", 9.0, 0) in logged and ("base/acc_step2", 70.0, 0) in logged


def test_the_cluster_image_carries_the_commit_that_code_sha_reads(monkeypatch):
    """cluster/Dockerfile turns the build arg into $GIT_SHA, which `code_version` reads first
    (the image has no .git); the RayJob manifest and the README pass it."""
    from pipeline.env import REPO, code_version

    docker = (REPO / "cluster" / "Dockerfile").read_text()
    assert re.search(r"^ARG GIT_SHA=\"\"$", docker, re.M), docker
    assert re.search(r"^ENV GIT_SHA=\$\{GIT_SHA\}", docker, re.M), docker
    for doc in ("kuberay-rayjob.yaml", "README.md"):
        assert "--build-arg GIT_SHA=$(git rev-parse HEAD)" in (REPO / "cluster" / doc).read_text()
    monkeypatch.setenv("GIT_SHA", "f" * 40)
    monkeypatch.setenv("GIT_DIRTY", "false")
    assert (code_version().sha, code_version().dirty) == ("f" * 40, "false")


# --- one real sweep ---


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, world, weights, ray_local):  # noqa: F811
    """The sweep, run once; the toy world is a copy, so a test may edit its split file."""
    from pipeline.run import main

    tmp = tmp_path_factory.mktemp("conventions")
    root = tmp / "world"
    for folder in ("toy_shapes", "toy_counts"):
        shutil.copytree(world / folder, root / folder)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    y = sweep_yaml(tmp / "conv.yaml", world=root, weights=weights, storage=tmp / "runs",
                   tracking=uri, name="conv", steps=(NUM_STEPS,),
                   extra=f"description: {json.dumps(DESCRIPTION)}\n")
    # (sweep_yaml sets jacobian_samples: 0 itself)
    login = os.environ.get("LOGNAME")
    os.environ["LOGNAME"] = "perl-test-user"  # the driver's; Ray's workers started without it
    try:
        rc = main([str(y)])
    finally:
        del os.environ["LOGNAME"]
        if login is not None:
            os.environ["LOGNAME"] = login
    from pipeline.tracking import Tracker

    runs = {r.data.tags["dataset"]: r for r in children(uri, "test/conv")}
    return {"rc": rc, "uri": uri, "yaml": y, "root": root, "runs": runs,
            "client": Tracker(uri).client}


def _split(sweep, dataset: str) -> Path:
    folder = {"ToyShapes": "toy_shapes", "ToyCounts": "toy_counts"}[dataset]
    return sweep["root"] / folder / f"split_zhou_{dataset}.json"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_source_user_and_notes_on_the_parent_and_child_runs(sweep):
    from pipeline.env import code_version

    assert sweep["rc"] == 0 and sorted(sweep["runs"]) == ["ToyCounts", "ToyShapes"]
    client = sweep["client"]
    sha = code_version().sha
    [parent_id] = {r.data.tags["mlflow.parentRunId"] for r in sweep["runs"].values()}
    parent = client.get_run(parent_id).data.tags
    for tags in (parent, *(r.data.tags for r in sweep["runs"].values())):
        assert tags["mlflow.source.name"] == "pipeline/run.py"
        assert tags["mlflow.source.type"] == "LOCAL"
        assert tags["mlflow.user"] == "perl-test-user"  # the submitter's, also on the workers
        if sha == "unknown":  # no git here and no $GIT_SHA: no commit is claimed
            assert "mlflow.source.git.commit" not in tags
        else:
            assert re.fullmatch(r"[0-9a-f]{40}", sha) and tags["mlflow.source.git.commit"] == sha
            assert tags["code_sha"] == sha  # the one home of the commit
    assert parent["mlflow.note.content"].startswith(DESCRIPTION + "\n\n")
    assert "2 grid cell(s)" in parent["mlflow.note.content"]
    for dataset, r in sweep["runs"].items():
        note, m = r.data.tags["mlflow.note.content"], r.data.metrics
        assert note.startswith(f"**{r.info.run_name}**: a grid cell of sweep `conv`."), note
        assert f"- varied: `dataset` = {dataset}\n" in note, note
        assert f"- protocol `base2novel`: trained on the base classes of {dataset}" in note
        assert f"K={NUM_STEPS} steps" in note and "2 shots, seed 1" in note
        digest = r.data.tags[f"data_digest.{dataset}"]
        assert f"split file `{_split(sweep, dataset)}` (digest `{digest}`)" in note
        assert (f"**Results** (% top-1 after K steps): base/acc **{m['base/acc']:.2f}**, "
                f"novel/acc **{m['novel/acc']:.2f}**, hm **{m['hm']:.2f}**") in note
        assert f"Step 0 (zero-shot CLIP): base/acc {m['base/acc_step0']:.2f}" in note


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_per_step_metrics_have_a_history_over_the_steps(sweep):
    client = sweep["client"]
    for r in sweep["runs"].values():
        m = r.data.metrics
        for family in ("base/acc", "novel/acc", "hm", "base/confidence", "base/brier",
                       "novel/kl", "val/acc"):
            points = sorted(client.get_metric_history(r.info.run_id, family),
                            key=lambda p: p.step)
            assert [p.step for p in points] == list(range(NUM_STEPS + 1)), family
            assert [p.value for p in points] == pytest.approx(
                [m[f"{family}_step{k}"] for k in range(NUM_STEPS + 1)]), family
        # the flat keys the aggregate reads keep their meaning (the value after K steps)
        assert m["base/acc"] == pytest.approx(m[f"base/acc_step{NUM_STEPS}"])
        assert len(client.get_metric_history(r.info.run_id, "base/acc_step0")) == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_every_run_logs_its_dataset_input_with_the_split_file_digest(sweep):
    client = sweep["client"]
    for dataset, r in sweep["runs"].items():
        split = _split(sweep, dataset)
        want = hashlib.sha256(split.read_bytes()).hexdigest()[:16]
        [inp] = client.get_run(r.info.run_id).inputs.dataset_inputs
        assert (inp.dataset.name, inp.dataset.digest, inp.dataset.source_type) == \
            (dataset, want, "local")
        assert json.loads(inp.dataset.source) == {"uri": str(split)}
        assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "train"}
        assert r.data.tags[f"data_digest.{dataset}"] == want


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_changed_split_file_warns_and_runs_that_cell_again(sweep, capsys):
    """ToyShapes' split file loses one test image: the re-submission names the dataset and the
    file and trains that cell again; ToyCounts' run, whose digest tag is removed (as on a run
    logged before the tag existed), still counts as done."""
    from pipeline.run import main

    client, runs = sweep["client"], sweep["runs"]
    client.delete_tag(runs["ToyCounts"].info.run_id, "data_digest.ToyCounts")
    split = _split(sweep, "ToyShapes")
    data = json.loads(split.read_text())
    data["test"] = data["test"][1:]
    split.write_text(json.dumps(data))
    new = hashlib.sha256(split.read_bytes()).hexdigest()[:16]
    old = runs["ToyShapes"].data.tags["data_digest.ToyShapes"]
    capsys.readouterr()
    assert main([str(sweep["yaml"])]) == 0
    out = capsys.readouterr().out
    assert (f"warning: dataset ToyShapes changed: its split file {split} has digest {new} now, "
            f"1 finished cell(s) read {old}; they are not counted as done") in out, out
    assert "2 cells, 1 already FINISHED, 1 to run" in out and "1 finished, 1 skipped" in out, out
    after = [r for r in children(sweep["uri"], "test/conv") if r.info.status == "FINISHED"]
    shapes = [r for r in after if r.data.tags["dataset"] == "ToyShapes"]
    assert len(shapes) == 2 and len(after) == 3
    latest = max(shapes, key=lambda r: r.info.end_time)
    assert latest.data.tags["data_digest.ToyShapes"] == new
    assert client.get_run(latest.info.run_id).inputs.dataset_inputs[0].dataset.digest == new
    assert main([str(sweep["yaml"]), "--dry-run"]) == 0  # and now both cells are done
    out = capsys.readouterr().out
    assert "total: 2 cells, 2 done, 0 todo" in out and "warning: dataset" not in out, out
