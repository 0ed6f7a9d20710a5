"""Where a sweep's things are and what they are called: the one definition of the storage layout.

    <storage>/records/<experiment slug>/<config_hash>-<record id>.{json,safetensors}  (records_dir)
    <storage>/optuna/<experiment slug>.sqlite3                      the search phase's study
    <storage>/tune/<experiment slug>-<phase>-<digest>/             one Tune experiment per phase
    <tracking store dir>/mlartifacts/<experiment slug>/            artifacts beside a SQLite store

The phase names are the values of the runs' `phase` tag (and the middle of the Tune experiment
names): stored values, so they never change, whatever the code calls the phase.

Also here: where the tracking store is by default, whether a SQLite store exists, how a URI is
shown (`redact_uri`) and `open_fs`, the one way the pipeline opens its storage. Standard library
only (fsspec is imported when `open_fs` is called): `pipeline.aggregate` imports this without
torch.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

GRID_PHASE = "final"  # the grid phase: the runs the aggregate's tables are built from
SEARCH_PHASE = "hpo"  # the search phase: Optuna samples
PARENT_PHASE = "sweep"  # the parent run of a submission
PHASES = (GRID_PHASE, SEARCH_PHASE)  # the phases of trial (child) runs

RESOLVED_SWEEP = "sweep/resolved.yaml"  # the parent run's artifact: the sweep as run (base, --set)
TUNE_DIR = "tune"
PHASE_COMPLETE = "perl_phase_complete.json"  # in a Tune experiment's folder: its phase ended


# --- names ----------------------------------------------------------------------------------------


def experiment_slug(name: str) -> str:
    """A path-safe form of an experiment name (`perl/ablation_steps` -> `perl__ablation_steps`)."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name.replace("/", "__"))


def tune_prefix(experiment: str, phase: str) -> str:
    """`<slug>-<phase>-`: what every Tune experiment of this MLflow experiment's phase starts
    with (`pipeline.status` finds the grid phase's saved states by it)."""
    return f"{experiment_slug(experiment)}-{phase}-"


def tune_name(experiment: str, phase: str, digest: str) -> str:
    """The Tune experiment of one phase of a submission (`digest`: what makes an identical
    re-submission find it again)."""
    return tune_prefix(experiment, phase) + digest


# --- the sweep's storage --------------------------------------------------------------------------


def _under(storage: str, *parts: str) -> str:
    return "/".join((storage.rstrip("/"), *parts))


def records_dir(storage: str, experiment: str) -> str:
    """The trial records of an experiment (`pipeline.tracking.write_record`)."""
    return _under(storage, "records", experiment_slug(experiment))


def study_path(storage: str, experiment: str) -> str:
    """The Optuna study file (SQLite) of an experiment's search phase, beside its records; on
    s3:// the driver works on a local copy and uploads it (`pipeline.study.StudyFile`)."""
    return _under(storage, "optuna", f"{experiment_slug(experiment)}.sqlite3")


def tune_dir(storage: str) -> str:
    """Tune's state (every phase's experiment folder) in the sweep's storage."""
    return _under(storage, TUNE_DIR)


def open_fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) of a local path or URL, through the project's storage
    factory (`perl_core.data.storage`: S3 endpoints and credentials from the environment)."""
    from perl_core.data.storage import open_fs as factory  # (imports fsspec: only when used)

    return factory(url)


# --- the tracking store ---------------------------------------------------------------------------


def default_tracking_uri(env: Mapping[str, str] | None = None, cwd: str | None = None) -> str:
    """$MLFLOW_TRACKING_URI, else a SQLite store at `<cwd>/runs/mlflow.db` (absolute)."""
    env = os.environ if env is None else env
    return env.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{Path(cwd or os.getcwd()).resolve() / 'runs' / 'mlflow.db'}"


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:///` tracking URI (its query left off), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///"):].split("?", 1)[0])


def store_exists(tracking_uri: str) -> bool:
    """False only for a SQLite file not created yet (readers must not create it by opening it);
    a server or another database is assumed there (opening it says otherwise)."""
    db = sqlite_path(tracking_uri)
    return db is None or str(db) in ("", ":memory:") or db.exists()


def sqlite_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Absolute artifact root of an experiment beside a SQLite store (MLflow's default would be
    ./mlruns of whichever process created the experiment); None for a server, which decides."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    return (db.parent / "mlartifacts" / experiment_slug(experiment)).as_uri()


def redact_uri(uri: str) -> str:
    """A URI without user:password (never print or tag credentials)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))
    return uri


_URI_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"{}]+")


def redact_text(text: str) -> str:
    """Every URI in `text` through `redact_uri`: an exception's message (MLflow's "API request
    to <tracking URI> failed", botocore's endpoint) may quote a URI with its user:password."""

    def one(m: re.Match) -> str:
        try:
            return redact_uri(m.group(0))
        except ValueError:  # (a port that is no number) whatever it holds, it is not logged
            return "<a URI that does not parse>"

    return _URI_RE.sub(one, text)


__all__ = ["GRID_PHASE", "SEARCH_PHASE", "PARENT_PHASE", "PHASES", "RESOLVED_SWEEP", "TUNE_DIR",
           "PHASE_COMPLETE",
           "experiment_slug", "tune_prefix", "tune_name", "records_dir", "study_path",
           "tune_dir", "open_fs", "default_tracking_uri", "sqlite_path", "store_exists",
           "sqlite_artifact_location", "redact_uri", "redact_text"]
