"""Several processes opening one new SQLite store at once (a driver and `pipeline.status` beside
it): without `tracking.mlflow_client`'s lock, MLflow's table creation collides in alembic and all
but one die (CI saw it); with it every process opens the store."""

import multiprocessing as mp

from pipeline.tracking import mlflow_client


def _open(uri: str) -> None:
    mlflow_client(uri).search_experiments()


def test_concurrent_first_open_of_a_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_open, args=(uri,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert mlflow_client(uri).search_experiments()  # one store, the Default experiment in it
