"""Resolving runs into cells: one run per config hash and seed, keyed by the settings that
change a result (`KEY_FIELDS`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from perl_core.config import CANONICAL_FIELDS, EXECUTION_FIELDS, FIELD_NAMES, canonical_values
from pipeline.layout import SEARCH_PHASE
from pipeline.reuse import LINK, REUSE_TAG, REUSED_FROM_TAG

# Every field that changes a result, except the seed: runs that share these values are one cell,
# and their seeds are averaged.
KEY_FIELDS: tuple[str, ...] = tuple(f for f in FIELD_NAMES if f not in EXECUTION_FIELDS
                                    and f != "seed")
Key = tuple  # values of KEY_FIELDS, in order (None where a run did not log the field)

NOT_A_TRIAL = "not a trial run (no config_hash)"
NO_PARAMS = "no params logged (a run cut off before logging them)"
HPO_RESOLUTION = "hpo phase (search section)"


@dataclass
class SeedRun:
    run_id: str
    experiment_id: str
    status: str
    seed: int | None
    key: Key
    metrics: dict[str, float]
    extra: dict[str, str]  # params/tags that are not TrainConfig fields
    reason: str = ""
    sweep: str = ""


@dataclass
class Pool:
    """Resolved runs: per cell key and seed, the FINISHED run, else the FAILED one."""
    finished: dict[Key, dict[int, SeedRun]] = field(default_factory=dict)
    failed: dict[Key, dict[int, SeedRun]] = field(default_factory=dict)
    incomplete: dict[Key, dict[int, SeedRun]] = field(default_factory=dict)  # KILLED / RUNNING

    def finished_seeds(self, key: Key) -> dict[int, SeedRun]:
        return self.finished.get(key, {})

    def failed_seeds(self, key: Key) -> dict[int, SeedRun]:
        return self.failed.get(key, {})


def plain(v: Any) -> Any:
    """A hashable plain value (pandas NA -> None, numpy scalars -> Python)."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return float(v)
    return v


def row_key(row: pd.Series) -> Key:
    return tuple(plain(row.get(f"params.{f}")) for f in KEY_FIELDS)


def kget(key: Key, name: str) -> Any:
    return key[KEY_FIELDS.index(name)]


def kreplace(key: Key, canonical: bool = True, **changes: Any) -> Key:
    """`key` with fields changed, in the canonical spelling of table keys (`canonical_values`)."""
    k = dict(zip(KEY_FIELDS, key))
    k.update(changes)
    if canonical:
        k.update(canonical_values({f: k[f] for f in CANONICAL_FIELDS if f in k}))
    return tuple(k[f] for f in KEY_FIELDS)


def seed_order(s: Any) -> tuple:
    return (s is None, s if isinstance(s, (int, float)) else 0, str(s))


def sweep_name(tag: Any) -> str:
    s = "" if tag is None or (isinstance(tag, float) and math.isnan(tag)) else str(tag)
    s = s.rstrip("/").split("/")[-1]
    for suffix in (".yaml", ".yml"):
        s = s.removesuffix(suffix)
    return s


def _label_runs(df: pd.DataFrame) -> pd.Series:
    """Which runs are grid-phase trials; the others get their `resolution` here."""
    df["resolution"] = pd.Series(["ignored"] * len(df), index=df.index, dtype="str")
    trial = df["tags.config_hash"].notna() & (df["tags.config_hash"].astype("str") != "")
    df.loc[~trial, "resolution"] = NOT_A_TRIAL
    # a run created but cut off (e.g. an MLflow outage) before its params were logged: it cannot
    # be placed in any table; its cell is still covered by its replayed or re-run twin
    no_params = trial & (df["params.dataset"].isna() if "params.dataset" in df
                         else pd.Series(True, index=df.index))
    df.loc[no_params, "resolution"] = NO_PARAMS
    trial &= ~no_params
    hpo = trial & (df["tags.phase"].astype("str") == SEARCH_PHASE)
    df.loc[hpo, "resolution"] = HPO_RESOLUTION
    return trial & ~hpo


def _seed_run(chosen: pd.Series) -> SeedRun:
    param_cols = {f"params.{f}" for f in FIELD_NAMES}
    extra = {}
    for c, v in chosen.items():
        if (c.startswith("params.") and c not in param_cols) or c.startswith("tags."):
            if plain(v) is not None:
                extra[c.split(".", 1)[1]] = str(v)
    return SeedRun(
        run_id=chosen["run_id"], experiment_id=chosen["experiment_id"],
        status=chosen["status"], seed=plain(chosen.get("params.seed")), key=row_key(chosen),
        metrics={c[len("metrics."):]: float(v) for c, v in chosen.items()
                 if c.startswith("metrics.") and plain(v) is not None},
        extra=extra, reason=str(plain(chosen.get("tags.status_detail")) or ""),
        sweep=sweep_name(chosen.get("tags.sweep")))


def _origin(fin: pd.DataFrame, chosen: pd.Series) -> pd.Series:
    """A linked run (`pipeline.reuse`: the same result, copied) gives way to its source when
    both are read, so that the run a table cell points to is the one that computed it."""
    source = plain(chosen.get(f"tags.{REUSED_FROM_TAG}"))
    if plain(chosen.get(f"tags.{REUSE_TAG}")) != LINK or source is None:
        return chosen
    match = fin[fin["run_id"] == source]
    return match.iloc[-1] if len(match) else chosen


def resolve(df: pd.DataFrame) -> tuple[Pool, pd.DataFrame]:
    """Dedupe by config_hash: the latest FINISHED run wins; a hash with no FINISHED run is FAILED
    if any run failed, else incomplete. Returns the pool and `df` with a `resolution` column."""
    pool = Pool()
    df = df.copy()
    trial = _label_runs(df)
    sel = df[trial].sort_values(["end_time", "start_time"], kind="stable")
    for h, grp in sel.groupby("tags.config_hash", sort=False):
        fin = grp[grp["status"] == "FINISHED"]
        bad = grp[grp["status"] == "FAILED"]
        if len(fin):
            chosen, target, label = _origin(fin, fin.iloc[-1]), pool.finished, "used"
        elif len(bad):
            chosen, target, label = bad.iloc[-1], pool.failed, "failed"
        else:
            chosen, target, label = grp.iloc[-1], pool.incomplete, str(grp.iloc[-1]["status"])
        for idx in grp.index:
            df.loc[idx, "resolution"] = (label if idx == chosen.name else
                                         f"superseded by {chosen['run_id']}")
        sr = _seed_run(chosen)
        # Two hashes for one (key, seed) only happen across schema versions (same settings):
        # either run is a valid result, the last one visited is kept.
        target.setdefault(sr.key, {})[sr.seed] = sr
    # A seed that FINISHED under one hash is not failed under another.
    for key, seeds in list(pool.failed.items()):
        for s in list(seeds):
            if s in pool.finished.get(key, {}):
                del seeds[s]
        if not seeds:
            del pool.failed[key]
    return pool, df
