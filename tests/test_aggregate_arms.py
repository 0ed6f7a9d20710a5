"""The aggregate of sweeps with arms: Table 4 with both readings of the variants and each row's own
trainable count, Fig. 3a with the paper beside the caption's reading only, and the sensitivity
table's Δ against the default arm, worked out by hand.

SYNTHETIC FIXTURE: the runs are the cells of small sweep files (pipeline/spec.py) given invented
round-number metrics, tagged as pipeline/trainable.py tags them; no training happens.
"""

from __future__ import annotations

import json
import statistics
import textwrap

import pytest

pytest.importorskip("mlflow")

from fake_runs import HM, memory_runs  # noqa: E402
from fake_runs import lrow as _lrow, named as _named  # noqa: E402
from pipeline import aggregate as agg_mod  # noqa: E402
from pipeline import reference as ref  # noqa: E402
from pipeline.aggregate.loop import PARAMS_OURS, PARAMS_PAPER  # noqa: E402
from pipeline.spec import arm_signature, cells, parse_spec  # noqa: E402
from pipeline.tables import to_csv, to_markdown  # noqa: E402
from pipeline.trainable import arm_tags  # noqa: E402

HEAD = """\
name: {name}
experiment: perl/{name}
fixed: {{protocol: base2novel, data_root: /coop, shots: 16}}
grid:
  dataset: [DTD, EuroSAT]
{grid}  seed: [1, 2]
arms:
"""
DATASETS = ("DTD", "EuroSAT")


def _runs(name: str, grid: str, arms: str, metrics, drop=lambda cell: False):
    """The sweep's cells as finished runs: metrics(cell) -> metrics; `drop` leaves cells unrun."""
    spec = parse_spec(HEAD.format(name=name, grid=grid) + textwrap.indent(
        textwrap.dedent(arms), "  "), source=f"{name}.yaml")
    grid_cells = [c for c in cells(spec) if not drop(c)]
    runs = memory_runs([(name, c.config, metrics(c)) for c in grid_cells])
    context = {"sweep_arms": ",".join(spec.arm_names),
               "sweep_arm_spec": json.dumps(arm_signature(spec))}
    for run, c in zip(runs, grid_cells):
        run.data.tags.update(arm_tags({"cell": {"name": c.name, "arm": c.arm}}, context))
    return runs


def _tables(runs):
    df = agg_mod.cast_params(agg_mod.runs_frame(runs, {"7": "perl/x"}))
    pool, df = agg_mod.resolve(df)
    views = agg_mod.sweep_views(df)
    return agg_mod.build_tables(pool, views), views


# --- Table 4: both readings, each row's own count -----------------------------------------------

# (arm, variant) -> the count a run of that cell logs (invented, distinct per row)
COUNTS = {("shared_plus_specific", "shared"): 6402, ("shared_plus_specific", "step"): 32010,
          ("shared_plus_specific", "layer"): 25608, ("specific_only", "step"): 25608,
          ("specific_only", "layer"): 19206}
OFFSET = {"shared": 0.0, "step": 2.0, "layer": 4.0}


def _loop_metrics(c):
    arm = "specific_only" if c.config.variant_projectors == "specific_only" else \
        "shared_plus_specific"
    di = DATASETS.index(c.config.dataset)
    extra = 1.0 if arm == "specific_only" else 0.0
    b = 60.0 + OFFSET[c.config.variant] + di + c.config.seed + extra
    return {"base/acc": b, "novel/acc": b - 10.0,
            "num_trainable_parameters": float(COUNTS[(arm, c.config.variant)])}


def test_table4_shows_both_readings_with_each_rows_trainable_count():
    runs = _runs("ablation_loop", "  variant: [shared, step, layer]\n", """\
        - {name: shared_plus_specific, fixed: {variant_projectors: shared_plus_specific}}
        - name: specific_only
          fixed: {variant_projectors: specific_only}
          grid: {variant: [step, layer]}
        """, _loop_metrics)
    tables, (view,) = _tables(runs)
    assert view.arms == ("shared_plus_specific", "specific_only")
    t = _named(tables, "table4_loop__ablation_loop")
    assert t.index == ("arm", "variant")
    assert t.info_columns == (PARAMS_OURS, PARAMS_PAPER)
    # the main arm lists the paper's six variants (never run: missing); the other arm its own
    sps, so = "shared_plus_specific", "specific_only"
    assert [r.label for r in t.rows] == [(sps, v) for v in ("early", "deep", "shared", "step",
                                                            "layer", "layerstep")] + \
        [(so, "step"), (so, "layer")]
    paper = {"early": "6K", "deep": "6K", "shared": "6K", "step": "32K", "layer": "26K",
             "layerstep": "83K"}
    for r in t.rows:
        arm, v = r.label
        assert r.info[PARAMS_PAPER] == paper[v], r.label
        assert r.info[PARAMS_OURS] == (f"{COUNTS[(arm, v)]:,}" if (arm, v) in COUNTS
                                               else "—"), r.label
    # by hand: step, specific_only base = 60 + 2 + mean(0, 1) + mean(1, 2) + 1 = 65.0
    step_so = _lrow(t, so, "step").cells["base"]
    assert step_so.mean == pytest.approx(65.0) and step_so.n == 2
    assert _lrow(t, sps, "step").cells["base"].mean == pytest.approx(64.0)
    # both readings sit beside the paper's PERL-Step (2 of 11 datasets: shown, not differenced)
    for arm in (sps, so):
        c = _lrow(t, arm, "step").cells["base"]
        assert c.paper == pytest.approx(74.30) and c.diff is None and c.no_diff_reason
    assert _lrow(t, sps, "layerstep").cells["hm"].status == "missing"
    md = to_markdown(t)
    assert "| specific_only | step | 25,608 | 32K |" in md and "32,010 | 32K" in md
    d = _named(tables, "detail_table4_loop__ablation_loop")
    assert d.index == ("arm", "variant", "dataset")
    assert _lrow(d, so, "layer", "EuroSAT").cells["base"].mean == pytest.approx(60 + 4 + 1 + 1.5
                                                                               + 1)
    # 5 run cells x 2 datasets + 3 never-run variants x 2 datasets, 2 seeds each
    assert (t.counts.expected, t.counts.found) == (32, 20)


def test_runs_from_before_the_sweep_had_arms_join_the_arm_they_fit():
    # Re-submitting the upgraded sweep re-runs only the cells whose hash changed (step under the
    # new default reading); shared and step/specific_only finished before, with no arm tag and
    # no variant_projectors param (read as its legacy value, specific_only)
    arms = """\
        - {name: shared_plus_specific, fixed: {variant_projectors: shared_plus_specific}}
        - {name: specific_only, fixed: {variant_projectors: specific_only}, grid: {variant: [step]}}
        """
    runs = _runs("ablation_loop", "  variant: [shared, step]\n", arms, _loop_metrics)
    old = [r for r in runs if r.data.params["variant"] == "shared" or
           r.data.tags["arm"] == "specific_only"]
    assert {r.data.params["variant"] for r in old} == {"shared", "step"}
    for r in old:
        for k in ("arm", "sweep_arms", "sweep_arm_spec"):
            r.data.tags.pop(k)
        r.data.params.pop("variant_projectors")
    (t,) = [t for t in _tables(runs)[0] if t.name.startswith("table4")]
    for arm, v in (("shared_plus_specific", "shared"), ("shared_plus_specific", "step"),
                   ("specific_only", "step")):
        assert _lrow(t, arm, v).cells["base"].status == "ok", (arm, v)
    # the old step run (specific_only) is not taken for the new reading's row, nor vice versa
    offset = OFFSET["step"] + 0.5 + 1.5  # datasets and seeds averaged
    assert _lrow(t, "shared_plus_specific", "step").cells["base"].mean == pytest.approx(60 + offset)
    assert _lrow(t, "specific_only", "step").cells["base"].mean == pytest.approx(61 + offset)
    assert [r.label for r in t.rows if r.label[0] == "specific_only"] == [("specific_only", "step")]


def test_counts_that_disagree_within_a_row_are_all_shown():
    def metrics(c):
        m = _loop_metrics(c)
        if c.config.dataset == "EuroSAT" and c.config.variant == "shared":
            m["num_trainable_parameters"] = 999.0
        return m

    runs = _runs("ablation_loop", "  variant: [shared, step]\n", "- {name: main}\n", metrics)
    (t,) = [t for t in _tables(runs)[0] if t.name.startswith("table4")]
    assert _lrow(t, "main", "shared").info[PARAMS_OURS] == "6,402 / 999"


# --- Fig. 3a: the paper beside the caption's reading only ---------------------------------------


def _layer_metrics(c):
    di = DATASETS.index(c.config.dataset)
    moved = 3.0 if c.config.text_inject_layer < 0 else 0.0
    b = 70.0 + c.config.inject_layer + di + c.config.seed - moved
    return {"base/acc": b, "novel/acc": b - 5.0}


def test_fig3a_vision_arm_is_compared_with_the_paper_and_both_towers_is_not(tmp_path):
    runs = _runs("ablation_layer", "  inject_layer: [7, 9]\n", """\
        - {name: vision_J, fixed: {text_inject_layer: 7}}
        - {name: both_towers, fixed: {text_inject_layer: -1}}
        """, _layer_metrics)
    tables, _ = _tables(runs)
    t = _named(tables, "fig3a_inject_layer__ablation_layer")
    assert t.index == ("arm", "inject_layer") and t.plot == "curve"
    assert [r.label for r in t.rows] == [("vision_J", str(j)) for j in range(6, 12)] + \
        [("both_towers", "7"), ("both_towers", "9")]
    v9, b9 = _lrow(t, "vision_J", "9").cells, _lrow(t, "both_towers", "9").cells
    # by hand: vision J=9 base = 70 + 9 + 0.5 + 1.5 = 81; both towers 3 lower
    assert v9["base"].mean == pytest.approx(81.0) and b9["base"].mean == pytest.approx(78.0)
    assert v9["base"].paper == pytest.approx(75.4) and v9["base"].paper_approx
    assert b9["base"].paper is None and b9["hm"].paper is None  # the text J moved: no counterpart
    # J=7 with the text at 7 is the paper's model in either arm
    assert _lrow(t, "both_towers", "7").cells["hm"].paper == pytest.approx(74.79)
    assert _lrow(t, "vision_J", "6").cells["base"].status == "missing"
    assert _lrow(t, "vision_J", "6").cells["base"].paper == pytest.approx(75.6)
    assert any("visual encoder" in n for n in t.notes)
    from pipeline import plots

    figs = plots.draw_all([t], tmp_path)
    assert figs[t.name][0].exists()


def test_fig3a_old_runs_without_arms_where_both_towers_moved_keep_only_the_j7_paper_value():
    # runs from before arms: no arm tags, and the text J followed the vision J (-1)
    runs = _runs("ablation_layer", "  inject_layer: [7, 9]\n", "- {name: x}\n", _layer_metrics)
    for r in runs:
        r.data.tags.pop("arm"), r.data.tags.pop("sweep_arms")
    tables, (view,) = _tables(runs)
    assert view.arms == ()
    t = _named(tables, "fig3a_inject_layer__ablation_layer")
    assert t.index == ("inject_layer",)
    assert _lrow(t, "9").cells["base"].paper is None
    assert _lrow(t, "7").cells["base"].paper == pytest.approx(73.97)


# --- the sensitivity table ----------------------------------------------------------------------

SENS_ARMS = """\
- name: default
- {name: template_coop, fixed: {template: coop}}
- {name: text_front, fixed: {text_placement: front}}
- {name: aug_scale_0.5, fixed: {aug_scale_min: 0.5}}
"""


def _sens_metrics(c):
    cfg, di = c.config, DATASETS.index(c.config.dataset)
    b, n = 60.0 + di + cfg.seed, 50.0 + 2 * di + cfg.seed
    if cfg.template == "coop":
        b, n = b + 2.0, n - 1.0
    if cfg.text_placement == "front":
        b += cfg.seed  # differs per seed: the Δ has a spread
    return {"base/acc": b, "novel/acc": n}


def _avg_hm(fn):
    """HM (PERL conv.) by hand: mean over datasets of the mean over seeds of HM(b, n)."""
    return statistics.mean(statistics.mean(HM(*fn(d, s)) for s in (1, 2)) for d in DATASETS)


def test_sensitivity_each_arm_against_default_by_hand(tmp_path):
    runs = _runs("sensitivity", "", SENS_ARMS, _sens_metrics,
                 drop=lambda c: c.arm == "aug_scale_0.5" and c.config.dataset == "EuroSAT")
    tables, (view,) = _tables(runs)
    t = _named(tables, "sensitivity__sensitivity")
    assert t.index == ("arm",) and [r.label for r in t.rows] == [
        ("default",), ("template_coop",), ("text_front",), ("aug_scale_0.5",)]
    assert [r.info["changes"] for r in t.rows] == [
        "(reference)", "template=coop", "text_placement=front", "aug_scale_min=0.5"]
    d, coop, front = (_lrow(t, a).cells for a in ("default", "template_coop", "text_front"))
    # default base = 60 + mean(0, 1) + mean(1, 2) = 62.0; novel = 50 + mean(0, 2) + 1.5 = 52.5
    assert d["base"].mean == pytest.approx(62.0) and d["novel"].mean == pytest.approx(52.5)
    assert d["delta_base"].mean == pytest.approx(0.0)
    # template coop: +2 base and -1 novel on every (dataset, seed): Δ exactly, no spread
    assert coop["delta_base"].mean == pytest.approx(2.0) and coop["delta_base"].std == \
        pytest.approx(0.0)
    assert coop["delta_novel"].mean == pytest.approx(-1.0) and coop["delta_novel"].n == 2
    # text front: + seed on base -> per-seed Δ 1 and 2: mean 1.5, std of (1, 2)
    assert front["delta_base"].mean == pytest.approx(1.5)
    assert front["delta_base"].std == pytest.approx(statistics.stdev([1.0, 2.0]))
    assert front["delta_novel"].mean == pytest.approx(0.0)

    def bn(arm):
        def f(ds, seed):
            b, n = 60.0 + DATASETS.index(ds) + seed, 50.0 + 2 * DATASETS.index(ds) + seed
            if arm == "coop":
                b, n = b + 2.0, n - 1.0
            return b, n
        return f

    hm_default, hm_coop = _avg_hm(bn("default")), _avg_hm(bn("coop"))
    assert d["hm"].mean == pytest.approx(hm_default)
    assert coop["delta_hm"].mean == pytest.approx(hm_coop - hm_default)
    # the crop arm only ran DTD: its Δ would compare different datasets, so it is not computed
    aug = _lrow(t, "aug_scale_0.5").cells
    assert aug["base"].mean == pytest.approx(61.5) and aug["delta_base"].mean is None
    assert "not compared" in aug["delta_base"].note
    # the paper's Table 1 PERL average beside every arm, not differenced (2 of 11 datasets)
    assert all(_lrow(t, a).cells["hm"].paper == pytest.approx(
        ref.paper_value("T1", "PERL", "average", "hm")) for a in view.arms)
    assert coop["hm"].diff is None
    csv_text = to_csv(t)
    assert "delta_base" in csv_text.splitlines()[0]
    assert "Δ Base vs default" in to_markdown(t)
    assert (t.counts.expected, t.counts.found) == (16, 14)  # aug_scale_0.5 on EuroSAT: missing
    det = _named(tables, "detail_sensitivity__sensitivity")
    assert _lrow(det, "template_coop", "EuroSAT").cells["base"].mean == pytest.approx(64.5)
    from pipeline import plots

    assert plots.draw_all([t], tmp_path)[t.name][0].exists()
