"""TrainConfig: the one flat, typed description of a PERL training run.

The same field names are used everywhere: dataclass field = sweep YAML key = MLflow param = table
column. Defaults are the paper's (arXiv 2605.18464, Appendix A); where the paper is silent the
default is our documented choice (see README, "Method decisions").
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

# Bump when the meaning of a field changes, so that old runs stop matching new cells.
SCHEMA_VERSION = 1

Protocol = Literal["base2novel", "cross_dataset", "domain_generalization", "all"]
Modality = Literal["both", "vision", "text"]
Variant = Literal["shared", "step", "early", "deep", "layer", "layerstep"]
Template = Literal["generic", "coop"]
# Table 4's step/layer/layerstep: the paper's sizes (32K/26K/83K) = (1 + specific) x 6,402, i.e.
# the shared pair is kept and the specific projectors are added to it (docs/method.md)
VariantProjectors = Literal["shared_plus_specific", "specific_only"]
SPECIFIC_VARIANTS = ("step", "layer", "layerstep")  # the variants variant_projectors applies to
ProjectorInit = Literal["default", "near_identity"]
FewshotSource = Literal["sample", "coop_pickle"]
Precision = Literal["fp32", "bf16"]
TextPlacement = Literal["after_bos", "front"]


@dataclass(frozen=True)
class TrainConfig:
    # --- data ------------------------------------------------------------------------------
    dataset: str = ""  # registry name, e.g. "Caltech101" (case-insensitive, CoOp names accepted)
    protocol: Protocol = "base2novel"
    # cross_dataset / domain_generalization: datasets evaluated with the trained projectors
    eval_datasets: tuple[str, ...] = ()
    shots: int = 16
    seed: int = 1
    template: Template = "generic"
    # where the few-shot picks come from: our seeded sampler, or CoOp's split_fewshot/*.pkl files
    fewshot_source: FewshotSource = "sample"
    aug_scale_min: float = 0.08  # RandomResizedCrop lower scale (Dassl default 0.08)
    # --- model -----------------------------------------------------------------------------
    arch: str = "ViT-B-16-quickgelu"
    pretrained: str = "openai"  # open_clip tag, local checkpoint path, "" for random init
    inject_layer: int = 7
    text_inject_layer: int = -1  # -1: same as inject_layer (paper: J=7 for both encoders)
    num_steps: int = 4
    rank: int = 1
    modality: Modality = "both"
    variant: Variant = "shared"
    # multi-depth variants (deep/layer/layerstep); empty = the variant's default depths
    inject_layers: tuple[int, ...] = ()
    text_placement: TextPlacement = "after_bos"
    variant_projectors: VariantProjectors = "shared_plus_specific"
    projector_init: ProjectorInit = "default"
    # --- objective and optimiser -------------------------------------------------------------
    anchor_weight: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0  # [INF] paper silent; 0 keeps a 6K-param adapter unregularised
    batch_size: int = 4
    epochs: int = 1
    precision: Precision = "fp32"
    # --- execution (not part of the config hash: they do not change the result) ------------
    data_root: str = ""
    device: str = "auto"
    eval_batch_size: int = 128
    # DataLoader workers; -1 (auto): 0 on the CPU, else the trial's CPU share
    # (`perl_core.evaluate.resolve_num_workers`; the pipeline passes resources.cpu)
    num_workers: int = -1
    # seeded test images per evaluation set for the per-step Jacobian norm (0: not measured);
    # a diagnostic of the evaluation, not of the training, so it is left out of the hash;
    # 16: one image's Jacobian (K=4) costs ~9-25 evaluated images, so 16 stay under 10 % of a
    # typical B2N half test set (~1,900 images; docs/method.md)
    jacobian_samples: int = 16

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def effective_text_inject_layer(self) -> int:
        return self.inject_layer if self.text_inject_layer < 0 else self.text_inject_layer

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a mapping (YAML, JSON, MLflow params as strings); unknown keys are errors."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig key(s) {unknown}; allowed: {sorted(known)}")
        hints = get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in d.items()})

    @classmethod
    def from_record(cls, d: dict[str, Any]) -> "TrainConfig":
        """`from_dict` for a stored config (trial record, MLflow params, projector file): a field
        it lacks was added after it was written, so it takes the value that gives the behaviour
        of that time (LEGACY_VALUES), not today's default."""
        return cls.from_dict({**{k: v for k, v in LEGACY_VALUES.items() if k not in d}, **d})

    def hashed_fields(self) -> dict[str, Any]:
        d = canonical_values(self.to_dict())
        for k in EXECUTION_FIELDS:
            d.pop(k)
        # a field added after schema 1 enters the hash only when it differs from the value that
        # gives the earlier behaviour, so runs finished before it existed keep their hashes
        for k, legacy in LEGACY_VALUES.items():
            if d[k] == legacy:
                d.pop(k)
        if self.variant not in SPECIFIC_VARIANTS:  # no specific projectors: nothing to combine
            d.pop("variant_projectors", None)
        d["schema_version"] = SCHEMA_VERSION
        return d

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of every field that can change the result."""
        blob = json.dumps(self.hashed_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


EXECUTION_FIELDS = ("data_root", "device", "eval_batch_size", "num_workers", "jacobian_samples")
# field -> the value that reproduces what the code did before the field existed (see hashed_fields)
LEGACY_VALUES: dict[str, Any] = {"fewshot_source": "sample", "variant_projectors": "specific_only",
                                 "projector_init": "default"}
FIELD_NAMES = tuple(f.name for f in fields(TrainConfig))
CANONICAL_FIELDS = ("variant", "variant_projectors", "inject_layer", "text_inject_layer")


def canonical_values(d: dict[str, Any]) -> dict[str, Any]:
    """One spelling for each model that can be written two ways (the hash and the aggregate's
    table keys both use it): variant_projectors of a variant without specific projectors is the
    default (it changes nothing), and a text_inject_layer equal to inject_layer is -1 ("text
    follows J"). A copy of `d`, which may hold any subset of the fields."""
    d = dict(d)
    if "variant_projectors" in d and d.get("variant") not in SPECIFIC_VARIANTS:
        d["variant_projectors"] = _DEFAULT_VARIANT_PROJECTORS
    if d.get("text_inject_layer") is not None and d.get("text_inject_layer") == d.get(
            "inject_layer"):
        d["text_inject_layer"] = -1
    return d


_DEFAULT_VARIANT_PROJECTORS = TrainConfig.variant_projectors


def literal_choices(name: str) -> tuple[str, ...] | None:
    """Allowed values of a Literal-typed field, else None (used by error messages)."""
    hint = get_type_hints(TrainConfig)[name]
    return tuple(get_args(hint)) if get_origin(hint) is Literal else None


def _coerce(name: str, value: Any, hint: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise ValueError(f"{name}={value!r} is not one of {list(get_args(hint))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else [
                v for v in value.split(",") if v.strip()]
        (item_t, _ellipsis) = get_args(hint)
        return tuple(_coerce(name, v, item_t) for v in value)
    try:
        if hint is bool and isinstance(value, str):
            return value.lower() in ("1", "true", "yes")
        if hint is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return hint(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a valid {hint.__name__}") from None


__all__ = ["TrainConfig", "SCHEMA_VERSION", "FIELD_NAMES", "EXECUTION_FIELDS", "LEGACY_VALUES",
           "SPECIFIC_VARIANTS", "CANONICAL_FIELDS", "canonical_values", "literal_choices"]
