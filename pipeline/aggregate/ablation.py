"""Ablations over base-to-novel: Fig. 3a (inject_layer), Fig. 3b (num_steps), Table 3
(modality), Table 4 (loop variants, with `loop`'s readings), the alignment ablation
(anchor_weight) and any other field a sweep varies; rows = values of the sweep's axes (a block
per arm in a sweep with arms), cells = averages over the sweep's datasets."""

from __future__ import annotations

from typing import Any

from pipeline import reference as ref
from pipeline.aggregate.b2n import HM_NOTE, average_comparability, b2n_cells, b2n_columns
from pipeline.aggregate.loop import (LOOP_NOTE, PARAMS_OURS, PARAMS_PAPER, VARIANT_METHOD,
                                     param_count)
from pipeline.aggregate.pooling import attach_paper, count_cells
from pipeline.aggregate.runs import Key, Pool, kget
from pipeline.aggregate.views import (DEFAULTS, SweepView, arm_views, fmt_value,
                                      keys_for_datasets, on_paper_data, settings_note, text_j_of)
from pipeline.tables import Row, Table

MODALITY_METHOD = {"vision": "Vision only", "text": "Text only", "both": "PERL"}
_PAPER_AXIS_VALUES = {"num_steps": [1, 2, 3, 4, 5], "inject_layer": [6, 7, 8, 9, 10, 11],
                      "modality": ["vision", "text", "both"],
                      "variant": ["early", "deep", "shared", "step", "layer", "layerstep"]}
ABLATION_TITLES = {
    ("num_steps",): ("fig3b_num_steps", "Fig. 3b — number of reasoning steps K (num_steps)"),
    ("inject_layer",): ("fig3a_inject_layer", "Fig. 3a — injection layer J (inject_layer)"),
    ("modality",): ("table3_modality", "Table 3 — modality ablation"),
    ("variant",): ("table4_loop", "Table 4 — reasoning-loop configuration"),
    ("anchor_weight",): ("alignment_anchor_weight",
                         "Alignment ablation — anchor weight λ (anchor_weight)"),
}


def _paper_for_axis(axis: tuple[str, ...], values: dict[str, Any],
                    keys: list[Key] = ()) -> tuple[str, str] | None:
    """(paper table, method) of one ablation row, where the paper has that ablation. `keys`: the
    row's cells (Fig. 3a compares only rows whose text tower stays at the paper's J)."""
    if axis == ("num_steps",):
        return "F3b", f"PERL K={values['num_steps']}"
    if axis == ("inject_layer",):
        # the caption varies J "of the visual encoder"; Appendix A keeps the text J at 7
        if keys and any(text_j_of(k) != DEFAULTS.inject_layer for k in keys):
            return None
        return "F3a", f"PERL J={values['inject_layer']}"
    if axis == ("modality",):
        m = MODALITY_METHOD.get(values["modality"])
        return ("T3", m) if m else None
    if axis and axis[0] == "variant" and set(axis) <= {
            "variant", "inject_layer", "inject_layers", "text_inject_layer", "variant_projectors"}:
        m = VARIANT_METHOD.get(values["variant"])
        return ("T4", m) if m else None
    return None


def _ablation_combos(pool: Pool, view: SweepView, with_paper_rows: bool) -> list[tuple]:
    """The value combinations of `view.axis` that index an ablation's rows, in the paper's order;
    with `with_paper_rows`, the paper's values never run too (shown as missing)."""
    combos = list(dict.fromkeys(tuple(kget(k, f) for f in view.axis) for k in view.keys))
    if with_paper_rows and len(view.axis) == 1 and on_paper_data(view) and \
            view.axis[0] in _PAPER_AXIS_VALUES:
        seen = {c[0] for c in combos}
        combos += [(v,) for v in _PAPER_AXIS_VALUES[view.axis[0]] if v not in seen]
    order = _PAPER_AXIS_VALUES.get(view.axis[0]) if view.axis else None

    def rank(v: Any) -> tuple:
        return (0, v) if isinstance(v, (int, float)) else (1, str(v))
    combos.sort(key=lambda c: (order.index(c[0]) if order and c[0] in order else 99,
                               *(rank(v) for v in c)))
    return combos


def _ablation_tables(view: SweepView, axis: tuple[str, ...]) -> tuple[Table, Table]:
    """The empty main and per-dataset detail tables, titled after the paper's figure or table
    when the axis is one the paper ablates (or starts with the sweep's declared axis)."""
    arm_index = ("arm",) if view.arms else ()
    known = view.declared
    stem, title = ABLATION_TITLES.get(axis, ABLATION_TITLES.get(
        axis[:1] if known and axis[:1] == known[:1] else (),
        (f"ablation_{'_'.join(axis)}", f"Ablation over {', '.join(axis)}")))
    with_cos = "anchor_weight" in axis
    t = Table(name=f"{stem}__{view.sweep}",
              title=f"{title} (sweep `{view.sweep}`, base-to-novel averages over "
                    f"{len(view.datasets)} dataset(s))",
              index=arm_index + axis, columns=b2n_columns(with_cos), sweep=view.sweep,
              info_columns=(PARAMS_OURS, PARAMS_PAPER)
              if (axis[:1] == ("variant",) or axis == ("modality",)) else ())
    detail = Table(name=f"detail_{stem}__{view.sweep}",
                   title=f"Per-dataset detail of {title.split(' — ')[0]} (sweep `{view.sweep}`)",
                   index=arm_index + axis + ("dataset",), columns=b2n_columns(with_cos),
                   sweep=view.sweep, section="detail")
    return t, detail


def _ablation_row(pool: Pool, view: SweepView, axis: tuple[str, ...], arm: str | None,
                  combo: tuple, keys: list[Key], t: Table, paper_tables: set[str]) -> Row:
    """One row: the averages over the datasets, the paper's row where it has one, the params."""
    values = dict(zip(axis, combo))
    cells = b2n_cells(pool, keys, "anchor_weight" in axis)
    label = tuple(fmt_value(v) for v in combo)
    x = combo[0] if len(combo) == 1 else " / ".join(map(fmt_value, combo))
    row = Row(label=((arm,) if arm else ()) + label, cells=cells,
              x=x if arm is None or isinstance(x, (int, float)) else f"{arm} / {x}")
    target = _paper_for_axis(axis, values, keys) if on_paper_data(view) else None
    if target:
        why = average_comparability(pool, keys, ref.B2N_DATASETS)
        for m in ("base", "novel", "hm"):
            attach_paper(cells[m], target[0], target[1], "average", m, why)
        paper_tables.add(target[0])
        entry = ref.paper_entry(target[0], target[1], "average", "hm")
        if entry is not None:
            row.info[PARAMS_PAPER] = entry.params
    if t.info_columns:
        row.info[PARAMS_OURS] = param_count(pool, keys)
    return row


def _ablation_notes(t: Table, view: SweepView, axis: tuple[str, ...],
                    paper_tables: set[str]) -> None:
    if any(c.status == "ok" and c.paper is not None and c.no_diff_reason
           for r in t.rows for c in r.cells.values()):  # rows never run need no note
        t.notes.append("Δ not computed (n/c) where our average does not cover the paper's 11 "
                       "datasets: a partial average is not comparable to the paper's.")
    if "F3a" in paper_tables or "F3b" in paper_tables:
        t.notes.append("Fig. 3 values other than the default row are read off the plot (`~`).")
    if axis == ("inject_layer",) and on_paper_data(view):
        t.notes.append("Fig. 3a varies J \"of the visual encoder\": its values stand only beside "
                       "rows whose text tower stays at J=7 (text_inject_layer 7); rows where "
                       "the text J moves too (text_inject_layer -1, e.g. arm both_towers) have "
                       "no paper counterpart.")
    if axis[:1] == ("variant",):
        t.notes.append(LOOP_NOTE)
    if view.arms:
        t.notes.append(f"Rows: one block per arm of the sweep ({', '.join(view.arms)}); an arm "
                       f"is a labelled sub-grid (docs/sweeps.md). Fields set per arm: "
                       f"{', '.join(f for f in view.axis if f not in axis) or 'none'}.")
    t.notes += [f"Rows: values of {', '.join(axis)}; every other setting as in the sweep. "
                f"Datasets averaged: {', '.join(view.datasets)}.", HM_NOTE] + settings_note(view)


def _finish_ablation(t: Table, axis: tuple[str, ...], combos: list[tuple],
                     paper_tables: set[str]) -> None:
    """The plot kind, the info columns the rows filled and the paper reference."""
    numeric = len(axis) == 1 and all(
        isinstance(c[0], (int, float)) for c in combos if c[0] is not None)
    t.plot, t.x_label = ("curve" if numeric else "bars"), " / ".join(axis)
    if t.info_columns and all(r.info.get(PARAMS_PAPER, "") == "" for r in t.rows):
        t.info_columns = (PARAMS_OURS,)
    t.paper_ref = ", ".join(sorted(paper_tables)) + " (base-to-novel averages over 11 datasets)" \
        if paper_tables else ""


def table_b2n_ablation(pool: Pool, view: SweepView) -> tuple[Table, Table]:
    """An ablation over base-to-novel: rows = values of the varied field(s), cells = averages
    over the sweep's datasets. In a sweep with arms, a block of rows per arm (labelled by the
    arm; the fields only the arms set are named by it). Also returns the per-dataset detail."""
    groups = arm_views(view)
    axis = groups[0][1].axis
    t, detail = _ablation_tables(view, axis)
    all_keys: list[Key] = []
    paper_tables: set[str] = set()
    all_combos = []
    for gi, (arm, sub) in enumerate(groups):
        # the paper's rows never run go to the first arm only: the sweep's main reading
        combos = _ablation_combos(pool, sub, with_paper_rows=gi == 0)
        all_combos += combos
        for combo in combos:
            keys = keys_for_datasets(sub, view.datasets, **dict(zip(axis, combo)))
            all_keys += keys
            row = _ablation_row(pool, view, axis, arm, combo, keys, t, paper_tables)
            t.rows.append(row)
            for d, k in zip(view.datasets, keys):
                detail.rows.append(Row(label=row.label + (d,), cells=b2n_cells(
                    pool, [k], "anchor_weight" in axis)))
    _finish_ablation(t, axis, all_combos, paper_tables)
    _ablation_notes(t, view, axis, paper_tables)
    t.counts = count_cells(pool, list(dict.fromkeys(all_keys)), view.seeds)
    detail.counts = t.counts
    detail.notes = ["Per dataset: mean ± std over seeds; no paper numbers exist at this level."]
    return t, detail
