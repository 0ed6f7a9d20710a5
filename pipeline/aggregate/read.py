"""Reading: the tracking store -> one DataFrame of runs, params cast to TrainConfig types, and
what each submission recorded about its grid (the table axes)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path
from typing import Any, Iterable, get_origin, get_type_hints

import pandas as pd

from perl_core.config import (CANONICAL_FIELDS, FIELD_NAMES, LEGACY_VALUES, ConfigError,
                              TrainConfig, canonical_values, decode_param)
from pipeline import layout, queries
from pipeline.aggregate.runs import KEY_FIELDS, plain, sweep_name

AGGREGATE_EXPERIMENT = "aggregate"
_HINTS = get_type_hints(TrainConfig)
# Fields that describe data, or only repeat a cell: never a table axis.
NOT_AXES = ("dataset", "eval_datasets", "protocol", "seed")


def make_client(tracking_uri: str, *, must_exist: bool = True):
    if must_exist and not layout.store_exists(tracking_uri):
        raise SystemExit(f"no MLflow store at {layout.redact_uri(tracking_uri)} (run a sweep "
                         "first, or pass --tracking-uri)")
    return queries.mlflow_client(tracking_uri)


def select_experiments(client, names: list[str] | None) -> dict[str, str]:
    """{experiment_id: name}: the named ones (error if absent), else all with `sweep`-tagged
    runs."""
    if names:
        out = {}
        for name in names:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise SystemExit(f"experiment {name!r} not found in the tracking store")
            out[exp.experiment_id] = exp.name
        return out
    return {e.experiment_id: e.name for e in queries.all_experiments(client)
            if e.name != AGGREGATE_EXPERIMENT and queries.has_sweep_runs(client, e.experiment_id)}


def runs_frame(runs: Iterable, experiments: dict[str, str]) -> pd.DataFrame:
    """One row per run, columns as mlflow.search_runs names them (params.*, metrics.*, tags.*)."""
    recs = []
    for r in runs:
        rec: dict[str, Any] = {
            "run_id": r.info.run_id, "experiment_id": r.info.experiment_id,
            "experiment": experiments.get(r.info.experiment_id, r.info.experiment_id),
            "status": r.info.status, "start_time": r.info.start_time or 0,
            "end_time": r.info.end_time or 0, "run_name": r.info.run_name or "",
        }
        rec.update({f"tags.{k}": v for k, v in r.data.tags.items()})
        rec.update({f"params.{k}": v for k, v in r.data.params.items()})
        rec.update({f"metrics.{k}": v for k, v in r.data.metrics.items()})
        recs.append(rec)
    df = pd.DataFrame.from_records(recs)
    for col in ("tags.config_hash", "tags.sweep", "tags.phase", "tags.status_detail"):
        if col not in df.columns:
            df[col] = pd.Series([None] * len(df), dtype="str")
    return df


def cast_params(df: pd.DataFrame, warnings: list[str] | None = None) -> pd.DataFrame:
    """Cast `params.<TrainConfig field>` from MLflow strings to the field's type
    (`cast_column`). A value that does not parse becomes NA and is reported (never
    silently coerced to something else)."""
    df = df.copy()
    for name in FIELD_NAMES:
        col = f"params.{name}"
        if name in LEGACY_VALUES and "params.dataset" in df.columns:
            # runs logged before the field existed did what its legacy value does (as from_record)
            old = df["params.dataset"].notna() & (df[col].isna() if col in df.columns else True)
            df.loc[old, col] = str(LEGACY_VALUES[name])
        if col not in df.columns:
            continue
        raw = df[col]
        hint = _HINTS[name]
        new = cast_column(raw, name, hint)
        lost = raw.notna() & new.isna()
        if warnings is not None and lost.any():
            warnings.append(f"param {name!r}: {int(lost.sum())} value(s) not a valid "
                            f"{getattr(hint, '__name__', hint)} (e.g. {raw[lost].iloc[0]!r}); "
                            "treated as missing")
        df[col] = new
    return _canonical_params(df)


def cast_column(raw: pd.Series, name: str, hint: Any) -> pd.Series:
    """MLflow's param strings of field `name` decoded by the one value decoder
    (`perl_core.config.decode_param`): ints -> Int64, floats -> Float64, tuples -> canonical
    JSON text, the rest -> str; a value that does not decode becomes NA."""
    decoded: dict[Any, Any] = {}  # a store repeats a few values many times: decode each once

    def one(text: Any) -> Any:
        if text is None or (isinstance(text, float) and math.isnan(text)):
            return None
        if text not in decoded:
            try:
                decoded[text] = decode_param(name, text)
            except ConfigError:
                decoded[text] = None
        return decoded[text]

    values = [one(v) for v in raw]
    if hint is int:
        return pd.Series(values, index=raw.index, dtype="Int64")
    if hint is float:
        return pd.Series(values, index=raw.index, dtype="Float64")
    if get_origin(hint) is tuple:
        values = [None if v is None else json.dumps(list(v)) for v in values]
    return pd.Series(values, index=raw.index, dtype="str")


def _canonical_params(df: pd.DataFrame) -> pd.DataFrame:
    """Two spellings of one model (one config hash) get one table key (`canonical_values`)."""
    cols = [f for f in CANONICAL_FIELDS if f"params.{f}" in df.columns]
    if "params.dataset" not in df.columns or not cols:
        return df
    for i in df.index[df["params.dataset"].notna()]:
        vals = {f: plain(df.at[i, f"params.{f}"]) for f in cols}
        for f, v in canonical_values(vals).items():
            if v != vals[f]:
                df.at[i, f"params.{f}"] = v
    return df


# --- what the sweep recorded about its grid ---------------------------------------------------


def grid_axes(sweep: dict[str, Any]) -> tuple[str, ...]:
    """The fields a resolved sweep file varies: a grid key (of the sweep or of one arm's
    sub-grid, as `spec.blocks` combines them) with more than one value, except the data and
    seed keys (`NOT_AXES`) and fields that are not part of a cell's key. In `KEY_FIELDS` order,
    the order the axes had when they were read off the runs (same tables, same names)."""
    def mapping(v: Any) -> dict:  # the raw file: anything it holds that is not a mapping is none
        return v if isinstance(v, dict) else {}

    top = mapping(sweep.get("grid"))
    grids = [top]
    arms = sweep.get("arms") if isinstance(sweep.get("arms"), list) else []
    for arm in map(mapping, arms):
        fixed = mapping(arm.get("fixed"))
        grids.append({**{k: v for k, v in top.items() if k not in fixed},
                      **mapping(arm.get("grid"))})
    varied = {k for g in grids for k, v in g.items() if isinstance(v, list) and len(v) > 1}
    return tuple(f for f in KEY_FIELDS if f in varied and f not in NOT_AXES)


def _resolved_sweep(client, run_id: str) -> dict[str, Any] | None:
    import yaml

    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run_id, layout.RESOLVED_SWEEP, tmp)
            sweep = yaml.safe_load(Path(path).read_text())
    except Exception:  # noqa: BLE001 - no record (an older store): the caller falls back
        return None
    return sweep if isinstance(sweep, dict) else None


def recorded_axes(client, df: pd.DataFrame) -> dict[tuple[str, str], tuple[str, ...]]:
    """{(experiment id, sweep): the fields its grid varies} from the resolved sweep file each
    submission's parent run logged (`grid_axes`; over several submissions, every field one of
    them varied). A sweep with no such record is absent: stores written before the parent
    logged it, or an artifact store not readable from here."""
    if not len(df):
        return {}
    parents = df[df["tags.phase"].astype("str") == layout.PARENT_PHASE]
    found: dict[tuple[str, str], set[str]] = {}
    for _, p in parents.iterrows():
        sweep = _resolved_sweep(client, p["run_id"])
        if sweep is not None:
            key = (str(p["experiment_id"]), sweep_name(p.get("tags.sweep")))
            found.setdefault(key, set()).update(grid_axes(sweep))
    return {key: tuple(f for f in KEY_FIELDS if f in axes) for key, axes in found.items()}
