"""A small headless-chromium helper for the browser tests (report.html, the MLflow UI).

Chromium is a system program, not a Python dependency: `.ci/run` installs Debian's `chromium`
before `make test`, and every test that needs it calls `require_chromium()`, which skips the test
(with the reason) when no binary is found. `$CHROMIUM` names a binary explicitly.

Each call starts a fresh chromium with a throw-away profile, so calls are independent:

- `screenshot(url, png)` writes a PNG of the page as rendered (`--screenshot`);
- `dump_dom(url)` returns the DOM after scripts ran (`--dump-dom`), the thing to assert text on;
- `wait_for_text(url, texts)` polls `dump_dom` until every text is present (JS apps that fetch
  from a server, e.g. the MLflow UI), and returns the last DOM;
- `html_tables(dom)` / `img_sources(dom)` read the tables and images back out of a DOM;
- `mlflow_server(db, artifacts)` runs a real `mlflow server` on 127.0.0.1 for the duration of a
  `with` block (own process group, always terminated);
- `image_stats(png)` says whether a screenshot shows something (size, variance, distinct colours).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest

from servers import MlflowServer, free_port  # noqa: F401  (tests/servers.py; re-exported)

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable",
              "chrome", "headless_shell")
# Flags for a root user in a container with no display and no network except what we serve.
BASE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio",
              "--no-default-browser-check")


def find_chromium() -> str | None:
    """Path of a chromium/chrome binary: $CHROMIUM, else the first of CANDIDATES on PATH."""
    env = os.environ.get("CHROMIUM")
    if env:
        return shutil.which(env) or (env if Path(env).is_file() else None)
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def require_chromium() -> str:
    """The chromium binary, or skip the calling test with the reason."""
    path = find_chromium()
    if path is None:
        pytest.skip("headless chromium not found (install Debian's `chromium`, or set $CHROMIUM)")
    return path


def _run(args: list[str], *, size: tuple[int, int], timeout: float,
         virtual_time_budget: int | None) -> subprocess.CompletedProcess:
    exe = require_chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, *BASE_FLAGS, f"--user-data-dir={profile}",
               f"--window-size={size[0]},{size[1]}"]
        if virtual_time_budget:
            cmd.append(f"--virtual-time-budget={virtual_time_budget}")
        cmd += args
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise AssertionError(f"chromium did not finish in {timeout:.0f} s: {' '.join(cmd)}\n"
                                 f"stderr: {(e.stderr or '')[-2000:]}") from None


def screenshot(url: str, png: Path | str, *, size: tuple[int, int] = (1280, 900),
               virtual_time_budget: int | None = None, timeout: float = 90) -> Path:
    """Render `url` and write a PNG of the viewport (`size` = window width, height)."""
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    if png.exists():
        png.unlink()
    proc = _run([f"--screenshot={png}", url], size=size, timeout=timeout,
                virtual_time_budget=virtual_time_budget)
    if not png.exists():
        raise AssertionError(f"chromium wrote no screenshot of {url} (rc {proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")
    return png


def dump_dom(url: str, *, size: tuple[int, int] = (1280, 900),
             virtual_time_budget: int | None = None, timeout: float = 90) -> str:
    """The serialised DOM of `url` after its scripts ran (`--dump-dom`)."""
    proc = _run(["--dump-dom", url], size=size, timeout=timeout,
                virtual_time_budget=virtual_time_budget)
    if proc.returncode != 0 or "<html" not in proc.stdout.lower():
        raise AssertionError(f"chromium --dump-dom {url} failed (rc {proc.returncode}):\n"
                             f"{proc.stderr[-2000:]}")
    return proc.stdout


def wait_for_text(url: str, texts: list[str], *, timeout: float = 90,
                  virtual_time_budget: int = 15000, size: tuple[int, int] = (1280, 900)) -> str:
    """Poll `dump_dom(url)` until every string of `texts` occurs in the DOM; return that DOM.

    On timeout, fail naming the strings still missing (the last DOM's text is in the message)."""
    deadline = time.monotonic() + timeout
    dom = ""
    while True:
        dom = dump_dom(url, size=size, virtual_time_budget=virtual_time_budget,
                       timeout=max(30.0, deadline - time.monotonic()))
        missing = [t for t in texts if t not in dom]
        if not missing:
            return dom
        if time.monotonic() > deadline:
            raise AssertionError(f"{url}: not rendered within {timeout:.0f} s: {missing}\n"
                                 f"last DOM (tail): {dom[-3000:]}")
        time.sleep(1.0)


class _Tables(HTMLParser):
    """Every <table> of a document as {"headers": [...], "rows": [[...], ...]} (cell text with
    whitespace collapsed, <br> read as a space), and every <img src>."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self.images: list[str] = []
        self._stack: list[dict] = []  # open tables (nested tables are kept apart)
        self._cell: list[str] | None = None
        self._row: list[tuple[str, str]] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self._stack.append({"headers": [], "rows": []})
        elif tag == "tr" and self._stack:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
            self._cell_tag = tag
        elif tag == "br" and self._cell is not None:
            self._cell.append(" ")
        elif tag == "img":
            self.images.append(dict(attrs).get("src") or "")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append((self._cell_tag, " ".join("".join(self._cell).split())))
            self._cell = None
        elif tag == "tr" and self._row is not None and self._stack:
            t = self._stack[-1]
            if self._row and all(k == "th" for k, _ in self._row) and not t["rows"]:
                t["headers"] = [v for _, v in self._row]
            elif self._row:
                t["rows"].append([v for _, v in self._row])
            self._row = None
        elif tag == "table" and self._stack:
            self.tables.append(self._stack.pop())

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def html_tables(dom: str) -> list[dict]:
    """The tables of an HTML document: [{"headers": [str], "rows": [[str]]}], in order."""
    p = _Tables()
    p.feed(dom)
    return p.tables


def img_sources(dom: str) -> list[str]:
    """The `src` of every <img> of an HTML document."""
    p = _Tables()
    p.feed(dom)
    return p.images


@contextlib.contextmanager
def mlflow_server(backend_store_uri: str, artifact_root: Path | str, *, log: Path | str,
                  port: int | None = None, timeout: float = 120, workers: int = 1):
    """`mlflow server` on 127.0.0.1:<free port> (`servers.MlflowServer`, artifacts written by
    the clients to `artifact_root`); yields its URL once /health answers, always ends it."""
    server = MlflowServer(Path(log).parent, backend=backend_store_uri,
                          artifacts=str(artifact_root), proxied=False, log=log, port=port,
                          workers=workers)
    server.start(timeout)
    try:
        yield server.url
    finally:
        server.stop()


# The MLflow 3 UI opens experiments on its GenAI pages unless the URL selects model training.
ML_WORKFLOW = "workflowType=machine_learning"


def runs_table_view(params: list[str], metrics: list[str], order_by: str | None = None) -> dict:
    """A shared view of an experiment's runs table: the given params, then metrics, as columns,
    parent and child runs listed flat (sorted by `order_by`, a param; by date the UI nests the
    children under a collapsed parent). MLflow 3.17 reads it from the experiment tag
    `mlflow.sharedViewState.<key>` (plain JSON) when the URL has `viewStateShareKey=<key>`."""
    cols = (["attributes.`Run Name`"] + [f"params.`{p}`" for p in params]
            + [f"metrics.`{m}`" for m in metrics])
    view: dict = {"selectedColumns": cols,
                  "columnOrder": ["0", "attributes.`Run Name`", "runDateAndNestInfo", "duration",
                                  *cols[1:]],
                  "columnWidths": {"attributes.`Run Name`": 300}}
    if order_by:
        view.update(orderByKey=f"params.`{order_by}`", orderByAsc=True)
    return view


def share_view(client, experiment_id: str, key: str, view: dict) -> str:
    """Store `view` as a shared view of the experiment; returns the URL query that opens it."""
    import json

    client.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{key}", json.dumps(view))
    return f"{ML_WORKFLOW}&viewStateShareKey={key}"


@dataclass
class ImageStats:
    width: int
    height: int
    variance: float  # of the greyscale pixel values (0 for a uniform image)
    colours: int  # distinct RGB colours
    non_background: float  # fraction of pixels that differ from the most common colour


def image_stats(png: Path | str) -> ImageStats:
    from PIL import Image, ImageStat

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        grey = rgb.convert("L")
        variance = ImageStat.Stat(grey).var[0]
        counts = rgb.getcolors(maxcolors=rgb.width * rgb.height) or []
        top = max(c for c, _ in counts) if counts else 0
        total = rgb.width * rgb.height
        return ImageStats(rgb.width, rgb.height, variance, len(counts),
                          1.0 - top / total if total else 0.0)


def assert_not_blank(png: Path | str, *, min_colours: int = 8, min_variance: float = 50.0,
                     min_content: float = 0.02) -> ImageStats:
    """Fail unless the screenshot shows content: several colours, contrast, not all background."""
    s = image_stats(png)
    assert s.colours >= min_colours, f"{png}: only {s.colours} distinct colours (blank page?)"
    assert s.variance >= min_variance, f"{png}: pixel variance {s.variance:.1f} (blank page?)"
    assert s.non_background >= min_content, \
        f"{png}: {s.non_background:.1%} of pixels differ from the background (blank page?)"
    return s


__all__ = ["find_chromium", "require_chromium", "screenshot", "dump_dom", "wait_for_text",
           "html_tables", "img_sources", "mlflow_server", "free_port", "runs_table_view",
           "share_view", "ML_WORKFLOW", "image_stats", "assert_not_blank", "ImageStats"]


# --- regenerating docs/images -----------------------------------------------------------------


def docs_screenshots(runs_dir: Path, out: Path, experiment: str | None = None) -> list[Path]:
    """Screenshots for the docs from a finished `make demo` (or any runs folder holding
    `mlflow.db` and `aggregate/report.html`): report.png, mlflow-experiment.png, mlflow-run.png,
    mlflow-artifacts.png (the run's weights artifact).

    The MLflow store is copied first (the shared view is added to the copy, never to yours)."""
    from mlflow import MlflowClient

    report = runs_dir / "aggregate" / "report.html"
    if not report.is_file():
        raise SystemExit(f"{report} not found: run `make demo` (or pipeline.aggregate) first")
    out.mkdir(parents=True, exist_ok=True)
    shots = [screenshot(report.resolve().as_uri(), out / "report.png", size=(1400, 1600))]
    with tempfile.TemporaryDirectory(prefix="perl-docs-") as tmp:
        db = Path(tmp) / "mlflow.db"
        shutil.copy(runs_dir / "mlflow.db", db)
        with mlflow_server(f"sqlite:///{db}", Path(tmp) / "artifacts",
                           log=Path(tmp) / "server.log") as url:
            client = MlflowClient(url)
            exps = [e for e in client.search_experiments()
                    if (experiment is None and e.name not in ("Default", "aggregate"))
                    or e.name == experiment]
            if not exps:
                raise SystemExit(f"no experiment {experiment or '(any)'} in {runs_dir}/mlflow.db")
            exp = exps[0]
            trials = client.search_runs([exp.experiment_id], "tags.phase = 'final'",
                                        order_by=["attributes.run_name ASC"])
            params = ["dataset", "inject_layer", "num_steps"]
            varied = [p for p in params
                      if len({r.data.params.get(p) for r in trials}) > 1] or ["num_steps"]
            view = runs_table_view(params, ["base/acc", "novel/acc", "hm"], order_by=varied[0])
            query = share_view(client, exp.experiment_id, "perl-docs", view)
            page = f"{url}/#/experiments/{exp.experiment_id}/runs?{query}"
            wait_for_text(page, [trials[0].info.run_name, "inject_layer"])
            shots.append(screenshot(page, out / "mlflow-experiment.png", size=(1900, 620),
                                    virtual_time_budget=15000))
            run = next(r for r in trials if r.info.status == "FINISHED")
            page = (f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                    f"?{ML_WORKFLOW}")
            wait_for_text(page, [run.info.run_name, "inject_layer", "Parent run"])
            shots.append(screenshot(page, out / "mlflow-run.png", size=(1600, 1900),
                                    virtual_time_budget=15000))
            page = (f"{url}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}/"
                    f"artifacts/projectors/projectors.safetensors?{ML_WORKFLOW}")
            wait_for_text(page, ["projectors.safetensors", "config.json", "per_class.json"])
            shots.append(screenshot(page, out / "mlflow-artifacts.png", size=(1600, 700),
                                    virtual_time_budget=15000))
    for p in shots:
        assert_not_blank(p)
    return shots


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        prog="python tests/browser.py",
        description="Regenerate docs/images/*.png from a finished `make demo` (needs chromium).")
    ap.add_argument("--runs", default="runs", help="runs folder of the demo (default: %(default)s)")
    ap.add_argument("--experiment", default=None, help="MLflow experiment (default: the first "
                                                       "sweep experiment)")
    ap.add_argument("--out", default="docs/images", help="output folder (default: %(default)s)")
    a = ap.parse_args()
    if find_chromium() is None:
        raise SystemExit("chromium not found (install Debian's `chromium`, or set $CHROMIUM)")
    for p in docs_screenshots(Path(a.runs), Path(a.out), a.experiment):
        print(p)
