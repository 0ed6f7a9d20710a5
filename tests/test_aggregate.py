"""pipeline.aggregate on a real MLflow SQLite store filled with hand-made runs.

SYNTHETIC FIXTURE (tests/fake_runs.py): every metric value is invented (round numbers chosen so
that means, stds and HMs are easy to compute by hand). None of them is a result of PERL or of
this project; real dataset names are used only to check that the paper's reference columns
appear beside them.
"""

from __future__ import annotations

import csv
import io
import math
import statistics

import pytest

from perl_core.config import TrainConfig

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from pipeline import aggregate as agg_mod  # noqa: E402
from pipeline import reference as ref  # noqa: E402
from pipeline.aggregate.ablation import ABLATION_TITLES  # noqa: E402
from pipeline.aggregate.dynamics import STEP_METRICS  # noqa: E402
from pipeline.aggregate.loop import PARAMS_OURS, PARAMS_PAPER, VARIANT_METHOD  # noqa: E402
from pipeline.aggregate.read import AGGREGATE_EXPERIMENT  # noqa: E402
from pipeline.aggregate.runs import NO_PARAMS  # noqa: E402
from pipeline.layout import redact_uri  # noqa: E402
from pipeline.aggregate.views import fmt_value  # noqa: E402
from pipeline.tables import to_markdown  # noqa: E402

from fake_runs import B2N, HM, STEPS, TOY, Store, memory_runs  # noqa: E402
from fake_runs import b2n_metrics as _b2n_metrics  # noqa: E402
from fake_runs import lrow as _lrow, named as _named  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    s = Store(uri, tmp)
    base = TrainConfig(protocol="base2novel", num_steps=2)
    ids: dict[str, object] = {"uri": uri, "tmp": tmp}

    e1 = s.experiment("perl/base2novel")
    parent = s.run(e1, "base2novel", None, {})  # the submission's parent run: no config_hash
    # a stale duplicate of Caltech101 seed 1, superseded by the later FINISHED run of that hash
    ids["stale"] = s.run(e1, "base2novel", base.replace(dataset="Caltech101", seed=1),
                         _b2n_metrics(10.0, 10.0, K=2), parent=parent)
    ids["b2n"] = {}
    s.b2n_sweep(e1, base, ids["b2n"], parent=parent)
    e2 = s.experiment("perl/ablation_steps")
    parent2 = s.steps_sweep(e2, ids, "NaN loss at step 7")
    # an HPO-phase run of a tabled cell: never part of the tables
    s.run(e2, "ablation_steps", TOY.replace(num_steps=1, seed=1, lr=3e-3),
          _b2n_metrics(99.0, 99.0), phase="hpo", parent=parent2)
    # an unrelated experiment without sweep-tagged runs: not read by default
    other = s.client.create_experiment("scratch", artifact_location=(tmp / "a2").as_uri())
    r = s.client.create_run(other)
    s.client.set_terminated(r.info.run_id)
    return ids


@pytest.fixture(scope="module")
def result(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    rc = agg_mod.main(["--tracking-uri", store["uri"], "--out", str(out), "--quiet"])
    assert rc == 0
    agg = agg_mod.aggregate(store["uri"])
    return {"out": out, "agg": agg, **store}


def _table(agg, prefix: str):
    (t,) = [t for t in agg.tables if t.name.startswith(prefix)]
    return t


def _row(t, label):
    (r,) = [r for r in t.rows if r.label[0] == label]
    return r


def test_reads_only_sweep_experiments(result):
    assert sorted(result["agg"].experiments.values()) == ["perl/ablation_steps",
                                                          "perl/base2novel"]


def test_cast_params_types(result):
    df = result["agg"].runs
    assert str(df["params.seed"].dtype) == "Int64"
    assert str(df["params.anchor_weight"].dtype) == "Float64"
    assert df["params.eval_datasets"].dropna().unique().tolist() == ["[]"]


def test_cast_params_reports_bad_values():
    import pandas as pd

    warnings: list[str] = []
    df = pd.DataFrame({"params.seed": pd.Series(["1", "x", "2.5"], dtype="str"),
                       "params.inject_layers": pd.Series(["[3, 7, 11]", "(7, 9)", "7,9"],
                                                         dtype="str")})
    out = agg_mod.cast_params(df, warnings)
    assert out["params.seed"].tolist()[0] == 1 and out["params.seed"].isna().tolist()[1:] == \
        [True, True]
    assert out["params.inject_layers"].tolist() == ["[3, 7, 11]", "[7, 9]", "[7, 9]"]
    assert any("seed" in w for w in warnings)


def test_base2novel_means_stds_and_both_hm_conventions(result):
    t = _table(result["agg"], "table1_5_base2novel__base2novel")
    for d, seeds in B2N.items():
        r = _row(t, d)
        bs, ns = [v[0] for v in seeds.values()], [v[1] for v in seeds.values()]
        hms = [HM(b, n) for b, n in zip(bs, ns)]
        assert r.cells["base"].mean == pytest.approx(statistics.mean(bs))
        assert r.cells["base"].std == pytest.approx(statistics.stdev(bs))
        assert r.cells["base"].n == 2
        assert r.cells["novel"].mean == pytest.approx(statistics.mean(ns))
        assert r.cells["hm"].mean == pytest.approx(statistics.mean(hms))  # PERL convention
        assert r.cells["hm_coop"].mean == pytest.approx(HM(statistics.mean(bs),
                                                           statistics.mean(ns)))  # CoOp
        assert len(r.cells["base"].run_ids) == 2
    # by hand: Caltech101 B = 91, N = 82; DTD B = 62, N = 53
    assert _row(t, "Caltech101").cells["base"].mean == pytest.approx(91.0)
    assert _row(t, "Caltech101").cells["hm_coop"].mean == pytest.approx(HM(91, 82))
    assert _row(t, "Caltech101").cells["hm"].mean == pytest.approx(
        (HM(90, 80) + HM(92, 84)) / 2)
    avg = [r for r in t.rows if r.kind == "average"][0]
    assert avg.cells["base"].mean == pytest.approx((91 + 62) / 2)
    assert avg.cells["novel"].mean == pytest.approx((82 + 53) / 2)
    assert avg.cells["hm"].mean == pytest.approx(
        ((HM(90, 80) + HM(92, 84)) / 2 + (HM(60, 50) + HM(64, 56)) / 2) / 2)
    assert avg.cells["hm_coop"].mean == pytest.approx(HM(76.5, 67.5))
    # ± of an average: std over seeds of the per-seed dataset average (75 and 78)
    assert avg.cells["base"].std == pytest.approx(statistics.stdev([75.0, 78.0]))


def test_duplicate_hash_keeps_latest_finished(result):
    agg = result["agg"]
    res = dict(zip(agg.runs["run_id"], agg.runs["resolution"]))
    newest = result["b2n"][("Caltech101", 1)]
    assert res[newest] == "used"
    assert res[result["stale"]] == f"superseded by {newest}"
    cal = _row(_table(agg, "table1_5_base2novel__base2novel"), "Caltech101")
    assert result["stale"] not in cal.cells["base"].run_ids


def test_paper_columns_for_real_datasets_only(result):
    agg = result["agg"]
    t = _table(agg, "table1_5_base2novel__base2novel")
    cal = _row(t, "Caltech101").cells["base"]
    assert cal.paper == pytest.approx(97.91)  # Table 5, PERL, Caltech101 base
    assert cal.diff == pytest.approx(91.0 - 97.91)
    # the paper's other datasets are rows too: not run -> missing, paper value beside it
    img = _row(t, "ImageNet").cells["hm"]
    assert img.status == "missing" and img.paper == pytest.approx(72.95) and img.diff is None
    # average over 2 of 11 datasets: paper shown, difference not computed
    avg = [r for r in t.rows if r.kind == "average"][0].cells["hm"]
    assert avg.paper == pytest.approx(74.79) and avg.diff is None and avg.no_diff_reason
    md = to_markdown(t)
    assert "HM (PERL conv.) (paper)" in md and "n/c" in md
    # the toy ablation has no paper column at all
    steps = _table(agg, "fig3b_num_steps__ablation_steps")
    assert not steps.any_paper
    assert "(paper)" not in to_markdown(steps)


def test_ablation_failed_and_missing_cells(result):
    t = _table(result["agg"], "fig3b_num_steps__ablation_steps")
    assert [r.label for r in t.rows] == [("1",), ("2",), ("3",)]
    k1 = _row(t, "1").cells
    assert k1["base"].mean == pytest.approx(51.0)  # the hpo-phase run (99) is excluded
    assert k1["base"].n == 2
    assert k1["hm"].mean == pytest.approx((HM(50, 40) + HM(52, 44)) / 2)
    k3 = _row(t, "3").cells["base"]
    assert k3.status == "failed" and k3.n_failed == 1 and k3.mean is None
    assert result["failed"] in k3.failed_run_ids
    assert "NaN loss at step 7" in k3.failure_reasons
    md = to_markdown(t)
    assert "FAILED (1)" in md
    # 3 values of num_steps x 2 seeds: 4 found, 1 failed, 1 (K=3 seed 2) missing
    c = t.counts
    assert (c.expected, c.found, c.failed, c.missing) == (6, 4, 1, 1)
    b2n = _table(result["agg"], "table1_5_base2novel__base2novel").counts
    assert (b2n.expected, b2n.found, b2n.failed, b2n.missing) == (22, 4, 0, 18)
    assert "—" in to_markdown(_table(result["agg"], "table1_5_base2novel__base2novel"))


def test_dynamics_per_step(result):
    t = _table(result["agg"], "dynamics_acc__base2novel")
    assert [r.label[0] for r in t.rows] == ["0", "1", "2"]
    # step k = final acc - (K - k); averaged over the 2 datasets' seed means
    assert _row(t, "0").cells["base"].mean == pytest.approx((91 + 62) / 2 - 2)
    assert _row(t, "2").cells["novel"].mean == pytest.approx((82 + 53) / 2)
    kl = _table(result["agg"], "dynamics_kl__base2novel")
    assert _row(kl, "2").cells["base"].mean == pytest.approx(0.2)
    # the ablation_steps sweep of this store logs step 0 only: zero-shot alone has no dynamics
    assert not [t.name for t in result["agg"].tables if t.name.startswith("dynamics_")
                and t.name.endswith("__ablation_steps")]


def test_files_written(result):
    out = result["out"]
    names = {p.name for p in out.iterdir()}
    for stem in ("table1_5_base2novel__base2novel", "fig3b_num_steps__ablation_steps"):
        assert {f"{stem}.md", f"{stem}.csv", f"{stem}.tex", f"{stem}.png"} <= names
    assert {"report.html", "summary.md", "runs.csv", "dynamics__base2novel.png"} <= names
    rows = list(csv.DictReader(io.StringIO(
        (out / "fig3b_num_steps__ablation_steps.csv").read_text())))
    k3 = [r for r in rows if r["num_steps"] == "3"][0]
    assert k3["base"] == "FAILED" and k3["base_status"] == "failed"
    k1 = [r for r in rows if r["num_steps"] == "1"][0]
    assert float(k1["base"]) == pytest.approx(51.0) and k1["base_n"] == "2"
    assert len(k1["base_run_ids"].split(";")) == 2
    tex = (out / "table1_5_base2novel__base2novel.tex").read_text()
    assert r"\begin{tabular}" in tex and r"$\pm$" in tex
    assert (out / "fig3b_num_steps__ablation_steps.png").read_bytes()[:4] == b"\x89PNG"


def test_report_is_self_contained(result):
    html = (result["out"] / "report.html").read_text()
    assert "data:image/png;base64," in html
    assert "<script" not in html and "http://" not in html and "https://" not in html
    assert "FAILED (1)" in html and "—" in html
    assert result["b2n"][("DTD", 2)][:8] in html  # provenance: run ids beside the numbers
    assert 'class="bad"' in html  # ours below the paper on Caltech101 base: coloured red


def test_report_links_runs_to_ui(result, tmp_path):
    from pipeline import report

    agg = result["agg"]
    html = report.render(agg, result["out"], ui_url="http://mlflow.example:5000/")
    rid = result["b2n"][("DTD", 2)]
    exp = agg.run_experiment[rid]
    assert f"http://mlflow.example:5000/#/experiments/{exp}/runs/{rid}" in html
    assert report.ui_base("http://user:secret@host:5000", None) == "http://host:5000"


def test_artifacts_logged_to_aggregate_run(result):
    client = MlflowClient(tracking_uri=result["uri"])
    exp = client.get_experiment_by_name(AGGREGATE_EXPERIMENT)
    assert exp is not None
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["cells_failed"] == 1
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.html", "summary.md", "runs.csv",
            "table1_5_base2novel__base2novel.csv"} <= names
    # the aggregate run has no sweep tag: a second aggregate does not read it back
    assert "sweep" not in run.data.tags


def test_no_log_and_explicit_experiment(result, tmp_path, capsys):
    rc = agg_mod.main(["--tracking-uri", result["uri"], "--out", str(tmp_path / "o"),
                       "--experiment", "perl/ablation_steps", "--no-log"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fig3b_num_steps__ablation_steps: expected 6 run cells, found 4 FINISHED, 1 FAILED, " \
           "1 missing" in printed
    assert "table1_5" not in printed
    client = MlflowClient(tracking_uri=result["uri"])
    exp = client.get_experiment_by_name(AGGREGATE_EXPERIMENT)
    assert len(client.search_runs([exp.experiment_id])) == 1  # --no-log logged nothing


def test_unknown_experiment_and_missing_store(result, tmp_path):
    with pytest.raises(SystemExit, match="not found"):
        agg_mod.main(["--tracking-uri", result["uri"], "--experiment", "nope", "--no-log",
                      "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no MLflow store"):
        agg_mod.main(["--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}", "--no-log",
                      "--out", str(tmp_path)])


def test_run_without_params_is_set_aside(tmp_path):
    """A run cut off between its creation and its params (an MLflow outage) has a config_hash
    but no params: it is listed as such, never tabled, and does not stop the aggregate."""
    s = Store(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path)
    exp = s.experiment("perl/base2novel")
    ids: dict = {}
    parent = s.b2n_sweep(exp, TrainConfig(protocol="base2novel", num_steps=2), ids)
    cut = TrainConfig(protocol="base2novel", num_steps=2, dataset="DTD", seed=1)
    orphan = s.client.create_run(exp, tags={"sweep": "base2novel", "phase": "final",
                                            "config_hash": cut.config_hash(),
                                            "mlflow.parentRunId": parent}).info.run_id
    s.client.set_terminated(orphan, "FAILED")
    agg = agg_mod.aggregate(f"sqlite:///{tmp_path / 'mlflow.db'}")
    res = dict(zip(agg.runs["run_id"], agg.runs["resolution"]))
    assert res[orphan] == NO_PARAMS
    assert res[ids[("DTD", 1)]] == "used"
    dtd = _row(_table(agg, "table1_5_base2novel__base2novel"), "DTD")
    assert orphan not in dtd.cells["base"].run_ids and dtd.cells["base"].n == 2


def test_empty_store_writes_an_empty_report(tmp_path):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    MlflowClient(tracking_uri=uri).search_experiments()  # creates the schema
    rc = agg_mod.main(["--tracking-uri", uri, "--out", str(tmp_path / "o"), "--no-log"])
    assert rc == 0
    assert "No trial runs found" in (tmp_path / "o" / "report.html").read_text()


def test_redact_uri():
    assert redact_uri("http://u:p@h:5000/x") == "http://***@h:5000/x"
    assert redact_uri("sqlite:///a.db") == "sqlite:///a.db"
    assert not math.isnan(HM(1, 1))


# --- builders on in-memory runs (same code path after search_runs; no store needed) ----------


def _build(specs):
    df = agg_mod.cast_params(agg_mod.runs_frame(memory_runs(specs), {"7": "perl/x"}))
    pool, df = agg_mod.resolve(df)
    return agg_mod.build_tables(pool, agg_mod.sweep_views(df))


def test_cross_dataset_table_with_paper_reference():
    xd = TrainConfig(protocol="cross_dataset", dataset="ImageNet",
                     eval_datasets=("Caltech101", "DTD"))
    # synthetic values
    tables = _build([("cross_dataset", xd.replace(seed=s),
                      {"all/acc": src, "val/acc": 99.0, "Caltech101/acc": c, "DTD/acc": d,
                       "target_avg": (c + d) / 2})
                     for s, src, c, d in ((1, 70.0, 94.0, 45.0), (2, 72.0, 96.0, 47.0))])
    t = [t for t in tables if t.name.startswith("table2_cross_dataset")][0]
    src = _row(t, "source: ImageNet").cells["m0"]
    assert src.mean == pytest.approx(71.0) and src.paper == pytest.approx(70.25)
    assert src.diff == pytest.approx(0.75)
    assert _row(t, "Caltech101").cells["m0"].paper == pytest.approx(94.33)
    assert _row(t, "EuroSAT").cells["m0"].status == "missing"  # a paper target not evaluated
    avg = _row(t, "Target Avg").cells["m0"]
    assert avg.mean == pytest.approx((69.5 + 71.5) / 2)
    assert avg.paper == pytest.approx(65.56) and avg.diff is None  # 2 of 10 targets: n/c
    assert (t.counts.expected, t.counts.found) == (2, 2)
    # the few-shot validation split of the source is not a transfer target
    assert not [r for r in t.rows if "val" in r.label]


def test_modality_ablation_maps_to_table3_and_shows_unrun_rows():
    base = TrainConfig(dataset="DTD", seed=1)
    tables = _build([("ablation_modality", base.replace(modality=m),
                      {"base/acc": 60.0, "novel/acc": 50.0, "num_trainable_parameters": n})
                     for m, n in (("vision", 3841), ("both", 6402))])
    t = [t for t in tables if t.name.startswith("table3_modality")][0]
    assert [r.label[0] for r in t.rows] == ["vision", "text", "both"]
    vis = _row(t, "vision")
    assert vis.cells["hm"].paper == pytest.approx(71.72)  # Table 3 "Vision only"
    assert vis.info[PARAMS_OURS] == "3,841" and vis.info[PARAMS_PAPER] == "4K"
    assert _row(t, "text").cells["base"].status == "missing"
    assert _row(t, "both").cells["hm"].paper == pytest.approx(74.79)


def _csv_rows(t):
    from pipeline.tables import to_csv

    return list(csv.DictReader(io.StringIO(to_csv(t))))


# --- per-step dynamics of sweeps that vary a field ---------------------------------------------


def test_dynamics_of_an_ablation_sweep_per_varied_value(tmp_path):
    """ablation_steps logs acc/confidence/brier/kl at steps 0..K: one block of rows per K, each
    step the mean ± std over seeds of what the runs logged; the FAILED cell's steps are FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = Store(uri, tmp_path)
    ids: dict = {}
    s.steps_sweep(s.experiment("perl/ablation_steps"), ids, "boom", per_step=True)
    out = tmp_path / "out"
    assert agg_mod.main(["--tracking-uri", uri, "--out", str(out), "--no-log", "--quiet"]) == 0
    agg = agg_mod.aggregate(uri)
    acc = _named(agg.tables, "dynamics_acc__ablation_steps")
    assert acc.section == "dynamics" and acc.index == ("num_steps", "step")
    assert [r.label for r in acc.rows] == [("1", "0"), ("1", "1"), ("2", "0"), ("2", "1"),
                                           ("2", "2"), ("3", "0"), ("3", "1"), ("3", "2"),
                                           ("3", "3")]
    for K, seeds in STEPS.items():
        for k in range(K + 1):
            for col, i in (("base", 0), ("novel", 1)):
                vals = [v[i] - (K - k) for v in seeds.values()]  # what b2n_metrics logged
                c = _lrow(acc, str(K), str(k)).cells[col]
                assert c.mean == pytest.approx(statistics.mean(vals)), (K, k, col)
                assert c.std == pytest.approx(statistics.stdev(vals)) and c.n == 2
                assert len(c.run_ids) == 2
    # by hand: K=1 step 0 base = mean(50 - 1, 52 - 1) = 50; K=2 step 2 novel = mean(45, 47)
    assert _lrow(acc, "1", "0").cells["base"].mean == pytest.approx(50.0)
    assert _lrow(acc, "2", "2").cells["novel"].mean == pytest.approx(46.0)
    k3 = _lrow(acc, "3", "2").cells["base"]
    assert k3.status == "failed" and k3.n_failed == 1 and ids["failed"] in k3.failed_run_ids
    conf = _named(agg.tables, "dynamics_confidence__ablation_steps")
    assert _lrow(conf, "2", "2").cells["base"].mean == pytest.approx(52.0)  # 50 + 1 * k
    brier = _named(agg.tables, "dynamics_brier__ablation_steps")
    assert _lrow(brier, "2", "1").cells["novel"].mean == pytest.approx(0.49)
    kl = _named(agg.tables, "dynamics_kl__ablation_steps")
    assert _lrow(kl, "1", "1").cells["base"].mean == pytest.approx(0.1)
    assert not acc.any_paper  # the synthetic world has no Fig. 7 counterpart
    # the ablation table itself is unchanged by the dynamics
    assert [r.label for r in _named(agg.tables, "fig3b_num_steps__ablation_steps").rows] == \
        [("1",), ("2",), ("3",)]
    # files and report
    names = {p.name for p in out.iterdir()}
    assert {"dynamics_acc__ablation_steps.md", "dynamics_acc__ablation_steps.csv",
            "dynamics_acc__ablation_steps.tex", "dynamics__ablation_steps.png"} <= names
    rows = list(csv.DictReader(io.StringIO((out / "dynamics_acc__ablation_steps.csv")
                                           .read_text())))
    r = [r for r in rows if (r["num_steps"], r["step"]) == ("2", "0")][0]
    assert float(r["base"]) == pytest.approx(54.0) and r["base_n"] == "2"
    assert [r["base"] for r in rows if r["num_steps"] == "3"] == ["FAILED"] * 4
    md = (out / "dynamics_acc__ablation_steps.md").read_text()
    assert "| num_steps | step |" in md and "FAILED (1)" in md
    html = (out / "report.html").read_text()
    assert 'id="sec-dynamics"' in html and 'id="dynamics_acc__ablation_steps"' in html
    assert html.index('id="sec-dynamics"') < html.index('id="dynamics_acc__ablation_steps"')
    summary = (out / "summary.md").read_text()
    assert "Per-step dynamics — accuracy (%) at steps 0..3 per num_steps" in summary


def test_dynamics_of_the_smoke_sweep_average_datasets_per_K():
    """The embedded default's shape (sweeps/smoke.yaml): 3 toy datasets x num_steps [2, 4]; per K,
    each step is the mean over datasets of the per-dataset seed means, ± over seeds of the
    per-seed dataset average."""
    acc = {"ToyShapes": 80.0, "ToyPatterns": 60.0, "ToyCounts": 40.0}
    slope = {"ToyShapes": 1.0, "ToyPatterns": 2.0, "ToyCounts": 3.0}
    base = TOY.replace(inject_layer=7)
    specs = []
    for d, a in acc.items():
        for K in (2, 4):
            for seed in (1, 2):
                specs.append(("smoke", base.replace(dataset=d, num_steps=K, seed=seed),
                              _b2n_metrics(a + seed + K, a - 10 + seed, K,
                                           confidence_slope=slope[d])))
    tables = _build(specs)
    assert [t.name for t in tables if t.section == "dynamics"] == [
        f"dynamics_{m}__smoke" for m, *_ in STEP_METRICS] + ["dynamics_drift__smoke"]
    t = _named(tables, "dynamics_acc__smoke")
    assert [r.label for r in t.rows] == [("2", str(k)) for k in range(3)] + \
        [("4", str(k)) for k in range(5)]
    for K in (2, 4):
        for k in range(K + 1):
            per_seed = [statistics.mean(a + seed + K - (K - k) for a in acc.values())
                        for seed in (1, 2)]
            c = _lrow(t, str(K), str(k)).cells["base"]
            assert c.mean == pytest.approx(statistics.mean(per_seed))
            assert c.std == pytest.approx(statistics.stdev(per_seed)) and c.n == 2
            assert len(c.run_ids) == 6 and not c.note  # all three datasets
    # by hand: K=4 step 0 base = mean(80, 60, 40) + 1.5 = 61.5; novel step 4 = 50 - 10 + 1.5
    assert _lrow(t, "4", "0").cells["base"].mean == pytest.approx(61.5)
    assert _lrow(t, "4", "4").cells["novel"].mean == pytest.approx(51.5)
    conf = _named(tables, "dynamics_confidence__smoke")
    # confidence 50 + slope * k, slopes 1, 2, 3 -> the dataset average is 50 + 2k
    assert _lrow(conf, "4", "3").cells["novel"].mean == pytest.approx(56.0)
    assert _lrow(conf, "4", "3").cells["novel"].std == pytest.approx(0.0)
    assert (t.counts.expected, t.counts.found) == (12, 12)
    assert "| num_steps | step |" in to_markdown(t)


def test_dynamics_of_an_ablation_on_the_paper_suite_compare_only_the_default_row():
    """Fig. 7 plots default PERL (K=4): its per-step values sit beside K=4's rows only."""
    specs = [("ablation_steps", TrainConfig(dataset=d, num_steps=K, seed=1),
              _b2n_metrics(70.0, 60.0, K))
             for d in ref.B2N_DATASETS for K in (2, 4)]
    t = _named(_build(specs), "dynamics_acc__ablation_steps")
    # Fig. 7 pools over test images: compared with the pooled columns, not the dataset means
    k4 = _lrow(t, "4", "4").cells["base_pooled"]
    assert k4.mean == pytest.approx(70.0) and k4.paper == pytest.approx(77.3) and k4.paper_approx
    assert k4.diff == pytest.approx(70.0 - 77.3)
    assert _lrow(t, "4", "4").cells["base"].paper is None
    assert _lrow(t, "4", "0").cells["novel_pooled"].paper == pytest.approx(75.6)
    assert all(c.paper is None for r in t.rows if r.label[0] == "2" for c in r.cells.values())


def test_dynamics_without_a_varied_field_keep_one_block_of_steps(result):
    t = _table(result["agg"], "dynamics_acc__base2novel")
    assert t.index == ("step",) and "per " not in t.title


# --- Table 8 -----------------------------------------------------------------------------------


DG_SEEDS = {1: {"all": 70.0, "ImageNetV2": 62.0, "ImageNetSketch": 47.0, "ImageNetA": 49.0,
                "ImageNetR": 76.0},
            2: {"all": 72.0, "ImageNetV2": 64.0, "ImageNetSketch": 49.0, "ImageNetA": 53.0,
                "ImageNetR": 78.0}}


def _dg_specs(targets):
    cfg = TrainConfig(protocol="domain_generalization", dataset="ImageNet",
                      eval_datasets=tuple(targets))
    specs = []
    for seed, v in DG_SEEDS.items():
        m = {"all/acc": v["all"], "val/acc": 99.0}
        m.update({f"{x}/acc": v[x] for x in targets})
        m["target_avg"] = statistics.mean(v[x] for x in targets)
        specs.append(("domain_generalization", cfg.replace(seed=seed), m))
    return specs


def test_table8_domain_generalization_values_paper_and_missing_target():
    targets = ("ImageNetV2", "ImageNetSketch", "ImageNetA")  # ImageNetR never evaluated
    t = _named(_build(_dg_specs(targets)), "table8_domain_generalization__domain_generalization")
    assert [r.label[0] for r in t.rows] == ["source: ImageNet", "ImageNetV2", "ImageNetSketch",
                                            "ImageNetA", "ImageNetR", "Target Avg"]
    paper = {"source: ImageNet": 70.26, "ImageNetV2": 63.68, "ImageNetSketch": 48.75,
             "ImageNetA": 50.28, "ImageNetR": 77.08}  # Table 8, PERL row
    for label, p in paper.items():
        c = _row(t, label).cells["m0"]
        assert c.paper == pytest.approx(p), label
        if label == "ImageNetR":
            # not run: missing, never filled from the paper
            assert c.status == "missing" and c.mean is None and c.diff is None and c.n == 0
            continue
        vals = [v["all" if label.startswith("source") else label] for v in DG_SEEDS.values()]
        assert c.mean == pytest.approx(statistics.mean(vals))
        assert c.std == pytest.approx(statistics.stdev(vals)) and c.n == 2
        assert c.diff == pytest.approx(statistics.mean(vals) - p)
    assert _row(t, "ImageNetV2").cells["m0"].diff == pytest.approx(63.0 - 63.68)  # by hand
    avg = _row(t, "Target Avg").cells["m0"]
    assert avg.mean == pytest.approx((158 / 3 + 166 / 3) / 2)  # per-seed means of 3 targets
    assert avg.paper == pytest.approx(59.95) and avg.diff is None and "3 target(s)" in \
        avg.no_diff_reason
    rows = {r["evaluated on"]: r for r in _csv_rows(t)}
    assert rows["ImageNetR"]["m0"] == "" and rows["ImageNetR"]["m0_status"] == "missing"
    assert float(rows["ImageNetR"]["m0_paper"]) == pytest.approx(77.08)
    assert rows["ImageNetR"]["m0_diff"] == ""
    md = to_markdown(t)
    assert "| ImageNetR | — | 77.08 | — |" in md and "n/c" in md
    assert (t.counts.expected, t.counts.found) == (2, 2)


def test_table8_target_average_compared_when_all_four_targets_ran():
    targets = ref.DG_TARGETS
    t = _named(_build(_dg_specs(targets)), "table8_domain_generalization__domain_generalization")
    avg = _row(t, "Target Avg").cells["m0"]
    per_seed = [statistics.mean(v[x] for x in targets) for v in DG_SEEDS.values()]
    assert avg.mean == pytest.approx(statistics.mean(per_seed))
    assert avg.diff == pytest.approx(statistics.mean(per_seed) - 59.95)
    assert _row(t, "ImageNetR").cells["m0"].mean == pytest.approx(77.0)


# --- Table 4, Fig. 3a, alignment and the per-dataset detail ------------------------------------


def _suite_specs(sweep, field, values, seeds=(1, 2), datasets=ref.B2N_DATASETS,
                 extra=None):
    """One run per (value, dataset, seed) with invented, distinct accuracies; returns the specs
    and {(value, dataset, seed): (base, novel)}."""
    specs, truth = [], {}
    for vi, v in enumerate(values):
        for di, d in enumerate(datasets):
            for seed in seeds:
                b, n = 60.0 + di + vi + seed, 50.0 + 2 * di - vi + seed
                truth[(v, d, seed)] = (b, n)
                m = {"base/acc": b, "novel/acc": n, **((extra or {}).get(v, {}))}
                specs.append((sweep, TrainConfig(dataset=d, seed=seed, **{field: v}), m))
    return specs, truth


def _avg_over(truth, value, datasets, i):
    return statistics.mean(statistics.mean(bn[i] for (v, d, s), bn in truth.items()
                                           if v == value and d == ds) for ds in datasets)


def test_table4_loop_all_six_variants_with_unrun_rows_missing():
    suite = ref.B2N_DATASETS
    specs, truth = _suite_specs("ablation_loop", "variant", ["shared", "deep"],
                                extra={"shared": {"num_trainable_parameters": 6402.0}})
    # PERL-Step: only DTD (an average over 1 of 11 datasets); PERL-Early: its one run FAILED
    step_specs, step_truth = _suite_specs("ablation_loop", "variant", ["step"], seeds=(1,),
                                          datasets=("DTD",))
    specs += step_specs + [("ablation_loop", TrainConfig(dataset="DTD", seed=1, variant="early"),
                            {}, "FAILED")]
    tables = _build(specs)
    t = _named(tables, "table4_loop__ablation_loop")
    assert [r.label[0] for r in t.rows] == ["early", "deep", "shared", "step", "layer",
                                            "layerstep"]
    paper_hm = {"early": 65.15, "deep": 74.52, "shared": 74.79, "step": 74.93, "layer": 75.09,
                "layerstep": 76.37}  # Table 4, HM column
    paper_params = {"early": "6K", "deep": "6K", "shared": "6K", "step": "32K", "layer": "26K",
                    "layerstep": "83K"}
    for v in paper_hm:
        r = _row(t, v)
        assert r.cells["hm"].paper == pytest.approx(paper_hm[v]), v
        assert r.info[PARAMS_PAPER] == paper_params[v]
    for v in ("shared", "deep"):  # every dataset ran: Δ = ours - paper
        c = _row(t, v).cells
        for m, i, p in (("base", 0, "T4"), ("novel", 1, "T4")):
            ours = _avg_over(truth, v, suite, i)
            paper = ref.paper_value(p, VARIANT_METHOD[v], "average", m)
            assert c[m].mean == pytest.approx(ours) and c[m].n == 2
            assert c[m].diff == pytest.approx(ours - paper)
    # by hand: shared base = 60 + mean(0..10) + 0 + mean(1, 2) = 66.5; paper 73.97
    assert _row(t, "shared").cells["base"].mean == pytest.approx(66.5)
    assert _row(t, "shared").cells["base"].diff == pytest.approx(66.5 - 73.97)
    assert _row(t, "shared").info[PARAMS_OURS] == "6,402"
    assert _row(t, "deep").info[PARAMS_OURS] == "—"
    step = _row(t, "step").cells["base"]
    assert step.mean == pytest.approx(step_truth[("step", "DTD", 1)][0])
    assert step.note == "average over 1 of 11 datasets" and step.diff is None
    assert step.paper == pytest.approx(74.30)
    early = _row(t, "early").cells["base"]
    assert early.status == "failed" and early.n_failed == 1 and early.mean is None
    for v in ("layer", "layerstep"):  # never run: missing, the paper's number only beside it
        c = _row(t, v).cells["hm"]
        assert c.status == "missing" and c.mean is None and c.diff is None and c.n == 0
    md = to_markdown(t)
    assert "| layer | — | 26K | — | 75.58 | — |" in md
    rows = {r["variant"]: r for r in _csv_rows(t)}
    assert rows["layerstep"]["hm"] == "" and rows["layerstep"]["hm_status"] == "missing"
    assert float(rows["layerstep"]["hm_paper"]) == pytest.approx(76.37)
    assert rows["early"]["base"] == "FAILED"
    # 6 variants x 11 datasets x 2 seeds; found: 2 x 22 + 1, failed 1
    assert (t.counts.expected, t.counts.found, t.counts.failed) == (132, 45, 1)
    # the per-dataset detail: one row per (variant, dataset), no paper numbers
    d = _named(tables, "detail_table4_loop__ablation_loop")
    assert d.section == "detail" and d.index == ("variant", "dataset")
    assert len(d.rows) == 6 * 11 and not d.any_paper
    for (v, ds), r in ((("deep", "EuroSAT"), _lrow(d, "deep", "EuroSAT")),
                       (("shared", "ImageNet"), _lrow(d, "shared", "ImageNet"))):
        bs = [truth[(v, ds, s)][0] for s in (1, 2)]
        ns = [truth[(v, ds, s)][1] for s in (1, 2)]
        assert r.cells["base"].mean == pytest.approx(statistics.mean(bs))
        assert r.cells["base"].std == pytest.approx(statistics.stdev(bs))
        assert r.cells["hm"].mean == pytest.approx(statistics.mean(HM(b, n)
                                                                   for b, n in zip(bs, ns)))
        assert r.cells["hm_coop"].mean == pytest.approx(HM(statistics.mean(bs),
                                                           statistics.mean(ns)))
    assert _lrow(d, "early", "DTD").cells["base"].status == "failed"
    assert _lrow(d, "early", "Caltech101").cells["base"].status == "missing"
    assert _lrow(d, "step", "DTD").cells["base"].n == 1
    assert _lrow(d, "layer", "DTD").cells["hm"].status == "missing"


def test_fig3a_inject_layer_rows_6_to_11_with_figure_read_paper_values():
    suite = ref.B2N_DATASETS
    specs, truth = _suite_specs("ablation_layer", "inject_layer", [7, 9])
    part, part_truth = _suite_specs("ablation_layer", "inject_layer", [11],
                                    datasets=("DTD", "EuroSAT"))
    # the caption's reading: the vision J moves, the text tower stays at 7 (Appendix A)
    specs, part = ([(sw, c.replace(text_inject_layer=7), m) for sw, c, m in x]
                   for x in (specs, part))
    t = _named(_build(specs + part), "fig3a_inject_layer__ablation_layer")
    assert [r.label[0] for r in t.rows] == ["6", "7", "8", "9", "10", "11"]
    assert t.plot == "curve" and [r.x for r in t.rows] == [6, 7, 8, 9, 10, 11]
    j9 = _row(t, "9").cells
    ours = _avg_over(truth, 9, suite, 0)
    assert j9["base"].mean == pytest.approx(ours) and j9["base"].paper == pytest.approx(75.4)
    assert j9["base"].paper_approx and j9["base"].diff == pytest.approx(ours - 75.4)
    from pipeline.tables import fmt_diff, fmt_paper

    assert fmt_paper(j9["hm"]) == "~72.95" and fmt_diff(j9["base"]).startswith("~")
    j7 = _row(t, "7").cells["hm"]  # the default row: the tables' exact value, no "~"
    assert j7.paper == pytest.approx(74.79) and not j7.paper_approx
    assert fmt_paper(j7) == "74.79"
    for j, p in ((6, 75.6), (8, 74.55), (10, 75.35)):  # never run
        c = _row(t, str(j)).cells["base"]
        assert c.status == "missing" and c.mean is None and c.paper == pytest.approx(p)
        assert fmt_paper(c) == f"~{p:g}" and c.diff is None
    j11 = _row(t, "11").cells["novel"]
    assert j11.mean == pytest.approx(_avg_over(part_truth, 11, ("DTD", "EuroSAT"), 1))
    assert j11.diff is None and j11.no_diff_reason and j11.note == "average over 2 of 11 datasets"
    md = to_markdown(t)
    assert "| 6 | — | ~75.6 | — |" in md and "read off the plot" in md
    assert any("(n/c)" in n for n in t.notes)  # J=11 is a partial average
    # without it, the rows never run (J=6, 8, 10) are missing, not partial: no n/c note
    full = _named(_build(specs), "fig3a_inject_layer__ablation_layer")
    assert not any("(n/c)" in n for n in full.notes), full.notes


def test_alignment_accuracy_and_anchor_cosine_vs_anchor_weight(tmp_path, monkeypatch):
    from pipeline import plots

    datasets = ("DTD", "Caltech101")
    cos = {0.0: (0.60, 0.70), 1.0: (0.90, 0.92), 10.0: (0.99, 0.98)}
    specs, truth = [], {}
    for lam, (cb, cn) in cos.items():
        for di, d in enumerate(datasets):
            for seed in (1, 2):
                b, n = 70.0 + di + seed - lam, 60.0 + di + seed + lam
                truth[(lam, d, seed)] = (b, n)
                specs.append(("alignment", TrainConfig(dataset=d, seed=seed, anchor_weight=lam),
                              {"base/acc": b, "novel/acc": n, "base/anchor_cos": cb + 0.01 * seed,
                               "novel/anchor_cos": cn - 0.01 * di}))
    tables = _build(specs)
    t = _named(tables, "alignment_anchor_weight__alignment")
    assert t.title.startswith(ABLATION_TITLES[("anchor_weight",)][1])
    assert [r.label[0] for r in t.rows] == ["0", "1", "10"] and [r.x for r in t.rows] == \
        [0.0, 1.0, 10.0]
    assert [c.key for c in t.columns][4:6] == ["base_anchor_cos", "novel_anchor_cos"]
    assert all(c.better == "none" and c.decimals == 4 for c in t.columns[4:])
    assert not t.any_paper  # the paper prints no alignment ablation numbers
    for lam, (cb, cn) in cos.items():
        c = _row(t, fmt := fmt_value(lam)).cells
        assert c["base"].mean == pytest.approx(_avg_over(truth, lam, datasets, 0)), fmt
        assert c["novel"].mean == pytest.approx(_avg_over(truth, lam, datasets, 1))
        assert c["base_anchor_cos"].mean == pytest.approx(cb + 0.015)  # seeds +0.01, +0.02
        assert c["base_anchor_cos"].std == pytest.approx(statistics.stdev([cb + 0.01, cb + 0.02]))
        assert c["novel_anchor_cos"].mean == pytest.approx(cn - 0.005)  # datasets 0, -0.01
        assert c["novel_anchor_cos"].std == pytest.approx(0.0)
    assert "0.9150" in to_markdown(t)  # anchor cos at lambda = 1, base, 4 decimals
    d = _named(tables, "detail_alignment_anchor_weight__alignment")
    assert len(d.rows) == 3 * 2
    assert _lrow(d, "10", "Caltech101").cells["novel_anchor_cos"].mean == pytest.approx(0.97)
    assert _lrow(d, "0", "DTD").cells["base"].mean == pytest.approx(71.5)
    # the plot: accuracy panel and an anchor-cos panel beside it
    panels = []
    real_panel = plots._curve_panel
    monkeypatch.setattr(plots, "_curve_panel", lambda ax, tt, cols, ylabel: (
        panels.append(([c.key for c in cols], ylabel)), real_panel(ax, tt, cols, ylabel))[1])
    png = plots.plot_curve(t, tmp_path / "alignment.png")
    assert panels == [(["base", "novel", "hm"], "accuracy / HM (%)"),
                      (["base_anchor_cos", "novel_anchor_cos"],
                       "cos(zero-shot, refined image emb.)"),
                      ([f"{ev}_{m}" for ev in ("base", "novel") for m in
                        ("cos_true", "margin", "gap")], "image-text cos / margin / gap (step K)")]
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.width > 1300  # two 6.5-inch panels at 110 dpi


# --- table axes from the sweep's recorded grid ---------------------------------------------------


def _submission(s, exp, sweep, resolved_yaml, cfgs):
    """A submission as pipeline.run records it: a parent run (phase `sweep`) holding the
    resolved sweep file, and one FINISHED child per config."""
    parent = s.run(exp, sweep, None, {}, phase="sweep")
    if resolved_yaml is not None:
        s.client.log_text(parent, resolved_yaml, "sweep/resolved.yaml")
    for cfg in cfgs:
        s.run(exp, sweep, cfg, _b2n_metrics(50.0 + cfg.seed, 40.0), parent=parent)


def test_table_axes_come_from_the_recorded_grid_not_the_sweep_name(tmp_path):
    """The rows of a sweep's table are the fields its grid varies, as its parent run recorded
    the resolved sweep file: an unknown name still gets its ablation (values not run yet
    included in the grid), and a known name whose grid varies something else follows the grid.
    A store without the record falls back to SWEEP_AXES by name."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    s = Store(uri, tmp_path)
    only_k1 = [TOY.replace(num_steps=1, seed=seed) for seed in (1, 2)]
    _submission(s, s.experiment("perl/mine"), "my_steps",
                "name: my_steps\ngrid:\n  dataset: [ToyShapes]\n  num_steps: [1, 2, 3]\n"
                "  seed: [1, 2]\n", only_k1)
    _submission(s, s.experiment("perl/renamed"), "ablation_steps",
                "name: ablation_steps\ngrid: {anchor_weight: [0.0, 1.0], lr: [0.002]}\n",
                [c.replace(anchor_weight=0.0) for c in only_k1])
    _submission(s, s.experiment("perl/old"), "ablation_steps", None, only_k1)
    agg = agg_mod.aggregate(uri)
    names = {t.name for t in agg.tables}
    assert "fig3b_num_steps__my_steps" in names  # the grid varies K; only K=1 ran so far
    assert "table1_5_base2novel__my_steps" not in names
    assert "alignment_anchor_weight__ablation_steps" in names  # the grid, not the name
    assert "fig3b_num_steps__ablation_steps" in names  # no record: SWEEP_AXES
    mine = _named(agg.tables, "fig3b_num_steps__my_steps")
    assert [r.label for r in mine.rows] == [("1",)]
    assert mine.rows[0].cells["base"].mean == pytest.approx(51.5)


def test_grid_axes_of_a_resolved_sweep():
    from pipeline.aggregate.read import grid_axes

    assert grid_axes({"grid": {"dataset": ["A", "B"], "seed": [1, 2], "lr": [0.1]}}) == ()
    assert grid_axes({"grid": {"num_steps": [2, 4], "inject_layer": [6, 7]}}) == (
        "inject_layer", "num_steps")  # TrainConfig's order, as when read off the runs
    # arms: an arm's sub-grid over the sweep's; a field an arm fixes leaves the sweep's grid
    loop = {"grid": {"variant": ["shared", "step"]},
            "arms": [{"name": "a", "fixed": {"variant_projectors": "specific_only"}},
                     {"name": "b", "fixed": {"variant": "step"}, "grid": {"lr": [0.1, 0.2]}}]}
    assert grid_axes(loop) == ("variant", "lr")
    assert grid_axes({"grid": {"not_a_field": [1, 2], "seed": "${SEEDS}"}}) == ()
    assert grid_axes({"grid": ["num_steps"], "arms": "x"}) == ()  # not a sweep's shape: none
