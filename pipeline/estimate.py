"""The GPU time of a sweep, from its workload and the figures of `python -m perl_core.bench --json`.

    python -m pipeline.run SWEEP.yaml --dry-run [--bench BENCH.json] [--trial-overhead-s S]
    python -m pipeline.status SWEEP.yaml --bench BENCH.json

Per cell (`cell_workload`): training steps = `fit`'s count (train images = shots x training
classes, the base half for base2novel; `train images // batch_size` per epoch, 1 when fewer
images than a batch; x epochs) and the images evaluated (every test image of the source, the
few-shot validation split of the training classes except for ImageNet, and the full test set of
every `eval_datasets` target). The sizes come from the data (the split file under `data_root`,
sampled exactly as `fit` samples it) when it is there, else from `COOP_SIZES` (the CoOp
benchmarks' class counts and test-set sizes).

Per cell, with a bench file (`estimate`):

    seconds = steps x step_s(training classes) + eval images / eval rate + overhead

- step_s: the bench's `train_step_s_by_classes` (s per batch-4 step at 10/100/1000 classes),
  interpolated linearly in log(class count), clamped at the measured ends; scaled by
  batch_size / 4 (the image side is linear in the batch; an approximation);
  the bench's uncached step recomputes the frozen text prefix every step, which `fit` does once
  per trial, so uncached training is an upper bound;
- eval rate: `perl_eval_img_per_s_uncached` (steps 0..K in one forward);
- cached figures (`..._cached`) are used where the sweep's feature cache (`cache:`, on by
  default) would hit: every cell after the first of its cache group (same backbone and frozen
  features, `pipeline.spec.cache_group`) evaluates from the cache, and every cell after the first
  of its training-view group (`train_view_key`) trains from cached views. This assumes one node
  shares one cache; on several nodes each node pays its own first miss;
- FLOPs scaling: the bench measures its arch at J=7, K=4 (`perl_core.bench.run`). A cell with
  another arch, J or K is scaled by the analytic vision FLOPs (`perl_core.bench.vision_flops`)
  of the full PERL forward (uncached) or of the K thought passes only (cached); a different arch
  is warned about (memory-bound small models do not scale with FLOPs);
- precision: each cell uses the figures measured in its own `precision` (a CUDA bench has fp32
  and bf16: `by_precision`); when the bench lacks it the bench's own are used and a warning
  says so (the paper sweeps run fp32, an older CUDA bench measured bf16 only);
- overhead: per trial, from `--trial-overhead-s`, else the bench file's `trial_overhead_s`,
  else the mean `timing/overhead_s` of this sweep's finished runs in MLflow, else 0 (said so).

Not in the bench figures (so not in the estimate): image decoding and data loading, which can
dominate on a fast GPU with slow storage; the text side of evaluation (once per trial). The
estimate is GPU-seconds of one trial running alone; trials that share a GPU (`gpu: 0.25`) split
its throughput, so the GPU-hours stay about the same and the wall-clock is GPU-hours / GPUs.
No number here is invented: without a bench file only the workload is printed.

Memory (`trial_memory`, `memory_by_dataset`, `memory_report`; `--dry-run [--gpu-memory 40GB]`):
the expected peak memory of a trial per dataset, from its class count, prompt length, K, J,
`text_chunk`, batch and arch, with constants fit to the CPU measurement of
`perl_core.bench --step-memory` (see the section's comment below); with `--gpu-memory` a warning
names `resources.gpu` when that many trials per GPU would not fit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

from perl_core.config import TrainConfig
from perl_core.protocol import canonical_dataset, target_datasets

# Classes and test images of the CoOp benchmarks, from the team's data-protocol notes (§1.2,
# "Class counts and split sizes", in the shared folder beside the repo): counted from the real
# split_zhou_*.json files for Caltech101, OxfordPets, StanfordCars, Flowers102, DTD, EuroSAT and
# UCF101 (tests/test_dry_run_estimate.py re-counts them from shared/data/coop_real/splits when
# present); the CoOp paper's sizes for ImageNet (val = test, 50,000), Food101, FGVCAircraft and
# SUN397; the dataset authors' published sizes for ImageNetV2 (10,000), ImageNetSketch (50,889),
# ImageNetA (7,500) and ImageNetR (30,000). Class counts match `perl_core.data.benchmarks`.
COOP_SIZES: dict[str, tuple[int, int]] = {  # canonical name -> (classes, test images)
    "ImageNet": (1000, 50_000),
    "Caltech101": (100, 2_465),
    "OxfordPets": (37, 3_669),
    "StanfordCars": (196, 8_041),
    "Flowers102": (102, 2_463),
    "Food101": (101, 30_300),
    "FGVCAircraft": (100, 3_333),
    "SUN397": (397, 19_850),
    "DTD": (47, 1_692),
    "EuroSAT": (10, 8_100),
    "UCF101": (101, 3_783),
    "ImageNetV2": (1000, 10_000),
    "ImageNetSketch": (1000, 50_889),
    "ImageNetA": (200, 7_500),
    "ImageNetR": (200, 30_000),
}
VAL_IS_TEST = ("ImageNet",)  # CoOp's ImageNet val split is its test set: `fit` evaluates no val
BENCH_BATCH = 4  # perl_core.bench.run times training steps at batch 4
BENCH_J, BENCH_K = 7, 4  # perl_core.bench.run: PerlModel(inject_layer=7 (2 if <= 7 blocks), K=4)
REQUIRED_KEYS = ("device", "arch", "perl_eval_img_per_s_uncached", "perl_eval_img_per_s_cached",
                 "train_step_s_by_classes")


class EstimateError(ValueError):
    """A bench file or dataset size problem; the message names the file, key and value."""


# --- the bench file ------------------------------------------------------------------------------


@dataclass
class Bench:
    path: str
    device: str
    arch: str
    eval_uncached: float  # images/s
    eval_cached: float
    steps: dict[int, tuple[float, float]]  # classes -> (cached s, uncached s) per batch-4 step
    inject_layer: int
    num_steps: int
    precision: str = ""
    trial_overhead_s: float | None = None
    # precision -> the same figures measured in it (a CUDA bench measures fp32 and bf16:
    # `by_precision`); the top-level ones are `precision`'s
    by_precision: dict[str, "Bench"] = field(default_factory=dict)

    def step_s(self, classes: int, cached: bool) -> float:
        """Seconds per batch-4 step at `classes` classes: linear in log(classes) between the
        measured counts, clamped at the ends."""
        pts = sorted(self.steps)
        i = 0 if cached else 1
        c = max(1, classes)
        if c <= pts[0]:
            return self.steps[pts[0]][i]
        if c >= pts[-1]:
            return self.steps[pts[-1]][i]
        for lo, hi in pairwise(pts):
            if lo <= c <= hi:
                t = (math.log(c) - math.log(lo)) / (math.log(hi) - math.log(lo))
                return self.steps[lo][i] + t * (self.steps[hi][i] - self.steps[lo][i])
        raise AssertionError("unreachable")

    def for_precision(self, precision: str) -> "Bench | None":
        """The figures measured in `precision`; None when the bench did not measure it."""
        if precision in self.by_precision:
            return self.by_precision[precision]
        return self if self.precision in (precision, "") else None


def _positive(path: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or value <= 0:
        raise EstimateError(f"{path}: key {key!r} must be a positive number of seconds or "
                            f"images/s, got {value!r}")
    return float(value)


def load_bench(path: str) -> Bench:
    """Read and check a `python -m perl_core.bench --json` file; EstimateError names the file and
    the key (and value) at fault."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise EstimateError(f"{path}: cannot read the bench file ({e.strerror or e}); make it on "
                            f"the target GPU with `python -m perl_core.bench --arch ARCH --json "
                            f"> {os.path.basename(path)}`") from None
    try:
        res = json.loads(text)
    except json.JSONDecodeError as e:
        raise EstimateError(f"{path}: not JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                            f"expected the output of `python -m perl_core.bench --json`") from None
    if not isinstance(res, dict):
        raise EstimateError(f"{path}: expected a JSON object (perl_core.bench --json), got "
                            f"{type(res).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in res]
    if missing:
        raise EstimateError(f"{path}: missing key(s) {missing}; a `python -m perl_core.bench "
                            f"--json` file has {list(REQUIRED_KEYS)}")
    for k in ("device", "arch"):
        if not isinstance(res[k], str) or not res[k]:
            raise EstimateError(f"{path}: key {k!r} must be a non-empty string, got {res[k]!r}")
    by: dict[str, Bench] = {}
    for prec, sub in (res.get("by_precision") or {}).items():
        if not isinstance(sub, dict):
            raise EstimateError(f"{path}: key 'by_precision.{prec}' must be an object of bench "
                                f"figures, got {sub!r}")
        by[str(prec)] = _figures(path, {**res, **sub, "precision": prec, "by_precision": {}},
                                 f"by_precision.{prec}.")
    return dataclasses.replace(_figures(path, res, ""), by_precision=by)


def _figures(path: str, res: dict[str, Any], where_prefix: str) -> Bench:
    by_classes = res["train_step_s_by_classes"]
    if not isinstance(by_classes, dict) or not by_classes:
        raise EstimateError(f"{path}: key 'train_step_s_by_classes' must map class counts to "
                            f"{{'cached': s, 'uncached': s}}, got {by_classes!r}")
    steps: dict[int, tuple[float, float]] = {}
    for c, d in by_classes.items():
        where = f"{where_prefix}train_step_s_by_classes.{c}"
        try:
            n = int(c)
        except (TypeError, ValueError):
            raise EstimateError(f"{path}: key {where!r}: {c!r} is not a class count") from None
        if n < 1:
            raise EstimateError(f"{path}: key {where!r}: the class count must be >= 1")
        if not isinstance(d, dict):
            raise EstimateError(f"{path}: key {where!r} must be {{'cached': s, 'uncached': s}}, "
                                f"got {d!r}")
        for kind in ("cached", "uncached"):
            if kind not in d:
                raise EstimateError(f"{path}: key '{where}.{kind}' is missing")
        steps[n] = (_positive(path, f"{where}.cached", d["cached"]),
                    _positive(path, f"{where}.uncached", d["uncached"]))
    layers = _vision_cfg(res["arch"], path, "arch").get("layers", 12)
    overhead = res.get("trial_overhead_s")
    return Bench(
        path=path, device=res["device"], arch=res["arch"],
        eval_uncached=_positive(path, "perl_eval_img_per_s_uncached",
                                res["perl_eval_img_per_s_uncached"]),
        eval_cached=_positive(path, "perl_eval_img_per_s_cached",
                              res["perl_eval_img_per_s_cached"]),
        steps=steps,
        inject_layer=int(res.get("inject_layer", BENCH_J if layers > BENCH_J else 2)),
        num_steps=int(res.get("num_steps", BENCH_K)),
        precision=str(res.get("precision", "")),
        trial_overhead_s=None if overhead is None else
        (0.0 if overhead == 0 else _positive(path, "trial_overhead_s", overhead)))


# --- analytic FLOPs -------------------------------------------------------------------------------


def _vision_cfg(arch: str, path: str = "", key: str = "arch") -> dict[str, Any]:
    import open_clip

    from perl_core.factory import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(arch)
    if not cfg or "vision_cfg" not in cfg:
        where = f"{path}: key {key!r}: " if path else ""
        raise EstimateError(f"{where}unknown open_clip arch {arch!r} (no model config)")
    return cfg["vision_cfg"]


def flops(arch: str, inject_layer: int, num_steps: int) -> tuple[float, float]:
    """(full PERL eval forward, the K thought passes only) vision FLOPs per image, from
    `perl_core.bench.vision_flops` on the arch's open_clip config (no model is built)."""
    from perl_core.bench import vision_flops

    v = _vision_cfg(arch)
    width, layers, patch = int(v["width"]), int(v["layers"]), int(v["patch_size"])
    mlp = int(width * float(v.get("mlp_ratio", 4.0)))
    size = v["image_size"]
    block = SimpleNamespace(mlp=SimpleNamespace(c_fc=SimpleNamespace(in_features=width,
                                                                     out_features=mlp)))
    visual = SimpleNamespace(transformer=SimpleNamespace(resblocks=[block] * layers),
                             conv1=SimpleNamespace(kernel_size=(patch, patch)))
    stub = SimpleNamespace(clip=SimpleNamespace(visual=visual), image_size=size,
                           vision_depths=(inject_layer,), num_steps=num_steps)
    _, full = vision_flops(stub, steps=num_steps)
    _, zero = vision_flops(stub, steps=0)
    return full, full - zero


# --- workload -------------------------------------------------------------------------------------


@dataclass
class Workload:
    train_images: int
    train_classes: int
    steps: int
    eval_images: int
    source: str  # "data" or "table" (where the sizes came from)


class _Sizes:
    """Split sizes per (dataset, data_root, shots, seed, protocol), memoised."""

    def __init__(self) -> None:
        self._splits: dict[tuple[str, str], Any] = {}

    def splits(self, name: str, root: str) -> Any | None:
        """The dataset's Splits from `root` when its split file is there (split_json loaders:
        one small JSON; folder-scanning loaders such as ImageNet's are left to the table: listing
        a million images is not worth an estimate)."""
        from perl_core.data import storage
        from perl_core.data.registry import get_spec

        if not root:
            return None
        key = (name, root)
        if key not in self._splits:
            spec = get_spec(name)
            found = None
            if spec.loader == "split_json" and spec.split_file:
                url = storage.join(root, spec.dataset_dir, spec.split_file)
                try:
                    present = storage.exists(url)
                except Exception:  # unreachable storage: fall back to the table
                    present = False
                if present:
                    from perl_core.data.coop import load_splits

                    found = load_splits(spec, root)
            self._splits[key] = found
        return self._splits[key]


def _table(name: str) -> tuple[int, int]:
    if name not in COOP_SIZES:
        raise EstimateError(f"dataset {name!r} has no split file under data_root and is not a "
                            f"CoOp benchmark of known size")
    return COOP_SIZES[name]


def cell_workload(cfg: TrainConfig, sizes: _Sizes | None = None) -> Workload:
    """Training steps and evaluated images of one cell, as `fit` would run it."""
    from perl_core.data.fewshot import fewshot_splits, subsample_classes

    sizes = sizes or _Sizes()
    name = canonical_dataset(cfg.dataset)
    splits = sizes.splits(name, cfg.data_root)
    if splits is not None:
        few = fewshot_splits(splits, cfg.shots, cfg.seed)
        if cfg.protocol == "base2novel":
            base, novel = subsample_classes(few, "base"), subsample_classes(few, "new")
            train, classes = len(base.train), len(base.classnames)
            evals = len(base.test) + len(novel.test) + (0 if base.val_is_test else len(base.val))
        else:
            train, classes = len(few.train), len(few.classnames)
            evals = len(few.test) + (0 if few.val_is_test else len(few.val))
        source = "data"
    else:
        n, test = _table(name)
        classes = math.ceil(n / 2) if cfg.protocol == "base2novel" else n
        train = cfg.shots * classes  # every class has >= shots train images (data_protocol.md)
        evals = test + (0 if name in VAL_IS_TEST else min(cfg.shots, 4) * classes)
        source = "table"
    for t in target_datasets(cfg):
        tname = canonical_dataset(t)
        ts = sizes.splits(tname, cfg.data_root)
        if ts is not None:
            evals += len(ts.test)
        else:
            evals += _table(tname)[1]
            source = "table" if source == "table" else "data+table"
    per_epoch = train // cfg.batch_size if train >= cfg.batch_size else (1 if train else 0)
    return Workload(train, classes, per_epoch * cfg.epochs, evals, source)


# --- the estimate ---------------------------------------------------------------------------------


@dataclass
class CellEstimate:
    name: str
    group: str
    work: Workload
    train_s: float = 0.0
    eval_s: float = 0.0
    overhead_s: float = 0.0
    eval_cached: bool = False
    train_cached: bool = False

    @property
    def seconds(self) -> float:
        return self.train_s + self.eval_s + self.overhead_s


@dataclass
class Estimate:
    cells: list[CellEstimate] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (cell, why): not counted
    bench: Bench | None = None
    overhead_s: float = 0.0
    overhead_from: str = ""

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.cells)

    def by_group(self) -> dict[str, list[CellEstimate]]:
        out: dict[str, list[CellEstimate]] = {}
        for c in self.cells:
            out.setdefault(c.group, []).append(c)
        return out


def _cache_keys(cfg: TrainConfig) -> tuple[tuple, tuple]:
    """(eval-feature group, training-view group) of the feature cache, as the driver orders the
    cells (`pipeline.spec.group_order`)."""
    from pipeline.spec import backbone_key, cache_group, train_view_key

    group = backbone_key(cfg) + cache_group(cfg)
    return group, group + train_view_key(cfg)


def estimate(named: Iterable[tuple], bench: Bench | None, *,
             cache_enabled: bool = True, overhead_s: float | None = None,
             overhead_from: str = "", sizes: _Sizes | None = None) -> Estimate:
    """The estimate of `named` cells, (name, config) or (name, config, group) in run order (the
    group defaults to the dataset). Without a bench file only the workload is filled in."""
    sizes = sizes or _Sizes()
    est = Estimate(bench=bench)
    if bench is not None:
        if overhead_s is None and bench.trial_overhead_s is not None:
            overhead_s, overhead_from = bench.trial_overhead_s, f"{bench.path} (trial_overhead_s)"
        est.overhead_s = overhead_s or 0.0
        est.overhead_from = overhead_from if overhead_s is not None else \
            "not counted (no --trial-overhead-s, no trial_overhead_s in the bench file and no " \
            "finished run of this sweep to measure it from)"
        ref = flops(bench.arch, bench.inject_layer, bench.num_steps)
    seen_eval: set[tuple] = set()
    seen_view: set[tuple] = set()
    scaled: set[tuple] = set()
    warned_precision: set[str] = set()
    for item in named:
        name, cfg = item[0], item[1]
        try:
            work = cell_workload(cfg, sizes)
        except EstimateError as e:  # sizes unknown (data not there yet): said, not guessed
            est.unknown.append((name, str(e)))
            continue
        c = CellEstimate(name, item[2] if len(item) > 2 else cfg.dataset, work)
        est.cells.append(c)
        if bench is None:
            continue
        group, view = _cache_keys(cfg)
        c.eval_cached = cache_enabled and bool(cfg.pretrained) and group in seen_eval
        c.train_cached = cache_enabled and bool(cfg.pretrained) and view in seen_view
        seen_eval.add(group)
        seen_view.add(view)
        b = _bench_for(bench, cfg.precision, est, warned_precision)
        r_full, r_thought = _flops_ratios(cfg, bench, ref, est, scaled)
        step = b.step_s(work.train_classes, c.train_cached) * cfg.batch_size / BENCH_BATCH
        c.train_s = work.steps * step * (r_thought if c.train_cached else r_full)
        rate = b.eval_cached if c.eval_cached else b.eval_uncached
        c.eval_s = work.eval_images / rate * (r_thought if c.eval_cached else r_full)
        c.overhead_s = est.overhead_s
    return est


def _bench_for(bench: Bench, precision: str, est: Estimate, warned: set[str]) -> Bench:
    """The bench's figures for `precision`; timed in another precision only, the bench's own,
    and said so once per precision."""
    b = bench.for_precision(precision)
    if b is not None:
        return b
    if precision not in warned:
        warned.add(precision)
        est.warnings.append(
            f"the sweep runs precision {precision} but the bench measured "
            f"{bench.precision} only: times are {bench.precision}'s (bf16 vs fp32 can "
            f"differ by several x on a GPU); bench on the target CUDA device, which "
            f"measures both (`python -m perl_core.bench --json`)")
    return bench


def _flops_ratios(cfg: TrainConfig, bench: Bench, ref: tuple[float, float], est: Estimate,
                  scaled: set[tuple]) -> tuple[float, float]:
    """The cell's vision FLOPs over the bench's (full forward, thought passes); a cell whose
    arch, J or K differs from the bench's is said once per (arch, J, K)."""
    full, thought = flops(cfg.arch, cfg.inject_layer, cfg.num_steps)
    r_full, r_thought = full / ref[0], thought / ref[1]
    key = (cfg.arch, cfg.inject_layer, cfg.num_steps)
    if key != (bench.arch, bench.inject_layer, bench.num_steps) and key not in scaled:
        scaled.add(key)
        what = "arch" if cfg.arch != bench.arch else "J/K"
        est.warnings.append(
            f"{what} differs from the bench ({cfg.arch}, J={cfg.inject_layer}, "
            f"K={cfg.num_steps} vs {bench.arch}, J={bench.inject_layer}, "
            f"K={bench.num_steps}): times scaled by the analytic vision FLOPs "
            f"(x{r_full:.3g} full forward, x{r_thought:.3g} thought passes)"
            + ("; FLOPs do not carry across archs well, bench the sweep's arch"
               if what == "arch" else ""))
    return r_full, r_thought


def measured_overhead(runs: Iterable[Any]) -> tuple[float | None, int]:
    """Mean `timing/overhead_s` of finished MLflow runs (the trainable logs it), and how many."""
    vals = [float(r.data.metrics["timing/overhead_s"]) for r in runs
            if "timing/overhead_s" in r.data.metrics]
    return (sum(vals) / len(vals), len(vals)) if vals else (None, 0)


def _h(seconds: float) -> str:
    return f"{seconds / 3600:.3g} GPU-h"


def report(est: Estimate, say: Any, *, arch: Iterable[str] = ()) -> None:
    """Print the per-group and total workload (and GPU time with a bench file)."""
    groups = est.by_group()
    tot_steps = sum(c.work.steps for c in est.cells)
    tot_imgs = sum(c.work.eval_images for c in est.cells)
    sources = sorted({c.work.source for c in est.cells})
    say(f"workload of {len(est.cells)} cell(s) to run: {tot_steps:,} training steps, "
        f"{tot_imgs:,} images evaluated (sizes from: {', '.join(sources) or '-'}; "
        f"'table' = CoOp benchmark sizes, pipeline/estimate.py)")
    if est.unknown:
        reasons = sorted({why for _, why in est.unknown})
        say(f"  {len(est.unknown)} cell(s) not counted, sizes unknown: " + "; ".join(reasons)
            + " (generate or mount the data, then dry-run again)")
    for g, cs in groups.items():
        line = (f"  {g}: {len(cs)} cell(s), {sum(c.work.steps for c in cs):,} steps, "
                f"{sum(c.work.eval_images for c in cs):,} images")
        if est.bench is not None:
            line += f", {_h(sum(c.seconds for c in cs))}"
        say(line)
    b = est.bench
    if b is None:
        archs = sorted(set(arch)) or ["ARCH"]
        say("GPU time: no bench figures given. Run `python -m perl_core.bench --arch "
            f"{archs[0]} --json > bench.json` on the target GPU, then "
            "`--dry-run --bench bench.json`")
        return
    train = sum(c.train_s for c in est.cells)
    evals = sum(c.eval_s for c in est.cells)
    over = sum(c.overhead_s for c in est.cells)
    partial = f" for {len(est.cells)} of {len(est.cells) + len(est.unknown)} cells" \
        if est.unknown else ""
    say(f"estimated GPU time{partial}: {_h(est.seconds)} ({est.seconds:,.0f} s: train "
        f"{train:,.0f} s, eval {evals:,.0f} s, overhead {over:,.0f} s) from {b.path}: device "
        f"{b.device}, arch "
        f"{b.arch}{', ' + b.precision if b.precision else ''}, bench J={b.inject_layer} "
        f"K={b.num_steps}")
    say(f"  per-trial overhead: {est.overhead_s:g} s, {est.overhead_from}")
    say("  compute only: image decoding / data loading are not in the bench figures; GPU-h of "
        "trials run alone (trials sharing a GPU split it; wall-clock ~ GPU-h / GPUs)")
    for w in est.warnings:
        say(f"  warning: {w}")


# --- expected peak memory per trial ---------------------------------------------------------------
#
# What grows is the training step: autograd keeps, for backward, the activations of K passes over
# the upper blocks, per item (image, or class prompt) and pass k: (n + k) tokens through the
# L - d0 - 1 whole upper blocks and the read-row last block (`backbone.block_rows`, ~READ_BLOCK of
# one). So, with S(n) = sum_{k=1..K} (n + k) and W the tower's width,
#     image(B)  = IMAGE_BYTES x W_v x blocks_v x B x S(N_v)         (N_v = 1 + patches)
#     text(c)   = TEXT_BYTES  x W_t x blocks_t x c x S(L_eff)
#     step      = image(batch_size) + text(C)                      whole text graph (C <= chunk)
#               = max(image(batch_size), text(text_chunk))         chunked (perl_core/gradcache.py:
#                 loss.backward() frees the image graph before the first chunk is re-encoded)
# IMAGE_BYTES and TEXT_BYTES are fp32 bytes per token, per unit of width, per upper block, fit to
# the CPU measurement of `python -m perl_core.bench --step-memory` at ViT-B/16 (the whole path at
# 100 and 1,000 classes); the chunked step's live tensors measured 4 % above the formula, its
# CPU peak RSS 38 % (glibc keeps the freed image graph resident; docs/benchmarks.md, "Text
# memory"). Other archs scale by width (perl-tiny: 28 % under). bf16 uses the fp32 figures (an
# upper bound: autocast keeps half-size matmul outputs; not measured). A trial on a GPU adds,
# none of it measured yet:
#     trial = CUDA_CONTEXT_GB + ALLOCATOR_SLACK x (weights + max(step, evaluation))
# weights: the CLIP's parameters in fp32 (a bf16 trial adds a bf16 copy of the matmul weights);
# evaluation: one upper block's live tensors without gradient at eval_batch_size images.
IMAGE_BYTES = 111.0  # 1,090 MB for 4 images at K=4 (the intercept of the two whole-path runs)
TEXT_BYTES = 57.6  # 0.118 MB per prompt and pass token (10,781 - 1,870 MB over 75,400 of them)
READ_BLOCK = 0.2  # the last block computes K/V of every row, the rest for the read row only
CUDA_CONTEXT_GB = 0.5  # per trial process (CUDA context, cuBLAS workspace): assumed
ALLOCATOR_SLACK = 1.15  # reserved / allocated of torch's caching allocator: assumed
EVAL_FLOATS_PER_WIDTH = 14  # x, LN, qkv, attention out, MLP in/out (+ heads x n attention)
DEFAULT_L_EFF = 20  # prompt length when the class names are not at hand (ImageNet's is 18)
GiB = 2 ** 30


@dataclass
class TrialMemory:
    """The expected peak memory of one trial, in GiB (GB = 2^30 bytes here)."""

    dataset: str
    classes: int
    l_eff: int
    l_eff_from: str  # "class names" or "assumed"
    num_steps: int
    text_chunk: int
    image_gb: float  # the image graph of one step
    text_gb: float  # the text graph of one step (of one chunk when chunked)
    step_gb: float  # what one training step adds (the bench's added peak)
    weights_gb: float
    eval_gb: float
    trial_gb: float  # on a GPU: context + slack x (weights + max(step, eval))

    @property
    def chunked(self) -> bool:
        return 0 < self.text_chunk < self.classes


def _towers(arch: str) -> tuple[dict[str, Any], dict[str, Any]]:
    import open_clip

    from perl_core.factory import register_model_configs

    register_model_configs()
    cfg = open_clip.get_model_config(arch)
    if not cfg or "vision_cfg" not in cfg or "text_cfg" not in cfg:
        raise EstimateError(f"unknown open_clip arch {arch!r} (no model config)")
    return cfg["vision_cfg"], {**cfg["text_cfg"], "embed_dim": cfg.get("embed_dim", 512)}


def _weights_gb(v: dict[str, Any], t: dict[str, Any], precision: str) -> float:
    """The CLIP's parameters in fp32, from its config (12 W^2 + 13 W per block, embeddings); a
    bf16 trial adds a bf16 copy of the blocks' matmul weights (`train.build_model`)."""
    wv, wt, lv, lt = int(v["width"]), int(t["width"]), int(v["layers"]), int(t["layers"])
    p, size, e = int(v["patch_size"]), v["image_size"], int(t["embed_dim"])
    n = 1 + (size // p) ** 2 if isinstance(size, int) else 1 + (size[0] // p) * (size[1] // p)
    blocks = lv * (12 * wv * wv + 13 * wv) + lt * (12 * wt * wt + 13 * wt)
    embed = 3 * p * p * wv + n * wv + int(t.get("vocab_size", 49408)) * wt + \
        int(t.get("context_length", 77)) * wt + (wv + wt) * e
    return (4 * (blocks + embed) + (2 * blocks if precision == "bf16" else 0)) / GiB


def _prompt_length(cfg: TrainConfig, sizes: _Sizes, ctx: int, memo: dict) -> tuple[int, str]:
    """L_eff of the training prompts (the last EOS + 1): from the class names when the split
    file is there (ImageNet: open_clip's names), else DEFAULT_L_EFF."""
    import open_clip

    from perl_core.data.templates import class_prompts

    name = canonical_dataset(cfg.dataset)
    key = (name, cfg.data_root, cfg.template, ctx)
    if key not in memo:
        splits = sizes.splits(name, cfg.data_root)
        names = list(splits.classnames) if splits is not None else None
        if names is None and name == "ImageNet":
            from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

            names = list(IMAGENET_CLASSNAMES)
        if names:
            tokens = open_clip.tokenize(class_prompts(names, name, cfg.template),
                                        context_length=ctx)
            memo[key] = (int(tokens.argmax(dim=-1).max()) + 1, "class names")
        else:
            memo[key] = (min(DEFAULT_L_EFF, ctx), "assumed")
    return memo[key]


def trial_memory(cfg: TrainConfig, classes: int, l_eff: int, l_eff_from: str = "class names"
                 ) -> TrialMemory:
    """The expected peak memory of a trial of `cfg` training on `classes` prompts of L_eff."""
    from perl_core.model import resolve_variant

    v, t = _towers(cfg.arch)
    wv, wt, lv, lt = int(v["width"]), int(t["width"]), int(v["layers"]), int(t["layers"])
    p, size = int(v["patch_size"]), v["image_size"]
    n_v = 1 + (size // p) ** 2 if isinstance(size, int) else 1 + (size[0] // p) * (size[1] // p)
    k = cfg.num_steps
    layers = tuple(cfg.inject_layers) or None
    d_v = resolve_variant(cfg.variant, cfg.inject_layer, layers, lv).depths[0]
    d_t = resolve_variant(cfg.variant, cfg.effective_text_inject_layer, layers, lt).depths[0]

    def tokens(n: int) -> int:  # sum over the K passes of the sequence length
        return k * n + k * (k + 1) // 2

    image = IMAGE_BYTES * wv * (lv - d_v - 1 + READ_BLOCK) * cfg.batch_size * tokens(n_v) \
        if cfg.modality != "text" else 0.0

    def text(c: int) -> float:
        return TEXT_BYTES * wt * (lt - d_t - 1 + READ_BLOCK) * c * tokens(l_eff) \
            if cfg.modality != "vision" else 0.0

    chunked = 0 < cfg.text_chunk < classes
    text_b = text(cfg.text_chunk if chunked else classes)
    step = max(image, text_b) if chunked else image + text_b
    heads = wv // int(v.get("head_width", 64))
    evals = 4 * cfg.eval_batch_size * (n_v + k) * (EVAL_FLOATS_PER_WIDTH * wv + heads * (n_v + k))
    weights = _weights_gb(v, t, cfg.precision)
    trial = CUDA_CONTEXT_GB + ALLOCATOR_SLACK * (weights + max(step, evals) / GiB)
    return TrialMemory(canonical_dataset(cfg.dataset), classes, l_eff, l_eff_from, k,
                       cfg.text_chunk, image / GiB, text_b / GiB, step / GiB, weights,
                       evals / GiB, trial)


def memory_by_dataset(named: Iterable[tuple], sizes: _Sizes | None = None
                      ) -> tuple[list[TrialMemory], list[tuple[str, str]]]:
    """Per training dataset, the cell with the largest expected peak (K, chunk and arch vary
    across cells); (rows, [(cell, why)] of cells whose class count is unknown)."""
    sizes = sizes or _Sizes()
    memo: dict = {}
    worst: dict[str, TrialMemory] = {}
    unknown = []
    for item in named:
        name, cfg = item[0], item[1]
        try:
            classes = cell_workload(cfg, sizes).train_classes
            ctx = int(_towers(cfg.arch)[1].get("context_length", 77))
            l_eff, source = _prompt_length(cfg, sizes, ctx, memo)
        except EstimateError as e:
            unknown.append((name, str(e)))
            continue
        m = trial_memory(cfg, classes, l_eff, source)
        if m.dataset not in worst or m.trial_gb > worst[m.dataset].trial_gb:
            worst[m.dataset] = m
    return list(worst.values()), unknown


def parse_gpu_memory(text: str) -> float:
    """'40GB', '40G', '40GiB', '80', '24 GB' -> GiB (a '40 GB' card holds 40 GiB); ValueError."""
    s = str(text).strip().upper().replace(" ", "")
    for unit in ("GIB", "GB", "G"):
        if s.endswith(unit):
            s = s[:-len(unit)]
            break
    try:
        value = float(s)
    except ValueError:
        raise ValueError(f"--gpu-memory {text!r}: expected a size such as 40GB") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"--gpu-memory {text!r}: must be a positive size such as 40GB")
    return value


def memory_report(rows: list[TrialMemory], say: Any, gpu: float,
                  gpu_memory_gb: float | None = None) -> list[str]:
    """Print the expected peak memory per trial for each dataset, and how many trials share a
    GPU at `gpu` (resources.gpu); returns the warnings (also printed) for `gpu_memory_gb`."""
    per_gpu = math.floor(1 / gpu + 1e-9) if gpu > 0 else 0
    say("expected peak memory per trial (pipeline/estimate.py: the training step from the CPU "
        "measurement at ViT-B/16; on a GPU + weights, CUDA context, allocator slack, "
        "unmeasured there):")
    for m in rows:
        how = f"text_chunk {m.text_chunk}" if m.chunked else \
            ("whole text graph" if m.text_chunk == 0 else f"whole text graph (<= text_chunk "
                                                          f"{m.text_chunk})")
        line = (f"  {m.dataset}: {m.classes} classes, L_eff {m.l_eff}"
                f"{' (assumed)' if m.l_eff_from == 'assumed' else ''}, K={m.num_steps}, {how}: "
                f"step +{m.step_gb:.1f} GB (image {m.image_gb:.1f}, text {m.text_gb:.1f}), "
                f"trial {m.trial_gb:.1f} GB")
        if per_gpu:
            line += f"; x{per_gpu} per GPU (resources.gpu {gpu:g}) = {per_gpu * m.trial_gb:.1f} GB"
        say(line)
    warnings = []
    if gpu_memory_gb is not None and per_gpu:
        for m in rows:
            need = per_gpu * m.trial_gb
            if need > gpu_memory_gb:
                fits = math.floor(gpu_memory_gb / m.trial_gb)
                hint = (f"use resources.gpu {1 / fits:.3g} ({fits} per GPU)" if fits >= 1 else
                        "one trial alone does not fit")
                hint += "" if m.chunked or m.classes <= 1 else \
                    "; or lower text_chunk" if m.text_chunk else "; or set text_chunk (e.g. 128)"
                warnings.append(f"resources.gpu {gpu:g} puts {per_gpu} trials on one GPU: "
                                f"{m.dataset} needs ~{need:.1f} GB, more than --gpu-memory "
                                f"{gpu_memory_gb:g} GB ({hint})")
        if not warnings:
            say(f"  fits: {per_gpu} trial(s) per GPU (resources.gpu {gpu:g}) within "
                f"--gpu-memory {gpu_memory_gb:g} GB for every dataset")
    for w in warnings:
        say(f"  warning: {w}")
    return warnings


__all__ = ["COOP_SIZES", "Bench", "EstimateError", "load_bench", "flops", "cell_workload",
           "Workload", "estimate", "Estimate", "CellEstimate", "report", "measured_overhead",
           "TrialMemory", "trial_memory", "memory_by_dataset", "memory_report",
           "parse_gpu_memory"]
