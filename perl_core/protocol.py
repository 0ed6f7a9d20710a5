"""The evaluation protocols: what a config trains on, what it evaluates, and what a target is.

One home for the rules that training (`perl_core.train.fit`), the sweep checks (`pipeline.spec`),
the estimate (`pipeline.estimate`), the zero-shot check and the aggregate share:

- `canonical_dataset(name)`: the registry's one spelling of a dataset name (aliases, case).
- base2novel: few-shot over all classes, then the base half is trained; evalsets `base` and
  `novel` (the test images of each half among that half's classes).
- all: trains and evaluates on every class (evalset `all`).
- cross_dataset / domain_generalization (`TARGET_PROTOCOLS`): trains on every class of the
  source, evaluates it (`all`) and each target dataset on its full test set (evalset = the
  target's canonical name); `target_datasets(cfg)` lists them (for domain_generalization an
  empty `eval_datasets` means every registered test-only variant of the source,
  `dg_default_targets`).
- every protocol also evaluates the few-shot val split of the training classes (`val`), except
  where CoOp's val split is the test set (ImageNet).
- `RESERVED_EVALSETS`: the evalset names that are no target; any other evalset is a target
  dataset (`is_target_evalset`), averaged into `target_avg`.
- `training_hash(cfg)`: the config hash of what is *trained*. all, cross_dataset and
  domain_generalization train the same thing (every class of the source) and differ only in
  what they evaluate, so one cross-dataset training serves a DG cell (`pipeline.reuse`).

Torch-free, and the data layer is imported where it is used: the aggregate imports this module
on a machine with only the tracking dependencies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from perl_core.config import TrainConfig, fields_digest, literal_choices

logger = logging.getLogger(__name__)

TARGET_PROTOCOLS = ("cross_dataset", "domain_generalization")  # those evaluating target datasets
RESERVED_EVALSETS = ("base", "novel", "all", "val")  # evalset names that are no target dataset


@dataclass(frozen=True)
class EvalSet:
    name: str  # metric prefix: "base", "novel", "all" or a target dataset's canonical name
    dataset: str  # dataset whose prompt template the class names use
    items: list[Any]  # Datum
    classnames: list[str]


@dataclass(frozen=True)
class Task:
    dataset: str  # canonical name of the training dataset
    train_items: list[Any]
    train_classnames: list[str]
    evalsets: list[EvalSet]
    targets: list[str]  # evalset names averaged into target_avg


def canonical_dataset(name: str) -> str:
    """The registered name of `name` (case, '-', '_' and aliases ignored); KeyError if unknown."""
    from perl_core.data.registry import get_spec

    return get_spec(name).name


def dg_default_targets(source: str) -> list[str]:
    """Registered test-only variants whose source is `source` (ImageNet -> V2, Sketch, A, R)."""
    from perl_core.data.registry import get_spec, list_datasets

    src = canonical_dataset(source)
    return [n for n in list_datasets() if get_spec(n).test_only and get_spec(n).source
            and canonical_dataset(get_spec(n).source) == src]


def has_targets(protocol: str) -> bool:
    """Whether `protocol` evaluates target datasets (cross_dataset, domain_generalization)."""
    return protocol in TARGET_PROTOCOLS


def target_datasets(cfg: TrainConfig) -> list[str]:
    """The target datasets `cfg` evaluates, as written in eval_datasets (for
    domain_generalization, none listed: `dg_default_targets` of its dataset, canonical names);
    [] for a protocol without targets."""
    if not has_targets(cfg.protocol):
        return []
    targets = list(cfg.eval_datasets)
    if not targets and cfg.protocol == "domain_generalization":
        targets = dg_default_targets(cfg.dataset)
    return targets


def is_target_evalset(evalset: str) -> bool:
    """Whether an evalset name (a metric key's prefix) is a target dataset."""
    return evalset not in RESERVED_EVALSETS


def eval_datasets_problem(cfg: TrainConfig) -> str | None:
    """The sweep's rule for eval_datasets (stricter than `resolve_task`, which fills in a
    domain_generalization source's variants and ignores eval_datasets under base2novel): a
    target protocol lists its targets, and no other protocol lists any. None when it holds."""
    if has_targets(cfg.protocol) and not cfg.eval_datasets:
        return (f"protocol {cfg.protocol!r} needs eval_datasets (the target datasets evaluated "
                f"with the trained projectors)")
    if not has_targets(cfg.protocol) and cfg.eval_datasets:
        return (f"eval_datasets is only used by protocols {list(TARGET_PROTOCOLS)}; protocol is "
                f"{cfg.protocol!r}")
    return None


# what a protocol trains on: base2novel the base half; the others every class of the source
_TRAINS_ON = {"base2novel": "base2novel", "all": "all", "cross_dataset": "all",
              "domain_generalization": "all"}


def training_hash(cfg: TrainConfig) -> str:
    """sha256 of the hashed fields that decide the trained weights: `config_hash`'s, with
    `eval_datasets` left out and `protocol` read as what it trains on (`_TRAINS_ON`). Two
    configs of one training hash train bitwise the same projectors (tests/test_reuse.py)."""
    d = cfg.hashed_fields()
    d.pop("eval_datasets", None)
    d["protocol"] = _TRAINS_ON[cfg.protocol]
    return fields_digest(d)


def _val_set(train_splits: Any, source: str) -> list[EvalSet]:
    """The few-shot validation split of the training classes, as evalset "val" (for model
    selection: sweeps select on val/*, never on test). None where the dataset has no val split
    or CoOp uses the test set as val (ImageNet): that would be selection on test."""
    if not train_splits.val or getattr(train_splits, "val_is_test", False):
        return []
    return [EvalSet("val", source, list(train_splits.val), list(train_splits.classnames))]


def _fewshot(cfg: TrainConfig, source: str) -> Any:
    """The few-shot splits of the training dataset (before any base/novel cut)."""
    from perl_core.data.coop import load_splits
    from perl_core.data.fewshot import check_shots, fewshot_splits

    splits = load_splits(source, cfg.data_root)
    try:
        check_shots(splits, cfg.shots)
    except ValueError as e:  # Dassl takes such a class whole; say so (the pipeline refuses it)
        logger.warning("%s; those classes are trained on all their images (Dassl's behaviour)", e)
    if cfg.fewshot_source == "coop_pickle":  # CoOp's own picks; subsampled later, as in CoOp
        from perl_core.data.coop_pickle import coop_fewshot_splits

        return coop_fewshot_splits(splits, cfg.data_root, cfg.shots, cfg.seed)
    if cfg.fewshot_source == "sample":
        return fewshot_splits(splits, cfg.shots, cfg.seed)
    raise ValueError(f"fewshot_source={cfg.fewshot_source!r} is not one of "
                     f"{list(literal_choices('fewshot_source') or ())}")


def _target_evalsets(cfg: TrainConfig, source: str) -> tuple[list[EvalSet], list[str]]:
    """The full test set of each target dataset, and their names (for target_avg)."""
    from perl_core.data.coop import load_splits

    targets = target_datasets(cfg)
    if not targets:
        raise ValueError(f"protocol={cfg.protocol!r} needs eval_datasets (the target datasets "
                         f"evaluated with the {source}-trained projectors)")
    evalsets, names = [], []
    for target in targets:
        name = canonical_dataset(target)
        if name in names or name in RESERVED_EVALSETS:
            raise ValueError(f"eval_datasets lists {name!r} twice (or uses a reserved name)")
        names.append(name)
        t = load_splits(name, cfg.data_root)
        if not t.test:
            raise ValueError(f"target dataset {name!r} under {cfg.data_root} has no test split")
        evalsets.append(EvalSet(name, name, list(t.test), list(t.classnames)))
    return evalsets, names


def resolve_task(cfg: TrainConfig) -> Task:
    """Load the splits and decide what to train on and what to evaluate (see module doc)."""
    from perl_core.data.fewshot import subsample_classes

    if not cfg.dataset:
        raise ValueError("cfg.dataset is empty: name a registered dataset (e.g. 'ToyShapes')")
    if not cfg.data_root:
        raise ValueError(f"cfg.data_root is empty: where does {cfg.dataset!r} live?")
    source = canonical_dataset(cfg.dataset)
    fewshot = _fewshot(cfg, source)
    if cfg.protocol == "base2novel":
        base = subsample_classes(fewshot, "base")
        novel = subsample_classes(fewshot, "new")
        return Task(source, list(base.train), list(base.classnames),
                    [EvalSet("base", source, list(base.test), list(base.classnames)),
                     EvalSet("novel", source, list(novel.test), list(novel.classnames)),
                     *_val_set(base, source)], [])
    evalsets = [EvalSet("all", source, list(fewshot.test), list(fewshot.classnames)),
                *_val_set(fewshot, source)]
    if cfg.protocol == "all":
        if cfg.eval_datasets:
            raise ValueError(f"protocol='all' evaluates the training dataset only; eval_datasets="
                             f"{list(cfg.eval_datasets)} needs protocol cross_dataset or "
                             f"domain_generalization")
        return Task(source, list(fewshot.train), list(fewshot.classnames), evalsets, [])
    if not has_targets(cfg.protocol):
        raise ValueError(f"protocol={cfg.protocol!r} is not one of ['base2novel', 'all', "
                         f"'cross_dataset', 'domain_generalization']")
    targets, names = _target_evalsets(cfg, source)
    return Task(source, list(fewshot.train), list(fewshot.classnames), evalsets + targets, names)


__all__ = ["Task", "EvalSet", "resolve_task", "canonical_dataset", "dg_default_targets",
           "target_datasets", "has_targets", "training_hash", "is_target_evalset",
           "eval_datasets_problem", "TARGET_PROTOCOLS", "RESERVED_EVALSETS"]
