"""The zero-shot check: step 0 (zero-shot CLIP) of every dataset of a sweep, beside a reference.

    python -m pipeline.run SWEEP.yaml --zero-shot-check [--tolerance 1.5]
    python -m pipeline.zeroshot SWEEP.yaml [--tolerance 1.5]          # the same

No training. For each distinct (dataset, arch, pretrained, data_root, precision) of the sweep's
cells the model is built once and the base and novel test sets are evaluated at K = 0 through
the ordinary path (`resolve_task` + `evaluate_task` with `num_steps=0`: step 0 is zero-shot CLIP
by construction), under both templates (`generic`, `coop`). A cross_dataset /
domain_generalization cell is checked as its trials evaluate it: the source and each target of
its `eval_datasets` (for domain_generalization, empty = the source's registered variants) on
their full test sets among all their classes (`all/`, `<Target>/`), one check per dataset. With
the sweep's feature cache on, the image features are computed once per dataset and shared by
the two templates (and by the sweep's own trials later: same keys).

References (only ever shown as labelled reference columns):
- a dataset of the paper: the CLIP row of Table 5 (base / novel / HM; the per-dataset numbers of
  Table 1's CLIP row, from CoCoOp, which used CoOp's per-dataset templates); for a full test set
  (`all`) the CLIP row of Table 8 (ImageNet and its four variants). Table 2 has no CLIP row: the
  ten cross-dataset targets show ours only ("no reference"), their test counts still checked.
  Only the `coop` row is compared; `generic` is shown for information. ViT-B-16 arch only.
- the toy world: `perl_core/assets/zero_shot_reference.json` (perl-tiny's model-card numbers on
  the seed-0 world: base / novel, and `all` for every toy dataset), for arch perl-tiny /
  pretrained embedded on a world of the same seed and generator version. Both rows compared.
- anything else: ours only.

A row is flagged when |ours - reference| > tolerance for base, novel, HM or all, or when the
number of test images differs from the full split's. Exit code 0: nothing flagged; 1: a dataset
flagged; 2: bad input (a sweep file, a tolerance, or a dataset that cannot be evaluated).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any, Callable, Iterable

from perl_core.config import TrainConfig
from perl_core.protocol import canonical_dataset, has_targets, target_datasets

TEMPLATES = ("generic", "coop")
# Points of top-1 accuracy. Above what a faithful port can differ by (the toy check reproduces its
# reference to the card's rounding, 0.05) and below what the usual breakages cost: see
# docs/method.md, "Zero-shot check", for the arithmetic.
DEFAULT_TOLERANCE = 1.5
REFERENCE_FILE = "zero_shot_reference.json"  # in perl_core/assets, next to MODEL_CARD.md
PAPER_TABLE, PAPER_METHOD = "T5", "CLIP"  # Table 5's CLIP row = Table 1's, with base and novel
PAPER_TABLE_ALL = "T8"  # Table 8's CLIP row: full test sets of ImageNet and its 4 variants
# Full test split sizes of CoOp's split files (base + novel test images), from the team's
# data_protocol.md §1.2; a different count means a partial split or a wrong file.
COOP_TEST_IMAGES = {"ImageNet": 50000, "Caltech101": 2465, "OxfordPets": 3669,
                    "StanfordCars": 8041, "Flowers102": 2463, "Food101": 30300,
                    "FGVCAircraft": 3333, "SUN397": 19850, "DTD": 1692, "EuroSAT": 8100,
                    "UCF101": 3783}
# The domain-generalisation targets' full test sets (data_protocol.md §1.2; A and R are 200-way).
DG_TEST_IMAGES = {"ImageNetV2": 10000, "ImageNetSketch": 50889, "ImageNetA": 7500,
                  "ImageNetR": 30000}
# The likely causes of a zero-shot gap, most likely first (the list).
CAUSES = (
    "class-name file: wrong names, or names in another order than the labels (compare the "
    "split file's / classnames.txt's names with CoOp's)",
    "partial split: fewer (or other) test images than the full split file",
    "preprocessing: resize of the shorter side (bicubic), center crop to the model's size, "
    "CLIP mean/std normalisation (perl_core/data/transforms.py eval_transform)",
    "GELU vs QuickGELU: OpenAI's weights need the QuickGELU arch (ViT-B-16-quickgelu); "
    "ViT-B-16 runs them with GELU",
    "template: the coop row must use CoOp's per-dataset template (perl_core/data/templates.py)",
)


class CheckError(ValueError):
    """Bad input for the check (exit code 2)."""


@dataclass(frozen=True)
class Reference:
    source: str  # where the numbers come from, for the table
    base: float | None
    novel: float | None
    hm: float | None
    compared: bool  # False: shown for information only (no flag)
    test_images: int | None = None  # expected test images, base + novel or all (None: unknown)
    all: float | None = None  # a full test set among all its classes

    def has_values(self) -> bool:
        return any(v is not None for v in (self.base, self.novel, self.hm, self.all))


METRICS = ("base", "novel", "hm", "all")


@dataclass
class Row:
    dataset: str
    template: str
    base: float | None
    novel: float | None
    hm: float | None
    test_images: tuple[int, ...]  # (base, novel) evaluated, or (all,) for a full test set
    reference: Reference | None = None
    note: str = ""  # why there is no reference
    all: float | None = None  # a full test set among all its classes (source / target)
    classes: int | None = None  # the classes of that full test set

    def deltas(self) -> dict[str, float]:
        if self.reference is None:
            return {}
        ours, ref = ({k: getattr(x, k) for k in METRICS} for x in (self, self.reference))
        return {k: ours[k] - ref[k] for k in METRICS if ours[k] is not None and ref[k] is not None}

    def count_mismatch(self) -> bool:
        r = self.reference
        return r is not None and r.test_images is not None and sum(self.test_images) != \
            r.test_images

    def flagged(self, tolerance: float) -> bool:
        if self.reference is None or not self.reference.compared:
            return False
        return self.count_mismatch() or any(abs(d) > tolerance for d in self.deltas().values())


@dataclass
class Outcome:
    rows: list[Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "<dataset>: <why it was not evaluated>"
    seconds: float = 0.0

    def flagged(self, tolerance: float) -> list[str]:
        return list(dict.fromkeys(r.dataset for r in self.rows if r.flagged(tolerance)))

    def exit_code(self, tolerance: float) -> int:
        return 2 if self.errors else (1 if self.flagged(tolerance) else 0)


# --- references ---------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def toy_reference() -> dict[str, Any]:
    """perl-tiny's zero-shot numbers on the toy world (the model card's, as data)."""
    text = resources.files("perl_core").joinpath("assets", REFERENCE_FILE).read_text("utf-8")
    return json.loads(text)


def _world_manifest(data_root: str) -> dict[str, Any] | None:
    from pathlib import Path

    from perl_core.data.synthetic import MANIFEST

    path = Path(data_root) / MANIFEST
    if "://" in data_root or not path.is_file():
        return None
    return json.loads(path.read_text())


def reference_for(cfg: TrainConfig, template: str, *, dataset: str | None = None,
                  full: bool = False) -> tuple[Reference | None, str]:
    """The reference of `dataset` (default `cfg.dataset`) under `template`, or (None, why there is
    none): of its base / novel test sets, or with `full` of its full test set (`all`)."""
    from perl_core.data.registry import get_spec
    from perl_core.metrics import harmonic_mean
    from pipeline import reference as ref

    spec = get_spec(dataset or cfg.dataset)
    if spec.synthetic:
        toy = toy_reference()
        entry = toy["datasets"].get(spec.name)
        if entry is None:
            return None, f"{REFERENCE_FILE} has no {spec.name}"
        if (cfg.arch, cfg.pretrained) != (toy["arch"], toy["pretrained"]):
            return None, (f"{REFERENCE_FILE} is for arch={toy['arch']} "
                          f"pretrained={toy['pretrained']}")
        world = _world_manifest(cfg.data_root)
        want = toy["world"]
        if world is not None and (world.get("seed"), world.get("generator_version")) != (
                want["seed"], want["generator_version"]):
            return None, (f"{REFERENCE_FILE} is for the world of seed {want['seed']} (generator "
                          f"v{want['generator_version']}); {cfg.data_root} has seed "
                          f"{world.get('seed')} (v{world.get('generator_version')})")
        count = sum(entry["test_images"].values())  # {"base", "novel"} or {"all"}: every image
        if full:
            if "all" not in entry[template]:
                return None, f"{REFERENCE_FILE} has no all-class number for {spec.name}"
            return Reference("model card", None, None, None, True, count,
                             entry[template]["all"]), ""
        if "base" not in entry[template]:
            return None, f"{REFERENCE_FILE} has no base / novel numbers for {spec.name}"
        b, n = entry[template]["base"], entry[template]["novel"]
        return Reference("model card", b, n, harmonic_mean(b, n), True, count), ""
    paper = ref.paper_dataset(spec.name)
    if paper is None:
        return None, "no reference for this dataset"
    if "vit-b-16" not in cfg.arch.lower():
        return None, f"the paper's CLIP row is ViT-B/16; arch is {cfg.arch}"
    if full:
        count = {**COOP_TEST_IMAGES, **DG_TEST_IMAGES}.get(paper)
        value = ref.paper_value(PAPER_TABLE_ALL, PAPER_METHOD, paper, "acc")
        if value is None:  # the XD targets: Table 2 prints no CLIP row; the count still checks
            why = f"no reference: the paper prints no zero-shot {PAPER_METHOD} accuracy for {paper}"
            if count is None:
                return None, why
            return Reference(f"{why}; full split {count}", None, None, None, True, count), ""
        return Reference(f"paper {PAPER_TABLE_ALL} {PAPER_METHOD}", None, None, None,
                         template == "coop", count, value), ""
    vals = {m: ref.paper_value(PAPER_TABLE, PAPER_METHOD, paper, m) for m in ("base", "novel",
                                                                               "hm")}
    if any(v is None for v in vals.values()):
        return None, f"the paper prints no {PAPER_METHOD} base/novel/HM for {paper}"
    # Table 1 used CoOp's per-dataset templates: only that row is a like-for-like comparison
    return Reference(f"paper {PAPER_TABLE} {PAPER_METHOD}", vals["base"], vals["novel"],
                     vals["hm"], template == "coop", COOP_TEST_IMAGES.get(paper)), ""


# --- evaluation ---------------------------------------------------------------------------------


def check_configs(configs: Iterable[TrainConfig]) -> list[TrainConfig]:
    """The step-0 configs of a sweep's cells, one per distinct check, in order.

    A base2novel (or `all`) cell: its dataset's base and novel test sets (protocol base2novel).
    A cross_dataset / domain_generalization cell: its source's full test set (protocol `all`)
    and each target's (the cell's protocol with that one target in `eval_datasets`; for
    domain_generalization, none listed = the source's registered variants, as in
    `resolve_task`). Each check once per (dataset, arch, pretrained, data_root, precision).
    Everything that cannot change step 0 is dropped (K, the projectors' layout); the injection
    layer stays, so that the cached features are the ones the sweep's trials use.
    """
    out: dict[tuple, TrainConfig] = {}
    for cfg in configs:
        name = canonical_dataset(cfg.dataset)
        step0 = dict(dataset=name, num_steps=0, variant="shared", inject_layers=(),
                     jacobian_samples=0)
        checks = [("base2novel", name, cfg.replace(protocol="base2novel", eval_datasets=(),
                                                   **step0))]
        if has_targets(cfg.protocol):
            checks = [("all", name, cfg.replace(protocol="all", eval_datasets=(), **step0))]
            checks += [("target", canonical_dataset(t), cfg.replace(
                protocol=cfg.protocol, eval_datasets=(canonical_dataset(t),), **step0))
                for t in target_datasets(cfg)]
        for kind, dataset, c in checks:
            out.setdefault((kind, dataset, cfg.arch, cfg.pretrained, cfg.data_root,
                            cfg.precision), c)
    return list(out.values())


def checked_dataset(cfg: TrainConfig) -> str:
    """The dataset a check config evaluates: its target, else its dataset."""
    return cfg.eval_datasets[0] if has_targets(cfg.protocol) else cfg.dataset


def evaluate_step0(cfg: TrainConfig, model: Any, cache: Any = None) -> list[Row]:
    """Step-0 accuracy of a check config (`check_configs`), one Row per template: base and novel
    (protocol base2novel), or the full test set among all classes of the source (`all`) or of
    the one target (cross_dataset / domain_generalization)."""
    import dataclasses

    from perl_core.protocol import resolve_task
    from perl_core.train import evaluate_task

    name = {"base2novel": None, "all": "all"}.get(cfg.protocol, checked_dataset(cfg))
    rows = []
    task = None
    for template in TEMPLATES:
        c = cfg.replace(template=template)
        if task is None:  # the template changes only the prompts; only the checked sets run
            task = resolve_task(c)
            keep = ("base", "novel") if name is None else (name,)
            task = dataclasses.replace(task, evalsets=[e for e in task.evalsets if e.name in keep])
        m, _ = evaluate_task(model, task, c, cache=cache)
        if name is None:
            ref, why = reference_for(c, template)
            rows.append(Row(c.dataset, template, m["base/acc_step0"], m["novel/acc_step0"],
                            m["hm_step0"], (int(m["base/n"]), int(m["novel/n"])), ref, why))
        else:
            (es,) = task.evalsets
            ref, why = reference_for(c, template, dataset=checked_dataset(c), full=True)
            rows.append(Row(checked_dataset(c), template, None, None, None,
                            (int(m[f"{name}/n"]),), ref, why, all=m[f"{name}/acc_step0"],
                            classes=len(es.classnames)))
    return rows


def run_check(configs: Iterable[TrainConfig], *, cache_for: Callable[[TrainConfig], Any] | None
              = None, say: Callable[[str], None] = print) -> Outcome:
    """Evaluate every check config (a model per (arch, pretrained), built once)."""
    from perl_core.factory import resolve_device
    from perl_core.train import build_model, ensure_synthetic_data

    out = Outcome()
    t0 = time.monotonic()
    models: dict[tuple, Any] = {}
    for cfg in check_configs(configs):
        try:
            if ensure_synthetic_data(cfg):
                say(f"generated the synthetic world under {cfg.data_root}")
            key = (cfg.arch, cfg.pretrained, cfg.device)
            if key not in models:
                models[key] = build_model(cfg).to(resolve_device(cfg.device))
            out.rows += evaluate_step0(cfg, models[key],
                                       cache_for(cfg) if cache_for is not None else None)
        except Exception as e:  # one unreadable dataset must not hide the others' numbers
            out.errors.append(f"{checked_dataset(cfg)} (data_root "
                              f"{cfg.data_root or '<empty>'}): {type(e).__name__}: {e}")
    out.seconds = time.monotonic() - t0
    return out


# --- report -------------------------------------------------------------------------------------


def _num(x: float | None, sign: bool = False) -> str:
    if x is None or math.isnan(x):
        return "—"
    return f"{x:+.2f}" if sign else f"{x:.2f}"


def format_table(rows: list[Row], tolerance: float) -> list[str]:
    # the all-class columns (a source or target of cross_dataset / domain_generalization) only
    # where there are such rows
    metrics = [m for m in METRICS if m != "all" or any(r.all is not None for r in rows)]
    label = {"base": "base", "novel": "novel", "hm": "HM", "all": "all"}
    hdr = ["dataset", "template", *(label[m] for m in metrics),
           *(f"ref {label[m]}" for m in metrics), *(f"Δ {label[m]}" for m in metrics),
           "test images", "reference", "flag"]
    body = []
    for r in rows:
        ref, d = r.reference, r.deltas()
        valued = ref is not None and ref.has_values()
        flag = ("FLAG" if r.flagged(tolerance) else "ok" if valued and ref.compared
                else "info" if valued else "no ref")
        n = "+".join(map(str, r.test_images))
        if ref is not None and ref.test_images is not None:
            n += f" (ref {ref.test_images})"
        body.append([r.dataset, r.template, *(_num(getattr(r, m)) for m in metrics),
                     *(_num(getattr(ref, m) if ref else None) for m in metrics),
                     *(_num(d.get(m), True) for m in metrics), n,
                     ref.source if ref else r.note, flag])
    widths = [max(len(str(x)) for x in col) for col in zip(hdr, *body)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return [line(hdr), line(["-" * w for w in widths])] + [line(b) for b in body]


def explain(dataset: str, rows: list[Row], tolerance: float, cfg: TrainConfig | None) -> list[str]:
    """The flag message of one dataset: what is off, then the likely causes in order, with the
    evidence this run has for each."""
    from perl_core.data.templates import template_for

    bad = [r for r in rows if r.flagged(tolerance)]
    what = []
    for r in bad:
        parts = [f"Δ {k} {v:+.2f}" for k, v in r.deltas().items() if abs(v) > tolerance]
        if r.count_mismatch():
            parts.append(f"{sum(r.test_images)} test images, reference {r.reference.test_images}")
        what.append(f"{r.template}: {', '.join(parts)}")
    src = bad[0].reference.source if bad and bad[0].reference else "the reference"
    if bad and bad[0].reference and not bad[0].reference.has_values():
        src = "the full split's test count"  # no accuracy reference (Table 2's targets)
    lines = [f"{dataset}: zero-shot differs from {src} beyond ±{tolerance:g} points "
             f"({'; '.join(what)}). Likely causes, most likely first:"]
    evidence = ["", "", "", "", ""]
    if any(r.classes is not None for r in bad):  # a full test set: how many names were used
        r = next(r for r in bad if r.classes is not None)
        evidence[0] = f" <- {dataset} evaluated {r.classes}-way, with its own class names"
    if any(r.count_mismatch() for r in bad):
        r = next(r for r in bad if r.count_mismatch())
        counted = (f"{r.test_images[0]} base + {r.test_images[1]} novel = "
                   if len(r.test_images) == 2 else "")
        evidence[1] = (f" <- evaluated {counted}{sum(r.test_images)} test images, the full "
                       f"split has {r.reference.test_images}")
    if cfg is not None and cfg.pretrained == "openai" and "quickgelu" not in cfg.arch.lower():
        evidence[3] = f" <- arch {cfg.arch} with pretrained=openai"
    if cfg is not None:
        evidence[4] = f" (coop template here: {template_for(dataset, 'coop')!r})"
    lines += [f"  {i}. {c}{e}" for i, (c, e) in enumerate(zip(CAUSES, evidence), 1)]
    return lines


def report(out: Outcome, tolerance: float, configs: list[TrainConfig] | None = None,
           say: Callable[[str], None] = print) -> int:
    """Print the table, the flag messages and the errors; return the exit code."""
    if out.rows:
        for line in format_table(out.rows, tolerance):
            say(line)
    by_dataset: dict[str, TrainConfig] = {}
    for c in configs or []:
        by_dataset.setdefault(checked_dataset(c), c)
    for d in out.flagged(tolerance):
        say("")
        for line in explain(d, [r for r in out.rows if r.dataset == d], tolerance,
                            by_dataset.get(d)):
            say(line)
    for e in out.errors:
        say(f"cannot evaluate {e}")
    n = len({r.dataset for r in out.rows})
    say(f"zero-shot check: {n} dataset(s) x {len(TEMPLATES)} templates at step 0 in "
        f"{out.seconds:.1f} s; tolerance ±{tolerance:g} points; "
        f"{len(out.flagged(tolerance))} flagged, {len(out.errors)} not evaluated")
    return out.exit_code(tolerance)


def check_sweep(spec: Any, grid: list[Any], tolerance: float = DEFAULT_TOLERANCE,
                say: Callable[[str], None] = print) -> int:
    """The check of a loaded sweep (`pipeline.spec.SweepSpec` and its cells); the exit code."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        say(f"--tolerance must be a number of points >= 0, got {tolerance!r}")
        return 2
    configs = [c.config for c in grid]
    if getattr(spec, "search", None) is not None:
        configs.append(spec.base_config())
    if not configs:
        say(f"{spec.source}: the sweep has no cells: nothing to check")
        return 2
    cache_for = None
    if spec.cache.enabled:  # the trials' cache: both templates share the image features
        from pipeline.trainable import feature_cache

        settings = spec.cache.model_dump()
        cache_for = lambda cfg: feature_cache(settings, cfg)  # noqa: E731
    out = run_check(configs, cache_for=cache_for, say=say)
    return report(out, tolerance, check_configs(configs), say)


def build_parser() -> argparse.ArgumentParser:
    from pipeline.spec import add_set_argument

    ap = argparse.ArgumentParser(prog="python -m pipeline.zeroshot",
                                 description="Zero-shot (step 0) of every dataset of a sweep "
                                             "beside the reference; no training.")
    ap.add_argument("sweep", help="sweep YAML (sweeps/*.yaml)")
    ap.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="POINTS",
                    help=f"flag a dataset whose |ours - reference| exceeds this many points "
                         f"(default {DEFAULT_TOLERANCE:g})")
    add_set_argument(ap)
    return ap


def main(argv: list[str] | None = None) -> int:
    from pipeline.spec import SpecError, cells, group_order, load_spec, locate_sweep
    from pipeline.suite import is_suite

    args = build_parser().parse_args(argv)
    path = locate_sweep(args.sweep, print)
    if is_suite(path):
        print(f"{args.sweep} is a suite file: give one of its sweeps (they share datasets; "
              f"`sweeps/base2novel.yaml` and `sweeps/cross_dataset.yaml` cover the paper's)")
        return 2
    try:
        spec = load_spec(path, overrides=args.overrides)
    except SpecError as e:
        print(str(e))
        return 2
    return check_sweep(spec, group_order(cells(spec)), args.tolerance)


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["check_sweep", "run_check", "check_configs", "checked_dataset", "evaluate_step0",
           "reference_for", "DG_TEST_IMAGES",
           "toy_reference", "report", "format_table", "explain", "Row", "Reference", "Outcome",
           "DEFAULT_TOLERANCE", "TEMPLATES", "CAUSES", "COOP_TEST_IMAGES", "main"]
