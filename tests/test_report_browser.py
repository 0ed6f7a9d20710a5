"""`report.html` as a reader sees it: built by the real CLI, rendered by headless chromium.

A real MLflow SQLite store is filled with hand-made runs, `python -m pipeline.aggregate` runs as a
subprocess, and chromium opens the report through `file://`: the DOM it dumps must hold the
rebuilt tables (headers, rows, numbers, the FAILED and missing markers) and the plots as data-URI
images, and its screenshot must show content (not a blank or error page).

SYNTHETIC FIXTURE (tests/fake_runs.py): every metric value is invented (round numbers, easy to
average by hand). None is a result of PERL or of this project. Real dataset names are used only
so that the paper's reference columns appear beside them; the experiments are named `fixture/...`
so that a screenshot of this report can never be mistaken for results.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perl_core.config import TrainConfig

pytest.importorskip("mlflow")
import browser  # noqa: E402  (tests/browser.py)
from fake_runs import Store  # noqa: E402

# per-step curves steep enough to be seen in the screenshot
STEEP = {"confidence_slope": 5.0, "brier0": 0.6, "brier_slope": 0.05}

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]

FAILED_REASON = "fixture: NaN loss at step 7"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    browser.require_chromium()
    tmp = tmp_path_factory.mktemp("report")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    s = Store(uri, tmp)
    ids: dict = {}

    e1 = s.experiment("fixture/base2novel")
    s.b2n_sweep(e1, TrainConfig(protocol="base2novel", num_steps=2), ids, **STEEP)
    e2 = s.experiment("fixture/ablation_steps")
    s.steps_sweep(e2, ids, FAILED_REASON, per_step=True, **STEEP)

    out = tmp / "aggregate"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline.aggregate", "--tracking-uri", uri, "--out", str(out),
         "--no-log", "--quiet"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    html = out / "report.html"
    assert html.is_file()

    url = html.as_uri()
    t0 = time.monotonic()
    dom = browser.dump_dom(url)
    png = browser.screenshot(url, tmp / "report.png", size=(1400, 1800))
    return {"dom": dom, "png": png, "html": html, "ids": ids, "cli": proc.stdout,
            "browser_s": time.monotonic() - t0}


def _table(tables: list[dict], first_header: str, must_have_row: str) -> dict:
    hits = [t for t in tables if t["headers"] and t["headers"][0] == first_header
            and any(r and r[0] == must_have_row for r in t["rows"])]
    assert hits, f"no table with first column {first_header!r} and a row {must_have_row!r}; " \
                 f"tables: {[(t['headers'][:3], len(t['rows'])) for t in tables]}"
    return hits[0]


def _row(t: dict, label: str) -> dict[str, str]:
    (r,) = [r for r in t["rows"] if r[0] == label]
    assert len(r) == len(t["headers"]), (t["headers"], r)
    return dict(zip(t["headers"], r))


def test_cli_printed_the_counts(report):
    assert "fig3b_num_steps__ablation_steps: expected 6 run cells, found 4 FINISHED, 1 FAILED, " \
           "1 missing" in report["cli"]


def test_base2novel_table_rendered(report):
    tables = browser.html_tables(report["dom"])
    t = _table(tables, "dataset", "Caltech101")
    for h in ("Base ours", "Base paper", "Δ Base ours − paper", "Novel ours",
              "HM (PERL conv.) ours", "HM (CoOp conv.) ours", "MLflow runs"):
        assert h in t["headers"], t["headers"]
    cal = _row(t, "Caltech101")
    assert cal["Base ours"] == "91.00 ± 1.41"  # mean, sample std of 90 and 92
    assert cal["Base paper"] == "97.91"  # Table 5, PERL, Caltech101 (reference column)
    assert cal["Δ Base ours − paper"] == "−6.91"  # a typographic minus
    assert cal["Novel ours"] == "82.00 ± 2.83"
    assert report["ids"][("Caltech101", 2)][:8] in cal["MLflow runs"]  # provenance
    dtd = _row(t, "DTD")
    assert dtd["Base ours"] == "62.00 ± 2.83" and dtd["Base paper"] == "59.69"
    # the paper's datasets that were never run: a row each, ours missing, the paper beside it
    img = _row(t, "ImageNet")
    assert img["Base ours"] == "—" and img["Base paper"] != "—" and img["Δ Base ours − paper"] \
        == "—"
    avg = _row(t, "Average")
    # mean of the two dataset means; the note says the paper's 11-dataset average is not comparable
    assert avg["Base ours"] == "76.50 ± 2.12 average over 2 of 11 datasets"
    assert avg["Δ Base ours − paper"] == "n/c"


def test_failed_and_missing_cells_rendered(report):
    tables = browser.html_tables(report["dom"])
    t = _table(tables, "num_steps", "3")
    assert [r[0] for r in t["rows"]] == ["1", "2", "3"]
    k1 = _row(t, "1")
    assert k1["Base ours"] == "51.00 ± 1.41"
    k3 = _row(t, "3")
    assert k3["Base ours"] == "FAILED (1)" and k3["Novel ours"] == "FAILED (1)"
    assert report["ids"]["failed"][:8] in k3["MLflow runs"] and FAILED_REASON in k3["MLflow runs"]
    # no paper column for a synthetic-world ablation
    assert not any("paper" in h for h in t["headers"])
    dom = report["dom"]
    assert "expected 6 run cells, found 4 FINISHED, 1 FAILED, 1 missing" in dom
    # the FAILED cells carry their CSS class (red), the missing ones theirs (grey)
    assert '<td class="failed"' in dom and '<td class="missing"' in dom
    # the runs section lists every run, the failed one with its status
    runs = _table(tables, "run", report["ids"]["failed"][:8])
    assert any(r[0] == report["ids"]["failed"][:8] and "FAILED" in r for r in runs["rows"])


def _table_by_headers(tables: list[dict], headers: tuple[str, ...]) -> dict:
    hits = [t for t in tables if tuple(t["headers"][:len(headers)]) == headers]
    assert hits, f"no table whose columns start {headers}; tables: " \
                 f"{[t['headers'][:3] for t in tables]}"
    return hits[0]


def _lrow(t: dict, *label: str) -> dict[str, str]:
    (r,) = [r for r in t["rows"] if tuple(r[:len(label)]) == label]
    assert len(r) == len(t["headers"]), (t["headers"], r)
    return dict(zip(t["headers"], r))


def test_detail_section_rendered(report):
    dom = report["dom"]
    assert 'id="sec-detail"' in dom and 'href="#detail_fig3b_num_steps__ablation_steps"' in dom
    t = _table_by_headers(browser.html_tables(dom), ("num_steps", "dataset"))
    assert [r[:2] for r in t["rows"]] == [["1", "ToyShapes"], ["2", "ToyShapes"],
                                         ["3", "ToyShapes"]]
    assert _lrow(t, "2", "ToyShapes")["Base ours"] == "56.00 ± 1.41"  # seeds 55 and 57
    assert _lrow(t, "3", "ToyShapes")["Base ours"] == "FAILED (1)"


def test_dynamics_section_rendered(report):
    dom = report["dom"]
    assert 'id="sec-dynamics"' in dom and 'id="dynamics_acc__ablation_steps"' in dom
    tables = browser.html_tables(dom)
    # the ablation's per-step table: steps 0..K for each K it ran
    t = _table_by_headers(tables, ("num_steps", "step"))
    assert [r[:2] for r in t["rows"]][:5] == [["1", "0"], ["1", "1"], ["2", "0"], ["2", "1"],
                                             ["2", "2"]]
    base, novel = "B2N base (mean over datasets) ours", "B2N novel (mean over datasets) ours"
    assert _lrow(t, "2", "0")[base] == "54.00 ± 1.41"  # 55 - 2 and 57 - 2
    assert _lrow(t, "3", "3")[novel] == "FAILED (1)"
    # the base2novel sweep's: one block of steps, averaged over its two datasets
    b2n = _table_by_headers(tables, ("step",))
    assert [r[0] for r in b2n["rows"]] == ["0", "1", "2"]
    assert _lrow(b2n, "2")[base].startswith("76.50")  # (91 + 62) / 2


def test_plots_are_embedded_images(report):
    from PIL import Image

    srcs = browser.img_sources(report["dom"])
    # base2novel bars, fig3b curve, the per-step dynamics of both sweeps
    assert len(srcs) >= 4, srcs
    for src in srcs:
        assert src.startswith("data:image/png;base64,"), src[:60]
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 100
    html = report["html"].read_text(encoding="utf-8")
    assert "<script" not in html and "http://" not in html  # self-contained, no network


def test_screenshot_shows_the_report(report):
    from PIL import Image

    s = browser.assert_not_blank(report["png"], min_colours=50)
    assert (s.width, s.height) == (1400, 1800)
    with Image.open(report["png"]) as im:
        colours = {c for _, c in im.convert("RGB").getcolors(maxcolors=s.width * s.height)}
    # the report's CSS was applied: table header grey, Δ-worse red, Δ-better green
    # (Caltech101 base is below the paper, DTD base above it)
    for name, rgb in (("th background", (0xF3, 0xF3, 0xF3)),
                      ("bad/failed cell", (0xFB, 0xE0, 0xE0)),
                      ("good cell", (0xDF, 0xF5, 0xDF))):
        assert rgb in colours, f"{name} colour {rgb} not in the screenshot"


def test_browser_is_fast_enough(report):
    # two chromium launches (DOM + screenshot) on a static file: seconds, not minutes
    assert report["browser_s"] < 60, report["browser_s"]
