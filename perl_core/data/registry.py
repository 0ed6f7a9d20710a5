"""Benchmark registry: one DatasetSpec per dataset, looked up by name (case-insensitive, aliases).

The registry imports no dataset module: the package `perl_core.data` imports the built-in ones,
which register themselves (the 15 real benchmarks in `perl_core.data.benchmarks`, the synthetic
world of the embedded default in `perl_core.data.toy_world`), so they are in before any lookup
(importing this module imports the package first). Adding a dataset is one
`register(DatasetSpec(...))`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterable, Literal

Loader = Literal["split_json", "fgvc", "imagenet", "imagenet_variant"]


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # canonical name, as in the paper's tables ("Caltech101", "ImageNetA", ...)
    dataset_dir: str  # folder under data_root ("caltech-101")
    image_dir: str  # image root inside dataset_dir ("101_ObjectCategories"; "" = dataset_dir)
    template: str  # CoOp's per-dataset template ("a photo of a {}.")
    loader: Loader = "split_json"
    split_file: str | None = None  # "split_zhou_Caltech101.json" for loader == "split_json"
    aliases: tuple[str, ...] = ()  # other accepted names (CoOp cfg names, lower-case keys)
    num_classes: int | None = None  # expected class count (checked when loading)
    test_only: bool = False  # OOD variants: only a test split
    # OOD variants: the source dataset whose class list they share (ImageNet for -V2/-Sketch/...)
    source: str | None = None
    synthetic: bool = False  # part of the project's generated world
    extra: dict = field(default_factory=dict, hash=False, compare=False)


_REGISTRY: dict[str, DatasetSpec] = {}
_KEYS: dict[str, str] = {}  # normalised name or alias -> canonical name


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def register(spec: DatasetSpec, *, overwrite: bool = False) -> DatasetSpec:
    if spec.name in _REGISTRY and not overwrite and _REGISTRY[spec.name] != spec:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    for key in (spec.name, *spec.aliases):
        _KEYS[_norm(key)] = spec.name
    return spec


def import_modules(names: Iterable[str]) -> None:
    """Import modules that register datasets of their own (a sweep's `imports:`,
    `python -m perl_core.train --import`), in order; each once per process (Python caches
    them). Raises what the import raises."""
    names = list(names)
    if names:  # a module written after this process last listed its folder is still found
        importlib.invalidate_caches()
    for name in names:
        importlib.import_module(name)


def get_spec(name: str) -> DatasetSpec:
    canonical = _KEYS.get(_norm(name))
    if canonical is None:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {list_datasets()}")
    return _REGISTRY[canonical]


def list_datasets(*, synthetic: bool | None = None) -> list[str]:
    return [n for n, s in _REGISTRY.items() if synthetic is None or s.synthetic == synthetic]

