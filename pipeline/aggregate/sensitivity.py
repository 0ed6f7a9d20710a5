"""The sensitivity table: a base-to-novel sweep whose arms each change one unstated choice
(`sweeps/sensitivity.yaml`), each arm against the first (the reference)."""

from __future__ import annotations

from pipeline import reference as ref
from pipeline.aggregate.b2n import average_comparability, b2n_cells, b2n_columns
from pipeline.aggregate.pooling import (Metric, attach_paper, count_cells, metric, sample_std,
                                        seed_averages, seed_hm, seed_values)
from pipeline.aggregate.runs import Key, Pool, kget, seed_order
from pipeline.aggregate.views import (SweepView, arm_views, fmt_value, keys_for_datasets,
                                      on_paper_data, settings_note)
from pipeline.tables import Cell, Column, Row, Table

_DELTA_OF = (("base", metric("base/acc")), ("novel", metric("novel/acc")), ("hm", seed_hm))


def _delta_cell(pool: Pool, keys: list[Key], ref_keys: list[Key], ours: Cell, reference: Cell,
                fn: Metric) -> Cell:
    """ours − reference: the difference of the two averages shown in the table; ± = std over the
    seeds both have of the per-seed differences. Not computed (note) when the two averages cover
    different datasets."""
    if ours.status != "ok" or reference.status != "ok":
        return Cell(n_failed=ours.n_failed, failed_run_ids=ours.failed_run_ids,
                    failure_reasons=ours.failure_reasons)
    mine = {kget(k, "dataset") for k in keys if seed_values(pool, k, fn)}
    theirs = {kget(k, "dataset") for k in ref_keys if seed_values(pool, k, fn)}
    if mine != theirs:
        return Cell(note=f"not compared: {len(mine)} vs {len(theirs)} dataset(s) with results")
    a, b = seed_averages(pool, keys, fn), seed_averages(pool, ref_keys, fn)
    paired = [a[s] - b[s] for s in sorted(set(a) & set(b), key=seed_order)]
    return Cell(mean=ours.mean - reference.mean, std=sample_std(paired), n=len(paired),
                run_ids=ours.run_ids)


def _sensitivity_tables(view: SweepView, reference: str) -> tuple[Table, Table]:
    cols = b2n_columns() + [
        Column(f"delta_{m}", f"Δ {label} vs {reference}", better="higher",
               help=f"this arm's average − the {reference} arm's; ± over seeds of the paired "
                    f"per-seed differences")
        for m, label in (("base", "Base"), ("novel", "Novel"), ("hm", "HM (PERL conv.)"))]
    t = Table(name=f"sensitivity__{view.sweep}",
              title=f"Sensitivity to unstated choices — each arm against `{reference}` (sweep "
                    f"`{view.sweep}`, base-to-novel averages over {len(view.datasets)} "
                    f"dataset(s))",
              index=("arm",), columns=cols, sweep=view.sweep, info_columns=("changes",),
              plot="bars", x_label="arm",
              paper_ref="T1 PERL average (beside every arm: each is a candidate reading)")
    detail = Table(name=f"detail_sensitivity__{view.sweep}",
                   title=f"Per-dataset detail of the sensitivity table (sweep `{view.sweep}`)",
                   index=("arm", "dataset"), columns=b2n_columns(), sweep=view.sweep,
                   section="detail")
    return t, detail


def _sensitivity_notes(t: Table, view: SweepView, reference: str) -> None:
    t.notes += [f"Rows: the sweep's arms; each changes the settings in `changes` against the "
                f"`{reference}` arm (the first). Δ = this arm's average − {reference}'s: which "
                f"unstated choice moves the numbers, and by how much.",
                f"Datasets averaged: {', '.join(view.datasets)}. HM (PERL conv.) = mean of "
                f"per-dataset HMs; HM (CoOp conv.) = HM(Avg Base, Avg Novel)."]
    if t.any_paper:
        t.notes.append("Paper: Table 1's PERL average beside every arm; the paper does not say "
                       "which of these readings it used.")
    t.notes += settings_note(view)


def table_sensitivity(pool: Pool, view: SweepView) -> tuple[Table, Table]:
    """A base-to-novel sweep whose arms each change one setting: per arm Base / Novel / HM
    averaged over the sweep's datasets, and each arm − the first arm (the reference, `default`).
    Also returns the per-dataset detail."""
    groups = arm_views(view)
    reference = groups[0][0]
    t, detail = _sensitivity_tables(view, reference)
    ref_keys = keys_for_datasets(groups[0][1], view.datasets)
    ref_cells = b2n_cells(pool, ref_keys)
    all_keys: list[Key] = []
    for arm, sub in groups:
        keys = keys_for_datasets(sub, view.datasets)
        all_keys += keys
        cells = b2n_cells(pool, keys) if arm != reference else ref_cells
        for m, fn in _DELTA_OF:
            cells[f"delta_{m}"] = _delta_cell(pool, keys, ref_keys, cells[m], ref_cells[m], fn)
        if on_paper_data(view):
            why = average_comparability(pool, keys, ref.B2N_DATASETS)
            for m in ("base", "novel", "hm"):
                attach_paper(cells[m], "T1", "PERL", "average", m, why)
        # what the arm changes against the reference: the fields whose values differ
        changed = [f"{f}={fmt_value(kget(sub.template(), f))}" for f in view.axis
                   if kget(sub.template(), f) != kget(groups[0][1].template(), f)]
        t.rows.append(Row(label=(arm,), cells=cells, x=arm,
                          info={"changes": ", ".join(changed) or "(reference)"}))
        for d, k in zip(view.datasets, keys):
            detail.rows.append(Row(label=(arm, d), cells=b2n_cells(pool, [k])))
    t.counts = count_cells(pool, list(dict.fromkeys(all_keys)), view.seeds)
    detail.counts = t.counts
    detail.notes = ["Per dataset: mean ± std over seeds; no paper numbers exist at this level."]
    _sensitivity_notes(t, view, reference)
    return t, detail
