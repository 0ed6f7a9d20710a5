"""Sweeps you can compose and override (issue 16 part 6): `base:` includes and `--set`
overrides, validated like the file itself, with messages naming where a value came from."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from pipeline.spec import SpecError, cells, load_spec

SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def files(tmp_path):
    write(tmp_path / "common.yaml", """\
        fixed:
          arch: perl-tiny
          pretrained: embedded
          dataset: ToyShapes
          num_steps: 4
          lr: 1.0e-4
        resources: {cpu: 1, gpu: 0}
        """)
    sweep = write(tmp_path / "s.yaml", """\
        name: s
        experiment: test/s
        base: common.yaml
        fixed:
          lr: 3.0e-4
        grid:
          num_steps: [1, 2]
        resources: {cpu: 2}
        """)
    return tmp_path, sweep


def test_base_merges_under_the_file(files):
    _, sweep = files
    spec = load_spec(sweep)
    grid = cells(spec)
    assert {c.config.num_steps for c in grid} == {1, 2}  # the grid drops the base's fixed K
    assert {c.config.lr for c in grid} == {3e-4}  # the file wins
    assert {c.config.arch for c in grid} == {"perl-tiny"}  # from the base
    assert spec.resources.cpu == 2 and spec.resources.gpu == 0  # mappings merge key by key
    resolved = yaml.safe_load(spec.resolved_yaml)
    assert "base" not in resolved and resolved["fixed"]["arch"] == "perl-tiny"


def test_an_error_in_a_base_names_the_base_file_and_line(files):
    tmp, sweep = files
    (tmp / "common.yaml").write_text((tmp / "common.yaml").read_text()
                                     .replace("num_steps: 4", "rank: 0"))
    with pytest.raises(SpecError) as e:
        load_spec(sweep)
    assert f"{tmp / 'common.yaml'} line 5, fixed.rank: rank=0 must be >= 1" in str(e.value)


@pytest.mark.parametrize("base,fragment", [("nope.yaml", "cannot read base 'nope.yaml'"),
                                           ("s.yaml", "includes itself"),
                                           ("[1]", "give a sweep file path")])
def test_bad_bases_are_refused(files, base, fragment):
    _, sweep = files
    sweep.write_text(sweep.read_text().replace("base: common.yaml", f"base: {base}"))
    with pytest.raises(SpecError, match=fragment) as e:
        load_spec(sweep)
    assert "line 3, base" in str(e.value)


def test_set_overrides_are_validated_like_the_file(files):
    _, sweep = files
    spec = load_spec(sweep, overrides=["fixed.lr=1e-3", "grid.seed=[1,2]", "resources.gpu=0.5"])
    grid = cells(spec)
    assert len(grid) == 4 and {c.config.lr for c in grid} == {1e-3}
    assert {c.config.seed for c in grid} == {1, 2} and spec.resources.gpu == 0.5
    assert yaml.safe_load(spec.resolved_yaml)["grid"]["seed"] == [1, 2]
    for bad, fragment in [("fixed.lr=0", "--set fixed.lr, fixed.lr: lr=0 must be > 0"),
                          ("grid.num_steps=[1, 1000]", "--set grid.num_steps, "
                                                       "grid.num_steps[1]: num_steps=1000"),
                          ("resources.gpu=2.5", "--set resources.gpu"),
                          ("fixed.lr", "is not key=value"),
                          ("name.x=1", "name is not a mapping")]:
        with pytest.raises(SpecError) as e:
            load_spec(sweep, overrides=[bad])
        assert fragment in str(e.value), str(e.value)


def test_set_a_grid_axis_the_base_fixes(monkeypatch):
    monkeypatch.setenv("PERL_DATA_ROOT", "/data/coop")
    spec = load_spec(SWEEPS / "base2novel.yaml", overrides=["grid.num_steps=[2,4]"])
    assert {c.config.num_steps for c in cells(spec)} == {2, 4}


def test_paper_sweeps_share_one_base():
    """The paper's settings live in sweeps/base/paper.yaml only: no paper sweep repeats them."""
    base = yaml.safe_load((SWEEPS / "base" / "paper.yaml").read_text())["fixed"]
    for path in SWEEPS.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        if "sweeps" in raw:  # a suite file (sweeps/paper.yaml): no settings of its own
            continue
        if raw.get("base") != "base/paper.yaml":
            assert path.name == "smoke.yaml", path  # the embedded-world demo
            continue
        repeated = {k for k, v in (raw.get("fixed") or {}).items() if base.get(k) == v}
        assert not repeated, (path.name, repeated)


def test_the_resolved_sweep_carries_no_literal_credential(tmp_path):
    """`sweep/resolved.yaml` (logged as the parent run's artifact) is dumped before ${VAR}
    substitution; credentials written in the file or in a --set are redacted too."""
    sweep = write(tmp_path / "s.yaml", """\
        name: s
        experiment: test/s
        tracking_uri: http://alice:pw-in-file@mlflow.example:5000
        storage: s3://AKIAKEY:pw-in-storage@bucket/runs
        fixed: {dataset: ToyShapes, arch: perl-tiny, pretrained: embedded,
                data_root: "${DATA:-s3://k:pw-in-default@bucket/data}"}
        """)
    spec = load_spec(sweep, env={}, overrides=[
        "tracking_uri=https://bob:pw-in-set@mlflow.example/x?y=1"])
    text = spec.resolved_yaml
    assert "pw-" not in text and "alice" not in text and "AKIAKEY" not in text, text
    resolved = yaml.safe_load(text)
    assert resolved["tracking_uri"] == "https://***@mlflow.example/x?y=1"
    assert resolved["storage"] == "s3://***@bucket/runs"
    assert resolved["fixed"]["data_root"] == "${DATA:-s3://***@bucket/data}"
    assert spec.tracking_uri.startswith("https://bob:pw-in-set@")  # what runs keeps them
