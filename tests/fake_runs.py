"""Hand-made MLflow runs shaped like the pipeline's, for the aggregate and report tests.

SYNTHETIC FIXTURE: every metric value here is invented (round numbers, easy to average by hand).
None is a result of PERL or of this project; real dataset names are used only so that the paper's
reference columns appear beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from perl_core.config import TrainConfig

# base2novel: dataset -> seed -> (base acc, novel acc), percent
B2N = {"Caltech101": {1: (90.0, 80.0), 2: (92.0, 84.0)},
       "DTD": {1: (60.0, 50.0), 2: (64.0, 56.0)}}
# ablation_steps on the synthetic ToyShapes world: num_steps -> seed -> (base, novel)
STEPS = {1: {1: (50.0, 40.0), 2: (52.0, 44.0)},
         2: {1: (55.0, 45.0), 2: (57.0, 47.0)}}
# base2novel: dataset -> (base, novel) test counts (`<evalset>/n`): unequal, so the pooled
# (sample-weighted) averages differ from the means over datasets
N_TEST = {"Caltech101": (300.0, 200.0), "DTD": (100.0, 100.0)}
# num_steps=3 seed 1: its only run FAILED; num_steps=3 seed 2: never run
FAILED_CELL = (3, 1)
# the ablation_steps cells' fixed settings
TOY = TrainConfig(protocol="base2novel", dataset="ToyShapes", arch="perl-tiny",
                  pretrained="embedded", shots=4)


def HM(b: float, n: float) -> float:
    return 2 * b * n / (b + n)


def params_of(cfg: TrainConfig) -> list[Param]:
    """As the pipeline logs them: every TrainConfig field by name, as a string."""
    return [Param(k, json.dumps(v) if isinstance(v, list) else str(v))
            for k, v in cfg.to_dict().items()]


def step_curves(ev: str, acc: float, K: int, *, confidence_slope: float = 1.0,
                brier0: float = 0.5, brier_slope: float = 0.01) -> dict[str, float]:
    """One evalset's per-step metrics: accuracy (K - k) points below `acc` at step k, and the
    issue-14 ones (Jacobian, alignment, drift groups) as simple lines in k."""
    m: dict[str, float] = {}
    for k in range(K + 1):
        m[f"{ev}/acc_step{k}"] = acc - (K - k)
        m[f"{ev}/confidence_step{k}"] = 50.0 + confidence_slope * k
        m[f"{ev}/brier_step{k}"] = brier0 - brier_slope * k
        m[f"{ev}/kl_step{k}"] = 0.1 * k
        m[f"{ev}/jacobian_step{k}"] = 20.0 - k
        m[f"{ev}/cos_true_step{k}"] = 0.30 + 0.01 * k
        m[f"{ev}/cos_wrong_step{k}"] = 0.25
        m[f"{ev}/margin_step{k}"] = 0.05 + 0.01 * k
        m[f"{ev}/gap_step{k}"] = 0.8 - 0.02 * k
        if k >= 1:  # drift groups (Fig. 5): stay_correct drifts little, wrong_to_correct more
            for g, (n, q50) in {"stay_correct": (40.0, 0.01 * k),
                                "wrong_to_correct": (5.0 * k, 0.1 * k),
                                "correct_to_wrong": (2.0, 0.05), "stay_wrong": (10.0, 0.02)
                                }.items():
                m[f"{ev}/n_{g}_step{k}"] = n
                m.update({f"{ev}/kl_{g}_q25_step{k}": q50 / 2, f"{ev}/kl_{g}_q50_step{k}": q50,
                          f"{ev}/kl_{g}_q75_step{k}": 2 * q50})
    return m


def b2n_metrics(b: float, n: float, K: int = 0, *, n_test: tuple[float, float] = (100.0, 100.0),
                **curves) -> dict[str, float]:
    """Final base/novel/hm, their test counts, and per-step curves (`step_curves`)."""
    m = {"base/acc": b, "novel/acc": n, "hm": HM(b, n), "base/n": n_test[0],
         "novel/n": n_test[1]}
    for ev, acc in (("base", b), ("novel", n)):
        m.update(step_curves(ev, acc, K, **curves))
    return m


def named(tables, name: str):
    """The one table called `name`."""
    (t,) = [t for t in tables if t.name == name]
    return t


def lrow(t, *label):
    """The one row of table `t` labelled `label`."""
    (r,) = [r for r in t.rows if r.label == label]
    return r


def memory_runs(specs, experiment_id: str = "7") -> list:
    """specs: (sweep, TrainConfig, metrics[, status]) -> objects shaped like the mlflow Runs that
    `MlflowClient.search_runs` returns (run ids run0000, run0001, ... in spec order), for the
    table builders without a store (the same code path after search_runs)."""
    from types import SimpleNamespace as NS

    out = []
    for i, (sweep, cfg, metrics, *status) in enumerate(specs):
        params = {p.key: p.value for p in params_of(cfg)}
        out.append(NS(info=NS(run_id=f"run{i:04d}", experiment_id=experiment_id,
                              status=(status or ["FINISHED"])[0], start_time=i, end_time=i,
                              run_name=""),
                      data=NS(tags={"sweep": sweep, "phase": "final",
                                    "config_hash": cfg.config_hash()},
                              params=params, metrics=metrics)))
    return out


class Store:
    """A real MLflow store filled the way the pipeline fills it: params = every TrainConfig
    field, tags config_hash / sweep / phase / dataset / protocol, children of a parent run."""

    def __init__(self, uri: str, root: Path):
        self.client = MlflowClient(tracking_uri=uri)
        self.root = Path(root)
        self.t = 1_700_000_000_000  # fixed, increasing clock for end_time ordering

    def experiment(self, name: str) -> str:
        return self.client.create_experiment(
            name, artifact_location=(self.root / "artifacts" / name.replace("/", "_")).as_uri())

    def run(self, exp: str, sweep: str, cfg: TrainConfig | None, metrics: dict[str, float],
            status: str = "FINISHED", phase: str = "final", parent: str | None = None,
            detail: str = "") -> str:
        tags = {"sweep": sweep, "phase": phase}
        if cfg is not None:
            tags.update(config_hash=cfg.config_hash(), dataset=cfg.dataset,
                        protocol=cfg.protocol, code_sha="0" * 40)
        if parent:
            tags["mlflow.parentRunId"] = parent
        if detail:
            tags["status_detail"] = detail
        self.t += 1000
        rid = self.client.create_run(exp, start_time=self.t, tags=tags).info.run_id
        self.client.log_batch(rid, metrics=[Metric(k, v, self.t, 0) for k, v in metrics.items()],
                              params=params_of(cfg) if cfg is not None else [])
        self.t += 1000
        self.client.set_terminated(rid, status, end_time=self.t)
        return rid

    def b2n_sweep(self, exp: str, base: TrainConfig, ids: dict, parent: str | None = None,
                  **metric_kw) -> str:
        """B2N's runs (K=2) under `parent` (default: a fresh parent run); ids[(dataset, seed)] =
        run id."""
        parent = parent or self.run(exp, "base2novel", None, {})
        for d, seeds in B2N.items():
            for seed, (b, n) in seeds.items():
                ids[(d, seed)] = self.run(exp, "base2novel", base.replace(dataset=d, seed=seed),
                                          b2n_metrics(b, n, K=2, n_test=N_TEST[d], **metric_kw),
                                          parent=parent)
        return parent

    def steps_sweep(self, exp: str, ids: dict, detail: str, *, per_step: bool = False,
                    **metric_kw) -> str:
        """STEPS' runs and the FAILED_CELL (ids["failed"]) under a fresh parent run."""
        parent = self.run(exp, "ablation_steps", None, {})
        for K, seeds in STEPS.items():
            for seed, (b, n) in seeds.items():
                self.run(exp, "ablation_steps", TOY.replace(num_steps=K, seed=seed),
                         b2n_metrics(b, n, K if per_step else 0, **metric_kw), parent=parent)
        K, seed = FAILED_CELL
        ids["failed"] = self.run(exp, "ablation_steps", TOY.replace(num_steps=K, seed=seed), {},
                                 status="FAILED", parent=parent, detail=detail)
        return parent
