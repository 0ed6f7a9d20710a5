"""Rebuilt tables as data (`Table` of `Row`s of `Cell`s) and their Markdown / CSV / LaTeX forms.

A `Cell` is one of our numbers with its provenance: mean, std and n over seeds, the MLflow run ids
it came from, how many seeds FAILED, and (when the paper prints one) the paper's number beside it.
The three states are kept apart everywhere: a number, `FAILED (k)` when every run of the cell
failed, and `—` (missing) when nothing was run. A missing or failed cell never shows the paper's
number in our column.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Literal

MISSING = "—"
Better = Literal["higher", "lower", "none"]


@dataclass
class Cell:
    mean: float | None = None
    std: float | None = None  # sample std over seeds (ddof=1); None when n < 2
    n: int = 0  # seeds (FINISHED runs) behind `mean`
    n_failed: int = 0  # seeds of this cell that only have FAILED runs
    run_ids: tuple[str, ...] = ()  # FINISHED runs the number came from
    failed_run_ids: tuple[str, ...] = ()
    failure_reasons: tuple[str, ...] = ()
    paper: float | None = None  # the paper's printed number, reference only
    paper_text: str = ""  # the paper's digits as printed
    paper_approx: bool = False  # read off a figure
    paper_note: str = ""
    # Why a paper number is shown but not differenced (e.g. averages over other datasets).
    no_diff_reason: str = ""
    note: str = ""  # e.g. "2 of 11 datasets"

    @property
    def status(self) -> Literal["ok", "failed", "missing"]:
        if self.mean is not None and not math.isnan(self.mean):
            return "ok"
        return "failed" if self.n_failed else "missing"

    @property
    def diff(self) -> float | None:
        """ours - paper (the paper's ΔHM convention), when both exist and are comparable."""
        if self.status != "ok" or self.paper is None or self.no_diff_reason:
            return None
        return self.mean - self.paper


@dataclass
class Column:
    key: str
    label: str
    decimals: int = 2
    better: Better = "higher"  # which sign of ours - paper is good (for colouring)
    help: str = ""  # the convention behind the number, shown in notes / tooltips


@dataclass
class Row:
    label: tuple[str, ...]  # one entry per Table.index
    cells: dict[str, Cell] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)  # text columns (e.g. "#params")
    x: float | str | None = None  # plot position (numeric axis value or category)
    kind: Literal["data", "average"] = "data"


@dataclass
class Counts:
    expected: int = 0
    found: int = 0
    failed: int = 0

    @property
    def missing(self) -> int:
        return max(self.expected - self.found - self.failed, 0)

    def line(self) -> str:
        return (f"expected {self.expected} run cells, found {self.found} FINISHED, "
                f"{self.failed} FAILED, {self.missing} missing")


@dataclass
class Table:
    name: str  # file stem, e.g. "table5_base2novel__base2novel"
    title: str
    index: tuple[str, ...]  # headers of the row-label columns
    columns: list[Column]
    rows: list[Row] = field(default_factory=list)
    info_columns: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    sweep: str = ""
    paper_ref: str = ""  # which paper table/figure the reference columns come from
    plots: list[str] = field(default_factory=list)  # PNG file names drawn from this table
    section: str = "tables"  # "tables" | "dynamics" | "detail" (report grouping)
    # How pipeline.plots draws it: "curve" (numeric x), "bars" (categories), "dynamics", "".
    plot: str = ""
    x_label: str = ""

    def has_paper(self, key: str) -> bool:
        return any(r.cells.get(key, Cell()).paper is not None for r in self.rows)

    @property
    def any_paper(self) -> bool:
        return any(self.has_paper(c.key) for c in self.columns)


# --- formatting -----------------------------------------------------------------------------


def fmt_num(x: float | None, decimals: int = 2, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    s = f"{x:+.{decimals}f}" if sign else f"{x:.{decimals}f}"
    return s.replace("-", "−") if sign else s


def fmt_ours(c: Cell, decimals: int = 2, expected_n: int | None = None) -> str:
    """`72.95 ± 0.31`, with `(n=2)` when fewer seeds than expected, `FAILED (k)`, or `—`."""
    if c.status == "missing":
        return MISSING
    if c.status == "failed":
        return f"FAILED ({c.n_failed})"
    s = fmt_num(c.mean, decimals)
    if c.std is not None and not math.isnan(c.std):
        s += f" ± {c.std:.{decimals}f}"
    extra = []
    if expected_n is not None and c.n < expected_n:
        extra.append(f"n={c.n}")
    if c.n_failed:
        extra.append(f"{c.n_failed} FAILED")
    if extra:
        s += f" ({'; '.join(extra)})"
    return s


def fmt_paper(c: Cell) -> str:
    if c.paper is None:
        return MISSING
    return ("~" if c.paper_approx else "") + (c.paper_text or fmt_num(c.paper))


def fmt_diff(c: Cell, decimals: int = 2) -> str:
    d = c.diff
    if d is None:
        return "n/c" if (c.paper is not None and c.status == "ok" and c.no_diff_reason) \
            else MISSING
    # a difference to a value read off a figure is itself approximate
    return ("~" if c.paper_approx else "") + fmt_num(d, decimals, sign=True)


def _expected_n(t: Table) -> int:
    return max((c.n for r in t.rows for c in r.cells.values()), default=0)


def header_cells(t: Table) -> list[str]:
    hdr = list(t.index) + list(t.info_columns)
    for c in t.columns:
        if t.has_paper(c.key):
            hdr += [f"{c.label} (ours)", f"{c.label} (paper)", f"Δ {c.label}"]
        else:
            hdr.append(c.label)
    return hdr


def body_cells(t: Table, r: Row) -> list[str]:
    exp_n = _expected_n(t)
    out = list(r.label) + [r.info.get(k, "") for k in t.info_columns]
    for c in t.columns:
        cell = r.cells.get(c.key, Cell())
        out.append(fmt_ours(cell, c.decimals, exp_n))
        if t.has_paper(c.key):
            out += [fmt_paper(cell), fmt_diff(cell, c.decimals)]
    return out


def footnotes(t: Table) -> list[str]:
    notes = list(t.notes)
    if t.any_paper:
        notes.append("Paper columns: the numbers printed in the paper "
                     f"({t.paper_ref or 'see reference'}), reference only; Δ = ours − paper; "
                     "`~` = read off a figure (±0.3); `n/c` = not compared (see notes).")
    notes.append("Ours: mean ± sample std over seeds; `(n=k)` fewer seeds than the table's "
                 "maximum; `FAILED (k)`: every run of the cell failed; `—`: not run.")
    return notes


def to_markdown(t: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    hdr = header_cells(t)
    lines = [f"### {t.title}", "", "| " + " | ".join(esc(h) for h in hdr) + " |",
             "|" + "|".join("---" for _ in hdr) + "|"]
    for r in t.rows:
        cells = body_cells(t, r)
        if r.kind == "average":
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(esc(c) for c in cells) + " |")
    lines.append("")
    lines.append(f"Cells: {t.counts.line()}.")
    lines += [""] + [f"- {n}" for n in footnotes(t)]
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    """Machine-readable wide CSV: per column its mean, std, n, status, paper, diff and run ids."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    hdr = list(t.index) + list(t.info_columns) + ["row_kind"]
    for c in t.columns:
        hdr += [f"{c.key}", f"{c.key}_std", f"{c.key}_n", f"{c.key}_n_failed", f"{c.key}_status",
                f"{c.key}_paper", f"{c.key}_diff", f"{c.key}_run_ids", f"{c.key}_failed_run_ids"]
    w.writerow(hdr)

    def num(x: float | None) -> str:
        return "" if x is None or (isinstance(x, float) and math.isnan(x)) else repr(float(x))

    for r in t.rows:
        row = list(r.label) + [r.info.get(k, "") for k in t.info_columns] + [r.kind]
        for c in t.columns:
            cell = r.cells.get(c.key, Cell())
            row += [num(cell.mean) if cell.status == "ok" else
                    ("FAILED" if cell.status == "failed" else ""),
                    num(cell.std), cell.n, cell.n_failed, cell.status, num(cell.paper),
                    num(cell.diff), ";".join(cell.run_ids), ";".join(cell.failed_run_ids)]
        w.writerow(row)
    return buf.getvalue()


_TEX_ESC = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
            "_": r"\_", "{": r"\{", "}": r"\}", "~": r"$\sim$", "^": r"\^{}",
            "±": r"$\pm$", "−": "$-$", "—": "---", "Δ": r"$\Delta$", "×": r"$\times$"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_ESC.get(ch, ch) for ch in s)


def to_latex(t: Table) -> str:
    hdr = header_cells(t)
    lines = ["% generated by python -m pipeline.aggregate; paper columns are reference values",
             r"\begin{table}[t]", r"\centering", r"\small",
             r"\begin{tabular}{" + "l" * (len(t.index) + len(t.info_columns))
             + "r" * (len(hdr) - len(t.index) - len(t.info_columns)) + "}",
             r"\toprule", " & ".join(tex_escape(h) for h in hdr) + r" \\", r"\midrule"]
    for r in t.rows:
        cells = [tex_escape(c) for c in body_cells(t, r)]
        if r.kind == "average":
            lines.append(r"\midrule")
            cells[0] = r"\textbf{" + cells[0] + "}"
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + tex_escape(t.title) + ". " + tex_escape(t.counts.line()) + ".}",
              r"\label{tab:" + t.name.replace("_", "-") + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


__all__ = ["Cell", "Column", "Row", "Table", "Counts", "MISSING", "fmt_num", "fmt_ours",
           "fmt_paper", "fmt_diff", "to_markdown", "to_csv", "to_latex", "header_cells",
           "body_cells", "footnotes", "tex_escape"]
