"""The search phase (Optuna): every sample with its parameters, ties and the best marked, and
the best sample against the grid default on the test splits (section "search")."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pandas as pd

from perl_core.config import FIELD_NAMES
from pipeline.aggregate.pooling import cell_over_seeds, metric
from pipeline.aggregate.runs import (HPO_RESOLUTION, Key, Pool, kget, kreplace, plain, row_key,
                                        sweep_name)
from pipeline.aggregate.views import fmt_value
from pipeline.tables import Cell, Column, Counts, Row, Table

# test metrics shown beside the best sample and the grid default, those the runs logged
SEARCH_TEST_METRICS = (("base/acc", "Base"), ("novel/acc", "Novel"), ("hm", "HM"),
                       ("all/acc", "All"), ("target_avg", "Target Avg"))


@dataclass
class SearchSample:
    number: int  # 1.. in start order
    run_id: str
    params: dict[str, Any]
    metrics: dict[str, float]
    cell: str = ""


@dataclass
class SearchView:
    """The FINISHED samples of one search (experiment, sweep, fixed settings) and its study."""
    experiment: str
    experiment_id: str
    sweep: str
    key: Key  # the samples' cell key with the searched fields blanked
    fields: tuple[str, ...]
    metric: str
    mode: str
    samples: list[SearchSample]
    study_name: str = ""
    study_file: str = ""
    space_json: str = ""
    study: Any = None  # an optuna Study (in memory), once loaded
    study_source: str = ""
    stem: str = ""  # the samples table's name (plots are named after it)

    @property
    def study_from(self) -> str:
        """Short form of `study_source` (plot titles)."""
        return "persistent study" if self.study_source.startswith("persistent") else \
            "rebuilt from MLflow runs"


def _latest_search_tags(df: pd.DataFrame, exp_id: Any, sweep: str) -> dict[str, str]:
    """The search tags (pipeline.run's `_tag_search`) of the latest parent run of a sweep."""
    if "tags.search_study" not in df.columns:
        return {}
    par = df[df["tags.search_study"].notna() & (df["experiment_id"] == exp_id) &
             (df["tags.sweep"].map(sweep_name) == sweep)].sort_values("start_time")
    if not len(par):
        return {}
    last = par.iloc[-1]
    return {k: str(plain(last.get(f"tags.search_{k}")) or "")
            for k in ("study", "study_file", "space", "metric", "mode")}


def _samples(grp: pd.DataFrame, fields_: tuple[str, ...]) -> list[SearchSample]:
    return [SearchSample(
        number=i + 1, run_id=r["run_id"], cell=str(plain(r.get("tags.cell")) or ""),
        params={f: plain(r.get(f"params.{f}")) for f in fields_},
        metrics={c[len("metrics."):]: float(v) for c, v in r.items()
                 if c.startswith("metrics.") and plain(v) is not None})
        for i, (_, r) in enumerate(grp.iterrows())]


def search_views(df: pd.DataFrame) -> list[SearchView]:
    hpo = df[(df["resolution"] == HPO_RESOLUTION) & (df["status"] == "FINISHED")]
    views = []
    for (exp_id, sw), part in hpo.groupby([hpo["experiment_id"],
                                           hpo["tags.sweep"].map(sweep_name)], sort=True):
        tags = _latest_search_tags(df, exp_id, sw)
        fields_ = tuple(json.loads(tags["space"])) if tags.get("space") else tuple(
            f for f in FIELD_NAMES if f"params.{f}" in part and part[f"params.{f}"].nunique() > 1)
        part = part.sort_values(["end_time"]).drop_duplicates("tags.config_hash", keep="last")
        part = part.sort_values("start_time")
        blank = {f: None for f in fields_}
        for key, grp in part.groupby(part.apply(
                lambda r: kreplace(row_key(r), canonical=False, **blank), axis=1), sort=False):
            views.append(SearchView(
                experiment=str(grp["experiment"].iloc[0]), experiment_id=str(exp_id),
                sweep=sw, key=key, fields=fields_,
                metric=tags.get("metric") or "val/acc", mode=tags.get("mode") or "max",
                samples=_samples(grp, fields_), study_name=tags.get("study", ""),
                study_file=tags.get("study_file", ""), space_json=tags.get("space", "")))
    return views


def load_search_study(view: SearchView) -> None:
    """The persistent study when its file is readable from here, else one rebuilt from the
    MLflow samples; `view.study_source` says which (and why)."""
    from pipeline import study as st

    st.quiet_optuna()
    why = "the runs carry no study file tag (submitted before studies were kept)"
    if view.study_file and view.study_name:
        try:
            view.study = st.read_study(view.study_file, view.study_name)
            view.study_source = f"persistent study {view.study_name!r} in {view.study_file}"
            return
        except Exception as e:  # noqa: BLE001 - the MLflow runs hold the same samples
            why = f"study file {view.study_file} not readable here: {type(e).__name__}: {e}"
    values = [(s.params, s.metrics[view.metric], {"mlflow_run_id": s.run_id})
              for s in view.samples if view.metric in s.metrics]
    space = st.space_from_json(view.space_json) if view.space_json else \
        st.infer_space([p for p, _, _ in values])
    view.study, left_out = st.rebuild_study(view.study_name or f"{view.sweep} (rebuilt)",
                                            view.mode, values, space)
    view.study_source = f"rebuilt from {len(values) - left_out} MLflow run(s) ({why})"


def _ties(view: SearchView, metric_: str) -> list[list[SearchSample]]:
    """Groups (2+) of samples whose `metric_` values are equal (to 1e-9)."""
    groups: dict[float, list[SearchSample]] = {}
    for s in view.samples:
        if metric_ in s.metrics:
            groups.setdefault(round(s.metrics[metric_], 9), []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def _best_sample(view: SearchView) -> SearchSample | None:
    from pipeline.study import best_sample  # the driver's rule too (one home)

    return best_sample(sorted(view.samples, key=lambda s: s.number), view.mode,
                       lambda s: s.metrics.get(view.metric))


def _sample_cell(s: SearchSample, name: str) -> Cell:
    return Cell(mean=s.metrics.get(name), n=1 if name in s.metrics else 0, run_ids=(s.run_id,))


def _tie_notes(view: SearchView, ties: dict[str, list[list[SearchSample]]]) -> list[str]:
    n_val = next((s.metrics["val/n"] for s in view.samples if "val/n" in s.metrics), None)
    return [f"TIE: samples {', '.join(f'#{s.number}' for s in g)} have the same {m} "
            f"({fmt_value(g[0].metrics[m])})" + (
                f": the val split has {n_val:g} images, so one image is "
                f"{100 / n_val:.2g} points of accuracy" if n_val and m.endswith("acc")
                else "") + ". The search cannot tell them apart on this number."
            for m, gs in ties.items() for g in gs]


def table_search(view: SearchView) -> Table:
    """Every sample: its parameters, objective and val accuracy; ties and the best marked."""
    better = "higher" if view.mode == "max" else "lower"
    cols = [Column(view.metric, f"{view.metric} (objective, {view.mode})", 4, better)]
    if view.metric != "val/acc":
        cols.append(Column("val/acc", "val/acc", 2, "higher"))
    t = Table(name=view.stem, title=f"Search samples (sweep `{view.sweep}`, experiment "
                                    f"`{view.experiment}`)",
              index=("sample",), columns=cols, sweep=view.sweep, section="search",
              info_columns=(*view.fields, "best", "ties"))
    best = _best_sample(view)
    ties = {m: _ties(view, m) for m in dict.fromkeys((view.metric, "val/acc"))}
    for s in view.samples:
        r = Row(label=(f"#{s.number}",), info={f: fmt_value(s.params.get(f)) for f in view.fields})
        r.info["best"] = "best" if best is s else ""
        r.info["ties"] = "; ".join(
            f"{m} = " + ", ".join(f"#{o.number}" for o in g if o is not s)
            for m, gs in ties.items() for g in gs if s in g)
        r.cells = {c.key: _sample_cell(s, c.key) for c in cols}
        t.rows.append(r)
    t.counts = Counts(expected=len(view.samples), found=len(view.samples))
    t.notes += _tie_notes(view, ties)
    t.notes.append(f"Objective: {view.metric} ({view.mode}) on the few-shot validation split; "
                   f"one FINISHED run per sample (latest per config hash), in start order. "
                   f"Plots: {view.study_source}.")
    return t


def _grid_default_key(pool: Pool, view: SearchView) -> Key | None:
    """The grid cell of the same sweep with the search's fixed settings (searched fields at the
    values `fixed` gives them)."""
    blank = {f: None for f in view.fields}
    for key, seeds in pool.finished.items():
        mine = any(r.sweep == view.sweep and str(r.experiment_id) == view.experiment_id
                   for r in seeds.values())
        if mine and kreplace(key, canonical=False, **blank) == view.key:
            return key
    return None


def _best_columns(view: SearchView, best: SearchSample) -> tuple[list[tuple[str, str]],
                                                                   list[Column]]:
    names = [(m, lab) for m, lab in SEARCH_TEST_METRICS if m in best.metrics]
    names += [(view.metric, view.metric)] + ([("val/acc", "val/acc")]
                                             if view.metric != "val/acc" else [])
    cols = [Column(m, lab, 4 if m == view.metric and not m.endswith("acc") else 2,
                   "lower" if m == view.metric and view.mode == "min" else "higher")
            for m, lab in names]
    return names, cols


def table_search_best(pool: Pool, view: SearchView) -> Table | None:
    """The best sample (selected on val) against the grid default, on the test splits."""
    best = _best_sample(view)
    if best is None:
        return None
    names, cols = _best_columns(view, best)
    t = Table(name=f"{view.stem}_best", title=f"Best search sample vs the grid default "
                                              f"(sweep `{view.sweep}`)",
              index=("",), columns=cols, sweep=view.sweep, section="search",
              info_columns=tuple(view.fields))
    key = _grid_default_key(pool, view)
    default = Row(label=("grid default (fixed settings)",))
    if key is not None:
        default.info = {f: fmt_value(kget(key, f)) for f in view.fields}
        default.cells = {m: cell_over_seeds(pool, key, metric(m)) for m, _ in names}
    pick = Row(label=(f"best sample #{best.number}",),
               info={f: fmt_value(best.params.get(f)) for f in view.fields},
               cells={m: _sample_cell(best, m) for m, _ in names})
    delta = Row(label=("best − default",), kind="average")
    for m, _ in names:
        d, b = default.cells.get(m, Cell()), pick.cells[m]
        if d.status == "ok" and b.status == "ok":
            delta.cells[m] = Cell(mean=b.mean - d.mean, n=1, run_ids=b.run_ids + d.run_ids)
    t.rows = [default, pick, delta]
    t.counts = Counts(expected=2, found=1 + (key is not None))
    t.notes += [
        f"Best = the best {view.metric} ({view.mode}) over {len(view.samples)} samples, one run "
        f"each (the fixed seed); grid default = the sweep's grid cell with the same fixed settings"
        ", mean ± std over its seeds. Selected on val, compared on test: a best-of-N choice on a"
        " small val split is optimistic on val, and the test columns say whether it carried "
        "over.",
        "No grid cell with the search's fixed settings was found (the grid varies other fields)."
        if key is None else ""]
    t.notes = [n for n in t.notes if n]
    return t


def search_tables(pool: Pool, searches: list[SearchView]) -> list[Table]:
    """The samples table and the best-vs-default table of every search (plots: write_outputs)."""
    tables: list[Table] = []
    for i, v in enumerate(searches):
        stems = [s.stem for s in searches[:i]]
        v.stem = f"search__{v.sweep}"
        if v.stem in stems:  # the same sweep in two experiments or with two fixed settings
            v.stem += f"__{i + 1}"
        load_search_study(v)
        tables.append(table_search(v))
        best = table_search_best(pool, v)
        tables += [best] if best is not None else []
    return tables
