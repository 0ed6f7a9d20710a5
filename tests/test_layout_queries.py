"""pipeline.layout (paths and names of a sweep's storage) and pipeline.queries (the MLflow filter
strings and paging): the stored names never change, and the queries page through a store."""

from __future__ import annotations

import subprocess
import sys

from pipeline import layout, queries


def test_stored_names_and_paths_are_the_ones_existing_stores_hold():
    assert (layout.GRID_PHASE, layout.SEARCH_PHASE, layout.PARENT_PHASE) == \
        ("final", "hpo", "sweep")
    assert layout.experiment_slug("perl/ablation steps") == "perl__ablation_steps"
    assert layout.records_dir("s3://b/runs/", "perl/x") == "s3://b/runs/records/perl__x"
    assert layout.study_path("/r", "perl/x") == "/r/optuna/perl__x.sqlite3"
    assert layout.tune_dir("/r/") == "/r/tune"
    assert layout.tune_name("perl/x", layout.GRID_PHASE, "abc") == "perl__x-final-abc"
    assert layout.tune_name("perl/x", "final", "abc").startswith(
        layout.tune_prefix("perl/x", layout.GRID_PHASE))


def test_tracking_store_location(tmp_path):
    assert layout.default_tracking_uri({}, str(tmp_path)) == \
        f"sqlite:///{tmp_path.resolve() / 'runs' / 'mlflow.db'}"
    assert layout.default_tracking_uri({"MLFLOW_TRACKING_URI": "http://h:5000"}) == "http://h:5000"
    db = tmp_path / "m.db"
    assert not layout.store_exists(f"sqlite:///{db}")
    db.touch()
    assert layout.store_exists(f"sqlite:///{db}?timeout=5")
    assert layout.store_exists("http://h:5000") and layout.store_exists("sqlite:///:memory:")
    assert layout.redact_uri("http://u:pw@h:5000/x") == "http://***@h:5000/x"
    assert layout.sqlite_artifact_location("http://h", "perl/x") is None
    assert layout.sqlite_artifact_location(f"sqlite:///{db}", "perl/x") == \
        (tmp_path / "mlartifacts" / "perl__x").as_uri()


def test_filter_strings():
    assert queries.where("FINISHED", {"phase": "final", "code_version": None}) == \
        "attributes.status = 'FINISHED' and tags.phase = 'final'"
    assert queries.where(tags={"mlflow.parentRunId": "p1"}, status="FAILED") == \
        "attributes.status = 'FAILED' and tags.mlflow.parentRunId = 'p1'"
    assert queries.where() == ""


class _Page(list):
    token = None


class _Client:
    """search_runs over 2 500 fake runs, 1 000 a page, recording each filter."""

    def __init__(self):
        self.filters = []

    def search_runs(self, ids, filter_string="", max_results=1000, page_token=None,
                    order_by=None):
        self.filters.append(filter_string)
        start = int(page_token or 0)
        page = _Page(range(start, min(start + max_results, 2500)))
        page.token = str(start + max_results) if start + max_results < 2500 else None
        return page


def test_queries_page_through_every_run():
    c = _Client()
    assert len(queries.finished_runs(c, "1", phase="final", code_version="v")) == 2500
    assert set(c.filters) == {"attributes.status = 'FINISHED' and tags.phase = 'final' and "
                              "tags.code_version = 'v'"}
    c.filters.clear()
    assert len(queries.search_phase_runs(c, "1", "s")) == 2500
    assert c.filters[0] == "attributes.status = 'FINISHED' and tags.phase = 'hpo' and " \
        "tags.sweep = 's'"
    assert len(queries.finished_runs_of_hash(c, "1", "h", phase="final",
                                             code_version=None)) == 100  # one page, newest first


def test_layout_and_queries_import_without_torch_or_mlflow():
    code = ("import sys, pipeline.layout, pipeline.queries; "
            "print(sorted(m for m in ('torch', 'open_clip', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
