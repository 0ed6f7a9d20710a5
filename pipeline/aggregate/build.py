"""The driver: runs -> pool -> sweep views -> every table family's tables, in the paper's order."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from pipeline.aggregate.ablation import table_b2n_ablation
from pipeline.aggregate.b2n import table_base2novel
from pipeline.aggregate.dynamics import tables_dynamics
from pipeline.aggregate.pooling import cell_over_seeds, count_cells, metric
from pipeline.aggregate.read import (cast_params, make_client, recorded_axes, runs_frame,
                                     select_experiments)
from pipeline.aggregate.runs import Pool, kget, resolve
from pipeline.aggregate.result import Result
from pipeline.aggregate.search import SearchView, search_tables, search_views
from pipeline.queries import all_runs
from pipeline.aggregate.sensitivity import table_sensitivity
from pipeline.aggregate.transfer import table_transfer
from pipeline.aggregate.views import SweepView, arm_axis, fmt_value, sweep_views
from pipeline.tables import Column, Row, Table

# the paper's order (Tables 1/5, 2, 8, 3, 4, Fig. 3a, 3b, alignment, the rest), then by sweep
TABLE_ORDER = ("table1_5", "table2", "table8", "table3", "table4", "fig3a", "fig3b", "alignment",
               "sensitivity", "ablation", "accuracy", "dynamics", "detail")


@dataclass
class Aggregate(Result):
    """The result, plus the aggregate's intermediate state (for tests and callers that dig)."""
    pool: Pool = field(default_factory=Pool)
    views: list[SweepView] = field(default_factory=list)
    searches: list[SearchView] = field(default_factory=list)  # Optuna phases (section "search")


def table_accuracy(pool: Pool, view: SweepView) -> Table:
    """Protocol `all`: one accuracy per dataset (no paper counterpart)."""
    keys = list(view.keys)
    t = Table(name=f"accuracy_all__{view.sweep}",
              title=f"Accuracy on all classes (protocol `all`, sweep `{view.sweep}`)",
              index=("dataset",) + view.axis, columns=[Column("acc", "acc")], sweep=view.sweep,
              plot="bars", x_label="dataset")
    for k in keys:
        lab = (str(kget(k, "dataset")),) + tuple(fmt_value(kget(k, f)) for f in view.axis)
        t.rows.append(Row(label=lab, x=" / ".join(lab),
                          cells={"acc": cell_over_seeds(pool, k, metric("all/acc"))}))
    t.counts = count_cells(pool, keys, view.seeds)
    return t


def view_tables(pool: Pool, v: SweepView) -> list[Table]:
    """The tables of one sweep view: its protocol's table family, then its dynamics."""
    if v.protocol == "base2novel":
        if v.arms and not arm_axis(v):  # arms that each change settings: sensitivity
            tables = list(table_sensitivity(pool, v))
        elif v.axis:
            tables = list(table_b2n_ablation(pool, v))
        else:
            tables = [table_base2novel(pool, v)]
    elif v.protocol in ("cross_dataset", "domain_generalization"):
        tables = [table_transfer(pool, v)]
    else:
        tables = [table_accuracy(pool, v)]
    # any sweep whose runs logged per-step metrics (rows per varied value, if any)
    return tables + tables_dynamics(pool, v)


def build_tables(pool: Pool, views: list[SweepView]) -> list[Table]:
    tables: list[Table] = []
    owner: dict[int, SweepView] = {}
    for v in views:
        if not v.keys:
            continue
        mine = view_tables(pool, v)
        owner.update({id(t): v for t in mine})
        tables += mine
    tables.sort(key=lambda t: (next((i for i, p in enumerate(TABLE_ORDER)
                                     if t.name.startswith(p)), len(TABLE_ORDER)), t.sweep))
    # the same file stem must not be produced twice (the same sweep in two experiments, or one
    # sweep with two protocols): suffix the experiment and protocol
    names = [t.name for t in tables]
    for t, v in zip(tables, [owner[id(t)] for t in tables]):
        if names.count(t.name) > 1:
            slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in v.experiment)
            t.name = f"{t.name}__{slug}__{v.protocol}"
            t.title += f" [experiment {v.experiment}, protocol {v.protocol}]"
    return tables


def aggregate(tracking_uri: str, experiment_names: list[str] | None = None,
              client=None) -> Aggregate:
    client = client or make_client(tracking_uri)
    experiments = select_experiments(client, experiment_names)
    warnings: list[str] = []
    runs = all_runs(client, list(experiments)) if experiments else []
    df = runs_frame(runs, experiments)
    if len(df):
        df = cast_params(df, warnings)
        pool, df = resolve(df)
        views, searches = sweep_views(df, recorded_axes(client, df)), search_views(df)
    else:
        pool, views, searches = Pool(), [], []
        df["resolution"] = pd.Series(dtype="str")
    tables = build_tables(pool, views) + search_tables(pool, searches)
    return Aggregate(tables=tables, figures={}, runs=df, pool=pool, views=views,
                     experiments=experiments, tracking_uri=tracking_uri, warnings=warnings,
                     searches=searches,
                     run_experiment=dict(zip(df.get("run_id", []), df.get("experiment_id", []))))
