"""One self-contained HTML report of an aggregation (`report.html`): inline CSS, plots embedded as
base64 data URIs, no scripts and no network access needed to read it.

Every rebuilt table shows ours beside the paper's number with the difference coloured (green:
ours better, red: worse, by the metric's direction), missing cells as `—` and failed cells as
FAILED, and for each number the MLflow runs it came from. Run ids become links to the MLflow UI
(`<ui>/#/experiments/<exp>/runs/<run>?workflowType=machine_learning`) when `ui_url` is given or
the tracking URI is http(s).
"""

from __future__ import annotations

import base64
import html
import math
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from pipeline.aggregate.result import Result
from pipeline.tables import Cell, Table, fmt_diff, fmt_ours, fmt_paper, footnotes

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;
max-width:1400px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:36px}
h3{font-size:15px;margin-top:28px}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;vertical-align:top}
th{background:#f3f3f3}td.lbl{text-align:left;font-weight:500}
tr.average td{background:#fafafa;font-weight:600;border-top:2px solid #999}
td.paper{color:#555;background:#f8f8ff}td.good{background:#dff5df;color:#135e13}
td.bad{background:#fbe0e0;color:#8a1515}td.failed{background:#fbe0e0;color:#8a1515;font-weight:700}
td.missing{color:#999}td.nc{color:#888;font-style:italic}
.small{font-size:11px;color:#666}details{font-size:10px;color:#666;text-align:left}
details a{margin-right:4px}.counts{font-size:12px;color:#333;margin:4px 0}
.warn{background:#fff6d6;border:1px solid #e6c200;padding:6px 10px;font-size:12px}
img{max-width:100%;border:1px solid #eee;margin:8px 0}ul.notes{font-size:12px;color:#444}
.legend span{display:inline-block;padding:1px 6px;margin-right:6px;border:1px solid #ddd}
"""


def ui_base(tracking_uri: str, ui_url: str | None) -> str | None:
    """Where the MLflow UI lives: --ui-url, else the tracking URI if it is an http(s) server.
    Credentials in the URI are dropped (never put into a report)."""
    url = ui_url or (tracking_uri if tracking_uri.startswith(("http://", "https://")) else None)
    if not url:
        return None
    p = urlsplit(url)
    host = p.hostname or ""
    if p.port:
        host += f":{p.port}"
    return urlunsplit((p.scheme, host, p.path.rstrip("/"), "", ""))


# The MLflow 3 UI (checked on 3.17) shows a run inside its GenAI navigation (Traces, Judges,
# Prompts; breadcrumb "Evaluations") unless the link selects the model-training workflow; a UI
# without that switch ignores the query.
UI_RUN_QUERY = "?workflowType=machine_learning"


def run_link(run_id: str, exp_id: str | None, base: str | None) -> str:
    short = html.escape(run_id[:8])
    if base and exp_id:
        href = f"{base}/#/experiments/{exp_id}/runs/{run_id}{UI_RUN_QUERY}"
        return f'<a href="{html.escape(href)}" title="{html.escape(run_id)}">{short}</a>'
    return f'<span title="{html.escape(run_id)}">{short}</span>'


def _diff_class(cell: Cell, better: str) -> str:
    d = cell.diff
    if d is None:
        return "nc" if cell.paper is not None and cell.status == "ok" else "missing"
    if better == "none" or abs(d) < 0.005:
        return ""
    good = d > 0 if better == "higher" else d < 0
    return "good" if good else "bad"


def _runs_html(cell: Cell, agg: Result, base: str | None) -> str:
    parts = []
    if cell.run_ids:
        links = " ".join(run_link(r, agg.run_experiment.get(r), base) for r in cell.run_ids)
        parts.append(f"<details><summary>runs ({len(cell.run_ids)})</summary>{links}</details>")
    if cell.failed_run_ids:
        links = " ".join(run_link(r, agg.run_experiment.get(r), base)
                         for r in cell.failed_run_ids)
        why = "; ".join(dict.fromkeys(cell.failure_reasons)) or "no status_detail"
        parts.append(f"<details><summary>failed ({len(cell.failed_run_ids)})</summary>"
                     f"{links}<br>{html.escape(why)}</details>")
    return "".join(parts)


def table_html(t: Table, agg: Result, base: str | None, out: Path) -> str:
    esc = html.escape
    exp_n = max((c.n for r in t.rows for c in r.cells.values()), default=0)
    head = [f"<th>{esc(h)}</th>" for h in (*t.index, *t.info_columns)]
    for c in t.columns:
        tip = f' title="{esc(c.help)}"' if c.help else ""
        if t.has_paper(c.key):
            head += [f"<th{tip}>{esc(c.label)}<br>ours</th>", f"<th>{esc(c.label)}<br>paper</th>",
                     f"<th>Δ {esc(c.label)}<br>ours − paper</th>"]
        else:
            head.append(f"<th{tip}>{esc(c.label)}<br>ours</th>")
    # Provenance once per row when every cell of the row comes from the same runs (the usual
    # case), else under each cell.
    shared = all(len({(c.run_ids, c.failed_run_ids) for c in r.cells.values()}) <= 1
                 for r in t.rows)
    if shared:
        head.append("<th>MLflow runs</th>")
    body = []
    for r in t.rows:
        tds = [f'<td class="lbl">{esc(x)}</td>' for x in r.label]
        tds += [f'<td class="lbl">{esc(r.info.get(k, ""))}</td>' for k in t.info_columns]
        for c in t.columns:
            cell = r.cells.get(c.key, Cell())
            cls = {"ok": "", "failed": "failed", "missing": "missing"}[cell.status]
            tip = "; ".join(x for x in (cell.note, f"n={cell.n}" if cell.n else "") if x)
            note = f"<br><span class=small>{esc(cell.note)}</span>" if cell.note else ""
            tds.append(f'<td class="{cls}" title="{esc(tip)}">'
                       f"{esc(fmt_ours(cell, c.decimals, exp_n))}{note}"
                       f"{'' if shared else _runs_html(cell, agg, base)}</td>")
            if t.has_paper(c.key):
                ptip = esc(cell.paper_note)
                tds.append(f'<td class="paper" title="{ptip}">{esc(fmt_paper(cell))}</td>')
                dtip = esc(cell.no_diff_reason)
                tds.append(f'<td class="{_diff_class(cell, c.better)}" title="{dtip}">'
                           f"{esc(fmt_diff(cell, c.decimals))}</td>")
        if shared:
            first = next(iter(r.cells.values()), Cell())
            tds.append(f'<td class="lbl">{_runs_html(first, agg, base)}</td>')
        body.append(f'<tr class="{r.kind}">' + "".join(tds) + "</tr>")
    notes = "".join(f"<li>{esc(n)}</li>" for n in footnotes(t))
    imgs = "".join(_img(out / name, name) for name in t.plots)
    return (f'<h3 id="{esc(t.name)}">{esc(t.title)}</h3>'
            f'<div class="counts">Cells: {esc(t.counts.line())}. Files: <code>{esc(t.name)}'
            f".md / .csv / .tex</code></div>"
            f"<table><thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"
            f'<ul class="notes">{notes}</ul>{imgs}')


def _img(path: Path, name: str) -> str:
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<div><img alt="{html.escape(name)}" src="data:image/png;base64,{data}"></div>'


def _runs_section(agg: Result, base: str | None) -> str:
    df = agg.runs
    if not len(df):
        return "<p>No runs.</p>"
    esc = html.escape
    cols = [("experiment", "experiment"), ("tags.sweep", "sweep"), ("params.protocol", "protocol"),
            ("params.dataset", "dataset"), ("params.seed", "seed"), ("status", "status"),
            ("resolution", "used as"), ("tags.status_detail", "status_detail")]
    cols = [(c, lab) for c, lab in cols if c in df.columns]
    head = "<th>run</th>" + "".join(f"<th>{esc(lab)}</th>" for _, lab in cols)
    rows = []
    order = df.sort_values([c for c in ("experiment", "tags.sweep", "params.dataset")
                            if c in df.columns], na_position="last")
    for _, r in order.iterrows():
        tds = [f'<td class="lbl">{run_link(r["run_id"], r["experiment_id"], base)}</td>']
        for c, _lab in cols:
            v = r.get(c)
            s = "" if v is None or (isinstance(v, float) and math.isnan(v)) or str(v) in (
                "<NA>", "nan", "None") else str(v)
            cls = "failed" if c == "status" and s == "FAILED" else "lbl"
            tds.append(f'<td class="{cls}">{esc(s)}</td>')
        rows.append("<tr>" + "".join(tds) + "</tr>")
    return (f"<details><summary>{len(df)} run(s) read (click to expand)</summary>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
            "</details>")


def render(agg: Result, out: Path, ui_url: str | None = None) -> str:
    """The report as one HTML string; the PNGs named by the tables are read from `out`."""
    esc = html.escape
    base = ui_base(agg.tracking_uri, ui_url)
    c = agg.counts
    sections = {"tables": "Rebuilt tables", "dynamics": "Per-step dynamics",
                "detail": "Per-dataset detail", "search": "Hyper-parameter search (Optuna)"}
    toc, parts = [], []
    for sec, title in sections.items():
        ts = [t for t in agg.tables if t.section == sec]
        if not ts:
            continue
        parts.append(f'<h2 id="sec-{sec}">{esc(title)}</h2>')
        toc.append(f'<li><a href="#sec-{sec}">{esc(title)}</a><ul>' + "".join(
            f'<li><a href="#{esc(t.name)}">{esc(t.title)}</a></li>' for t in ts) + "</ul></li>")
        parts += [table_html(t, agg, base, out) for t in ts]
    warn = "".join(f'<div class="warn">{esc(w)}</div>' for w in agg.warnings)
    empty = "" if agg.tables else (
        '<div class="warn">No trial runs found (runs with a <code>config_hash</code> tag, '
        "phase <code>final</code>): nothing to rebuild yet.</div>")
    links_note = (f"Run ids link to the MLflow UI at {esc(base)}." if base else
                  "Run ids are shown without links (the tracking URI is not an http(s) server; "
                  "pass --ui-url to link them).")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>PERL reproduction: rebuilt tables</title>
<style>{_CSS}</style></head><body>
<h1>PERL reproduction: rebuilt tables</h1>
<p class="small">Generated {esc(time.strftime('%Y-%m-%d %H:%M:%S %Z'))} by
<code>python -m pipeline.aggregate</code> from the tracking store
<code>{esc(agg.store)}</code>; experiments:
{esc(', '.join(sorted(agg.experiments.values())) or 'none')}.</p>
<p>Our numbers are means ± sample std over seeds of FINISHED MLflow runs (one per config hash,
the latest). <b>Paper</b> columns are the numbers printed in arXiv 2605.18464v1, shown for
reference only; Δ = ours − paper. {links_note}</p>
<p class="legend"><span class="good" style="background:#dff5df">Δ better than paper</span>
<span style="background:#fbe0e0">Δ worse / FAILED</span><span>— not run</span>
<span>n/c not comparable</span><span>~ read off a figure</span></p>
<div class="counts"><b>All tables:</b> {esc(c.line())}.</div>
{warn}{empty}
<ul>{''.join(toc)}<li><a href="#sec-runs">Runs</a></li></ul>
{''.join(parts)}
<h2 id="sec-runs">Runs</h2>
{_runs_section(agg, base)}
</body></html>
"""


def write_report(agg: Result, out: Path, ui_url: str | None = None) -> Path:
    """Write `out/report.html` (plots must already be in `out`)."""
    path = out / "report.html"
    path.write_text(render(agg, out, ui_url), encoding="utf-8")
    return path


__all__ = ["render", "write_report", "ui_base", "run_link", "table_html"]
