"""PNG plots of rebuilt tables (matplotlib, Agg backend: no display needed).

Conventions in every plot: ours = solid line / filled bar with error bars (sample std over seeds);
the paper's number = dashed line with hollow markers (curves) or a black tick (bars), labelled
"paper"; a cell whose runs all failed = a red x on the axis, labelled FAILED. Missing cells are
simply absent.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the aggregator runs on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.tables import Cell, Table  # noqa: E402

_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
            "#7f7f7f", "#bcbd22", "#17becf"]
# Columns that are plotted (the CoOp-convention HM is derived from Base/Novel and would only
# crowd the figure; it stays in the tables).
_SKIP = {"hm_coop", "base_anchor_cos", "novel_anchor_cos"}
# The alignment ablation's image-text columns (cosines, not accuracies): a panel of their own.
_ALIGN_SUFFIXES = ("_cos_true", "_margin", "_gap")


def _ok(c: Cell | None) -> bool:
    return c is not None and c.status == "ok"


def _err(c: Cell) -> float:
    return 0.0 if c.std is None or math.isnan(c.std) else c.std


def _plot_ours_and_paper(ax, pts, colour, label: str, paper_label: str,
                         alpha: float = 1.0) -> None:
    """Ours as points with seed error bars, the paper's values as a dashed line, one colour."""
    ours = [(x, c) for x, c in pts if _ok(c)]
    if ours:
        ax.errorbar([x for x, _ in ours], [c.mean for _, c in ours],
                    yerr=[_err(c) for _, c in ours], fmt="o-", color=colour, capsize=3,
                    label=f"{label} (ours)")
    paper = [(x, c.paper) for x, c in pts if c is not None and c.paper is not None]
    if paper:
        ax.plot([x for x, _ in paper], [v for _, v in paper], "s--", color=colour,
                mfc="none", alpha=alpha, label=f"{label} ({paper_label})")


def _title(t: Table, width: int = 90) -> str:
    return "\n".join(textwrap.wrap(t.title, width) + [t.counts.line()])


def _series(t: Table, keys: list[str] | None = None):
    # differences between rows (delta_*, the sensitivity table) are not accuracies: not drawn
    cols = [c for c in t.columns if (keys is None and c.key not in _SKIP
                                     and not c.key.startswith("delta_")
                                     and not c.key.endswith(_ALIGN_SUFFIXES)) or
            (keys is not None and c.key in keys)]
    return cols


def _curve_panel(ax, t: Table, cols, ylabel: str) -> None:
    failed_x = []
    # a table with arms (first index "arm") has one curve per arm and column
    arms = list(dict.fromkeys(r.label[0] for r in t.rows)) if t.index[:1] == ("arm",) else [None]
    i = 0
    for arm in arms:
        for col in cols:
            pts = [(r.x, r.cells.get(col.key)) for r in t.rows
                   if r.kind == "data" and (arm is None or r.label[0] == arm)]
            _plot_ours_and_paper(ax, pts, _COLOURS[i % len(_COLOURS)],
                                 col.label if arm is None else f"{arm} {col.label}", "paper",
                                 alpha=0.8)
            failed_x += [x for x, c in pts if c is not None and c.status == "failed"]
            i += 1
    if failed_x:
        lo = ax.get_ylim()[0]
        ax.plot(sorted(set(failed_x)), [lo] * len(set(failed_x)), "x", color="red", ms=10, mew=2,
                label="FAILED", clip_on=False)
    ax.set_xlabel(t.x_label or "/".join(t.index))
    ax.set_ylabel(ylabel)
    xs = [r.x for r in t.rows if isinstance(r.x, (int, float))]
    if xs and all(float(x).is_integer() for x in xs):
        ax.set_xticks(sorted(set(xs)))
    if xs and min(xs) > 0 and max(xs) / min(xs) > 100:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_curve(t: Table, path: Path) -> Path:
    cos = [c.key for c in t.columns if c.key.endswith("anchor_cos")]
    panels = [(_series(t), "accuracy / HM (%)")]
    if cos:
        panels.append((_series(t, cos), "cos(zero-shot, refined image emb.)"))
    align = [c.key for c in t.columns if c.key.endswith(_ALIGN_SUFFIXES)]
    if align:
        panels.append((_series(t, align), "image-text cos / margin / gap (step K)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (cols, ylabel) in zip(axes[0], panels):
        _curve_panel(ax, t, cols, ylabel)
    fig.suptitle(_title(t), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(t: Table, path: Path) -> Path:
    cols = _series(t)
    rows = [r for r in t.rows]
    n = max(len(cols), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 0.8 * len(rows) * max(1, n / 2) + 2)),
                                    4.5))
    paper_labelled = failed_labelled = False
    for i, col in enumerate(cols):
        colour = _COLOURS[i % len(_COLOURS)]
        for j, r in enumerate(rows):
            c = r.cells.get(col.key)
            x = j - 0.4 + width * (i + 0.5)
            if _ok(c):
                ax.bar(x, c.mean, width, yerr=_err(c), color=colour, capsize=2,
                       label=f"{col.label} (ours)" if j == min(
                           k for k, rr in enumerate(rows) if _ok(rr.cells.get(col.key))) else None)
            elif c is not None and c.status == "failed":
                ax.plot(x, 0, "x", color="red", ms=9, mew=2,
                        label=None if failed_labelled else "FAILED")
                failed_labelled = True
            if c is not None and c.paper is not None:
                ax.plot(x, c.paper, "_", color="black", ms=max(6, 40 * width), mew=2,
                        label=None if paper_labelled else "paper")
                paper_labelled = True
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([" / ".join(r.label) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_xlabel(t.x_label or "/".join(t.index))
    ax.set_ylabel("accuracy / HM (%)")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    ax.set_title(_title(t, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_dynamics(tables: list[Table], path: Path) -> Path:
    """One panel per per-step metric table of a sweep: x = step, a line per evaluation set; the
    panels wrap in rows of four (nine metrics since issue 14), unused grid cells are hidden."""
    ncol = min(4, len(tables))
    nrow = -(-len(tables) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 4 * nrow), squeeze=False)
    for ax in axes.flat[len(tables):]:
        ax.set_visible(False)
    for ax, t in zip(axes.flat, tables):
        # rows are (varied values..., step): one line per group of varied values and column
        axis = t.index[:-1]
        groups = list(dict.fromkeys(r.label[:-1] for r in t.rows))
        i, failed_x = 0, []
        for g in groups:
            rows = [r for r in t.rows if r.label[:-1] == g]
            name = ", ".join(f"{f}={v}" for f, v in zip(axis, g))
            for col in t.columns:
                pts = [(r.x, r.cells.get(col.key)) for r in rows]
                label = f"{name} {col.label}" if name else col.label
                _plot_ours_and_paper(ax, pts, _COLOURS[i % len(_COLOURS)], label, "paper, ~")
                failed_x += [x for x, c in pts if c is not None and c.status == "failed"]
                i += 1
        if failed_x:  # on the lower edge, as in the curves (not at 0: it would rescale the axis)
            xs = sorted(set(failed_x))
            ax.plot(xs, [ax.get_ylim()[0]] * len(xs), "x", color="red", ms=9, mew=2,
                    label="FAILED", clip_on=False)
        metric = t.title.split(" — ", 1)[-1].split(" at steps")[0]
        ax.set_title(metric, fontsize=9)
        ax.set_xlabel("step k (0 = zero-shot)")
        ax.set_ylabel(metric)
        ax.set_xticks(sorted({r.x for r in t.rows}))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Per-step dynamics (sweep `{tables[0].sweep}`)\n{tables[0].counts.line()}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_drift(t: Table, path: Path) -> Path:
    """Fig. 5: one panel per evaluation set, x = step, per drift group its median KL (line) and
    interquartile range (band), log scale (the groups differ by orders of magnitude)."""
    sets = list(dict.fromkeys(c.key.rsplit("_", 1)[0] for c in t.columns))
    labels = {c.key.rsplit("_", 1)[0]: c.label.rsplit(" ", 1)[0] for c in t.columns}
    lead = t.index[:-2]  # varied fields, then group, step
    fig, axes = plt.subplots(1, len(sets), figsize=(5.5 * len(sets), 4.2), squeeze=False)
    for ax, ev in zip(axes[0], sets):
        lines = list(dict.fromkeys(r.label[:-1] for r in t.rows))
        for i, line in enumerate(lines):
            rows = [r for r in t.rows if r.label[:-1] == line]
            pts = [(r.x, r.cells.get(f"{ev}_q25"), r.cells.get(f"{ev}_q50"),
                    r.cells.get(f"{ev}_q75")) for r in rows]
            pts = [(x, lo, mid, hi) for x, lo, mid, hi in pts
                   if _ok(mid) and _ok(lo) and _ok(hi) and mid.mean > 0]
            if not pts:
                continue
            colour = _COLOURS[i % len(_COLOURS)]
            name = ", ".join(f"{f}={v}" for f, v in zip(lead, line[:-1]))
            ax.plot([p[0] for p in pts], [p[2].mean for p in pts], "o-", color=colour,
                    label=f"{name} {line[-1]}".strip())
            ax.fill_between([p[0] for p in pts], [max(p[1].mean, 1e-12) for p in pts],
                            [p[3].mean for p in pts], color=colour, alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(f"{labels[ev]}: KL(p_k || p_0), median and IQR", fontsize=9)
        ax.set_xlabel("step k")
        ax.set_xticks(sorted({r.x for r in t.rows}))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(_title(t, 130), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_all(tables: list[Table], out: Path,
             warnings: list[str] | None = None) -> dict[str, list[Path]]:
    """Draw every plottable table into `out`; returns table name -> PNG paths.

    A plot that fails is reported in `warnings` and skipped: the tables are the primary output
    and must not be lost to a drawing problem.
    """
    out.mkdir(parents=True, exist_ok=True)
    figures: dict[str, list[Path]] = {}
    jobs = []
    dyn: dict[str, list[Table]] = {}
    for t in tables:
        if not any(c.status != "missing" or c.paper is not None
                   for r in t.rows for c in r.cells.values()):
            continue  # nothing to draw
        if t.plot == "curve":
            jobs.append((t.name, plot_curve, t, out / f"{t.name}.png"))
        elif t.plot == "bars":
            jobs.append((t.name, plot_bars, t, out / f"{t.name}.png"))
        elif t.plot == "dynamics":
            dyn.setdefault(t.name.split("__", 1)[-1], []).append(t)
        elif t.plot == "drift":
            jobs.append((t.name, plot_drift, t, out / f"{t.name}.png"))
    for suffix, ts in dyn.items():
        # one figure per sweep, attached to its first per-step table (the report shows it once)
        jobs.append((ts[0].name, plot_dynamics, ts, out / f"dynamics__{suffix}.png"))
    for name, fn, arg, path in jobs:
        try:
            figures[name] = [fn(arg, path)]
        except Exception as e:  # noqa: BLE001 - see docstring
            plt.close("all")
            if warnings is not None:
                warnings.append(f"plot {path.name} not drawn: {type(e).__name__}: {e}")
    return figures


def plot_search(study, stem: str, out: Path, source: str,
                warnings: list[str] | None = None) -> list[Path]:
    """Optuna's optimisation history and parameter importances of one search, drawn by
    `optuna.visualization.matplotlib` from `study` (persistent or rebuilt: `source` says which,
    in the title). Importances need two or more finished samples; a plot that fails is a
    warning (see draw_all)."""
    from optuna.visualization import matplotlib as ovm

    paths = []
    for suffix, fn in (("history", ovm.plot_optimization_history),
                       ("importance", ovm.plot_param_importances)):
        path = out / f"{stem}_{suffix}.png"
        try:
            ax = fn(study)
            ax.figure.set_size_inches(7, 4)
            ax.figure.text(0.01, -0.04, f"study {study.study_name} ({source})", fontsize=8)
            ax.figure.savefig(path, dpi=110, bbox_inches="tight")  # (the legend sits outside)
            paths.append(path)
        except Exception as e:  # noqa: BLE001 - see docstring
            if warnings is not None:
                warnings.append(f"plot {path.name} not drawn: {type(e).__name__}: {e}")
        finally:
            plt.close("all")
    return paths


__all__ = ["draw_all", "plot_curve", "plot_bars", "plot_dynamics", "plot_drift", "plot_search"]
