"""The Ray Tune function trainable around `perl_core.train.fit`: one trial = one TrainConfig.

Per trial (`train_cell(config, context)`):
1. the TrainConfig: a grid cell (`config["cell"]`), or the fixed settings plus the Optuna sample;
2. MLflow re-check of the config hash: a FINISHED run already exists (another submission got
   there first) -> report its metrics and return without training;
3. the child MLflow run (params = every TrainConfig field, tags: hash, code, node, trial, ...);
4. `fit` with a callback that reports progress to Tune and a checkpoint adapter over
   `tune.get_checkpoint()` / `tune.Checkpoint.from_directory`, so a retried trial resumes;
5. the result as a storage record (JSON + safetensors, local or s3) *before* MLflow, so an MLflow
   outage loses nothing (`python -m pipeline.run SWEEP --replay` logs it later);
6. metrics, curve and artifacts to MLflow, run FINISHED. On an exception: run FAILED with the
   reason in `status_detail`, and the exception re-raised so Tune's FailureConfig applies.

Backbone reuse: the frozen CLIP is built once per worker process and kept in `_BACKBONE`, a
module-level LRU of size 1 keyed by (arch, pretrained) - explicit, and only here in the pipeline
(perl_core stays cache-free). With `reuse_actors=True` consecutive trials on one worker that share
the backbone skip rebuilding it; the driver orders cells so that such trials run back to back.
Only named weights are cached: `pretrained=""` means a random init drawn from the trial's seed,
which must not be shared. A fresh PerlModel (new projectors, seeded exactly as `fit` seeds them)
wraps the cached CLIP for every trial (`perl_core.train.build_model(cfg, clip=...)`).

Trial code imports Tune APIs from `ray.tune` only (never `ray.train`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

# Before mlflow/ray are imported in the worker: no telemetry / usage calls from trials.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from perl_core.config import TrainConfig  # noqa: E402
from pipeline import tracking  # noqa: E402
from pipeline.env import device_info, versions  # noqa: E402

logger = logging.getLogger(__name__)

CHECKPOINT_EVERY = 500  # optimizer steps between mid-epoch Tune checkpoints (epoch ends always)
REPORT_EVERY_S = 10.0  # progress reports to Tune at most this often (each is a driver round trip)

_BACKBONE: tuple[tuple[str, str], Any] | None = None  # ((arch, pretrained), frozen open_clip CLIP)


# --- model ----------------------------------------------------------------------------------------


def backbone(arch: str, pretrained: str) -> Any:
    """The frozen CLIP for (arch, pretrained), built once per process (LRU of size 1)."""
    global _BACKBONE
    key = (arch, pretrained)
    if _BACKBONE is not None and _BACKBONE[0] == key:
        return _BACKBONE[1]
    if _BACKBONE is not None:  # another backbone: free it before building the next one
        _BACKBONE = None
        _empty_cuda_cache()
    from perl_core.factory import create_clip

    clip = create_clip(arch, pretrained)
    _BACKBONE = (key, clip)
    return clip


def clear_backbone() -> None:
    global _BACKBONE
    _BACKBONE = None
    _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_model(cfg: TrainConfig) -> Any:
    """The trial's PerlModel via `perl_core.train.build_model` (projector init depends on the seed
    only), around the cached backbone when the weights are named."""
    from perl_core.train import build_model as build

    if not cfg.pretrained:  # random init drawn from the seed: never shared between trials
        return build(cfg)
    return build(cfg, clip=backbone(cfg.arch, cfg.pretrained))


# --- Tune adapters --------------------------------------------------------------------------------


class TuneCheckpoint:
    """`fit`'s checkpoint protocol (load/save) over Tune's checkpoints (uploaded to storage)."""

    def load(self) -> dict | None:
        from ray import tune

        from perl_core.checkpoint import DirCheckpoint

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return DirCheckpoint(d).load()

    def save(self, state: dict) -> None:
        from ray import tune

        from perl_core.checkpoint import DirCheckpoint

        with tempfile.TemporaryDirectory(prefix="perl-ckpt-") as d:
            DirCheckpoint(d).save(state)
            pos = state.get("position", {})
            # report() persists the directory to the run's storage before returning
            tune.report({"checkpoint_step": float(pos.get("global_step", 0))},
                        checkpoint=tune.Checkpoint.from_directory(d))


def _progress_callback(cell: str):
    from ray import tune

    from perl_core.train import Callback

    class TuneProgress(Callback):
        """Throttled progress reports (step, fraction done, loss) for Tune's status table."""

        def __init__(self) -> None:
            self.total, self.last = 0, 0.0

        def on_train_start(self, info: dict[str, Any]) -> None:
            self.total = int(info.get("total_steps") or 0)

        def on_step_end(self, step: int, logs: dict[str, Any]) -> None:
            now = time.monotonic()
            if now - self.last < REPORT_EVERY_S and step < self.total:
                return
            self.last = now
            tune.report({"step": float(step), "progress": step / max(1, self.total),
                         "train_step/loss": float(logs.get("loss", float("nan")))})

    return TuneProgress()


# --- the trainable -------------------------------------------------------------------------------


def trial_config(config: dict[str, Any], context: dict[str, Any]) -> tuple[str, TrainConfig]:
    """(run name, TrainConfig) of this trial: a grid cell, or fixed settings + the sample."""
    if "cell" in config:
        cell = config["cell"]
        return cell["name"], TrainConfig.from_dict(cell["config"])
    base = TrainConfig.from_dict(context["base_config"])
    sample = {k: config[k] for k in context["search_fields"]}
    cfg = TrainConfig.from_dict({**base.to_dict(), **sample})  # coerces numpy scalars too
    label = ",".join(f"{k}={_short(v)}" for k, v in sample.items())
    return f"{context['base_name']}/hpo/{label}", cfg


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_tags(cfg: TrainConfig, name: str, context: dict[str, Any]) -> dict[str, str]:
    import ray
    from ray import tune

    try:
        trial_id = tune.get_context().get_trial_id() or ""
    except Exception:  # outside a Tune session (direct call in a test)
        trial_id = ""
    try:
        node_id = ray.get_runtime_context().get_node_id()
    except Exception:
        node_id = ""
    tags = {
        "config_hash": cfg.config_hash(), "code_sha": context["code_sha"],
        "code_dirty": context["code_dirty"], "code_version": context["code_version"],
        "sweep": context["sweep"],
        "phase": context["phase"], "dataset": cfg.dataset, "protocol": cfg.protocol,
        "cell": name, "ray_node_id": node_id, "trial_id": trial_id,
        "ray_job_id": context.get("ray_job_id", ""), "sweep_file": context.get("sweep_file", ""),
        **versions(), **device_info(),
    }
    return {k: str(v) for k, v in tags.items()}


def _tracker(context: dict[str, Any]) -> tracking.Tracker | None:
    try:
        return tracking.Tracker(context["tracking_uri"])
    except Exception as e:  # MLflow unreachable: train anyway, the record is replayed later
        logger.warning("MLflow unavailable (%s): training without a run", e)
        return None


def train_cell(config: dict[str, Any], context: dict[str, Any] | None = None) -> None:
    """The Tune function trainable (wrapped with tune.with_parameters(context=...))."""
    from ray import tune

    from perl_core.train import fit, save_projectors

    assert context is not None, "train_cell needs its context (tune.with_parameters)"
    name, cfg = trial_config(config, context)
    h = cfg.config_hash()
    phase = context["phase"]
    tracker = _tracker(context)
    code = None if context.get("ignore_code_version") else context["code_version"]

    if tracker is not None and not context.get("rerun"):
        try:
            done = tracker.finished_run(context["experiment_id"], h, phase=phase,
                                          code_version=code)
        except Exception as e:
            logger.warning("MLflow lookup failed (%s); training", e)
            done = None
        if done is not None:  # another submission finished it meanwhile: nothing to do
            tune.report({**done.data.metrics, "skipped": 1.0, "cell": name,
                         "mlflow_run_id": done.info.run_id})
            return

    tags = trial_tags(cfg, name, context)
    started_ms = int(time.time() * 1000)
    run_id = None
    if tracker is not None:
        try:
            run_id = tracker.start_trial(context["experiment_id"], context["parent_run_id"], name,
                                         cfg, tags, start_ms=started_ms)
        except Exception as e:
            logger.warning("cannot create the MLflow run (%s); the storage record will be "
                           "replayed into MLflow later", e)
            tracker = None
    try:
        model = build_model(cfg)
        result = fit(cfg, callbacks=[_progress_callback(name)], model=model,
                     checkpoint=TuneCheckpoint(), progress=False,
                     checkpoint_every=CHECKPOINT_EVERY)
        metrics = dict(result.metrics)  # val/* included: what the search phase selects on
        record = tracking.TrialRecord(
            record_id=tracking.new_record_id(), experiment=context["experiment"], run_name=name,
            config=cfg.to_dict(), config_hash=h, metrics=metrics, history=result.history,
            per_class=result.per_class, num_trainable_parameters=result.num_trainable_parameters,
            tags=tags, parent_run_id=context["parent_run_id"], started_ms=started_ms,
            ended_ms=int(time.time() * 1000),
            extra={"train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds})
        with tempfile.TemporaryDirectory(prefix="perl-proj-") as d:
            save_projectors(Path(d) / "projectors.safetensors", result)
            blob = (Path(d) / "projectors.safetensors").read_bytes()
        # the record first: from here on the result survives an MLflow outage
        tracking.write_record(context["storage"], record, blob)
    except BaseException as e:
        if tracker is not None and run_id is not None:
            status = "FAILED" if isinstance(e, Exception) else "KILLED"
            detail = f"{type(e).__name__}: {e}\n" + "".join(
                traceback.format_exception(type(e), e, e.__traceback__)[-6:])
            try:
                tracker.end(run_id, status, detail)
            except Exception as mlflow_error:
                logger.warning("could not mark run %s %s: %s", run_id, status, mlflow_error)
        raise

    logged = 0.0
    if tracker is not None and run_id is not None:
        try:
            tracker.log_result(run_id, record, blob)
            tracker.end(run_id, "FINISHED")
            logged = 1.0
        except Exception as e:  # the record is safe in storage; replay will log it
            logger.warning("MLflow logging of %s failed (%s); record %s kept for replay", name,
                           e, record.stem())
    tune.report({**{k: v for k, v in metrics.items() if tracking._finite(v)},
                 "done": 1.0, "mlflow_logged": logged, "cell": name,
                 "mlflow_run_id": run_id or "", "train_seconds": result.train_seconds})


__all__ = ["train_cell", "backbone", "clear_backbone", "build_model", "trial_config",
           "trial_tags", "TuneCheckpoint"]
