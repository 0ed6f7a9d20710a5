"""Per-step dynamics: accuracy, confidence, Brier, KL, input Jacobian and image-text alignment
at steps 0..K (each as the mean over datasets and pooled over test images, Fig. 7's
convention), and Fig. 5's drift groups."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from perl_core.metric_names import DRIFT_GROUPS, DRIFT_QUANTILES
from pipeline import reference as ref
from pipeline.aggregate.pooling import (attach_paper, cell_over, cell_pooled, count_cells,
                                        metric)
from pipeline.aggregate.runs import Key, Pool, SeedRun, kget
from pipeline.aggregate.transfer import target_names
from pipeline.aggregate.views import (SweepView, fmt_value, is_default, keys_for_datasets,
                                      on_paper_data)
from pipeline.tables import Cell, Column, Row, Table

STEP_METRICS = (("acc", "accuracy (%)", 2, "higher"), ("confidence", "confidence", 2, "higher"),
                ("brier", "Brier score", 4, "lower"), ("kl", "KL from step 0", 4, "none"),
                ("jacobian", "input Jacobian norm", 3, "none"),
                ("cos_true", "cos(image, own class text)", 4, "none"),
                ("cos_wrong", "cos(image, nearest wrong class text)", 4, "none"),
                ("margin", "cos margin (own - nearest wrong)", 4, "none"),
                ("gap", "modality gap", 4, "none"))
# The metrics Fig. 7 prints (pipeline.reference's F7 rows).
F7_METRICS = ("acc", "confidence", "brier", "jacobian")
Group = tuple[tuple, list[Key], int]  # (axis values, cell keys, K) of one block of step rows


def _max_step(pool: Pool, keys: list[Key]) -> int:
    ks = [-1]
    for k in keys:
        for r in pool.finished_seeds(k).values():
            for m in r.metrics:
                if "_step" in m and m.split("_step")[-1].isdigit():
                    ks.append(int(m.split("_step")[-1]))
    return max(ks)


def _value_rank(v: Any) -> tuple:
    return (v is None, not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else 0,
            str(v))


def _dynamics_groups(pool: Pool, view: SweepView) -> list[Group]:
    """(axis values, cell keys, K) per row group of the dynamics tables; none when no run logged
    a step past 0 (zero-shot alone has no dynamics).

    No varied axis: one group, every key of the sweep, K = the largest step any run logged.
    Otherwise one group per axis combination the sweep ran (any status), with the key of each of
    the sweep's datasets (unrun ones included, so a partial average says so) and its own K; a
    combination whose runs all failed gets K = its num_steps, so its FAILED cells are shown."""
    if not view.axis:
        K = _max_step(pool, list(view.keys))
        return [((), list(view.keys), K)] if K >= 1 else []
    combos = sorted(dict.fromkeys(tuple(kget(k, f) for f in view.axis) for k in view.keys),
                    key=lambda c: tuple(_value_rank(v) for v in c))
    logged = []  # (combo, keys, the largest step its runs logged)
    for combo in combos:
        keys = keys_for_datasets(view, view.datasets, **dict(zip(view.axis, combo)))
        logged.append((combo, keys, _max_step(pool, keys)))
    if max((K for _, _, K in logged), default=-1) < 1:
        return []
    out = []
    for combo, keys, K in logged:
        if K < 0 and any(pool.failed_seeds(k) for k in keys):
            ks = {kget(k, "num_steps") for k in keys if pool.failed_seeds(k)}
            K = max((int(x) for x in ks if isinstance(x, (int, float))), default=-1)
        if K >= 0:
            out.append((combo, keys, K))
    return out


def _is_default_combo(view: SweepView, combo: tuple) -> bool:
    """Whether an ablation row is the paper's default PERL setting (what Fig. 7 plots)."""
    return all(is_default(f, v) for f, v in zip(view.axis, combo))


@dataclass
class DynColumn:
    """One column of the dynamics tables: how its cell is computed from the runs."""
    key: str
    label: str
    kind: str  # "set": one evalset, mean over datasets; "targets": mean over targets; "pooled"
    evalset: str = ""  # kind "set"; kind "pooled" of base2novel: the evalset pooled over datasets
    f7: str | None = None  # Fig. 7's setting tag (the paper compares its pooled columns only)
    f7_dataset: str | None = None


def _dynamics_columns(view: SweepView) -> tuple[list[DynColumn], tuple[str, ...]]:
    """The dynamics tables' columns for the view's protocol, and the paper's suite for Fig. 7."""
    if view.protocol == "base2novel":
        cols = []
        for ev in ("base", "novel"):
            tag = f"B2N-{ev}"
            cols += [DynColumn(ev, f"B2N {ev} (mean over datasets)", "set", ev),
                     DynColumn(f"{ev}_pooled", f"B2N {ev} (pooled)", "pooled", ev, tag,
                               "average")]
        return cols, ref.B2N_DATASETS
    if view.protocol in ("cross_dataset", "domain_generalization"):
        tag = "XD" if view.protocol == "cross_dataset" else "OOD"
        return [DynColumn("all", "source", "set", "all"),
                DynColumn("targets", f"{tag} targets (mean over targets)", "targets"),
                DynColumn("pooled", f"{tag} all images (pooled, source incl.)", "pooled", "",
                          tag, "target_average")], \
            ref.XD_TARGETS if view.protocol == "cross_dataset" else ref.DG_TARGETS
    return [DynColumn("all", "all classes", "set", "all")], ()


def _dynamics_cell(pool: Pool, keys: list[Key], col: DynColumn, name: str,
                   targets_by_key: dict[Key, list[str]], suite: tuple[str, ...]
                   ) -> tuple[Cell, str]:
    """The cell of one dynamics column for the per-step metric `name` (e.g. acc_step2), and why
    Fig. 7 is not compared with it ('' when its datasets are Fig. 7's; only pooled columns)."""
    if col.kind == "pooled":
        if col.evalset:  # base2novel: that evalset of every dataset
            cell, used = cell_pooled(pool, keys, lambda k: [col.evalset], name)
            got = {ref.paper_dataset(str(kget(k, "dataset"))) for k, _e in used}
            ok = got == set(suite)
        else:  # transfer: the source and every target of the model
            cell, used = cell_pooled(pool, keys, lambda k: ["all"] + targets_by_key.get(k, []),
                                     name)
            got = {ref.paper_dataset(e) for _k, e in used if e != "all"}
            ok = got == set(suite) and any(e == "all" for _k, e in used)
        return cell, "" if ok else "not compared: other test sets than Fig. 7's"
    if col.kind == "targets":
        def fn(run: SeedRun, _n=name) -> float | None:
            vals = [run.metrics[f"{x}/{_n}"] for x in targets_by_key.get(run.key, [])
                    if f"{x}/{_n}" in run.metrics]
            return statistics.fmean(vals) if vals else None
    else:
        fn = metric(f"{col.evalset}/{name}")
    return cell_over(pool, keys, fn), ""


def _step_table(view: SweepView, m: str, mlabel: str, dec: int, better: str, K: int,
                cols: list[DynColumn]) -> Table:
    per = f" per {', '.join(view.axis)}" if view.axis else ""
    return Table(name=f"dynamics_{m}__{view.sweep}",
                 title=f"Per-step dynamics — {mlabel} at steps 0..{K}{per} "
                       f"(sweep `{view.sweep}`)",
                 index=view.axis + ("step",), sweep=view.sweep,
                 columns=[Column(c.key, c.label, dec, better) for c in cols],  # type: ignore[arg-type]
                 paper_ref="Fig. 7 (read off the plot, steps 0 and 4 only)", section="dynamics",
                 plot="dynamics", x_label="step k")


def _step_rows(pool: Pool, view: SweepView, m: str, groups_k: list[Group],
               cols: list[DynColumn], targets_by_key: dict[Key, list[str]],
               suite: tuple[str, ...]) -> list[Row]:
    """Rows = steps 0..K of each group; Fig. 7's number beside the pooled columns of the
    paper's default setting."""
    rows = []
    for combo, keys, K_group in groups_k:
        with_paper = on_paper_data(view) and (not view.axis or _is_default_combo(view, combo))
        for step in range(K_group + 1):
            r = Row(label=tuple(fmt_value(v) for v in combo) + (str(step),), x=step)
            for col in cols:
                c, why = _dynamics_cell(pool, keys, col, f"{m}_step{step}", targets_by_key,
                                        suite)
                if col.f7 and with_paper and m in F7_METRICS:
                    attach_paper(c, "F7", f"PERL {col.f7} step {step}", col.f7_dataset, m, why)
                r.cells[col.key] = c
            rows.append(r)
    return rows


def _step_notes(t: Table, view: SweepView, m: str, cols: list[DynColumn]) -> None:
    t.notes.append("Per step k: the metric of the model after k thought steps (k=0 is "
                   "zero-shot CLIP); mean over datasets of the per-dataset seed means.")
    if any(c.kind == "pooled" for c in cols):
        t.notes.append("(pooled): Fig. 7's convention, every test image weighted once: per "
                       "seed sum n_e m_e / sum n_e over the evaluation sets e (n_e = its "
                       "test count; transfer: the source included), then mean over seeds. "
                       "Fig. 7 is compared with these columns only.")
    if m == "jacobian":
        t.notes.append("Jacobian: mean over a fixed subsample (jacobian_samples) of "
                       "||d logit_k(y) / d x||_2, x = the normalised pixels (docs/method.md).")
    if view.axis:
        t.notes.append(f"Rows: steps 0..K for each value of {', '.join(view.axis)} that the "
                       "sweep ran (K = the largest step its runs logged); datasets averaged: "
                       f"{', '.join(view.datasets)}.")
    if any(c.paper is not None for r in t.rows for c in r.cells.values()):
        t.notes.append("Fig. 7 values are pooled over test images: the XD and OOD tables' "
                       "per-dataset accuracies weighted by test-set size, source included, "
                       "give them (70.98 vs 71.0, 62.8 vs 62.3; PERL.md §8); B2N is read the"
                       " same way. Confidence is read as %, Brier in [0, 2].")
        if view.axis:
            t.notes.append("Fig. 7 values only beside the paper's default setting "
                           "(what Fig. 7 plots).")


def tables_dynamics(pool: Pool, view: SweepView) -> list[Table]:
    """Per-step metrics (steps 0..K) averaged over the sweep's datasets, one table per metric;
    rows = steps (per value of the varied field(s), if the sweep varies any), columns =
    evaluation sets, each as the mean over datasets and pooled over test images (Figs. 4/7);
    then the drift groups of Fig. 5 (`table_drift`)."""
    groups_k = _dynamics_groups(pool, view)
    if not groups_k:
        return []
    K = max(k for _, _, k in groups_k)
    cols, suite = _dynamics_columns(view)
    targets_by_key = {k: target_names(pool, view, str(kget(k, "dataset"))) for k in view.keys}
    all_keys = list(dict.fromkeys(k for _, keys, _ in groups_k for k in keys))
    out = []
    for m, mlabel, dec, better in STEP_METRICS:
        t = _step_table(view, m, mlabel, dec, better, K, cols)
        t.rows = _step_rows(pool, view, m, groups_k, cols, targets_by_key, suite)
        if not any(c.status != "missing" for r in t.rows for c in r.cells.values()):
            continue
        t.counts = count_cells(pool, all_keys, view.seeds)
        _step_notes(t, view, m, cols)
        out.append(t)
    drift = table_drift(pool, view, groups_k, cols, targets_by_key, all_keys)
    return out + ([drift] if drift is not None else [])


def table_drift(pool: Pool, view: SweepView, groups_k: list[Group], cols: list[DynColumn],
                targets_by_key: dict[Key, list[str]], all_keys: list[Key]) -> Table | None:
    """Fig. 5: the per-sample KL from step 0 split by correctness at step 0 -> step k; rows =
    (group, step 1..K), columns = the quartiles and the count per evaluation set. Quartiles do
    not pool across test sets, so every column is the mean over datasets (and over targets) of
    the per-set, per-seed quartile; None when no run logged the groups."""
    sets = [c for c in cols if c.kind != "pooled"]
    stats = [(f"q{q}", f"q{q}" if q != 50 else "median", 4) for q in DRIFT_QUANTILES] + \
        [("n", "n", 1)]
    t = Table(name=f"dynamics_drift__{view.sweep}",
              title=f"Prediction drift by group (Fig. 5) — KL(p_k || p_0) quartiles per step "
                    f"(sweep `{view.sweep}`)",
              index=view.axis + ("group", "step"), sweep=view.sweep, section="dynamics",
              columns=[Column(f"{c.key}_{st}", f"{c.label.split(' (')[0]} {lab}", dec, "none")
                       for c in sets for st, lab, dec in stats],
              paper_ref="Fig. 5 (qualitative: medians ~1e-2 stay correct, ~0.1-0.3 wrong to "
                        "correct)", plot="drift", x_label="step k")
    for combo, keys, K_group in groups_k:
        for g in DRIFT_GROUPS:
            for step in range(1, K_group + 1):
                r = Row(label=tuple(fmt_value(v) for v in combo) + (g, str(step)), x=step)
                for c in sets:
                    for st, _lab, _dec in stats:
                        name = f"n_{g}_step{step}" if st == "n" else f"kl_{g}_{st}_step{step}"
                        r.cells[f"{c.key}_{st}"] = _dynamics_cell(
                            pool, keys, c, name, targets_by_key, ())[0]
                t.rows.append(r)
    if not any(c.status == "ok" for r in t.rows for c in r.cells.values()):
        return None
    t.counts = count_cells(pool, all_keys, view.seeds)
    t.notes += ["Groups by the top-1 hit at step 0 -> step k: stay_correct, wrong_to_correct, "
                "correct_to_wrong, stay_wrong. Per run and test set: the quartiles (linear "
                "interpolation) of the per-sample KL(p_k || p_0) in nats, and the group's size n;"
                " then mean over seeds and over datasets (targets: over targets). An empty group"
                " has no quartiles (its n is 0)."]
    return t
