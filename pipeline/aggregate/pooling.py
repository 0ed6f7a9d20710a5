"""Pooling over seeds (and datasets): the numbers of one table cell, with the paper's number
beside it. Conventions: data_protocol.md §9 (see the package docstring)."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable, Iterable, Optional

from pipeline import reference as ref
from pipeline.aggregate.runs import Key, Pool, SeedRun, seed_order
from pipeline.tables import Cell, Counts

Metric = Callable[[SeedRun], Optional[float]]  # a per-run number (None: not logged)


def hm(b: float | None, n: float | None) -> float | None:
    if b is None or n is None:
        return None
    return 0.0 if b + n == 0 else 2 * b * n / (b + n)


def metric(name: str) -> Metric:
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


def final_step_metric(name: str) -> Metric:
    """`<evalset>/<metric>_step{K}` of each run at its own final step K (the largest logged)."""
    def get(r: SeedRun) -> float | None:
        steps = [int(m.rsplit("_step", 1)[1]) for m in r.metrics
                 if m.startswith(f"{name}_step") and m.rsplit("_step", 1)[1].isdigit()]
        return metric(f"{name}_step{max(steps)}")(r) if steps else None
    get.__name__ = f"{name}_final"
    return get


def sample_std(vals: list[float]) -> float | None:
    return statistics.stdev(vals) if len(vals) >= 2 else None


def seed_values(pool: Pool, key: Key, fn: Metric) -> dict[int, float]:
    out = {}
    for s, r in pool.finished_seeds(key).items():
        v = fn(r)
        if v is not None:
            out[s] = v
    return out


def _failed_cell(pool: Pool, keys: Iterable[Key]) -> Cell:
    """An empty cell that carries the keys' FAILED runs."""
    failed = [r for k in keys for r in pool.failed_seeds(k).values()]
    return Cell(n_failed=len(failed), failed_run_ids=tuple(r.run_id for r in failed),
                failure_reasons=tuple(r.reason for r in failed if r.reason))


def cell_over_seeds(pool: Pool, key: Key, fn: Metric) -> Cell:
    vals = seed_values(pool, key, fn)
    fin = pool.finished_seeds(key)
    cell = _failed_cell(pool, [key])
    cell.mean = statistics.fmean(vals.values()) if vals else None
    cell.std, cell.n = sample_std(list(vals.values())), len(vals)
    cell.run_ids = tuple(fin[s].run_id for s in sorted(vals, key=seed_order))
    return cell


def cell_over_datasets(pool: Pool, keys: list[Key], fn: Metric) -> Cell:
    """Mean over datasets of the per-dataset seed means; ± over seeds of the per-seed average."""
    per = [(k, seed_values(pool, k, fn)) for k in keys]
    present = [(k, v) for k, v in per if v]
    cell = _failed_cell(pool, keys)
    if not present:
        return cell
    cell.mean = statistics.fmean(statistics.fmean(v.values()) for _, v in present)
    common = set.intersection(*(set(v) for _, v in present))
    per_seed = [statistics.fmean(v[s] for _, v in present) for s in common]
    cell.std = sample_std(per_seed)
    cell.n = len(common) if common else min(len(v) for _, v in present)
    cell.run_ids = tuple(pool.finished_seeds(k)[s].run_id for k, v in present
                         for s in sorted(v, key=seed_order))
    if len(present) < len(keys):
        cell.note = f"average over {len(present)} of {len(keys)} datasets"
    return cell


def cell_over(pool: Pool, keys: list[Key], fn: Metric) -> Cell:
    """One cell key: its mean over seeds; several (one per dataset): their average."""
    return cell_over_seeds(pool, keys[0], fn) if len(keys) == 1 else \
        cell_over_datasets(pool, keys, fn)


def seed_averages(pool: Pool, keys: list[Key], fn: Metric) -> dict[Any, float]:
    """Per seed, the mean over the datasets that have results of that metric, for the seeds
    present in every such dataset (the per-seed averages behind `cell_over_datasets`'s ±)."""
    present = [v for v in (seed_values(pool, k, fn) for k in keys) if v]
    if not present:
        return {}
    common = set.intersection(*(set(v) for v in present))
    return {s: statistics.fmean(v[s] for v in present) for s in common}


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


def _pooled_parts(pool: Pool, k: Key, evalsets: list[str], name: str,
                  used: set[tuple[Key, str]]) -> dict[Any, list[tuple[float, float]]]:
    """Per seed of one key, (n_e, m_e) of each evalset whose count and metric were logged."""
    by_seed: dict[Any, list[tuple[float, float]]] = {}
    for s_, r in pool.finished_seeds(k).items():
        parts = []
        for e in evalsets:
            n, v = metric(f"{e}/n")(r), metric(f"{e}/{name}")(r)
            if n and v is not None:
                parts.append((n, v))
                used.add((k, e))
        if parts:
            by_seed[s_] = parts
    return by_seed


def cell_pooled(pool: Pool, keys: list[Key], evalsets: Callable[[Key], list[str]],
                name: str) -> tuple[Cell, set[tuple[Key, str]]]:
    """Fig. 7's convention: per seed, the mean over all test images of the evaluation sets
    `evalsets(key)` of every key, i.e. sum_e n_e * m_e / sum_e n_e with n_e = `<e>/n` (the test
    count each run logs) and m_e = `<e>/<name>`; then mean ± std over the seeds common to every
    key that has a value. Also returns the (key, evalset) pairs that entered (an evalset without
    its `n` cannot be weighted and is left out)."""
    used: set[tuple[Key, str]] = set()
    per = [(k, _pooled_parts(pool, k, evalsets(k), name, used)) for k in keys]
    cell = _failed_cell(pool, keys)
    present = [(k, v) for k, v in per if v]
    if not present:
        return cell, used
    common = set.intersection(*(set(v) for _, v in present))
    pooled = []
    for s_ in sorted(common, key=seed_order):
        parts = [p for _, v in present for p in v[s_]]
        pooled.append(sum(n * v for n, v in parts) / sum(n for n, _ in parts))
    if pooled:
        cell.mean, cell.std, cell.n = statistics.fmean(pooled), sample_std(pooled), len(pooled)
        cell.run_ids = tuple(pool.finished_seeds(k)[s_].run_id for k, _ in present
                             for s_ in sorted(common, key=seed_order))
    else:
        cell.note = "no seed common to every dataset: nothing to pool"
    if len(present) < len(keys):
        cell.note = f"pooled over {len(present)} of {len(keys)} datasets"
    return cell, used


def count_cells(pool: Pool, keys: Iterable[Key], seeds: list[Any]) -> Counts:
    c = Counts()
    for k in keys:
        fin, bad = pool.finished_seeds(k), pool.failed_seeds(k)
        c.expected += len(seeds)
        c.found += sum(1 for s in seeds if s in fin)
        c.failed += sum(1 for s in seeds if s in bad and s not in fin)
    return c


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
