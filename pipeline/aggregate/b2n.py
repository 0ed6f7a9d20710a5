"""Tables 1 and 5 (base-to-novel: Base / Novel / HM per dataset, both HM conventions, and our
step 0 beside the paper's CLIP row), and the base-to-novel columns other tables reuse."""

from __future__ import annotations

from pipeline import reference as ref
from pipeline.aggregate.pooling import (attach_paper, cell_over, count_cells, final_step_metric,
                                        hm, hm_of_cells, metric, seed_hm)
from pipeline.aggregate.runs import Key, Pool, SeedRun, kget
from pipeline.aggregate.views import (SweepView, dataset_order, keys_for_datasets,
                                      on_paper_data, settings_note)
from pipeline.tables import Cell, Column, Row, Table

# Alignment at the final step, beside accuracy and anchor cos in the alignment ablation table:
# (column stem, per-step metric, label).
ALIGNMENT_COLUMNS = (("cos_true", "cos_true", "cos true"), ("margin", "margin", "margin"),
                     ("gap", "gap", "gap"))
HM_NOTE = ("HM (PERL conv.) = mean of per-dataset HMs (each the mean of per-seed HMs); "
           "HM (CoOp conv.) = HM(Avg Base, Avg Novel).")


def b2n_columns(with_cos: bool = False) -> list[Column]:
    cols = [
        Column("base", "Base", help="base-class accuracy (%), mean over seeds"),
        Column("novel", "Novel", help="novel-class accuracy (%), mean over seeds"),
        Column("hm", "HM (PERL conv.)",
               help="per dataset: mean of per-seed HMs; average: mean of per-dataset HMs"),
        Column("hm_coop", "HM (CoOp conv.)",
               help="per dataset: HM of mean Base, mean Novel; average: HM(Avg Base, Avg Novel)"),
    ]
    if with_cos:
        cols += [Column("base_anchor_cos", "anchor cos (base)", 4, "none"),
                 Column("novel_anchor_cos", "anchor cos (novel)", 4, "none")]
        cols += [Column(f"{ev}_{stem}", f"{label} ({ev}, step K)", 4, "none",
                        help=f"{ev} set at each run's final step K, mean over seeds / "
                             "datasets (definitions: docs/method.md)")
                 for ev in ("base", "novel") for stem, _m, label in ALIGNMENT_COLUMNS]
    return cols


def b2n_cells(pool: Pool, keys: list[Key], with_cos: bool = False) -> dict[str, Cell]:
    cells = {"base": cell_over(pool, keys, metric("base/acc")),
             "novel": cell_over(pool, keys, metric("novel/acc")),
             "hm": cell_over(pool, keys, seed_hm)}
    if with_cos:
        cells.update({f"{ev}_anchor_cos": cell_over(pool, keys, metric(f"{ev}/anchor_cos"))
                      for ev in ("base", "novel")})
        cells.update({f"{ev}_{stem}": cell_over(pool, keys, final_step_metric(f"{ev}/{m}"))
                      for ev in ("base", "novel") for stem, m, _l in ALIGNMENT_COLUMNS})
    cells["hm_coop"] = hm_of_cells(cells["base"], cells["novel"])
    return cells


def average_comparability(pool: Pool, keys: list[Key], paper_set: tuple[str, ...]) -> str:
    """'' when our average covers exactly the paper's datasets, else why Δ is not computed."""
    ours = {ref.paper_dataset(str(kget(k, "dataset"))) for k in keys if pool.finished_seeds(k)}
    if ours == set(paper_set):
        return ""
    return (f"not compared: ours averages {len(ours)} dataset(s), the paper's average is over "
            f"the {len(paper_set)} of its suite")


def _step0_cells(pool: Pool, keys: list[Key]) -> dict[str, Cell]:
    """Step-0 (zero-shot) base / novel / HM cells of one dataset (one key) or their average."""
    def hm0(r: SeedRun) -> float | None:
        return hm(metric("base/acc_step0")(r), metric("novel/acc_step0")(r))

    return {"base0": cell_over(pool, keys, metric("base/acc_step0")),
            "novel0": cell_over(pool, keys, metric("novel/acc_step0")),
            "hm0": cell_over(pool, keys, hm0)}


def _table_1_5(view: SweepView) -> Table:
    # step 0 of the same runs is zero-shot CLIP: beside the paper's CLIP row (Table 1's are
    # CoCoOp's), the first place a wrong class-name file, split, preprocessing or template shows
    step0 = [Column("base0", "Base step 0", help="our zero-shot CLIP: base/acc_step0"),
             Column("novel0", "Novel step 0", help="our zero-shot CLIP: novel/acc_step0"),
             Column("hm0", "HM step 0", help="per seed HM(base/acc_step0, novel/acc_step0), "
                                             "averaged as HM (PERL conv.)")]
    return Table(name=f"table1_5_base2novel__{view.sweep}",
                 title=f"Tables 1/5 — base-to-novel, per dataset (sweep `{view.sweep}`)",
                 index=("dataset",), columns=b2n_columns() + step0, sweep=view.sweep,
                 paper_ref="PERL row of Table 5 per dataset, Table 1 averages; step-0 columns: "
                           "the CLIP row", plot="bars", x_label="dataset")


def _average_row(pool: Pool, view: SweepView, keys: list[Key], t: Table) -> Row:
    avg = {**b2n_cells(pool, keys), **_step0_cells(pool, keys)}
    if on_paper_data(view):
        why = average_comparability(pool, keys, ref.B2N_DATASETS)
        for m in ("base", "novel", "hm"):
            attach_paper(avg[m], "T1", "PERL", "average", m, why)
            attach_paper(avg[f"{m}0"], "T1", "CLIP", "average", m, why)
        if any(kget(k, "template") != "coop" for k in keys):
            t.notes.append("Step-0 columns: these runs prompt with the generic template; the "
                           "paper's CLIP row used CoOp's per-dataset templates, so Δ there mixes "
                           "in the template. The like-for-like check is `python -m pipeline.run "
                           "SWEEP.yaml --zero-shot-check` (its coop row).")
        if why:
            t.notes.append(f"Average row: paper value shown, Δ {why}.")
    return Row(label=("Average",), cells=avg, kind="average")


def table_base2novel(pool: Pool, view: SweepView) -> Table:
    """Tables 1 and 5: per dataset Base / Novel / HM (both conventions) and the averages, and
    our step 0 (zero-shot CLIP) beside the paper's CLIP row."""
    datasets = list(view.datasets)
    if on_paper_data(view):  # the paper's suite: datasets not run yet are shown as missing
        datasets = dataset_order(datasets + [d for d in ref.B2N_DATASETS
                                             if d not in {ref.paper_dataset(x) for x in datasets}])
    keys = keys_for_datasets(view, datasets)
    t = _table_1_5(view)
    for d, k in zip(datasets, keys):
        cells = {**b2n_cells(pool, [k]), **_step0_cells(pool, [k])}
        p = ref.paper_dataset(d)
        for m in ("base", "novel", "hm"):
            attach_paper(cells[m], "T5", "PERL", p, m)
            attach_paper(cells[f"{m}0"], "T5", "CLIP", p, m)
        t.rows.append(Row(label=(d,), cells=cells, x=d))
    t.rows.append(_average_row(pool, view, keys, t))
    t.counts = count_cells(pool, keys, view.seeds)
    t.notes += [
        "HM (PERL conv.): per dataset the mean of per-seed HMs, Average = mean of the per-dataset"
        " HMs (the paper's Avg HM convention).",
        "HM (CoOp conv.): per dataset HM(mean Base, mean Novel), Average = HM(Avg Base, Avg "
        "Novel); the paper prints no PERL number in this convention.",
    ] + settings_note(view)
    return t
