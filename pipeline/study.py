"""The Optuna study of a sweep's search phase: persistent, resumable, readable by optuna-dashboard.

- Where: one SQLite file per experiment, `layout.study_path(storage, experiment)` =
  `<storage>/optuna/<experiment slug>.sqlite3`, beside the trial records. On local or NFS storage
  the driver opens that file itself. On `s3://` (SQLite needs a POSIX file) the driver works on a
  local copy, `<tempdir>/perl-optuna/<digest of the URL>/<slug>.sqlite3`, downloaded when the
  search phase starts and uploaded (fsspec) after every finished sample and at the end.
  Object storage has no lock: an upload first checks that the stored file is still the one
  this driver downloaded or last uploaded (its ETag / generation / size and time), and refuses
  (`StudyConflict`) when another driver wrote it since, rather than overwrite its samples. (A
  write between that check and the upload still wins; the MLflow runs refill the study.)
- Which study: `study_name(...)` is stable across re-submissions of one search (same sweep,
  fixed settings, space, metric, mode, code version and data digests), so a re-submission
  resumes it; new data starts a new study.
  `num_samples`, `max_concurrent` and `seed` are outside the name: raising `num_samples`
  continues the same study.
- `optuna_space(search)`: the sweep's `search.space` as Optuna distributions (the driver's
  searcher and the aggregate's rebuild from MLflow use the same one).
- `read_study(location, name)`: an in-memory copy for the aggregate (the sweep's file is never
  opened for writing); `rebuild_study(...)`: the same from MLflow runs when the file is not
  reachable.

Dashboard: `optuna-dashboard sqlite:///<storage>/optuna/<slug>.sqlite3` (docs/sweeps.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from pipeline import layout


def optuna_space(search: Any) -> dict[str, Any]:
    """`SearchSpec.space` -> {field: optuna distribution}."""
    import optuna.distributions as d

    space = {}
    for name, p in search.space.items():
        if p.type == "loguniform":
            space[name] = d.FloatDistribution(p.low, p.high, log=True)
        elif p.type == "uniform":
            space[name] = d.FloatDistribution(p.low, p.high)
        elif p.type == "int":
            space[name] = d.IntDistribution(int(p.low), int(p.high))  # inclusive bounds
        else:
            space[name] = d.CategoricalDistribution(list(p.values))
    return space


def space_json(search: Any) -> str:
    """The space as JSON (the parent run's `search_space` tag: the aggregate rebuilds from it)."""
    return json.dumps({k: p.model_dump(exclude_none=True) for k, p in search.space.items()},
                      sort_keys=True)


def study_name(sweep: str, base_name: str, base_hash: str, search: Any,
               code: str | None, data: Mapping[str, str] | None = None) -> str:
    """`<sweep>:<base cell>:<digest>`: readable in the dashboard, one per search. `data`
    (dataset -> digest of what the samples read): new data starts a new study, as the grid
    phase runs its cells again on new data (`tracking.data_changed`)."""
    what = [base_hash, space_json(search), search.metric, search.mode, code or "any code"]
    if data:
        what.append(sorted(data.items()))
    digest = hashlib.sha256(json.dumps(what).encode()).hexdigest()[:10]
    return f"{sweep}:{base_name}:{digest}"


def direction(mode: str) -> str:
    return "maximize" if mode == "max" else "minimize"


class StudyConflict(RuntimeError):
    """Another driver wrote the remote study file since this one read or wrote it."""


def _version(fs: Any, path: str) -> str | None:
    """What identifies one write of a stored file (None: no file)."""
    try:
        info = fs.info(path)
    except FileNotFoundError:
        return None
    for k in ("ETag", "etag", "generation", "version_id", "VersionId"):
        if info.get(k):
            return f"{k}={info[k]}"
    return f"size={info.get('size')} time={info.get('mtime') or info.get('LastModified')}"


# (location, local copy) -> the stored file's version this process last read or wrote; per
# process, not per object: Tune may copy the searcher that holds a StudyFile
_SEEN: dict[tuple[str, str], str | None] = {}


@dataclass(frozen=True)
class StudyFile:
    location: str  # the persistent file: a local path or an s3:// (any fsspec) URL
    local: str  # the file SQLite opens on the driver (the same as location when local)

    @classmethod
    def of(cls, storage: str, experiment: str) -> "StudyFile":
        from perl_core.data.storage import is_url

        loc = layout.study_path(storage, experiment)
        if not is_url(loc):
            return cls(loc, os.path.abspath(loc))
        digest = hashlib.sha256(loc.encode()).hexdigest()[:10]
        return cls(loc, str(Path(tempfile.gettempdir()) / "perl-optuna" / digest /
                            loc.rsplit("/", 1)[-1]))

    @property
    def remote(self) -> bool:
        return self.local != os.path.abspath(self.location)

    @property
    def url(self) -> str:
        return f"sqlite:///{self.local}"

    def pull(self) -> None:
        """Before opening: the storage's copy replaces the local one (no copy: start empty; the
        MLflow runs refill it)."""
        os.makedirs(os.path.dirname(self.local), exist_ok=True)
        if not self.remote:
            return
        fs, path = layout.open_fs(self.location)
        if os.path.exists(self.local):
            os.remove(self.local)
        seen = _SEEN[(self.location, self.local)] = _version(fs, path)
        if seen is not None:
            fs.get(path, self.local)

    def push(self) -> None:
        """Upload the local copy; StudyConflict (nothing uploaded) when the stored file is no
        longer the one this driver pulled or last pushed."""
        if not (self.remote and os.path.exists(self.local)):
            return
        fs, path = layout.open_fs(self.location)
        key = (self.location, self.local)
        if key in _SEEN:  # (not pulled in this process: nothing to compare with)
            now = _version(fs, path)
            if now != _SEEN[key]:
                raise StudyConflict(
                    f"{layout.redact_uri(self.location)} was written by another driver since "
                    f"this one read it ({_SEEN[key] or 'no file'} -> {now}): not "
                    f"overwritten. Two submissions of this search ran at once; this one's "
                    f"samples are in MLflow, and the next submission adds them to the study")
        fs.put(self.local, path)
        if hasattr(fs, "invalidate_cache"):
            fs.invalidate_cache(path)
        _SEEN[key] = _version(fs, path)


def open_study(sf: StudyFile, name: str, mode: str, fresh: bool = False) -> Any:
    """The study `name` in `sf` (created if absent; `fresh`: an existing one is deleted)."""
    import optuna

    storage = optuna.storages.RDBStorage(sf.url)
    if fresh and name in {s.study_name for s in storage.get_all_studies()}:
        optuna.delete_study(study_name=name, storage=storage)
    return optuna.create_study(storage=storage, study_name=name, direction=direction(mode),
                               load_if_exists=True)


def sample_trial(params: dict[str, Any], value: float, space: dict[str, Any],
                 attrs: dict[str, str]) -> Any:
    """A COMPLETE trial for a sample evaluated outside the study (an MLflow run)."""
    import optuna

    return optuna.trial.create_trial(params=params, distributions={k: space[k] for k in params},
                                     value=value, user_attrs=attrs)


def close_orphans(study: Any) -> int:
    """Mark RUNNING trials FAIL (their driver is gone: nothing will ever tell them)."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(stale)


def read_study(location: str, name: str) -> Any:
    """An in-memory copy of the persistent study (raises if the file or the study is absent)."""
    import optuna
    from perl_core.data.storage import is_url

    with tempfile.TemporaryDirectory(prefix="perl-study-") as d:
        copy = os.path.join(d, "study.sqlite3")
        if is_url(location):
            fs, path = layout.open_fs(location)
            fs.get(path, copy)
        else:
            if not os.path.exists(location):
                raise FileNotFoundError(f"no study file at {location}")
            shutil.copyfile(location, copy)
        storage = optuna.storages.RDBStorage(f"sqlite:///{copy}")
        try:
            src = optuna.load_study(study_name=name, storage=storage)
            trials = src.get_trials()
            dst = optuna.create_study(direction=src.direction, study_name=name)
        finally:
            storage.engine.dispose()  # close the copy before its folder goes
    dst.add_trials(trials)
    return dst


def rebuild_study(name: str, mode: str, samples: Iterable[tuple[dict, float, dict]],
                  space: dict[str, Any]) -> tuple[Any, int]:
    """An in-memory study from (params, objective, user attrs) samples; returns (study, number
    of samples left out because they fall outside `space`)."""
    import optuna

    study = optuna.create_study(direction=direction(mode), study_name=name)
    skipped = 0
    for params, value, attrs in samples:
        try:
            study.add_trial(sample_trial(params, value, space, attrs))
        except ValueError:
            skipped += 1
    return study, skipped


def space_from_json(text: str) -> dict[str, Any]:
    """The `search_space` tag (`space_json`) -> optuna distributions (via `optuna_space`)."""
    from types import SimpleNamespace as NS

    raw = json.loads(text)
    return optuna_space(NS(space={k: NS(**{"low": None, "high": None, "values": None, **v})
                                  for k, v in raw.items()}))


def infer_space(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Distributions spanning the values seen (runs from before the `search_space` tag)."""
    import optuna.distributions as d

    space: dict[str, Any] = {}
    for k in dict.fromkeys(k for s in samples for k in s):
        vals = [s[k] for s in samples if k in s]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            space[k] = d.FloatDistribution(float(min(vals)), float(max(vals)))
        else:
            space[k] = d.CategoricalDistribution(sorted(set(map(str, vals))))
    return space


T = TypeVar("T")


def best_sample(samples: Sequence[T], mode: str, value: Callable[[T], float | None]) -> T | None:
    """THE best-sample rule of a search (the driver's summary and the aggregate's tables): the
    highest `value` for mode "max", the lowest for "min"; samples without a value are left out;
    on a tie, the earliest sample (the first in `samples`, which are in start order)."""
    best, best_v = None, None
    sign = 1.0 if mode == "max" else -1.0
    for s in samples:
        v = value(s)
        if v is not None and (best_v is None or sign * v > sign * best_v):
            best, best_v = s, v
    return best


def best_trial(study: Any, mode: str) -> Any | None:
    """The study's best COMPLETE trial by `best_sample` (None: no COMPLETE trial)."""
    from optuna.trial import TrialState

    trials = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)),
                    key=lambda t: t.number)
    return best_sample(trials, mode, lambda t: t.value)


def quiet_optuna() -> None:
    """Optuna's INFO line per added trial and its ExperimentalWarning on the matplotlib plots."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


__all__ = ["optuna_space", "space_json", "study_name", "StudyFile", "StudyConflict", "open_study",
           "sample_trial",
           "close_orphans", "read_study", "rebuild_study", "space_from_json", "infer_space",
           "direction", "quiet_optuna", "best_sample", "best_trial"]
