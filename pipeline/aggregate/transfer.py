"""Table 2 (cross_dataset) and Table 8 (domain generalisation): the source, every target and
the Target Avg, one column per trained model."""

from __future__ import annotations

import json
import math
import statistics
from typing import Callable

from pipeline import reference as ref
from pipeline.aggregate.pooling import (attach_paper, cell_over_seeds, count_cells, metric,
                                        seed_values)
from pipeline.aggregate.runs import Key, Pool, SeedRun, kget
from perl_core.protocol import is_target_evalset
from pipeline.aggregate.views import SweepView, dataset_order, fmt_value, settings_note
from pipeline.tables import Cell, Column, Row, Table


def target_names(pool: Pool, view: SweepView, source: str) -> list[str]:
    """The transfer targets a source's runs named (`eval_datasets`) or logged an accuracy of."""
    names: list[str] = []
    for k in view.keys:
        ev = kget(k, "eval_datasets")
        if ev:
            try:
                names += list(json.loads(ev))
            except ValueError:
                pass
        for r in pool.finished_seeds(k).values():
            names += [m.split("/")[0] for m in r.metrics
                      if m.endswith("/acc") and is_target_evalset(m.split("/")[0])]
    names = [n for n in dict.fromkeys(names) if n != source]
    return dataset_order(names)


def _all_targets(pool: Pool, view: SweepView, sources: list[str],
                 paper_targets: tuple[str, ...]) -> list[str]:
    """Every source's targets; with the paper's source, the paper's targets never run too."""
    targets: list[str] = []
    for s in sources:
        targets += target_names(pool, view, s)
    if any(ref.paper_dataset(s) == ref.XD_SOURCE for s in sources):
        have = {ref.paper_dataset(x) for x in targets}
        targets += [d for d in paper_targets if d not in have]
    return dataset_order(targets)


def _target_avg_cell(pool: Pool, k: Key, targets: list[str], paper_t: str, is_paper_src: bool,
                     paper_targets: tuple[str, ...]) -> Cell:
    def target_avg(r: SeedRun, _targets=tuple(targets)) -> float | None:
        v = r.metrics.get("target_avg")
        if v is not None and not math.isnan(v):
            return v
        vals = [r.metrics[f"{x}/acc"] for x in _targets if f"{x}/acc" in r.metrics]
        return statistics.fmean(vals) if vals else None

    c = cell_over_seeds(pool, k, target_avg)
    if is_paper_src:
        got = {ref.paper_dataset(x) for x in targets if seed_values(pool, k, metric(f"{x}/acc"))}
        why = "" if got == set(paper_targets) else (
            f"not compared: ours averages {len(got)} target(s), "
            f"the paper's {len(paper_targets)}")
        attach_paper(c, paper_t, "PERL", "target_average", "acc", why)
    return c


def _model_cells(pool: Pool, k: Key, col: str, targets: list[str], paper_t: str,
                 paper_targets: tuple[str, ...], row: Callable[..., Row]) -> None:
    """One trained model's column: its source, every target and the Target Avg."""
    src = str(kget(k, "dataset"))
    is_paper_src = ref.paper_dataset(src) == ref.XD_SOURCE
    c = cell_over_seeds(pool, k, metric("all/acc"))
    attach_paper(c, paper_t, "PERL", ref.XD_SOURCE if is_paper_src else None, "acc")
    row(f"source: {src}").cells[col] = c
    for tgt in targets:
        c = cell_over_seeds(pool, k, metric(f"{tgt}/acc"))
        attach_paper(c, paper_t, "PERL", ref.paper_dataset(tgt) if is_paper_src else None,
                     "acc")
        row(tgt).cells[col] = c
    row("Target Avg", "average").cells[col] = _target_avg_cell(
        pool, k, targets, paper_t, is_paper_src, paper_targets)


def table_transfer(pool: Pool, view: SweepView) -> Table:
    """Table 2 (cross_dataset) / Table 8 (domain_generalization): rows = source, targets, Avg."""
    xd = view.protocol == "cross_dataset"
    table_id, paper_t = ("table2_cross_dataset", "T2") if xd else \
        ("table8_domain_generalization", "T8")
    paper_targets = ref.XD_TARGETS if xd else ref.DG_TARGETS
    t = Table(name=f"{table_id}__{view.sweep}",
              title=("Table 2 — cross-dataset transfer" if xd
                     else "Table 8 — domain generalisation") + f" (sweep `{view.sweep}`)",
              index=("evaluated on",), columns=[], sweep=view.sweep,
              paper_ref=f"PERL row of Table {paper_t[1:]}", plot="bars", x_label="evaluated on")
    # one column per trained model (a source dataset and, if the sweep varies any, its settings)
    models = list(dict.fromkeys(view.keys))
    sources = dataset_order(str(kget(k, "dataset")) for k in models)
    targets = _all_targets(pool, view, sources, paper_targets)
    for i, k in enumerate(models):
        lab = "acc" if len(models) == 1 else \
            f"{kget(k, 'dataset')}" + ("" if not view.axis else " " + ", ".join(
                f"{f}={fmt_value(kget(k, f))}" for f in view.axis))
        t.columns.append(Column(f"m{i}", lab, help="top-1 accuracy (%), mean over seeds"))
    rows: dict[str, Row] = {}

    def row(label: str, kind: str = "data") -> Row:
        if label not in rows:
            rows[label] = Row(label=(label,), kind=kind, x=label)  # type: ignore[arg-type]
        return rows[label]

    for i, k in enumerate(models):
        _model_cells(pool, k, f"m{i}", targets, paper_t, paper_targets, row)
    t.rows = list(rows.values())
    t.rows.sort(key=lambda r: (r.kind == "average", not r.label[0].startswith("source")))
    t.counts = count_cells(pool, models, view.seeds)
    t.notes += ["Target Avg: per seed the logged `target_avg` (mean over the targets, source "
                "excluded), then mean ± std over seeds.",
                "Paper numbers only beside a model trained on ImageNet (the paper's source)."] \
        + settings_note(view)
    return t
