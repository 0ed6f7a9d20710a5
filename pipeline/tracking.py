"""MLflow tracking of a sweep, and the storage record that makes MLflow replayable.

Layout in MLflow (one name per concept: params are TrainConfig field names):
- one experiment per sweep family (`perl/ablation_steps`), created on the driver before any trial
  (creation races between workers are a known MLflow problem), with an absolute artifact location
  next to a SQLite store (a server decides for itself);
- one parent run per submission (tags `sweep`, `phase=sweep`, driver identity, heartbeat);
- one child run per trial (`mlflow.parentRunId`), named after its cell
  (`b2n/ToyShapes/16shot/seed1/J7/K4`), with params = every TrainConfig field, the tags in
  `trial_tags`, final metrics at step 0, the per-step training curve under `train_step/*`, the
  per-epoch curve under `train_epoch/*` (MLflow step = epoch, from 1), and the artifacts
  `projectors/projectors.safetensors`, `config.json`, `per_class.json`, `metrics.json`;
- what the UI shows besides (docs/tracking.md): `source_tags` (Source, User), notes
  (`mlflow.note.content`: Description), each `<family>_step{k}` metric charted as `<family>` over
  the reasoning step (`step_charted`), and one dataset input per dataset a trial read, with its
  digest (`data_digests`, `data_inputs`); `data_changed` is the done-match's rule on data.

The `TrialRecord` is the other copy of a trial's result: JSON + safetensors in the sweep's
storage (local or s3), written by the trial *before* it talks to MLflow. `replay` turns records
that MLflow lacks (an outage, a crash between the two writes) into FINISHED runs.

Outages: against an HTTP tracking server every call is bounded (`HTTP_DEFAULTS`: 3 retries with
a 1 s backoff factor and a 30 s timeout per request, about 10 s before a call gives up on a server
that is down, instead of MLflow's ~4 minutes); the user's own `MLFLOW_HTTP_REQUEST_*` values win.
A trial that cannot reach MLflow trains anyway and leaves its record for `replay`.

Records: the JSON carries the sha256 and size of its safetensors, written in the order blob ->
read back and verify -> JSON (temporary name, then renamed). A JSON present means the pair is
complete; `iter_records` re-checks the blob and skips (and names) a record whose blob is missing
or differs, so a partial write is never replayed as a result.

Secrets never reach MLflow: params are TrainConfig fields (no credentials there), URIs are logged
without user:password (`redact_uri`), and no environment variable is copied into a tag.
"""

from __future__ import annotations

import json
import os
import re
import socket
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import urlsplit

from perl_core.config import TrainConfig
from perl_core.protocol import is_target_evalset
from pipeline import queries
# the layout and the store's location live in pipeline.layout (re-exported: callers and tests
# import them from here too)
from pipeline.layout import (GRID_PHASE, PARENT_PHASE, PHASES, RESOLVED_SWEEP, SEARCH_PHASE,
                             experiment_slug, open_fs, records_dir, redact_text, redact_uri,
                             sqlite_artifact_location, sqlite_path, study_path)
from pipeline.queries import mlflow_client

HEARTBEAT_S = 30.0  # the driver refreshes its parent run's heartbeat tag this often
STALE_S = 300.0  # a RUNNING parent without a heartbeat for this long is an orphan
_BATCH = 900  # metrics per log_batch call (MLflow's REST limit is 1000)
RECORD_FORMAT = "perl-trial-record/1"
PROJECTORS_FILE = "projectors.safetensors"  # a trial run's weights: artifact projectors/<this>
# Bounded MLflow HTTP calls (set only where the user has not): a tracking server that is down
# costs a trial ~10 s per call, not minutes; the record in storage covers the outage.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
                 # set_terminated would fetch the run again only to print "View run ... at:" into
                 # every trial's log; the driver's summary says where the runs are
                 "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


class TrackingUnavailable(RuntimeError):
    """The tracking server (or store) cannot be reached; the message names the redacted URI."""


class RecordError(RuntimeError):
    """A storage record could not be written or verified; the message names the URL."""


def config_params(cfg: TrainConfig) -> dict[str, str]:
    """Every TrainConfig field as an MLflow param string (tuples as JSON lists)."""
    return {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in cfg.to_dict().items()}


# --- the storage record ---------------------------------------------------------------------------


@dataclass
class TrialRecord:
    """Everything MLflow would hold about one finished trial, as plain JSON."""

    record_id: str
    experiment: str
    run_name: str
    config: dict[str, Any]  # TrainConfig.to_dict()
    config_hash: str
    metrics: dict[str, float]
    history: list[dict[str, Any]]  # one record per optimizer step (`TrainResult.history`)
    per_class: dict[str, dict[str, float]]
    num_trainable_parameters: int
    tags: dict[str, str]  # the child run's tags (minus the parent link)
    parent_run_id: str = ""
    started_ms: int = 0
    ended_ms: int = 0
    format: str = RECORD_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    # one record per epoch (`TrainResult.epoch_history`); records written before it existed
    # have none and are replayed with an empty epoch curve
    epoch_history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def train_config(self) -> TrainConfig:
        return TrainConfig.from_record(self.config)

    def stem(self) -> str:
        return f"{self.config_hash}-{self.record_id}"


def new_record_id() -> str:
    return uuid.uuid4().hex[:16]


# One record write (all its steps, s3fs's and botocore's retries included) gives up after this
# many seconds with a RecordError; `$PERL_RECORD_TIMEOUT_S` overrides it (read at each write).
# Without it, an S3 endpoint that accepts connections but never answers held a write ~20 minutes
# (s3fs: 5 tries of botocore's 5 attempts of a 15 s read timeout, per storage call).
RECORD_TIMEOUT_S = 300.0


def record_timeout_s() -> float:
    raw = os.environ.get("PERL_RECORD_TIMEOUT_S", "")
    if not raw.strip():
        return RECORD_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ValueError(f"PERL_RECORD_TIMEOUT_S={raw!r}: expected a number of seconds > 0")
    return value




class _RecordTimeout(Exception):
    """The overall time limit of one record write ran out (not a TimeoutError: fsspec would
    turn that into its own FSTimeoutError)."""


class _Deadline:
    """Runs the storage steps of one record write against one overall time limit. On an async
    filesystem (s3fs) each step is a coroutine on fsspec's event loop under `asyncio.wait_for`,
    so a request stalled on a socket is cancelled when the time is up (a Python check between
    blocking calls could not interrupt it); other filesystems run the blocking call and the
    limit is checked between steps."""

    def __init__(self, fs, limit_s: float, t0: float):
        self.fs, self.limit_s, self.t0 = fs, limit_s, t0
        self.is_async = bool(getattr(fs, "async_impl", False) and getattr(fs, "loop", None))

    def spent(self) -> float:
        return time.monotonic() - self.t0

    def left(self) -> float:
        left = self.limit_s - self.spent()
        if left <= 0:
            raise _RecordTimeout()
        return left

    def __call__(self, method: str, *args, **kwargs):
        """`fs.<method>(*args, **kwargs)` (the `_<method>` coroutine on an async filesystem)."""
        if not self.is_async:
            self.left()
            return getattr(self.fs, method)(*args, **kwargs)
        return self._bounded(lambda: getattr(self.fs, "_" + method)(*args, **kwargs))

    def _bounded(self, make_coro):
        import asyncio

        from fsspec.asyn import sync

        left = self.left()

        async def step():
            try:
                return await asyncio.wait_for(make_coro(), left)
            except asyncio.TimeoutError:
                if self.spent() < self.limit_s - 0.05:
                    raise  # a timeout of the storage client itself, not ours
                raise _RecordTimeout() from None

        return sync(self.fs.loop, step)

    def connect(self) -> None:
        """Open the S3 client (no request yet), make its retries visible (`warn_s3_retries`)
        and its uploads bounded by the read timeout (`no_expect_continue`)."""
        if self.is_async and hasattr(self.fs, "set_session"):
            async def connect():
                await self.fs.set_session()
                warn_s3_retries(self.fs._s3)
                no_expect_continue(self.fs._s3)

            self._bounded(connect)


def warn_s3_retries(client) -> None:
    """Log every failed S3 request that botocore retries at WARNING on `pipeline.tracking`:
    `S3 request PutObject to bucket/key failed (ReadTimeoutError), retrying (attempt 2/5)`.
    s3fs and botocore log their retries only at DEBUG, so a slow endpoint looked like a hang.
    The message has the operation, the path (bucket/key, no query string: no signature, no
    credential) and the error's class; idempotent per client."""
    import logging

    events = getattr(getattr(client, "meta", None), "events", None)
    if events is None or getattr(client, "_perl_retry_warnings", False):
        return
    retries = dict(getattr(client.meta.config, "retries", None) or {})
    mode = retries.get("mode") or "legacy"
    total = retries.get("total_max_attempts") or (5 if mode == "legacy" else 3)
    log = logging.getLogger(__name__)

    def on_needs_retry(attempts=0, caught_exception=None, response=None, operation=None,
                       request_dict=None, **_):
        if caught_exception is not None:
            why = type(caught_exception).__name__
        else:
            status = getattr(response[0], "status_code", 0) if response else 0
            if not (status >= 500 or status == 429):
                return None  # a success or a client error: not retried
            why = f"HTTP {status}"
        path = urlsplit(str((request_dict or {}).get("url", ""))).path.lstrip("/") or "?"
        name = getattr(operation, "name", "request")
        if attempts < total:
            log.warning("S3 request %s to %s failed (%s), retrying (attempt %d/%d)", name, path,
                        why, attempts + 1, total)
        else:
            log.warning("S3 request %s to %s failed (%s) on attempt %d/%d; s3fs retries the call "
                        "(up to its own limit)", name, path, why, attempts, total)
        return None  # observe only: botocore's own handler decides

    events.register("needs-retry.s3", on_needs_retry, unique_id="perl-retry-warnings")
    client._perl_retry_warnings = True


def no_expect_continue(client) -> None:
    """Uploads without `Expect: 100-continue` (botocore adds it to every PutObject with a body).
    With it, a response that never comes after the server's `100 Continue` was not always ended
    by the client's read timeout (aiohttp; through the proxy of tests/reliability/test_s3_slow.py
    3 of 6 such stalled uploads waited until killed), so a slow endpoint hung a write instead of
    having it retried.
    Records are small: the round trip it saves for a refused upload does not matter."""
    events = getattr(getattr(client, "meta", None), "events", None)
    if events is not None:
        from botocore.handlers import add_expect_header

        events.unregister("before-call.s3", add_expect_header)


def write_record(storage: str, record: TrialRecord, projectors: bytes) -> str:
    """Write `<stem>.safetensors`, read it back and check its sha256, then write `<stem>.json`
    under a temporary name and rename it (the JSON last: its presence means the pair is
    complete). Returns the JSON's URL. Raises RecordError naming the URL, the step and the
    seconds spent on any storage failure (s3fs has already retried transient errors by then,
    each retry logged at WARNING), or when the whole write has taken longer than
    `record_timeout_s()` (`$PERL_RECORD_TIMEOUT_S`, default RECORD_TIMEOUT_S): a stalled
    endpoint costs that long at most. Nothing is marked complete unless verified."""
    import hashlib

    base = records_dir(storage, record.experiment)
    digest = hashlib.sha256(projectors).hexdigest()
    record.extra = {**record.extra, "projectors_sha256": digest,
                    "projectors_bytes": len(projectors)}
    json_url = f"{base}/{record.stem()}.json"
    limit = record_timeout_s()
    step, t0 = ["open"], time.monotonic()  # step[0]: what failed, for the message
    try:
        fs, root = open_fs(base)
        run = _Deadline(fs, limit, t0)
        run.connect()
        _write_pair(fs, run, root, base, record, projectors, digest, step)
    except RecordError:
        raise
    except Exception as e:
        raise _record_error(e, step[0], time.monotonic() - t0, limit, json_url) from e
    return json_url


def _write_pair(fs: Any, run: "_Deadline", root: str, base: str, record: TrialRecord,
                projectors: bytes, digest: str, step: list[str]) -> None:
    """The steps of `write_record` (each named in `step[0]` before it starts)."""
    import hashlib

    step[0] = "create the folder"
    run("makedirs", root, exist_ok=True)
    blob, final = f"{root}/{record.stem()}.safetensors", f"{root}/{record.stem()}.json"
    step[0] = "write the weights"
    run("pipe_file", blob, projectors)
    step[0] = "verify the weights"
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache(root)
    back = run("cat_file", blob)
    if hashlib.sha256(back).hexdigest() != digest:
        raise RecordError(f"{base}/{record.stem()}.safetensors: read back {len(back)} bytes "
                          f"that differ from the {len(projectors)} written; the record is not "
                          f"marked complete")
    step[0] = "write the record"
    tmp = f"{root}/.{record.stem()}.json.tmp"
    run("pipe_file", tmp, json.dumps(asdict(record)).encode())
    step[0] = "mark the record complete"
    if not run.is_async:
        run("mv", tmp, final)
        return
    run("cp_file", tmp, final)  # S3 has no rename: a copy (complete once it returns), a delete
    try:
        run("rm_file", tmp)
    except Exception as e:  # complete all the same; readers never list `.*.json.tmp`
        import logging

        logging.getLogger(__name__).warning(
            "trial record %s is complete, but its temporary copy %s could not be removed (%s)",
            f"{base}/{record.stem()}.json", f"{base}/.{record.stem()}.json.tmp",
            type(e).__name__)


def _record_error(e: Exception, step: str, spent: float, limit: float,
                  json_url: str) -> RecordError:
    if isinstance(e, _RecordTimeout):
        why = (f"gave up after {spent:.0f} s, the time limit of one record write "
               f"(PERL_RECORD_TIMEOUT_S={limit:g}): the storage endpoint stalled or is too "
               f"slow")
    else:
        why = f"after {spent:.0f} s of retries ({type(e).__name__}: {e})"
    if step == "mark the record complete":  # the rename may have reached the store
        then = ("the rename may have reached the store: then the record may be complete, "
                "and it is whole (its weights were verified before); readers check it")
    else:
        then = "the record is not marked complete"
    return RecordError(f"cannot {step} of trial record {json_url} {why}; {then}")


def iter_records(storage: str, experiment: str, *,
                 problems: list[str] | None = None) -> Iterator[tuple[TrialRecord, str]]:
    """(record, URL of its safetensors) for every complete record of the experiment. A JSON whose
    safetensors is missing or does not match its recorded sha256 is skipped; its reason is
    appended to `problems` when given (else logged)."""
    import hashlib
    import logging

    base = records_dir(storage, experiment)
    fs, root = open_fs(base)
    if not fs.exists(root):
        return
    for path in sorted(fs.glob(f"{root}/*.json")):
        with fs.open(path, "r") as f:
            data = json.load(f)
        if data.get("format") != RECORD_FORMAT:
            continue
        rec = TrialRecord(**data)
        url = f"{base}/{rec.stem()}.safetensors"
        want = rec.extra.get("projectors_sha256")
        if want:
            try:
                with fs.open(f"{root}/{rec.stem()}.safetensors", "rb") as f:
                    ok = hashlib.sha256(f.read()).hexdigest() == want
            except FileNotFoundError:
                ok = False
            if not ok:
                why = f"{url}: missing or not the blob its record {rec.stem()}.json describes"
                if problems is not None:
                    problems.append(why)
                else:
                    logging.getLogger(__name__).warning("skipping an incomplete record: %s", why)
                continue
        yield rec, url


def read_bytes(url: str) -> bytes:
    fs, path = open_fs(url)
    with fs.open(path, "rb") as f:
        return f.read()


# --- MLflow conventions: source, user, notes, step-charted metrics, dataset inputs ---------------

NOTE_TAG = "mlflow.note.content"  # the UI's Description column and a run page's description
DATA_DIGEST_TAG = "data_digest."  # + canonical dataset name: `DataDigest.digest` of what it read
SOURCE_NAME = "pipeline/run.py"  # the entry point of every sweep run (repository-relative)
_NOTE_MAX = 6000  # MLflow tag values hold 8000 characters
_STEP_KEY = re.compile(r"^(?P<family>.+)_step(?P<k>\d+)$")
_HEADLINE = ("base/acc", "novel/acc", "hm", "all/acc", "target_avg", "val/acc")


def submitter() -> str:
    """Who submits, as MLflow's own runs record it: the tracking server's user name
    ($MLFLOW_TRACKING_USERNAME or ~/.mlflow/credentials), else the login (getpass: $LOGNAME,
    $USER, the password database), else "unknown"."""
    import getpass

    from mlflow.utils.credentials import read_mlflow_creds

    try:
        return read_mlflow_creds().username or getpass.getuser()
    except Exception:  # no login name in a bare container
        return "unknown"


def source_tags(code_sha: str, user: str) -> dict[str, str]:
    """The tags behind the UI's Source and User columns, as MLflow's fluent API sets them: the
    entry point, type LOCAL, the git commit (`pipeline.env.code_version().sha`; left out when
    unknown) and the submitter."""
    tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "LOCAL",
            "mlflow.user": user or "unknown"}
    if code_sha and code_sha != "unknown":
        tags["mlflow.source.git.commit"] = code_sha
    return tags


def _clip(text: str) -> str:
    return text if len(text) <= _NOTE_MAX else text[:_NOTE_MAX - 20] + "\n\n(cut)"


def sweep_note(description: str, sweep: str, sweep_file: str, num_cells: int) -> str:
    """The parent run's note: the sweep's `description:`, then the file and its cell count."""
    head = description.strip() or f"A submission of sweep `{sweep}` (no `description:`)."
    return _clip(f"{head}\n\nSweep file `{sweep_file}`, {num_cells} grid cell(s).")


def _protocol_text(cfg: TrainConfig) -> str:
    if cfg.protocol == "base2novel":
        return (f"trained on the base classes of {cfg.dataset}, tested on its base and novel "
                f"classes")
    if cfg.protocol == "all":
        return f"trained and tested on all classes of {cfg.dataset}"
    targets = ", ".join(cfg.eval_datasets) or "its registered variants"
    return f"trained on all classes of {cfg.dataset}, tested on it and on {targets}"


def trial_note(name: str, cfg: TrainConfig, *, sweep: str, phase: str,
               varied: Iterable[str], data: Iterable[Any]) -> str:
    """A child run's note (Markdown): the cell, the values its sweep varies, the protocol, the
    model and training settings and the data it read; `results_note` adds the numbers."""
    what = "an Optuna sample" if phase == SEARCH_PHASE else "a grid cell"
    values = ", ".join(f"`{f}` = {getattr(cfg, f)}" for f in varied if hasattr(cfg, f))
    lines = [f"**{name}**: {what} of sweep `{sweep}`.", "",
             f"- varied: {values or 'nothing (a single cell)'}",
             f"- protocol `{cfg.protocol}`: {_protocol_text(cfg)}",
             f"- model: `{cfg.arch}`, J={cfg.inject_layer}, K={cfg.num_steps} steps, "
             f"rank {cfg.rank}, modality {cfg.modality}, variant {cfg.variant}",
             f"- training: {cfg.shots} shots, seed {cfg.seed}, {cfg.epochs} epoch(s), lr {cfg.lr}, "
             f"batch {cfg.batch_size}, anchor weight {cfg.anchor_weight}"]
    lines += [f"- data: {d.dataset}, {d.kind} `{redact_uri(d.source)}` (digest `{d.digest}`)"
              for d in data]
    return _clip("\n".join(lines))


def results_note(metrics: dict[str, float]) -> str:
    """The headline numbers of a finished run (% top-1 after K steps, and at step 0, zero-shot
    CLIP), as a Markdown paragraph; "" when there are none."""
    keys = [k for k in _HEADLINE if k in metrics]
    keys += sorted(k for k in metrics if k.endswith("/acc") and k not in keys
                   and is_target_evalset(k.split("/")[0]))
    if not keys:
        return ""
    final = ", ".join(f"{k} **{metrics[k]:.2f}**" for k in keys if is_finite(metrics[k]))
    zero = ", ".join(f"{k} {metrics[f'{k}_step0']:.2f}" for k in keys
                     if is_finite(metrics.get(f"{k}_step0")))
    return f"**Results** (% top-1 after K steps): {final}." + (
        f" Step 0 (zero-shot CLIP): {zero}." if zero else "")


def step_charted(metrics: dict[str, float]) -> list[tuple[str, float, int]]:
    """(key, value, MLflow step) for every finite metric, with the per-step ones charted: each
    `<family>_step{k}` is also logged as `<family>` at step k (`base/acc_step2` -> `base/acc` at
    step 2, `hm_step0` -> `hm` at 0). A flat key that is itself a family (`base/acc`, `hm`: the
    value after K steps) is logged at the family's last step K instead of 0, in place of that
    step's point, so its latest value (what search_runs, the UI's columns and the aggregate read)
    is the flat one. Other flat keys stay at step 0."""
    families: dict[str, dict[int, float]] = {}
    for key, value in metrics.items():
        m = _STEP_KEY.match(key)
        if m and is_finite(value):
            families.setdefault(m["family"], {})[int(m["k"])] = float(value)
    out = [(k, float(v), max(families[k]) if k in families else 0)
           for k, v in metrics.items() if is_finite(v)]
    for family, points in families.items():
        flat_at = max(points) if is_finite(metrics.get(family)) else None
        out += [(family, v, k) for k, v in sorted(points.items()) if k != flat_at]
    return out


# What each trial read: one DataDigest per (dataset, data root), computed once per process
# (afterwards one stat per split file tells whether it changed; `dataset_digest(known=...)`).
_DATA_DIGESTS: dict[tuple[str, str], Any] = {}


def datasets_read(cfg: TrainConfig) -> list[str]:
    """The datasets a trial of `cfg` reads: the training dataset first, then its targets."""
    names = [cfg.dataset, *cfg.eval_datasets]
    if cfg.protocol == "domain_generalization" and not cfg.eval_datasets:
        from perl_core.protocol import dg_default_targets

        names += dg_default_targets(cfg.dataset)
    return list(dict.fromkeys(names))


def _digest(name: str, data_root: str) -> Any:
    from perl_core.data import dataset_digest, get_spec

    key = (get_spec(name).name, data_root)
    _DATA_DIGESTS[key] = dataset_digest(name, data_root, known=_DATA_DIGESTS.get(key))
    return _DATA_DIGESTS[key]


def known_digests() -> tuple[tuple[str, str, Any], ...]:
    """This process's digests as (dataset, data_root, DataDigest): what the driver hands its
    trials (`TrialContext.known_data`), so a trial checks one stamp per split file instead of
    listing a folder dataset (ImageNet's 1.3M images) again in every worker process."""
    return tuple((name, root, d) for (name, root), d in _DATA_DIGESTS.items())


def adopt_digests(known: Iterable[tuple[str, str, Any]]) -> None:
    """Take digests computed elsewhere (`known_digests`) as this process's earlier results:
    `dataset_digest(known=...)` still re-reads any whose split or class-name files changed."""
    for name, root, digest in known:
        _DATA_DIGESTS.setdefault((name, root), digest)


def data_digests(cfg: TrainConfig) -> list[Any]:
    """The `perl_core.data.DataDigest` of every dataset `cfg` reads (training dataset first).
    Raises what `dataset_digest` raises (a missing root or split file, named)."""
    return [_digest(name, cfg.data_root) for name in datasets_read(cfg)]


def grid_data_digests(configs: Iterable[TrainConfig],
                      warn: Any = None) -> dict[str, Any]:
    """dataset -> DataDigest over the configs (the driver's side of the done-match). A dataset
    not there yet (the synthetic world is generated later) is left out; one that cannot be read
    for another reason too, with a line through `warn`: its finished runs then count as done
    whatever data they read."""
    out: dict[str, Any] = {}
    seen: set[tuple[str, str]] = set()
    for cfg in configs:
        for name in datasets_read(cfg):
            if (name, cfg.data_root) in seen:
                continue
            seen.add((name, cfg.data_root))
            try:
                d = _digest(name, cfg.data_root)
            except FileNotFoundError:
                continue
            except Exception as e:
                if warn is not None:
                    warn(f"warning: cannot digest dataset {name} under "
                         f"{redact_uri(cfg.data_root)} ({type(e).__name__}: {short_error(e)}): "
                         f"its finished runs count as done whatever data they read")
                continue
            out[d.dataset] = d
    return out


def data_tags(digests: Iterable[Any]) -> dict[str, str]:
    return {f"{DATA_DIGEST_TAG}{d.dataset}": d.digest for d in digests}


def data_inputs(digests: list[Any]) -> list[dict[str, str]]:
    """The MLflow dataset inputs of a trial (JSON, kept in its record for the replay): the
    first dataset is the training one (context `train`), the others targets (`eval`)."""
    return [{"name": d.dataset, "digest": d.digest, "source": redact_uri(d.source),
             "kind": d.kind, "context": "train" if i == 0 else "eval"}
            for i, d in enumerate(digests)]


def data_changed(tags: dict[str, str], digests: dict[str, Any]) -> list[str]:
    """The datasets whose digest a run recorded (`data_digest.<dataset>`) differs from the
    current one: such a run is not done for the current data. THE rule of the done-match on
    data: a run without the tag (logged before it existed) or a dataset not digested now
    matches, so nothing is recomputed for want of a digest."""
    return [name for name, d in digests.items()
            if tags.get(f"{DATA_DIGEST_TAG}{name}", d.digest) != d.digest]


def _data_key(tags: dict[str, str]) -> tuple:
    return tuple(sorted((k, v) for k, v in tags.items() if k.startswith(DATA_DIGEST_TAG)))


def _stale_data_lines(stale: dict[str, tuple[Any, list[str]]], digests: dict[str, Any]
                      ) -> list[str]:
    """One warning per dataset whose change makes finished cells run again."""
    by_dataset: dict[str, list[str]] = {}
    for run, names in stale.values():
        for name in names:
            by_dataset.setdefault(name, []).append(
                run.data.tags.get(f"{DATA_DIGEST_TAG}{name}", "?"))
    lines = []
    for name, old in sorted(by_dataset.items()):
        d = digests[name]
        lines.append(f"warning: dataset {name} changed: its {d.kind} {redact_uri(d.source)} has "
                     f"digest {d.digest} now, {len(old)} finished cell(s) read "
                     f"{', '.join(sorted(set(old)))}; they are not counted as done and run "
                     f"again on the new data")
    return lines


# --- MLflow --------------------------------------------------------------------------------------


class Tracker:
    """A thin MlflowClient wrapper with the sweep's conventions."""

    def __init__(self, tracking_uri: str):
        if tracking_uri.startswith(("http://", "https://")):
            for k, v in HTTP_DEFAULTS.items():
                os.environ.setdefault(k, v)
        self.tracking_uri = tracking_uri
        self.client = mlflow_client(tracking_uri)

    def check(self) -> None:
        """Raise TrackingUnavailable (naming the redacted URI) when the store does not answer,
        or refuses this client's credentials (naming the user and where they came from, never
        the password)."""
        try:
            self.client.search_experiments(max_results=1)
        except Exception as e:
            where = redact_uri(self.tracking_uri)
            why = f"{type(e).__name__}: {short_error(e)}"
            if _http_status(e) in (401, 403):
                raise TrackingUnavailable(
                    f"MLflow tracking at {where} refused {credentials_source()} ({why}); fix "
                    f"the user name / password there (docs/tracking.md, Credentials)") from None
            raise TrackingUnavailable(
                f"MLflow tracking at {where} is unreachable ({why}); start the server or fix "
                f"tracking_uri (--tracking-uri, the sweep's tracking_uri:, $MLFLOW_TRACKING_URI)"
            ) from None

    # experiments -------------------------------------------------------------------------------
    def default_artifact_location(self, experiment: str) -> str | None:
        """Absolute artifact root beside a SQLite store (MLflow's default would be ./mlruns of
        whichever process created the experiment); None lets a tracking server decide."""
        return sqlite_artifact_location(self.tracking_uri, experiment)

    def experiment_id(self, name: str, artifact_location: str | None = None) -> str:
        """Get or create (race-safe: a concurrent creator wins and we read theirs back)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise RuntimeError(f"MLflow experiment {name!r} is deleted; restore it "
                                   f"(`mlflow experiments restore --experiment-id "
                                   f"{exp.experiment_id}`) or choose another name")
            return exp.experiment_id
        try:
            return self.client.create_experiment(
                name, artifact_location=artifact_location or self.default_artifact_location(name))
        except MlflowException as e:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise RuntimeError(f"cannot create MLflow experiment {name!r} at "
                                   f"{redact_uri(self.tracking_uri)}: {e}") from e
            return exp.experiment_id

    # searching ---------------------------------------------------------------------------------
    # (the filter strings and paging are pipeline.queries'; these add the data rule)
    def search(self, experiment_id: str, filter_string: str = "") -> list:
        return queries.all_runs(self.client, [experiment_id], filter_string)

    def finished_by_hash(self, experiment_id: str, *, phase: str = GRID_PHASE,
                         code_version: str | None = None, data: dict[str, Any] | None = None,
                         warn: Any = None) -> dict[str, Any]:
        """config_hash -> the latest FINISHED run of that phase (same code_version unless None)
        that read the same data (`data`: dataset -> DataDigest now; the rule is
        `data_changed`). With `warn`, one line per dataset whose change leaves cells to run."""
        runs = queries.finished_runs(self.client, experiment_id, phase=phase,
                                     code_version=code_version)
        out: dict[str, Any] = {}
        stale: dict[str, tuple[Any, list[str]]] = {}
        for r in sorted(runs, key=lambda r: r.info.end_time or 0):
            h = r.data.tags.get("config_hash")
            changed = data_changed(r.data.tags, data or {}) if h else []
            if h and changed:
                stale[h] = (r, changed)
            elif h:
                out[h] = r
        if warn is not None:
            for line in _stale_data_lines({h: v for h, v in stale.items() if h not in out},
                                          data or {}):
                warn(line)
        return out

    def finished_cells(self, experiment_id: str, configs: list[TrainConfig],
                       code_version: str | None, warn: Any) -> dict[str, Any]:
        """config hash -> the FINISHED grid-phase run of each of `configs` already done, by
        the data they read now (the driver's and the dry run's "what is done")."""
        return self.finished_by_hash(experiment_id, phase=GRID_PHASE, code_version=code_version,
                                     warn=warn, data=grid_data_digests(configs, warn))

    def finished_run(self, experiment_id: str, config_hash: str, *, phase: str,
                     code_version: str | None, data: dict[str, Any] | None = None
                     ) -> Any | None:
        """The latest FINISHED run of this hash, as `finished_by_hash` matches it."""
        runs = queries.finished_runs_of_hash(self.client, experiment_id, config_hash,
                                             phase=phase, code_version=code_version)
        return next((r for r in runs if not data_changed(r.data.tags, data or {})), None)

    # runs --------------------------------------------------------------------------------------
    def start_parent(self, experiment_id: str, sweep: str, run_name: str,
                     tags: dict[str, str]) -> str:
        tags = {**tags, "sweep": sweep, "phase": PARENT_PHASE, "driver_host": socket.gethostname(),
                "driver_pid": str(os.getpid()), "heartbeat": str(int(time.time()))}
        return self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id

    def heartbeat(self, run_id: str) -> None:
        self.client.set_tag(run_id, "heartbeat", str(int(time.time())))

    # Tags a child run is created with; the others (config_hash among them) come with the params
    # in one log_batch, which MLflow's SQL store writes params first, tags last.
    _CREATE_TAGS = ("mlflow.parentRunId", "sweep", "phase", "cell")

    def start_trial(self, experiment_id: str, parent_run_id: str, run_name: str,
                    cfg: TrainConfig, tags: dict[str, str], start_ms: int | None = None,
                    inputs: list[dict[str, str]] | None = None) -> str:
        """A RUNNING child run with every param and tag, and the datasets it reads (`inputs`,
        from `data_inputs`). If MLflow goes away between creating
        the run and logging its params, the run is a shell without `config_hash` (which readers
        such as pipeline.aggregate skip) that the next submission marks KILLED; never a trial
        run with tags but no params."""
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        first = {k: v for k, v in tags.items() if k in self._CREATE_TAGS}
        run = self.client.create_run(experiment_id, run_name=run_name, tags=first,
                                     start_time=start_ms)
        from mlflow.entities import Param, RunTag

        params = [Param(k, v) for k, v in config_params(cfg).items()]
        rest = [RunTag(k, str(v)) for k, v in tags.items() if k not in first]
        self.client.log_batch(run.info.run_id, params=params, tags=rest)
        if inputs:
            self.log_inputs(run.info.run_id, inputs)
        return run.info.run_id

    def log_inputs(self, run_id: str, inputs: list[dict[str, str]]) -> None:
        """The run's dataset inputs (the UI's Datasets column): name, digest, source (the split
        file or folder, as MLflow's own dataset sources write it), context train / eval."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from perl_core.data.storage import protocol_of

        def entity(i: dict[str, str]) -> Any:
            kind = protocol_of(i["source"])
            return Dataset(name=i["name"], digest=i["digest"],
                           source_type="local" if kind == "file" else kind,
                           source=json.dumps({"uri": i["source"]}),
                           profile=json.dumps({"digest_of": i["kind"]}))

        self.client.log_inputs(run_id, datasets=[
            DatasetInput(entity(i), tags=[InputTag("mlflow.data.context", i["context"])])
            for i in inputs])

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_result(self, run_id: str, record: TrialRecord, projectors: bytes) -> None:
        """Final metrics (step 0; the per-step ones charted over the step too, `step_charted`),
        the training curves (`train_step/*`, step = optimizer step N; `train_epoch/*`, step =
        epoch E, both from 1), artifacts, and the results in the run's note."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v, step in step_charted(record.metrics)]
        metrics.append(Metric("num_trainable_parameters",
                              float(record.num_trainable_parameters), now, 0))
        for h in record.history:
            step = int(h.get("step", 0))
            metrics += [Metric(f"train_step/{k}", float(h[k]), now, step)
                        for k in ("loss", "ce", "anchor") if k in h and is_finite(h[k])]
        for e in record.epoch_history:
            epoch = int(e.get("epoch", 0))
            metrics += [Metric(f"train_epoch/{k}", float(e[k]), now, epoch)
                        for k in ("loss", "ce", "anchor") if k in e and is_finite(e[k])]
        for i in range(0, len(metrics), _BATCH):
            self.client.log_batch(run_id, metrics=metrics[i:i + _BATCH])
        with tempfile.TemporaryDirectory(prefix="perl-artifacts-") as tmp:
            t = Path(tmp)
            (t / "projectors").mkdir()
            (t / "projectors" / PROJECTORS_FILE).write_bytes(projectors)
            (t / "config.json").write_text(json.dumps(record.config, indent=1))
            (t / "per_class.json").write_text(json.dumps(record.per_class, indent=1))
            (t / "metrics.json").write_text(json.dumps(record.metrics, indent=1, sort_keys=True))
            self.client.log_artifacts(run_id, str(t))
        done = {"num_trainable_parameters": str(record.num_trainable_parameters),
                "record_id": record.record_id}
        if record.tags.get(NOTE_TAG):
            results = results_note(record.metrics)
            done[NOTE_TAG] = _clip(record.tags[NOTE_TAG] + (f"\n\n{results}" if results else ""))
        self.set_tags(run_id, done)

    def log_link(self, experiment_id: str, parent_run_id: str, run_name: str, cfg: TrainConfig,
                 tags: dict[str, str], source_run_id: str, metrics: dict[str, float],
                 inputs: list[dict[str, str]] | None = None) -> str:
        """A FINISHED child run whose result is an existing run's (`pipeline.reuse`): this
        cell's params, `tags`, `metrics` (the per-step ones charted as `log_result` does) and a
        copy of the source's artifacts. Created RUNNING and closed last: a link cut off half-way
        is never a result (the next submission marks it KILLED and links again)."""
        from mlflow.entities import Metric

        run_id = self.start_trial(experiment_id, parent_run_id, run_name, cfg, tags,
                                  inputs=inputs)
        try:
            now = int(time.time() * 1000)
            batch = [Metric(k, v, now, step) for k, v, step in step_charted(metrics)]
            for i in range(0, len(batch), _BATCH):
                self.client.log_batch(run_id, metrics=batch[i:i + _BATCH])
            with tempfile.TemporaryDirectory(prefix="perl-link-") as tmp:
                got = self.client.download_artifacts(source_run_id, "", tmp)
                if any(Path(got).iterdir()):
                    self.client.log_artifacts(run_id, got)
            note = tags.get(NOTE_TAG)
            if note:
                results = results_note(metrics)
                self.set_tags(run_id, {NOTE_TAG: _clip(note + (f"\n\n{results}" if results
                                                               else ""))})
        except Exception as e:  # never a half link left RUNNING (MLflow gone: the next
            try:  # submission marks it KILLED)
                self.end(run_id, "FAILED", f"link of run {source_run_id} failed: "
                                           f"{type(e).__name__}: {short_error(e)}")
            except Exception:
                pass
            raise
        self.end(run_id, "FINISHED")
        return run_id

    def projectors(self, run_id: str) -> bytes:
        """The projector file a trial run logged (`projectors/projectors.safetensors`)."""
        with tempfile.TemporaryDirectory(prefix="perl-weights-") as tmp:
            path = self.client.download_artifacts(run_id, f"projectors/{PROJECTORS_FILE}", tmp)
            return Path(path).read_bytes()

    def end(self, run_id: str, status: str = "FINISHED", detail: str | None = None,
            end_ms: int | None = None) -> None:
        if detail:
            # tags hold at most 8000 characters; the head of a traceback is what matters
            self.client.set_tag(run_id, "status_detail", detail[:4000])
        self.client.set_terminated(run_id, status, end_time=end_ms)

    # orphans -----------------------------------------------------------------------------------
    def kill_orphans(self, experiment_id: str, sweep: str, *, own_parent: str | None = None,
                     only_children_of: str | None = None) -> list[str]:
        """Mark RUNNING runs of `sweep` whose driver is gone as KILLED; returns their ids.

        A parent run is orphaned when its driver process is dead (same host: pid check) or its
        heartbeat is older than STALE_S (any host). A child is orphaned when its parent is not a
        live RUNNING parent (the trial died with, or after, its driver) - or, with
        `only_children_of`, every RUNNING child of that (our own, finished) phase.
        """
        running = queries.running_runs(self.client, experiment_id, sweep)
        parents = {r.info.run_id: r for r in running if r.data.tags.get("phase") == PARENT_PHASE}
        live = {rid for rid, r in parents.items() if rid == own_parent or _driver_alive(r)}
        killed = []
        for r in running:
            rid, tags = r.info.run_id, r.data.tags
            if rid in live:
                continue
            if only_children_of is not None:
                if tags.get("mlflow.parentRunId") != only_children_of:
                    continue
                why = ("marked KILLED by its submission after the phase: the trial ended "
                       "without closing its run (a crash or kill, or MLflow failing while it "
                       "logged; a stored record is replayed as a new run)")
            elif rid in parents:
                why = "the driver of this submission is gone (killed or lost)"
            elif tags.get("mlflow.parentRunId") in live:
                continue
            else:
                why = "its submission's driver is gone (killed or lost)"
            self.end(rid, "KILLED", why if only_children_of is not None
                     else f"marked KILLED by a later submission: {why}")
            killed.append(rid)
        return killed


def _http_status(e: BaseException) -> int | None:
    """The HTTP status of a failed MLflow REST call (MLflow raises a RestException with it, or an
    MlflowException whose message says `error code 401 != 200`)."""
    import re

    get = getattr(e, "get_http_status_code", None)
    found = re.search(r"error code (\d{3}) != 200", str(e))
    code = int(found.group(1)) if found else (get() if callable(get) else None)
    return code if isinstance(code, int) else None


def credentials_source() -> str:
    """Which MLflow user this process authenticates as, and where MLflow found it (the
    environment wins over ~/.mlflow/credentials); never the password."""
    from mlflow.environment_variables import MLFLOW_TRACKING_USERNAME
    from mlflow.utils.credentials import read_mlflow_creds

    user = read_mlflow_creds().username
    if not user:
        return ("a request without credentials ($MLFLOW_TRACKING_USERNAME unset, no "
                "mlflow_tracking_username in ~/.mlflow/credentials)")
    where = ("$MLFLOW_TRACKING_USERNAME/_PASSWORD" if MLFLOW_TRACKING_USERNAME.get() else
             f"{Path('~/.mlflow/credentials').expanduser()}, section [mlflow]")
    return f"user {user!r} ({where})"


def short_error(e: BaseException) -> str:
    """The first line of an exception, without MLflow's long retry chains."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return redact_text(text)[:300]  # (MLflow's errors quote the tracking URI)


def is_finite(v: Any) -> bool:
    """A number that is neither NaN nor infinite (what MLflow and Tune are given)."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))


def driver_liveness(run: Any, now: float | None = None) -> tuple[bool | None, str]:
    """Whether the driver behind a RUNNING parent run (`phase=sweep`) is alive, with the evidence
    (for `pipeline.status`). None: no readable heartbeat tag, so it cannot tell (`kill_orphans`
    counts that as gone). Gone: heartbeat older than STALE_S (any host), or its pid is not running
    on this host."""
    now = time.time() if now is None else now
    tags = run.data.tags
    host, pid = tags.get("driver_host", ""), tags.get("driver_pid", "")
    where = f"driver pid {pid or '?'} on {host or '?'}"
    try:
        age = now - float(tags["heartbeat"])
    except (KeyError, ValueError):
        return None, f"{where}, no heartbeat recorded"
    if age > STALE_S:
        return False, (f"{where}: no heartbeat for {age:.0f} s (a live driver beats every "
                       f"{HEARTBEAT_S:.0f} s)")
    if host == socket.gethostname() and pid:
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            return False, f"{where}: that process is not running (killed or crashed)"
        except PermissionError:  # exists, owned by another user
            pass
    return True, f"{where}, heartbeat {max(0.0, age):.0f} s ago"


def _driver_alive(run: Any) -> bool:
    return driver_liveness(run)[0] is True


def log_record(tracker: Tracker, experiment_id: str, record: TrialRecord, projectors: bytes,
               parent_run_id: str | None = None, extra_tags: dict[str, str] | None = None) -> str:
    """Create a FINISHED child run from a storage record (the replay path)."""
    cfg = record.train_config
    tags = {**record.tags, **(extra_tags or {})}
    run_id = tracker.start_trial(experiment_id, parent_run_id or record.parent_run_id,
                                 record.run_name, cfg, tags, start_ms=record.started_ms or None,
                                 inputs=record.extra.get("data_inputs"))
    tracker.log_result(run_id, record, projectors)
    tracker.end(run_id, "FINISHED", end_ms=record.ended_ms or None)
    return run_id


def replay(tracker: Tracker, storage: str, experiment: str, *, parent_run_id: str | None = None,
           experiment_id: str | None = None, skipped: list[str] | None = None) -> list[str]:
    """Log every storage record of `experiment` that MLflow lacks; returns the new run ids.

    A record is present when a FINISHED run carries its `record_id`, or a FINISHED run of the
    same (config_hash, code_version, phase, data digests) exists (no duplicate for an
    already-tracked result).
    Incomplete records (blob missing or not matching its sha256) are never logged; their reasons
    go to `skipped` when given.

    If MLflow stops answering part-way (after its bounded retries), TrackingUnavailable says how
    many records were logged before; the rest stay in storage for the next replay. A run the dead
    call left half-logged is RUNNING without a FINISHED status, so it neither counts as present
    nor as a result: the next submission marks it KILLED (`kill_orphans`) and logs the record
    again, once.
    """
    records = list(iter_records(storage, experiment, problems=skipped))
    if not records:
        return []
    new: list[str] = []
    down = tracking_errors()
    try:
        exp_id = experiment_id or tracker.experiment_id(experiment)
        done = queries.finished_runs(tracker.client, exp_id)
    except down as e:
        raise _replay_stopped(tracker, e, 0, len(records)) from e
    known_ids = {r.data.tags.get("record_id") for r in done}
    # (a result of other data is another result: its record is logged beside the old run)
    known_keys = {(r.data.tags.get("config_hash"), r.data.tags.get("code_version"),
                   r.data.tags.get("phase"), _data_key(r.data.tags)) for r in done}
    todo = []
    for rec, url in records:  # one per result: of two records of one result, the first
        key = (rec.config_hash, rec.tags.get("code_version"), rec.tags.get("phase"),
               _data_key(rec.tags))
        if rec.record_id not in known_ids and key not in known_keys:
            known_keys.add(key)
            todo.append((rec, url))
    for rec, weights_url in todo:
        blob = read_bytes(weights_url)  # a storage error is not an MLflow outage: raised as is
        try:
            run_id = log_record(tracker, exp_id, rec, blob, parent_run_id=parent_run_id,
                                extra_tags={"replayed": "true"})
        except down as e:
            raise _replay_stopped(tracker, e, len(new), len(todo)) from e
        new.append(run_id)
    return new


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What an MLflow call raises when the store goes away (after the bounded HTTP retries)."""
    from mlflow.exceptions import MlflowException

    return (MlflowException, OSError)  # requests' exceptions are OSErrors


def _replay_stopped(tracker: Tracker, e: BaseException, logged: int,
                    total: int) -> TrackingUnavailable:
    return TrackingUnavailable(
        f"MLflow tracking at {redact_uri(tracker.tracking_uri)} stopped answering during the "
        f"replay ({type(e).__name__}: {short_error(e)}): {logged} of {total} record(s) to "
        f"log were logged; the others are safe in storage and the next replay logs them "
        f"(a run left half-logged is marked KILLED then, never counted as a result)")


def iter_children(tracker: Tracker, experiment_id: str, parent_run_id: str) -> Iterable:
    return queries.children(tracker.client, experiment_id, parent_run_id)


__all__ = ["Tracker", "TrialRecord", "TrackingUnavailable", "RecordError", "HTTP_DEFAULTS",
           "PHASES", "PARENT_PHASE", "GRID_PHASE", "SEARCH_PHASE", "config_params",
           "redact_uri", "write_record", "short_error", "is_finite", "mlflow_client",
           "sqlite_path", "study_path", "open_fs", "RESOLVED_SWEEP",
           "iter_records", "read_bytes", "records_dir", "replay", "log_record", "new_record_id",
           "experiment_slug", "iter_children", "HEARTBEAT_S", "tracking_errors",
           "driver_liveness", "NOTE_TAG", "DATA_DIGEST_TAG", "SOURCE_NAME", "submitter",
           "source_tags", "sweep_note", "trial_note", "results_note", "step_charted",
           "datasets_read", "data_digests", "grid_data_digests", "known_digests",
           "adopt_digests", "data_tags", "data_inputs", "data_changed"]
