"""Data layer: CoOp-format benchmarks, Dassl few-shot sampling, prompts, transforms, images.

Light modules are imported eagerly; `images` and `transforms` (torch / torchvision) on first use.
The built-in datasets register themselves when their modules are imported, here (the registry
imports none of them: no import cycle), before anything can look a name up.
"""

from __future__ import annotations

import importlib
from typing import Any

from perl_core.data.coop import (DataDigest, DatasetError, Datum, Splits, dataset_digest,
                                 load_splits, read_split_file)
from perl_core.data.fewshot import (check_shots, fewshot_index, fewshot_splits, sample_fewshot,
                                    subsample_classes)
from perl_core.data.registry import DatasetSpec, get_spec, list_datasets, register
from perl_core.data.storage import open_fs
from perl_core.data.templates import class_prompts

# the built-in datasets, in the registry's order: the real benchmarks, then the synthetic world
from perl_core.data import benchmarks, toy_world  # noqa: F401  (imported to register)

_LAZY = {
    "ImageListDataset": "perl_core.data.images",
    "ImageReadError": "perl_core.data.images",
    "load_image": "perl_core.data.images",
    "train_transform": "perl_core.data.transforms",
    "eval_transform": "perl_core.data.transforms",
    "CLIP_MEAN": "perl_core.data.transforms",
    "CLIP_STD": "perl_core.data.transforms",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'perl_core.data' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["DatasetSpec", "register", "get_spec", "list_datasets", "Datum", "Splits",
           "DataDigest", "dataset_digest",
           "DatasetError", "load_splits", "read_split_file", "sample_fewshot", "fewshot_splits",
           "check_shots", "subsample_classes", "fewshot_index", "class_prompts", "open_fs",
           *_LAZY]
