"""The MLflow queries of the pipeline, by name: every filter string, and the one page-token loop.

Each query takes an MlflowClient (`mlflow_client(tracking_uri)` opens one) and experiment id(s)
and returns `mlflow.entities.Run`s, all pages of them. The tags they filter on are those
`pipeline.tracking` writes: `phase` (`layout.GRID_PHASE` / `SEARCH_PHASE` / `PARENT_PHASE`),
`sweep`, `config_hash`, `code_version` and MLflow's `mlflow.parentRunId`. A `code_version` of
None matches every code version (`--ignore-code-version`).

Torch-free (mlflow and filelock are imported when a client is opened): `pipeline.aggregate`
imports it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from pipeline.layout import SEARCH_PHASE, sqlite_path

PAGE_SIZE = 1000  # search_runs / search_experiments return at most this many per page
_RUNNING, _FINISHED, _FAILED = "RUNNING", "FINISHED", "FAILED"


def mlflow_client(tracking_uri: str) -> Any:
    """An MlflowClient, opened under an inter-process lock where the store is a SQLite file: the
    first MlflowClient on a new file creates and migrates its tables; two processes doing that at
    once (the driver starting and a `pipeline.status` beside it, or two drivers) collide in alembic
    ("table _alembic_tmp_... already exists") and one of them dies. SQLite is one host's file, so
    a lock file beside it serialises the opening; servers (http) and other databases migrate on
    their own and need none."""
    from mlflow import MlflowClient

    db = sqlite_path(tracking_uri)
    if db is None:
        return MlflowClient(tracking_uri=tracking_uri)
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=300):
        return MlflowClient(tracking_uri=tracking_uri)


def where(status: str | None = None, tags: Mapping[str, str | None] | None = None) -> str:
    """An MLflow filter string: the run status and tag equalities (a None value: any)."""
    parts = [f"attributes.status = '{status}'"] if status else []
    parts += [f"tags.{k} = '{v}'" for k, v in (tags or {}).items() if v is not None]
    return " and ".join(parts)


# --- paging ---------------------------------------------------------------------------------------


def all_runs(client: Any, experiment_ids: Iterable[str], filter_string: str = "") -> list:
    """Every run of the experiments matching `filter_string`, following the page tokens."""
    ids, runs, token = list(experiment_ids), [], None
    while True:
        page = client.search_runs(ids, filter_string=filter_string, max_results=PAGE_SIZE,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def all_experiments(client: Any) -> list:
    """Every active experiment of the store, following the page tokens."""
    exps, token = [], None
    while True:
        page = client.search_experiments(max_results=PAGE_SIZE, page_token=token)
        exps.extend(page)
        token = page.token
        if not token:
            return exps


# --- named queries --------------------------------------------------------------------------------


def has_sweep_runs(client: Any, experiment_id: str) -> bool:
    """Whether any run of the experiment carries a `sweep` tag (a sweep's experiment)."""
    return bool(client.search_runs([experiment_id], "tags.sweep LIKE '%'", max_results=1))


def sweep_runs(client: Any, experiment_id: str, sweep: str) -> list:
    """Every run of a sweep (parents and trials of every phase, any status)."""
    return all_runs(client, [experiment_id], where(tags={"sweep": sweep}))


def running_runs(client: Any, experiment_id: str, sweep: str) -> list:
    """The RUNNING runs of a sweep (parents and trials)."""
    return all_runs(client, [experiment_id], where(_RUNNING, {"sweep": sweep}))


def finished_runs(client: Any, experiment_id: str, *, phase: str | None = None,
                  code_version: str | None = None, sweep: str | None = None) -> list:
    """The FINISHED runs, of a phase / code version / sweep where given."""
    return all_runs(client, [experiment_id], where(_FINISHED, {
        "phase": phase, "code_version": code_version, "sweep": sweep}))


def finished_runs_anywhere(client: Any, experiment_ids: Iterable[str], *, phase: str,
                           code_version: str | None) -> list:
    """The FINISHED runs of a phase (and code version unless None) in the given experiments
    (`pipeline.reuse`: every active experiment of the store, from `all_experiments`)."""
    ids = list(experiment_ids)
    return all_runs(client, ids, where(_FINISHED, {"phase": phase,
                                                   "code_version": code_version})) if ids else []


def finished_runs_of_hash(client: Any, experiment_id: str, config_hash: str, *, phase: str,
                          code_version: str | None, limit: int = 100) -> list:
    """The latest (at most `limit`, newest first) FINISHED runs of one config hash in a phase,
    of this code version unless None: a trial's "is it done already?" (one page)."""
    flt = where(_FINISHED, {"config_hash": config_hash, "phase": phase,
                            "code_version": code_version})
    return list(client.search_runs([experiment_id], filter_string=flt, max_results=limit,
                                   order_by=["attributes.end_time DESC"]))


def search_phase_runs(client: Any, experiment_id: str, sweep: str, *,
                      code_version: str | None = None) -> list:
    """The FINISHED search-phase (Optuna sample) runs of a sweep."""
    return finished_runs(client, experiment_id, phase=SEARCH_PHASE, code_version=code_version,
                         sweep=sweep)


def children(client: Any, experiment_id: str, parent_run_id: str, *,
             status: str | None = None) -> list:
    """The trial runs of one submission (of one status where given)."""
    return all_runs(client, [experiment_id],
                    where(tags={"mlflow.parentRunId": parent_run_id}, status=status))


def failed_children(client: Any, experiment_id: str, parent_run_id: str) -> list:
    return children(client, experiment_id, parent_run_id, status=_FAILED)


__all__ = ["PAGE_SIZE", "mlflow_client", "where", "all_runs", "all_experiments",
           "has_sweep_runs", "sweep_runs", "running_runs", "finished_runs",
           "finished_runs_anywhere", "finished_runs_of_hash", "search_phase_runs", "children",
           "failed_children"]
