"""The Ray Tune function trainable around `perl_core.train.fit`: one trial = one TrainConfig.

`train_cell(config, context)` (`context`: the phase's `pipeline.context.TrialContext`) reads
like its steps, each a function below:

1. `start_trial`: the sweep's `imports:` (dataset registrations: this worker process does not
   run the driver's imports), the TrainConfig (a grid cell `config["cell"]`, or the fixed
   settings plus the Optuna sample), the digests of its data, an MLflow client;
2. `finished_elsewhere`: a FINISHED run of this config hash, code version and data already
   exists (another submission got there first) -> `report_skipped`, no training;
3. `open_run`: the feature cache, the device, the tags and the child MLflow run (params = every
   TrainConfig field; tags: hash, code, node, trial, ...);
4. `train`: `fit` with a callback that reports progress to Tune and a checkpoint adapter over
   `tune.get_checkpoint()` / `tune.Checkpoint.from_directory`, so a retried trial resumes; a
   cell the driver planned as `evaluate` (`pipeline.reuse`) instead loads the projectors of the
   run that trained them (`reused_weights`, before the run opens) and only evaluates;
5. `persist_record`: the result as a storage record (JSON + safetensors, local or s3) *before*
   MLflow, so an MLflow outage loses nothing (`python -m pipeline.run SWEEP --replay`);
6. `log_and_close`: metrics, curves (per optimizer step and per epoch) and artifacts to MLflow,
   run FINISHED, the final report to Tune. On an exception in 4-5 (`train_and_persist`): run
   FAILED with the reason in `status_detail` (`fail_run`), and the exception re-raised so
   Tune's FailureConfig applies.

Backbone reuse: the frozen CLIP is built once per worker process and kept in `_BACKBONE`, a
module-level LRU of size 1 keyed by (arch, pretrained) - explicit, and only here in the pipeline
(perl_core stays cache-free). With `reuse_actors=True` consecutive trials on one worker that share
the backbone skip rebuilding it; the driver orders cells so that such trials run back to back.
Only named weights are cached: `pretrained=""` means a random init drawn from the trial's seed,
which must not be shared. A fresh PerlModel (new projectors, seeded exactly as `fit` seeds them)
wraps the cached CLIP for every trial (`perl_core.train.build_model(cfg, clip=...)`).

Feature cache: one `perl_core.cache.FeatureCache` per worker process (`_FEATURE_CACHE`, keyed by
its settings), built from the sweep's `cache:` block (`pipeline.spec.CacheSpec`, in the context as
`cache`) and passed to `fit(cache=...)`, so the frozen test-set prefixes, zero-shot states
and training views computed by one trial are read by the next ones on that node. Not used for
`pretrained=""` (a random backbone per seed: nothing to share). Each child run gets the tags
`feature_cache` (URL or "off") and `feature_cache_dtype`, and the metrics `feature_cache/hits`,
`feature_cache/misses` and per kind (`feature_cache/image_hit`, ...) of this trial.

Timing: every trial reports `timing/*` (seconds per phase: MLflow lookup, run creation, model,
`fit` split into compute / checkpoint I/O / other (`fit_phases`), record, MLflow logging) to Tune
and, up to the record, to MLflow. The phases are of this attempt (a retried trial's earlier
attempts are not in them), all >= 0, and add up to `timing/trial_wall_s`. With
`$PERL_TRIAL_TIMINGS` set to a directory, each trial also appends its phase times and wall-clock
entry/exit stamps there as one JSON line (`python -m pipeline.bench` reads them).

Trial code imports Tune APIs from `ray.tune` only (never `ray.train`).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

# Before mlflow/ray are imported in the worker: no telemetry / usage calls from trials.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from perl_core.config import TrainConfig  # noqa: E402
from perl_core.protocol import training_hash  # noqa: E402
from pipeline import faults, layout, reuse, tracking  # noqa: E402
from pipeline.context import TrialContext  # noqa: E402
from pipeline.env import device_info, versions  # noqa: E402

logger = logging.getLogger(__name__)
# Ray logs "Checkpoint successfully created at: ..." at INFO for every checkpoint of every trial
# (epoch ends and every CHECKPOINT_EVERY steps): noise in the driver's log; failures still show.
logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)

# Optimizer steps between mid-epoch Tune checkpoints (epoch ends always); $PERL_CHECKPOINT_EVERY
# overrides it (the worker-kill test lowers it; results do not depend on it).
CHECKPOINT_EVERY = int(os.environ.get("PERL_CHECKPOINT_EVERY") or 500)
REPORT_EVERY_S = 10.0  # progress reports to Tune at most this often (each is a driver round trip)
# The keys of those progress reports (with "progress", the fraction done): pipeline.run's live
# display and pipeline.status (from Tune's saved state) read them by these names.
PROGRESS_KEYS = {"step": "step", "total": "total_steps", "epoch": "epoch", "epochs": "epochs",
                 "loss": "train_step/loss"}
# Test hooks (PERL_TEST_STEP_DELAY_S, PERL_TEST_FAULT) live in pipeline.faults, called from the
# step callback only (`_progress_callback`).

_BACKBONE: tuple[tuple[str, str], Any] | None = None  # ((arch, pretrained), frozen open_clip CLIP)
_FEATURE_CACHE: tuple[tuple, Any] | None = None  # (settings, perl_core.cache.FeatureCache)
TIMINGS_ENV = "PERL_TRIAL_TIMINGS"
DEFAULT_CACHE_DIR = "perl-feature-cache"  # under the node's temp dir when cache.url is not set


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


def ray_gpu_ids() -> list[int | str] | None:
    """The GPUs Ray assigned to this trial (`ray.get_gpu_ids()`: [] for resources.gpu 0); None
    outside Ray (a direct call), where `get_gpu_ids` would start a local Ray instance."""
    try:
        import ray
    except ImportError:
        return None
    return list(ray.get_gpu_ids()) if ray.is_initialized() else None


def trial_device(cfg: TrainConfig) -> Any:
    """The torch device of this trial, from cfg.device and the GPUs Ray assigned to it
    (`perl_core.factory.resolve_device(gpu_ids=...)`: a gpu 0 trial never lands on a GPU), with
    the precision checked against it and both TF32 flags set for it (as `fit` does again), so
    the run tags record them. Raises before any model is built."""
    from perl_core.factory import check_precision, resolve_device, set_precision_flags

    device = resolve_device(cfg.device, gpu_ids=ray_gpu_ids())
    check_precision(cfg.precision, device)
    set_precision_flags(cfg.precision)
    return device


def build_model(cfg: TrainConfig) -> Any:
    """The trial's PerlModel via `perl_core.train.build_model` (projector init depends on the seed
    only), around the cached backbone when the weights are named."""
    from perl_core.train import build_model as build

    if not cfg.pretrained:  # random init drawn from the seed: never shared between trials
        return build(cfg)
    return build(cfg, clip=backbone(cfg.arch, cfg.pretrained))


def ray_cpu_share() -> float | None:
    """The CPUs Ray assigned to this trial (its `resources.cpu`); None outside a Ray worker."""
    try:
        import ray

        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # no Ray, or not in a worker: the process's own CPUs are used instead
        return None


def with_trial_workers(cfg: TrainConfig, device: Any) -> TrainConfig:
    """cfg with num_workers -1 (auto) resolved from the trial's CPU share (an execution field:
    the config hash does not change)."""
    from perl_core.evaluate import AUTO_WORKERS, resolve_num_workers

    if cfg.num_workers != AUTO_WORKERS:
        return cfg
    return cfg.replace(num_workers=resolve_num_workers(cfg.num_workers, device, ray_cpu_share()))


# --- feature cache --------------------------------------------------------------------------------


def cache_settings(context: TrialContext | Mapping[str, Any]) -> dict[str, Any]:
    """The sweep's `cache:` block (`pipeline.spec.CacheSpec` fields, url already resolved by the
    driver) for this trial: `context.cache` (`feature_cache` in an older driver's dict). Every
    context has it: the driver builds it (`pipeline.context.trial_context`), also when it
    restores an interrupted experiment (`Tuner.restore` takes the trainable, and so the
    context, from the restoring driver)."""
    from pipeline.spec import CacheSpec

    raw = context.cache if isinstance(context, TrialContext) else context["feature_cache"]
    return CacheSpec.model_validate(dict(raw)).model_dump()


def cache_url(settings: dict[str, Any]) -> str:
    """cache.url, or the node-local default `<tempdir>/perl-feature-cache` (resolved here, on the
    node that runs the trial)."""
    return settings.get("url") or os.path.join(tempfile.gettempdir(), DEFAULT_CACHE_DIR)


def feature_cache(settings: dict[str, Any], cfg: TrainConfig) -> Any:
    """This process's FeatureCache for `settings` (built once, kept while the settings stay), or
    None when the cache is off or the backbone is a per-seed random init (nothing to share)."""
    global _FEATURE_CACHE
    if not settings.get("enabled", True) or not cfg.pretrained:
        return None
    url = cache_url(settings)
    key = (url, float(settings["max_gb"]), settings["dtype"])
    if _FEATURE_CACHE is not None and _FEATURE_CACHE[0] == key:
        return _FEATURE_CACHE[1]
    import torch

    from perl_core.cache import FeatureCache
    from perl_core.data.storage import storage_options_for

    cache = FeatureCache(url, max_bytes=int(key[1] * 2**30), dtype=getattr(torch, key[2]),
                         storage_options=storage_options_for(url) if "://" in url else None)
    _FEATURE_CACHE = (key, cache)
    return cache


def cache_tags(settings: dict[str, Any], cache: Any) -> dict[str, str]:
    if cache is None:
        why = "off" if not settings.get("enabled", True) else "off (random-init backbone)"
        return {"feature_cache": why, "feature_cache_dtype": "none"}
    return {"feature_cache": layout.redact_uri(cache_url(settings)),
            "feature_cache_dtype": settings["dtype"]}


def cache_metrics(cache: Any, before: dict[str, int]) -> dict[str, float]:
    """This trial's hits/misses (the counters are per process: the delta since `before`)."""
    if cache is None:
        return {}
    now = {f"{kind}/{what}": 0 for kind in ("image", "text") for what in ("hit", "miss")}
    now.update(cache.stats())
    return {f"feature_cache/{k.replace('/', '_')}": float(v - before.get(k, 0))
            for k, v in now.items()}


# --- Tune adapters --------------------------------------------------------------------------------


class TuneCheckpoint:
    """`fit`'s checkpoint protocol (load/save) over Tune's checkpoints (uploaded to storage),
    timing its storage I/O in this attempt for `fit_phases`. `resumed_step` is the optimizer step
    a retried trial resumed from (None: from scratch)."""

    resumed_step: int | None = None

    def __init__(self) -> None:
        self.seconds = 0.0  # loading + saving (storage I/O) in this attempt: overhead
        self.resumed_train_s = 0.0  # train_seconds of the resumed state (the earlier attempts')
        self.saves: list[tuple[float, float]] = []  # (seconds, the saved state's train_seconds)

    def load(self) -> dict | None:
        t0 = time.perf_counter()
        try:
            state = self._fetch()
        finally:
            self.seconds += time.perf_counter() - t0
        if state is not None:
            self.resumed_step = int(state.get("position", {}).get("global_step", 0))
            self.resumed_train_s = float(state.get("train_seconds", 0.0))
            logger.warning("resuming from the Tune checkpoint at optimizer step %d",
                           self.resumed_step)
        return state

    def save(self, state: dict) -> None:
        t0 = time.perf_counter()
        self._persist(state)
        took = time.perf_counter() - t0
        self.seconds += took
        self.saves.append((took, float(state.get("train_seconds", 0.0))))

    def _fetch(self) -> dict | None:
        from ray import tune

        from perl_core.checkpoint import DirCheckpoint

        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return DirCheckpoint(d).load()

    def _persist(self, state: dict) -> None:
        from ray import tune

        from perl_core.checkpoint import DirCheckpoint

        with tempfile.TemporaryDirectory(prefix="perl-ckpt-") as d:
            DirCheckpoint(d).save(state)
            pos = state.get("position", {})
            step = int(pos.get("global_step", 0))
            # report() persists the directory to the run's storage before returning
            try:
                tune.report({"checkpoint_step": float(step)},
                            checkpoint=tune.Checkpoint.from_directory(d))
            except _storage_errors() as e:  # say what failed; the raw error names the URL
                raise CheckpointSaveError(
                    f"cannot save the Tune checkpoint at optimizer step {step} into the sweep's "
                    f"storage (its tune/ folder): {type(e).__name__}: "
                    f"{tracking.short_error(e)}") from e


class CheckpointSaveError(RuntimeError):
    """A Tune checkpoint could not be written to the sweep's storage (the trial FAILS with it)."""


def _storage_errors() -> tuple[type[BaseException], ...]:
    """What a storage backend raises: OSError (local, pyarrow) and botocore's errors (s3fs)."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


def fit_phases(fit_s: float, result: Any, ckpt: TuneCheckpoint) -> dict[str, float]:
    """This attempt's `fit` wall time `fit_s` in three disjoint parts that add up to it:
    `fit_compute` (this attempt's train + eval time without checkpoint I/O), `fit_checkpoint`
    (loading and saving Tune checkpoints) and `fit_other` (the rest: data, optimizer, model.to).

    `result.train_seconds` is not this attempt's: a resumed state carries the earlier attempts'
    time (`ckpt.resumed_train_s`), and `fit`'s training timer runs through every checkpoint save
    after which it is updated again (all but the last save of the attempt). Both are taken out."""
    train = result.train_seconds - ckpt.resumed_train_s
    in_train = sum(took for took, at in ckpt.saves if at < result.train_seconds)
    compute = max(0.0, train - in_train) + result.eval_seconds
    # nested, disjoint intervals of one perf_counter: below 0 only by float rounding
    other = max(0.0, fit_s - compute - ckpt.seconds)
    return {"fit_compute": compute, "fit_checkpoint": ckpt.seconds, "fit_other": other}


def _progress_callback(cell: str, dataset: str = ""):
    from ray import tune

    from perl_core.train import Callback

    after_step = faults.step_hook(cell, dataset)  # the test hooks' one seam (None unless set)

    class TuneProgress(Callback):
        """Throttled progress reports (step, fraction done, loss) for Tune's status table."""

        def __init__(self) -> None:
            self.total, self.epochs, self.last = 0, 0, 0.0

        def on_train_start(self, info: dict[str, Any]) -> None:
            self.total = int(info.get("total_steps") or 0)
            self.epochs = self.total // max(1, int(info.get("steps_per_epoch") or 0))

        def on_step_end(self, step: int, logs: dict[str, Any]) -> None:
            if after_step is not None:
                after_step(step)
            now = time.monotonic()
            if now - self.last < REPORT_EVERY_S and step < self.total:
                return
            self.last = now
            k = PROGRESS_KEYS
            tune.report({k["step"]: float(step), "progress": step / max(1, self.total),
                         k["loss"]: float(logs.get("loss", float("nan"))),
                         k["total"]: float(self.total), k["epochs"]: float(self.epochs),
                         k["epoch"]: float(logs.get("epoch") or 0)})

    return TuneProgress()


# --- what a trial is and reads -------------------------------------------------------------------


def trial_config(config: dict[str, Any], context: TrialContext) -> tuple[str, TrainConfig]:
    """(run name, TrainConfig) of this trial: a grid cell, or fixed settings + the sample."""
    if "cell" in config:
        cell = config["cell"]
        # from_record: a Tune state saved by an older pipeline lacks the newer fields
        return cell["name"], TrainConfig.from_record(cell["config"])
    base = TrainConfig.from_record(dict(context.base_config or {}))
    sample = {k: config[k] for k in context.search_fields}
    cfg = TrainConfig.from_dict({**base.to_dict(), **sample})  # coerces numpy scalars too
    label = ",".join(f"{k}={_short(v)}" for k, v in sample.items())
    return f"{context.base_name}/{layout.SEARCH_PHASE}/{label}", cfg


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def placement_tags(cfg: TrainConfig, name: str, context: TrialContext) -> dict[str, str]:
    """Which cell of which submission a run is: a trial's, and a link's (`pipeline.links`),
    whose other tags are its source's."""
    tags = {"config_hash": cfg.config_hash(), reuse.TRAINING_HASH_TAG: training_hash(cfg),
            "sweep": context.sweep, "phase": context.phase, "dataset": cfg.dataset,
            "protocol": cfg.protocol, "cell": name, "ray_job_id": context.ray_job_id,
            "sweep_file": context.sweep_file,
            # the UI's User column: the driver's (the submitter)
            "mlflow.user": tracking.source_tags("", context.user)["mlflow.user"]}
    return {k: str(v) for k, v in tags.items()}


def trial_tags(cfg: TrainConfig, name: str, context: TrialContext, device: Any = None
               ) -> dict[str, str]:
    """`placement_tags` and how the trial computes: code, node, trial, versions, device."""
    from ray import tune

    try:
        trial_id = tune.get_context().get_trial_id() or ""
    except Exception:  # outside a Tune session (direct call in a test)
        trial_id = ""
    tags = {
        "code_sha": context.code_sha, "code_dirty": context.code_dirty,
        "code_version": context.code_version, "ray_node_id": _node_id(), "trial_id": trial_id,
        **versions(), **device_info(device),
        **tracking.source_tags(context.code_sha, context.user),  # the UI's Source column
    }
    return {**{k: str(v) for k, v in tags.items()}, **placement_tags(cfg, name, context)}


def trial_data(cfg: TrainConfig, name: str, known: tuple = ()) -> list[Any]:
    """The DataDigest of every dataset the trial reads (`tracking.data_digests`: once per
    process, starting from the driver's `known` ones, whose stamps it re-checks); [] when they
    cannot be read here: the run then records no inputs, and `fit` fails with its own error
    naming what is missing."""
    try:
        tracking.adopt_digests(known)
        return tracking.data_digests(cfg)
    except Exception as e:
        logger.warning("cannot digest the data of %s (%s: %s): its run records no dataset "
                       "inputs", name, type(e).__name__, e)
        return []


def note_tags(cfg: TrainConfig, name: str, context: TrialContext, data: list[Any]
              ) -> dict[str, str]:
    """The data digest tags and the run's note (the varied values: the grid's, or the searched
    fields of an Optuna sample); `Tracker.log_result` adds the results to the note."""
    return {**tracking.data_tags(data), tracking.NOTE_TAG: tracking.trial_note(
        name, cfg, sweep=context.sweep, phase=context.phase, varied=context.varied,
        data=data)}


def _field(context: TrialContext | Mapping[str, Any], name: str) -> Any:
    return context.get(name, "") if isinstance(context, Mapping) else getattr(context, name)


def arm_tags(config: dict[str, Any], context: TrialContext | Mapping[str, Any]
             ) -> dict[str, str]:
    """`arm` (the grid cell's arms, comma-joined) and `sweep_arms` (the sweep's arms in order),
    only in a sweep with arms: the aggregate's row labels (older runs have neither)."""
    arm = (config.get("cell") or {}).get("arm") or ""
    if not arm:
        return {}
    spec = _field(context, "sweep_arm_spec")
    return {"arm": arm, "sweep_arms": _field(context, "sweep_arms"),
            **({"sweep_arm_spec": spec} if spec else {})}


def cell_plan(config: dict[str, Any], context: TrialContext) -> reuse.Plan:
    """The driver's plan of a grid cell (`pipeline.reuse`): train, unless the cell carries an
    `evaluate` source (its `reuse` entry: kind, run_id, trained_by) and this submission
    reuses (a restored Tune experiment keeps the entries of the submission that made it)."""
    got = (config.get("cell") or {}).get("reuse") or {}
    if got.get("kind") != reuse.EVALUATE or not context.reuse:
        return reuse.Plan(reuse.TRAIN)
    return reuse.Plan(reuse.EVALUATE, reuse.Source(got["run_id"], got["run_id"],
                                                   got.get("trained_by") or got["run_id"]))


def import_sweep_modules(context: TrialContext) -> None:
    """Import the sweep's `imports:` here, on the worker, before the trial looks up its dataset:
    their registrations (`perl_core.data.registry.register`) were made in the driver's process
    only. Once per process (Python caches modules); a failure fails the trial, naming them."""
    from perl_core.data.registry import import_modules

    names = list(context.imports)
    try:
        import_modules(names)
    except (Exception, SystemExit) as e:
        raise ImportError(
            f"the sweep's imports {names} cannot be imported on Ray node "
            f"{_node_id() or '?'} ({type(e).__name__}: {e}): every worker must find them, on "
            f"PYTHONPATH or in the job's working dir (`ray job submit --working-dir .`)") from e


def _node_id() -> str:
    """This worker's Ray node id ("" outside Ray)."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() or ""
    except Exception:
        return ""


def _tracker(context: TrialContext) -> tracking.Tracker | None:
    # a new client per trial costs < 1 ms once mlflow is imported (pipeline.bench: `setup`)
    try:
        return tracking.Tracker(context.tracking_uri)
    except Exception as e:  # MLflow unreachable: train anyway, the record is replayed later
        logger.warning("MLflow unavailable (%s): training without a run", e)
        return None


# --- the trainable: its steps in order -----------------------------------------------------------


@dataclass
class Trial:
    """One attempt of one trial: what every step reads. `tracker` becomes None once MLflow
    fails (the trial goes on; its storage record is replayed into MLflow later)."""

    config: dict[str, Any]  # Tune's: the grid cell, or the Optuna sample
    context: TrialContext
    name: str
    cfg: TrainConfig
    config_hash: str
    data: list[Any]  # DataDigests of what it reads
    tracker: tracking.Tracker | None
    clock: "_Clock"
    # `reused_weights`: an `evaluate` plan whose weights were fetched (else: train)
    plan: reuse.Plan = reuse.Plan(reuse.TRAIN)
    weights: dict[str, Any] | None = None  # the source's projectors
    source_losses: dict[str, float] | None = None  # the source's train/* metrics


@dataclass
class OpenRun:
    """The trial's MLflow run (`run_id` None: none could be created) and what it opened with."""

    run_id: str | None
    tags: dict[str, str]
    started_ms: int
    cache: Any  # the FeatureCache, or None
    device: Any
    device_error: BaseException | None  # a refused device: raised when training starts


@dataclass
class Trained:
    result: Any  # perl_core.train.TrainResult
    resumed_step: int | None  # the optimizer step a retried trial resumed from
    metrics: dict[str, float]  # fit's, the feature cache's and the timings so far


def train_cell(config: dict[str, Any], context: Any = None) -> None:
    """The Tune function trainable (wrapped with tune.with_parameters(context=...)):
    skip if finished -> the weights an `evaluate` cell evaluates -> open run -> train (or
    evaluate) -> persist record -> log and close."""
    assert context is not None, "train_cell needs its context (tune.with_parameters)"
    trial = start_trial(config, TrialContext.from_any(context))
    done = finished_elsewhere(trial)
    if done is not None:
        report_skipped(trial, done)
        return
    reused_weights(trial)
    run = open_run(trial)
    trained, record, blob = train_and_persist(trial, run)
    log_and_close(trial, run, trained, record, blob)


def start_trial(config: dict[str, Any], context: TrialContext) -> Trial:
    """The sweep's imports, the TrainConfig, its data digests and an MLflow client."""
    clock = _Clock()
    import_sweep_modules(context)
    name, cfg = trial_config(config, context)
    tracker = _tracker(context)
    # before the lookup: a run of other data is not done
    data = trial_data(cfg, name, context.known_data)
    clock.lap("setup")
    return Trial(config, context, name, cfg, cfg.config_hash(), data, tracker, clock)


def finished_elsewhere(trial: Trial) -> Any | None:
    """The FINISHED run of this config, code version and data, when another submission got
    there first (not with --rerun); None, also when MLflow cannot be asked."""
    ctx = trial.context
    if trial.tracker is None or ctx.rerun:
        return None
    try:
        done = trial.tracker.finished_run(ctx.experiment_id, trial.config_hash, phase=ctx.phase,
                                          code_version=ctx.done_code_version,
                                          data={d.dataset: d for d in trial.data})
    except Exception as e:  # unreachable: do not wait for it a second time below
        logger.warning("MLflow lookup failed (%s); training without a run, the storage "
                       "record will be replayed into MLflow later", e)
        done, trial.tracker = None, None
    trial.clock.lap("mlflow_lookup")
    return done


def report_skipped(trial: Trial, done: Any) -> None:
    from ray import tune

    tune.report({**done.data.metrics, "skipped": 1.0, "cell": trial.name,
                 "mlflow_run_id": done.info.run_id})


def trial_cache(trial: Trial) -> tuple[Any, dict[str, str]]:
    """(FeatureCache or None, its tags): an unusable cache location costs speed, not the trial."""
    settings = cache_settings(trial.context)
    try:
        cache = feature_cache(settings, trial.cfg)
        return cache, cache_tags(settings, cache)
    except Exception as e:
        logger.warning("feature cache at %s unavailable (%s): running uncached",
                       layout.redact_uri(cache_url(settings)), e)
        return None, {"feature_cache": f"off (unavailable: {type(e).__name__})",
                      "feature_cache_dtype": "none"}


def open_run(trial: Trial) -> OpenRun:
    """The feature cache, the device (checked before the tags, which record it), the tags and
    the child MLflow run (none when MLflow fails: the record is replayed later)."""
    cfg, ctx = trial.cfg, trial.context
    cache, cache_tag = trial_cache(trial)
    try:  # a refusal fails the run once it is open (train raises it)
        device, device_error = trial_device(cfg), None
    except (ValueError, RuntimeError) as e:
        device, device_error = None, e
    tags = {**trial_tags(cfg, trial.name, ctx, device), **cache_tag,
            **arm_tags(trial.config, ctx), **note_tags(cfg, trial.name, ctx, trial.data),
            **reuse.reuse_tags(trial.plan)}
    trial.clock.lap("tags")
    run = OpenRun(None, tags, int(time.time() * 1000), cache, device, device_error)
    if trial.tracker is not None:
        try:
            run.run_id = trial.tracker.start_trial(
                ctx.experiment_id, ctx.parent_run_id, trial.name, cfg, tags,
                start_ms=run.started_ms, inputs=tracking.data_inputs(trial.data))
        except Exception as e:
            logger.warning("cannot create the MLflow run (%s); the storage record will be "
                           "replayed into MLflow later", e)
            trial.tracker = None
    trial.clock.lap("mlflow_start")
    return run


def train_and_persist(trial: Trial, run: OpenRun) -> tuple[Trained, tracking.TrialRecord, bytes]:
    """`train`, then `persist_record`. On any failure the run is closed FAILED (KILLED for a
    KeyboardInterrupt / SystemExit) with the reason, an OOM's memory is freed, and the
    exception re-raised so Tune's FailureConfig applies."""
    try:
        trained = train(trial, run)
        record, blob = persist_record(trial, run, trained)
        return trained, record, blob
    except BaseException as e:
        trained = None  # noqa: F841 (clear_frames keeps this executing frame: drop the result)
        fail_run(trial, run, e)
        raise


def train(trial: Trial, run: OpenRun) -> Trained:
    """`fit` on the trial's device, resuming from its Tune checkpoint if any. The CUDA cache
    is emptied after `fit`, whether it returned or raised."""
    from perl_core.train import fit

    if run.device_error is not None:
        raise run.device_error
    cfg, clock = trial.cfg, trial.clock
    model = build_model(cfg)
    # workers from the trial's CPU share, for fit only: the run's params and its record keep
    # the submitted value (-1 = auto), so a replay logs the same params
    fit_cfg = with_trial_workers(cfg, run.device)  # the backbone is still on the CPU here
    clock.lap("build_model")
    before = run.cache.stats() if run.cache is not None else {}
    ckpt = TuneCheckpoint()
    try:
        if trial.weights is not None:  # an `evaluate` cell whose source's weights are here
            from perl_core.train import evaluate_projectors

            result = evaluate_projectors(fit_cfg, trial.weights, model=model, cache=run.cache,
                                         device=run.device)
            result.metrics.update(trial.source_losses or {})
        else:
            result = fit(fit_cfg, callbacks=[_progress_callback(trial.name, cfg.dataset)],
                         model=model, checkpoint=ckpt, progress=False,
                         checkpoint_every=CHECKPOINT_EVERY, cache=run.cache, device=run.device)
    finally:
        # the trial's activations and optimizer state are freed (or going with the exception):
        # give the allocator's cached blocks back, or a reused actor keeps this trial's peak
        _empty_cuda_cache()
    clock.laps.update(fit_phases(clock.lap("fit"), result, ckpt))
    del clock.laps["fit"]
    metrics = dict(result.metrics)  # val/* included: what the search phase selects on
    metrics.update(cache_metrics(run.cache, before))
    metrics.update(clock.metrics(totals=False))  # phases so far (MLflow: timed below)
    return Trained(result, ckpt.resumed_step, metrics)


def reused_weights(trial: Trial) -> None:
    """An `evaluate` cell: the projectors of the run that trained them (its MLflow artifact),
    checked to be of this cell's training (`training_hash`), and that training's train/*
    losses. When they cannot be had (MLflow away, the artifacts gone, another training) the
    cell trains instead, said in the trial's log: a bad source never fails a cell."""
    from perl_core.train import projectors_from_bytes

    plan = cell_plan(trial.config, trial.context)
    if plan.kind != reuse.EVALUATE:
        return
    src = plan.source.run_id
    try:
        if trial.tracker is None:
            raise RuntimeError("MLflow is unreachable")
        state, trained = projectors_from_bytes(trial.tracker.projectors(src), f"run {src}")
        if training_hash(trained) != training_hash(trial.cfg):
            raise ValueError(f"they are of another training (training_hash "
                             f"{training_hash(trained)}, the cell's {training_hash(trial.cfg)})")
        metrics = trial.tracker.client.get_run(src).data.metrics
    except Exception as e:
        logger.warning("%s: the weights of run %s cannot be evaluated (%s: %s); training the "
                       "cell instead", trial.name, src, type(e).__name__, tracking.short_error(e))
    else:
        trial.plan, trial.weights = plan, state
        trial.source_losses = {k: v for k, v in metrics.items() if k.startswith("train/")}
    trial.clock.lap("reused_weights")


def build_record(trial: Trial, run: OpenRun, trained: Trained) -> tracking.TrialRecord:
    result, ctx = trained.result, trial.context
    return tracking.TrialRecord(
        record_id=tracking.new_record_id(), experiment=ctx.experiment, run_name=trial.name,
        config=trial.cfg.to_dict(), config_hash=trial.config_hash, metrics=trained.metrics,
        history=result.history, epoch_history=result.epoch_history,
        per_class=result.per_class, num_trainable_parameters=result.num_trainable_parameters,
        tags=run.tags, parent_run_id=ctx.parent_run_id, started_ms=run.started_ms,
        ended_ms=int(time.time() * 1000),
        extra={"train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds,
               "resumed_from_step": trained.resumed_step,
               "data_inputs": tracking.data_inputs(trial.data)})


def projector_bytes(result: Any) -> bytes:
    """The trained projectors as safetensors bytes (the record's weights)."""
    from perl_core.train import save_projectors

    with tempfile.TemporaryDirectory(prefix="perl-proj-") as d:
        save_projectors(Path(d) / tracking.PROJECTORS_FILE, result)
        return (Path(d) / tracking.PROJECTORS_FILE).read_bytes()


def persist_record(trial: Trial, run: OpenRun, trained: Trained
                   ) -> tuple[tracking.TrialRecord, bytes]:
    """The storage record before MLflow: from here on the result survives an MLflow outage."""
    record, blob = build_record(trial, run, trained), projector_bytes(trained.result)
    tracking.write_record(trial.context.storage, record, blob)
    trial.clock.lap("record")
    return record, blob


def fail_run(trial: Trial, run: OpenRun, e: BaseException) -> None:
    """Free an OOM's memory and close the run FAILED/KILLED with the reason."""
    detail = layout.redact_text(f"{type(e).__name__}: {e}\n" + "".join(
        traceback.format_exception(type(e), e, e.__traceback__)[-6:]))
    if is_oom(e):  # free this trial's memory now, so the worker is not left holding it
        _release_after_oom(e, trial.name)
    if trial.tracker is not None and run.run_id is not None:
        status = "FAILED" if isinstance(e, Exception) else "KILLED"
        try:
            trial.tracker.end(run.run_id, status, detail)
        except Exception as mlflow_error:
            logger.warning("could not mark run %s %s: %s", run.run_id, status, mlflow_error)


def log_result(trial: Trial, run: OpenRun, record: tracking.TrialRecord, blob: bytes) -> bool:
    """Metrics, curves and artifacts to MLflow, run FINISHED; False when not logged (no run,
    or MLflow failed: the record is safe in storage and the replay logs it)."""
    if trial.tracker is None or run.run_id is None:
        return False
    try:
        trial.tracker.log_result(run.run_id, record, blob)
        trial.tracker.end(run.run_id, "FINISHED")
        return True
    except Exception as e:
        logger.warning("MLflow logging of %s failed (%s); record %s kept for replay",
                       trial.name, e, record.stem())
        return False


def log_and_close(trial: Trial, run: OpenRun, trained: Trained,
                  record: tracking.TrialRecord, blob: bytes) -> None:
    """Log to MLflow, then the trial's final report to Tune (metrics, timings, done)."""
    from ray import tune

    logged = 1.0 if log_result(trial, run, record, blob) else 0.0
    trial.clock.lap("mlflow_log")
    timing, result = trial.clock.metrics(), trained.result
    trial.clock.dump(trial.name, {"train_seconds": result.train_seconds,
                                  "eval_seconds": result.eval_seconds, "mlflow_logged": logged})
    tune.report({**{k: v for k, v in trained.metrics.items() if tracking.is_finite(v)}, **timing,
                 "done": 1.0, "mlflow_logged": logged, "cell": trial.name,
                 "mlflow_run_id": run.run_id or "", "train_seconds": result.train_seconds,
                 "eval_seconds": result.eval_seconds})


# what cuBLAS / cuDNN raise when their workspace or handle cannot be allocated: a RuntimeError,
# not torch.OutOfMemoryError, though the cause is the same full GPU
OOM_MESSAGES = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED")


def is_oom(e: BaseException) -> bool:
    """torch.OutOfMemoryError (what the CUDA caching allocator raises; torch.cuda's is the same
    class), a plain MemoryError, or a RuntimeError whose message is a cuBLAS/cuDNN allocation
    failure or says "out of memory" (`OOM_MESSAGES`), here or in its `raise ... from` causes."""
    import torch

    for _ in range(8):  # a short chain: wrappers name their cause
        if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
            return True
        if isinstance(e, RuntimeError) and any(m in str(e) for m in OOM_MESSAGES):
            return True
        if e.__cause__ is None:
            return False
        e = e.__cause__
    return False


def _release_after_oom(e: BaseException, cell: str) -> None:
    """After an out-of-memory in a trial: drop the failed trial's tensors held by the
    traceback's finished frames (model, optimizer state, activations of `fit`), the cached
    backbone (rebuilt by the next trial on this worker) and the CUDA caching allocator's free
    blocks. CPU-safe (the CUDA calls only run when CUDA is there). Tune does not reuse the
    actor of an errored trial, so its process ends anyway; this frees the memory at once."""
    import gc

    try:
        traceback.clear_frames(e.__traceback__)  # the executing frames (train_cell...) are kept
        clear_backbone()  # also empties the CUDA cache
        gc.collect()
        _empty_cuda_cache()
    except Exception as cleanup_error:  # never hide the OOM behind a cleanup problem
        logger.warning("freeing memory after the OOM of %s failed: %s", cell, cleanup_error)
        return
    logger.warning("out of memory in trial %s (%s): freed its tensors, the cached backbone and "
                   "the CUDA cache; the trial is FAILED", cell, type(e).__name__)


class _Clock:
    """Phase times of one trial (seconds, perf_counter) and its wall-clock entry stamp."""

    def __init__(self) -> None:
        self.entry_unix = time.time()
        self.t0 = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> float:
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self.last
        self.last = now
        return self.laps[phase]

    def metrics(self, totals: bool = True) -> dict[str, float]:
        out = {f"timing/{k}_s": v for k, v in self.laps.items()}
        if totals:  # the whole trial (only in the final Tune report and the timings file)
            wall = self.last - self.t0
            out["timing/trial_wall_s"] = wall
            out["timing/overhead_s"] = wall - self.laps.get("fit_compute", 0.0)
        return out

    def dump(self, cell: str, extra: dict[str, Any]) -> None:
        """One JSON line in $PERL_TRIAL_TIMINGS/<pid>.jsonl (when set; for pipeline.bench)."""
        where = os.environ.get(TIMINGS_ENV)
        if not where:
            return
        line = {"cell": cell, "pid": os.getpid(), "entry_unix": self.entry_unix,
                "exit_unix": time.time(), "phases": dict(self.laps), **extra}
        try:
            os.makedirs(where, exist_ok=True)
            with open(os.path.join(where, f"{os.getpid()}.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
        except OSError as e:
            logger.warning("cannot write trial timings to %s: %s", where, e)


__all__ = ["train_cell", "import_sweep_modules", "backbone", "clear_backbone", "build_model",
           "trial_config", "trial_tags", "arm_tags", "TuneCheckpoint", "fit_phases",
           "cache_settings", "feature_cache", "cache_tags", "cache_metrics", "cache_url",
           "TIMINGS_ENV", "ray_cpu_share", "with_trial_workers", "ray_gpu_ids", "trial_device",
           "is_oom", "PROGRESS_KEYS", "trial_data", "note_tags"]
