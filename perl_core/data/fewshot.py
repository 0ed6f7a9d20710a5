"""Few-shot selection and the base/novel class split, exactly as CoOp + Dassl do them.

Few-shot (Dassl `DatasetBase.generate_fewshot_dataset`, notes §5): group a split's items by label
in first-appearance order; per group take `rng.sample(group, k)`, or the whole group when it has
fewer than k items (no resampling). `fewshot_splits` seeds its **own** `random.Random(seed)`
(the same stream as CoOp's `random.seed(seed)`), samples train with `shots`, then val with
`min(shots, 4)` on the same stream; test is untouched. ImageNet (`Splits.val_is_test`) samples
train only: its val is the test set, as in CoOp. shots < 1 keeps every image (Dassl/CoOp).

Base/novel (CoOp `subsample_classes`, notes §6): after few-shot sampling, the sorted labels of the
few-shot train set are cut at m = ceil(n/2): "base" keeps labels[:m], "new" labels[m:], each
relabelled 0.. in order (train, val and test alike); "all" keeps everything.

CLI (writes the selection as a JSON index file, cross_modal_adaptation style)::

    python -m perl_core.data.fewshot --data-root ROOT --dataset Caltech101 --shots 16 --seed 1 \
        [--subsample base|new|all] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
from collections import Counter
from typing import Any, Sequence

from perl_core.data.coop import Datum, Splits

SUBSAMPLE_CHOICES = ("all", "base", "new")
_SUBSAMPLE_ALIASES = {"novel": "new"}


def _label(item: Any) -> int:
    return item["label"] if isinstance(item, dict) else item.label


def sample_fewshot_indices(labels: Sequence[int], k: int, rng: random.Random) -> list[int]:
    """Positions picked by the Dassl procedure for a split whose labels (in order) are `labels`.

    `random.sample` picks the same positions whether given the items or their indices.
    """
    groups: dict[int, list[int]] = {}  # label -> positions, first-appearance order
    for i, y in enumerate(labels):
        groups.setdefault(y, []).append(i)
    out: list[int] = []
    for group in groups.values():
        out.extend(rng.sample(group, k) if len(group) >= k else group)
    return out


def sample_fewshot(items: Sequence[Any], k: int, rng: random.Random) -> list[Any]:
    """k items per label (Dassl); items are Datum-like (`.label`) or dicts (`["label"]`)."""
    return [items[i] for i in sample_fewshot_indices([_label(it) for it in items], k, rng)]


def fewshot_indices(splits: Splits, shots: int, seed: int) -> dict[str, list[int] | None]:
    """{"train": positions into splits.train, "val": positions into splits.val (None when
    `val_is_test`)}; shots < 1 keeps everything (no RNG draw)."""
    if shots < 1:
        return {"train": list(range(len(splits.train))),
                "val": None if splits.val_is_test else list(range(len(splits.val)))}
    rng = random.Random(seed)  # our own stream: nothing else may draw from it
    train = sample_fewshot_indices([d.label for d in splits.train], shots, rng)
    if splits.val_is_test:
        return {"train": train, "val": None}
    val = sample_fewshot_indices([d.label for d in splits.val], min(shots, 4), rng)
    return {"train": train, "val": val}


def fewshot_splits(splits: Splits, shots: int, seed: int) -> Splits:
    """The CoOp few-shot train/val sets for (shots, seed); test and class names unchanged."""
    idx = fewshot_indices(splits, shots, seed)
    train = tuple(splits.train[i] for i in idx["train"])
    val = splits.test if idx["val"] is None else tuple(splits.val[i] for i in idx["val"])
    return dataclasses.replace(splits, train=train, val=val)


def check_shots(splits: Splits, shots: int) -> None:
    """Raise ValueError naming every class with fewer than `shots` training images.

    Dassl silently takes the whole (smaller) class; the pipeline calls this to refuse such cells.
    """
    if shots < 1:
        return
    counts = Counter(d.label for d in splits.train)
    small = [(y, counts.get(y, 0)) for y in range(len(splits.classnames))
             if counts.get(y, 0) < shots]
    if small:
        shown = ", ".join(f"{splits.classnames[y]!r} (label {y}: {n})" for y, n in small[:10])
        more = f" and {len(small) - 10} more" if len(small) > 10 else ""
        raise ValueError(f"{splits.dataset or 'dataset'}: shots={shots} but {len(small)} class(es)"
                         f" have fewer training images: {shown}{more}")


def _normalise_subsample(subsample: str) -> str:
    s = _SUBSAMPLE_ALIASES.get(subsample, subsample)
    if s not in SUBSAMPLE_CHOICES:
        raise ValueError(f"subsample={subsample!r} is not one of {list(SUBSAMPLE_CHOICES)}")
    return s


def subsample_relabel(train_labels: Sequence[int], subsample: str) -> dict[int, int] | None:
    """{old label: new label} of the kept classes (None for "all"); see module doc."""
    s = _normalise_subsample(subsample)
    if s == "all":
        return None
    labels = sorted(set(train_labels))
    if not labels:
        raise ValueError(f"subsample={subsample!r} needs a non-empty train split (the class set "
                         f"is taken from it, as CoOp does)")
    m = math.ceil(len(labels) / 2)
    keep = labels[:m] if s == "base" else labels[m:]
    return {y: i for i, y in enumerate(keep)}


def _relabel(items: Sequence[Datum], relabel: dict[int, int]) -> tuple[Datum, ...]:
    return tuple(dataclasses.replace(d, label=relabel[d.label]) for d in items
                 if d.label in relabel)


def subsample_classes(splits: Splits, subsample: str) -> Splits:
    """The base ("base") or novel ("new") half of the classes, relabelled; "all": unchanged."""
    relabel = subsample_relabel([d.label for d in splits.train], subsample)
    if relabel is None:
        return splits
    test = _relabel(splits.test, relabel)
    return dataclasses.replace(
        splits, train=_relabel(splits.train, relabel),
        val=test if splits.val_is_test else _relabel(splits.val, relabel), test=test,
        classnames=tuple(splits.classnames[y] for y in relabel))


# ------------------------------------------------------------------------------------------------
# index files


def fewshot_index(splits: Splits, shots: int, seed: int, subsample: str = "all") -> dict:
    """The selection as a JSON-able dict (cross_modal_adaptation's index files, plus metadata).

    `train`/`val`: {"indices": positions into the full split lists, "data": [[relpath, label,
    classname], ...]} with relpaths under the dataset's image root and labels after subsampling.
    For ImageNet (val is the test set) `val` is null.
    """
    idx = fewshot_indices(splits, shots, seed)
    relabel = subsample_relabel([splits.train[i].label for i in idx["train"]], subsample)
    keep = (lambda y: True) if relabel is None else (lambda y: y in relabel)
    new = (lambda y: y) if relabel is None else relabel.__getitem__

    def block(items: Sequence[Datum], positions: list[int]) -> dict:
        pos = [i for i in positions if keep(items[i].label)]
        return {"indices": pos,
                "data": [[splits.relpath(items[i]), new(items[i].label), items[i].classname]
                         for i in pos]}

    classnames = list(splits.classnames) if relabel is None else \
        [splits.classnames[y] for y in relabel]
    num_test = sum(1 for d in splits.test if keep(d.label))
    return {
        "dataset": splits.dataset, "shots": shots, "seed": seed,
        "subsample": _normalise_subsample(subsample), "classnames": classnames,
        "train": block(splits.train, idx["train"]),
        "val": None if idx["val"] is None else block(splits.val, idx["val"]),
        "val_is_test": splits.val_is_test, "num_test": num_test,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perl_core.data.fewshot",
                                 description="Write the CoOp/Dassl few-shot selection of a "
                                             "dataset as a JSON index file.")
    ap.add_argument("--data-root", required=True, help="CoOp data root (path or s3:// URL)")
    ap.add_argument("--dataset", required=True, help="registered dataset name")
    ap.add_argument("--shots", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--subsample", default="all", choices=[*SUBSAMPLE_CHOICES, "novel"])
    ap.add_argument("--out", help="output JSON file (path or URL); default: stdout")
    ap.add_argument("--check-shots", action="store_true",
                    help="fail if a class has fewer than --shots training images")
    args = ap.parse_args(argv)

    from perl_core.data import storage
    from perl_core.data.coop import load_splits

    splits = load_splits(args.dataset, args.data_root)
    if args.check_shots:
        check_shots(splits, args.shots)
    index = fewshot_index(splits, args.shots, args.seed, args.subsample)
    text = json.dumps(index, indent=1)
    if args.out:
        storage.write_bytes(args.out, (text + "\n").encode())
        print(f"{index['dataset']}: {len(index['train']['indices'])} train"
              + ("" if index["val"] is None else f", {len(index['val']['indices'])} val")
              + f" items ({args.shots} shots, seed {args.seed}, {index['subsample']}) -> "
                f"{args.out}", file=sys.stderr)
    else:
        sys.stdout.write(text + "\n")
    return 0


__all__ = ["sample_fewshot", "sample_fewshot_indices", "fewshot_indices", "fewshot_splits",
           "check_shots", "subsample_classes", "subsample_relabel", "fewshot_index",
           "SUBSAMPLE_CHOICES"]


if __name__ == "__main__":
    raise SystemExit(main())
