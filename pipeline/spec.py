"""Sweep YAML -> validated `SweepSpec` -> `TrainConfig` cells (+ an optional Optuna search phase).

A sweep file names an MLflow experiment, the fixed settings, a grid (cartesian product) and
optionally a search space for a second, Optuna-driven phase:

    name: ablation_steps                 # the `sweep` tag; Tune experiment names derive from it
    experiment: perl/ablation_steps      # MLflow experiment
    fixed: {dataset: ..., data_root: ${PERL_DATA_ROOT}, ...}    # TrainConfig fields
    grid: {num_steps: [1, 2, 3, 4, 5], seed: [1, 2, 3]}        # TrainConfig field -> values
    arms:                                # optional: labelled sub-grids instead of one product
      - {name: default}                  # the sweep's fixed x grid as it stands
      - {name: front, fixed: {text_placement: front}, grid: {seed: [1]}}   # overrides on top
    search:                              # optional: Optuna phase on top of `fixed`
      space: {lr: {type: loguniform, low: 1.0e-5, high: 1.0e-3}}
      metric: val/acc                    # a validation metric, never a test metric
      mode: max
      num_samples: 16
    resources: {cpu: 1, gpu: 0.25}       # per trial; fractional GPUs pack trials on one GPU
    storage: ${PERL_RUNS_DIR:-runs}      # trial records + Tune state: local path or s3://
    tracking_uri: ...                    # else $MLFLOW_TRACKING_URI, else ./runs/mlflow.db
    max_failures: 1                      # Tune FailureConfig: retries per trial
    cache: {enabled: true, url: null, max_gb: 20, dtype: float32}   # frozen-feature cache
    imports: [my_datasets]               # modules imported first (dataset registrations)

With `arms`, the cells are the union over arms of (fixed + arm.fixed) x (grid + arm.grid): an
arm's fixed key pins a field the grid varies, an arm's grid key replaces or adds an axis. A run
that two arms share is one cell (same config hash), tagged with both arm names; its name ends in
`/arm=<name>[+<name>]`, and its MLflow run carries the tags `arm` (its arms, comma-joined) and
`sweep_arms` (every arm of the sweep, in order), which the aggregate uses as row labels.

Every key is a `TrainConfig` field (same name in YAML, config, MLflow param and table header).
Mistakes raise `SpecError`, whose text names the file, the line, the key path and what is allowed.
`${VAR}` / `${VAR:-default}` are substituted in `data_root`, `pretrained`, `storage`,
`tracking_uri` and `cache.url` only (so cluster YAMLs point at S3 through the environment);
relative paths there are made absolute against the current directory, because Ray runs trials in
another directory.

`imports:` lists modules (dotted names) that register datasets (`perl_core.data.registry.register`)
or anything else the cells need: `parse_spec` imports them before it checks the cells (so their
dataset names are valid), and every trial imports them again when it starts on its Ray worker
(`pipeline.trainable.train_cell`), so the registrations exist on every node. A module that cannot
be imported is a `SpecError` naming the file, the `imports[i]` key and the module.
"""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Literal, get_type_hints

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from pipeline.env import REPO
from pipeline.layout import default_tracking_uri, redact_text, redact_uri
from perl_core.config import (EXECUTION_FIELDS, FIELD_NAMES, ConfigError, TrainConfig,
                              file_value_problem, unknown_field, validate_field)
from perl_core.configfile import ConfigFileError, Locator, format_path, read_yaml
from perl_core.data.registry import import_modules
from perl_core.protocol import eval_datasets_problem

# Keys whose string values get ${VAR} substitution (and path absolutisation).
ENV_KEYS = ("data_root", "pretrained", "storage", "tracking_uri")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_HINTS = get_type_hints(TrainConfig)
_NUMERIC = (int, float)
PROTOCOL_ABBREV = {"base2novel": "b2n", "cross_dataset": "xd", "domain_generalization": "dg",
                   "all": "all"}
# Fields always shown in a cell name, in this order; every other field the grid varies follows.
_NAME_FIELDS = ("protocol", "dataset", "shots", "seed", "inject_layer", "num_steps")
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class SpecError(ConfigFileError):
    """A sweep file is invalid; `problems` are (location, message) pairs, all of them at once."""

    what = "sweep file"


# --- the schema ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    # finite numbers only: `high: .inf` or `max_gb: .inf` are typos, never settings
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, v: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads `true` as 1; a bool is only ever meant for a bool key
        if isinstance(v, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError(f"expected a number, not {str(v).lower()}")
        return v


class SearchParam(_Strict):
    """One dimension of the Optuna space (Tune domains: loguniform/uniform/randint/choice)."""

    type: Literal["loguniform", "uniform", "int", "choice"]
    low: float | None = None
    high: float | None = None
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchParam":
        if self.type == "choice":
            if not self.values:
                raise ValueError("type 'choice' needs a non-empty 'values' list")
            if self.low is not None or self.high is not None:
                raise ValueError("type 'choice' takes 'values', not 'low'/'high'")
            if len({repr(v) for v in self.values}) != len(self.values):
                raise ValueError(f"'values' has duplicates: {self.values}")
            return self
        if self.values is not None:
            raise ValueError(f"type {self.type!r} takes 'low' and 'high', not 'values'")
        if self.low is None or self.high is None:
            raise ValueError(f"type {self.type!r} needs both 'low' and 'high'")
        if self.low >= self.high:
            raise ValueError(f"low={self.low:g} must be < high={self.high:g}")
        if self.type == "loguniform" and self.low <= 0:
            raise ValueError(f"type 'loguniform' needs low > 0 (got {self.low:g})")
        if self.type == "int" and not (float(self.low).is_integer() and
                                       float(self.high).is_integer()):
            raise ValueError(f"type 'int' needs integer bounds (got {self.low:g}, {self.high:g})")
        return self

    def bounds(self) -> list[Any]:
        """Values that must all be valid for the field (the ends of a range, or every choice)."""
        if self.type == "choice":
            return list(self.values or [])
        if self.type == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]


class SearchSpec(_Strict):
    space: dict[str, SearchParam]
    metric: str
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(16, gt=0, le=100_000)
    # the sampler is seeded with seed + the study's trial count: both stay in numpy's range
    seed: int = Field(0, ge=0, le=2**31 - 1)
    max_concurrent: int | None = Field(None, gt=0, le=100_000)

    @field_validator("space")
    @classmethod
    def _non_empty(cls, v: dict) -> dict:
        if not v:
            raise ValueError("the search space is empty: give at least one TrainConfig field")
        return v

    @field_validator("metric")
    @classmethod
    def _validation_metric(cls, v: str) -> str:
        # Selecting hyper-parameters on a test split would leak the test set into the result.
        if not v.startswith("val/"):
            raise ValueError(f"metric {v!r} is not a validation metric: the search must select on "
                             f"the few-shot validation split (e.g. 'val/acc'), never on test "
                             f"metrics such as 'base/acc', 'novel/acc', 'hm' or 'target_avg'")
        return v


class Resources(_Strict):
    cpu: float = Field(1.0, gt=0, le=1024)
    gpu: float = Field(0.0, ge=0, le=64)  # fractional: 0.25 packs four trials on one GPU

    @field_validator("gpu")
    @classmethod
    def _packable(cls, v: float) -> float:
        # Ray packs fractions of one GPU; 2.5 GPUs cannot be placed on any node
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"gpu={v:g}: a fraction must be at most 1 (0.25 packs four trials "
                             f"on one GPU), above 1 give a whole number of GPUs")
        return v


class CacheSpec(_Strict):
    """The frozen-feature cache of the trials (`perl_core.cache.FeatureCache`), one per worker
    process, passed to `fit(cache=...)`. It never changes which runs a sweep holds: it is outside
    the config hash. `float32` (the default) stores features bit-exactly, so a cached trial gives
    exactly the uncached numbers; `float16`/`bfloat16` halve the space and change results at that
    rounding level (recorded as the `feature_cache_dtype` tag of every run)."""

    enabled: bool = True
    # None: node-local `<tempdir>/perl-feature-cache`, resolved on each node (fast, not shared
    # between nodes); a shared path or s3://bucket/prefix shares it across nodes.
    url: str | None = None
    max_gb: float = Field(20.0, gt=0, le=1_000_000)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"

    @field_validator("url")
    @classmethod
    def _non_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("cache.url is empty: give a directory or s3:// URL, or leave it out "
                             "for the node-local default")
        return v


class Arm(_Strict):
    """One labelled sub-grid of a sweep: `fixed`/`grid` on top of the sweep's own (an arm's fixed
    key pins a field the sweep's grid varies; an arm's grid key replaces or adds an axis)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a tag value, part of cell names
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] = Field(default_factory=dict)


class SweepSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    experiment: str = Field(min_length=1)
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, list[Any]] | None = None
    # labelled sub-grids; the cells are the union over arms (deduplicated by config hash)
    arms: list[Arm] | None = None
    search: SearchSpec | None = None
    resources: Resources = Resources()
    storage: str = "runs"
    tracking_uri: str | None = None
    max_failures: int = Field(0, ge=-1, le=1000)  # -1: retry forever (Tune's convention)
    cache: CacheSpec = CacheSpec()
    # modules imported before the cells are checked, and by every trial (dataset registrations)
    imports: list[str] = Field(default_factory=list)
    _source: str = PrivateAttr("")  # the YAML file it was read from (not a YAML key)
    # the sweep after `base:` and `--set`, before ${VAR} substitution (the parent run's artifact)
    _resolved: str = PrivateAttr("")

    @field_validator("imports")
    @classmethod
    def _module_names(cls, v: list[str]) -> list[str]:
        bad = [name for name in v if not _MODULE_RE.match(name)]
        if bad:
            raise ValueError(f"imports: {bad} are not module names (dotted Python names such as "
                             f"'my_datasets' or 'my_pkg.datasets'; no paths, no '.py')")
        return v

    @field_validator("tracking_uri")
    @classmethod
    def _not_file_store(cls, v: str | None) -> str | None:
        if v is not None:
            check_tracking_uri(v)
        return v

    @property
    def source(self) -> str:
        return self._source

    @property
    def resolved_yaml(self) -> str:
        """The sweep as run: its `base:` files merged in and the `--set` overrides applied."""
        return self._resolved

    def base_config(self) -> TrainConfig:
        """The fixed settings over TrainConfig's defaults (the search phase's starting point)."""
        return TrainConfig.from_dict(self.fixed)

    @property
    def varied_fields(self) -> tuple[str, ...]:
        """Fields the grid varies (with arms: within some arm; the arm label names the rest)."""
        grids = [b.grid for b in blocks(self)] if self.arms else [self.grid or {}]
        return tuple(dict.fromkeys(k for g in grids for k, v in g.items() if len(v) > 1))

    @property
    def arm_names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arms or ())


@dataclass(frozen=True)
class GridCell:
    """One grid point: its readable name, its config and the config hash that identifies it."""

    name: str
    config: TrainConfig
    config_hash: str
    arm: str = ""  # the arm(s) the cell belongs to, comma-joined in sweep order ("" without arms)


@dataclass(frozen=True)
class Block:
    """One arm's effective settings (or the whole sweep, without arms): raw YAML values, and the
    key path each field was set at (for messages)."""

    arm: str
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    origin: dict[str, tuple]  # field -> ("fixed",) / ("grid",) / ("arms", i, "fixed"|"grid")


def blocks(spec: SweepSpec) -> list[Block]:
    """The sweep's sub-grids: one per arm (its fixed/grid over the sweep's), else the sweep."""
    top = {**{k: ("fixed",) for k in spec.fixed}, **{k: ("grid",) for k in spec.grid or {}}}
    if not spec.arms:
        return [Block("", dict(spec.fixed), dict(spec.grid or {}), top)]
    out = []
    for i, arm in enumerate(spec.arms):
        fixed = {k: v for k, v in spec.fixed.items() if k not in arm.grid}
        fixed.update(arm.fixed)
        grid = {k: v for k, v in (spec.grid or {}).items() if k not in arm.fixed}
        grid.update(arm.grid)  # a replaced axis keeps its position (the name order)
        origin = {**top, **{k: ("arms", i, "fixed") for k in arm.fixed},
                  **{k: ("arms", i, "grid") for k in arm.grid}}
        out.append(Block(arm.name, fixed, grid, origin))
    return out


# --- loading --------------------------------------------------------------------------------------


def locate_sweep(sweep: str, tell: Any = print) -> str:
    """The sweep file a CLI should read. A relative path that does not exist here but does under
    the project folder (the one holding `pipeline/` and `sweeps/`) is taken from there, and the
    process moves there first, as `cd <project> && python -m pipeline.run sweeps/X.yaml` (the
    KubeRay manifest's entrypoint) would, so that the file's relative paths mean the same; `tell`
    says so. This makes `ray job submit -- python -m pipeline.run sweeps/X.yaml` work as written
    on a cluster whose image holds the project, even without `--working-dir` (the job then starts
    in a Ray session folder)."""
    given = Path(sweep)
    if given.is_absolute() or given.exists() or not (REPO / given).is_file():
        return sweep
    tell(f"{sweep} is not in {os.getcwd()}; using {REPO / given} and running from {REPO}")
    os.chdir(REPO)
    return str(REPO / given)


def load_spec(path: str | os.PathLike, *, env: dict[str, str] | None = None,
              cwd: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> SweepSpec:
    """Read, include, override, substitute, validate and fully check a sweep file (every cell is
    checked too). `overrides` are `--set key=value` strings (`fixed.lr=1e-3`, `grid.seed=[1,2]`)."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(source, [("", f"cannot read the sweep file: {e.strerror or e}")]) from None
    return parse_spec(text, source=source, env=env, cwd=cwd, overrides=overrides)


def parse_spec(text: str, *, source: str = "<string>", env: dict[str, str] | None = None,
               cwd: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> SweepSpec:
    env = dict(os.environ) if env is None else env
    cwd = Path(cwd or os.getcwd()).resolve()
    raw, lines = _read_with_bases(text, source, ())
    raw = _apply_overrides(raw, lines, list(overrides), source)
    # before ${VAR} (no secret from the environment in it), and literal credentials in URIs
    # (written in the file or in a --set) redacted: it is logged as an artifact
    resolved = yaml.safe_dump(_redacted(raw), sort_keys=False)
    problems: list[tuple[tuple, str]] = []
    raw = _substitute(raw, env, cwd, problems)
    where = Locator(lines)
    if problems:
        raise SpecError(source, [(where(p), m) for p, m in problems])
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as e:
        raise SpecError(source, [(where(tuple(err["loc"])), _pydantic_message(err))
                                 for err in e.errors()]) from None
    spec._source, spec._resolved = source, resolved
    problems = _import_problems(spec.imports)  # before the cells: they may register datasets
    if problems:
        raise SpecError(source, [(where(p), m) for p, m in problems])
    problems = _check_fields(spec) or _check_cells(spec)
    if problems:
        raise SpecError(source, [(where(p), m) for p, m in _dedupe(problems)])
    return spec


# --- composition: `base:` includes and `--set` overrides ------------------------------------------


def _read_with_bases(text: str, source: str, chain: tuple[str, ...]) -> tuple[dict, dict]:
    """The file's mapping over its `base:` file(s) (paths relative to the file; later bases and
    then the file itself win; mappings merge key by key, lists and scalars are replaced), with
    the line of every key: an int in this file, (file, line) in a base."""
    raw, lines = _read_yaml(text, source)
    if not isinstance(raw, dict):
        raise SpecError(source, [("line 1", "the sweep file must be a mapping (name:, "
                                            "experiment:, fixed:, grid:, ...)")])
    bases = raw.pop("base", None)
    if bases is None:
        return raw, lines
    names = [bases] if isinstance(bases, str) else bases
    if not isinstance(names, list) or not all(isinstance(b, str) and b for b in names):
        raise SpecError(source, [(Locator(lines)(("base",)), "base: give a sweep file path, or a "
                                                           "list of them (relative to this file)")])
    merged: dict = {}
    merged_lines: dict[tuple, Any] = {}
    folder = Path(source).parent
    for i, name in enumerate(names):
        base = (folder / name).resolve()
        if str(base) in chain + (str(Path(source).resolve()),):
            raise SpecError(source, [(Locator(lines)(("base",)), f"base {name!r} includes "
                                                               f"itself (through {base})")])
        try:
            base_text = base.read_text()
        except OSError as e:
            raise SpecError(source, [(Locator(lines)(("base",)), f"cannot read base {name!r} "
                                                               f"({e.strerror or e})")]) from None
        b_raw, b_lines = _read_with_bases(base_text, str(base),
                                          chain + (str(Path(source).resolve()),))
        merged = _merge(merged, b_raw)
        merged_lines.update({k: v if isinstance(v, tuple) else (str(base), v)
                             for k, v in b_lines.items()})
    lines = {k: v for k, v in lines.items() if k[:1] != ("base",)}
    for path in _leaf_paths(raw):  # what this file sets replaces the bases' lines below it
        merged_lines = {k: v for k, v in merged_lines.items() if k[:len(path)] != path}
    merged_lines.update(lines)
    out = _merge(merged, raw)
    _unfix_grid_axes(out, raw)
    return out, merged_lines


def _unfix_grid_axes(merged: dict, layer: dict) -> None:
    """A field the upper layer (a file over its bases, or the `--set`s) varies in its grid, and
    does not fix itself, is no longer fixed by what lies under it (paper.yaml fixes K=4;
    ablation_steps varies it)."""
    grid, fixed = layer.get("grid"), layer.get("fixed")
    if not isinstance(grid, dict) or not isinstance(merged.get("fixed"), dict):
        return
    for name in grid:
        if not (isinstance(fixed, dict) and name in fixed):
            merged["fixed"].pop(name, None)


def _merge(under: dict, over: dict) -> dict:
    out = dict(under)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _leaf_paths(d: dict, prefix: tuple = ()) -> list[tuple]:
    out = []
    for k, v in d.items():
        out += _leaf_paths(v, prefix + (k,)) if isinstance(v, dict) and v else [prefix + (k,)]
    return out


def add_set_argument(ap: Any) -> None:
    """`--set KEY=VALUE` (repeatable) on a CLI that loads a sweep (run, status): one spelling."""
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a sweep key, validated like the file: fixed.lr=1e-3, "
                         "grid.seed=[1,2], resources.gpu=0.5 (repeatable; the resolved sweep is "
                         "the parent run's artifact sweep/resolved.yaml)")


def _apply_overrides(raw: dict, lines: dict, overrides: list[str], source: str) -> dict:
    """`key.path=value` (value in YAML: `1e-3`, `[1, 2]`, `{gpu: 0.5}`) set into the mapping; the
    result is validated like the file itself, and messages name `--set key.path`."""
    problems = []
    layer: dict = {}  # the overrides alone, as a mapping (for the grid-over-fixed rule)
    for item in overrides:
        key, sep, text = item.partition("=")
        path = tuple(key.strip().split("."))
        if not sep or not all(path):
            problems.append(("--set", f"{item!r} is not key=value (e.g. fixed.lr=1e-3, "
                                      f"grid.seed=[1,2], resources.gpu=0.5)"))
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            problems.append((f"--set {key}", f"the value {text!r} is not YAML ({e})"))
            continue
        holder = raw
        for i, part in enumerate(path[:-1]):
            nxt = holder.setdefault(part, {})
            if not isinstance(nxt, dict):
                problems.append((f"--set {key}", f"{'.'.join(path[:i + 1])} is not a mapping"))
                break
            holder = nxt
        else:
            holder[path[-1]] = value
            _merge_into(layer, path, value)
            for k in [k for k in lines if k[:len(path)] == path]:
                del lines[k]
            lines[path] = (f"--set {key}", "")
    if problems:
        raise SpecError(source, problems)
    _unfix_grid_axes(raw, layer)
    return raw


def _redacted(value: Any) -> Any:
    """Every URI-like part of every string through `layout.redact_uri` (user:password@ off)."""
    if isinstance(value, dict):
        return {k: _redacted(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    return redact_text(value) if isinstance(value, str) else value


def _merge_into(d: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        d = d.setdefault(part, {})
    d[path[-1]] = value


def _import_problems(names: list[str]) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    for i, name in enumerate(names):
        try:
            import_modules([name])
        except (Exception, SystemExit) as e:
            problems.append((("imports", i), (
                f"cannot import module {name!r} ({type(e).__name__}: {e}); it must be "
                f"importable by the driver and by every Ray worker: on PYTHONPATH (a local run "
                f"passes the driver's PYTHONPATH on to the trials) or in the job's working dir "
                f"(`ray job submit --working-dir .`)")))
    return problems


def _read_yaml(text: str, source: str) -> tuple[Any, dict[tuple, int]]:
    try:
        return read_yaml(text, source)
    except ConfigFileError as e:
        raise SpecError(e.source, e.problems) from None


def _substitute(raw: dict, env: dict[str, str], cwd: Path, problems: list) -> dict:
    """${VAR} substitution + absolute paths for ENV_KEYS at the places they may appear."""
    raw = dict(raw)

    def sub(value: Any, path: tuple, key: str) -> Any:
        if not isinstance(value, str):
            return value

        def repl(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in env and env[var] != "":
                return env[var]
            if default is not None:
                return default
            problems.append((path, f"environment variable {var} is not set (used in {key}; "
                                   f"export it, or write ${{{var}:-default}})"))
            return ""

        value = _ENV_RE.sub(repl, value)
        return _absolute(key, value, cwd)

    for key in ("storage", "tracking_uri"):
        if key in raw:
            raw[key] = sub(raw[key], (key,), key)
    if isinstance(raw.get("cache"), dict) and isinstance(raw["cache"].get("url"), str):
        raw["cache"] = {**raw["cache"], "url": sub(raw["cache"]["url"], ("cache", "url"),
                                                   "cache.url")}
    def sections(holder: dict, prefix: tuple) -> dict:
        holder = dict(holder)
        for section in ("fixed", "grid"):
            block = holder.get(section)
            if not isinstance(block, dict):
                continue
            block = dict(block)
            for key in ("data_root", "pretrained"):
                if key not in block:
                    continue
                path = prefix + (section, key)
                if section == "grid" and isinstance(block[key], list):
                    block[key] = [sub(v, path + (i,), key) for i, v in enumerate(block[key])]
                else:
                    block[key] = sub(block[key], path, key)
            holder[section] = block
        return holder

    raw = sections(raw, ())
    if isinstance(raw.get("arms"), list):  # each arm's fixed/grid like the sweep's own
        raw["arms"] = [sections(a, ("arms", i)) if isinstance(a, dict) else a
                       for i, a in enumerate(raw["arms"])]
    return raw


def _is_url(s: str) -> bool:
    return "://" in s


def _absolute(key: str, value: str, cwd: Path) -> str:
    """Relative local paths -> absolute (Ray changes a trial's cwd; the driver's cwd is meant)."""
    if not value:
        return value
    if key == "tracking_uri":
        if value.startswith("sqlite:///") and not value.startswith("sqlite:////"):
            rel = value[len("sqlite:///"):]
            if rel and rel != ":memory:":
                return f"sqlite:///{(cwd / rel).resolve()}"
        return value
    if _is_url(value):
        return value
    if key == "pretrained" and not (("/" in value or os.sep in value) or
                                    value.endswith(CHECKPOINT_SUFFIXES)):
        return value  # an open_clip tag ("openai"), "embedded", ...
    return str((cwd / Path(value).expanduser()).resolve())


def _unknown_key(key: str, where: str, allowed: Iterable[str] | None = None) -> str:
    msg = f"unknown key {key!r} in {where}"
    return msg + (f"; allowed: {', '.join(sorted(allowed))}" if allowed is not None else "")


def _pydantic_message(err: dict) -> str:
    kind, loc, value = err["type"], err["loc"], err.get("input")
    if kind == "extra_forbidden":
        model = {(): SweepSpec, ("search",): SearchSpec, ("resources",): Resources,
                 ("cache",): CacheSpec}
        parent = tuple(loc[:-1])
        allowed = None
        if parent in model:
            allowed = list(model[parent].model_fields)
        elif len(parent) == 2 and parent[0] == "arms":
            allowed = list(Arm.model_fields)
        elif len(parent) == 3 and parent[:2] == ("search", "space"):
            allowed = list(SearchParam.model_fields)
        return _unknown_key(str(loc[-1]), format_path(parent) or "the sweep file", allowed)
    if kind == "missing":
        return f"required key {loc[-1]!r} is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if kind not in ("value_error", "assertion_error") and value is not None:
        msg += f" (got {value!r})"
    return msg


# --- TrainConfig-level checks ---------------------------------------------------------------------


def _check_fields(spec: SweepSpec) -> list[tuple[tuple, str]]:
    """Keys are TrainConfig fields and values have the field's type; grid/search are sane."""
    problems: list[tuple[tuple, str]] = []
    _check_block((), spec.fixed, spec.grid or {}, problems)
    if spec.grid is not None and not spec.grid:
        problems.append((("grid",), "the grid is empty: give at least one field with values, or "
                                    "remove 'grid' to run the fixed settings once"))
    if spec.arms is not None and not spec.arms:
        problems.append((("arms",), "arms is empty: give at least one arm ({name: default} runs "
                                    "the sweep's own fixed/grid), or remove 'arms'"))
    first: dict[str, int] = {}
    for i, arm in enumerate(spec.arms or ()):
        if arm.name in first:
            problems.append((("arms", i, "name"), f"duplicate arm name {arm.name!r} (also "
                                                  f"arms[{first[arm.name]}]); arm names label "
                                                  f"the cells and the table rows"))
        first.setdefault(arm.name, i)
        _check_block(("arms", i), arm.fixed, arm.grid, problems)
    if spec.search is not None:
        _check_search_space(spec, problems)
    return problems


def _check_value(path: tuple, name: str, value: Any, problems: list) -> Any:
    """The field's value of `value`, or None with the problem added at `path`."""
    listed = file_value_problem(name, value)
    if listed:
        problems.append((path, listed))
        return None
    try:
        return validate_field(name, value)
    except ConfigError as e:
        msg = e.problems[0][1]  # range messages already read "name=value must be ..."
        problems.append((path, msg if msg.startswith(f"{name}") else f"{name}: {msg}"))
        return None


def _check_block(prefix: tuple, fixed: dict, grid: dict, problems: list) -> None:
    """The same rules for the sweep's fixed/grid and for each arm's (prefix ("arms", i))."""
    for name, value in fixed.items():
        if name not in FIELD_NAMES:
            problems.append((prefix + ("fixed", name), unknown_field(name)))
            continue
        _check_value(prefix + ("fixed", name), name, value, problems)
    for name, values in grid.items():
        path = prefix + ("grid", name)
        dotted = format_path(path)
        if name not in FIELD_NAMES:
            problems.append((path, unknown_field(name)))
            continue
        if name in fixed:
            problems.append((path, f"{name} is set in both 'fixed' and 'grid'"
                                   f"{' of this arm' if prefix else ''}; keep one"))
        if not values:
            problems.append((path, f"{dotted} has no values (an empty list makes an empty "
                                   f"sweep)"))
        seen: dict[str, int] = {}
        for i, v in enumerate(values):
            c = _check_value(path + (i,), name, v, problems)
            if c is None:
                continue
            if repr(c) in seen:
                problems.append((path + (i,), f"duplicate value {v!r} in {dotted} (also at "
                                              f"index {seen[repr(c)]})"))
            seen.setdefault(repr(c), i)


def _check_search_space(spec: SweepSpec, problems: list) -> None:
    for name, param in spec.search.space.items():
        path = ("search", "space", name)
        if name not in FIELD_NAMES:
            problems.append((path, unknown_field(name)))
            continue
        if name in EXECUTION_FIELDS:
            problems.append((path, f"{name} does not change the result; it cannot be searched"))
        if name in (spec.grid or {}):
            problems.append((path, f"{name} is both in 'grid' and in 'search.space'"))
        hint = _HINTS[name]
        if param.type in ("loguniform", "uniform") and hint is not float:
            kind = getattr(hint, "__name__", hint)
            problems.append((path, f"type {param.type!r} needs a float field; {name} is "
                                   f"{kind} (use 'int' or 'choice')"))
        elif param.type == "int" and hint is not int:
            problems.append((path, f"type 'int' needs an integer field; {name} is "
                                   f"{getattr(hint, '__name__', hint)}"))
        # every choice, and both ends of a range, must be a valid value of the field
        where = ([("values", i) for i in range(len(param.values or ()))]
                 if param.type == "choice" else [("low",), ("high",)])
        for key, v in zip(where, param.bounds()):
            _check_value(path + key, name, v, problems)


# --- cell-level checks ----------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _tower_layers(arch: str) -> tuple[int, int] | None:
    """(vision layers, text layers) of an open_clip arch (perl-tiny registered first)."""
    import open_clip

    from perl_core.factory import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(arch)
    if cfg is None:
        return None
    return int(cfg["vision_cfg"]["layers"]), int(cfg["text_cfg"]["layers"])


def _dataset_problem(name: str, *, training: bool) -> str | None:
    from perl_core.data.registry import get_spec

    try:
        ds = get_spec(name)
    except KeyError as e:
        return str(e.args[0]) if e.args else f"unknown dataset {name!r}"
    if training and ds.test_only:
        return (f"{ds.name} has only a test split (an OOD variant of {ds.source}); train on "
                f"{ds.source} and list {ds.name} in eval_datasets")
    return None


def check_config(cfg: TrainConfig, gpu: float | None = None) -> list[tuple[str, str]]:
    """Semantic problems of one cell as (field, message); [] when the config can run.

    gpu: the sweep's resources.gpu per trial, where known: `device: cuda` needs one (a trial with
    none is given no GPU by Ray, and `perl_core.factory.resolve_device` refuses cuda there)."""
    out: list[tuple[str, str]] = []
    if gpu is not None and gpu <= 0 and cfg.device.startswith("cuda"):
        out.append(("device", f"device {cfg.device!r} with resources.gpu {gpu:g}: Ray gives such "
                              f"trials no GPU (and counts none), so they would share the node's "
                              f"GPUs unscheduled; set resources.gpu > 0 (0.25 packs four trials on "
                              f"one GPU), or device 'auto' (the CPU at gpu 0) or 'cpu'"))
    if not cfg.dataset:
        out.append(("dataset", "dataset is required (a registered dataset name)"))
    else:
        p = _dataset_problem(cfg.dataset, training=True)
        if p:
            out.append(("dataset", p))
    for d in cfg.eval_datasets:
        p = _dataset_problem(d, training=False)
        if p:
            out.append(("eval_datasets", p))
    p = eval_datasets_problem(cfg)
    if p:
        out.append(("eval_datasets", p))
    if cfg.pretrained == "embedded" and cfg.arch != "perl-tiny":
        out.append(("pretrained", f"pretrained 'embedded' is the perl-tiny checkpoint; set arch "
                                  f"'perl-tiny' (got {cfg.arch!r})"))
    layers = _tower_layers(cfg.arch)
    if layers is None:
        out.append(("arch", f"arch {cfg.arch!r} is not an open_clip model config (see "
                            f"open_clip.list_models(); 'perl-tiny' for the embedded default)"))
        return out
    vision, text = layers
    multi = cfg.variant in ("deep", "layer", "layerstep")
    # early injects at 0 and multi-depth variants take inject_layers: inject_layer is unused there
    single = not multi and cfg.variant != "early"
    if single and not 0 <= cfg.inject_layer < vision:
        out.append(("inject_layer", f"inject_layer={cfg.inject_layer} is outside the vision "
                                    f"tower of {cfg.arch} (layers 0..{vision - 1})"))
    elif single and not 0 <= cfg.effective_text_inject_layer < text:
        field = "text_inject_layer" if cfg.text_inject_layer >= 0 else "inject_layer"
        out.append((field, f"{field}={cfg.effective_text_inject_layer} is outside the text tower "
                           f"of {cfg.arch} (layers 0..{text - 1})"))
    if cfg.inject_layers:
        if not multi:
            out.append(("inject_layers", f"inject_layers only applies to the multi-depth variants "
                                         f"deep/layer/layerstep (variant is {cfg.variant!r})"))
        depth = min(vision, text)
        bad = [d for d in cfg.inject_layers if not 0 <= d < depth]
        if bad:
            out.append(("inject_layers", f"inject_layers {bad} outside layers 0..{depth - 1} "
                                         f"of {cfg.arch}"))
        if list(cfg.inject_layers) != sorted(set(cfg.inject_layers)):
            out.append(("inject_layers", f"inject_layers {list(cfg.inject_layers)} must be "
                                         f"strictly increasing"))
    return out


def _field_origin(spec: SweepSpec, name: str, value: Any, block: Block | None = None) -> tuple:
    """Where a cell's field value came from, as a key path (for error messages): in `block`, or
    in the first arm that sets the field to `value`."""
    candidates = [block] if block is not None else blocks(spec)
    for b in candidates:
        where = b.origin.get(name)
        if where is None:
            continue
        if name in b.grid:
            for i, v in enumerate(b.grid[name]):
                try:
                    if validate_field(name, v) == value:
                        return where + (name, i)
                except ValueError:
                    pass
            if block is not None:
                return where + (name,)
        else:
            try:
                if block is not None or validate_field(name, b.fixed[name]) == value:
                    return where + (name,)
            except ValueError:
                pass
    return ("fixed", name)


def _check_cells(spec: SweepSpec) -> list[tuple[tuple, str]]:
    problems: list[tuple[tuple, str]] = []
    varied = spec.varied_fields
    for i, block in enumerate(blocks(spec)):
        try:
            configs = expand_block(block)
        except ValueError as e:  # only from fields that _check_fields already accepted
            return [((), str(e))]
        for cfg in configs:
            for name, msg in check_config(cfg, spec.resources.gpu):
                origin = _field_origin(spec, name, getattr(cfg, name), block)
                suffix = "" if name in block.origin else " (not set: TrainConfig default)"
                problems.append((origin, msg + suffix))
        # within one arm (or a plain grid) two points of one run are a mistake; across arms the
        # same run is shared (expand deduplicates it)
        seen: dict[str, str] = {}
        for cfg in configs:
            h = cfg.config_hash()
            if h in seen:
                where = ("arms", i) if spec.arms else ("grid",)
                problems.append((where, f"two grid points are the same run (config hash {h}): "
                                        f"{seen[h]}; vary a field that changes the result "
                                        f"(execution fields {list(EXECUTION_FIELDS)} do not)"))
                break
            seen[h] = cell_name(cfg, varied)
    if spec.search is not None:
        base = spec.base_config()
        for name, param in spec.search.space.items():
            for i, v in enumerate(param.bounds()):
                try:
                    cfg = base.replace(**{name: validate_field(name, v)})
                except ValueError:
                    continue
                for field, msg in check_config(cfg, spec.resources.gpu):
                    path = ("search", "space", name) + (("values", i) if param.type == "choice"
                                                        else ())
                    if field == name:
                        problems.append((path, msg))
                    elif field in (spec.grid or {}):
                        problems.append((("search",), f"the search phase starts from 'fixed' "
                                                      f"only, where {field} is missing or invalid "
                                                      f"({msg}); set {field} in 'fixed'"))
                    else:
                        problems.append((("fixed", field), msg))
    return problems


def _dedupe(problems: list) -> list:
    seen, out = set(), []
    for p in problems:
        key = (tuple(p[0]), p[1])
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


# --- expansion ------------------------------------------------------------------------------------


def expand_block(block: Block) -> list[TrainConfig]:
    """One block's cartesian product over its fixed settings, in YAML order (last key fastest)."""
    base = {k: validate_field(k, v) for k, v in block.fixed.items()}
    keys = list(block.grid)
    values = [[validate_field(k, v) for v in block.grid[k]] for k in keys]
    return [TrainConfig(**{**base, **dict(zip(keys, combo))})
            for combo in itertools.product(*values)]


def arm_signature(spec: SweepSpec) -> dict[str, dict[str, Any]]:
    """Per arm, {"fixed": its value of every field some arm pins, "grid": its own grid axes}:
    what the aggregate needs to place a run that has no `arm` tag (one that finished before the
    sweep had arms and whose config hash did not change, so it was not run again). JSON values."""
    if not spec.arms:
        return {}
    pinned = sorted({k for a in spec.arms for k in a.fixed} - set(EXECUTION_FIELDS))

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v
    out = {}
    for arm, block in zip(spec.arms, blocks(spec)):
        first = expand_block(block)[0]
        out[arm.name] = {
            "fixed": {f: plain(getattr(first, f)) for f in pinned if f not in block.grid},
            "grid": {f: [plain(validate_field(f, v)) for v in vs] for f, vs in arm.grid.items()
                     if f not in EXECUTION_FIELDS}}
    return out


def _expand_arms(spec: SweepSpec) -> list[tuple[TrainConfig, tuple[str, ...]]]:
    """(config, the arms it belongs to) over the union of the blocks, one per config hash, in
    order of first appearance (arm by arm)."""
    out: dict[str, tuple[TrainConfig, list[str]]] = {}
    for block in blocks(spec):
        for cfg in expand_block(block):
            entry = out.setdefault(cfg.config_hash(), (cfg, []))
            if block.arm and block.arm not in entry[1]:
                entry[1].append(block.arm)
    return [(cfg, tuple(arms)) for cfg, arms in out.values()]


def expand(spec: SweepSpec) -> list[TrainConfig]:
    """The grid's cartesian product over the fixed settings, in YAML order (last key fastest);
    with arms, the union of every arm's product (a run shared by arms appears once)."""
    return [cfg for cfg, _ in _expand_arms(spec)]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple):
        return "-".join(_fmt(x) for x in v) or "none"
    return str(v)


def cell_name(cfg: TrainConfig, varied: Iterable[str] = (), arms: Iterable[str] = ()) -> str:
    """Readable, unique within a sweep: `b2n/ToyShapes/16shot/seed1/J7/K4[/field=value...]`,
    then `/arm=<name>[+<name>...]` in a sweep with arms."""
    parts = [PROTOCOL_ABBREV.get(cfg.protocol, cfg.protocol), cfg.dataset, f"{cfg.shots}shot",
             f"seed{cfg.seed}", f"J{cfg.inject_layer}", f"K{cfg.num_steps}"]
    parts += [f"{f}={_fmt(getattr(cfg, f))}" for f in varied
              if f not in _NAME_FIELDS and f not in EXECUTION_FIELDS]
    arms = list(arms)
    if arms:
        parts.append("arm=" + "+".join(arms))
    return "/".join(parts)


def cells(spec: SweepSpec) -> list[GridCell]:
    """Every grid cell with name and hash (the grid phase's work list, before skipping)."""
    varied = spec.varied_fields
    return [GridCell(cell_name(c, varied, arms), c, c.config_hash(), ",".join(arms))
            for c, arms in _expand_arms(spec)]


def group_order(cells_: list[GridCell]) -> list[GridCell]:
    """The grid in the order that lets workers reuse what they hold, stable (YAML order) otherwise:

    1. cells with the same backbone (arch, pretrained) run back to back (the worker's `_BACKBONE`);
    2. within it, cells sharing the frozen evaluation features (`cache_group`: precision,
       injection depths, dataset, protocol, targets) run back to back (the FeatureCache's test-set
       prefixes and zero-shot states);
    3. within that, cells sharing the training views (`train_view_key`: data seed, shots,
       augmentation, batch size, epochs) run back to back (the cached training batches).
    Tune creates the trials in the order of the `grid_search` list (tests/test_spec.py)."""
    first: dict[tuple, int] = {}

    def rank(key: tuple, i: int) -> int:
        return first.setdefault(key, i)

    keys = []
    for i, c in enumerate(cells_):
        b = backbone_key(c.config)
        g = b + cache_group(c.config)
        keys.append((rank(("b",) + b, i), rank(("g",) + g, i),
                     rank(("v",) + g + train_view_key(c.config), i), i))
    return [c for _, c in sorted(zip(keys, cells_), key=lambda kc: kc[0])]


def backbone_key(cfg: TrainConfig) -> tuple:
    """What the worker's backbone LRU is keyed by."""
    return (cfg.arch, cfg.pretrained)


def cache_group(cfg: TrainConfig) -> tuple:
    """What the cached evaluation features of a cell depend on besides the backbone (see the
    keys in `perl_core.cache`: compute precision, injection depth, dataset, split, items)."""
    if cfg.variant in ("deep", "layer", "layerstep"):
        depths: tuple = (cfg.variant, cfg.inject_layers)
    elif cfg.variant == "early":
        depths = (0, 0)
    else:
        depths = (cfg.inject_layer, cfg.effective_text_inject_layer)
    return (cfg.precision, depths, cfg.dataset, cfg.protocol, cfg.eval_datasets, cfg.template)


def train_view_key(cfg: TrainConfig) -> tuple:
    """What a cell's training views depend on within its cache group (the few-shot sample and
    the per-image augmentation seeds)."""
    return (cfg.seed, cfg.shots, cfg.fewshot_source, cfg.aug_scale_min, cfg.batch_size,
            cfg.epochs)


def preflight(spec: SweepSpec, configs: Iterable[TrainConfig]) -> None:
    """Checks of the machine, not the file (so `load_spec` stays usable anywhere), run by the
    driver before any trial starts. Raises SpecError naming the key:

    - a local `pretrained` checkpoint file must exist (every cell using it would fail);
    - `storage` must be writable (a probe file is written and removed; folders it had to create
      are removed again): every trial writes its record and Tune state there;
    - `shots` must not exceed the training images of any training class, for datasets with a
      CoOp split file that can be read here (only that JSON is read; Dassl would silently take
      the smaller class);
    - with `fewshot_source: coop_pickle`, CoOp's `split_fewshot/shot_K-seed_S.pkl` of each cell
      must be in its dataset folder, where that folder is here.

    Data roots are not required here: a missing or broken dataset fails its own cells (FAILED
    with the reason) while the rest of the sweep goes on."""
    configs = list(configs)
    problems: list[tuple[str, str]] = []
    seen: set[str] = set()
    for cfg in configs:
        p = cfg.pretrained
        if p and not _is_url(p) and os.path.isabs(p) and p not in seen:
            seen.add(p)
            if not os.path.isfile(p):
                problems.append((format_path(_field_origin(spec, "pretrained", p)),
                                 f"checkpoint file {p} does not exist"))
    problem = _storage_problem(spec.storage)
    if problem:
        problems.append(("storage", problem))
    checked: set[tuple] = set()
    for cfg in configs:
        key = (cfg.dataset, cfg.data_root, cfg.shots, cfg.protocol)
        if key in checked:
            continue
        checked.add(key)
        msg = _shots_problem(cfg)
        if msg:
            problems.append((format_path(_field_origin(spec, "shots", cfg.shots)), msg))
    for msg in dict.fromkeys(_fewshot_file_problem(c) for c in configs):
        if msg:
            problems.append((format_path(_field_origin(spec, "fewshot_source", "coop_pickle")),
                             msg))
    if problems:
        raise SpecError(spec.source or "<sweep>", problems)


def _storage_problem(storage: str) -> str | None:
    """Why `storage` cannot take files, or None (write and remove a probe file)."""
    import uuid

    probe = f".perl-write-probe-{uuid.uuid4().hex[:8]}"
    if not _is_url(storage):
        created: list[str] = []
        try:
            path = os.path.abspath(storage)
            missing, head = [], path
            while not os.path.exists(head):
                missing.append(head)
                head = os.path.dirname(head)
            for d in reversed(missing):
                os.mkdir(d)
                created.append(d)
            with open(os.path.join(path, probe), "wb") as f:
                f.write(b"ok")
            os.remove(os.path.join(path, probe))
        except OSError as e:
            return (f"storage {storage} is not writable ({e.strerror or e}); every trial writes "
                    f"its record and Tune state there: choose a writable folder or s3:// URL")
        finally:
            for d in reversed(created):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
        return None
    try:
        from perl_core.data.storage import open_fs

        fs, root = open_fs(storage)
        fs.pipe_file(f"{root.rstrip('/')}/{probe}", b"ok")
        fs.rm_file(f"{root.rstrip('/')}/{probe}")
    except Exception as e:
        return (f"storage {redact_uri(storage)} is not writable ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:300] if str(e) else ''}); every trial writes its "
                f"record and Tune state there")
    return None


def _fewshot_file_problem(cfg: TrainConfig) -> str | None:
    """fewshot_source coop_pickle: CoOp's few-shot file of the cell is missing from a dataset
    folder that is here (every such cell would fail); no data here: the cell says so itself."""
    if cfg.fewshot_source != "coop_pickle" or not cfg.data_root or cfg.shots < 1:
        return None
    try:
        from perl_core.data import storage
        from perl_core.data.coop_pickle import find_coop_fewshot
        from perl_core.data.registry import get_spec

        if not storage.isdir(storage.join(cfg.data_root, get_spec(cfg.dataset).dataset_dir)):
            return None
        find_coop_fewshot(cfg.data_root, cfg.dataset, cfg.shots, cfg.seed)
    except FileNotFoundError as e:
        return str(e)
    except Exception:  # unknown dataset, unreachable store: the cell fails with its own reason
        return None
    return None


def _shots_problem(cfg: TrainConfig) -> str | None:
    """shots > the training images of a training class (split-file datasets only)."""
    from perl_core.data.registry import get_spec

    try:
        ds = get_spec(cfg.dataset)
        if not ds.split_file or not cfg.data_root or cfg.shots < 1:
            return None
        from perl_core.data.coop import load_splits
        from perl_core.data.fewshot import check_shots, subsample_classes

        splits = load_splits(ds, cfg.data_root)  # the split JSON only, no image is opened
        if cfg.protocol == "base2novel":
            splits = subsample_classes(splits, "base")
    except Exception:  # missing or broken data: that cell fails with its own reason
        return None
    try:
        check_shots(splits, cfg.shots)
    except ValueError as e:
        return (f"{e} (under {cfg.data_root}); lower shots or use a dataset with enough "
                f"images")
    return None


def resolve_tracking_uri(spec: SweepSpec, override: str | None = None,
                         env: dict[str, str] | None = None, cwd: str | None = None) -> str:
    """--tracking-uri, else the YAML's, else $MLFLOW_TRACKING_URI, else ./runs/mlflow.db (abs)."""
    env = dict(os.environ) if env is None else env
    base = Path(cwd or os.getcwd()).resolve()
    uri = override or spec.tracking_uri or default_tracking_uri(env, str(base))
    uri = _absolute("tracking_uri", uri, base)
    try:
        return check_tracking_uri(uri)
    except ValueError as e:
        raise SpecError(spec.source or "<cli>", [("tracking_uri", str(e))]) from None


def check_tracking_uri(uri: str) -> str:
    if uri.startswith("file:") or not (_is_url(uri) or uri.startswith(("sqlite:", "databricks"))):
        raise ValueError(f"{uri!r}: MLflow's file store is gone in MLflow 3; use "
                         f"sqlite:///ABS/PATH/mlflow.db or an http(s):// tracking server")
    return uri


__all__ = ["SweepSpec", "SearchSpec", "SearchParam", "Resources", "CacheSpec", "SpecError",
           "GridCell", "Arm", "Block", "blocks", "expand_block",
           "backbone_key", "cache_group", "train_view_key",
           "load_spec", "parse_spec", "expand", "cells", "cell_name", "group_order",
           "check_config", "add_set_argument", "resolve_tracking_uri",
           "check_tracking_uri", "format_path", "preflight"]
