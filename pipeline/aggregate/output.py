"""Output: the tables as Markdown / CSV / LaTeX, the plots, runs.csv, summary.md and
report.html under the output folder, and the `aggregate` run that logs them to MLflow."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd

from pipeline.aggregate.build import Aggregate
from pipeline.aggregate.read import AGGREGATE_EXPERIMENT, make_client
from pipeline.layout import sqlite_path as sqlite_file
from pipeline.tables import to_csv, to_latex, to_markdown


def runs_table_frame(agg: Aggregate) -> pd.DataFrame:
    """Every run read, with the settings that identify it and how it was used (runs.csv)."""
    df = agg.runs
    if not len(df):
        return pd.DataFrame(columns=["run_id"])
    cols = ["run_id", "experiment", "tags.sweep", "tags.phase", "status", "resolution",
            "tags.status_detail", "tags.config_hash"]
    cols += [f"params.{f}" for f in ("protocol", "dataset", "seed", "num_steps", "inject_layer",
                                     "modality", "variant", "anchor_weight")
             if f"params.{f}" in df.columns]
    cols += [c for c in ("metrics.base/acc", "metrics.novel/acc", "metrics.hm", "metrics.all/acc",
                         "metrics.target_avg") if c in df.columns]
    return df[cols].sort_values(["experiment", "tags.sweep", "run_id"], na_position="last")


def _draw(agg: Aggregate, out: Path) -> list[Path]:
    """The tables' plots and each search's Optuna plots; every table learns its plots' names."""
    from pipeline import plots

    agg.figures = plots.draw_all(agg.tables, out, agg.warnings)
    for s in agg.searches:  # Optuna's own plots, from the study (persistent or rebuilt)
        agg.figures[s.stem] = plots.plot_search(s.study, s.stem, out, s.study_from,
                                                agg.warnings)
    for t in agg.tables:
        t.plots = [p.name for p in agg.figures.get(t.name, [])]
    return [p for ps in agg.figures.values() for p in ps]


def write_outputs(agg: Aggregate, out: Path, *, ui_url: str | None = None) -> list[Path]:
    """Tables (md/csv/tex), plots (png), runs.csv, summary.md and report.html under `out`."""
    from pipeline import report

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for t in agg.tables:
        for ext, fn in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
            p = out / f"{t.name}.{ext}"
            p.write_text(fn(t), encoding="utf-8")
            written.append(p)
    written += _draw(agg, out)
    runs_csv = out / "runs.csv"
    runs_table_frame(agg).to_csv(runs_csv, index=False)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(agg), encoding="utf-8")
    html = report.write_report(agg, out, ui_url=ui_url)
    return written + [runs_csv, summary, html]


def count_lines(agg: Aggregate) -> list[str]:
    lines = []
    for t in agg.tables:
        if t.section == "tables":
            lines.append(f"{t.name}: {t.counts.line()}")
    return lines


def summary_markdown(agg: Aggregate) -> str:
    head = [f"# Rebuilt tables (tracking store `{agg.store}`)", "",
            f"Experiments: {', '.join(sorted(agg.experiments.values())) or 'none'}.",
            "Paper columns are the numbers printed in arXiv 2605.18464v1, shown for reference "
            "only; our numbers come from the MLflow runs listed in runs.csv.", ""]
    if agg.warnings:
        head += ["Warnings:"] + [f"- {w}" for w in agg.warnings] + [""]
    if not agg.tables:
        head.append("No trial runs found (runs carrying a `config_hash` tag, phase `final`).")
    body = []
    for sec in ("tables", "dynamics", "detail", "search"):
        body += [to_markdown(t) for t in agg.tables if t.section == sec]
    return "\n".join(head) + "\n" + "\n".join(body)


def _sqlite_artifact_location(tracking_uri: str) -> str | None:
    db = sqlite_file(tracking_uri)
    if db is None:
        return None
    # beside the DB, not in the cwd (MLflow's default for SQLite stores is ./mlruns)
    return (db.resolve().parent / "artifacts" / AGGREGATE_EXPERIMENT).as_uri()


def _aggregate_experiment(client, tracking_uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(AGGREGATE_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(
            AGGREGATE_EXPERIMENT, artifact_location=_sqlite_artifact_location(tracking_uri))
    except MlflowException:  # created concurrently by another aggregate
        return client.get_experiment_by_name(AGGREGATE_EXPERIMENT).experiment_id


def log_to_mlflow(agg: Aggregate, out: Path, client=None) -> str:
    """Log every output file as artifacts of a new run in the `aggregate` experiment."""
    from mlflow.entities import Metric, Param, RunTag

    client = client or make_client(agg.tracking_uri)
    exp_id = _aggregate_experiment(client, agg.tracking_uri)
    names = ",".join(sorted(agg.experiments.values()))
    run = client.create_run(exp_id, run_name="aggregate", tags={
        "aggregate_of": names[:5000], "code_sha": os.environ.get("GIT_SHA", "")})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    c = agg.counts
    try:
        client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in (
            ("cells_expected", c.expected), ("cells_found", c.found), ("cells_failed", c.failed),
            ("cells_missing", c.missing), ("tables", len(agg.tables)))],
            params=[Param("experiments", names[:6000] or "none")],
            tags=[RunTag("tables", ",".join(t.name for t in agg.tables)[:5000])])
        client.log_artifacts(rid, str(out))
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rid
