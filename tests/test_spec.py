"""Sweep YAML schema: every shipped sweep validates and expands to the paper's cell counts; invalid
files give one readable message naming the file, the line and the key path; hashes are stable."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from perl_core.config import TrainConfig
from pipeline.spec import (SpecError, cell_name, cells, expand, group_order, load_spec,
                           parse_spec, resolve_tracking_uri)

REPO = Path(__file__).resolve().parents[1]
SWEEPS = REPO / "sweeps"
DATASETS_11 = {"ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
               "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101"}

# sweep file -> (number of grid cells, the field(s) the paper varies besides dataset/seed)
PAPER = {
    "base2novel.yaml": (33, {}),
    "cross_dataset.yaml": (3, {}),
    "domain_generalization.yaml": (3, {}),
    "ablation_steps.yaml": (165, {"num_steps": {1, 2, 3, 4, 5}}),
    # two arms: vision J (text at 7) and both towers moving, 198 cells each
    "ablation_layer.yaml": (363,  # J=7 is one cell of both arms
                           {"inject_layer": {6, 7, 8, 9, 10, 11}}),
    "ablation_modality.yaml": (99, {"modality": {"vision", "text", "both"}}),
    # six variants (shared pair kept) + step/layer/layerstep with specific projectors only
    "ablation_loop.yaml": (297, {"variant": {"shared", "step", "early", "deep", "layer",
                                             "layerstep"}}),
    "sensitivity.yaml": (165, {}),  # 5 arms x 11 datasets x 3 seeds
    "alignment.yaml": (198, {"anchor_weight": {0.0, 0.1, 0.3, 1.0, 3.0, 10.0}}),
    "hpo.yaml": (3, {}),
    "precision.yaml": (6, {"precision": {"fp32", "bf16"}}),  # EuroSAT only
}
TOY = {"smoke.yaml": 3, "toy/base2novel.yaml": 12, "toy/cross_dataset.yaml": 2,
       "toy/domain_generalization.yaml": 2, "toy/ablation_steps.yaml": 5,
       "toy/ablation_layer.yaml": 11, "toy/ablation_modality.yaml": 3,
       "toy/ablation_loop.yaml": 9, "toy/sensitivity.yaml": 5, "toy/alignment.yaml": 6,
       "toy/hpo.yaml": 1, "toy/base2novel_long.yaml": 9}
# suite files (pipeline/suite.py): the paper's nine sweeps, and their embedded-default twins
PAPER_SWEEPS = ["base2novel.yaml", "cross_dataset.yaml", "domain_generalization.yaml",
                "ablation_steps.yaml", "ablation_layer.yaml", "ablation_modality.yaml",
                "ablation_loop.yaml", "alignment.yaml", "sensitivity.yaml"]
SUITES = {"paper.yaml": PAPER_SWEEPS, "toy/paper.yaml": PAPER_SWEEPS}
PAPER_SETTINGS = {"arch": "ViT-B-16-quickgelu", "pretrained": "openai", "shots": 16,
                  "inject_layer": 7, "num_steps": 4, "rank": 1, "anchor_weight": 1.0, "lr": 1e-4,
                  "batch_size": 4, "epochs": 1}


@pytest.fixture(autouse=True)
def _env(monkeypatch, tmp_path):
    monkeypatch.setenv("PERL_DATA_ROOT", "/data/coop")
    for var in ("PERL_PRETRAINED", "PERL_RUNS_DIR", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)  # relative defaults resolve against the cwd, made absolute


def test_every_sweep_file_is_covered():
    # sweeps/base/ holds included settings (`base:`), not sweeps
    shipped = {p.relative_to(SWEEPS).as_posix() for p in SWEEPS.rglob("*.yaml")
               if p.parent.name != "base"}
    assert shipped == set(PAPER) | set(TOY) | set(SUITES)


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_files_list_the_paper_sweeps(name):
    from pipeline.suite import is_suite, load_suite

    assert is_suite(str(SWEEPS / name))
    suite, files = load_suite(str(SWEEPS / name))
    assert [Path(f).name for f in files] == SUITES[name]
    assert {Path(f).parent for f in files} == {(SWEEPS / name).parent}
    for f in files:
        load_spec(f)  # each validates


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_sweeps_validate_with_paper_settings(name, tmp_path):
    n_cells, varied = PAPER[name]
    spec = load_spec(SWEEPS / name)
    grid = cells(spec)
    assert len(grid) == n_cells
    assert len({c.config_hash for c in grid}) == n_cells
    assert len({c.name for c in grid}) == n_cells
    assert spec.name == name.removesuffix(".yaml")
    assert spec.storage == str(tmp_path / "runs")
    for c in grid:
        cfg = c.config
        assert cfg.data_root == "/data/coop" and cfg.seed in (1, 2, 3)
        for field, value in PAPER_SETTINGS.items():
            if field not in varied:
                assert getattr(cfg, field) == value, (name, field)
    for field, values in varied.items():
        assert {getattr(c.config, field) for c in grid} == values
    if spec.name in ("cross_dataset", "domain_generalization"):
        assert {c.config.dataset for c in grid} == {"ImageNet"}
        assert {c.config.protocol for c in grid} == {spec.name}
        targets = grid[0].config.eval_datasets
        assert len(targets) == (10 if spec.name == "cross_dataset" else 4)
    elif spec.name == "precision":
        assert {c.config.dataset for c in grid} == {"EuroSAT"}
        assert {c.config.device for c in grid} == {"cuda"}
    elif spec.name != "hpo":
        assert {c.config.dataset for c in grid} == DATASETS_11
        assert {c.config.protocol for c in grid} == {"base2novel"}


def test_hpo_sweep_searches_on_validation():
    spec = load_spec(SWEEPS / "hpo.yaml")
    assert spec.search is not None
    assert set(spec.search.space) == {"lr", "anchor_weight", "weight_decay"}
    assert spec.search.metric.startswith("val/")


@pytest.mark.parametrize("name", sorted(TOY))
def test_toy_sweeps_run_on_the_embedded_default(name, tmp_path, monkeypatch):
    monkeypatch.delenv("PERL_DATA_ROOT")  # the toy world defaults to ./runs/world
    spec = load_spec(SWEEPS / name)
    grid = cells(spec)
    assert len(grid) == TOY[name]
    for c in grid:
        assert (c.config.arch, c.config.pretrained) == ("perl-tiny", "embedded")
        assert c.config.data_root == str(tmp_path / "runs" / "world")
    assert spec.resources.gpu == 0


def test_paper_data_root_must_be_set(monkeypatch):
    monkeypatch.delenv("PERL_DATA_ROOT")
    with pytest.raises(SpecError) as e:
        load_spec(SWEEPS / "base2novel.yaml")
    msg = str(e.value)
    assert "base2novel.yaml" in msg and "fixed.data_root" in msg and "PERL_DATA_ROOT" in msg


def test_env_substitution_and_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.setenv("BUCKET", "s3://bkt/coop")
    text = textwrap.dedent("""\
        name: t
        experiment: e
        fixed: {dataset: ToyShapes, arch: perl-tiny, pretrained: embedded}
        grid:
          data_root: ["${BUCKET}", "${NOT_SET:-rel/world}"]
          seed: [1]
        storage: ${NOT_SET:-out}
        tracking_uri: sqlite:///db/mlflow.db
    """)
    with pytest.raises(SpecError, match="same run"):  # data_root does not change the result
        parse_spec(text, source="t.yaml")
    spec = parse_spec(text.replace("seed: [1]", "seed: [1, 2]").replace(
        'data_root: ["${BUCKET}", "${NOT_SET:-rel/world}"]', 'data_root: ["${BUCKET}"]'),
        source="t.yaml")
    assert spec.storage == str(tmp_path / "out")
    assert spec.tracking_uri == f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    assert {c.data_root for c in expand(spec)} == {"s3://bkt/coop"}
    spec = parse_spec("name: t\nexperiment: e\nfixed: {dataset: ToyShapes, data_root: "
                      "'${NOT_SET:-rel/world}', pretrained: embedded, arch: perl-tiny}\n")
    assert expand(spec)[0].data_root == str(tmp_path / "rel" / "world")


def test_tracking_uri_resolution(monkeypatch, tmp_path):
    spec = parse_spec("name: t\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, "
                      "pretrained: embedded}\n")
    assert resolve_tracking_uri(spec) == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(spec) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri(spec, "sqlite:///x.db") == f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(SpecError, match="file store"):
        resolve_tracking_uri(spec, "file:///tmp/mlruns")


# --- invalid files --------------------------------------------------------------------------------

BASE = """\
name: bad
experiment: perl/bad
fixed:
  dataset: ToyShapes
  arch: perl-tiny
  pretrained: embedded
"""

# (case, YAML text, fragments the message must contain: key path, what is allowed/wrong)
INVALID = [
    ("yaml_syntax", "name: bad\nexperiment: [perl\nfixed: {}\n",
     ["line 3", "YAML syntax error"]),
    ("unknown_top_key", BASE + "gird:\n  seed: [1, 2]\n",
     ["line 7", "gird", "unknown key", "grid", "fixed"]),
    ("unknown_field", BASE + "  num_step: 4\n",
     ["line 7", "fixed.num_step", "unknown TrainConfig field", "num_steps"]),
    ("wrong_type", BASE + "grid:\n  shots: [16, sixteen]\n",
     ["line 8", "grid.shots[1]", "expected an integer", "sixteen"]),
    ("wrong_type_bool", BASE + "  lr: true\n", ["fixed.lr", "expected a number"]),
    ("unknown_dataset", BASE.replace("ToyShapes", "ToyShapez"),
     ["line 4", "fixed.dataset", "unknown dataset 'ToyShapez'", "ToyShapes"]),
    ("unknown_variant", BASE + "grid:\n  variant: [shared, fancy]\n",
     ["grid.variant[1]", "'fancy' is not one of", "layerstep"]),
    ("inject_layer_outside_depth", BASE + "grid:\n  inject_layer: [7, 12]\n",
     ["line 8", "grid.inject_layer[1]", "inject_layer=12", "layers 0..11"]),
    ("num_steps_negative", BASE + "  num_steps: -1\n",
     ["line 7", "fixed.num_steps", ">= 0"]),
    ("shots_zero", BASE + "  shots: 0\n", ["fixed.shots", "> 0"]),
    ("duplicate_grid_values", BASE + "grid:\n  seed: [1, 2, 1]\n",
     ["line 8", "grid.seed[2]", "duplicate value 1"]),
    ("empty_grid", BASE + "grid: {}\n", ["line 7", "grid", "empty"]),
    ("empty_grid_list", BASE + "grid:\n  seed: []\n", ["grid.seed", "no values"]),
    ("empty_search_space", BASE + "search:\n  space: {}\n  metric: val/acc\n",
     ["line 8", "search.space", "empty"]),
    ("low_not_below_high", BASE + "search:\n  space:\n    lr: {type: loguniform, low: 1.0e-3, "
                                  "high: 1.0e-4}\n  metric: val/acc\n",
     ["line 9", "search.space.lr", "low=0.001 must be < high=0.0001"]),
    ("test_metric_for_hpo", BASE + "search:\n  space:\n    lr: {type: loguniform, low: 1.0e-5, "
                                   "high: 1.0e-3}\n  metric: novel/acc\n",
     ["line 10", "search.metric", "not a validation metric", "val/acc"]),
    ("search_type", BASE + "search:\n  space:\n    lr: {type: gaussian, low: 0, high: 1}\n"
                           "  metric: val/acc\n",
     ["search.space.lr.type", "loguniform", "choice"]),
    ("duplicate_key", BASE + "  dataset: ToyCounts\n", ["fixed.dataset", "duplicate key"]),
    ("grid_and_fixed", BASE + "grid:\n  dataset: [ToyShapes, ToyCounts]\n",
     ["grid.dataset", "set in both 'fixed' and 'grid'"]),
    ("test_only_training_set", BASE.replace("ToyShapes", "ToyWorldSketch"),
     ["fixed.dataset", "only a test split", "eval_datasets"]),
    ("targets_missing", BASE + "  protocol: cross_dataset\n",
     ["fixed.eval_datasets", "needs eval_datasets"]),
    ("search_without_fixed_dataset",
     BASE.replace("  dataset: ToyShapes\n", "") + "grid:\n  dataset: [ToyShapes]\nsearch:\n  space:"
     "\n    lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}\n  metric: val/acc\n",
     ["search", "starts from 'fixed' only", "set dataset in 'fixed'"]),
    ("resources_key", BASE + "resources: {cpu: 1, gpus: 1}\n",
     ["resources.gpus", "unknown key", "gpu"]),
    ("missing_name", BASE.replace("name: bad\n", ""), ["name", "required"]),
    ("unset_env", BASE + "  data_root: ${SURELY_NOT_SET_VAR}\n",
     ["fixed.data_root", "SURELY_NOT_SET_VAR is not set"]),
    ("embedded_wrong_arch", BASE.replace("arch: perl-tiny", "arch: ViT-B-16-quickgelu"),
     ["fixed.pretrained", "perl-tiny"]),
]


@pytest.mark.parametrize("case,text,fragments", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_sweep_files_name_file_and_key(case, text, fragments, tmp_path):
    path = tmp_path / f"{case}.yaml"
    path.write_text(text)
    assert_spec_error(path, fragments)


def assert_spec_error(path: Path, fragments) -> str:
    """load_spec(path) refuses the file with a message naming it and every fragment, no
    traceback and no pydantic jargon; returns the message."""
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in: {msg}"
    assert "Traceback" not in msg and "pydantic" not in msg.lower()
    return msg


def test_all_problems_at_once(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(BASE + "  num_steps: -2\n  shots: 0\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert len(e.value.problems) == 2
    assert "2 problems" in str(e.value)


def test_preflight_checks_the_checkpoint_file(tmp_path, capsys):
    from pipeline.run import main
    from pipeline.spec import preflight

    path = tmp_path / "missing.yaml"
    path.write_text(BASE.replace("pretrained: embedded", f"pretrained: {tmp_path}/nope.pt")
                    .replace("arch: perl-tiny", "arch: ViT-B-16-quickgelu")
                    .replace("ToyShapes", "Caltech101") + f"  data_root: {tmp_path}/coop\n")
    spec = load_spec(path)  # the file itself is fine
    with pytest.raises(SpecError) as e:
        preflight(spec, expand(spec))
    msg = str(e.value)
    assert "fixed.pretrained" in msg and "nope.pt does not exist" in msg
    assert "data_root" not in msg  # a missing dataset fails its own cells, the rest go on
    assert main([str(path)]) == 2  # before any MLflow run or Ray start
    assert "nope.pt" in capsys.readouterr().out
    assert not (tmp_path / "runs").exists()


def test_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "nope.yaml")


def test_cli_exit_code_2_on_invalid_file(tmp_path, capsys):
    from pipeline.run import main

    path = tmp_path / "bad.yaml"
    path.write_text(BASE + "  num_steps: -1\n")
    assert main([str(path), "--dry-run"]) == 2
    assert "fixed.num_steps" in capsys.readouterr().out


def test_project_sweep_found_from_another_folder(tmp_path, monkeypatch, capsys):
    """`python -m pipeline.run sweeps/X.yaml` started outside the project (a `ray job submit`
    without --working-dir starts in a Ray session folder) reads the project's sweeps/X.yaml and
    runs from the project folder, saying so; a file that is nowhere is still refused."""
    from pipeline import status
    from pipeline.run import main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("PERL_DATA_ROOT", str(tmp_path / "world"))
    monkeypatch.delenv("PERL_RUNS_DIR", raising=False)
    for cli, flag in ((main, "--dry-run"), (status.main, "--cells")):
        monkeypatch.chdir(tmp_path)  # undone after the test, also after the CLI's own chdir
        assert cli(["sweeps/smoke.yaml", flag]) == 0
        out = capsys.readouterr().out
        assert (f"sweeps/smoke.yaml is not in {tmp_path}; using {repo / 'sweeps' / 'smoke.yaml'}"
                f" and running from {repo}") in out, out
        assert "3 cells" in out and os.getcwd() == str(repo), out
    monkeypatch.chdir(tmp_path)
    assert main(["sweeps/none.yaml", "--dry-run"]) == 2
    assert "sweeps/none.yaml: cannot read the sweep file" in capsys.readouterr().out


# --- expansion, names, hashes ---------------------------------------------------------------------


def test_expand_is_the_cartesian_product_in_yaml_order():
    spec = parse_spec(BASE.replace("  dataset: ToyShapes\n", "") +
                      "grid:\n  dataset: [ToyShapes, ToyCounts]\n  num_steps: [1, 2, 3]\n")
    got = [(c.dataset, c.num_steps) for c in expand(spec)]
    assert got == [(d, k) for d in ("ToyShapes", "ToyCounts") for k in (1, 2, 3)]


def test_cell_names():
    cfg = TrainConfig(dataset="ToyShapes", shots=16, seed=1, inject_layer=7, num_steps=4)
    assert cell_name(cfg) == "b2n/ToyShapes/16shot/seed1/J7/K4"
    assert cell_name(cfg.replace(modality="vision"), ["modality", "seed"]) == \
        "b2n/ToyShapes/16shot/seed1/J7/K4/modality=vision"
    assert cell_name(cfg.replace(protocol="cross_dataset", anchor_weight=0.1),
                     ["anchor_weight"]) == "xd/ToyShapes/16shot/seed1/J7/K4/anchor_weight=0.1"


def test_group_order_keeps_backbone_groups_together():
    spec = parse_spec(BASE.replace("  dataset: ToyShapes\n", "") +
                      "grid:\n  seed: [1, 2]\n  dataset: [ToyShapes, ToyCounts]\n")
    ordered = group_order(cells(spec))
    assert [c.config.dataset for c in ordered] == ["ToyShapes", "ToyShapes", "ToyCounts",
                                                   "ToyCounts"]
    assert [c.config.seed for c in ordered] == [1, 2, 1, 2]


def test_config_hash_is_stable():
    # pinned: a change here silently orphans every finished run (bump SCHEMA_VERSION on purpose)
    cfg = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded", num_steps=2)
    assert cfg.config_hash() == "dcc835716867d195"
    smoke = cells(load_spec(SWEEPS / "smoke.yaml"))
    assert smoke[0].config_hash == smoke[0].config.config_hash()
    b2n = cells(load_spec(SWEEPS / "base2novel.yaml"))
    assert (b2n[0].name, b2n[0].config_hash) == ("b2n/ImageNet/16shot/seed1/J7/K4",
                                                 "efb1436d272590ab")
    # key order, defaults spelled out, numeric spelling and execution fields do not matter
    a = parse_spec("name: a\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, "
                   "pretrained: embedded, lr: 1e-4, data_root: /x, device: cpu}\n")
    b = parse_spec("name: b\nexperiment: f\nfixed: {lr: 0.0001, pretrained: embedded, "
                   "arch: perl-tiny, dataset: ToyShapes, shots: 16, data_root: /y}\n")
    assert cells(a)[0].config_hash == cells(b)[0].config_hash
    # ... while a result-changing field does
    c = parse_spec("name: c\nexperiment: e\nfixed: {dataset: ToyShapes, arch: perl-tiny, "
                   "pretrained: embedded, lr: 2e-4}\n")
    assert cells(c)[0].config_hash != cells(a)[0].config_hash
    # the shared cells of two sweeps are the same runs
    loop = {c.config_hash for c in cells(load_spec(SWEEPS / "ablation_loop.yaml"))}
    assert {c.config_hash for c in b2n} <= loop


# --- the feature-cache setting and the cell order -------------------------------------------------


def test_cache_setting_defaults_and_values(monkeypatch, tmp_path):
    spec = parse_spec(BASE)
    assert spec.cache.model_dump() == {"enabled": True, "url": None, "max_gb": 20.0,
                                       "dtype": "float32"}
    monkeypatch.setenv("PERL_CACHE", "s3://bucket/feature-cache")
    spec = parse_spec(BASE + "cache: {url: '${PERL_CACHE}', max_gb: 2.5, dtype: float16}\n")
    assert (spec.cache.url, spec.cache.max_gb, spec.cache.dtype) == \
        ("s3://bucket/feature-cache", 2.5, "float16")
    # a relative local path is the submit directory's, like storage
    spec = parse_spec(BASE + "cache: {url: cache/here, enabled: false}\n")
    assert spec.cache.url == str(tmp_path / "cache" / "here") and spec.cache.enabled is False


def test_cache_setting_is_outside_the_config_hash():
    plain = cells(parse_spec(BASE))
    cached = cells(parse_spec(BASE + "cache: {url: /x, dtype: float16, max_gb: 1}\n"))
    assert [c.config_hash for c in plain] == [c.config_hash for c in cached]


@pytest.mark.parametrize("text,fragments", [
    ("cache: {size_gb: 3}\n", ["line 7", "cache.size_gb", "unknown key", "max_gb", "dtype"]),
    ("cache: {dtype: int8}\n", ["cache.dtype", "float32", "float16"]),
    ("cache: {max_gb: 0}\n", ["cache.max_gb", "greater than 0"]),
    ("cache: {url: ''}\n", ["cache.url", "empty"]),
    ("cache: {url: '${SURELY_NOT_SET_VAR}'}\n", ["cache.url", "SURELY_NOT_SET_VAR is not set"]),
], ids=["unknown_key", "dtype", "max_gb", "empty_url", "unset_env"])
def test_invalid_cache_setting_names_file_and_key(text, fragments, tmp_path):
    path = tmp_path / "cache.yaml"
    path.write_text(BASE + text)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert str(path) in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in: {msg}"


def test_group_order_backbone_then_cache_group_then_training_views(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "b.safetensors").write_bytes(b"")
    # YAML order varies the backbone fastest: grouping must undo that
    spec = parse_spec(BASE.replace("  dataset: ToyShapes\n", "").replace(
        "  pretrained: embedded\n", "") + "grid:\n  dataset: [ToyShapes, ToyCounts]\n"
        "  num_steps: [1, 2]\n  seed: [1, 2]\n  pretrained: [a.safetensors, b.safetensors]\n")
    got = [(Path(c.config.pretrained).name, c.config.dataset, c.config.seed, c.config.num_steps)
           for c in group_order(cells(spec))]
    want = [(w, d, s, k) for w in ("a.safetensors", "b.safetensors")
            for d in ("ToyShapes", "ToyCounts") for s in (1, 2) for k in (1, 2)]
    assert got == want
    assert sorted(map(str, got)) == sorted(map(str, [
        (Path(c.config.pretrained).name, c.config.dataset, c.config.seed, c.config.num_steps)
        for c in cells(spec)]))  # a permutation: nothing lost or duplicated


def test_group_order_splits_what_the_feature_cache_keys_split():
    from pipeline.spec import cache_group, train_view_key

    base = TrainConfig(dataset="ToyShapes", arch="perl-tiny", pretrained="embedded")
    same = [base.replace(num_steps=1), base.replace(lr=1e-3), base.replace(anchor_weight=0.1),
            base.replace(weight_decay=0.1), base.replace(modality="vision"),
            base.replace(variant="step"), base.replace(seed=2), base.replace(shots=4)]
    for cfg in same:
        assert cache_group(cfg) == cache_group(base), cfg
    differ = [base.replace(inject_layer=6), base.replace(text_inject_layer=5),
              base.replace(precision="bf16"), base.replace(protocol="all"),
              base.replace(dataset="ToyCounts"), base.replace(template="coop"),
              base.replace(variant="early"), base.replace(variant="deep")]
    for cfg in differ:
        assert cache_group(cfg) != cache_group(base), cfg
    assert train_view_key(base.replace(num_steps=1, lr=1e-3)) == train_view_key(base)
    for cfg in (base.replace(seed=2), base.replace(shots=4), base.replace(aug_scale_min=0.5),
                base.replace(batch_size=8)):
        assert train_view_key(cfg) != train_view_key(base)


# --- imports: modules that register datasets ------------------------------------------------------


@pytest.fixture
def registry_snapshot():
    """Datasets registered by a test's module are forgotten afterwards (the registry is global)."""
    from perl_core.data import registry

    registry.list_datasets()  # the built-in ones first
    saved = dict(registry._REGISTRY), dict(registry._KEYS)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved[0])
    registry._KEYS.clear()
    registry._KEYS.update(saved[1])


def test_imports_register_datasets_before_the_cells_are_checked(tmp_path, monkeypatch,
                                                                 registry_snapshot):
    (tmp_path / "spec_test_datasets.py").write_text(textwrap.dedent("""\
        from perl_core.data.registry import DatasetSpec, register

        register(DatasetSpec(name="SpecTestShapes", dataset_dir="toy_shapes", image_dir="images",
                             split_file="split_zhou_ToyShapes.json", template="a photo of a {}."))
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    text = BASE.replace("ToyShapes", "SpecTestShapes")
    with pytest.raises(SpecError, match="unknown dataset 'SpecTestShapes'"):
        parse_spec(text)  # not registered without the import
    spec = parse_spec(text + "imports: [spec_test_datasets]\n")
    assert spec.imports == ["spec_test_datasets"]
    assert [c.config.dataset for c in cells(spec)] == ["SpecTestShapes"]
    # the key is outside the config hash: a cell's identity is its TrainConfig
    assert spec.base_config().config_hash() == parse_spec(BASE).base_config().replace(
        dataset="SpecTestShapes").config_hash()


@pytest.mark.parametrize("module,text,fragments", [
    ("spec_test_surely_missing_module", None,
     ["line 7", "imports[0]", "cannot import module 'spec_test_surely_missing_module'",
      "ModuleNotFoundError", "PYTHONPATH", "--working-dir"]),
    ("spec_test_broken_module", "raise RuntimeError('no database here')\n",
     ["line 7", "imports[0]", "cannot import module 'spec_test_broken_module'",
      "RuntimeError: no database here"]),
    ("lib/my_datasets.py", None, ["line 7", "imports", "not module names", "lib/my_datasets"]),
], ids=["missing", "raises", "a_path"])
def test_failing_import_names_file_key_and_module(module, text, fragments, tmp_path,
                                                  monkeypatch):
    if text is not None:
        (tmp_path / f"{module}.py").write_text(text)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(__import__("sys").modules, module, raising=False)
    path = tmp_path / "imports.yaml"
    path.write_text(BASE + f"imports: [{module}]\n")
    assert_spec_error(path, fragments)


def test_train_cli_takes_the_same_imports(capsys):
    from perl_core.train import build_parser, main

    args = build_parser().parse_args(["--import", "a_mod", "--import", "b.mod"])
    assert args.imports == ["a_mod", "b.mod"]
    with pytest.raises(SystemExit) as e:
        main(["--import", "spec_test_surely_missing_module", "--dataset", "ToyShapes",
              "--data-root", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--import spec_test_surely_missing_module" in err and "ModuleNotFoundError" in err
