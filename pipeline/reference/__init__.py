"""The paper's printed numbers (arXiv 2605.18464v1) as typed data.

Loaded from `reference_results.csv` (a byte copy of the project's transcription, see README.md).
These numbers are only ever shown as labelled reference columns beside ours.

    from pipeline.reference import paper_value, paper_dataset
    paper_value("T1", "PERL", "average", "hm")   # -> 74.79
    paper_dataset("caltech-101")                 # -> "Caltech101"; "ToyShapes" -> None
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

CSV_NAME = "reference_results.csv"
COLUMNS = ("table", "setting", "method", "params", "dataset", "metric", "value", "note")

# The paper's dataset groups (PERL.md §5). Order = the paper's column order.
B2N_DATASETS = ("ImageNet", "Caltech101", "OxfordPets", "StanfordCars", "Flowers102", "Food101",
                "FGVCAircraft", "SUN397", "DTD", "EuroSAT", "UCF101")
XD_SOURCE = "ImageNet"
XD_TARGETS = B2N_DATASETS[1:]
DG_SOURCE = "ImageNet"
DG_TARGETS = ("ImageNetV2", "ImageNetSketch", "ImageNetA", "ImageNetR")
PAPER_DATASETS = B2N_DATASETS + DG_TARGETS

# Other spellings users type for the paper's datasets (CoOp config names and folder names).
# Only real benchmarks are listed: the synthetic world is deliberately not mapped to the paper.
_ALIASES = {
    "imagenet": "ImageNet", "caltech101": "Caltech101", "caltech": "Caltech101",
    "oxfordpets": "OxfordPets", "pets": "OxfordPets", "stanfordcars": "StanfordCars",
    "cars": "StanfordCars", "flowers102": "Flowers102", "oxfordflowers": "Flowers102",
    "flowers": "Flowers102", "food101": "Food101", "food": "Food101",
    "fgvcaircraft": "FGVCAircraft", "aircraft": "FGVCAircraft", "sun397": "SUN397", "sun": "SUN397",
    "dtd": "DTD", "describabletextures": "DTD", "eurosat": "EuroSAT", "ucf101": "UCF101",
    "ucf": "UCF101", "imagenetv2": "ImageNetV2", "imagenetsketch": "ImageNetSketch",
    "imageneta": "ImageNetA", "imagenetr": "ImageNetR",
}


@dataclass(frozen=True)
class RefRow:
    table: str  # T1..T8, F1, F3a, F3b, F7
    setting: str  # base2novel, cross_dataset, ablation_steps, ...
    method: str  # PERL, CLIP, "PERL K=3", "Vision only", ...
    params: str  # as printed: "6K", "4.9M", "0"
    dataset: str  # paper dataset name, "average" or "target_average"
    metric: str  # base, novel, hm, acc, delta, confidence, brier, jacobian
    value: float
    text: str  # the printed digits, unchanged ("94.00")
    note: str

    @property
    def approximate(self) -> bool:
        """Read off a figure by eye (about +-0.3), not printed in a table."""
        return "figure-read" in self.note


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def parse_rows(text: str) -> list[RefRow]:
    """Parse the CSV text; every row must have all columns and a numeric value."""
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ValueError(f"reference CSV header {reader.fieldnames} != {list(COLUMNS)}")
    rows = []
    for lineno, r in enumerate(reader, start=2):
        try:
            value = float(r["value"])
        except (TypeError, ValueError):
            raise ValueError(f"reference CSV line {lineno}: value {r['value']!r} is not a number") \
                from None
        rows.append(RefRow(r["table"], r["setting"], r["method"], r["params"], r["dataset"],
                           r["metric"], value, r["value"], r["note"] or ""))
    return rows


@lru_cache(maxsize=1)
def load_reference() -> tuple[RefRow, ...]:
    """All rows of the packaged CSV (cached: the file is immutable package data)."""
    text = resources.files(__name__).joinpath(CSV_NAME).read_text(encoding="utf-8")
    return tuple(parse_rows(text))


@lru_cache(maxsize=1)
def _index() -> dict[tuple[str, str, str, str], RefRow]:
    idx: dict[tuple[str, str, str, str], RefRow] = {}
    for r in load_reference():
        # (table, method, dataset, metric) is unique in the transcription; keep the first if not.
        idx.setdefault((r.table, r.method, r.dataset, r.metric), r)
    return idx


def paper_entry(table: str, method: str, dataset: str, metric: str) -> RefRow | None:
    """The paper's row for (table, method, dataset, metric), or None where the paper has none."""
    return _index().get((table, method, dataset, metric))


def paper_value(table: str, method: str, dataset: str, metric: str) -> float | None:
    """The paper's number, e.g. paper_value("T5", "PERL", "DTD", "novel") -> 62.12; else None."""
    row = paper_entry(table, method, dataset, metric)
    return None if row is None else row.value


def reference_frame():
    """The reference as a pandas DataFrame (value as float, the rest as str)."""
    import pandas as pd

    rows = load_reference()
    return pd.DataFrame({
        **{c: pd.Series([getattr(r, c) for r in rows], dtype="str")
           for c in COLUMNS if c != "value"},
        "value": pd.Series([r.value for r in rows], dtype="float64"),
        "approximate": pd.Series([r.approximate for r in rows], dtype="bool"),
    })[[*COLUMNS, "approximate"]]


def paper_dataset(name: str) -> str | None:
    """The paper's name for one of its 15 benchmarks, or None (synthetic/unknown datasets).

    Uses the dataset registry when it can: a dataset registered as synthetic never maps to the
    paper, even if its name looked like a real one.
    """
    if not name:
        return None
    try:
        from perl_core.data.registry import get_spec

        spec = get_spec(name)
    except Exception:  # registry unavailable or unknown name: fall back to the paper's names
        spec = None
    if spec is not None:
        if spec.synthetic:
            return None
        name = spec.name
    if name in PAPER_DATASETS:
        return name
    return _ALIASES.get(_norm(name))


__all__ = ["RefRow", "load_reference", "parse_rows", "paper_entry", "paper_value",
           "reference_frame", "paper_dataset", "B2N_DATASETS", "XD_SOURCE", "XD_TARGETS",
           "DG_SOURCE", "DG_TARGETS", "PAPER_DATASETS"]
