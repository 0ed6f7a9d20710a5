"""Ray Tune plumbing shared by the grid and the search phase: where Tune keeps its state
(`tune_storage`), a Tuner that restores an interrupted identical submission (`make_tuner`), the
phase-complete marker, `fit` that turns Tune's own failure into a message, and the trainable
(`train_cell` with its `TrialContext` and the trial's resources)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from typing import Any

from pipeline import layout, tracking


def say(msg: str) -> None:
    print(msg, flush=True)


def digest(*parts: Any) -> str:
    """A short digest of what defines a phase's Tune experiment (its name's last part)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:10]


def tune_storage(storage: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for RunConfig: local paths as they are; s3:// through
    the same fsspec filesystem the records use (so a custom endpoint reaches Tune too)."""
    path = layout.tune_dir(storage)
    if "://" not in path:
        return path, None
    import pyarrow.fs

    fs, bare = layout.open_fs(path)
    return bare, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def exists(fs: Any, path: str) -> bool:
    if fs is None:
        return os.path.exists(path)
    import pyarrow.fs

    return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def _remove(fs: Any, path: str) -> None:
    if fs is None:
        shutil.rmtree(path, ignore_errors=True)
    elif exists(fs, path):
        fs.delete_dir(path)


def _missing_checkpoints(tuner: Any) -> list[str]:
    """Paths of the latest trial checkpoints a restored Tuner's state refers to that its storage
    does not hold (a checkpoint whose upload was cut off by a storage outage)."""
    return [r.checkpoint.path for r in tuner.get_results()
            if r.checkpoint is not None and not exists(r.checkpoint.filesystem, r.checkpoint.path)]


def _restore(path: str, name: str, trainable: Any, fs: Any) -> Any | None:
    """The interrupted experiment at `path`, or None when it cannot be resumed."""
    from ray import tune

    say(f"resuming the interrupted Tune experiment {name} (Tune may warn that it cannot "
        f"fetch metrics of the trials that had not started: harmless)")
    try:
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True,
                                   restart_errored=True, storage_filesystem=fs)
        missing = _missing_checkpoints(tuner)
        if not missing:
            return tuner
        # Tune would try to resume these trials from a checkpoint that is not there and fail
        # them ("does not exist on storage anymore"); finished cells are skipped anyway
        say(f"not resuming {name}: {len(missing)} trial checkpoint(s) its state refers to "
            f"are not in storage (lost in a storage outage?), e.g. {missing[0]}; "
            f"starting afresh")
    except Exception as e:  # incompatible or corrupt state: start afresh
        say(f"cannot restore {name} ({type(e).__name__}: {e}); starting afresh")
    return None


def make_tuner(trainable: Any, name: str, spec: Any, param_space: dict[str, Any],
               tune_config: Any, rerun: bool) -> tuple[Any, str]:
    """(Tuner, its phase-complete marker path): the interrupted identical submission's
    experiment `name` restored, else a fresh Tuner (old state removed)."""
    from ray import tune
    from ray.tune.logger import JsonLoggerCallback

    from pipeline.progress import ProgressPrinter

    storage_path, fs = tune_storage(spec.storage)
    path = f"{storage_path}/{name}"
    marker = f"{path}/{layout.PHASE_COMPLETE}"
    if not rerun and tune.Tuner.can_restore(path, storage_filesystem=fs) and \
            not exists(fs, marker):
        tuner = _restore(path, name, trainable, fs)
        if tuner is not None:
            return tuner, marker
    _remove(fs, path)
    run_config = tune.RunConfig(
        name=name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=tune.FailureConfig(max_failures=spec.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        callbacks=[ProgressPrinter(), JsonLoggerCallback()], verbose=0)
    return tune.Tuner(trainable, param_space=param_space, tune_config=tune_config,
                      run_config=run_config), marker


def mark_complete(marker: str, spec: Any) -> None:
    """Write the phase-complete marker: an identical submission starts afresh, not resumes."""
    _, fs = tune_storage(spec.storage)
    data = json.dumps({"completed": time.time()}).encode()
    if fs is None:
        with open(marker, "wb") as f:
            f.write(data)
    else:
        with fs.open_output_stream(marker) as f:
            f.write(data)


def fit(tuner: Any, phase: str, spec: Any) -> tuple[Any | None, str]:
    """(`tuner.fit()`'s ResultGrid, "") or (None, why) when Tune itself stops (seen: its storage
    unreachable when it saves its state). A failing trial does not raise here: it is a FAILED
    result in the grid."""
    try:
        return tuner.fit(), ""
    except Exception as e:
        why = (f"the {phase} phase stopped: Tune raised {type(e).__name__}: "
               f"{tracking.short_error(e)} (its state is under {layout.tune_dir(spec.storage)})")
        say(f"error: {why}")
        return None, why


def trainable(spec: Any, context: Any) -> Any:
    """`train_cell` with this phase's TrialContext and each trial's resources."""
    from ray import tune

    from pipeline.trainable import train_cell

    return tune.with_resources(tune.with_parameters(train_cell, context=context),
                               {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu})


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"  # short and unique (cell names contain '/')


def tune_config(**kw: Any) -> Any:
    """A TuneConfig with the settings both phases share (actor reuse: the backbone and the
    feature cache stay in the worker; trial names and folders)."""
    from ray import tune

    from pipeline.progress import trial_name

    return tune.TuneConfig(reuse_actors=True, trial_name_creator=trial_name,
                           trial_dirname_creator=trial_dirname, **kw)


__all__ = ["digest", "tune_storage", "exists", "make_tuner", "mark_complete", "fit",
           "trainable", "trial_dirname", "tune_config"]
