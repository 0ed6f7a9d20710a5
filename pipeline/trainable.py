"""The Ray Tune function trainable around `perl_core.train.fit`: one trial = one TrainConfig.

Per trial (`train_cell(config, context)`):
0. the sweep's `imports:` modules (`context["imports"]`: dataset registrations), imported in this
   worker process, which does not run the driver's imports;
1. the TrainConfig: a grid cell (`config["cell"]`), or the fixed settings plus the Optuna sample;
2. MLflow re-check of the config hash: a FINISHED run already exists (another submission got
   there first) -> report its metrics and return without training;
3. the child MLflow run (params = every TrainConfig field, tags: hash, code, node, trial, ...);
4. `fit` with a callback that reports progress to Tune and a checkpoint adapter over
   `tune.get_checkpoint()` / `tune.Checkpoint.from_directory`, so a retried trial resumes;
5. the result as a storage record (JSON + safetensors, local or s3) *before* MLflow, so an MLflow
   outage loses nothing (`python -m pipeline.run SWEEP --replay` logs it later);
6. metrics, curves (per optimizer step and per epoch) and artifacts to MLflow, run FINISHED. On
   an exception: run FAILED with the reason in `status_detail`, and the exception re-raised so
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
`feature_cache`) and passed to `fit(cache=...)`, so the frozen test-set prefixes, zero-shot states
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
from pathlib import Path
from typing import Any

# Before mlflow/ray are imported in the worker: no telemetry / usage calls from trials.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from perl_core.config import TrainConfig  # noqa: E402
from pipeline import tracking  # noqa: E402
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
# Test hook, off unless set: sleep this long after every optimizer step, so a fault-injection test
# can kill a worker mid-training (tests/reliability/test_worker_kill.py). Timing only.
STEP_DELAY_S = float(os.environ.get("PERL_TEST_STEP_DELAY_S") or 0)
# Test hook, off unless set: `PERL_TEST_FAULT=oom:<dataset>:<step>` raises torch.OutOfMemoryError
# (the class a CUDA allocation failure raises) from the step callback of every trial on that
# dataset once it has finished optimizer step <step>, so the OOM path of a real GPU is exercised
# on CPU (tests/reliability/test_oom.py). Read when a trial starts.
FAULT_ENV = "PERL_TEST_FAULT"

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


def cache_settings(context: dict[str, Any]) -> dict[str, Any]:
    """The sweep's `cache:` block (`pipeline.spec.CacheSpec` fields, url already resolved by the
    driver) for this trial, from the context (`feature_cache`). Every context has it: the driver
    builds it (`pipeline.run.trial_context`), also when it restores an interrupted experiment
    (`Tuner.restore` takes the trainable, and so the context, from the restoring driver)."""
    from pipeline.spec import CacheSpec

    return CacheSpec.model_validate(context["feature_cache"]).model_dump()


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
    return {"feature_cache": tracking.redact_uri(cache_url(settings)),
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
                    f"{tracking._short_error(e)}") from e


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


def _injected_fault(dataset: str) -> int | None:
    """The optimizer step at which `$PERL_TEST_FAULT` makes this trial run out of memory (None:
    no fault for this dataset, the default). A malformed value is an error, not ignored."""
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    target, _, step = rest.rpartition(":")
    if kind != "oom" or not target or not step.isdigit() or int(step) < 1:
        raise ValueError(f"${FAULT_ENV}={spec!r}: expected 'oom:<dataset>:<step>' (a test hook; "
                         f"unset it for real runs)")
    return int(step) if target == dataset else None


def _progress_callback(cell: str, dataset: str = ""):
    from ray import tune

    from perl_core.train import Callback

    oom_at = _injected_fault(dataset)

    class TuneProgress(Callback):
        """Throttled progress reports (step, fraction done, loss) for Tune's status table."""

        def __init__(self) -> None:
            self.total, self.epochs, self.last = 0, 0, 0.0

        def on_train_start(self, info: dict[str, Any]) -> None:
            self.total = int(info.get("total_steps") or 0)
            self.epochs = self.total // max(1, int(info.get("steps_per_epoch") or 0))

        def on_step_end(self, step: int, logs: dict[str, Any]) -> None:
            if STEP_DELAY_S:
                time.sleep(STEP_DELAY_S)
            if oom_at is not None and step >= oom_at:
                import torch

                raise torch.OutOfMemoryError(
                    f"injected by ${FAULT_ENV} after optimizer step {step} of {cell} (test hook; "
                    f"a CUDA allocation failure raises this class)")
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


# --- the trainable -------------------------------------------------------------------------------


def trial_config(config: dict[str, Any], context: dict[str, Any]) -> tuple[str, TrainConfig]:
    """(run name, TrainConfig) of this trial: a grid cell, or fixed settings + the sample."""
    if "cell" in config:
        cell = config["cell"]
        # from_record: a Tune state saved by an older pipeline lacks the newer fields
        return cell["name"], TrainConfig.from_record(cell["config"])
    base = TrainConfig.from_record(context["base_config"])
    sample = {k: config[k] for k in context["search_fields"]}
    cfg = TrainConfig.from_dict({**base.to_dict(), **sample})  # coerces numpy scalars too
    label = ",".join(f"{k}={_short(v)}" for k, v in sample.items())
    return f"{context['base_name']}/hpo/{label}", cfg


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def trial_tags(cfg: TrainConfig, name: str, context: dict[str, Any], device: Any = None
               ) -> dict[str, str]:
    from ray import tune

    try:
        trial_id = tune.get_context().get_trial_id() or ""
    except Exception:  # outside a Tune session (direct call in a test)
        trial_id = ""
    tags = {
        "config_hash": cfg.config_hash(), "code_sha": context["code_sha"],
        "code_dirty": context["code_dirty"], "code_version": context["code_version"],
        "sweep": context["sweep"],
        "phase": context["phase"], "dataset": cfg.dataset, "protocol": cfg.protocol,
        "cell": name, "ray_node_id": _node_id(), "trial_id": trial_id,
        "ray_job_id": context.get("ray_job_id", ""), "sweep_file": context.get("sweep_file", ""),
        **versions(), **device_info(device),
        # the UI's Source and User columns (the user is the driver's: the submitter)
        **tracking.source_tags(context["code_sha"], context.get("user", "")),
    }
    return {k: str(v) for k, v in tags.items()}


def trial_data(cfg: TrainConfig, name: str) -> list[Any]:
    """The DataDigest of every dataset the trial reads (`tracking.data_digests`: once per
    process); [] when they cannot be read here: the run then records no inputs, and `fit` fails
    with its own error naming what is missing."""
    try:
        return tracking.data_digests(cfg)
    except Exception as e:
        logger.warning("cannot digest the data of %s (%s: %s): its run records no dataset "
                       "inputs", name, type(e).__name__, e)
        return []


def note_tags(cfg: TrainConfig, name: str, context: dict[str, Any], data: list[Any]
              ) -> dict[str, str]:
    """The data digest tags and the run's note (the varied values: the grid's, or the searched
    fields of an Optuna sample); `Tracker.log_result` adds the results to the note."""
    varied = context.get("search_fields") if context["phase"] == "hpo" else \
        context.get("varied_fields")
    return {**tracking.data_tags(data), tracking.NOTE_TAG: tracking.trial_note(
        name, cfg, sweep=context["sweep"], phase=context["phase"], varied=varied or (),
        data=data)}


def arm_tags(config: dict[str, Any], context: dict[str, Any]) -> dict[str, str]:
    """`arm` (the grid cell's arms, comma-joined) and `sweep_arms` (the sweep's arms in order),
    only in a sweep with arms: the aggregate's row labels (older runs have neither)."""
    arm = (config.get("cell") or {}).get("arm") or ""
    if not arm:
        return {}
    spec = context.get("sweep_arm_spec", "")
    return {"arm": arm, "sweep_arms": context.get("sweep_arms", ""),
            **({"sweep_arm_spec": spec} if spec else {})}


def import_sweep_modules(context: dict[str, Any]) -> None:
    """Import the sweep's `imports:` here, on the worker, before the trial looks up its dataset:
    their registrations (`perl_core.data.registry.register`) were made in the driver's process
    only. Once per process (Python caches modules); a failure fails the trial, naming them."""
    from perl_core.data.registry import import_modules

    names = list(context.get("imports") or ())
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


def _tracker(context: dict[str, Any]) -> tracking.Tracker | None:
    # a new client per trial costs < 1 ms once mlflow is imported (pipeline.bench: `setup`)
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
    clock = _Clock()
    import_sweep_modules(context)
    name, cfg = trial_config(config, context)
    h = cfg.config_hash()
    phase = context["phase"]
    tracker = _tracker(context)
    code = None if context.get("ignore_code_version") else context["code_version"]
    data = trial_data(cfg, name)  # before the lookup: a run of other data is not done
    clock.lap("setup")

    if tracker is not None and not context.get("rerun"):
        try:
            done = tracker.finished_run(context["experiment_id"], h, phase=phase,
                                          code_version=code,
                                          data={d.dataset: d for d in data})
        except Exception as e:  # unreachable: do not wait for it a second time below
            logger.warning("MLflow lookup failed (%s); training without a run, the storage "
                           "record will be replayed into MLflow later", e)
            done, tracker = None, None
        clock.lap("mlflow_lookup")
        if done is not None:  # another submission finished it meanwhile: nothing to do
            tune.report({**done.data.metrics, "skipped": 1.0, "cell": name,
                         "mlflow_run_id": done.info.run_id})
            return

    settings = cache_settings(context)
    try:
        cache = feature_cache(settings, cfg)
        cache_tag = cache_tags(settings, cache)
    except Exception as e:  # an unusable cache location costs speed, not the trial
        logger.warning("feature cache at %s unavailable (%s): running uncached",
                       tracking.redact_uri(cache_url(settings)), e)
        cache = None
        cache_tag = {"feature_cache": f"off (unavailable: {type(e).__name__})",
                     "feature_cache_dtype": "none"}
    try:  # before the tags, which record the device; a refusal fails the run below
        device, device_error = trial_device(cfg), None
    except (ValueError, RuntimeError) as e:
        device, device_error = None, e
    tags = {**trial_tags(cfg, name, context, device), **cache_tag, **arm_tags(config, context),
            **note_tags(cfg, name, context, data)}
    clock.lap("tags")
    started_ms = int(time.time() * 1000)
    run_id = None
    if tracker is not None:
        try:
            run_id = tracker.start_trial(context["experiment_id"], context["parent_run_id"], name,
                                         cfg, tags, start_ms=started_ms,
                                         inputs=tracking.data_inputs(data))
        except Exception as e:
            logger.warning("cannot create the MLflow run (%s); the storage record will be "
                           "replayed into MLflow later", e)
            tracker = None
    clock.lap("mlflow_start")
    try:
        if device_error is not None:
            raise device_error
        model = build_model(cfg)
        # workers from the trial's CPU share, for fit only: the run's params and its record keep
        # the submitted value (-1 = auto), so a replay logs the same params
        fit_cfg = with_trial_workers(cfg, device)  # the backbone is still on the CPU here
        clock.lap("build_model")
        before = cache.stats() if cache is not None else {}
        ckpt = TuneCheckpoint()
        result = fit(fit_cfg, callbacks=[_progress_callback(name, cfg.dataset)], model=model,
                     checkpoint=ckpt, progress=False,
                     checkpoint_every=CHECKPOINT_EVERY, cache=cache, device=device)
        # the trial's activations and optimizer state are freed now: give the allocator's
        # cached blocks back to the GPU, or a reused actor keeps this trial's peak reserved
        _empty_cuda_cache()
        clock.laps.update(fit_phases(clock.lap("fit"), result, ckpt))
        del clock.laps["fit"]
        metrics = dict(result.metrics)  # val/* included: what the search phase selects on
        metrics.update(cache_metrics(cache, before))
        metrics.update(clock.metrics(totals=False))  # phases so far (MLflow: timed below)
        record = tracking.TrialRecord(
            record_id=tracking.new_record_id(), experiment=context["experiment"], run_name=name,
            config=cfg.to_dict(), config_hash=h, metrics=metrics, history=result.history,
            epoch_history=result.epoch_history, per_class=result.per_class,
            num_trainable_parameters=result.num_trainable_parameters,
            tags=tags, parent_run_id=context["parent_run_id"], started_ms=started_ms,
            ended_ms=int(time.time() * 1000),
            extra={"train_seconds": result.train_seconds, "eval_seconds": result.eval_seconds,
                   "resumed_from_step": ckpt.resumed_step,
                   "data_inputs": tracking.data_inputs(data)})
        with tempfile.TemporaryDirectory(prefix="perl-proj-") as d:
            save_projectors(Path(d) / "projectors.safetensors", result)
            blob = (Path(d) / "projectors.safetensors").read_bytes()
        # the record first: from here on the result survives an MLflow outage
        tracking.write_record(context["storage"], record, blob)
        clock.lap("record")
    except BaseException as e:
        oom = is_oom(e)
        detail = f"{type(e).__name__}: {e}\n" + "".join(
            traceback.format_exception(type(e), e, e.__traceback__)[-6:])
        if oom:  # free this trial's memory now, so the worker is not left holding it
            model = result = None  # noqa: F841
            _release_after_oom(e, name)
        if tracker is not None and run_id is not None:
            status = "FAILED" if isinstance(e, Exception) else "KILLED"
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
    clock.lap("mlflow_log")
    timing = clock.metrics()
    clock.dump(name, {"train_seconds": result.train_seconds,
                      "eval_seconds": result.eval_seconds, "mlflow_logged": logged})
    tune.report({**{k: v for k, v in metrics.items() if tracking._finite(v)}, **timing,
                 "done": 1.0, "mlflow_logged": logged, "cell": name,
                 "mlflow_run_id": run_id or "", "train_seconds": result.train_seconds,
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
        traceback.clear_frames(e.__traceback__)  # the executing frame (train_cell) is kept
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
