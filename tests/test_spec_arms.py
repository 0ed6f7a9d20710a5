"""Sweep arms (`arms:` in a sweep file, pipeline/spec.py): labelled sub-grids whose union is the
sweep; a run two arms share is one cell; errors name the file, the line and `arms[i]...`; the arm
is in the cell name and reaches the trial's tags (pipeline/trainable.py)."""

from __future__ import annotations

import textwrap

import pytest

from pipeline.spec import SpecError, cells, expand, parse_spec

HEAD = """\
name: t
experiment: e
fixed: {dataset: ToyShapes, arch: perl-tiny, pretrained: embedded, data_root: /w}
grid:
  inject_layer: [6, 7]
  seed: [1, 2]
"""


def _spec(arms: str, head: str = HEAD):
    return parse_spec(head + textwrap.dedent(arms), source="arms.yaml")


def _error(arms: str, head: str = HEAD) -> str:
    with pytest.raises(SpecError) as e:
        _spec(arms, head)
    return str(e.value)


def test_union_of_arms_with_overrides_and_cell_names():
    spec = _spec("""\
        arms:
          - name: vision_J
            fixed: {text_inject_layer: 7}
          - name: both_towers
          - name: one_seed              # an arm's grid replaces the sweep's axis
            fixed: {text_inject_layer: 7, num_steps: 2}
            grid: {seed: [3]}
        """)
    grid = cells(spec)
    got = [(c.config.inject_layer, c.config.text_inject_layer, c.config.num_steps, c.config.seed,
            c.arm) for c in grid]
    # J=7 with the text at 7 is the model "text follows J" at J=7: one cell of both arms
    assert got == [(6, 7, 4, 1, "vision_J"), (6, 7, 4, 2, "vision_J"),
                   (7, 7, 4, 1, "vision_J,both_towers"), (7, 7, 4, 2, "vision_J,both_towers"),
                   (6, -1, 4, 1, "both_towers"), (6, -1, 4, 2, "both_towers"),
                   (6, 7, 2, 3, "one_seed"), (7, 7, 2, 3, "one_seed")]
    assert spec.arm_names == ("vision_J", "both_towers", "one_seed")
    assert grid[0].name == "b2n/ToyShapes/16shot/seed1/J6/K4/arm=vision_J"
    assert grid[-1].name == "b2n/ToyShapes/16shot/seed3/J7/K2/arm=one_seed"
    assert len({c.name for c in grid}) == len(grid) == len(expand(spec))


def test_a_run_shared_by_two_arms_is_one_cell_with_both_labels():
    spec = _spec("""\
        arms:
          - {name: a}
          - {name: b, grid: {inject_layer: [7, 8]}}   # J=7 is also a cell of arm a
        """)
    grid = cells(spec)
    assert len(grid) == 6 and len({c.config_hash for c in grid}) == 6
    shared = [c for c in grid if c.config.inject_layer == 7]
    assert [c.arm for c in shared] == ["a,b", "a,b"]
    assert shared[0].name.endswith("/J7/K4/arm=a+b")
    assert [c.arm for c in grid if c.config.inject_layer == 8] == ["b", "b"]


def test_without_arms_nothing_changes():
    spec = parse_spec(HEAD, source="plain.yaml")
    grid = cells(spec)
    assert [c.arm for c in grid] == [""] * 4 and spec.arm_names == ()
    assert grid[0].name == "b2n/ToyShapes/16shot/seed1/J6/K4"


@pytest.mark.parametrize("arms, where, what", [
    ("""\
        arms:
          - {name: a}
          - {name: b, fixed: {lr: fast}}
        """, "line 9, arms[1].fixed.lr", "lr: expected a number (got 'fast')"),
    ("""\
        arms:
          - name: a
            grid: {shots: [4, 4]}
        """, "line 9, arms[0].grid.shots[1]", "duplicate value 4 in arms[0].grid.shots"),
    ("""\
        arms:
          - name: a
            fixed: {no_such_field: 1}
        """, "line 9, arms[0].fixed.no_such_field", "unknown TrainConfig field"),
    ("""\
        arms:
          - name: a
            fixed: {shots: 4}
            grid: {shots: [8]}
        """, "line 10, arms[0].grid.shots", "set in both 'fixed' and 'grid' of this arm"),
    ("""\
        arms:
          - {name: a}
          - {name: a, fixed: {shots: 4}}
        """, "line 9, arms[1].name", "duplicate arm name 'a' (also arms[0])"),
    ("""\
        arms:
          - {name: a, grid: {text_inject_layer: [3, 40]}}
        """, "line 8, arms[0].grid.text_inject_layer[1]", "text_inject_layer=40 is outside"),
    ("""\
        arms:
          - {name: a, flxed: {shots: 4}}
        """, "line 8, arms[0].flxed", "unknown key 'flxed' in arms[0]; allowed: fixed, grid, "
                                      "name"),
    ("""\
        arms:
          - {name: "two words"}
        """, "line 8, arms[0].name", "should match pattern"),
    ("arms: []\n", "line 7, arms", "arms is empty"),
])
def test_errors_name_file_line_and_arm_key_path(arms, where, what):
    msg = _error(arms)
    assert f"arms.yaml: {where}: " in msg and what in msg, msg


def test_an_arm_may_not_collapse_its_own_grid_points_but_data_root_is_substituted(monkeypatch):
    # data_root is an execution field: two values in one arm are one run twice (an error),
    # and ${VAR} works in an arm's settings as in the sweep's
    monkeypatch.setenv("WORLD", "/env/world")
    msg = _error("""\
        arms:
          - {name: a, grid: {data_root: ["${WORLD}", /x]}}
        """)
    assert "arms.yaml: line 8, arms[0]: two grid points are the same run" in msg
    spec = _spec("""\
        arms:
          - {name: a, fixed: {data_root: "${WORLD}"}}
        """)
    assert {c.config.data_root for c in cells(spec)} == {"/env/world"}


def test_the_arm_reaches_the_trial_tags_and_old_cells_get_none():
    from pipeline.trainable import arm_tags

    spec = _spec("""\
        arms:
          - {name: a}
          - {name: b, grid: {inject_layer: [7, 8]}}
        """)
    context = {"sweep_arms": ",".join(spec.arm_names)}
    shared = next(c for c in cells(spec) if c.config.inject_layer == 7)
    cell = {"name": shared.name, "config": shared.config.to_dict(), "arm": shared.arm}
    assert arm_tags({"cell": cell}, context) == {"arm": "a,b", "sweep_arms": "a,b"}
    assert arm_tags({"cell": {"name": "x", "config": {}}}, {}) == {}  # a sweep without arms
    assert arm_tags({"lr": 0.1}, context) == {}  # a search-phase trial
