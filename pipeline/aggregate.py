"""`python -m pipeline.aggregate`: MLflow runs -> the paper's tables, plots and an HTML report.

    python -m pipeline.aggregate [--experiment NAME ...] [--tracking-uri URI] [--out DIR]
                                 [--ui-url URL] [--no-log]

Reads trial runs with `MlflowClient.search_runs` (paged; Ray is not needed), casts their params
to `TrainConfig` types, keeps one run per `config_hash` (the latest FINISHED one), groups seeds
(mean, sample std, n) and rebuilds, for whichever runs exist:

- Tables 1/5 (base-to-novel: Base / Novel / HM per dataset, both HM conventions),
- Table 2 (cross-dataset) and Table 8 (domain generalisation): source, targets, Target Avg,
- Table 3 (modality), Table 4 (loop variants), Fig. 3a (inject_layer), Fig. 3b (num_steps), the
  alignment ablation (anchor_weight), any other ablation (rows = the fields the sweep varies;
  in a sweep with arms, a block of rows per arm, from the runs' `arm` tags), the sensitivity
  table (arms that each change one setting, against the first arm),
- per-step dynamics (acc / confidence / Brier / KL / input Jacobian / image-text alignment at
  steps 0..K, each as the mean over datasets and pooled over test images, Fig. 7's convention)
  and Fig. 5's drift groups.

Each of our numbers carries the paper's number and ours - paper where the paper prints one
(`pipeline.reference`); cells never run are `—`, cells whose runs all failed are `FAILED (k)`.
Outputs (Markdown, CSV, LaTeX, PNG, report.html) go to `--out` and, unless `--no-log`, are
logged as artifacts of a run in the `aggregate` experiment.

Averaging conventions (data_protocol.md §9): per dataset, Base and Novel are means over seeds; HM
is reported both as the mean of per-seed HMs (PERL's convention) and as HM(mean B, mean N)
(CoOp's). Over datasets, Base/Novel/HM(PERL) are arithmetic means of the per-dataset values and
HM(CoOp) is HM(Avg Base, Avg Novel). The ± of an average is the std over seeds of the per-seed
average, over the seeds present in every dataset of that average.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit, urlunsplit

import pandas as pd

from perl_core.config import (CANONICAL_FIELDS, EXECUTION_FIELDS, FIELD_NAMES, LEGACY_VALUES,
                              TrainConfig, canonical_values)
from perl_core.metric_names import DRIFT_GROUPS, DRIFT_QUANTILES
from pipeline import reference as ref
from pipeline.tables import Cell, Column, Counts, Row, Table, to_csv, to_latex, to_markdown

AGGREGATE_EXPERIMENT = "aggregate"
# Every field that changes a result, except the seed: runs that share these values are one cell,
# and their seeds are averaged.
KEY_FIELDS: tuple[str, ...] = tuple(f for f in FIELD_NAMES if f not in EXECUTION_FIELDS
                                    and f != "seed")
_HINTS = get_type_hints(TrainConfig)
_DEFAULTS = TrainConfig()

# The field(s) each known sweep varies. Known by name so that an ablation whose other values are
# not run yet still gets its axis (and the paper's rows as missing); unknown sweeps are grouped
# by whatever fields vary among their runs.
SWEEP_AXES: dict[str, tuple[str, ...]] = {
    "base2novel": (), "cross_dataset": (), "domain_generalization": (),
    "ablation_steps": ("num_steps",), "ablation_layer": ("inject_layer",),
    "ablation_modality": ("modality",), "ablation_loop": ("variant",),
    "alignment": ("anchor_weight",),
}
# Fields that describe data, not a setting being ablated.
_DATA_FIELDS = ("dataset", "eval_datasets", "protocol")

MODALITY_METHOD = {"vision": "Vision only", "text": "Text only", "both": "PERL"}
VARIANT_METHOD = {"early": "PERL-Early", "deep": "PERL-Deep", "shared": "PERL-Shared",
                  "step": "PERL-Step", "layer": "PERL-Layer", "layerstep": "PERL-LayerStep"}
PARAM_COUNT_KEYS = ("num_trainable_parameters", "trainable_parameters", "num_trainable_params")
# Evalsets of the training dataset itself (val = few-shot validation split): never transfer targets.
NON_TARGET_EVALSETS = ("base", "novel", "all", "val")
STEP_METRICS = (("acc", "accuracy (%)", 2, "higher"), ("confidence", "confidence", 2, "higher"),
                ("brier", "Brier score", 4, "lower"), ("kl", "KL from step 0", 4, "none"),
                ("jacobian", "input Jacobian norm", 3, "none"),
                ("cos_true", "cos(image, own class text)", 4, "none"),
                ("cos_wrong", "cos(image, nearest wrong class text)", 4, "none"),
                ("margin", "cos margin (own - nearest wrong)", 4, "none"),
                ("gap", "modality gap", 4, "none"))
# The metrics Fig. 7 prints (pipeline.reference's F7 rows).
F7_METRICS = ("acc", "confidence", "brier", "jacobian")
# Alignment at the final step, beside accuracy and anchor cos in the alignment ablation table:
# (column stem, per-step metric, label).
ALIGNMENT_COLUMNS = (("cos_true", "cos_true", "cos true"), ("margin", "margin", "margin"),
                     ("gap", "gap", "gap"))

Key = tuple  # values of KEY_FIELDS, in order (None where a run did not log the field)


# --- reading MLflow -------------------------------------------------------------------------


def default_tracking_uri() -> str:
    """The pipeline's default: $MLFLOW_TRACKING_URI, else SQLite under ./runs (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or \
        f"sqlite:///{(Path.cwd() / 'runs' / 'mlflow.db').resolve()}"


def redact_uri(uri: str) -> str:
    """The URI without user:password (never print or log credentials)."""
    parts = urlsplit(uri)
    if parts.username or parts.password:
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))
    return uri


def make_client(tracking_uri: str, *, must_exist: bool = True):
    from pipeline.tracking import mlflow_client, sqlite_path

    db = sqlite_path(tracking_uri)
    if must_exist and db is not None and str(db) not in ("", ":memory:") and not db.exists():
        raise SystemExit(f"no MLflow store at {tracking_uri} (run a sweep first, or pass "
                         "--tracking-uri)")
    return mlflow_client(tracking_uri)


def search_all_runs(client, experiment_ids: list[str], filter_string: str = "") -> list:
    """Every run of the experiments, following page tokens (search_runs returns <= 1000 a page)."""
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000,
                                  page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


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
    exps, token = [], None
    while True:
        page = client.search_experiments(max_results=1000, page_token=token)
        exps.extend(page)
        token = page.token
        if not token:
            break
    return {e.experiment_id: e.name for e in exps
            if e.name != AGGREGATE_EXPERIMENT
            and client.search_runs([e.experiment_id], "tags.sweep LIKE '%'", max_results=1)}


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


def _parse_tuple(v: Any, item_type: type) -> str | None:
    """Canonical text of a tuple param ("[3, 7, 11]"); MLflow may hold JSON, a repr, or CSV."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    s = str(v).strip()
    if s in ("", "()", "[]"):
        return "[]"
    try:
        items = json.loads(s) if s.startswith("[") else None
    except ValueError:
        items = None
    if items is None and s[0] in "[(":
        try:
            items = list(ast.literal_eval(s))
        except (ValueError, SyntaxError):
            return None
    if items is None:
        items = [p.strip() for p in s.split(",") if p.strip()]
    try:
        return json.dumps([item_type(x) for x in items])
    except (TypeError, ValueError):
        return None


def cast_params(df: pd.DataFrame, warnings: list[str] | None = None) -> pd.DataFrame:
    """Cast `params.<TrainConfig field>` from MLflow strings to the field's type.

    ints -> Int64, floats -> Float64, tuples -> canonical JSON text, the rest -> str. A value that
    does not parse becomes NA and is reported (never silently coerced to something else).
    """
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
        if hint is int:
            new = pd.to_numeric(raw, errors="coerce").astype("Float64")
            bad = new.notna() & (new % 1 != 0)
            new = new.mask(bad).astype("Int64")
        elif hint is float:
            new = pd.to_numeric(raw, errors="coerce").astype("Float64")
        elif get_origin(hint) is tuple:
            item_t = get_args(hint)[0]
            new = pd.Series([_parse_tuple(v, item_t) for v in raw], index=df.index, dtype="str")
        else:
            new = raw.astype("str")
        lost = raw.notna() & new.isna()
        if warnings is not None and lost.any():
            warnings.append(f"param {name!r}: {int(lost.sum())} value(s) not a valid "
                            f"{getattr(hint, '__name__', hint)} (e.g. {raw[lost].iloc[0]!r}); "
                            "treated as missing")
        df[col] = new
    return _canonical_params(df)


def _canonical_params(df: pd.DataFrame) -> pd.DataFrame:
    """Two spellings of one model (one config hash) get one table key (`canonical_values`)."""
    cols = [f for f in CANONICAL_FIELDS if f"params.{f}" in df.columns]
    if "params.dataset" not in df.columns or not cols:
        return df
    for i in df.index[df["params.dataset"].notna()]:
        vals = {f: _val(df.at[i, f"params.{f}"]) for f in cols}
        for f, v in canonical_values(vals).items():
            if v != vals[f]:
                df.at[i, f"params.{f}"] = v
    return df


# --- resolving runs into cells -----------------------------------------------------------------


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


def _val(v: Any) -> Any:
    """A hashable plain value (pandas NA -> None, numpy scalars -> Python)."""
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return None
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return float(v)
    return v


def row_key(row: pd.Series) -> Key:
    return tuple(_val(row.get(f"params.{f}")) for f in KEY_FIELDS)


def kget(key: Key, name: str) -> Any:
    return key[KEY_FIELDS.index(name)]


def kreplace(key: Key, canonical: bool = True, **changes: Any) -> Key:
    """`key` with fields changed, in the canonical spelling of table keys (`canonical_values`)."""
    k = dict(zip(KEY_FIELDS, key))
    k.update(changes)
    if canonical:
        k.update(canonical_values({f: k[f] for f in CANONICAL_FIELDS if f in k}))
    return tuple(k[f] for f in KEY_FIELDS)


def sweep_name(tag: Any) -> str:
    s = "" if tag is None or (isinstance(tag, float) and math.isnan(tag)) else str(tag)
    s = s.rstrip("/").split("/")[-1]
    for suffix in (".yaml", ".yml"):
        s = s.removesuffix(suffix)
    return s


NOT_A_TRIAL = "not a trial run (no config_hash)"
NO_PARAMS = "no params logged (a run cut off before logging them)"


def resolve(df: pd.DataFrame) -> tuple[Pool, pd.DataFrame]:
    """Dedupe by config_hash: the latest FINISHED run wins; a hash with no FINISHED run is FAILED
    if any run failed, else incomplete. Returns the pool and `df` with a `resolution` column."""
    pool = Pool()
    df = df.copy()
    df["resolution"] = pd.Series(["ignored"] * len(df), index=df.index, dtype="str")
    trial = df["tags.config_hash"].notna() & (df["tags.config_hash"].astype("str") != "")
    df.loc[~trial, "resolution"] = NOT_A_TRIAL
    # a run created but cut off (e.g. an MLflow outage) before its params were logged: it cannot
    # be placed in any table; its cell is still covered by its replayed or re-run twin
    no_params = trial & (df["params.dataset"].isna() if "params.dataset" in df
                         else pd.Series(True, index=df.index))
    df.loc[no_params, "resolution"] = NO_PARAMS
    trial &= ~no_params
    hpo = trial & (df["tags.phase"].astype("str") == "hpo")
    df.loc[hpo, "resolution"] = HPO_RESOLUTION
    sel = df[trial & ~hpo].sort_values(["end_time", "start_time"], kind="stable")
    param_cols = {f"params.{f}" for f in FIELD_NAMES}
    for h, grp in sel.groupby("tags.config_hash", sort=False):
        fin = grp[grp["status"] == "FINISHED"]
        bad = grp[grp["status"] == "FAILED"]
        if len(fin):
            chosen, target, label = fin.iloc[-1], pool.finished, "used"
        elif len(bad):
            chosen, target, label = bad.iloc[-1], pool.failed, "failed"
        else:
            chosen, target, label = grp.iloc[-1], pool.incomplete, str(grp.iloc[-1]["status"])
        for idx in grp.index:
            df.loc[idx, "resolution"] = (label if idx == chosen.name else
                                         f"superseded by {chosen['run_id']}")
        seed = _val(chosen.get("params.seed"))
        extra = {}
        for c, v in chosen.items():
            if (c.startswith("params.") and c not in param_cols) or c.startswith("tags."):
                if _val(v) is not None:
                    extra[c.split(".", 1)[1]] = str(v)
        sr = SeedRun(
            run_id=chosen["run_id"], experiment_id=chosen["experiment_id"],
            status=chosen["status"], seed=seed, key=row_key(chosen),
            metrics={c[len("metrics."):]: float(v) for c, v in chosen.items()
                     if c.startswith("metrics.") and _val(v) is not None},
            extra=extra, reason=str(_val(chosen.get("tags.status_detail")) or ""),
            sweep=sweep_name(chosen.get("tags.sweep")))
        # Two hashes for one (key, seed) only happen across schema versions (same settings):
        # either run is a valid result, the last one visited is kept.
        target.setdefault(sr.key, {})[seed] = sr
    # A seed that FINISHED under one hash is not failed under another.
    for key, seeds in list(pool.failed.items()):
        for s in list(seeds):
            if s in pool.finished.get(key, {}):
                del seeds[s]
        if not seeds:
            del pool.failed[key]
    return pool, df


# --- statistics --------------------------------------------------------------------------------


def hm(b: float | None, n: float | None) -> float | None:
    if b is None or n is None:
        return None
    return 0.0 if b + n == 0 else 2 * b * n / (b + n)


def metric(name: str) -> Callable[[SeedRun], float | None]:
    def get(r: SeedRun) -> float | None:
        v = r.metrics.get(name)
        return None if v is None or math.isnan(v) else v
    get.__name__ = name
    return get


def seed_hm(r: SeedRun) -> float | None:
    """This seed's HM: the logged `hm`, else HM of its base and novel accuracies."""
    v = r.metrics.get("hm")
    if v is not None and not math.isnan(v):
        return v
    return hm(r.metrics.get("base/acc"), r.metrics.get("novel/acc"))


def _std(vals: list[float]) -> float | None:
    return statistics.stdev(vals) if len(vals) >= 2 else None


def seed_values(pool: Pool, key: Key, fn: Callable[[SeedRun], float | None]) -> dict[int, float]:
    out = {}
    for s, r in pool.finished_seeds(key).items():
        v = fn(r)
        if v is not None:
            out[s] = v
    return out


def cell_over_seeds(pool: Pool, key: Key, fn: Callable[[SeedRun], float | None]) -> Cell:
    vals = seed_values(pool, key, fn)
    fin = pool.finished_seeds(key)
    failed = pool.failed_seeds(key)
    return Cell(
        mean=statistics.fmean(vals.values()) if vals else None,
        std=_std(list(vals.values())), n=len(vals), n_failed=len(failed),
        run_ids=tuple(fin[s].run_id for s in sorted(vals, key=_seed_order)),
        failed_run_ids=tuple(r.run_id for r in failed.values()),
        failure_reasons=tuple(r.reason for r in failed.values() if r.reason))


def _seed_order(s: Any) -> tuple:
    return (s is None, s if isinstance(s, (int, float)) else 0, str(s))


def cell_over_datasets(pool: Pool, keys: list[Key],
                       fn: Callable[[SeedRun], float | None]) -> Cell:
    """Mean over datasets of the per-dataset seed means; ± over seeds of the per-seed average."""
    per = [(k, seed_values(pool, k, fn)) for k in keys]
    present = [(k, v) for k, v in per if v]
    failed = [r for k in keys for r in pool.failed_seeds(k).values()]
    cell = Cell(n_failed=len(failed), failed_run_ids=tuple(r.run_id for r in failed),
                failure_reasons=tuple(r.reason for r in failed if r.reason))
    if not present:
        return cell
    cell.mean = statistics.fmean(statistics.fmean(v.values()) for _, v in present)
    common = set.intersection(*(set(v) for _, v in present))
    per_seed = [statistics.fmean(v[s] for _, v in present) for s in common]
    cell.std = _std(per_seed)
    cell.n = len(common) if common else min(len(v) for _, v in present)
    cell.run_ids = tuple(pool.finished_seeds(k)[s].run_id for k, v in present
                         for s in sorted(v, key=_seed_order))
    if len(present) < len(keys):
        cell.note = f"average over {len(present)} of {len(keys)} datasets"
    return cell


def cell_over(pool: Pool, keys: list[Key], fn: Callable[[SeedRun], float | None]) -> Cell:
    """One cell key: its mean over seeds; several (one per dataset): their average."""
    return cell_over_seeds(pool, keys[0], fn) if len(keys) == 1 else \
        cell_over_datasets(pool, keys, fn)


def hm_of_cells(b: Cell, n: Cell) -> Cell:
    """CoOp convention: HM of the (already averaged) Base and Novel cells; no ± of its own."""
    if b.status != "ok" or n.status != "ok":
        return Cell(n_failed=max(b.n_failed, n.n_failed),
                    failed_run_ids=tuple(dict.fromkeys(b.failed_run_ids + n.failed_run_ids)),
                    failure_reasons=b.failure_reasons + n.failure_reasons)
    return Cell(mean=hm(b.mean, n.mean), n=min(b.n, n.n), n_failed=max(b.n_failed, n.n_failed),
                run_ids=tuple(dict.fromkeys(b.run_ids + n.run_ids)),
                failed_run_ids=tuple(dict.fromkeys(b.failed_run_ids + n.failed_run_ids)),
                note=b.note or n.note)


def attach_paper(cell: Cell, table: str, method: str | None, dataset: str | None, metric_: str,
                 no_diff_reason: str = "") -> Cell:
    if method is None or dataset is None:
        return cell
    row = ref.paper_entry(table, method, dataset, metric_)
    if row is not None:
        cell.paper, cell.paper_text, cell.paper_approx = row.value, row.text, row.approximate
        cell.paper_note = f"{table} {method} {dataset} {metric_}" + (f"; {row.note}" if row.note
                                                                      else "")
        cell.no_diff_reason = no_diff_reason
    return cell


# --- sweeps -----------------------------------------------------------------------------------


@dataclass
class SweepView:
    """The runs one sweep submitted (phase final), for one protocol."""
    sweep: str
    protocol: str
    keys: list[Key]  # distinct cell keys the sweep has runs for (any status)
    seeds: list[Any]
    axis: tuple[str, ...]  # fields that index the rows (empty: a plain protocol table)
    constants: dict[str, Any]  # fields with one value across the sweep
    datasets: list[str]
    experiment_id: str
    experiment: str  # experiment name
    # a sweep with arms (`spec.py`): the arm names in sweep order and each arm's cell keys (a key
    # two arms share is in both); empty for sweeps without arms and for runs older than arms
    arms: tuple[str, ...] = ()
    arm_keys: dict[str, list[Key]] = field(default_factory=dict)
    # per arm the values it pins (`spec.arm_signature`); in an arm's own view, that arm's
    arm_pins: dict[str, dict[str, Any]] = field(default_factory=dict)
    pins: dict[str, Any] = field(default_factory=dict)

    def template(self) -> Key:
        """A key to derive never-run cells from: an observed one, with what the arm pins spelled
        out (an observed J=7 key reads "text follows"; the vision_J arm pins the text J at 7)."""
        pins = dict(self.pins)
        text_j = {_text_j(k) for k in self.keys}
        if "text_inject_layer" not in pins and len(text_j) == 1:  # a constant text J is pinned
            pins["text_inject_layer"] = text_j.pop()
        return kreplace(self.keys[0], **{f: v for f, v in pins.items() if f in KEY_FIELDS},
                        canonical=False)


def dataset_order(names: Iterable[str]) -> list[str]:
    """The paper's order for its datasets, then everything else alphabetically."""
    names = list(dict.fromkeys(n for n in names if n))
    pos = {d: i for i, d in enumerate(ref.PAPER_DATASETS)}

    def k(n: str) -> tuple:
        p = ref.paper_dataset(n)
        return (0, pos[p], n) if p in pos else (1, 0, n.lower())
    return sorted(names, key=k)


def sweep_views(df: pd.DataFrame) -> list[SweepView]:
    """One view per (experiment, sweep tag, protocol). Split by experiment too, so that e.g. a
    toy-world and a real-data submission of the same sweep file are never averaged together."""
    trial = df[~df["resolution"].isin([NOT_A_TRIAL, NO_PARAMS, HPO_RESOLUTION])]
    views = []
    sweeps = trial["tags.sweep"].map(sweep_name)
    groups = sorted({(e, sw) for e, sw in zip(trial["experiment_id"], sweeps)},
                    key=lambda g: (g[1], str(g[0])))
    for exp_id, sw in groups:
        part = trial[(sweeps == sw) & (trial["experiment_id"] == exp_id)]
        protos = part["params.protocol"] if "params.protocol" in part else \
            pd.Series(["base2novel"] * len(part), index=part.index)
        for proto in sorted(set(protos.astype("str"))):
            sub = part[protos.astype("str") == proto]
            keys = list(dict.fromkeys(row_key(r) for _, r in sub.iterrows()))
            seeds = sorted({_val(s) for s in sub.get("params.seed", pd.Series(dtype="str"))},
                           key=_seed_order)
            distinct = {f: {kget(k, f) for k in keys} for f in KEY_FIELDS}
            varying = tuple(f for f in KEY_FIELDS if f not in _DATA_FIELDS and _varies(keys, f))
            declared = SWEEP_AXES.get(sw)
            axis = varying if declared is None else \
                declared + tuple(f for f in varying if f not in declared)
            arms, arm_keys, arm_pins = _view_arms(sub)
            views.append(SweepView(
                sweep=sw or "(untagged)", protocol=proto, keys=keys, seeds=seeds, axis=axis,
                constants={f: next(iter(v)) for f, v in distinct.items() if len(v) == 1},
                datasets=dataset_order(str(kget(k, "dataset")) for k in keys),
                experiment_id=str(exp_id), experiment=str(sub["experiment"].iloc[0]),
                arms=arms, arm_keys=arm_keys, arm_pins=arm_pins))
    return views


def _tag_list(v: Any) -> list[str]:
    v = _val(v)
    return [a for a in str(v).split(",") if a] if v is not None else []


def _view_arms(sub: pd.DataFrame
               ) -> tuple[tuple[str, ...], dict[str, list[Key]], dict[str, dict[str, Any]]]:
    """The arms of one view's runs, from their `arm` / `sweep_arms` tags (none: no arms). The
    order is the sweep file's (`sweep_arms` of the latest run), then any other arm seen. A run
    without an `arm` tag (finished before the sweep had arms) joins every arm whose
    `sweep_arm_spec` it fits."""
    if "tags.arm" not in sub:
        return (), {}, {}
    arm_keys: dict[str, list[Key]] = {}
    order: list[str] = []
    signature: dict[str, dict] = {}
    untagged = []
    for _, r in sub.sort_values(["end_time", "start_time"], kind="stable").iterrows():
        order = _tag_list(r.get("tags.sweep_arms")) or order
        signature = _arm_spec(r.get("tags.sweep_arm_spec")) or signature
        arms_of_run = _tag_list(r.get("tags.arm"))
        if not arms_of_run:
            untagged.append(r)
        for a in arms_of_run:
            keys = arm_keys.setdefault(a, [])
            if row_key(r) not in keys:
                keys.append(row_key(r))
    if not arm_keys:
        return (), {}, {}
    for r in untagged:
        for a, sig in signature.items():
            if _fits_arm(r, sig) and row_key(r) not in arm_keys.setdefault(a, []):
                arm_keys[a].append(row_key(r))
    arms = tuple(a for a in order if a in arm_keys) + tuple(a for a in arm_keys if a not in order)
    return arms, arm_keys, {a: dict(signature.get(a, {}).get("fixed") or {}) for a in arms}


def _arm_spec(v: Any) -> dict[str, dict]:
    v = _val(v)
    try:
        return json.loads(v) if v else {}
    except ValueError:
        return {}


def _fits_arm(row: pd.Series, sig: dict) -> bool:
    """Does a run's config belong to the arm `sig` (`spec.arm_signature`)? Compared in canonical
    spelling (`canonical_values`), so e.g. text J 7 at J=7 fits an arm that says "text follows"."""
    def param(f: str) -> Any:
        v = _val(row.get(f"params.{f}"))
        return json.loads(v) if isinstance(v, str) and v.startswith("[") else v
    own = {f: param(f) for f in CANONICAL_FIELDS}
    mine = canonical_values(own)
    for f, want in (sig.get("fixed") or {}).items():
        got = mine[f] if f in mine else param(f)
        if f in mine:
            want = canonical_values({**own, f: want})[f]
        if got != want:
            return False
    return all(param(f) in values for f, values in (sig.get("grid") or {}).items())


def arm_axis(view: SweepView) -> tuple[str, ...]:
    """The fields of `view.axis` that vary within some arm (the rows inside an arm's block); the
    fields that only differ between arms are named by the arm label instead."""
    if not view.arms:
        return view.axis
    return tuple(f for f in view.axis if any(_varies(view.arm_keys[a], f) for a in view.arms))


def _varies(keys: list[Key], f: str) -> bool:
    if f == "text_inject_layer":
        # a cell whose text J equals its vision J is one run whether written J or -1
        # (TrainConfig.hashed_fields): the text J varies only if it is neither constant nor J
        text_j = [_text_j(k) for k in keys]
        return len(set(text_j)) > 1 and any(t != kget(k, "inject_layer")
                                            for t, k in zip(text_j, keys))
    return len({kget(k, f) for k in keys}) > 1


def arm_views(view: SweepView) -> list[tuple[str | None, SweepView]]:
    """(arm, the view restricted to that arm's keys and to `arm_axis`) per arm, in sweep order;
    [(None, view)] for a sweep without arms."""
    if not view.arms:
        return [(None, view)]
    axis = arm_axis(view)
    return [(a, replace(view, keys=view.arm_keys[a], axis=axis, arms=(), arm_keys={},
                        arm_pins={}, pins=view.arm_pins.get(a, {})))
            for a in view.arms]


def fmt_value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def differing_settings(view: SweepView) -> list[str]:
    """Constant settings of the sweep that differ from the paper's (TrainConfig defaults)."""
    out = []
    for f in ("arch", "pretrained", "shots", "epochs", "lr", "batch_size", "rank",
              "anchor_weight", "inject_layer", "num_steps", "modality", "variant", "template",
              "precision", "weight_decay", "aug_scale_min"):
        if f in view.axis or f not in view.constants:
            continue
        v, d = view.constants[f], getattr(_DEFAULTS, f)
        numeric = isinstance(d, (int, float)) and isinstance(v, (int, float))
        if v is not None and not (v == d or (numeric and float(v) == float(d))):
            out.append(f"{f}={fmt_value(v)}")
    return out


def settings_note(view: SweepView) -> list[str]:
    diff = differing_settings(view)
    if not diff:
        return []
    return ["Settings that differ from the paper's defaults: " + ", ".join(diff)
            + ". Paper numbers are a reference, not a like-for-like target."]


def count_cells(pool: Pool, keys: Iterable[Key], seeds: list[Any]) -> Counts:
    c = Counts()
    for k in keys:
        fin, bad = pool.finished_seeds(k), pool.failed_seeds(k)
        c.expected += len(seeds)
        c.found += sum(1 for s in seeds if s in fin)
        c.failed += sum(1 for s in seeds if s in bad and s not in fin)
    return c


# --- table builders -------------------------------------------------------------------------


def _b2n_columns(with_cos: bool = False) -> list[Column]:
    cols = [
        Column("base", "Base", help="base-class accuracy (%), mean over seeds"),
        Column("novel", "Novel", help="novel-class accuracy (%), mean over seeds"),
        Column("hm", "HM (PERL conv.)",
               help="per dataset: mean of per-seed HMs; average: mean of per-dataset HMs"),
        Column("hm_coop", "HM (CoOp conv.)",
               help="per dataset: HM of mean Base, mean Novel; average: HM(Avg Base, Avg Novel)"),
    ]
    if with_cos:
        cols += [Column("base_anchor_cos", "anchor cos (base)", 4, "none"),
                 Column("novel_anchor_cos", "anchor cos (novel)", 4, "none")]
        cols += [Column(f"{ev}_{stem}", f"{label} ({ev}, step K)", 4, "none",
                        help=f"{ev} set at each run's final step K, mean over seeds / "
                             "datasets (definitions: docs/method.md)")
                 for ev in ("base", "novel") for stem, _m, label in ALIGNMENT_COLUMNS]
    return cols


def final_step_metric(name: str) -> Callable[[SeedRun], float | None]:
    """`<evalset>/<metric>_step{K}` of each run at its own final step K (the largest logged)."""
    def get(r: SeedRun) -> float | None:
        steps = [int(m.rsplit("_step", 1)[1]) for m in r.metrics
                 if m.startswith(f"{name}_step") and m.rsplit("_step", 1)[1].isdigit()]
        return metric(f"{name}_step{max(steps)}")(r) if steps else None
    get.__name__ = f"{name}_final"
    return get


def _b2n_cells(pool: Pool, keys: list[Key], with_cos: bool = False) -> dict[str, Cell]:
    cells = {"base": cell_over(pool, keys, metric("base/acc")),
             "novel": cell_over(pool, keys, metric("novel/acc")),
             "hm": cell_over(pool, keys, seed_hm)}
    if with_cos:
        cells.update({f"{ev}_anchor_cos": cell_over(pool, keys, metric(f"{ev}/anchor_cos"))
                      for ev in ("base", "novel")})
        cells.update({f"{ev}_{stem}": cell_over(pool, keys, final_step_metric(f"{ev}/{m}"))
                      for ev in ("base", "novel") for stem, m, _l in ALIGNMENT_COLUMNS})
    cells["hm_coop"] = hm_of_cells(cells["base"], cells["novel"])
    return cells


def _finished_datasets(pool: Pool, keys: list[Key]) -> set[str]:
    return {str(kget(k, "dataset")) for k in keys if pool.finished_seeds(k)}


def _average_comparability(pool: Pool, keys: list[Key], paper_set: tuple[str, ...]) -> str:
    """'' when our average covers exactly the paper's datasets, else why Δ is not computed."""
    ours = {ref.paper_dataset(d) for d in _finished_datasets(pool, keys)}
    if ours == set(paper_set):
        return ""
    return (f"not compared: ours averages {len(ours)} dataset(s), the paper's average is over "
            f"the {len(paper_set)} of its suite")


def _keys_for_datasets(view: SweepView, datasets: list[str], **fields: Any) -> list[Key]:
    """The cell key of each dataset for one row: an observed key when there is one, else the
    sweep's template with the fields replaced (a cell that was never submitted)."""
    out = []
    for d in datasets:
        want = {"dataset": d, **fields}
        match = [k for k in view.keys if all(kget(k, f) == v for f, v in want.items())]
        out.append(match[0] if match else kreplace(view.template(), **want))
    return out


def _real(view: SweepView) -> bool:
    return any(ref.paper_dataset(d) for d in view.datasets)


def _step0_cells(pool: Pool, keys: list[Key]) -> dict[str, Cell]:
    """Step-0 (zero-shot) base / novel / HM cells of one dataset (one key) or their average."""
    def hm0(r: SeedRun) -> float | None:
        return hm(metric("base/acc_step0")(r), metric("novel/acc_step0")(r))

    return {"base0": cell_over(pool, keys, metric("base/acc_step0")),
            "novel0": cell_over(pool, keys, metric("novel/acc_step0")),
            "hm0": cell_over(pool, keys, hm0)}


def table_base2novel(pool: Pool, view: SweepView) -> Table:
    """Tables 1 and 5: per dataset Base / Novel / HM (both conventions) and the averages, and
    our step 0 (zero-shot CLIP) beside the paper's CLIP row."""
    datasets = list(view.datasets)
    if _real(view):  # the paper's suite: datasets not run yet are shown as missing
        datasets = dataset_order(datasets + [d for d in ref.B2N_DATASETS
                                             if d not in {ref.paper_dataset(x) for x in datasets}])
    keys = _keys_for_datasets(view, datasets)
    # step 0 of the same runs is zero-shot CLIP: beside the paper's CLIP row (Table 1's are
    # CoCoOp's), the first place a wrong class-name file, split, preprocessing or template shows
    step0 = [Column("base0", "Base step 0", help="our zero-shot CLIP: base/acc_step0"),
             Column("novel0", "Novel step 0", help="our zero-shot CLIP: novel/acc_step0"),
             Column("hm0", "HM step 0", help="per seed HM(base/acc_step0, novel/acc_step0), "
                                             "averaged as HM (PERL conv.)")]
    t = Table(name=f"table1_5_base2novel__{view.sweep}",
              title=f"Tables 1/5 — base-to-novel, per dataset (sweep `{view.sweep}`)",
              index=("dataset",), columns=_b2n_columns() + step0, sweep=view.sweep,
              paper_ref="PERL row of Table 5 per dataset, Table 1 averages; step-0 columns: the "
                        "CLIP row", plot="bars", x_label="dataset")
    for d, k in zip(datasets, keys):
        cells = {**_b2n_cells(pool, [k]), **_step0_cells(pool, [k])}
        p = ref.paper_dataset(d)
        for m in ("base", "novel", "hm"):
            attach_paper(cells[m], "T5", "PERL", p, m)
            attach_paper(cells[f"{m}0"], "T5", "CLIP", p, m)
        t.rows.append(Row(label=(d,), cells=cells, x=d))
    avg = {**_b2n_cells(pool, keys), **_step0_cells(pool, keys)}
    if _real(view):
        why = _average_comparability(pool, keys, ref.B2N_DATASETS)
        for m in ("base", "novel", "hm"):
            attach_paper(avg[m], "T1", "PERL", "average", m, why)
            attach_paper(avg[f"{m}0"], "T1", "CLIP", "average", m, why)
        if any(kget(k, "template") != "coop" for k in keys):
            t.notes.append("Step-0 columns: these runs prompt with the generic template; the "
                           "paper's CLIP row used CoOp's per-dataset templates, so Δ there mixes "
                           "in the template. The like-for-like check is `python -m pipeline.run "
                           "SWEEP.yaml --zero-shot-check` (its coop row).")
        if why:
            t.notes.append(f"Average row: paper value shown, Δ {why}.")
    t.rows.append(Row(label=("Average",), cells=avg, kind="average"))
    t.counts = count_cells(pool, keys, view.seeds)
    t.notes += [
        "HM (PERL conv.): per dataset the mean of per-seed HMs, Average = mean of the per-dataset"
        " HMs (the paper's Avg HM convention).",
        "HM (CoOp conv.): per dataset HM(mean Base, mean Novel), Average = HM(Avg Base, Avg "
        "Novel); the paper prints no PERL number in this convention.",
    ] + settings_note(view)
    return t


def _axis_label(view: SweepView, key: Key) -> tuple[str, ...]:
    return tuple(fmt_value(kget(key, f)) for f in view.axis)


def _text_j(key: Key) -> Any:
    """The text tower's J of a cell (`text_inject_layer` -1 or not logged: the vision J)."""
    t = kget(key, "text_inject_layer")
    return kget(key, "inject_layer") if t is None or t < 0 else t


def _paper_for_axis(axis: tuple[str, ...], values: dict[str, Any],
                    keys: list[Key] = ()) -> tuple[str, str] | None:
    """(paper table, method) of one ablation row, where the paper has that ablation. `keys`: the
    row's cells (Fig. 3a compares only rows whose text tower stays at the paper's J)."""
    if axis == ("num_steps",):
        return "F3b", f"PERL K={values['num_steps']}"
    if axis == ("inject_layer",):
        # the caption varies J "of the visual encoder"; Appendix A keeps the text J at 7
        if keys and any(_text_j(k) != _DEFAULTS.inject_layer for k in keys):
            return None
        return "F3a", f"PERL J={values['inject_layer']}"
    if axis == ("modality",):
        m = MODALITY_METHOD.get(values["modality"])
        return ("T3", m) if m else None
    if axis and axis[0] == "variant" and set(axis) <= {
            "variant", "inject_layer", "inject_layers", "text_inject_layer", "variant_projectors"}:
        m = VARIANT_METHOD.get(values["variant"])
        return ("T4", m) if m else None
    return None


_PAPER_AXIS_VALUES = {"num_steps": [1, 2, 3, 4, 5], "inject_layer": [6, 7, 8, 9, 10, 11],
                      "modality": ["vision", "text", "both"],
                      "variant": ["early", "deep", "shared", "step", "layer", "layerstep"]}
_ABLATION_TITLES = {
    ("num_steps",): ("fig3b_num_steps", "Fig. 3b — number of reasoning steps K (num_steps)"),
    ("inject_layer",): ("fig3a_inject_layer", "Fig. 3a — injection layer J (inject_layer)"),
    ("modality",): ("table3_modality", "Table 3 — modality ablation"),
    ("variant",): ("table4_loop", "Table 4 — reasoning-loop configuration"),
    ("anchor_weight",): ("alignment_anchor_weight",
                         "Alignment ablation — anchor weight λ (anchor_weight)"),
}


PARAMS_OURS, PARAMS_PAPER = "trainable params (ours)", "params (paper)"  # info column headers


def _param_count(pool: Pool, keys: list[Key]) -> str:
    """The row's own trainable-parameter count, as its finished runs logged it (metric or tag);
    counts that disagree are all shown ("a / b"), never one picked."""
    seen: list[str] = []
    for k in keys:
        for r in pool.finished_seeds(k).values():
            for name in PARAM_COUNT_KEYS:
                v = r.metrics.get(name, r.extra.get(name))
                if v is not None:
                    try:
                        text = f"{int(float(v)):,}"
                    except ValueError:
                        text = str(v)
                    if text not in seen:
                        seen.append(text)
                    break
    return " / ".join(seen) or "—"


def _ablation_combos(pool: Pool, view: SweepView, with_paper_rows: bool) -> list[tuple]:
    """The value combinations of `view.axis` that index an ablation's rows, in the paper's order;
    with `with_paper_rows`, the paper's values never run too (shown as missing)."""
    combos = list(dict.fromkeys(tuple(kget(k, f) for f in view.axis) for k in view.keys))
    if with_paper_rows and len(view.axis) == 1 and _real(view) and \
            view.axis[0] in _PAPER_AXIS_VALUES:
        seen = {c[0] for c in combos}
        combos += [(v,) for v in _PAPER_AXIS_VALUES[view.axis[0]] if v not in seen]
    order = _PAPER_AXIS_VALUES.get(view.axis[0]) if view.axis else None

    def rank(v: Any) -> tuple:
        return (0, v) if isinstance(v, (int, float)) else (1, str(v))
    combos.sort(key=lambda c: (order.index(c[0]) if order and c[0] in order else 99,
                               *(rank(v) for v in c)))
    return combos


def table_b2n_ablation(pool: Pool, view: SweepView) -> tuple[Table, Table]:
    """An ablation over base-to-novel: rows = values of the varied field(s), cells = averages
    over the sweep's datasets. In a sweep with arms, a block of rows per arm (labelled by the
    arm; the fields only the arms set are named by it). Also returns the per-dataset detail."""
    groups = arm_views(view)
    axis = groups[0][1].axis
    arm_index = ("arm",) if view.arms else ()
    known = SWEEP_AXES.get(view.sweep, ())
    stem, title = _ABLATION_TITLES.get(axis, _ABLATION_TITLES.get(
        axis[:1] if known and axis[:1] == known[:1] else (),
        (f"ablation_{'_'.join(axis)}", f"Ablation over {', '.join(axis)}")))
    with_cos = "anchor_weight" in axis
    is_loop = axis[:1] == ("variant",)
    t = Table(name=f"{stem}__{view.sweep}",
              title=f"{title} (sweep `{view.sweep}`, base-to-novel averages over "
                    f"{len(view.datasets)} dataset(s))",
              index=arm_index + axis, columns=_b2n_columns(with_cos), sweep=view.sweep,
              info_columns=(PARAMS_OURS, PARAMS_PAPER) if (is_loop or axis == ("modality",))
              else ())
    detail = Table(name=f"detail_{stem}__{view.sweep}",
                   title=f"Per-dataset detail of {title.split(' — ')[0]} (sweep `{view.sweep}`)",
                   index=arm_index + axis + ("dataset",), columns=_b2n_columns(with_cos),
                   sweep=view.sweep, section="detail")
    all_keys: list[Key] = []
    paper_tables = set()
    all_combos = []
    for gi, (arm, sub) in enumerate(groups):
        # the paper's rows never run go to the first arm only: the sweep's main reading
        combos = _ablation_combos(pool, sub, with_paper_rows=gi == 0)
        all_combos += combos
        for combo in combos:
            values = dict(zip(axis, combo))
            keys = _keys_for_datasets(sub, view.datasets, **values)
            all_keys += keys
            cells = _b2n_cells(pool, keys, with_cos)
            label = tuple(fmt_value(v) for v in combo)
            x = combo[0] if len(combo) == 1 else " / ".join(map(fmt_value, combo))
            row = Row(label=((arm,) if arm else ()) + label, cells=cells,
                      x=x if arm is None or isinstance(x, (int, float)) else f"{arm} / {x}")
            target = _paper_for_axis(axis, values, keys) if _real(view) else None
            if target:
                why = _average_comparability(pool, keys, ref.B2N_DATASETS)
                for m in ("base", "novel", "hm"):
                    attach_paper(cells[m], target[0], target[1], "average", m, why)
                paper_tables.add(target[0])
                entry = ref.paper_entry(target[0], target[1], "average", "hm")
                if entry is not None:
                    row.info[PARAMS_PAPER] = entry.params
            if t.info_columns:
                row.info[PARAMS_OURS] = _param_count(pool, keys)
            t.rows.append(row)
            for d, k in zip(view.datasets, keys):
                detail.rows.append(Row(label=row.label + (d,),
                                       cells=_b2n_cells(pool, [k], with_cos)))
    numeric = len(axis) == 1 and all(
        isinstance(c[0], (int, float)) for c in all_combos if c[0] is not None)
    t.plot, t.x_label = ("curve" if numeric else "bars"), " / ".join(axis)
    if t.info_columns and all(r.info.get(PARAMS_PAPER, "") == "" for r in t.rows):
        t.info_columns = (PARAMS_OURS,)
    t.paper_ref = ", ".join(sorted(paper_tables)) + " (base-to-novel averages over 11 datasets)" \
        if paper_tables else ""
    if any(c.status == "ok" and c.paper is not None and c.no_diff_reason
           for r in t.rows for c in r.cells.values()):  # rows never run need no note
        t.notes.append("Δ not computed (n/c) where our average does not cover the paper's 11 "
                       "datasets: a partial average is not comparable to the paper's.")
    if "F3a" in paper_tables or "F3b" in paper_tables:
        t.notes.append("Fig. 3 values other than the default row are read off the plot (`~`).")
    if axis == ("inject_layer",) and _real(view):
        t.notes.append("Fig. 3a varies J \"of the visual encoder\": its values stand only beside "
                       "rows whose text tower stays at J=7 (text_inject_layer 7); rows where "
                       "the text J moves too (text_inject_layer -1, e.g. arm both_towers) have "
                       "no paper counterpart.")
    if is_loop:
        t.notes.append(f"{PARAMS_OURS}: each row's trainable parameters as its runs logged "
                       f"them; {PARAMS_PAPER}: Table 4's params column. The paper's 32K/26K/83K "
                       f"fit variant_projectors shared_plus_specific (the shared pair kept, the "
                       f"specific projectors added); specific_only is the other reading "
                       f"(docs/method.md).")
    if view.arms:
        t.notes.append(f"Rows: one block per arm of the sweep ({', '.join(view.arms)}); an arm "
                       f"is a labelled sub-grid (docs/sweeps.md). Fields set per arm: "
                       f"{', '.join(f for f in view.axis if f not in axis) or 'none'}.")
    t.notes += [f"Rows: values of {', '.join(axis)}; every other setting as in the sweep. "
                f"Datasets averaged: {', '.join(view.datasets)}.",
                "HM (PERL conv.) = mean of per-dataset HMs (each the mean of per-seed HMs); "
                "HM (CoOp conv.) = HM(Avg Base, Avg Novel)."] + settings_note(view)
    t.counts = count_cells(pool, list(dict.fromkeys(all_keys)), view.seeds)
    detail.counts = t.counts
    detail.notes = ["Per dataset: mean ± std over seeds; no paper numbers exist at this level."]
    return t, detail


def _seed_averages(pool: Pool, keys: list[Key],
                   fn: Callable[[SeedRun], float | None]) -> dict[Any, float]:
    """Per seed, the mean over the datasets that have results of that metric, for the seeds
    present in every such dataset (the per-seed averages behind `cell_over_datasets`'s ±)."""
    present = [v for v in (seed_values(pool, k, fn) for k in keys) if v]
    if not present:
        return {}
    common = set.intersection(*(set(v) for v in present))
    return {s: statistics.fmean(v[s] for v in present) for s in common}


def _delta_cell(pool: Pool, keys: list[Key], ref_keys: list[Key], ours: Cell, reference: Cell,
                fn: Callable[[SeedRun], float | None]) -> Cell:
    """ours − reference: the difference of the two averages shown in the table; ± = std over the
    seeds both have of the per-seed differences. Not computed (note) when the two averages cover
    different datasets."""
    if ours.status != "ok" or reference.status != "ok":
        return Cell(n_failed=ours.n_failed, failed_run_ids=ours.failed_run_ids,
                    failure_reasons=ours.failure_reasons)
    mine = {kget(k, "dataset") for k in keys if seed_values(pool, k, fn)}
    theirs = {kget(k, "dataset") for k in ref_keys if seed_values(pool, k, fn)}
    if mine != theirs:
        return Cell(note=f"not compared: {len(mine)} vs {len(theirs)} dataset(s) with results")
    a, b = _seed_averages(pool, keys, fn), _seed_averages(pool, ref_keys, fn)
    paired = [a[s] - b[s] for s in sorted(set(a) & set(b), key=_seed_order)]
    return Cell(mean=ours.mean - reference.mean, std=_std(paired), n=len(paired),
                run_ids=ours.run_ids)


_DELTA_OF = (("base", metric("base/acc")), ("novel", metric("novel/acc")), ("hm", seed_hm))


def table_sensitivity(pool: Pool, view: SweepView) -> tuple[Table, Table]:
    """A base-to-novel sweep whose arms each change one setting (`sweeps/sensitivity.yaml`): per
    arm Base / Novel / HM averaged over the sweep's datasets, and each arm − the first arm (the
    reference, `default`). Also returns the per-dataset detail."""
    groups = arm_views(view)
    reference = groups[0][0]
    cols = _b2n_columns() + [
        Column(f"delta_{m}", f"Δ {label} vs {reference}", better="higher",
               help=f"this arm's average − the {reference} arm's; ± over seeds of the paired "
                    f"per-seed differences")
        for m, label in (("base", "Base"), ("novel", "Novel"), ("hm", "HM (PERL conv.)"))]
    t = Table(name=f"sensitivity__{view.sweep}",
              title=f"Sensitivity to unstated choices — each arm against `{reference}` (sweep "
                    f"`{view.sweep}`, base-to-novel averages over {len(view.datasets)} "
                    f"dataset(s))",
              index=("arm",), columns=cols, sweep=view.sweep, info_columns=("changes",),
              plot="bars", x_label="arm",
              paper_ref="T1 PERL average (beside every arm: each is a candidate reading)")
    detail = Table(name=f"detail_sensitivity__{view.sweep}",
                   title=f"Per-dataset detail of the sensitivity table (sweep `{view.sweep}`)",
                   index=("arm", "dataset"), columns=_b2n_columns(), sweep=view.sweep,
                   section="detail")
    ref_keys = _keys_for_datasets(groups[0][1], view.datasets)
    ref_cells = _b2n_cells(pool, ref_keys)
    all_keys: list[Key] = []
    for arm, sub in groups:
        keys = _keys_for_datasets(sub, view.datasets)
        all_keys += keys
        cells = _b2n_cells(pool, keys) if arm != reference else ref_cells
        for m, fn in _DELTA_OF:
            cells[f"delta_{m}"] = _delta_cell(pool, keys, ref_keys, cells[m], ref_cells[m], fn)
        if _real(view):
            why = _average_comparability(pool, keys, ref.B2N_DATASETS)
            for m in ("base", "novel", "hm"):
                attach_paper(cells[m], "T1", "PERL", "average", m, why)
        # what the arm changes against the reference: the fields whose values differ
        changed = [f"{f}={fmt_value(kget(sub.template(), f))}" for f in view.axis
                   if kget(sub.template(), f) != kget(groups[0][1].template(), f)]
        t.rows.append(Row(label=(arm,), cells=cells, x=arm,
                          info={"changes": ", ".join(changed) or "(reference)"}))
        for d, k in zip(view.datasets, keys):
            detail.rows.append(Row(label=(arm, d), cells=_b2n_cells(pool, [k])))
    t.counts = count_cells(pool, list(dict.fromkeys(all_keys)), view.seeds)
    detail.counts = t.counts
    detail.notes = ["Per dataset: mean ± std over seeds; no paper numbers exist at this level."]
    t.notes += [f"Rows: the sweep's arms; each changes the settings in `changes` against the "
                f"`{reference}` arm (the first). Δ = this arm's average − {reference}'s: which "
                f"unstated choice moves the numbers, and by how much.",
                f"Datasets averaged: {', '.join(view.datasets)}. HM (PERL conv.) = mean of "
                f"per-dataset HMs; HM (CoOp conv.) = HM(Avg Base, Avg Novel)."]
    if t.any_paper:
        t.notes.append("Paper: Table 1's PERL average beside every arm; the paper does not say "
                       "which of these readings it used.")
    t.notes += settings_note(view)
    return t, detail


def _target_names(pool: Pool, view: SweepView, source: str) -> list[str]:
    names: list[str] = []
    for k in view.keys:
        ev = kget(k, "eval_datasets")
        if ev:
            try:
                names += list(json.loads(ev))
            except ValueError:
                pass
        for r in pool.finished_seeds(k).values():
            names += [m.split("/")[0] for m in r.metrics
                      if m.endswith("/acc") and m.split("/")[0] not in NON_TARGET_EVALSETS]
    names = [n for n in dict.fromkeys(names) if n != source]
    return dataset_order(names)


def table_transfer(pool: Pool, view: SweepView) -> Table:
    """Table 2 (cross_dataset) / Table 8 (domain_generalization): rows = source, targets, Avg."""
    xd = view.protocol == "cross_dataset"
    table_id, paper_t = ("table2_cross_dataset", "T2") if xd else \
        ("table8_domain_generalization", "T8")
    paper_targets = ref.XD_TARGETS if xd else ref.DG_TARGETS
    t = Table(name=f"{table_id}__{view.sweep}",
              title=("Table 2 — cross-dataset transfer" if xd
                     else "Table 8 — domain generalisation") + f" (sweep `{view.sweep}`)",
              index=("evaluated on",), columns=[], sweep=view.sweep,
              paper_ref=f"PERL row of Table {paper_t[1:]}", plot="bars", x_label="evaluated on")
    # one column per trained model (a source dataset and, if the sweep varies any, its settings)
    models = list(dict.fromkeys(view.keys))
    sources = dataset_order(str(kget(k, "dataset")) for k in models)
    targets: list[str] = []
    for s in sources:
        targets += _target_names(pool, view, s)
    real_source = any(ref.paper_dataset(s) == ref.XD_SOURCE for s in sources)
    if real_source:
        have = {ref.paper_dataset(x) for x in targets}
        targets += [d for d in paper_targets if d not in have]
    targets = dataset_order(targets)
    for i, k in enumerate(models):
        src = str(kget(k, "dataset"))
        lab = "acc" if len(models) == 1 else \
            f"{src}" + ("" if not view.axis else " " + ", ".join(
                f"{f}={fmt_value(kget(k, f))}" for f in view.axis))
        t.columns.append(Column(f"m{i}", lab, help="top-1 accuracy (%), mean over seeds"))
    rows: dict[str, Row] = {}

    def row(label: str, kind: str = "data") -> Row:
        if label not in rows:
            rows[label] = Row(label=(label,), kind=kind, x=label)  # type: ignore[arg-type]
        return rows[label]

    for i, k in enumerate(models):
        src = str(kget(k, "dataset"))
        is_paper_src = ref.paper_dataset(src) == ref.XD_SOURCE
        c = cell_over_seeds(pool, k, metric("all/acc"))
        attach_paper(c, paper_t, "PERL", ref.XD_SOURCE if is_paper_src else None, "acc")
        row(f"source: {src}").cells[f"m{i}"] = c
        mine = list(targets)
        for tgt in mine:
            c = cell_over_seeds(pool, k, metric(f"{tgt}/acc"))
            attach_paper(c, paper_t, "PERL", ref.paper_dataset(tgt) if is_paper_src else None,
                         "acc")
            row(tgt).cells[f"m{i}"] = c

        def target_avg(r: SeedRun, _targets=tuple(mine)) -> float | None:
            v = r.metrics.get("target_avg")
            if v is not None and not math.isnan(v):
                return v
            vals = [r.metrics[f"{x}/acc"] for x in _targets if f"{x}/acc" in r.metrics]
            return statistics.fmean(vals) if vals else None

        c = cell_over_seeds(pool, k, target_avg)
        if is_paper_src:
            got = {ref.paper_dataset(x) for x in mine if seed_values(pool, k, metric(f"{x}/acc"))}
            why = "" if got == set(paper_targets) else (
                f"not compared: ours averages {len(got)} target(s), "
                f"the paper's {len(paper_targets)}")
            attach_paper(c, paper_t, "PERL", "target_average", "acc", why)
        row("Target Avg", "average").cells[f"m{i}"] = c
    t.rows = list(rows.values())
    t.rows.sort(key=lambda r: (r.kind == "average", not r.label[0].startswith("source")))
    t.counts = count_cells(pool, models, view.seeds)
    t.notes += ["Target Avg: per seed the logged `target_avg` (mean over the targets, source "
                "excluded), then mean ± std over seeds.",
                "Paper numbers only beside a model trained on ImageNet (the paper's source)."] \
        + settings_note(view)
    return t


def table_accuracy(pool: Pool, view: SweepView) -> Table:
    """Protocol `all`: one accuracy per dataset (no paper counterpart)."""
    keys = list(view.keys)
    t = Table(name=f"accuracy_all__{view.sweep}",
              title=f"Accuracy on all classes (protocol `all`, sweep `{view.sweep}`)",
              index=("dataset",) + view.axis, columns=[Column("acc", "acc")], sweep=view.sweep,
              plot="bars", x_label="dataset")
    for k in keys:
        lab = (str(kget(k, "dataset")),) + _axis_label(view, k)
        t.rows.append(Row(label=lab, x=" / ".join(lab),
                          cells={"acc": cell_over_seeds(pool, k, metric("all/acc"))}))
    t.counts = count_cells(pool, keys, view.seeds)
    return t


def _max_step(pool: Pool, keys: list[Key]) -> int:
    ks = [-1]
    for k in keys:
        for r in pool.finished_seeds(k).values():
            for m in r.metrics:
                if "_step" in m and m.split("_step")[-1].isdigit():
                    ks.append(int(m.split("_step")[-1]))
    return max(ks)


def _value_rank(v: Any) -> tuple:
    return (v is None, not isinstance(v, (int, float)), v if isinstance(v, (int, float)) else 0,
            str(v))


def _dynamics_groups(pool: Pool, view: SweepView) -> list[tuple[tuple, list[Key], int]]:
    """(axis values, cell keys, K) per row group of the dynamics tables; none when no run logged
    a step past 0 (zero-shot alone has no dynamics).

    No varied axis: one group, every key of the sweep, K = the largest step any run logged.
    Otherwise one group per axis combination the sweep ran (any status), with the key of each of
    the sweep's datasets (unrun ones included, so a partial average says so) and its own K; a
    combination whose runs all failed gets K = its num_steps, so its FAILED cells are shown."""
    if not view.axis:
        K = _max_step(pool, list(view.keys))
        return [((), list(view.keys), K)] if K >= 1 else []
    combos = sorted(dict.fromkeys(tuple(kget(k, f) for f in view.axis) for k in view.keys),
                    key=lambda c: tuple(_value_rank(v) for v in c))
    logged = []  # (combo, keys, the largest step its runs logged)
    for combo in combos:
        keys = _keys_for_datasets(view, view.datasets, **dict(zip(view.axis, combo)))
        logged.append((combo, keys, _max_step(pool, keys)))
    if max((K for _, _, K in logged), default=-1) < 1:
        return []
    out = []
    for combo, keys, K in logged:
        if K < 0 and any(pool.failed_seeds(k) for k in keys):
            ks = {kget(k, "num_steps") for k in keys if pool.failed_seeds(k)}
            K = max((int(x) for x in ks if isinstance(x, (int, float))), default=-1)
        if K >= 0:
            out.append((combo, keys, K))
    return out


def _is_default_combo(view: SweepView, combo: tuple) -> bool:
    """Whether an ablation row is the paper's default PERL setting (what Fig. 7 plots)."""
    for f, v in zip(view.axis, combo):
        d = getattr(_DEFAULTS, f, None)
        numeric = isinstance(d, (int, float)) and isinstance(v, (int, float))
        if not (v == d or (numeric and float(v) == float(d))):
            return False
    return True


def cell_pooled(pool: Pool, keys: list[Key], evalsets: Callable[[Key], list[str]],
                name: str) -> tuple[Cell, set[tuple[Key, str]]]:
    """Fig. 7's convention: per seed, the mean over all test images of the evaluation sets
    `evalsets(key)` of every key, i.e. sum_e n_e * m_e / sum_e n_e with n_e = `<e>/n` (the test
    count each run logs) and m_e = `<e>/<name>`; then mean ± std over the seeds common to every
    key that has a value. Also returns the (key, evalset) pairs that entered (an evalset without
    its `n` cannot be weighted and is left out)."""
    per: list[tuple[Key, dict[Any, list[tuple[float, float]]]]] = []
    used: set[tuple[Key, str]] = set()
    for k in keys:
        by_seed: dict[Any, list[tuple[float, float]]] = {}
        for s_, r in pool.finished_seeds(k).items():
            parts = []
            for e in evalsets(k):
                n, v = metric(f"{e}/n")(r), metric(f"{e}/{name}")(r)
                if n and v is not None:
                    parts.append((n, v))
                    used.add((k, e))
            if parts:
                by_seed[s_] = parts
        per.append((k, by_seed))
    failed = [r for k in keys for r in pool.failed_seeds(k).values()]
    cell = Cell(n_failed=len(failed), failed_run_ids=tuple(r.run_id for r in failed),
                failure_reasons=tuple(r.reason for r in failed if r.reason))
    present = [(k, v) for k, v in per if v]
    if not present:
        return cell, used
    common = set.intersection(*(set(v) for _, v in present))
    pooled = []
    for s_ in sorted(common, key=_seed_order):
        parts = [p for _, v in present for p in v[s_]]
        pooled.append(sum(n * v for n, v in parts) / sum(n for n, _ in parts))
    if pooled:
        cell.mean, cell.std, cell.n = statistics.fmean(pooled), _std(pooled), len(pooled)
        cell.run_ids = tuple(pool.finished_seeds(k)[s_].run_id for k, _ in present
                             for s_ in sorted(common, key=_seed_order))
    else:
        cell.note = "no seed common to every dataset: nothing to pool"
    if len(present) < len(keys):
        cell.note = f"pooled over {len(present)} of {len(keys)} datasets"
    return cell, used


@dataclass
class DynColumn:
    """One column of the dynamics tables: how its cell is computed from the runs."""
    key: str
    label: str
    kind: str  # "set": one evalset, mean over datasets; "targets": mean over targets; "pooled"
    evalset: str = ""  # kind "set"; kind "pooled" of base2novel: the evalset pooled over datasets
    f7: str | None = None  # Fig. 7's setting tag (the paper compares its pooled columns only)
    f7_dataset: str | None = None


def _dynamics_columns(view: SweepView) -> tuple[list[DynColumn], tuple[str, ...]]:
    """The dynamics tables' columns for the view's protocol, and the paper's suite for Fig. 7."""
    if view.protocol == "base2novel":
        cols = []
        for ev in ("base", "novel"):
            tag = f"B2N-{ev}"
            cols += [DynColumn(ev, f"B2N {ev} (mean over datasets)", "set", ev),
                     DynColumn(f"{ev}_pooled", f"B2N {ev} (pooled)", "pooled", ev, tag,
                               "average")]
        return cols, ref.B2N_DATASETS
    if view.protocol in ("cross_dataset", "domain_generalization"):
        tag = "XD" if view.protocol == "cross_dataset" else "OOD"
        return [DynColumn("all", "source", "set", "all"),
                DynColumn("targets", f"{tag} targets (mean over targets)", "targets"),
                DynColumn("pooled", f"{tag} all images (pooled, source incl.)", "pooled", "",
                          tag, "target_average")], \
            ref.XD_TARGETS if view.protocol == "cross_dataset" else ref.DG_TARGETS
    return [DynColumn("all", "all classes", "set", "all")], ()


def _dynamics_cell(pool: Pool, view: SweepView, keys: list[Key], col: DynColumn, name: str,
                   targets_by_key: dict[Key, list[str]], suite: tuple[str, ...]
                   ) -> tuple[Cell, str]:
    """The cell of one dynamics column for the per-step metric `name` (e.g. acc_step2), and why
    Fig. 7 is not compared with it ('' when its datasets are Fig. 7's; only pooled columns)."""
    if col.kind == "pooled":
        if col.evalset:  # base2novel: that evalset of every dataset
            cell, used = cell_pooled(pool, keys, lambda k: [col.evalset], name)
            got = {ref.paper_dataset(str(kget(k, "dataset"))) for k, _e in used}
            ok = got == set(suite)
        else:  # transfer: the source and every target of the model
            cell, used = cell_pooled(pool, keys, lambda k: ["all"] + targets_by_key.get(k, []),
                                     name)
            got = {ref.paper_dataset(e) for _k, e in used if e != "all"}
            ok = got == set(suite) and any(e == "all" for _k, e in used)
        return cell, "" if ok else "not compared: other test sets than Fig. 7's"
    if col.kind == "targets":
        def fn(run: SeedRun, _n=name) -> float | None:
            vals = [run.metrics[f"{x}/{_n}"] for x in targets_by_key.get(run.key, [])
                    if f"{x}/{_n}" in run.metrics]
            return statistics.fmean(vals) if vals else None
    else:
        fn = metric(f"{col.evalset}/{name}")
    return cell_over(pool, keys, fn), ""


def tables_dynamics(pool: Pool, view: SweepView) -> list[Table]:
    """Per-step metrics (steps 0..K) averaged over the sweep's datasets, one table per metric;
    rows = steps (per value of the varied field(s), if the sweep varies any), columns =
    evaluation sets, each as the mean over datasets and pooled over test images (Figs. 4/7);
    then the drift groups of Fig. 5 (`table_drift`)."""
    groups_k = _dynamics_groups(pool, view)
    if not groups_k:
        return []
    K = max(k for _, _, k in groups_k)
    cols, suite = _dynamics_columns(view)
    targets_by_key = {k: _target_names(pool, view, str(kget(k, "dataset"))) for k in view.keys}
    all_keys = list(dict.fromkeys(k for _, keys, _ in groups_k for k in keys))
    per = f" per {', '.join(view.axis)}" if view.axis else ""
    out = []
    for m, mlabel, dec, better in STEP_METRICS:
        t = Table(name=f"dynamics_{m}__{view.sweep}",
                  title=f"Per-step dynamics — {mlabel} at steps 0..{K}{per} "
                        f"(sweep `{view.sweep}`)",
                  index=view.axis + ("step",), sweep=view.sweep,
                  columns=[Column(c.key, c.label, dec, better) for c in cols],  # type: ignore[arg-type]
                  paper_ref="Fig. 7 (read off the plot, steps 0 and 4 only)", section="dynamics",
                  plot="dynamics", x_label="step k")
        for combo, keys, K_group in groups_k:
            with_paper = _real(view) and (not view.axis or _is_default_combo(view, combo))
            for step in range(K_group + 1):
                r = Row(label=tuple(fmt_value(v) for v in combo) + (str(step),), x=step)
                for col in cols:
                    c, why = _dynamics_cell(pool, view, keys, col, f"{m}_step{step}",
                                            targets_by_key, suite)
                    if col.f7 and with_paper and m in F7_METRICS:
                        attach_paper(c, "F7", f"PERL {col.f7} step {step}", col.f7_dataset, m,
                                     why)
                    r.cells[col.key] = c
                t.rows.append(r)
        if not any(c.status != "missing" for r in t.rows for c in r.cells.values()):
            continue
        t.counts = count_cells(pool, all_keys, view.seeds)
        t.notes.append("Per step k: the metric of the model after k thought steps (k=0 is "
                       "zero-shot CLIP); mean over datasets of the per-dataset seed means.")
        if any(c.kind == "pooled" for c in cols):
            t.notes.append("(pooled): Fig. 7's convention, every test image weighted once: per "
                           "seed sum n_e m_e / sum n_e over the evaluation sets e (n_e = its "
                           "test count; transfer: the source included), then mean over seeds. "
                           "Fig. 7 is compared with these columns only.")
        if m == "jacobian":
            t.notes.append("Jacobian: mean over a fixed subsample (jacobian_samples) of "
                           "||d logit_k(y) / d x||_2, x = the normalised pixels (docs/method.md).")
        if view.axis:
            t.notes.append(f"Rows: steps 0..K for each value of {', '.join(view.axis)} that the "
                           "sweep ran (K = the largest step its runs logged); datasets averaged: "
                           f"{', '.join(view.datasets)}.")
        if any(c.paper is not None for r in t.rows for c in r.cells.values()):
            t.notes.append("Fig. 7 values are pooled over test images: the XD and OOD tables' "
                           "per-dataset accuracies weighted by test-set size, source included, "
                           "give them (70.98 vs 71.0, 62.8 vs 62.3; PERL.md §8); B2N is read the"
                           " same way. Confidence is read as %, Brier in [0, 2].")
            if view.axis:
                t.notes.append("Fig. 7 values only beside the paper's default setting "
                               "(what Fig. 7 plots).")
        out.append(t)
    drift = table_drift(pool, view, groups_k, cols, targets_by_key, all_keys)
    return out + ([drift] if drift is not None else [])


def table_drift(pool: Pool, view: SweepView, groups_k: list[tuple[tuple, list[Key], int]],
                cols: list[DynColumn], targets_by_key: dict[Key, list[str]],
                all_keys: list[Key]) -> Table | None:
    """Fig. 5: the per-sample KL from step 0 split by correctness at step 0 -> step k; rows =
    (group, step 1..K), columns = the quartiles and the count per evaluation set. Quartiles do
    not pool across test sets, so every column is the mean over datasets (and over targets) of
    the per-set, per-seed quartile; None when no run logged the groups."""

    sets = [c for c in cols if c.kind != "pooled"]
    stats = [(f"q{q}", f"q{q}" if q != 50 else "median", 4) for q in DRIFT_QUANTILES] + \
        [("n", "n", 1)]
    t = Table(name=f"dynamics_drift__{view.sweep}",
              title=f"Prediction drift by group (Fig. 5) — KL(p_k || p_0) quartiles per step "
                    f"(sweep `{view.sweep}`)",
              index=view.axis + ("group", "step"), sweep=view.sweep, section="dynamics",
              columns=[Column(f"{c.key}_{st}", f"{c.label.split(' (')[0]} {lab}", dec, "none")
                       for c in sets for st, lab, dec in stats],
              paper_ref="Fig. 5 (qualitative: medians ~1e-2 stay correct, ~0.1-0.3 wrong to "
                        "correct)", plot="drift", x_label="step k")
    for combo, keys, K_group in groups_k:
        for g in DRIFT_GROUPS:
            for step in range(1, K_group + 1):
                r = Row(label=tuple(fmt_value(v) for v in combo) + (g, str(step)), x=step)
                for c in sets:
                    for st, _lab, _dec in stats:
                        name = f"n_{g}_step{step}" if st == "n" else f"kl_{g}_{st}_step{step}"
                        r.cells[f"{c.key}_{st}"] = _dynamics_cell(
                            pool, view, keys, c, name, targets_by_key, ())[0]
                t.rows.append(r)
    if not any(c.status == "ok" for r in t.rows for c in r.cells.values()):
        return None
    t.counts = count_cells(pool, all_keys, view.seeds)
    t.notes += ["Groups by the top-1 hit at step 0 -> step k: stay_correct, wrong_to_correct, "
                "correct_to_wrong, stay_wrong. Per run and test set: the quartiles (linear "
                "interpolation) of the per-sample KL(p_k || p_0) in nats, and the group's size n;"
                " then mean over seeds and over datasets (targets: over targets). An empty group"
                " has no quartiles (its n is 0)."]
    return t


# --- the search phase (Optuna) ------------------------------------------------------------------

HPO_RESOLUTION = "hpo phase (search section)"
# test metrics shown beside the best sample and the grid default, those the runs logged
SEARCH_TEST_METRICS = (("base/acc", "Base"), ("novel/acc", "Novel"), ("hm", "HM"),
                       ("all/acc", "All"), ("target_avg", "Target Avg"))


@dataclass
class SearchSample:
    number: int  # 1.. in start order
    run_id: str
    params: dict[str, Any]
    metrics: dict[str, float]
    cell: str = ""


@dataclass
class SearchView:
    """The FINISHED samples of one search (experiment, sweep, fixed settings) and its study."""
    experiment: str
    experiment_id: str
    sweep: str
    key: Key  # the samples' cell key with the searched fields blanked
    fields: tuple[str, ...]
    metric: str
    mode: str
    samples: list[SearchSample]
    study_name: str = ""
    study_file: str = ""
    space_json: str = ""
    study: Any = None  # an optuna Study (in memory), once loaded
    study_source: str = ""
    stem: str = ""  # the samples table's name (plots are named after it)

    @property
    def study_from(self) -> str:
        """Short form of `study_source` (plot titles)."""
        return "persistent study" if self.study_source.startswith("persistent") else \
            "rebuilt from MLflow runs"


def _latest_search_tags(df: pd.DataFrame, exp_id: Any, sweep: str) -> dict[str, str]:
    """The search tags (pipeline.run's `_tag_search`) of the latest parent run of a sweep."""
    if "tags.search_study" not in df.columns:
        return {}
    par = df[df["tags.search_study"].notna() & (df["experiment_id"] == exp_id) &
             (df["tags.sweep"].map(sweep_name) == sweep)].sort_values("start_time")
    if not len(par):
        return {}
    last = par.iloc[-1]
    return {k: str(_val(last.get(f"tags.search_{k}")) or "")
            for k in ("study", "study_file", "space", "metric", "mode")}


def search_views(df: pd.DataFrame) -> list[SearchView]:
    hpo = df[(df["resolution"] == HPO_RESOLUTION) & (df["status"] == "FINISHED")]
    views = []
    for (exp_id, sw), part in hpo.groupby([hpo["experiment_id"],
                                           hpo["tags.sweep"].map(sweep_name)], sort=True):
        tags = _latest_search_tags(df, exp_id, sw)
        fields_ = tuple(json.loads(tags["space"])) if tags.get("space") else tuple(
            f for f in FIELD_NAMES if f"params.{f}" in part and part[f"params.{f}"].nunique() > 1)
        part = part.sort_values(["end_time"]).drop_duplicates("tags.config_hash", keep="last")
        part = part.sort_values("start_time")
        blank = {f: None for f in fields_}
        for key, grp in part.groupby(part.apply(
                lambda r: kreplace(row_key(r), canonical=False, **blank), axis=1), sort=False):
            samples = [SearchSample(
                number=i + 1, run_id=r["run_id"], cell=str(_val(r.get("tags.cell")) or ""),
                params={f: _val(r.get(f"params.{f}")) for f in fields_},
                metrics={c[len("metrics."):]: float(v) for c, v in r.items()
                         if c.startswith("metrics.") and _val(v) is not None})
                for i, (_, r) in enumerate(grp.iterrows())]
            views.append(SearchView(
                experiment=str(grp["experiment"].iloc[0]), experiment_id=str(exp_id),
                sweep=sw, key=key, fields=fields_,
                metric=tags.get("metric") or "val/acc", mode=tags.get("mode") or "max",
                samples=samples, study_name=tags.get("study", ""),
                study_file=tags.get("study_file", ""), space_json=tags.get("space", "")))
    return views


def load_search_study(view: SearchView) -> None:
    """The persistent study when its file is readable from here, else one rebuilt from the
    MLflow samples; `view.study_source` says which (and why)."""
    from pipeline import study as st

    st.quiet_optuna()
    why = "the runs carry no study file tag (submitted before studies were kept)"
    if view.study_file and view.study_name:
        try:
            view.study = st.read_study(view.study_file, view.study_name)
            view.study_source = f"persistent study {view.study_name!r} in {view.study_file}"
            return
        except Exception as e:  # noqa: BLE001 - the MLflow runs hold the same samples
            why = f"study file {view.study_file} not readable here: {type(e).__name__}: {e}"
    values = [(s.params, s.metrics[view.metric], {"mlflow_run_id": s.run_id})
              for s in view.samples if view.metric in s.metrics]
    space = st.space_from_json(view.space_json) if view.space_json else \
        st.infer_space([p for p, _, _ in values])
    view.study, left_out = st.rebuild_study(view.study_name or f"{view.sweep} (rebuilt)",
                                            view.mode, values, space)
    view.study_source = f"rebuilt from {len(values) - left_out} MLflow run(s) ({why})"


def _ties(view: SearchView, metric_: str) -> list[list[SearchSample]]:
    """Groups (2+) of samples whose `metric_` values are equal (to 1e-9)."""
    groups: dict[float, list[SearchSample]] = {}
    for s in view.samples:
        if metric_ in s.metrics:
            groups.setdefault(round(s.metrics[metric_], 9), []).append(s)
    return [g for g in groups.values() if len(g) > 1]


def _best_sample(view: SearchView) -> SearchSample | None:
    scored = [s for s in view.samples if view.metric in s.metrics]
    if not scored:
        return None
    sign = 1 if view.mode == "max" else -1
    return max(scored, key=lambda s: (sign * s.metrics[view.metric], -s.number))


def _sample_cell(s: SearchSample, name: str) -> Cell:
    return Cell(mean=s.metrics.get(name), n=1 if name in s.metrics else 0, run_ids=(s.run_id,))


def table_search(view: SearchView) -> Table:
    """Every sample: its parameters, objective and val accuracy; ties and the best marked."""
    better = "higher" if view.mode == "max" else "lower"
    cols = [Column(view.metric, f"{view.metric} (objective, {view.mode})", 4, better)]
    if view.metric != "val/acc":
        cols.append(Column("val/acc", "val/acc", 2, "higher"))
    t = Table(name=view.stem, title=f"Search samples (sweep `{view.sweep}`, experiment "
                                    f"`{view.experiment}`)",
              index=("sample",), columns=cols, sweep=view.sweep, section="search",
              info_columns=(*view.fields, "best", "ties"))
    best = _best_sample(view)
    ties = {m: _ties(view, m) for m in dict.fromkeys((view.metric, "val/acc"))}
    for s in view.samples:
        r = Row(label=(f"#{s.number}",), info={f: fmt_value(s.params.get(f)) for f in view.fields})
        r.info["best"] = "best" if best is s else ""
        r.info["ties"] = "; ".join(
            f"{m} = " + ", ".join(f"#{o.number}" for o in g if o is not s)
            for m, gs in ties.items() for g in gs if s in g)
        r.cells = {c.key: _sample_cell(s, c.key) for c in cols}
        t.rows.append(r)
    t.counts = Counts(expected=len(view.samples), found=len(view.samples))
    n_val = next((s.metrics["val/n"] for s in view.samples if "val/n" in s.metrics), None)
    for m, gs in ties.items():
        for g in gs:
            t.notes.append(
                f"TIE: samples {', '.join(f'#{s.number}' for s in g)} have the same {m} "
                f"({fmt_value(g[0].metrics[m])})" + (
                    f": the val split has {n_val:g} images, so one image is "
                    f"{100 / n_val:.2g} points of accuracy" if n_val and m.endswith("acc")
                    else "") + ". The search cannot tell them apart on this number.")
    t.notes.append(f"Objective: {view.metric} ({view.mode}) on the few-shot validation split; "
                   f"one FINISHED run per sample (latest per config hash), in start order. "
                   f"Plots: {view.study_source}.")
    return t


def _grid_default_key(pool: Pool, view: SearchView) -> Key | None:
    """The grid cell of the same sweep with the search's fixed settings (searched fields at the
    values `fixed` gives them)."""
    blank = {f: None for f in view.fields}
    for key, seeds in pool.finished.items():
        mine = any(r.sweep == view.sweep and str(r.experiment_id) == view.experiment_id
                   for r in seeds.values())
        if mine and kreplace(key, canonical=False, **blank) == view.key:
            return key
    return None


def table_search_best(pool: Pool, view: SearchView) -> Table | None:
    """The best sample (selected on val) against the grid default, on the test splits."""
    best = _best_sample(view)
    if best is None:
        return None
    names = [(m, lab) for m, lab in SEARCH_TEST_METRICS if m in best.metrics]
    names += [(view.metric, view.metric)] + ([("val/acc", "val/acc")]
                                             if view.metric != "val/acc" else [])
    cols = [Column(m, lab, 4 if m == view.metric and not m.endswith("acc") else 2,
                   "lower" if m == view.metric and view.mode == "min" else "higher")
            for m, lab in names]
    t = Table(name=f"{view.stem}_best", title=f"Best search sample vs the grid default "
                                              f"(sweep `{view.sweep}`)",
              index=("",), columns=cols, sweep=view.sweep, section="search",
              info_columns=tuple(view.fields))
    key = _grid_default_key(pool, view)
    default = Row(label=("grid default (fixed settings)",))
    if key is not None:
        default.info = {f: fmt_value(kget(key, f)) for f in view.fields}
        default.cells = {m: cell_over_seeds(pool, key, metric(m)) for m, _ in names}
    pick = Row(label=(f"best sample #{best.number}",),
               info={f: fmt_value(best.params.get(f)) for f in view.fields},
               cells={m: _sample_cell(best, m) for m, _ in names})
    delta = Row(label=("best − default",), kind="average")
    for m, _ in names:
        d, b = default.cells.get(m, Cell()), pick.cells[m]
        if d.status == "ok" and b.status == "ok":
            delta.cells[m] = Cell(mean=b.mean - d.mean, n=1, run_ids=b.run_ids + d.run_ids)
    t.rows = [default, pick, delta]
    t.counts = Counts(expected=2, found=1 + (key is not None))
    t.notes += [
        f"Best = the best {view.metric} ({view.mode}) over {len(view.samples)} samples, one run "
        f"each (the fixed seed); grid default = the sweep's grid cell with the same fixed settings"
        ", mean ± std over its seeds. Selected on val, compared on test: a best-of-N choice on a"
        " small val split is optimistic on val, and the test columns say whether it carried "
        "over.",
        "No grid cell with the search's fixed settings was found (the grid varies other fields)."
        if key is None else ""]
    t.notes = [n for n in t.notes if n]
    return t


def search_tables(pool: Pool, searches: list[SearchView]) -> list[Table]:
    """The samples table and the best-vs-default table of every search (plots: write_outputs)."""
    tables: list[Table] = []
    for i, v in enumerate(searches):
        stems = [s.stem for s in searches[:i]]
        v.stem = f"search__{v.sweep}"
        if v.stem in stems:  # the same sweep in two experiments or with two fixed settings
            v.stem += f"__{i + 1}"
        load_search_study(v)
        tables.append(table_search(v))
        best = table_search_best(pool, v)
        tables += [best] if best is not None else []
    return tables


# --- driver --------------------------------------------------------------------------------


@dataclass
class Aggregate:
    tables: list[Table]
    figures: dict[str, list[Path]]  # table name -> PNGs drawn from it
    runs: pd.DataFrame  # every run read, with its `resolution`
    pool: Pool
    views: list[SweepView]
    experiments: dict[str, str]
    tracking_uri: str
    warnings: list[str] = field(default_factory=list)
    run_experiment: dict[str, str] = field(default_factory=dict)  # run id -> experiment id
    searches: list[SearchView] = field(default_factory=list)  # Optuna phases (section "search")

    @property
    def counts(self) -> Counts:
        c = Counts()
        for t in self.tables:
            if t.section == "tables":
                c.expected += t.counts.expected
                c.found += t.counts.found
                c.failed += t.counts.failed
        return c


def build_tables(pool: Pool, views: list[SweepView]) -> list[Table]:
    tables: list[Table] = []
    owner: dict[int, SweepView] = {}
    for v in views:
        if not v.keys:
            continue
        first = len(tables)
        if v.protocol == "base2novel":
            if v.arms and not arm_axis(v):  # arms that each change settings: sensitivity
                tables += list(table_sensitivity(pool, v))
            elif v.axis:
                main, detail = table_b2n_ablation(pool, v)
                tables += [main, detail]
            else:
                tables.append(table_base2novel(pool, v))
        elif v.protocol in ("cross_dataset", "domain_generalization"):
            tables.append(table_transfer(pool, v))
        else:
            tables.append(table_accuracy(pool, v))
        # any sweep whose runs logged per-step metrics (rows per varied value, if any)
        tables += tables_dynamics(pool, v)
        owner.update({id(t): v for t in tables[first:]})
    # the paper's order (Tables 1/5, 2, 8, 3, 4, Fig. 3a, 3b, alignment, the rest), then by sweep
    order = ("table1_5", "table2", "table8", "table3", "table4", "fig3a", "fig3b", "alignment",
             "sensitivity", "ablation", "accuracy", "dynamics", "detail")
    tables.sort(key=lambda t: (next((i for i, p in enumerate(order) if t.name.startswith(p)),
                                    len(order)), t.sweep))
    # the same file stem must not be produced twice (one sweep with two protocols)
    # (the same sweep in two experiments, or one sweep with two protocols): suffix the experiment
    names = [t.name for t in tables]
    for t, v in zip(tables, [owner[id(t)] for t in tables]):
        if names.count(t.name) > 1:
            slug = "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in v.experiment)
            t.name = f"{t.name}__{slug}__{v.protocol}"
            t.title += f" [experiment {v.experiment}, protocol {v.protocol}]"
    return tables


def aggregate(tracking_uri: str, experiment_names: list[str] | None = None,
              client=None) -> Aggregate:
    client = client or make_client(tracking_uri)
    experiments = select_experiments(client, experiment_names)
    warnings: list[str] = []
    runs = search_all_runs(client, list(experiments)) if experiments else []
    df = runs_frame(runs, experiments)
    if len(df):
        df = cast_params(df, warnings)
        pool, df = resolve(df)
        views, searches = sweep_views(df), search_views(df)
    else:
        pool, views, searches = Pool(), [], []
        df["resolution"] = pd.Series(dtype="str")
    tables = build_tables(pool, views) + search_tables(pool, searches)
    return Aggregate(tables=tables, figures={}, runs=df, pool=pool, views=views,
                     experiments=experiments, tracking_uri=tracking_uri, warnings=warnings,
                     searches=searches,
                     run_experiment=dict(zip(df.get("run_id", []), df.get("experiment_id", []))))


def runs_table_frame(agg: Aggregate) -> pd.DataFrame:
    """Every run read, with the settings that identify it and how it was used (runs.csv)."""
    df = agg.runs
    if not len(df):
        return pd.DataFrame(columns=["run_id"])
    cols = ["run_id", "experiment", "tags.sweep", "tags.phase", "status", "resolution",
            "tags.status_detail", "tags.config_hash"]
    cols += [f"params.{f}" for f in ("protocol", "dataset", "seed", "num_steps", "inject_layer",
                                     "modality", "variant", "anchor_weight")
             if f"params.{f}" in df.columns]
    cols += [c for c in ("metrics.base/acc", "metrics.novel/acc", "metrics.hm", "metrics.all/acc",
                         "metrics.target_avg") if c in df.columns]
    return df[cols].sort_values(["experiment", "tags.sweep", "run_id"], na_position="last")


def write_outputs(agg: Aggregate, out: Path, *, ui_url: str | None = None) -> list[Path]:
    """Tables (md/csv/tex), plots (png), runs.csv, summary.md and report.html under `out`."""
    from pipeline import plots, report

    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for t in agg.tables:
        for ext, fn in (("md", to_markdown), ("csv", to_csv), ("tex", to_latex)):
            p = out / f"{t.name}.{ext}"
            p.write_text(fn(t), encoding="utf-8")
            written.append(p)
    agg.figures = plots.draw_all(agg.tables, out, agg.warnings)
    for s in agg.searches:  # Optuna's own plots, from the study (persistent or rebuilt)
        agg.figures[s.stem] = plots.plot_search(s.study, s.stem, out, s.study_from,
                                                agg.warnings)
    for t in agg.tables:
        t.plots = [p.name for p in agg.figures.get(t.name, [])]
    written += [p for ps in agg.figures.values() for p in ps]
    runs_csv = out / "runs.csv"
    runs_table_frame(agg).to_csv(runs_csv, index=False)
    summary = out / "summary.md"
    summary.write_text(summary_markdown(agg), encoding="utf-8")
    html = report.write_report(agg, out, ui_url=ui_url)
    return written + [runs_csv, summary, html]


def count_lines(agg: Aggregate) -> list[str]:
    lines = []
    for t in agg.tables:
        if t.section == "tables":
            lines.append(f"{t.name}: {t.counts.line()}")
    return lines


def summary_markdown(agg: Aggregate) -> str:
    head = [f"# Rebuilt tables (tracking store `{redact_uri(agg.tracking_uri)}`)", "",
            f"Experiments: {', '.join(sorted(agg.experiments.values())) or 'none'}.",
            "Paper columns are the numbers printed in arXiv 2605.18464v1, shown for reference "
            "only; our numbers come from the MLflow runs listed in runs.csv.", ""]
    if agg.warnings:
        head += ["Warnings:"] + [f"- {w}" for w in agg.warnings] + [""]
    if not agg.tables:
        head.append("No trial runs found (runs carrying a `config_hash` tag, phase `final`).")
    body = []
    for sec in ("tables", "dynamics", "detail", "search"):
        body += [to_markdown(t) for t in agg.tables if t.section == sec]
    return "\n".join(head) + "\n" + "\n".join(body)


def _sqlite_artifact_location(tracking_uri: str) -> str | None:
    from pipeline.tracking import sqlite_path

    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    # beside the DB, not in the cwd (MLflow's default for SQLite stores is ./mlruns)
    return (db.resolve().parent / "artifacts" / AGGREGATE_EXPERIMENT).as_uri()


def log_to_mlflow(agg: Aggregate, out: Path, client=None) -> str:
    """Log every output file as artifacts of a new run in the `aggregate` experiment."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.exceptions import MlflowException

    client = client or make_client(agg.tracking_uri)
    exp = client.get_experiment_by_name(AGGREGATE_EXPERIMENT)
    if exp is None:
        try:
            exp_id = client.create_experiment(
                AGGREGATE_EXPERIMENT, artifact_location=_sqlite_artifact_location(agg.tracking_uri))
        except MlflowException:  # created concurrently by another aggregate
            exp_id = client.get_experiment_by_name(AGGREGATE_EXPERIMENT).experiment_id
    else:
        exp_id = exp.experiment_id
    names = ",".join(sorted(agg.experiments.values()))
    run = client.create_run(exp_id, run_name="aggregate", tags={
        "aggregate_of": names[:5000], "code_sha": os.environ.get("GIT_SHA", "")})
    rid = run.info.run_id
    now = int(time.time() * 1000)
    c = agg.counts
    try:
        client.log_batch(rid, metrics=[Metric(k, float(v), now, 0) for k, v in (
            ("cells_expected", c.expected), ("cells_found", c.found), ("cells_failed", c.failed),
            ("cells_missing", c.missing), ("tables", len(agg.tables)))],
            params=[Param("experiments", names[:6000] or "none")],
            tags=[RunTag("tables", ",".join(t.name for t in agg.tables)[:5000])])
        client.log_artifacts(rid, str(out))
        client.set_terminated(rid, "FINISHED")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    return rid


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.aggregate",
                                 description=__doc__.strip().splitlines()[0])
    ap.add_argument("sweep", nargs="?", default=None, metavar="SWEEP.yaml",
                    help="summarise this sweep: its experiment and tracking URI come from the "
                         "file (as pipeline.run reads them); --experiment adds more")
    ap.add_argument("--experiment", action="append", nargs="+", metavar="NAME",
                    help="experiment name(s) to read (default: every experiment whose runs carry "
                         "a `sweep` tag)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                         "sqlite:///<cwd>/runs/mlflow.db)")
    ap.add_argument("--out", default="runs/aggregate", help="output folder (default: %(default)s)")
    ap.add_argument("--ui-url", default=None,
                    help="MLflow UI base URL for run links in the report (default: the tracking "
                         "URI when it is http(s))")
    ap.add_argument("--no-log", action="store_true",
                    help="do not log the outputs as an `aggregate` run in MLflow")
    ap.add_argument("--quiet", action="store_true", help="do not print the Markdown tables")
    args = ap.parse_args(argv)

    names = [n for group in (args.experiment or []) for n in group] or None
    uri = args.tracking_uri or default_tracking_uri()
    if args.sweep:
        from pipeline.spec import SpecError, load_spec, locate_sweep, resolve_tracking_uri

        try:
            spec = load_spec(locate_sweep(args.sweep))
            uri = resolve_tracking_uri(spec, args.tracking_uri)
        except (SpecError, OSError) as e:
            print(str(e), file=sys.stderr)
            return 2
        names = [spec.experiment] + [n for n in names or [] if n != spec.experiment]
    client = make_client(uri)
    agg = aggregate(uri, names, client=client)
    out = Path(args.out)
    files = write_outputs(agg, out, ui_url=args.ui_url)

    print(f"read {len(agg.runs)} run(s) from {len(agg.experiments)} experiment(s) at "
          f"{redact_uri(uri)}")
    for w in agg.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not args.quiet:
        for sec in ("tables", "dynamics", "search"):
            for t in agg.tables:
                if t.section == sec:
                    print()
                    print(to_markdown(t))
    print("cell counts (expected vs found):")
    for line in count_lines(agg) or ["(no tables: no trial runs found)"]:
        print(f"  {line}")
    print(f"wrote {len(files)} file(s) to {out}/ (report: {out / 'report.html'})")
    if not args.no_log:
        rid = log_to_mlflow(agg, out, client=client)
        print(f"logged outputs as artifacts of run {rid} in experiment '{AGGREGATE_EXPERIMENT}'")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
