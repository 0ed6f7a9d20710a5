"""The aggregate's per-step dynamics after issue 14: the pooled (sample-weighted) convention of
Fig. 7 against hand computations, the Jacobian / alignment tables, the Fig. 5 drift table, the
alignment ablation's image-text columns, and their plots.

SYNTHETIC FIXTURE (tests/fake_runs.py and the specs below): metric values are invented, except in
`test_pooled_transfer_reproduces_fig7_from_the_paper_tables`, which feeds the paper's own printed
per-dataset accuracies (pipeline.reference, labelled) to check the convention, not a result.
"""

from __future__ import annotations

import statistics

import pytest

from perl_core.config import TrainConfig

pytest.importorskip("mlflow")

from fake_runs import B2N, N_TEST, b2n_metrics, memory_runs, step_curves  # noqa: E402
from fake_runs import lrow as _lrow, named as _named  # noqa: E402

from pipeline import aggregate as agg_mod  # noqa: E402
from pipeline import reference as ref  # noqa: E402

# CoOp-split test-set sizes (notes/data_protocol.md), for the Fig. 7 check
TEST_SIZES = {"ImageNet": 50000, "Caltech101": 2465, "OxfordPets": 3669, "StanfordCars": 8041,
              "Flowers102": 2463, "Food101": 30300, "FGVCAircraft": 3333, "SUN397": 19850,
              "DTD": 1692, "EuroSAT": 8100, "UCF101": 3783, "ImageNetV2": 10000,
              "ImageNetSketch": 50889, "ImageNetA": 7500, "ImageNetR": 30000}


def _build(specs):
    df = agg_mod.cast_params(agg_mod.runs_frame(memory_runs(specs), {"7": "perl/x"}))
    pool, df = agg_mod.resolve(df)
    return agg_mod.build_tables(pool, agg_mod.sweep_views(df))


def _b2n_specs(K=2):
    base = TrainConfig(protocol="base2novel", num_steps=K)
    return [("base2novel", base.replace(dataset=d, seed=s), b2n_metrics(b, n, K, n_test=N_TEST[d]))
            for d, seeds in B2N.items() for s, (b, n) in seeds.items()]


def test_b2n_pooled_columns_weight_datasets_by_test_count():
    tables = _build(_b2n_specs())
    t = _named(tables, "dynamics_acc__base2novel")
    assert [c.key for c in t.columns] == ["base", "base_pooled", "novel", "novel_pooled"]
    for step in range(3):
        r = _lrow(t, str(step))
        for i, ev in enumerate(("base", "novel")):
            per_seed = []
            for s in (1, 2):  # by hand: sum n * acc / sum n over the datasets, per seed
                nb = {d: N_TEST[d][i] for d in B2N}
                acc = {d: B2N[d][s][i] - (2 - step) for d in B2N}
                per_seed.append(sum(nb[d] * acc[d] for d in B2N) / sum(nb.values()))
            c = r.cells[f"{ev}_pooled"]
            assert c.mean == pytest.approx(statistics.fmean(per_seed)), (ev, step)
            assert c.std == pytest.approx(statistics.stdev(per_seed)) and c.n == 2
            mean = statistics.fmean(statistics.fmean(B2N[d][s][i] for s in (1, 2)) - (2 - step)
                                    for d in B2N)
            assert r.cells[ev].mean == pytest.approx(mean)
            assert r.cells[ev].mean != pytest.approx(c.mean)  # unequal n: the two differ
    # Fig. 7 sits beside the pooled columns only (2 of 11 datasets: shown, Δ not computed)
    r4 = _lrow(t, "2")
    assert r4.cells["base"].paper is None and r4.cells["base_pooled"].paper is None  # K=2 < 4
    r0 = _lrow(t, "0").cells["base_pooled"]
    assert r0.paper == pytest.approx(73.8) and r0.diff is None and r0.no_diff_reason


def test_pooled_column_needs_the_test_counts():
    specs = _b2n_specs()
    for _sweep, cfg, m in specs:
        if cfg.dataset == "DTD":
            del m["base/n"]
    r = _lrow(_named(_build(specs), "dynamics_acc__base2novel"), "2")
    # DTD has no base/n: pooled over Caltech101 alone, and it says so
    assert r.cells["base_pooled"].mean == pytest.approx(statistics.fmean((90.0, 92.0)))
    assert r.cells["base_pooled"].note == "pooled over 1 of 2 datasets"


def _transfer_specs(protocol, source, targets, accs, K=4, seeds=(1, 2)):
    """Runs whose step-K accuracy per evalset is accs[dataset] (+ seed offset), with the CoOp
    test counts; step k is (K - k) below."""
    cfg = TrainConfig(protocol=protocol, dataset=source, eval_datasets=tuple(targets),
                      num_steps=K)
    specs = []
    for s in seeds:
        m = {"all/n": float(TEST_SIZES[source])}
        m.update(step_curves("all", accs[source] + (s - 1), K))
        for d in targets:
            m[f"{d}/n"] = float(TEST_SIZES[d])
            m.update(step_curves(d, accs[d] + (s - 1), K))
        m["target_avg"] = statistics.fmean(accs[d] + (s - 1) for d in targets)
        specs.append((protocol, cfg.replace(seed=s), m))
    return specs


@pytest.mark.parametrize("protocol,table,targets,pooled,mean,fig7", [
    ("cross_dataset", "T2", ref.XD_TARGETS, 70.98, 65.56, 71.0),
    ("domain_generalization", "T8", ref.DG_TARGETS, 62.81, 59.95, 62.3)])
def test_pooled_transfer_reproduces_fig7_from_the_paper_tables(protocol, table, targets, pooled,
                                                               mean, fig7):
    """PERL.md §8: the paper's per-dataset accuracies, weighted by test-set size with the source
    included, give Fig. 7's XD / OOD values; the unweighted target means do not."""
    accs = {d: ref.paper_entry(table, "PERL", d, "acc").value for d in ("ImageNet", *targets)}
    tables = _build(_transfer_specs(protocol, "ImageNet", targets, accs, seeds=(1,)))
    t = _named(tables, f"dynamics_acc__{protocol}")
    assert [c.key for c in t.columns] == ["all", "targets", "pooled"]
    r = _lrow(t, "4")
    assert r.cells["pooled"].mean == pytest.approx(pooled, abs=0.005)
    assert r.cells["targets"].mean == pytest.approx(mean, abs=0.005)
    assert r.cells["pooled"].paper == pytest.approx(fig7)
    assert r.cells["pooled"].diff == pytest.approx(pooled - fig7, abs=0.005)
    assert r.cells["targets"].paper is None and r.cells["all"].paper is None
    # the fixture's Jacobian is 20 - k everywhere: pooled = 20 - k, compared with Fig. 7's
    j = _named(tables, f"dynamics_jacobian__{protocol}")
    assert _lrow(j, "0").cells["pooled"].mean == pytest.approx(20.0)
    assert _lrow(j, "4").cells["pooled"].paper is not None
    # a missing target: not compared
    part = _build(_transfer_specs(protocol, "ImageNet", targets[:-1], accs, seeds=(1,)))
    c = _lrow(_named(part, f"dynamics_acc__{protocol}"), "4").cells["pooled"]
    assert c.paper == pytest.approx(fig7) and c.diff is None and "not compared" in \
        c.no_diff_reason


def test_alignment_and_jacobian_tables_per_step_for_transfer():
    accs = {"ImageNet": 70.0, "Caltech101": 90.0, "DTD": 50.0}
    specs = _transfer_specs("cross_dataset", "ImageNet", ["Caltech101", "DTD"], accs)
    specs[0][2]["DTD/cos_true_step1"] = 0.5  # seed 1's DTD differs: the target mean shows it
    tables = _build(specs)
    names = {t.name for t in tables if t.section == "dynamics"}
    assert {f"dynamics_{m}__cross_dataset" for m in
            ("jacobian", "cos_true", "cos_wrong", "margin", "gap")} <= names
    c = _lrow(_named(tables, "dynamics_cos_true__cross_dataset"), "1").cells
    assert c["all"].mean == pytest.approx(0.31)
    assert c["targets"].mean == pytest.approx(statistics.fmean([(0.31 + 0.5) / 2, 0.31]))
    n = {d: TEST_SIZES[d] for d in accs}
    seed1 = (n["ImageNet"] * 0.31 + n["Caltech101"] * 0.31 + n["DTD"] * 0.5) / sum(n.values())
    assert c["pooled"].mean == pytest.approx(statistics.fmean([seed1, 0.31]))
    assert _lrow(_named(tables, "dynamics_gap__cross_dataset"), "4").cells["all"].mean == \
        pytest.approx(0.8 - 0.08)
    drift = _named(tables, "dynamics_drift__cross_dataset")
    assert [c.key for c in drift.columns] == [f"{ev}_{s}" for ev in ("all", "targets")
                                              for s in ("q25", "q50", "q75", "n")]
    assert _lrow(drift, "wrong_to_correct", "3").cells["targets_q50"].mean == pytest.approx(0.3)


def test_drift_table_quartiles_per_group_and_step():
    specs = _b2n_specs()
    specs[0][2]["base/kl_wrong_to_correct_q50_step2"] = 1.0  # Caltech101 seed 1
    t = _named(_build(specs), "dynamics_drift__base2novel")
    assert t.index == ("group", "step") and t.plot == "drift"
    assert [c.key for c in t.columns] == [f"{ev}_{s}" for ev in ("base", "novel")
                                          for s in ("q25", "q50", "q75", "n")]
    assert [r.label for r in t.rows][:2] == [("stay_correct", "1"), ("stay_correct", "2")]
    assert len(t.rows) == 4 * 2  # 4 groups x steps 1..2 (step 0 has no drift)
    r = _lrow(t, "wrong_to_correct", "2").cells
    # mean over datasets of the per-dataset seed means: Caltech101 (1.0 + 0.2) / 2, DTD 0.2
    assert r["base_q50"].mean == pytest.approx(((1.0 + 0.2) / 2 + 0.2) / 2)
    assert r["base_q25"].mean == pytest.approx(0.1) and r["base_q75"].mean == pytest.approx(0.4)
    assert r["base_n"].mean == pytest.approx(10.0)
    assert _lrow(t, "stay_correct", "1").cells["novel_q50"].mean == pytest.approx(0.01)


def test_no_drift_table_without_the_groups():
    specs = _b2n_specs()
    for _sweep, _cfg, m in specs:
        for k in [k for k in m if "/n_" in k or "_q" in k]:
            del m[k]
    assert "dynamics_drift__base2novel" not in {t.name for t in _build(specs)}


def test_alignment_ablation_shows_final_step_alignment():
    specs = []
    for lam in (0.0, 1.0):
        for d in ("DTD", "Caltech101"):
            m = b2n_metrics(70.0, 60.0, K=4)
            m["base/cos_true_step4"] = 0.4 + lam / 10
            m["base/cos_true_step3"] = 0.0  # not the final step: never shown
            specs.append(("alignment", TrainConfig(dataset=d, anchor_weight=lam, num_steps=4), m))
    t = _named(_build(specs), "alignment_anchor_weight__alignment")
    keys = [c.key for c in t.columns]
    assert keys[4:] == ["base_anchor_cos", "novel_anchor_cos", "base_cos_true", "base_margin",
                        "base_gap", "novel_cos_true", "novel_margin", "novel_gap"]
    assert _lrow(t, "0").cells["base_cos_true"].mean == pytest.approx(0.4)
    assert _lrow(t, "1").cells["base_cos_true"].mean == pytest.approx(0.5)
    assert _lrow(t, "1").cells["novel_margin"].mean == pytest.approx(0.05 + 0.04)
    assert _lrow(t, "1").cells["base_gap"].mean == pytest.approx(0.8 - 0.08)


def test_fixture_report_shows_jacobian_drift_alignment_and_pooled(tmp_path):
    """End to end on the fixture's MLflow store (tests/fake_runs.Store): the report and the
    figures carry the new tables."""
    from PIL import Image

    from fake_runs import Store

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = Store(uri, tmp_path)
    s.b2n_sweep(s.experiment("perl/base2novel"), TrainConfig(protocol="base2novel", num_steps=2),
                {})
    out = tmp_path / "out"
    assert agg_mod.main(["--tracking-uri", uri, "--out", str(out), "--quiet", "--no-log"]) == 0
    html = (out / "report.html").read_text()
    for name in ("dynamics_jacobian__base2novel", "dynamics_cos_true__base2novel",
                 "dynamics_margin__base2novel", "dynamics_gap__base2novel",
                 "dynamics_drift__base2novel"):
        assert f'id="{name}"' in html, name
    assert "B2N base (pooled)" in html and "input Jacobian norm" in html
    assert "dynamics_drift__base2novel.png" in html
    with Image.open(out / "dynamics__base2novel.png") as im:
        w, h = im.size
    assert h > w / 2  # 9 metric panels wrap into rows of 4 (one row would be ~10x wider)
