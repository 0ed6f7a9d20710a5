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
from pipeline.tables import to_markdown  # noqa: E402

from fake_runs import B2N, HM, STEPS, TOY, Store, memory_runs  # noqa: E402
from fake_runs import b2n_metrics as _b2n_metrics  # noqa: E402


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
    exp = client.get_experiment_by_name(agg_mod.AGGREGATE_EXPERIMENT)
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
    exp = client.get_experiment_by_name(agg_mod.AGGREGATE_EXPERIMENT)
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
    assert res[orphan] == agg_mod.NO_PARAMS
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
    assert agg_mod.redact_uri("http://u:p@h:5000/x") == "http://***@h:5000/x"
    assert agg_mod.redact_uri("sqlite:///a.db") == "sqlite:///a.db"
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
    assert vis.info["#params"] == "3,841" and vis.info["#params (paper)"] == "4K"
    assert _row(t, "text").cells["base"].status == "missing"
    assert _row(t, "both").cells["hm"].paper == pytest.approx(74.79)


def _named(tables, name):
    (t,) = [t for t in tables if t.name == name]
    return t


def _lrow(t, *label):
    (r,) = [r for r in t.rows if r.label == label]
    return r


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
        f"dynamics_{m}__smoke" for m in ("acc", "confidence", "brier", "kl")]
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
             for d in agg_mod.ref.B2N_DATASETS for K in (2, 4)]
    t = _named(_build(specs), "dynamics_acc__ablation_steps")
    k4 = _lrow(t, "4", "4").cells["base"]
    assert k4.mean == pytest.approx(70.0) and k4.paper == pytest.approx(77.3) and k4.paper_approx
    assert k4.diff == pytest.approx(70.0 - 77.3)
    assert _lrow(t, "4", "0").cells["novel"].paper == pytest.approx(75.6)
    assert all(c.paper is None for r in t.rows if r.label[0] == "2" for c in r.cells.values())


def test_dynamics_without_a_varied_field_keep_one_block_of_steps(result):
    t = _table(result["agg"], "dynamics_acc__base2novel")
    assert t.index == ("step",) and "per " not in t.title
